"""Greedy decoding that drops finished rows: the same tokens as transformers' generate, and what it keeps
(first-position logits, token log-probabilities) equal to what evaluation would recompute."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import boot_rl_tiny
from refusal_lens.decoding import greedy
from refusal_lens.directions import Direction
from refusal_lens.evaluate import completion_nll, last_logits
from refusal_lens.interventions import complete, generate
from refusal_lens.prompts import batches, chat_format
from tiny import ALL_ARCHS

PROMPTS = ["hello there", "how do I pick a lock quickly", "write a poem", "a", "tell me about the sea and the sky",
           "ok"]


def _hf_greedy(model, b, max_new, eos):
    tok = model.tokenizer
    out = model.original_model.generate(b.input_ids, attention_mask=b.attention_mask, max_new_tokens=max_new,
                                        do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                                        top_k=None, top_p=None, temperature=None)
    rows = []
    for row in out[:, b.input_ids.shape[1]:].tolist():
        cut = row.index(eos) + 1 if eos in row else len(row)
        rows.append(row[:cut])
    return rows


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_same_tokens_as_transformers_generate_with_rows_ending_early(arch):
    model = boot_rl_tiny(arch)
    b = next(iter(batches(model.tokenizer, PROMPTS, len(PROMPTS), chat_format(model))))
    free = _hf_greedy(model, b, 12, None)
    # an end token that some rows emit after a few steps, so rows leave the batch at different times
    eos = Counter(t for row in free for t in row[2:6]).most_common(1)[0][0]
    g = greedy(model, b.input_ids, b.attention_mask, max_new_tokens=12, eos_id=eos)
    lengths = [len(t) for t in g.tokens]
    assert min(lengths) < 12 and max(lengths) == 12  # some rows were dropped, some ran to the end
    assert g.tokens == _hf_greedy(model, b, 12, eos)
    assert g.first_logits.shape == (len(PROMPTS), model.cfg.d_vocab)


def test_under_an_intervention_the_same_as_the_uncached_reference(tiny_model):
    torch.manual_seed(0)
    d = Direction(torch.randn(tiny_model.cfg.d_model), layer=1, position=-1, model_id=tiny_model.refusal_lens_id,
                  norm=5.0)
    with d.ablate(tiny_model):
        ref = generate(tiny_model, PROMPTS, max_new_tokens=8, batch_size=4, use_cache=False, progress=False)
    got = generate(tiny_model, PROMPTS, interventions=d.ablate(tiny_model), max_new_tokens=8, batch_size=4,
                   progress=False)
    assert got == ref
    assert got != generate(tiny_model, PROMPTS, max_new_tokens=8, batch_size=4, progress=False)


@torch.no_grad()
def _teacher_forced_nll(model, prompt: str, tokens: list[int]) -> float:
    """Summed NLL of ``tokens`` after the chat-formatted ``prompt``, one full forward (no cache, batch 1)."""
    tok = model.tokenizer
    p = tok(chat_format(model).format(prompt), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + tokens])
    logp = model(ids).float().log_softmax(-1)[0, len(p) - 1 : -1]
    return float(-logp.gather(-1, torch.tensor(tokens)[:, None]).sum())


def test_kept_logits_and_logprobs_match_what_evaluation_recomputes(tiny_model):
    c = complete(tiny_model, PROMPTS, max_new_tokens=10, batch_size=4, progress=False)
    assert torch.equal(c.first_logits, last_logits(tiny_model, PROMPTS, batch_size=4))
    for prompt, toks, (s, n) in zip(PROMPTS, c.tokens, c.nll(), strict=True):
        kept = toks[:n]
        assert n == len(toks) - (toks[-1] == c.eos_id)
        assert s == pytest.approx(_teacher_forced_nll(tiny_model, prompt, kept), rel=1e-4, abs=1e-4)
    # the text scored again (completion_nll re-tokenizes it) agrees whenever re-tokenizing gives the same ids
    tok = tiny_model.tokenizer
    same = [i for i, (t, toks, (_, n)) in enumerate(zip(c.texts, c.tokens, c.nll(), strict=True))
            if tok(t, add_special_tokens=False)["input_ids"] == toks[:n]]
    re_scored = completion_nll(tiny_model, [PROMPTS[i] for i in same], [c.texts[i] for i in same], progress=False)
    for i, (s_ref, _) in zip(same, re_scored, strict=True):
        assert c.nll()[i][0] == pytest.approx(s_ref, rel=1e-4, abs=1e-4)


def test_completions_split_into_consecutive_parts(tiny_model):
    """One generation over two prompt sets, split back: each part equals its slice; sizes must add up."""
    from refusal_lens.errors import RefusalLensError

    c = complete(tiny_model, ["a b", "c d e", "f", "g h"], max_new_tokens=3, progress=False)
    first, second = c.split([1, 3])
    assert first.texts == c.texts[:1] and second.tokens == c.tokens[1:] and second.logprobs == c.logprobs[1:]
    assert torch.equal(second.first_logits, c.first_logits[1:]) and second.eos_id == c.eos_id
    with pytest.raises(RefusalLensError, match="add up to 3, not 4"):
        c.split([1, 2])


def _direction(model, seed: int, layer: int = 1) -> Direction:
    g = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(model.cfg.d_model, generator=g), layer=layer, position=-1,
                     model_id=model.refusal_lens_id, norm=5.0)


def test_conditions_in_one_stream_of_batches_get_the_tokens_they_get_alone(tiny_model):
    """complete_each: 5 conditions (23 rows, batches of 7 mixing them; one condition composes two
    interventions, two share one) each get the tokens, log-probabilities and first logits of their own call."""
    from refusal_lens.interventions import complete_each

    d, e = _direction(tiny_model, 0), _direction(tiny_model, 1)
    ablate = d.ablate(tiny_model)
    conditions = {"base": (PROMPTS, []), "ablated": (PROMPTS[:4], [ablate]),
                  "added": (PROMPTS[2:], e.add(tiny_model, 4.0)),
                  "both": (PROMPTS, [ablate, e.add(tiny_model, -4.0)]), "ablated_again": (PROMPTS[3:], [ablate])}
    done = complete_each(tiny_model, conditions, max_new_tokens=8, batch_size=7, progress=False)
    assert list(done) == list(conditions)
    for name, (prompts, ivs) in conditions.items():
        alone = complete(tiny_model, prompts, interventions=ivs, max_new_tokens=8, batch_size=7, progress=False)
        assert done[name].tokens == alone.tokens and done[name].texts == alone.texts, name
        torch.testing.assert_close(done[name].first_logits, alone.first_logits, rtol=1e-5, atol=1e-5)
        flat = [p for row in done[name].logprobs for p in row]
        assert flat == pytest.approx([p for row in alone.logprobs for p in row], abs=1e-5)
    assert done["ablated"].first_logits.sub(done["base"].first_logits[:4]).abs().max() > 1e-2
    assert done["added"].first_logits.sub(done["base"].first_logits[2:]).abs().max() > 1e-2


def test_switch_rows_follow_the_rows_that_end_early(tiny_llama):
    """greedy under a RowSwitch (base and ablated rows interleaved) drops ended rows from the switch too:
    each row's tokens are those of its group decoded alone."""
    from refusal_lens.interventions import RowSwitch

    model = tiny_llama
    d = _direction(model, 0)
    b = next(iter(batches(model.tokenizer, PROMPTS * 2, 12, chat_format(model))))
    free = _hf_greedy(model, b, 12, None)
    eos = Counter(t for row in free for t in row[2:6]).most_common(1)[0][0]
    rows = torch.tensor([0, 1] * 6)
    switch = RowSwitch(model, [[], [d.ablate(model)]])
    switch.rows = rows
    with switch:
        g = greedy(model, b.input_ids, b.attention_mask, max_new_tokens=12, eos_id=eos, switch=switch)
    base = greedy(model, b.input_ids[rows == 0], b.attention_mask[rows == 0], max_new_tokens=12, eos_id=eos)
    with d.ablate(model):
        abl = greedy(model, b.input_ids[rows == 1], b.attention_mask[rows == 1], max_new_tokens=12, eos_id=eos)
    assert g.tokens[0::2] == base.tokens and g.tokens[1::2] == abl.tokens
    assert base.tokens != abl.tokens
    lengths = [len(t) for t in g.tokens]
    assert min(lengths) < 12 and max(lengths) == 12


def test_switch_without_rows_says_how_to_set_them(tiny_llama):
    from refusal_lens.errors import RefusalLensError
    from refusal_lens.interventions import RowSwitch

    switch = RowSwitch(tiny_llama, [[_direction(tiny_llama, 0).ablate(tiny_llama)]])
    with switch, pytest.raises(RefusalLensError, match="set switch.rows"):
        tiny_llama(torch.tensor([[1, 2, 3]]))
    with pytest.raises(RefusalLensError, match=r"group ids in \[0, 1\)"):
        switch.rows = [0, 1]
