"""Benchmark the paper's exhaustive direction selection against refusal-lens's default fast selection.

On the embedded Qwen2.5-Coder-0.5B-Instruct (fp32), with one shared set of candidates (extracted once,
not timed in the ratio), the same candidate pool and the same val prompts:

* ``exhaustive`` -- ``select_direction(..., strategy="exhaustive")``: bypass, induce and KL scores for
  every candidate (3 forward passes over the val sets each), as in the paper;
* ``fast``       -- ``select_direction(..., strategy="fast")`` with the library's defaults (gradient screen,
  ``top_k=6``, as ``refusal-lens run`` uses it): one forward + backward pass screens every candidate's
  bypass, a KL screen on ``n_screen`` harmless val prompts runs on the best position of each layer and on
  the ``2 * top_k`` best candidates, and ``top_k`` candidates get the full scores.

The default is the paper's whole pool (all layers below 0.8 L, all 5 post-instruction positions: 90
valid candidates) with 16 + 16 built-in val prompts, unfiltered (``refusal-lens run`` first keeps only the
harmful prompts the model refuses and the harmless ones it answers, so its pick may differ), about 10
minutes on 2 cores; ``--n-val 32`` is the size
``refusal-lens run`` uses (about twice as long), ``--layers 8-18`` a subset. With a subset the output also
estimates the ratio for the full pool (the exhaustive cost grows with the pool, the fast cost barely does).

Prints each strategy's pick (layer, position), rule and seconds, whether the picks agree, the rank of
the exhaustive pick in the screen's ordering, and the rank correlation of the screen with the exact
bypass score. With ``--repeats`` > 1 the two strategies alternate order (medians). The last line is
``exhaustive / fast selection time: N.NNx`` (goal: the same pick in <= 1/5 of the time, >= 5.0x).

Usage::

    .venv/bin/python scripts/bench_select.py [--quick] [--layers all] [--n-val 16] [--repeats 1]

Not a test: the default takes about 10 minutes on 2 cores; ``--quick`` checks that the script works.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import statistics
import time

import torch
from _bench import machine_info

# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def parse_layers(text: str) -> list[int] | None:
    """``"8-18"`` -> ``[8, ..., 18]`` (inclusive); ``"12"`` -> ``[12]``; ``"all"`` -> ``None``."""
    if text == "all":
        return None
    a, _, b = text.partition("-")
    lo, hi = int(a), int(b or a)
    if hi < lo:
        raise SystemExit(f"--layers {text}: the range is empty (use A-B with A <= B)")
    return list(range(lo, hi + 1))


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    for r, i in enumerate(order):
        ranks[i] = float(r)
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (no tie correction; scores are continuous)."""
    if len(x) < 2:
        return math.nan
    rx, ry = torch.tensor(_ranks(x)), torch.tensor(_ranks(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (< 1 minute): checks that the script works")
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats of each strategy, alternating (default 1)")
    ap.add_argument("--layers", default=None, help="candidate layers A-B inclusive, or 'all' (default all)")
    ap.add_argument("--n-val", type=int, default=None, help="harmful and as many harmless val prompts (default 16)")
    ap.add_argument("--n-train", type=int, default=None, help="train prompts per set for extraction (default 64)")
    ap.add_argument("--top-k", type=int, default=None, help="fast selection's fully scored candidates (default: the library's, 6)")
    ap.add_argument("--screen", default="gradient", choices=["gradient", "exact"], help="fast selection's screen")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--refusal-ids", default=None,
                    help="comma-separated refusal token ids (default: found from the model's own refusals)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--save", default=None, metavar="DIR",
                    help="also write each strategy's selection (every candidate's scores) as DIR/<strategy>.json")
    args = ap.parse_args()
    layers = parse_layers(args.layers or ("12-13" if args.quick else "all"))
    n_val = args.n_val or (2 if args.quick else 16)
    n_train = args.n_train or (8 if args.quick else 64)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from refusal_lens.data import load_builtin
    from refusal_lens.directions import candidate_directions
    from refusal_lens.evaluate import find_refusal_tokens
    from refusal_lens.models import load_model
    from refusal_lens.selection import select_direction

    top_k = args.top_k or (2 if args.quick else inspect.signature(select_direction).parameters["top_k"].default)

    print(machine_info(), flush=True)
    t0 = time.perf_counter()
    model = load_model()
    print(f"loaded the bridge in {time.perf_counter() - t0:.1f} s", flush=True)

    # shared, untimed: candidates, refusal tokens, val prompts
    t0 = time.perf_counter()
    cands = candidate_directions(model, load_builtin("harmful", "train")[:n_train],
                                 load_builtin("harmless", "train")[:n_train], batch_size=args.batch_size,
                                 progress=False)
    print(f"shared extraction: {n_train} + {n_train} train prompts, {cands.n_layers} layers x "
          f"{len(cands.positions)} positions in {time.perf_counter() - t0:.1f} s (not timed below)", flush=True)
    if args.refusal_ids:
        refusal_ids = [int(x) for x in args.refusal_ids.split(",")]
    else:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # its progress bar
            rt = find_refusal_tokens(model, load_builtin("harmful", "train")[: 8 if args.quick else 16],
                                     batch_size=args.batch_size)
        refusal_ids = rt.ids
    print(f"refusal tokens: {refusal_ids} {[model.tokenizer.decode([i]) for i in refusal_ids]}", flush=True)
    harmful_val = load_builtin("harmful", "val")[:n_val]
    harmless_val = load_builtin("harmless", "val")[:n_val]

    n_layers = cands.n_layers
    max_layer = int(0.8 * n_layers)
    full_pool = [(la, p) for la in range(max_layer) for i, p in enumerate(cands.positions) if cands.is_valid(la, i)]
    pool = [(la, p) for la, p in full_pool if layers is None or la in layers]
    if layers is not None and max(layers) >= max_layer:
        print(f"note: layers >= {max_layer} (0.8 x {n_layers}) are outside the paper's filter and never scored")
    subset = "all layers" if layers is None else f"layers {layers[0]}-{layers[-1]}"
    print(f"subset: {subset} below {max_layer}, all {len(cands.positions)} positions {cands.positions}: "
          f"{len(pool)} valid candidates of the {len(full_pool)} in the paper's full pool; "
          f"{len(harmful_val)} + {len(harmless_val)} val prompts; fast = {args.screen} screen + top {top_k}",
          flush=True)

    kw = dict(layers=layers, batch_size=args.batch_size, progress=False)
    jobs = {
        "fast": lambda: select_direction(model, cands, harmful_val, harmless_val, refusal_ids, strategy="fast",
                                         screen=args.screen, top_k=top_k, **kw),
        "exhaustive": lambda: select_direction(model, cands, harmful_val, harmless_val, refusal_ids,
                                               strategy="exhaustive", **kw),
    }
    times: dict[str, list[float]] = {k: [] for k in jobs}
    sel = {}
    for r in range(args.repeats):
        for name in (list(jobs) if r % 2 == 0 else list(reversed(jobs))):
            t0 = time.perf_counter()
            _, sel[name] = jobs[name]()
            times[name].append(time.perf_counter() - t0)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()),
              flush=True)

    fast, exh = sel["fast"], sel["exhaustive"]
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        for name, s in sel.items():
            s.save(os.path.join(args.save, f"{name}.json"), overwrite=True)
        print(f"wrote {args.save}/fast.json and {args.save}/exhaustive.json")
    keys = {k: {(s.layer, s.position) for s in sel[k].scores} for k in sel}
    if keys["fast"] != keys["exhaustive"] or keys["fast"] != set(pool):
        raise SystemExit("the two strategies saw different candidate pools")
    sec = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'':<12}{'pick (layer, pos)':>20}{'rule':>6}{'seconds':>10}{'scored fully':>14}")
    for name, s in (("exhaustive", exh), ("fast", fast)):
        n_full = sum(not math.isnan(c.bypass) for c in s.scores)
        print(f"{name:<12}{f'({s.layer}, {s.position})':>20}{s.rule:>6}{sec[name]:>10.1f}{n_full:>14}")
    for name, s in (("exhaustive", exh), ("fast", fast)):
        best = s.score_of(s.layer, s.position)
        print(f"{name} rule {s.rule}: {s.rule_text}; bypass {best.bypass:.3f}, induce {best.induce:.3f}, "
              f"kl {best.kl:.3f}")
    agree = (exh.layer, exh.position) == (fast.layer, fast.position)
    print(f"picks agree: {'yes' if agree else 'NO'}")

    screened = [s for s in fast.scores if not math.isnan(s.screen_bypass)]
    if screened:
        order = sorted(screened, key=lambda s: s.screen_bypass)
        rank = next(i for i, s in enumerate(order, start=1) if (s.layer, s.position) == (exh.layer, exh.position))
        exact = {(s.layer, s.position): s.bypass for s in exh.scores}
        rho = spearman([s.screen_bypass for s in screened], [exact[(s.layer, s.position)] for s in screened])
        exact_rank = 1 + sorted(exact.values()).index(exact[(exh.layer, exh.position)])
        print(f"screen quality: the exhaustive pick is #{rank} of {len(order)} in the {args.screen} screen's "
              f"ordering (top {top_k} scored fully; #{exact_rank} by exact bypass, before filters); Spearman "
              f"rho(screen, exact bypass) over the pool = {rho:.2f}")
        if not agree and rank > top_k:
            print(f"why they differ: the exhaustive pick (rule {exh.rule}) lies outside the screen's top {top_k}; "
                  "the screen ranks by bypass alone, while the pick also depends on the induce / KL filters "
                  f"(top_k >= {rank} would have found it)")
    else:
        print(f"screen quality: no screen ran (the pool of {len(pool)} is <= top_k {top_k})")
    both = [(s, exh.score_of(s.layer, s.position)) for s in fast.scores if not math.isnan(s.bypass)]
    drift = max((abs(a.bypass - b.bypass) for a, b in both), default=math.nan)
    print(f"determinism: max |bypass difference| on candidates scored by both = {drift:.2e}")
    if len(full_pool) > len(pool) and args.screen == "gradient":
        est = sec["exhaustive"] * len(full_pool) / len(pool) / sec["fast"]
        print(f"estimate for the full pool of {len(full_pool)} candidates at {n_val} val prompts: exhaustive "
              f"~{sec['exhaustive'] * len(full_pool) / len(pool) / 60:.0f} min, ratio ~{est:.1f}x (the fast "
              "cost hardly grows with the pool); measured on the subset above")
    ratio = sec["exhaustive"] / sec["fast"]
    print(f"goal: the same pick in <= 1/5 of the time (>= 5.0x); "
          f"{'met' if agree and ratio >= 5.0 else 'NOT met'} on {subset}, {n_val} val prompts")
    print(f"exhaustive / fast selection time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
