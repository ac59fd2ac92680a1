"""How wide the evaluation's generation batches should be on this machine: a run's evaluation decoded at
several ``gen_batch_size`` values, side by side, in one process.

The six conditions of a default run's evaluation (harmful / harmless test prompts: baselines, ablated, the
direction added at coefficient 1 and at the run's tuned coefficient) decode in one stream of batches
(:func:`refusal_lens.interventions.complete_each`) under the direction of a finished run folder
(``--run``, e.g. one written by ``scripts/bench_run.py --out``), once per batch width, in the order given.
Each line gives the seconds, tokens per second and the time over the fastest width's, and how many of the
512 completions equal the run's ``completions.jsonl`` (greedy fp32 on a CPU: all of them, whatever the
width).

Wider batches read each weight once for more rows, but the key/value cache that every decode step reads
and extends grows with the rows. On the 2-core CPU, in session 9, 256 rows were fastest, timed in pairs by
an earlier form of this script: 512 took 1.26x the time of 256 (585 vs 466 s), 128 took 1.12x (468 vs
416 s), with all 512 completions identical each time (``gen_batch_size`` 256 is ``RunConfig``'s default).

Usage::

    .venv/bin/python scripts/bench_gen_batch.py --run runs/bench_s9 [--sizes 128,256,512]

Not a test: each width takes the time of a run's generation phase (about 7 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _bench import machine_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished run folder (direction, evaluation.json, "
                    "completions.jsonl)")
    ap.add_argument("--sizes", default="256,512,128", help="comma-separated gen_batch_size values, timed in order")
    ap.add_argument("--max-new-tokens", type=int, default=40, help="as the run's (default 40)")
    args = ap.parse_args()

    from refusal_lens.directions import Direction
    from refusal_lens.interventions import complete_each
    from refusal_lens.models import load_model
    from refusal_lens.pipeline import RunConfig, evaluation_conditions

    sizes = [int(x) for x in args.sizes.split(",")]
    print(machine_info(), flush=True)
    torch.set_grad_enabled(False)
    model = load_model()
    direction = Direction.load(args.run / "direction")
    tuned = json.loads((args.run / "evaluation.json").read_text())["addition"]["tuned_coeff"]
    conditions = evaluation_conditions(model, direction, RunConfig().load_splits(), tuned)  # the run's own
    reference: dict[str, list[str]] = {}
    for line in (args.run / "completions.jsonl").read_text().splitlines():
        row = json.loads(line)
        reference.setdefault(row["condition"], []).append(row["completion"])

    times = {}
    for size in sizes:
        t0 = time.perf_counter()
        done = complete_each(model, conditions, max_new_tokens=args.max_new_tokens, batch_size=size, progress=False)
        times[size] = time.perf_counter() - t0
        tokens = sum(len(t) for c in done.values() for t in c.tokens)
        same = sum(a == b for name, c in done.items() for a, b in zip(c.texts, reference.get(name, []), strict=False))
        total = sum(len(c.texts) for c in done.values())
        print(f"gen_batch_size {size:>4}: {times[size]:7.1f} s, {tokens} tokens, {tokens / times[size]:5.1f} tokens/s, "
              f"completions equal to the run's: {same}/{total}", flush=True)
    best = min(times, key=times.get)
    print("time / the fastest width's (" + str(best) + "): "
          + ", ".join(f"{s}: {times[s] / times[best]:.2f}x" for s in sizes))


if __name__ == "__main__":
    main()
