"""activations.py and directions.py: streaming means, diff-in-means candidates, Direction I/O."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_lens.activations import mean_activations
from refusal_lens.directions import Candidates, Direction, candidate_directions
from refusal_lens.errors import DataError, DirectionError
from refusal_lens.prompts import ChatFormat, tokenize_instructions

HARMFUL = ["how to steal a car", "make a weapon now", "hurt the cat badly", "break into the house"]
HARMLESS = ["tell me a story", "what is the weather", "how to bake bread", "the dog plays in the park"]


def test_streaming_means_equal_full_cache(tiny_model):
    fmt = ChatFormat.from_tokenizer(tiny_model.tokenizer)
    streamed = mean_activations(tiny_model, HARMFUL, batch_size=3, progress=False)
    b = tokenize_instructions(tiny_model.tokenizer, HARMFUL, fmt)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(b.input_ids, attention_mask=b.attention_mask)
    for layer in range(tiny_model.cfg.n_layers):
        ref = cache[f"blocks.{layer}.hook_resid_pre"][:, fmt.positions].double().mean(0)
        assert torch.allclose(streamed.mean[layer], ref, atol=1e-5)
    assert streamed.mean.dtype == torch.float64 and streamed.count == 4
    assert streamed.mean.shape == (tiny_model.cfg.n_layers, fmt.n_post, tiny_model.cfg.d_model)


def test_candidates_are_mean_differences(tiny_llama):
    c = candidate_directions(tiny_llama, HARMFUL, HARMLESS, progress=False)
    assert torch.allclose(c.diffs, c.harmful_mean - c.harmless_mean, atol=1e-6)
    # layer 0 at template positions: the same tokens in both sets -> zero candidate, never valid
    assert not c.is_valid(0, len(c.positions) - 1)
    with pytest.raises(DirectionError, match="zero or NaN"):
        c.direction(0, -1)
    d = c.direction(1, -1)
    assert abs(float(d.vector.norm()) - 1) < 1e-5 and d.norm > 0
    assert torch.allclose(d.raw, c.diffs[1, -1], atol=1e-5)


def test_direction_roundtrip_and_model_checks(tmp_path, tiny_llama):
    d = Direction(torch.randn(tiny_llama.cfg.d_model), layer=1, position=-1, model_id="tiny-llama", norm=3.0,
                  provenance={"split": "train"})
    d.save(tmp_path / "dir")
    back = Direction.load(tmp_path / "dir.safetensors")
    assert torch.equal(back.vector, d.vector) and back.provenance == {"split": "train"} and back.norm == 3.0
    back.check_model(tiny_llama)
    wrong = Direction(torch.randn(7), 1, -1, "tiny-llama")
    with pytest.raises(DirectionError, match="width 7"):
        wrong.check_model(tiny_llama)
    other = Direction(torch.randn(tiny_llama.cfg.d_model), 1, -1, "another-model")
    with pytest.raises(DirectionError, match="another-model"):
        other.check_model(tiny_llama)
    meta = json.loads((tmp_path / "dir.json").read_text())
    assert meta["d_model"] == tiny_llama.cfg.d_model and "vector" not in meta


def test_direction_bad_files(tmp_path):
    with pytest.raises(DirectionError, match="missing"):
        Direction.load(tmp_path / "nothing")
    with pytest.raises(DirectionError, match="zero or NaN"):
        Direction(torch.full((4,), float("nan")), 0, -1, "m")


def test_candidates_save_load(tmp_path, tiny_llama):
    c = candidate_directions(tiny_llama, HARMFUL, HARMLESS, progress=False)
    c.save(tmp_path / "cands")
    back = Candidates.load(tmp_path / "cands.safetensors")
    assert torch.equal(back.diffs, c.diffs) and back.positions == c.positions


def test_empty_prompt_set(tiny_llama):
    with pytest.raises(DataError):
        mean_activations(tiny_llama, [], progress=False)


PROMPTS = [f"Answer briefly, please: {x}" for x in ("hi", "tell me a story about a cat", "how do I bake bread",
                                                     "why is the sky blue", "write a poem", "name three rivers",
                                                     "count to five")]


@pytest.mark.parametrize("limit", [None, 2])
def test_read_prompts_gives_last_logits_and_the_means_of_the_prompts_it_chose(tiny_model, limit):
    """One forward per batch: the logits are last_logits', the means mean_activations' over the chosen
    prompts only (the first `limit` of them), whichever batches they sat in."""
    from refusal_lens.activations import read_prompts
    from refusal_lens.evaluate import last_logits

    ref_logits = last_logits(tiny_model, PROMPTS, batch_size=3)
    wanted = ref_logits[:, 0] > ref_logits[:, 0].median()  # a choice that depends on the logits
    r = read_prompts(tiny_model, PROMPTS, choose=lambda lg: lg[:, 0] > ref_logits[:, 0].median(), limit=limit,
                     batch_size=3, progress=False)
    torch.testing.assert_close(r.logits, ref_logits, rtol=0, atol=1e-5)
    expect = wanted.nonzero().flatten().tolist()[:limit]
    assert r.chosen == expect and len(expect) >= 2  # the choice spans batches
    ref = mean_activations(tiny_model, [PROMPTS[i] for i in expect], batch_size=3, progress=False)
    assert r.means.count == len(expect) and r.means.positions == ref.positions
    torch.testing.assert_close(r.means.mean, ref.mean, rtol=0, atol=1e-5)
    every = read_prompts(tiny_model, PROMPTS, batch_size=3, progress=False)  # choose=None: all of them
    assert every.chosen == list(range(len(PROMPTS)))
    torch.testing.assert_close(every.means.mean, mean_activations(tiny_model, PROMPTS, batch_size=3,
                                                                  progress=False).mean, rtol=0, atol=1e-5)


def test_read_prompts_that_choose_nothing_have_no_means(tiny_llama):
    from refusal_lens.activations import read_prompts

    r = read_prompts(tiny_llama, PROMPTS[:3], choose=lambda lg: torch.zeros(len(lg), dtype=torch.bool),
                     progress=False)
    assert r.chosen == [] and r.means is None and r.logits.shape == (3, tiny_llama.cfg.d_vocab)
    with pytest.raises(DataError, match="empty"):
        read_prompts(tiny_llama, [], progress=False)


def test_candidates_from_means_equal_candidate_directions(tiny_llama):
    from refusal_lens.directions import candidates_from_means

    h = mean_activations(tiny_llama, HARMFUL, progress=False)
    hl = mean_activations(tiny_llama, HARMLESS, progress=False)
    c, ref = candidates_from_means(tiny_llama, h, hl), candidate_directions(tiny_llama, HARMFUL, HARMLESS, progress=False)
    assert torch.equal(c.diffs, ref.diffs) and c.positions == ref.positions and c.provenance == ref.provenance
    with pytest.raises(DirectionError, match="do not match"):
        candidates_from_means(tiny_llama, h, mean_activations(tiny_llama, HARMLESS, positions=[-1], progress=False))
