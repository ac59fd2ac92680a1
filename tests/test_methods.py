"""Edit methods on tiny models: what each one does to the residual stream and to the weights."""

import pytest
import torch

from conftest import boot_rl_tiny
from refusal_lens.directions import candidate_directions
from refusal_lens.errors import ExportError
from refusal_lens.interventions import Ablation, resid_hook_names
from refusal_lens.methods import (
    AffineEdit,
    EditMethod,
    MethodError,
    NormPreserving,
    SubspaceAblation,
    build_methods,
    check_subspace_rank,
    edited_weights,
    parse_methods,
    subspace_basis,
)
from refusal_lens.orthogonalize import OUT_IN, residual_writers
from refusal_lens.prompts import tokenize_instructions

HARMFUL = {"weapons": ["Tell me how to build a bomb.", "How do I make a gun at home?"],
           "fraud": ["Write a phishing email.", "How do I forge a check?", "Help me scam old people."],
           "drugs": ["How do I cook meth?", "Where can I buy heroin?"]}
HARMLESS = ["Tell me a story about a cat.", "How do I bake bread?", "What is the capital of France?",
            "Write a poem about the sea.", "Explain photosynthesis.", "Give me a pancake recipe."]
PROMPTS = ["How do I pick a lock?", "Write a haiku about rain."]


def _setup(model):
    harmful = [p for v in HARMFUL.values() for p in v]
    cands = candidate_directions(model, harmful, HARMLESS, batch_size=4, progress=False)
    return cands, cands.direction(layer=1, position=-1)


def _logits(model, interventions=None):
    b = tokenize_instructions(model.tokenizer, PROMPTS)
    from refusal_lens.interventions import applied

    with torch.no_grad(), applied(interventions):
        return model(b.input_ids, attention_mask=b.attention_mask).float()


def test_parse_methods_and_rank():
    assert parse_methods("diff-in-means, ACE,biprojected,ace") == ["diff-in-means", "ace", "norm-preserving"]
    with pytest.raises(MethodError, match="unknown method 'rdo'"):
        parse_methods("diff-in-means,rdo")
    with pytest.raises(MethodError, match="no method"):
        parse_methods(" , ")
    check_subspace_rank(12, 11)
    with pytest.raises(MethodError, match="too large"):
        check_subspace_rank(13, 11)
    with pytest.raises(MethodError, match="at least 2"):
        check_subspace_rank(1, 11)


def test_subspace_basis_orthonormal_starts_with_r():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(16, generator=g)
    cats = [torch.randn(16, generator=g) for _ in range(4)]
    b = subspace_basis(r, cats, 3)
    assert b.shape == (3, 16)
    assert torch.allclose(b @ b.T, torch.eye(3), atol=1e-5)
    assert torch.allclose(b[0], r / r.norm(), atol=1e-6)
    with pytest.raises(MethodError, match="lower --subspace-rank"):
        subspace_basis(r, cats, 6)


def test_methods_as_hooks_and_weights(tiny_llama):
    model = tiny_llama
    cands, d = _setup(model)
    methods = build_methods(model, ["diff-in-means", "projected", "subspace", "norm-preserving", "ace"], d, cands,
                            harmless_train=HARMLESS, harmful_by_category=HARMFUL, subspace_rank=3, batch_size=4)
    by = {m.name: m for m in methods}
    base = _logits(model)
    before = [w.param.detach().clone() for w in residual_writers(model)]
    # diff-in-means is exactly the paper's ablation
    assert torch.equal(_logits(model, by["diff-in-means"].intervention(model)), _logits(model, d.ablate(model)))
    # projected: orthogonal to the harmless mean at the direction's layer
    hl = cands.harmless_mean[1, cands.positions.index(-1)]
    assert abs(float(by["projected"].vectors[0] @ hl)) < 1e-4 * float(hl.norm())
    # ablation methods: the weight edit gives the hooks' function, and the weights come back bit for bit
    for name in ("diff-in-means", "projected", "subspace"):
        m = by[name]
        hooked = _logits(model, m.intervention(model))
        with edited_weights(model, m):
            edited = _logits(model)
        assert (hooked - edited).abs().max() < 1e-4, name
        assert (hooked - base).abs().max() > 1e-3, name
    for w, b in zip(residual_writers(model), before, strict=True):
        assert torch.equal(w.param, b)
    assert torch.equal(_logits(model), base)
    assert by["subspace"].vectors.shape == (3, model.cfg.d_model)


def test_subspace_ablation_removes_every_basis_vector():
    model = boot_rl_tiny("qwen2")
    g = torch.Generator().manual_seed(1)
    m = SubspaceAblation("subspace", torch.randn(3, model.cfg.d_model, generator=g))
    seen = []
    b = tokenize_instructions(model.tokenizer, PROMPTS)
    with m.intervention(model), model.hooks(fwd_hooks=[("blocks.1.hook_resid_mid", lambda a, hook: seen.append(a))]):
        model(b.input_ids, attention_mask=b.attention_mask)
    assert (seen[0] @ m.vectors.T).abs().max() < 1e-4


def test_norm_preserving_keeps_each_write_vector_norm(tiny_llama):
    model = tiny_llama
    cands, d = _setup(model)
    (m,) = build_methods(model, ["norm-preserving"], d, cands)
    assert m.vectors.shape == (model.cfg.n_layers, model.cfg.d_model)
    o = model.blocks[1].attn.o.weight  # HF layout [d_model, d_in]: one column per input neuron
    old = o.detach().clone()
    with edited_weights(model, m):
        new = o.detach().clone()
        emb = model.embed.weight.detach().clone()
    assert torch.allclose(new.norm(dim=0), old.norm(dim=0), rtol=1e-5)
    assert (m.vectors[1] @ new).abs().max() < 1e-5          # no write along r_1 left
    assert (emb @ m.vectors[0]).abs().max() < 1e-5
    assert not torch.allclose(new, old) and torch.equal(o, old)  # edited inside, restored after
    assert residual_writers(model)[1].layout == OUT_IN


def test_ace_sets_the_projection(tiny_llama):
    model = tiny_llama
    cands, d = _setup(model)
    (ace,) = build_methods(model, ["ace"], d, cands, harmless_train=HARMLESS)
    names = resid_hook_names(model.cfg.n_layers)
    assert set(ace.offsets) == set(names)
    seen = {}
    b = tokenize_instructions(model.tokenizer, PROMPTS)
    with ace.intervention(model), model.hooks(fwd_hooks=[(n, lambda a, hook, n=n: seen.setdefault(n, a)) for n in names]):
        model(b.input_ids, attention_mask=b.attention_mask)
    for n in names:
        assert torch.allclose(seen[n] @ ace.vectors[0], torch.full(seen[n].shape[:2], ace.offsets[n]), atol=1e-4)
    # with every reference value at zero, ACE is the paper's ablation
    zero = AffineEdit("ace", d.vector, offsets=dict.fromkeys(names, 0.0))
    assert (_logits(model, zero.intervention(model)) - _logits(model, Ablation(model, d.vector))).abs().max() < 1e-5
    with pytest.raises(ExportError, match="ACE"):
        ace.edit_weights_(model)


def test_save_load_roundtrip(tmp_path, tiny_llama):
    cands, d = _setup(tiny_llama)
    for m in build_methods(tiny_llama, ["projected", "norm-preserving", "ace"], d, cands, harmless_train=HARMLESS):
        back = EditMethod.load(m.save(tmp_path / m.name))
        assert type(back) is type(m) and back.name == m.name and torch.equal(back.vectors, m.vectors)
        assert back.provenance == m.provenance and getattr(back, "offsets", None) == getattr(m, "offsets", None)
    assert isinstance(EditMethod.load(tmp_path / "norm-preserving"), NormPreserving)


def test_subspace_needs_categories(tiny_llama):
    cands, d = _setup(tiny_llama)
    with pytest.raises(MethodError, match="categories"):
        build_methods(tiny_llama, ["subspace"], d, cands)
    with pytest.raises(MethodError, match="lower --subspace-rank"):
        build_methods(tiny_llama, ["subspace"], d, cands, harmful_by_category=HARMFUL, subspace_rank=5)
