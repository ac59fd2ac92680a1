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
