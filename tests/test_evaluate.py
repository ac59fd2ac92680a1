"""evaluate.py: refusal score, refusal metric, KL, CE, coherence."""

from __future__ import annotations

import math

import pytest
import torch

from refusal_lens.evaluate import (
    coherence,
    completion_ce,
    is_refusal,
    kl_last,
    last_logits,
    refusal_metric_from_logits,
    refusal_score,
    repetition,
)
from refusal_lens.prompts import tokenize_instructions


def test_refusal_substrings():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I\u2019m sorry, no.")  # curly apostrophe
    assert is_refusal("As an AI, I cannot do that")
    assert not is_refusal("Sure, here is a recipe for pancakes.")
    assert refusal_score(["I cannot", "Sure", "Sure", "I apologize"]) == 0.5
    assert math.isnan(refusal_score([]))


def test_refusal_metric_formula():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    m = refusal_metric_from_logits(logits, [0])
    assert torch.allclose(m, torch.tensor([0.0, math.log(0.1 / 0.9)]), atol=1e-5)
    m2 = refusal_metric_from_logits(logits, [0, 1])
    assert torch.allclose(m2[0], torch.tensor(math.log(0.75 / 0.25)), atol=1e-5)


def test_kl_zero_for_same_and_positive_otherwise():
    a = torch.randn(3, 11)
    assert abs(kl_last(a, a)) < 1e-9
    b = a.clone()
    b[:, 0] += 2
    p, q = a.double().softmax(-1), b.double().softmax(-1)
    assert abs(kl_last(a, b) - float((p * (p / q).log()).sum(-1).mean())) < 1e-9


def test_last_logits_equal_full_forward(tiny_model):
    prompts = ["tell me a story", "hi there friend"]
    fast = last_logits(tiny_model, prompts)
    b = tokenize_instructions(tiny_model.tokenizer, prompts)
    with torch.no_grad():
        full = tiny_model(b.input_ids, attention_mask=b.attention_mask)[:, -1]
    assert (fast - full).abs().max() < 1e-4


def test_completion_ce_matches_manual(tiny_llama):
    tok = tiny_llama.tokenizer
    ce = completion_ce(tiny_llama, ["tell me a story"], [" the cat sat"])
    from refusal_lens.prompts import ChatFormat

    fmt = ChatFormat.from_tokenizer(tok)
    p = tok(fmt.format("tell me a story"), add_special_tokens=False)["input_ids"]
    c = tok(" the cat sat", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = tiny_llama(ids).log_softmax(-1)[0]
    manual = -sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(c)) / len(c)
    assert abs(ce - manual) < 1e-4


def test_repetition_and_coherence(tiny_llama):
    assert repetition("a b c a b c a b c a b c") > 0.5
    assert repetition("the quick brown fox jumps over the lazy dog") == 0.0
    coh = coherence(tiny_llama, ["tell me a story", "hi"], ["", "dog dog dog dog dog dog dog dog dog"],
                    max_perplexity=1e9)
    assert coh.coherent == [False, False]
    assert coh.fraction == 0.0


@pytest.mark.integration
def test_embedded_refusal_vs_garbage(embedded_model):
    """A fluent answer is coherent under the base model; token soup is not, even though neither refuses."""
    instr = ["Give me a recipe for pancakes."] * 2
    good = "Sure! Mix one cup of flour, one egg and a cup of milk, then cook on a hot pan."
    bad = "pan pancakes\u00e9 zx9 qq)) flour(( milk milk ]] ??? 88 tokenize thermal the the"
    coh = coherence(embedded_model, instr, [good, bad])
    assert coh.coherent == [True, False]
    assert coh.perplexity[0] < 30 < coh.perplexity[1]


def test_completion_nll_batched_equals_one_at_a_time(tiny_llama):
    """Sorted into batches of similar length, unembedding only the completion positions: the same (NLL, n)
    per completion, in input order, as each scored alone; empty completions score (0, 0)."""
    from refusal_lens.evaluate import completion_nll

    prompts = ["tell me a story", "hi", "what is the weather like in the park today", "draw a cat", "sing"]
    comps = [" the cat sat on the mat", "", " sunny", [5, 6, 7, 8, 9, 10, 11, 12], " a"]
    together = completion_nll(tiny_llama, prompts, comps, batch_size=2, progress=False)
    alone = [completion_nll(tiny_llama, [p], [c], progress=False)[0] for p, c in zip(prompts, comps, strict=True)]
    assert [n for _, n in together] == [n for _, n in alone] and together[3][1] == 8
    assert together[1] == (0.0, 0)
    for (s1, _), (s2, _) in zip(together, alone, strict=True):
        assert abs(s1 - s2) < 1e-4 * max(1.0, abs(s2))
