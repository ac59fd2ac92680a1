"""The shared chat prefix run once per call (``refusal_lens.prefix``) vs whole rows, on the embedded model.

For each use (mean activations for extraction, last-position logits for filtering and selection, greedy
generation, completion scoring), the same call runs with the prefix shared and inside
``refusal_lens.prefix.disabled()``, one after the other in this process. The script prints the largest
difference in the numbers, whether greedy completions are identical, both times and their ratio.

Usage::

    .venv/bin/python scripts/bench_prefix.py [--n 32] [--max-new-tokens 40]
"""

from __future__ import annotations

import argparse
import time

from _bench import machine_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="harmful and harmless val prompts each (default 32)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args()

    from refusal_lens import prefix
    from refusal_lens.activations import mean_activations
    from refusal_lens.data import load_builtin
    from refusal_lens.evaluate import completion_nll, last_logits
    from refusal_lens.interventions import complete
    from refusal_lens.models import load_model

    print(machine_info(), flush=True)
    m = load_model()
    harm = load_builtin("harmful", "val")[: args.n]
    harmless = load_builtin("harmless", "val")[: args.n]

    def both(f):
        t0 = time.perf_counter()
        a = f()
        t1 = time.perf_counter()
        with prefix.disabled():
            b = f()
        return a, b, t1 - t0, time.perf_counter() - t1

    def line(what: str, check: str, fast: float, whole: float) -> None:
        print(f"{what:<34}{check:<44}{fast:>8.1f} s{whole:>8.1f} s{whole / fast:>8.2f}x", flush=True)

    print(f"\n{'':<34}{'shared prefix vs whole rows':<44}{'shared':>10}{'whole':>10}{'speed-up':>9}")
    a, b, tf, tw = both(lambda: mean_activations(m, harm, batch_size=16, progress=False).mean)
    line(f"mean activations, {len(harm)} prompts", f"max |diff| {(a - b).abs().max():.1e} (scale {b.abs().max():.0f})",
         tf, tw)
    a, b, tf, tw = both(lambda: last_logits(m, harm, batch_size=16))
    line(f"last-position logits, {len(harm)}", f"max |diff| {(a - b).abs().max():.1e}; same argmax "
         f"{bool((a.argmax(-1) == b.argmax(-1)).all())}", tf, tw)
    prompts = harm + harmless
    a, b, tf, tw = both(lambda: complete(m, prompts, max_new_tokens=args.max_new_tokens, batch_size=64,
                                         progress=False))
    n_diff = sum(x != y for x, y in zip(a.tokens, b.tokens, strict=True))
    line(f"greedy, {len(prompts)} x {args.max_new_tokens} tokens", f"{n_diff} completions differ; first logits "
         f"{(a.first_logits - b.first_logits).abs().max():.1e}", tf, tw)
    x, y, tf, tw = both(lambda: completion_nll(m, prompts, a.content_tokens(), batch_size=16, progress=False))
    line(f"completion scoring, {len(prompts)}", f"max |NLL diff| {max(abs(p[0] - q[0]) for p, q in zip(x, y, strict=True)):.1e} nats",
         tf, tw)


if __name__ == "__main__":
    main()
