"""Direct attribution onto a direction and onto a logit difference, on the four tiny architectures."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch
from transformer_lens.utilities import get_act_name

from refusal_lens.attribution import (
    Attribution,
    AttributionError,
    DirectionAttribution,
    LogitAttribution,
    cache_at,
    direction_attribution,
    logit_attribution,
    resid_hook_name,
)
from refusal_lens.directions import Direction
from refusal_lens.errors import DataError, DirectionError
from refusal_lens.models import model_id
from refusal_lens.prompts import tokenize_instructions
from tiny import ARCHS, boot_tiny

PROMPTS = ["How do I bake a loaf of bread?", "Tell me a story about a dragon.", "hi"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    return request.param, boot_tiny(request.param)


def _vector(model, seed: int = 0) -> torch.Tensor:
    return torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(seed))


def _resid(model, layer: int, positions=(-1,)) -> torch.Tensor:
    batch = tokenize_instructions(model.tokenizer, PROMPTS)
    name = resid_hook_name(model.cfg.n_layers, layer)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            batch.input_ids, attention_mask=batch.attention_mask, names_filter=[name]
        )
    return cache[name][:, list(positions)]


def test_direction_attribution_sums_to_projection(tiny):
    arch, model = tiny
    r = _vector(model)
    unit = r / r.norm()
    for layer in range(model.cfg.n_layers + 1):
        attr = direction_attribution(model, PROMPTS, r, layer=layer, positions=(-1, -2))
        expected = (_resid(model, layer, (-1, -2)) @ unit).mean(1)
        assert torch.allclose(attr.total, expected, atol=1e-4), (arch, layer)
        assert attr.max_abs_error < 1e-4, (arch, layer, attr.max_abs_error)
        assert attr.heads.shape == (len(PROMPTS), layer, model.cfg.n_heads)
        assert attr.mlps.shape == (len(PROMPTS), layer)
    names = attr.components()
    assert "embed" in names and "L0H0" in names and "L0.mlp" in names
    assert ("pos_embed" in names) == (arch == "gpt2")
    assert ("L0.attn_bias" in names) == (arch == "gpt2")  # only GPT-2 has an attention output bias


def test_logit_attribution_sums_to_logit_difference(tiny):
    arch, model = tiny
    a, b = [10, 20], [30]
    attr = logit_attribution(model, PROMPTS, a, b, positions=(-1,))
    batch = tokenize_instructions(model.tokenizer, PROMPTS)
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)[:, -1]
    if arch == "gemma2":  # attribution is on the pre-softcap logits
        cap = model.cfg.output_logits_soft_cap
        logits = cap * torch.atanh(logits / cap)
        assert attr.metadata["pre_softcap"]
    expected = logits[:, a].mean(1) - logits[:, b].mean(1)
    assert torch.allclose(attr.total, expected, atol=1e-4)
    assert attr.max_abs_error < 1e-4
    assert attr.heads.shape == (len(PROMPTS), model.cfg.n_layers, model.cfg.n_heads)
    if arch == "gpt2":
        assert "ln_final_bias" in attr.other  # LayerNorm's bias is a constant term
        assert attr.metadata["final_norm"].startswith("layernorm")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_head_term_equals_effect_of_removing_that_head_before_the_readout(arch):
    """Zeroing a last-layer head changes ``resid_mid`` (nothing reads it in between) by exactly its term."""
    model = boot_tiny(arch)
    r = _vector(model, 1)
    unit = r / r.norm()
    last = model.cfg.n_layers - 1
    attr = direction_attribution(model, PROMPTS, r, layer=model.cfg.n_layers)
    batch = tokenize_instructions(model.tokenizer, PROMPTS)
    name = get_act_name("resid_mid", last)
    for head in range(model.cfg.n_heads):

        def zero(z, hook, head=head):
            z[:, :, head] = 0.0
            return z

        grabbed = {}

        def keep(x, hook, key="clean", grabbed=grabbed):
            grabbed[key] = x[:, -1]

        with torch.no_grad():
            with model.hooks(fwd_hooks=[(name, keep)]):
                model(batch.input_ids, attention_mask=batch.attention_mask)
            with model.hooks(
                fwd_hooks=[
                    (get_act_name("z", last), zero),
                    (name, lambda x, hook: keep(x, hook, "ablated")),
                ]
            ):
                model(batch.input_ids, attention_mask=batch.attention_mask)
        effect = (grabbed["clean"] - grabbed["ablated"]) @ unit
        assert torch.allclose(effect, attr.heads[:, last, head], atol=1e-4)


def test_top_plot_save_load(tiny, tmp_path):
    arch, model = tiny
    d = Direction(_vector(model), layer=1, position=-1, model_id=model_id(model))
    attr = direction_attribution(model, PROMPTS, d)
    assert attr.metadata["layer"] == 1 and attr.metadata["direction_layer"] == 1
    top = attr.top(3)
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
    assert attr.top_heads(2) == [(int(n[1:].split("H")[0]), int(n.split("H")[1])) for n, _ in top[:2]]
    assert attr.top(2, sort="asc")[0][1] <= top[-1][1]
    all_terms = attr.top(100, kind="all", sort="abs")
    assert any(n == "embed" for n, _ in all_terms)
    assert attr.head_values(attr.top_heads(2)).shape == (len(PROMPTS), 2)
    fig = attr.plot(k=5)
    assert isinstance(fig, go.Figure) and len(fig.data) == 2
    heat, bars = fig.data
    assert torch.equal(torch.as_tensor(heat.z), attr.mean_heads())
    top5 = attr.top(5, kind="all", sort="abs")[::-1]
    assert list(bars.y) == [n for n, _ in top5] and list(bars.x) == [v for _, v in top5]
    path = attr.save(tmp_path / "attr")
    assert path.suffix == ".json"
    back = Attribution.load(path)
    assert isinstance(back, DirectionAttribution)
    assert torch.allclose(back.heads, attr.heads) and torch.allclose(back.total, attr.total)
    assert [n for n, _ in back.top(3)] == [n for n, _ in top]
    dla = logit_attribution(model, PROMPTS[:1], [5], [])
    back = Attribution.load(dla.save(tmp_path / "dla.json"))
    assert isinstance(back, LogitAttribution) and back.metadata["tokens_a"] == [5]


def test_string_tokens_and_bad_input(tiny):
    arch, model = tiny
    tok = model.tokenizer
    single = tok.convert_ids_to_tokens(48)
    text = tok.decode([48])
    attr = logit_attribution(model, PROMPTS[:1], [text], [])
    assert attr.metadata["tokens_a"] == [48], single
    with pytest.raises(AttributionError, match="not one"):
        logit_attribution(model, PROMPTS[:1], ["Sure, here is a"], [])
    with pytest.raises(AttributionError, match="empty"):
        logit_attribution(model, PROMPTS[:1], [], [])
    with pytest.raises(AttributionError, match="outside"):
        logit_attribution(model, PROMPTS[:1], [10**7], [])
    with pytest.raises(DataError):
        direction_attribution(model, [], _vector(model), layer=1)
    with pytest.raises(DataError):
        direction_attribution(model, "a single string", _vector(model), layer=1)
    with pytest.raises(AttributionError, match="layer"):
        direction_attribution(model, PROMPTS, _vector(model), layer=model.cfg.n_layers + 1)
    with pytest.raises(AttributionError, match="layer="):
        direction_attribution(model, PROMPTS, _vector(model))
    with pytest.raises(DirectionError):
        direction_attribution(model, PROMPTS, torch.zeros(model.cfg.d_model), layer=1)
    with pytest.raises(DirectionError):
        direction_attribution(model, PROMPTS, torch.ones(model.cfg.d_model + 1), layer=1)
    other = Direction(_vector(model), layer=1, position=-1, model_id="some-other-model")
    with pytest.raises(DirectionError, match="extracted from"):
        direction_attribution(model, PROMPTS, other)
    with pytest.raises(AttributionError, match="outside a sequence"):
        direction_attribution(model, PROMPTS, _vector(model), layer=1, positions=(-1000,))


def test_cache_at_is_run_with_cache_at_the_positions(tiny):
    """cache_at keeps the requested hooks at the requested positions (patterns: the query axis), stops early
    without changing what it keeps, and refuses positions outside the batch and hooks that never fire."""
    arch, model = tiny
    batch = tokenize_instructions(model.tokenizer, PROMPTS)
    names = [get_act_name("resid_pre", 1), get_act_name("z", 0), get_act_name("pattern", 0)]
    with torch.no_grad():
        _, full = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask, names_filter=names)
    got = cache_at(model, batch, names, [-1, -3])
    assert torch.equal(got[names[0]], full[names[0]][:, [-1, -3]].float())
    assert torch.equal(got[names[1]], full[names[1]][:, [-1, -3]].float())
    assert torch.equal(got[names[2]], full[names[2]][:, :, [-1, -3]].float())
    early = [get_act_name("z", 0), get_act_name("pattern", 0), get_act_name("mlp_out", 0)]
    stopped = cache_at(model, batch, early, [-1, -3], stop_at_layer=1)  # block 1 never runs
    assert all(torch.equal(stopped[n], cache_at(model, batch, early, [-1, -3])[n]) for n in early)
    assert resid_hook_name(4, 4) == "blocks.3.hook_resid_post" and resid_hook_name(4, 2) == "blocks.2.hook_resid_pre"
    with pytest.raises(AttributionError, match="outside a sequence"):
        cache_at(model, batch, names, [0])
    with pytest.raises(AttributionError, match="did not fire"):
        cache_at(model, batch, [get_act_name("resid_pre", 1), get_act_name("resid_pre", model.cfg.n_layers - 1)],
                 [-1], stop_at_layer=1)
