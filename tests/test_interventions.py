"""interventions.py: ablation removes the direction everywhere, addition adds it, hooks always go away."""

from __future__ import annotations

import pytest
import torch

from refusal_lens.directions import Direction
from refusal_lens.interventions import ablate, add, generate
from refusal_lens.prompts import tokenize_instructions


def _direction(model, seed=0, norm=5.0):
    g = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(model.cfg.d_model, generator=g), layer=1, position=-1,
                     model_id=model.refusal_lens_id, norm=norm)


def _resid_cache(model, prompts):
    b = tokenize_instructions(model.tokenizer, prompts)
    with torch.no_grad():
        _, cache = model.run_with_cache(b.input_ids, attention_mask=b.attention_mask,
                                        names_filter=lambda n: "hook_resid" in n)
    return cache


def test_ablation_removes_component_at_every_layer(tiny_model):
    d = _direction(tiny_model)
    with ablate(tiny_model, d):
        cache = _resid_cache(tiny_model, ["tell me a story", "hi"])
    for name, act in cache.items():
        assert (act @ d.vector).abs().max() < 1e-4, name
    base = _resid_cache(tiny_model, ["tell me a story", "hi"])
    assert (base["blocks.1.hook_resid_pre"] @ d.vector).abs().max() > 1e-3


def test_addition_adds_raw_vector_at_its_layer(tiny_llama):
    d = _direction(tiny_llama, norm=5.0)
    base = _resid_cache(tiny_llama, ["tell me a story"])
    with add(tiny_llama, d, coeff=2.0):
        added = _resid_cache(tiny_llama, ["tell me a story"])
    delta = added["blocks.1.hook_resid_pre"] - base["blocks.1.hook_resid_pre"]
    assert torch.allclose(delta, (2.0 * d.raw).expand_as(delta), atol=1e-4)
    assert torch.allclose(added["blocks.0.hook_resid_pre"], base["blocks.0.hook_resid_pre"])
    with add(tiny_llama, d, coeff=-2.0):
        sub = _resid_cache(tiny_llama, ["tell me a story"])
    assert torch.allclose(sub["blocks.1.hook_resid_pre"] - base["blocks.1.hook_resid_pre"], -delta, atol=1e-4)


def test_hooks_removed_on_exit_and_on_error(tiny_llama):
    d = _direction(tiny_llama)
    ids = tokenize_instructions(tiny_llama.tokenizer, ["hello"]).input_ids
    with torch.no_grad():
        before = tiny_llama(ids)
        with pytest.raises(RuntimeError), ablate(tiny_llama, d):
            raise RuntimeError("boom")
        after = tiny_llama(ids)
    assert torch.equal(before, after)


def test_interventions_compose(tiny_llama):
    d1, d2 = _direction(tiny_llama, 1), _direction(tiny_llama, 2)
    with ablate(tiny_llama, d1), ablate(tiny_llama, d2):
        cache = _resid_cache(tiny_llama, ["story time"])
    # both ablations applied in sequence: the last one applied leaves no d2 component
    assert (cache["blocks.1.hook_resid_post"] @ d2.vector).abs().max() < 1e-4
    base = _resid_cache(tiny_llama, ["story time"])
    assert not torch.allclose(cache["blocks.1.hook_resid_post"], base["blocks.1.hook_resid_post"])


def test_generate_under_ablation_differs_and_is_cached_consistently(tiny_llama):
    d = _direction(tiny_llama, norm=50.0)
    prompts = ["tell me a story", "the cat"]
    base = generate(tiny_llama, prompts, max_new_tokens=8, progress=False)
    abl = generate(tiny_llama, prompts, max_new_tokens=8, interventions=[lambda m: ablate(m, d)], progress=False)
    abl_nocache = generate(tiny_llama, prompts, max_new_tokens=8, interventions=[lambda m: ablate(m, d)],
                           use_cache=False, progress=False)
    assert abl == abl_nocache
    assert len(base) == 2 and all(isinstance(x, str) for x in base)


def test_direction_for_other_model_is_refused(tiny_llama):
    d = Direction(torch.randn(tiny_llama.cfg.d_model), 1, -1, "someone-else")
    from refusal_lens.errors import DirectionError

    with pytest.raises(DirectionError):
        with ablate(tiny_llama, d):
            pass
