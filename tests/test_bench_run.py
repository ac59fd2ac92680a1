"""The FLOP accounting of scripts/bench_run.py (scripts/_bench.py), on a tiny Qwen2 model: tokens counted
by hooks equal the non-padding tokens of the batches, forwards stopped early count only the layers they ran,
and the unembedding rows computed and needed are told apart."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import boot_rl_tiny
from tiny import D_MLP, D_MODEL, N_HEADS, N_KV_HEADS, N_LAYERS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _bench import FlopCounter, ModelShape  # noqa: E402

from refusal_lens.evaluate import completion_nll, last_logits  # noqa: E402
from refusal_lens.prompts import batches, chat_format  # noqa: E402

PROMPTS = ["hi", "tell me a story about a cat and a dog", "how do I bake bread", "why"]


@pytest.fixture(scope="module")
def model():
    return boot_rl_tiny("qwen2")


def _batches(model, bs=2):
    return list(batches(model.tokenizer, PROMPTS, bs, chat_format(model)))


def _pairs(mask: torch.Tensor) -> int:
    """Causal (query, key) pairs among the real tokens of a left-padded batch."""
    n = mask.sum(-1)
    return int((n * (n + 1) // 2).sum())


def _counter(model):
    return FlopCounter(model.original_model, model.tokenizer.pad_token_id)


def test_model_shape_counts_layer_matrices(model):
    s = ModelShape.of(model.original_model)
    d_head = D_MODEL // N_HEADS
    attn = D_MODEL * D_MODEL * 2 + 2 * D_MODEL * N_KV_HEADS * d_head  # q, o; k, v
    assert (s.n_layers, s.layer_params, s.attn_width) == (N_LAYERS, attn + 3 * D_MODEL * D_MLP, D_MODEL)
    assert s.d_vocab == model.cfg.d_vocab


def test_linear_rate_counts_every_layer_matrix_and_the_unembedding(model, monkeypatch):
    """With a clock that advances 1 s per reading, each timed pass takes 1 s: the rate is the pass's FLOPs."""
    import _bench

    clock = iter(range(10**6))
    monkeypatch.setattr(_bench.time, "perf_counter", lambda: float(next(clock)))
    hf = model.original_model
    layer_mats = sum(p.numel() for layer in hf.model.layers for p in layer.parameters() if p.ndim == 2)
    unembed = hf.config.vocab_size * D_MODEL
    assert _bench.linear_rate(hf, rows=8, repeats=2) == 2.0 * 8 * (layer_mats + unembed)
    assert layer_mats == N_LAYERS * ModelShape.of(hf).layer_params


def test_last_logits_counts_real_tokens_and_one_row_per_prompt(model):
    bs = _batches(model)
    real = sum(int(b.attention_mask.sum()) for b in bs)
    fed = sum(b.input_ids.numel() for b in bs)
    assert fed > real  # the batches are padded, so padding must be told apart
    with _counter(model) as c:
        c.phase("metric")
        last_logits(model, PROMPTS, batch_size=2)
    n = c.counts["metric"]
    assert n.forwards == len(bs) and n.sequences == len(PROMPTS)
    assert n.token_layers == real * N_LAYERS and n.fed_token_layers == fed * N_LAYERS
    assert n.pairs == sum(_pairs(b.attention_mask) for b in bs) * N_LAYERS
    assert n.logit_rows == len(PROMPTS) == n.needed_logit_rows  # the unembedding runs on the last row only
    shape = ModelShape.of(model.original_model)
    expected = (2 * shape.layer_params * real * N_LAYERS + 4 * shape.attn_width * n.pairs
                + 2 * shape.d_model * shape.d_vocab * len(PROMPTS))
    assert shape.useful_flops(n) == expected < shape.computed_flops(n)
    assert n.seconds > 0 and "other" in c.counts


def test_forward_stopped_early_counts_only_layers_run(model):
    b = _batches(model, bs=4)[0]
    with _counter(model) as c:
        model(b.input_ids, attention_mask=b.attention_mask, stop_at_layer=1)  # block 0 only
    assert c.counts["other"].token_layers == int(b.attention_mask.sum())
    assert c.counts["other"].logit_rows == 0 == c.counts["other"].needed_logit_rows


def test_generation_counts_prefill_then_one_token_per_step(model):
    b = _batches(model, bs=4)[0]
    tok = model.tokenizer
    with _counter(model) as c:
        model.original_model.generate(b.input_ids, attention_mask=b.attention_mask, max_new_tokens=3, min_new_tokens=3,
                                      do_sample=False, pad_token_id=tok.pad_token_id, top_k=None, top_p=None,
                                      temperature=None)
    n = c.counts["other"]
    prompt = int(b.attention_mask.sum())
    assert n.forwards == 3  # prefill + 2 decode steps (the third token needs no forward)
    assert n.token_layers == (prompt + 2 * len(PROMPTS)) * N_LAYERS
    lengths = b.attention_mask.sum(-1)
    decode_pairs = int((lengths + 1).sum() + (lengths + 2).sum())
    assert n.pairs == (_pairs(b.attention_mask) + decode_pairs) * N_LAYERS
    assert n.needed_logit_rows == 3 * len(PROMPTS) == n.logit_rows


def test_scoring_needs_one_row_per_completion_token(model):
    comps = ["a b c", "once upon a time", "", "because"]
    with _counter(model) as c, c.scoring():
        pairs = completion_nll(model, PROMPTS, comps, batch_size=2, progress=False)
        c.add_needed_rows(sum(k for _, k in pairs))
    n = c.counts["other"]
    assert n.needed_logit_rows == sum(k for _, k in pairs) > 0
    # per batch (rows sorted by length): each row's logits from its last `longest completion + 1` positions
    tok, fmt = model.tokenizer, chat_format(model)
    p = [len(tok(fmt.format(x), add_special_tokens=False)["input_ids"]) for x in PROMPTS]
    k = [n_tok for _, n_tok in pairs]
    order = sorted(range(len(PROMPTS)), key=lambda i: (p[i] + k[i], k[i]))
    kept = sum(len(b) * (max(k[i] for i in b) + 1) for b in (order[:2], order[2:]))
    assert n.needed_logit_rows < n.logit_rows == kept < n.fed_token_layers // N_LAYERS


def test_bench_run_main_on_a_tiny_model(monkeypatch, capsys):
    """The whole script, on a tiny model and built-in data: every phase gets counted, plain generate matches."""
    import bench_run

    from refusal_lens.evaluate import RefusalTokens
    from tiny import make_hf_model

    bridge = boot_rl_tiny("llama")
    plain = make_hf_model("llama", seed=0).eval()  # the same weights, not booted
    monkeypatch.setattr(bench_run, "load_bridge_and_plain", lambda **kw: (bridge, plain, bridge.tokenizer))
    monkeypatch.setattr("refusal_lens.pipeline.find_refusal_tokens",
                        lambda *a, **k: RefusalTokens([1], ["<|eos|>"], 1.0, 1))  # a random model refuses nothing
    from functools import partial

    import refusal_lens.pipeline as pl

    monkeypatch.setattr(pl, "RunConfig", partial(pl.RunConfig, max_layer_frac=1.0))  # 2 layers: not layer 0 only
    monkeypatch.setattr(sys, "argv", ["bench_run.py", "--quick", "--n-test", "3", "--max-new-tokens", "3",
                                      "--peak-repeats", "1"])
    bench_run.main()
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    table = {ln.split()[0]: ln.split() for ln in lines if ln.split() and ln.split()[0] in
             ("extract", "select", "evaluate_generate", "evaluate_score", "report")}
    assert set(table) == {"extract", "select", "evaluate_generate", "evaluate_score", "report"}
    for name in ("extract", "select", "evaluate_generate", "evaluate_score"):
        assert table[name][4] != "-" and int(table[name][6].replace(",", "")) > 0  # useful FLOPs, tokens counted
    assert table["extract"][-1] == "0/0"  # diff-in-means stops before the unembedding: no logits needed
    assert "greedy tokens: yes" in out and "decoded text equal to completions.jsonl: yes" in out
    assert "its completions equal the run's ablated ones: yes" in out  # the adjacent re-run under ablation
    assert lines[-1].startswith("whole run: ") and "TFLOP-equivalents" in lines[-1]
    assert lines[-2].startswith("floor: the run's useful FLOPs") and "x that floor" in lines[-2]
