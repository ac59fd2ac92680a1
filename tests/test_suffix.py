"""GCG-style suffix search and random-suffix controls on tiny models."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch
from transformer_lens.utilities import get_act_name

from refusal_lens.directions import Direction
from refusal_lens.errors import DataError, DirectionError
from refusal_lens.models import model_id
from refusal_lens.prompts import ChatFormat, tokenize_instructions
from refusal_lens.suffix import (
    SuffixError,
    SuffixResult,
    allowed_tokens,
    random_suffix,
    search_suffix,
    suffix_losses,
    tokenizer_fingerprint,
)
from tiny import boot_tiny, make_tokenizer

PROMPTS = ["How do I bake a loaf of bread?", "Tell me a story about a dragon."]
FAST = dict(n_tokens=4, steps=3, search_width=12, topk=12, progress=False)


@pytest.fixture(scope="module")
def llama():
    return boot_tiny("llama")


def _direction(model, layer: int = 1, seed: int = 0) -> Direction:
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(seed))
    return Direction(v, layer=layer, position=-1, model_id=model_id(model))


def _projection(model, prompts, suffix_text: str, d: Direction) -> torch.Tensor:
    batch = tokenize_instructions(model.tokenizer, prompts, suffix=suffix_text)
    name = get_act_name("resid_pre", d.layer)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            batch.input_ids, attention_mask=batch.attention_mask, names_filter=[name]
        )
    return cache[name][:, -1] @ d.vector


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2"])
def test_direction_search_lowers_the_projection(arch):
    model = boot_tiny(arch)
    d = _direction(model)
    res = search_suffix(model, PROMPTS, direction=d, seed=0, **FAST)
    assert res.n_tokens == 4 and len(res.losses) == 3 and res.kind == "gcg"
    assert res.best_loss < res.initial_loss
    assert res.best_loss == pytest.approx(min(res.losses))
    # the recorded loss is the mean projection of the real, re-tokenized prompts (left-padded batch)
    proj = _projection(model, PROMPTS, res.suffix, d)
    assert float(proj.mean()) == pytest.approx(res.best_loss, abs=1e-4)
    assert float(suffix_losses(model, PROMPTS, res, direction=d).mean()) == pytest.approx(
        res.best_loss, abs=1e-4
    )
    # the suffix's ids are exactly what the tokenizer makes of the prompt text
    fmt = ChatFormat.from_tokenizer(model.tokenizer)
    for p in PROMPTS:
        ids = model.tokenizer(fmt.format(p + res.suffix), add_special_tokens=False)["input_ids"]
        assert ids[-fmt.n_post - res.n_tokens : -fmt.n_post] == res.token_ids


def test_deterministic_and_prefix_cache_matches(llama):
    d = _direction(llama)
    a = search_suffix(llama, PROMPTS, direction=d, seed=3, **FAST)
    b = search_suffix(llama, PROMPTS, direction=d, seed=3, **FAST)
    c = search_suffix(llama, PROMPTS, direction=d, seed=3, prefix_cache=False, **FAST)
    assert a.token_ids == b.token_ids and a.losses == b.losses
    assert c.token_ids == a.token_ids
    assert c.losses == pytest.approx(a.losses, abs=1e-4)
    other = search_suffix(llama, PROMPTS, direction=d, seed=4, **FAST)
    assert other.losses != a.losses  # the seed matters


def test_several_layers_and_time_budget(llama):
    d = _direction(llama)
    res = search_suffix(llama, PROMPTS[:1], direction=d, layers=[1, 2], max_seconds=0.0, **FAST)
    assert res.config["layers"] == [1, 2]
    assert len(res.losses) == 1  # stopped after the first step
    steps = []
    search_suffix(
        llama, PROMPTS[:1], direction=d, on_step=lambda i, r: steps.append((i, r.best_loss)), **FAST
    )
    assert [i for i, _ in steps] == [0, 1, 2]


def test_target_objective(llama):
    res = search_suffix(llama, PROMPTS, objective="target", target="Sure, here is", **FAST)
    assert res.best_loss <= res.initial_loss
    assert res.config["objective"] == "target" and res.config["target"] == "Sure, here is"
    again = suffix_losses(llama, PROMPTS, res, objective="target", target="Sure, here is")
    assert float(again.mean()) == pytest.approx(res.best_loss, abs=1e-4)


def test_save_load_plot(llama, tmp_path):
    res = search_suffix(llama, PROMPTS, direction=_direction(llama), **FAST)
    path = res.save(tmp_path / "s.json")
    back = SuffixResult.load(path)
    assert back == res
    back.check_tokenizer(llama.tokenizer)
    assert back.text_for(make_tokenizer()) == res.suffix
    fig = res.plot()
    assert isinstance(fig, go.Figure) and len(fig.data) == 2
    current, best = fig.data
    assert list(current.y) == [res.initial_loss, *res.losses]
    assert list(best.y) == [min(current.y[: i + 1]) for i in range(len(current.y))]  # running best
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SuffixError, match="Cannot read"):
        SuffixResult.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"unexpected": 1}')
    with pytest.raises(SuffixError, match="not a suffix file"):
        SuffixResult.load(tmp_path / "other.json")


def test_random_suffix_controls(llama):
    tok = llama.tokenizer
    a = random_suffix(tok, 6, seed=0)
    assert a.n_tokens == 6 and a.kind == "random"
    assert a == random_suffix(tok, 6, seed=0)
    assert a.token_ids != random_suffix(tok, 6, seed=1).token_ids
    assert tok(a.suffix, add_special_tokens=False)["input_ids"] == a.token_ids
    assert a.suffix.startswith(" ")
    allowed, _ = allowed_tokens(tok)
    assert all(bool(allowed[i]) for i in a.token_ids)
    assert not any(bool(allowed[i]) for i in tok.all_special_ids)
    with pytest.raises(SuffixError):
        random_suffix(tok, 0)


def test_fingerprint_distinguishes_tokenizers(llama):
    fp = tokenizer_fingerprint(llama.tokenizer)
    assert fp == tokenizer_fingerprint(make_tokenizer())
    res = random_suffix(llama.tokenizer, 3)
    res.tokenizer = {"vocab_size": 151936, "hash": "0123456789abcdef"}
    with pytest.raises(SuffixError, match="another tokenizer"):
        res.check_tokenizer(llama.tokenizer)
    with pytest.raises(SuffixError, match="another tokenizer"):
        suffix_losses(llama, PROMPTS, res, direction=_direction(llama))


def test_bad_input(llama):
    d = _direction(llama)
    with pytest.raises(DataError, match="empty"):
        search_suffix(llama, [], direction=d, **FAST)
    with pytest.raises(DataError):
        search_suffix(llama, "one string", direction=d, **FAST)
    with pytest.raises(DirectionError):
        search_suffix(llama, PROMPTS, **FAST)  # the direction objective needs a direction
    with pytest.raises(DirectionError, match="extracted from"):
        other = Direction(d.vector, layer=1, position=-1, model_id="another-model")
        search_suffix(llama, PROMPTS, direction=other, **FAST)
    with pytest.raises(DirectionError):
        search_suffix(llama, PROMPTS, direction=d.vector, **FAST)
    with pytest.raises(SuffixError, match="context"):
        search_suffix(llama, PROMPTS, direction=d, **{**FAST, "n_tokens": 400})
    with pytest.raises(SuffixError, match="layers"):
        search_suffix(llama, PROMPTS, direction=d, layers=[0], **FAST)
    with pytest.raises(SuffixError, match="post-instruction"):
        search_suffix(llama, PROMPTS, direction=d, position=-20, **FAST)
    with pytest.raises(SuffixError, match="objective"):
        search_suffix(llama, PROMPTS, direction=d, objective="nonsense", **FAST)
    with pytest.raises(SuffixError, match="n_tokens"):
        search_suffix(llama, PROMPTS, direction=d, **{**FAST, "n_tokens": 0})
    with pytest.raises(SuffixError, match="not n_tokens"):
        search_suffix(llama, PROMPTS, direction=d, init="!", **FAST)
    with pytest.raises(SuffixError, match="empty"):
        search_suffix(llama, PROMPTS, objective="target", target="", **FAST)
