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
    _hf_named_parameters,
    _logits,
    check_edit,
    check_equivalence,
    is_orthogonalized,
    max_logit_diff,
    orthogonalize,
    project_out_,
    residual_writers,
    unit_vector,
    untie_embeddings_,
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
    for name, param, layout, gain in writers:  # every writer's output is now orthogonal to r
        assert gain is None
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


@pytest.mark.parametrize("arch", ("gemma2", "olmo2"))
def test_post_norm_families_project_against_the_gain_scaled_direction(arch):
    """Gemma2 (g = 1 + w) and OLMo2 (g = w): o_proj/down_proj are projected against normalize(g * r)."""
    model = boot_tiny(arch)
    d = direction_for(model)
    r = unit_vector(d)
    hf = model.original_model
    writers = residual_writers(model)
    by_name = dict(_hf_named_parameters(hf))
    offset = 1.0 if arch == "gemma2" else 0.0
    for w in writers:
        if w.name.endswith("embed_tokens.weight"):
            assert w.gain is None
            continue
        layer = w.name.split(".")[2]
        norm = "post_attention_layernorm" if "o_proj" in w.name else "post_feedforward_layernorm"
        assert torch.equal(w.gain, offset + by_name[f"model.layers.{layer}.{norm}.weight"].float())
    assert len(writers) == 1 + 2 * model.cfg.n_layers
    with pytest.raises(ExportError, match="not the same function as hook ablation"):
        check_equivalence(model, d, PROMPTS)

    orthogonalize(model, d)
    for w in writers:  # each write, after its norm's gain, has no component along r
        u = r if w.gain is None else w.gain * r
        out_along = w.param @ u if w.layout == ROWS else u @ w.param
        assert out_along.abs().max() < 1e-6, w.name


def test_gemma2_llama_style_edit_leaves_r_in_the_stream():
    """Why the gain matters: projecting o_proj/down_proj against r itself leaves r in Gemma2's stream."""
    from refusal_lens.orthogonalize import max_component_along

    model = boot_tiny("gemma2")
    d = direction_for(model)
    batch = _batch(model, PROMPTS)
    r = unit_vector(d)
    untie_embeddings_(model)
    for w in residual_writers(model):
        project_out_(w.param, r, w.layout)
    naive = max_component_along(model, batch, r)
    fresh = boot_tiny("gemma2")
    check = check_edit(fresh, d, PROMPTS)
    print(f"gemma2: max |x.r|/|x| naive edit {naive:.3g}, gain-scaled edit {check.max_along_r:.3g}")
    assert naive > 1e-2 and check.max_along_r <= 1e-5


def test_unknown_or_mismatched_architecture_is_refused(monkeypatch):
    with pytest.raises(ExportError, match="'falcon'.*Supported model types: gemma2, .*gpt2, llama"):
        writer_patterns("falcon")
    # a post-norm family outside the table, or filed under a pre-norm family's type, is refused
    for mtype in ("cohere2", "llama"):
        with pytest.raises(ExportError, match="norm AFTER"):
            writer_patterns(mtype, ["model.layers.0.post_feedforward_layernorm.weight"])
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


def _sha(folder) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize(("arch", "route"), [("llama", "dispatch_model"), ("qwen2", "from_pretrained"),
                                             ("gemma2", "from_pretrained")])
def test_dispatched_model_is_orthogonalized_like_the_undispatched_one(arch, route, tmp_path):
    """accelerate offload (layer 0 in a RAM state dict, embedding and layer 1 on disk): same edit, bit for bit."""
    from refusal_lens.orthogonalize import max_component_along, read_param
    from tiny import dispatch_tiny

    model, src = dispatch_tiny(arch, tmp_path, route)
    reference = boot_tiny(arch)
    d = direction_for(reference)
    r = unit_vector(d)
    source_before = _sha(src)
    offloaded = [w.name for w in residual_writers(model) if w.param.device.type == "meta"]
    assert len(offloaded) == 1 + 2 * model.cfg.n_layers  # every writer lives off the module

    a, b = check_edit(model, d, PROMPTS, allow_other_model=True), check_edit(reference, d, PROMPTS)
    assert a.max_along_r <= 1e-5 and b.max_along_r <= 1e-5
    assert abs(a.max_logit_diff - b.max_logit_diff) <= 1e-4 and abs(a.kl - b.kl) <= 1e-5
    if arch != "gemma2":
        assert a.max_logit_diff <= 1e-4

    orthogonalize(model, d, allow_other_model=True)
    orthogonalize(reference, d)
    for w in residual_writers(model):
        assert torch.equal(read_param(model.original_model, w.name),
                           read_param(reference.original_model, w.name)), w.name
    assert all(w.param.device.type == "meta" for w in residual_writers(model) if w.name in offloaded)
    batch = _batch(reference, PROMPTS)
    assert max_logit_diff(_logits(model, batch), _logits(reference, batch), batch.attention_mask) <= 1e-4
    assert max_component_along(model, batch, r) <= 1e-5
    assert _sha(src) == source_before  # the source checkpoint is never written
    if route == "from_pretrained":  # edited disk tensors now live in the offload folder
        dats = {p.name for p in (tmp_path / "offload").glob("*.dat")}
        assert {"model.embed_tokens.weight.dat", "model.layers.1.mlp.down_proj.weight.dat"} <= dats


@pytest.mark.parametrize("arch", ("llama", "gemma2"))
def test_bf16_model_is_edited_in_bf16_with_fp32_math(arch, tmp_path):
    """A bf16 model's writers stay bf16: each equals the fp32 projection of its bf16 weights, rounded once."""
    from refusal_lens.models import load_model
    from refusal_lens.orthogonalize import writer_direction
    from tiny import save_tiny

    src = save_tiny(arch, tmp_path / "src")
    model = load_model(src, dtype=torch.bfloat16)
    d = direction_for(model)
    r = unit_vector(d)
    before = {w.name: w.param.detach().clone() for w in residual_writers(model)}
    check = check_edit(model, d, PROMPTS, keep=True)
    print(f"{arch} bf16: hook ablation vs orthogonalized max |logit diff| {check.max_logit_diff:.3g}, "
          f"KL {check.kl:.3g}, max |x.r|/|x| {check.max_along_r:.3g}")
    assert check.max_along_r <= 5e-3 and check.kl <= 5e-3
    for w in residual_writers(model):
        assert w.param.dtype == torch.bfloat16
        old = before[w.name].float()
        u = writer_direction(r, w.gain)
        exact = old - torch.outer(old @ u, u) if w.layout == ROWS else old - torch.outer(u, u @ old)
        # one rounding of the fp32 result to bf16 (half an ulp, 2**-9 relative; 2**-8 allows ties), plus
        # fp32 rounding of the projection (1e-6 of the matrix's scale) where the result nearly cancels
        err = (w.param.float() - exact).abs() - exact.abs() * 2**-8
        assert err.max() <= 1e-6 * old.abs().max(), (w.name, float(err.max()))

    fp32 = load_model(src)
    orthogonalize(fp32, d, allow_other_model=True)
    for w, w32 in zip(residual_writers(model), residual_writers(fp32), strict=True):
        rel = (w.param.float() - w32.param).abs().max() / w32.param.abs().max()
        assert rel <= 2 ** -7, w.name  # bf16 rounding of the weights, nothing more
