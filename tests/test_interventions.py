"""interventions.py: ablation removes the direction (or a subspace) everywhere, addition adds it, hooks always go
away, and one intervention object serves ``with``, ``generate`` and ``last_logits``."""

from __future__ import annotations

import pytest
import torch

from refusal_lens.directions import Direction
from refusal_lens.errors import RefusalLensError
from refusal_lens.evaluate import last_logits
from refusal_lens.interventions import Ablation, Addition, generate
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
    with d.ablate(tiny_model):
        cache = _resid_cache(tiny_model, ["tell me a story", "hi"])
    for name, act in cache.items():
        assert (act @ d.vector).abs().max() < 1e-4, name
    base = _resid_cache(tiny_model, ["tell me a story", "hi"])
    assert (base["blocks.1.hook_resid_pre"] @ d.vector).abs().max() > 1e-3


def test_addition_adds_raw_vector_at_its_layer(tiny_llama):
    d = _direction(tiny_llama, norm=5.0)
    base = _resid_cache(tiny_llama, ["tell me a story"])
    with d.add(tiny_llama, coeff=2.0):
        added = _resid_cache(tiny_llama, ["tell me a story"])
    delta = added["blocks.1.hook_resid_pre"] - base["blocks.1.hook_resid_pre"]
    assert torch.allclose(delta, (2.0 * d.raw).expand_as(delta), atol=1e-4)
    assert torch.allclose(added["blocks.0.hook_resid_pre"], base["blocks.0.hook_resid_pre"])
    with d.add(tiny_llama, coeff=-2.0):
        sub = _resid_cache(tiny_llama, ["tell me a story"])
    assert torch.allclose(sub["blocks.1.hook_resid_pre"] - base["blocks.1.hook_resid_pre"], -delta, atol=1e-4)


def test_hooks_removed_on_exit_and_on_error(tiny_llama):
    d = _direction(tiny_llama)
    ids = tokenize_instructions(tiny_llama.tokenizer, ["hello"]).input_ids
    with torch.no_grad():
        before = tiny_llama(ids)
        with pytest.raises(RuntimeError), d.ablate(tiny_llama):
            raise RuntimeError("boom")
        after = tiny_llama(ids)
    assert torch.equal(before, after)


def test_interventions_compose(tiny_llama):
    d1, d2 = _direction(tiny_llama, 1), _direction(tiny_llama, 2)
    with d1.ablate(tiny_llama), d2.ablate(tiny_llama):
        cache = _resid_cache(tiny_llama, ["story time"])
    # at each hook point d1 is removed, then d2; after the last point d2 is exactly gone, and d1 is back only
    # by what removing d2 re-adds, (x . d2) * (d2 . d1): small, as d1 . d2 is small in 64 dimensions
    post = cache["blocks.1.hook_resid_post"]
    base = _resid_cache(tiny_llama, ["story time"])["blocks.1.hook_resid_post"]
    assert (post @ d2.vector).abs().max() < 1e-4
    cos = float(d1.vector @ d2.vector)
    assert (post @ d1.vector).abs().max() <= abs(cos) * (base @ d2.vector).abs().max() * 3 + 1e-4
    assert (base @ d1.vector).abs().max() > 1e-2 and (base @ d2.vector).abs().max() > 1e-2
    # the same as ablating the plane they span, up to the cross term
    with Ablation(tiny_llama, torch.stack([d1.vector, d2.vector])):
        plane = _resid_cache(tiny_llama, ["story time"])["blocks.1.hook_resid_post"]
    assert (plane @ d1.vector).abs().max() < 1e-4 and (plane @ d2.vector).abs().max() < 1e-4


def test_generate_under_ablation_differs_and_is_cached_consistently(tiny_llama):
    d = _direction(tiny_llama, norm=50.0)
    prompts = ["tell me a story", "the cat"]
    base = generate(tiny_llama, prompts, max_new_tokens=8, progress=False)
    ablation = d.ablate(tiny_llama)  # one object, entered once per call (re-enterable)
    abl = generate(tiny_llama, prompts, max_new_tokens=8, interventions=[ablation], progress=False)
    abl_nocache = generate(tiny_llama, prompts, max_new_tokens=8, interventions=ablation, use_cache=False,
                           progress=False, batch_size=1)
    assert abl == abl_nocache
    assert abl != base  # the ablation changed what the model says
    with ablation:  # the same object as a context manager gives the same tokens
        assert generate(tiny_llama, prompts, max_new_tokens=8, progress=False) == abl
    assert generate(tiny_llama, prompts, max_new_tokens=8, progress=False) == base  # and left nothing behind


def test_direction_for_other_model_is_refused(tiny_llama):
    d = Direction(torch.randn(tiny_llama.cfg.d_model), 1, -1, "someone-else")
    from refusal_lens.errors import DirectionError

    with pytest.raises(DirectionError):
        d.ablate(tiny_llama)
    with pytest.raises(DirectionError):
        d.add(tiny_llama, 1.0)


def test_old_style_callables_are_refused_with_the_fix(tiny_llama):
    d = _direction(tiny_llama)
    with pytest.raises(RefusalLensError, match=r"direction.ablate\(model\)"):
        generate(tiny_llama, ["hi"], interventions=[lambda m: d.ablate(m)], progress=False)


def test_subspace_ablation_is_rank_k_and_orthonormalised(tiny_llama):
    g = torch.Generator().manual_seed(5)
    vs = torch.randn(3, tiny_llama.cfg.d_model, generator=g)
    abl = Ablation(tiny_llama, vs * torch.tensor([[1.0], [7.0], [0.1]]))  # unnormalised spanning vectors
    assert abl.rank == 3
    assert torch.allclose(abl.basis @ abl.basis.T, torch.eye(3), atol=1e-5)
    with abl:
        cache = _resid_cache(tiny_llama, ["tell me a story"])
    for name, act in cache.items():
        assert (act @ vs.T).abs().max() < 1e-3, name  # every spanning vector is removed


def test_intervention_is_reentrant_and_nests(tiny_llama):
    d = _direction(tiny_llama, norm=50.0)
    add = Addition(tiny_llama, d.raw, layer=1, coeff=1.0)
    ids = tokenize_instructions(tiny_llama.tokenizer, ["hello"]).input_ids
    with torch.no_grad():
        base = tiny_llama(ids)
        with add:
            once = tiny_llama(ids)
            with add:  # entered twice: the vector is added twice
                twice = tiny_llama(ids)
            assert torch.equal(tiny_llama(ids), once)
        assert torch.equal(tiny_llama(ids), base)
    with d.add(tiny_llama, coeff=2.0):
        with torch.no_grad():
            double = tiny_llama(ids)
    assert torch.allclose(twice, double, atol=1e-4)
    assert not torch.allclose(once, base)


def test_last_logits_accepts_the_same_objects(tiny_llama):
    d = _direction(tiny_llama, norm=50.0)
    prompts = ["tell me a story", "the cat"]
    with d.ablate(tiny_llama):
        inside = last_logits(tiny_llama, prompts)
    passed = last_logits(tiny_llama, prompts, interventions=d.ablate(tiny_llama))
    assert torch.equal(inside, passed)
    assert not torch.allclose(passed, last_logits(tiny_llama, prompts))
