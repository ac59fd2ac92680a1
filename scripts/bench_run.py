"""One default ``refusal-lens run``, measured: cost per phase against this machine's matmul peak.

Seconds mean little across machines, so the figure of merit is **cost = wall seconds x the matmul peak
measured in the same process** for the model's dtype on its device (best of a few 2048^3 fp32 matmuls on a
CPU, 8192^3 bf16 on a GPU; ``--device`` / ``--dtype`` as ``load_model``'s), in TFLOP-equivalents. The script

1. measures the peak (before and after the run; the higher is used: a loaded machine only lowers it),
2. runs :func:`refusal_lens.pipeline.run_pipeline` with :class:`~refusal_lens.pipeline.RunConfig` defaults
   (the sizes can be cut for a check) on the embedded model, into a temporary folder (``--out`` keeps it),
   with the FLOP counter of ``scripts/_bench.py`` on the HF model inside the bridge: real (non-padding)
   tokens through the decoder layers, causal attention pairs, and the unembedding rows computed vs needed
   (one per sequence per forward for prefill, decode steps and refusal metrics; one per completion token
   inside CE / coherence scoring), per phase of :data:`refusal_lens.pipeline.PHASES`,
3. prints per phase: seconds, cost, useful FLOPs, cost / useful (1 = the run at the matmul peak doing only
   useful work) and computed / useful (what padding and unneeded logit rows add),
4. times plain ``transformers`` ``generate`` (a plain ``AutoModelForCausalLM`` on the same weights) on the
   prompts of the run's two baseline conditions, in batches of the run's ``gen_batch_size``, and checks that
   its greedy tokens are identical to those of the run's baseline rows (recorded from
   :func:`refusal_lens.decoding.greedy`; the run decodes every condition in one stream of batches); tokens / s
   of both,
5. right after plain ``generate``, decodes the same batches again under the run's ablation and checks the
   tokens against the run's ablated completions: throughput timed minutes apart drifts with the machine, so
   this adjacent pair gives the ratio under ablation,
6. gives a floor for the run: its useful FLOPs at the rate of the model's own matrices
   (``_bench.linear_rate``: every layer's weights and the unembedding on 256 random rows, read before and
   after the run), and the run's time over that floor. On a small CPU the square 2048^3 product that sets
   the peak runs faster than the model's shapes do, and reads differently from minute to minute; the floor
   says how far the run is from what its own matrix products allow on the same machine state.

The last line is ``whole run: N.N TFLOP-equivalents (S s x P GFLOP/s)``.

Usage::

    .venv/bin/python scripts/bench_run.py            # the default run: ~10-30 min on 2 cores; a quiet machine
    .venv/bin/python scripts/bench_run.py --quick    # small sizes, no filtering: checks the script (minutes)

Useful FLOPs leave out norms, activations, softmax and the embedding lookup; a forward run with autograd
(the gradient screen of selection) counts twice (the backward for input gradients costs about a forward).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from _bench import (
    FlopCounter,
    ModelShape,
    PhaseCount,
    generated_tokens,
    linear_rate,
    load_bridge_and_plain,
    machine_info,
    matmul_peak,
    sync,
)

QUICK = {"n_train": 8, "n_val": 4, "n_test": 4, "max_new_tokens": 8}


# --------------------------------------------------------------------------------------------------
# Instrumentation (restored on exit)
# --------------------------------------------------------------------------------------------------


@contextmanager
def scoring_rows(counter: FlopCounter):
    """Inside ``completion_nll`` (coherence and CE), every completion token's logit row is needed."""
    import refusal_lens.evaluate as ev

    original = ev.completion_nll

    def wrapper(*args, **kwargs):
        with counter.scoring():
            pairs = original(*args, **kwargs)
        counter.add_needed_rows(sum(n for _, n in pairs))
        return pairs

    ev.completion_nll = wrapper
    try:
        yield
    finally:
        ev.completion_nll = original


@contextmanager
def record_generations(model, counter: FlopCounter):
    """Record every batch refusal-lens decodes (:func:`refusal_lens.decoding.greedy`, as
    :func:`refusal_lens.interventions.complete` and ``complete_each`` call it): phase, per row whether
    interventions applied to it, the prompt ids, the new tokens (each row up to its end token) and the
    seconds it took."""
    import refusal_lens.interventions as iv

    calls: list[dict] = []
    original = iv.greedy

    def wrapper(m, input_ids, attention_mask, **kwargs):
        switch = kwargs.get("switch")
        if switch is not None:  # complete_each: per row, whether its condition has interventions
            hooked = [bool(switch.groups[g]) for g in switch.rows.tolist()]
        else:
            hooked = [any(len(hp.fwd_hooks) for hp in model.hook_dict.values())] * input_ids.shape[0]
        sync()
        t0 = time.perf_counter()
        out = original(m, input_ids, attention_mask, **kwargs)
        sync()
        calls.append({"phase": counter.current, "hooked": hooked, "seconds": time.perf_counter() - t0,
                      "input_ids": input_ids.clone(), "attention_mask": attention_mask.clone(), "new": out.tokens})
        return out

    iv.greedy = wrapper
    try:
        yield calls
    finally:
        iv.greedy = original


@torch.no_grad()
def plain_generate(hf, batches_ids: list[tuple[torch.Tensor, torch.Tensor]], max_new_tokens: int, pad_id: int):
    """Greedy ``generate`` of the plain model on the given (input_ids, attention_mask) batches."""
    out = []
    for ids, mask in batches_ids:
        tokens = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id, top_k=None, top_p=None, temperature=None)
        out.append(tokens[:, ids.shape[1] :])
    return out


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def phase_rows(counts: dict[str, PhaseCount], order: list[str], shape: ModelShape, peak: float):
    print(f"\n{'phase':<20}{'seconds':>9}{'cost TF-eq':>12}{'useful TF':>11}{'cost/useful':>13}{'computed/useful':>17}"
          f"{'tokens':>10}{'forwards':>10}{'logit rows need/done':>22}")
    tot = PhaseCount()
    for name in order:
        c = counts.get(name)
        if c is None:
            continue
        for f in tot.__dataclass_fields__:
            setattr(tot, f, getattr(tot, f) + getattr(c, f))
        _row(name, c, shape, peak)
    print("-" * 124)
    _row("all phases", tot, shape, peak)
    return tot


def _row(name: str, c: PhaseCount, shape: ModelShape, peak: float) -> None:
    useful, computed = shape.useful_flops(c), shape.computed_flops(c)
    cost = c.seconds * peak
    ratio = f"{cost / useful:.2f}" if useful else "-"
    waste = f"{computed / useful:.2f}" if useful else "-"
    print(f"{name:<20}{c.seconds:>9.1f}{cost / 1e12:>12.3g}{useful / 1e12:>11.3g}{ratio:>13}{waste:>17}"
          f"{c.token_layers // max(shape.n_layers, 1):>10,}{c.forwards:>10,}"
          f"{f'{c.needed_logit_rows:,}/{c.logit_rows:,}':>22}")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"small sizes ({', '.join(f'{k} {v}' for k, v in QUICK.items())}) and no filtering")
    ap.add_argument("--n-train", type=int, default=None, help="RunConfig.n_train (default 128)")
    ap.add_argument("--n-val", type=int, default=None, help="RunConfig.n_val (default 32)")
    ap.add_argument("--n-test", type=int, default=None, help="RunConfig.n_test (default: every test prompt)")
    ap.add_argument("--gen-batch-size", type=int, default=None, help="RunConfig.gen_batch_size (default 256)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="RunConfig.max_new_tokens (default 40)")
    ap.add_argument("--filter", action=argparse.BooleanOptionalAction, default=None,
                    help="the paper's filtering of train and val (default on; --quick: off, it scores every "
                         "train and val prompt whatever --n-train)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=None, help="keep the run folder here (default: a temporary one)")
    ap.add_argument("--peak-repeats", type=int, default=5, help="timed matmuls per peak measurement")
    ap.add_argument("--no-shared-prefix", action="store_true",
                    help="run whole rows (refusal_lens.prefix.disabled()): the reference for the shared prefix")
    ap.add_argument("--device", default=None, help="load_model's device (default: cuda when available, else cpu)")
    ap.add_argument("--dtype", default=None, help="load_model's dtype (default: bfloat16 on a GPU, float32 on a CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from refusal_lens import prefix
    from refusal_lens.pipeline import PHASES, Phases, RunConfig, run_pipeline

    cfg = RunConfig()
    sizes = QUICK if args.quick else {}
    for key in ("n_train", "n_val", "n_test", "max_new_tokens", "gen_batch_size"):
        value = getattr(args, key) if getattr(args, key) is not None else sizes.get(key)
        if value is not None:
            setattr(cfg, key, value)
    cfg.filter = args.filter if args.filter is not None else not args.quick

    from refusal_lens.models import dtype_name, resolve_device, resolve_dtype

    print(machine_info(), flush=True)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}", flush=True)
    kind = f"{dtype_name(dtype)} matmul peak on {device.type}"
    peak0 = matmul_peak(repeats=args.peak_repeats, device=device, dtype=dtype)
    print(f"{kind} (best of {args.peak_repeats}): {peak0 / 1e9:.0f} GFLOP/s", flush=True)
    model, hf, tok = load_bridge_and_plain(device=str(device), dtype=dtype_name(dtype))
    shape = ModelShape.of(model.original_model)
    print(f"model: {shape.n_layers} layers x {shape.layer_params / 1e6:.1f} M matrix parameters, attention width "
          f"{shape.attn_width}, unembedding {shape.d_model} x {shape.d_vocab:,} ({shape.d_model * shape.d_vocab / 1e6:.0f} M)")
    print("run config: " + ", ".join(f"{k}={v}" for k, v in vars(cfg).items() if k not in ("harmful_path", "harmless_path")),
          flush=True)

    rate0 = linear_rate(hf)
    counter = FlopCounter(model.original_model, tok.pad_token_id)
    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp:
        out = args.out or Path(tmp) / "run"
        with counter, scoring_rows(counter), record_generations(model, counter) as gens:
            counter.phase("setup")
            with prefix.disabled() if args.no_shared_prefix else contextlib.nullcontext():
                res = run_pipeline(model, out, cfg, phases=Phases(on_start=counter.phase),
                                   overwrite=args.out is not None)
            counter.phase("after")
        evaluation = json.loads((out / "evaluation.json").read_text())
        rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    peak1 = matmul_peak(repeats=args.peak_repeats, device=device, dtype=dtype)
    peak = max(peak0, peak1)
    print(f"\n{kind} after the run: {peak1 / 1e9:.0f} GFLOP/s; used: {peak / 1e9:.0f} GFLOP/s")
    rate = max(rate0, linear_rate(hf))
    print(f"the model's own matrices (every layer's and the unembedding, 256 random rows, best of 3, read before "
          f"and after the run, the higher used): {rate / 1e9:.0f} GFLOP/s, {rate / peak:.2f} of the peak")

    # ---- per phase
    print(f"\nper phase (cost = seconds x {peak / 1e9:.0f} GFLOP/s; useful = real tokens x 2 x layer parameters + "
          "attention + needed logit rows; tokens = real tokens through the blocks)")
    total = phase_rows(counter.counts, list(PHASES), shape, peak)
    untracked = res.seconds - sum(res.timings.values())
    print(f"run_pipeline: {res.seconds:.1f} s in all ({untracked:.1f} s outside the phases: data, folder); "
          f"evaluation.json timings_s {evaluation['timings_s']}")
    c = evaluation["conditions"]
    print(f"results: direction layer {res.direction.layer}, position {res.direction.position} "
          f"({res.selection.rule_text}); refusal " + ", ".join(f"{k} {v['refusal_score']:.3f}" for k, v in c.items())
          + f"; addition coeff {evaluation['addition']['tuned_coeff']}")

    # ---- generation: refusal-lens vs plain transformers on the baseline prompts
    eos = model.original_model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    from refusal_lens.prompts import batches, chat_format

    evals = [g for g in gens if g["phase"] == "evaluate_generate"]
    base_rows = [r for c in ("harmful_baseline", "harmless_baseline") for r in rows if r["condition"] == c]
    base = [{"input_ids": b.input_ids, "attention_mask": b.attention_mask}
            for b in batches(tok, [r["instruction"] for r in base_rows], cfg.gen_batch_size, chat_format(model))]
    plain_counter = FlopCounter(hf, tok.pad_token_id)
    with plain_counter:
        plain_counter.phase("plain generate")
        sync()
        t0 = time.perf_counter()
        plain = plain_generate(hf, [(g["input_ids"], g["attention_mask"]) for g in base],
                               cfg.max_new_tokens, tok.pad_token_id)
        sync()
        plain_s = time.perf_counter() - t0
    rl_tokens = [r for g in evals for r, h in zip(generated_tokens(g["new"], eos_ids), g["hooked"], strict=True) if not h]
    plain_tokens = [r for t in plain for r in generated_tokens(t, eos_ids)]
    n_diff = sum(a != b for a, b in zip(rl_tokens, plain_tokens, strict=True))
    base_texts = [r["completion"] for r in base_rows]
    plain_texts = tok.batch_decode([torch.tensor(t, dtype=torch.long) for t in plain_tokens], skip_special_tokens=True)
    n_text = sum(a != b for a, b in zip(base_texts, plain_texts, strict=True))

    print(f"\ngeneration of the evaluation ({cfg.max_new_tokens} new tokens at most, batch {cfg.gen_batch_size}, "
          "greedy; refusal-lens drops a prompt from its batch when it ends, transformers' generate does not)")
    print(f"{'':<52}{'prompts':>8}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}")
    n_run = sum(len(r) for g in evals for r in generated_tokens(g["new"], eos_ids))
    s_run = sum(g["seconds"] for g in evals)
    n_plain = sum(len(r) for r in plain_tokens)
    for label, n, s, k in (("refusal-lens, the run: every condition, one call", n_run, s_run,
                            sum(len(g["new"]) for g in evals)),
                           ("plain transformers generate, baseline prompts", n_plain, plain_s, len(plain_tokens))):
        print(f"{label:<52}{k:>8}{n:>8}{s:>9.1f}{(n / s if s else float('nan')):>10.1f}")
    plain_count = plain_counter.counts["plain generate"]
    print(f"plain generate: cost {plain_s * peak / 1e12:.3g} TFLOP-eq, useful {shape.useful_flops(plain_count) / 1e12:.3g} "
          f"TF, cost/useful {plain_s * peak / max(shape.useful_flops(plain_count), 1):.2f}")
    print("check: refusal-lens generate without interventions (the run's baseline rows) == plain transformers greedy "
          "tokens: " + ("yes" if n_diff == 0 else f"NO ({n_diff}/{len(plain_tokens)} completions differ)")
          + f" ({len(plain_tokens)} completions; decoded text equal to completions.jsonl: "
          + ("yes" if n_text == 0 else f"NO, {n_text} differ") + ")")
    if s_run and plain_s:
        print(f"the run's generation (all conditions) / plain throughput (baseline prompts): "
              f"{(n_run / s_run) / (n_plain / plain_s):.2f}x")

    # ---- under ablation, on the same batches, right after plain generate (the machine's speed drifts over minutes)
    from refusal_lens.decoding import greedy

    sync()
    t0 = time.perf_counter()
    with res.direction.ablate(model):
        ablated = [greedy(model, g["input_ids"], g["attention_mask"], max_new_tokens=cfg.max_new_tokens,
                          eos_id=tok.eos_token_id) for g in base]
    sync()
    abl_s = time.perf_counter() - t0
    abl_tokens = [r for a in ablated for r in generated_tokens(a.tokens, eos_ids)]
    n_abl = sum(len(r) for r in abl_tokens)
    run_abl = [r["completion"] for c in ("harmful_ablated", "harmless_ablated") for r in rows if r["condition"] == c]
    same = tok.batch_decode([torch.tensor(t, dtype=torch.long) for t in abl_tokens], skip_special_tokens=True) == run_abl
    print(f"{'refusal-lens under ablation, same prompt ids, next':<52}{len(abl_tokens):>8}{n_abl:>8}{abl_s:>9.1f}"
          f"{(n_abl / abl_s if abl_s else float('nan')):>10.1f}")
    if abl_s and plain_s:
        print(f"adjacent: refusal-lens under ablation / plain throughput: {(n_abl / abl_s) / (n_plain / plain_s):.2f}x "
              f"(goal >= 1.5x); its completions equal the run's ablated ones: {'yes' if same else 'NO'}")

    useful = shape.useful_flops(total)
    floor = useful / rate
    print(f"floor: the run's useful FLOPs ({useful / 1e12:.1f} TF) at the rate of the model's own matrices: "
          f"{floor:.0f} s = {floor * peak / 1e12:.1f} TFLOP-eq; the run took {res.seconds / floor:.2f}x that floor")
    print(f"whole run: {res.seconds * peak / 1e12:.1f} TFLOP-equivalents ({res.seconds:.1f} s x {peak / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
