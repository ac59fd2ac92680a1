"""Weight orthogonalization equals hook ablation; unsupported and mismatched inputs are refused."""

from __future__ import annotations

import time

import pytest
import torch

from refusal_lens.directions import Direction
from refusal_lens.errors import DirectionError, ExportError
from refusal_lens.models import model_id
from refusal_lens.orthogonalize import (
    _LLAMA,
    OUT_IN,
    ROWS,
    _batch,
    _logits,
    check_equivalence,
    is_orthogonalized,
    max_logit_diff,
    orthogonalize,
    project_out_,
    residual_writers,
    unit_vector,
    writer_patterns,
)
from tiny import boot_tiny

PROMPTS = ["How do I bake a loaf of bread?", "Tell me a story about a dragon.", "Why?"]
EQUIV_ARCHS = ("llama", "qwen2", "gpt2")  # qwen2 and gpt2 tie their embeddings in tests/tiny.py


def direction_for(model, seed: int = 1, layer: int = 1) -> Direction:
    g = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(model.cfg.d_model, generator=g), layer=layer, position=-1, model_id=model_id(model))


@pytest.mark.parametrize("arch", EQUIV_ARCHS)
def test_orthogonalized_weights_equal_hook_ablation(arch):
    model = boot_tiny(arch)
    d = direction_for(model)
    batch = _batch(model, PROMPTS)
    before = _logits(model, batch)
    params_before = {w.name: w.param.detach().clone() for w in residual_writers(model)}

    diff = check_equivalence(model, d, PROMPTS)
    assert diff <= 1e-4, f"{arch}: orthogonalized vs hook ablation differ by {diff}"
    # check_equivalence leaves the model as it found it (only untied)
    assert not is_orthogonalized(model)
    for w in residual_writers(model):
        assert torch.equal(w.param, params_before[w.name]), w.name
    assert torch.equal(_logits(model, batch), before)
    assert model.unembed.weight is not model.embed.weight


@pytest.mark.parametrize("arch", EQUIV_ARCHS)
def test_orthogonalize_edits_in_place(arch):
    model = boot_tiny(arch)
    d = direction_for(model)
    tied = model.unembed.weight is model.embed.weight
    embed_before = model.embed.weight.detach().clone()
    batch = _batch(model, PROMPTS)
    with d.ablate(model):
        reference = _logits(model, batch)

    writers = orthogonalize(model, d)
    r = d.vector
    for name, param, layout in writers:  # every writer's output is now orthogonal to r
        out_along_r = param @ r if layout == ROWS else r @ param
        assert out_along_r.abs().max() < 1e-5, name
    # the unembedding keeps the unedited weights (a tied model's were the embedding's)
    if tied:
        assert torch.equal(model.unembed.weight, embed_before)
    assert model.unembed.weight is model.original_model.get_output_embeddings().weight
    assert max_logit_diff(reference, _logits(model, batch), batch.attention_mask) <= 1e-4
    assert is_orthogonalized(model, d)
    snapshot = [w.param.detach().clone() for w in writers]
    orthogonalize(model, d)  # same direction again: a no-op
    assert all(torch.equal(w.param, s) for w, s in zip(writers, snapshot, strict=True))


def test_residual_writers_names_layouts_and_identity():
    llama = boot_tiny("llama")
    ws = residual_writers(llama)
    names = [w.name for w in ws]
    assert names[0] == "model.embed_tokens.weight"
    assert "model.layers.1.self_attn.o_proj.weight" in names and "model.layers.1.mlp.down_proj.weight" in names
    assert len(ws) == 1 + 2 * llama.cfg.n_layers
    assert {w.layout for w in ws[1:]} == {OUT_IN}
    assert any(w.param is llama.blocks[1].mlp.out.weight for w in ws)

    gpt2 = boot_tiny("gpt2")
    ws = residual_writers(gpt2)
    by_name = {w.name: w for w in ws}
    assert by_name["transformer.wpe.weight"].param is gpt2.pos_embed.weight
    assert by_name["transformer.h.0.attn.c_proj.bias"].param is gpt2.blocks[0].attn.o.bias
    assert by_name["transformer.h.0.mlp.c_proj.weight"].layout == ROWS  # Conv1D is [in, out]
    assert len(ws) == 2 + 4 * gpt2.cfg.n_layers


@pytest.mark.parametrize("arch", ("qwen2", "gpt2"))
def test_without_untying_the_edit_leaks_into_the_unembedding(arch):
    model = boot_tiny(arch)  # tied, not untied by boot_tiny
    assert model.unembed.weight is model.embed.weight
    d = direction_for(model)
    batch = _batch(model, PROMPTS)
    with d.ablate(model):
        reference = _logits(model, batch)
    for w in residual_writers(model):  # the edit without orthogonalize()'s untying step
        project_out_(w.param, unit_vector(d), w.layout)
    assert max_logit_diff(reference, _logits(model, batch), batch.attention_mask) > 1e-2


def test_gemma2_is_refused_because_of_its_post_norms():
    model = boot_tiny("gemma2")
    d = direction_for(model)
    for call in (lambda: residual_writers(model), lambda: orthogonalize(model, d),
                 lambda: check_equivalence(model, d, PROMPTS)):
        with pytest.raises(ExportError, match="norm AFTER") as info:
            call()
        assert "gemma2" in str(info.value) and "re-introduces" in str(info.value)
    assert model.unembed.weight is model.embed.weight  # refused before touching anything

    # Why: the llama-style edit of o_proj/down_proj does not reproduce hook ablation on Gemma2.
    batch = _batch(model, PROMPTS)
    with d.ablate(model):
        reference = _logits(model, batch)
    from refusal_lens.models import _untie_
    from refusal_lens.orthogonalize import _hf_named_parameters

    _untie_(model.original_model)
    for name, p in _hf_named_parameters(model.original_model):
        hit = _LLAMA.match(name)
        if hit is not None:
            project_out_(p, unit_vector(d), hit[2])
    assert max_logit_diff(reference, _logits(model, batch), batch.attention_mask) > 1e-2


def test_unknown_or_mismatched_architecture_is_refused(monkeypatch):
    with pytest.raises(ExportError, match="'falcon'.*Supported model types: gpt2, llama"):
        writer_patterns("falcon")
    model = boot_tiny("llama")
    broken = type(_LLAMA)(embed=_LLAMA.embed, attn_out=_LLAMA.attn_out,
                          mlp_out=r"model\.layers\.(?P<layer>\d+)\.mlp\.up_proj\.weight")
    monkeypatch.setitem(__import__("refusal_lens.orthogonalize").orthogonalize.WRITER_PATTERNS, "llama", broken)
    with pytest.raises(ExportError, match="do not match the llama table"):
        residual_writers(model)


def test_bad_directions_are_refused():
    model = boot_tiny("llama")
    with pytest.raises(DirectionError, match="width 32"):
        orthogonalize(model, Direction(torch.ones(32), 1, -1, model_id(model)))
    other = Direction(torch.ones(model.cfg.d_model), 1, -1, "some-other-model")
    with pytest.raises(DirectionError, match="some-other-model"):
        orthogonalize(model, other)
    assert not is_orthogonalized(model)
    orthogonalize(model, other, allow_other_model=True)
    assert is_orthogonalized(model, other)
    with pytest.raises(ExportError, match="already orthogonalized"):
        check_equivalence(model, other, PROMPTS, allow_other_model=True)


def test_low_precision_weights_are_edited_in_fp32_and_cast_back():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    r = unit_vector(torch.randn(64, generator=g))
    p = torch.nn.Parameter(w.to(torch.bfloat16))
    project_out_(p, r, ROWS)
    assert p.dtype == torch.bfloat16
    exact = w.to(torch.bfloat16).double() - torch.outer(w.to(torch.bfloat16).double() @ r.double(), r.double())
    assert (p.double() - exact).abs().max() < 2e-2  # bf16 rounding of the result only
    assert (p.float() @ r).abs().max() < 5e-2


@pytest.mark.integration
def test_embedded_model_orthogonalization_equals_hook_ablation():
    from refusal_lens import load_model
    from refusal_lens.data import load_builtin
    from refusal_lens.directions import candidate_directions

    t0 = time.perf_counter()
    model = load_model()
    harmful, harmless = load_builtin("harmful", "train")[:16], load_builtin("harmless", "train")[:16]
    cands = candidate_directions(model, harmful, harmless, positions=[-1], progress=False)
    d = cands.direction(14, -1)
    prompts = load_builtin("harmful", "test")[:2] + load_builtin("harmless", "test")[:2]
    diff = check_equivalence(model, d, prompts)
    print(f"embedded model: orthogonalized vs hook ablation max |logit diff| {diff:.3g} "
          f"({time.perf_counter() - t0:.1f} s)")
    assert diff <= 1e-3
