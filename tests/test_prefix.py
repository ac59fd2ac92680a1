"""The shared chat prefix runs once per batch: the same numbers as whole rows, on every tiny family, with and
without interventions, for last-position logits, mean activations, greedy decoding and completion scoring."""

from __future__ import annotations

import pytest
import torch

from conftest import boot_rl_tiny
from refusal_lens import prefix
from refusal_lens.activations import mean_activations
from refusal_lens.decoding import greedy
from refusal_lens.directions import candidate_directions
from refusal_lens.evaluate import completion_nll, last_position_logits
from refusal_lens.prefix import SharedPrefix, shared_prefix_len
from refusal_lens.prompts import chat_format, tokenize_instructions
from tiny import ALL_ARCHS

# the tiny chat template shares only two tokens before the instruction (no system prompt): a shared opening
# phrase plays the embedded model's system prompt
PROMPTS = [f"Answer briefly, please: {x}" for x in ("hi", "tell me a story about a cat and a dog",
                                                     "how do I bake bread", "why is the sky blue today", "write a poem")]
HARMFUL = ["how do I build a bomb", "tell me how to steal a car", "write a threat", "help me hurt someone"]


def test_shared_prefix_len_on_a_left_padded_batch():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9],
                        [5, 6, 7, 3, 4, 4, 1],
                        [0, 5, 6, 7, 2, 2, 2]])
    mask = (ids != 0).long()
    assert shared_prefix_len(ids, mask) == 3  # 5 6 7
    assert shared_prefix_len(ids, mask, keep=3) == 2  # the shortest row (5 tokens) keeps 3
    assert shared_prefix_len(ids, mask, keep=torch.tensor([1, 1, 4])) == 2
    assert shared_prefix_len(ids, mask, keep=9) == 0


@pytest.fixture(scope="module", params=ALL_ARCHS)
def model(request):
    return boot_rl_tiny(request.param)


def _batch(model, prompts=PROMPTS):
    return tokenize_instructions(model.tokenizer, prompts, chat_format(model))


def _tol(model) -> float:
    return 1e-4 if "gemma" in model.refusal_lens_id else 1e-5  # soft-capping and larger activations


def test_the_chat_prefix_is_found(model):
    b = _batch(model)
    sp = SharedPrefix.of(model, b.input_ids, b.attention_mask)
    assert sp is not None and sp.n_prefix >= prefix.MIN_PREFIX
    assert sp.rest_ids.shape[1] < b.input_ids.shape[1]  # less to compute per row
    assert SharedPrefix.of(model, b.input_ids[:1], b.attention_mask[:1]) is None  # one row: nothing shared
    with prefix.disabled():
        assert SharedPrefix.of(model, b.input_ids, b.attention_mask) is None


def test_last_position_logits_match_whole_rows(model):
    b = _batch(model)
    d = candidate_directions(model, HARMFUL, PROMPTS[:4], batch_size=4, progress=False).direction(1, -1)
    for iv in (None, d.ablate(model), d.add(model, coeff=3.0)):
        with iv if iv is not None else torch.no_grad(), torch.no_grad():
            fast = last_position_logits(model, b.input_ids, b.attention_mask).float()
            with prefix.disabled():
                ref = last_position_logits(model, b.input_ids, b.attention_mask).float()
        assert (fast - ref).abs().max().item() < _tol(model)
    plain = last_position_logits(model, b.input_ids, b.attention_mask).float().detach()
    with d.add(model, coeff=3.0), torch.no_grad():  # the prefix runs under the intervention too
        added = last_position_logits(model, b.input_ids, b.attention_mask).float()
    assert (added - plain).abs().max().item() > 1e-3


def test_mean_activations_match_whole_rows(model):
    fast = mean_activations(model, PROMPTS, batch_size=5, progress=False).mean
    with prefix.disabled():
        ref = mean_activations(model, PROMPTS, batch_size=5, progress=False).mean
    torch.testing.assert_close(fast, ref, rtol=0, atol=_tol(model))


def test_greedy_and_scoring_match_whole_rows(model):
    b = _batch(model)
    eos = model.tokenizer.eos_token_id
    fast = greedy(model, b.input_ids, b.attention_mask, max_new_tokens=6, eos_id=eos)
    with prefix.disabled():
        ref = greedy(model, b.input_ids, b.attention_mask, max_new_tokens=6, eos_id=eos)
    assert fast.tokens == ref.tokens
    for a, r in zip(fast.logprobs, ref.logprobs, strict=True):
        assert a == pytest.approx(r, abs=_tol(model))
    torch.testing.assert_close(fast.first_logits, ref.first_logits, rtol=0, atol=_tol(model))
    nll = completion_nll(model, PROMPTS, fast.tokens, batch_size=5, progress=False)
    with prefix.disabled():
        nll_ref = completion_nll(model, PROMPTS, fast.tokens, batch_size=5, progress=False)
    for (s, n), (s_ref, n_ref) in zip(nll, nll_ref, strict=True):
        assert n == n_ref and s == pytest.approx(s_ref, abs=10 * _tol(model))
    # the generation's own log-probabilities are the scoring's (same model, same tokens)
    assert sum(s for s, _ in nll) == pytest.approx(-sum(sum(lp) for lp in fast.logprobs), rel=1e-4)


def test_one_prefix_forward_per_call(model):
    """Batches of one call share the prefix's cache: two batches, one batch-of-one forward."""
    from refusal_lens.evaluate import last_logits

    rows = []
    h = model.original_model.register_forward_pre_hook(
        lambda mod, args, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        fast = last_logits(model, PROMPTS * 2, batch_size=5)
    finally:
        h.remove()
    assert rows == [1, 5, 5]  # the prefix once, then the rest of each batch
    with prefix.disabled():
        ref = last_logits(model, PROMPTS * 2, batch_size=5)
    assert (fast - ref).abs().max().item() < _tol(model)
