"""One greedy decode step through the bridge vs through plain ``transformers``, at one batch width.

The same left-padded batch of the embedded model's test prompts (harmful + harmless, ``--batch`` of them)
decodes ``--steps`` tokens per row (no row ends early: no end token), timed after one untimed warm-up of
each, in this order:

* ``greedy, bridge``            -- :func:`refusal_lens.decoding.greedy` on the TransformerLens bridge;
* ``greedy, plain model``       -- the same loop on a plain ``transformers`` model (its own weights);
* ``greedy, bridge + ablation`` -- the bridge under a rank-1 :class:`~refusal_lens.interventions.Ablation`
  (72 hooks, a random direction);
* ``transformers generate``     -- ``generate`` on the plain model (``min_new_tokens = --steps``).

Each line gives seconds, milliseconds per step (prefill included) and tokens per second; the last line is
the bridge's step time over the plain model's. On a CPU the steps are compute-bound and the ratio is close
to 1; on a GPU a 0.5 B model is bound by per-module Python, which the bridge adds to.

Usage::

    .venv/bin/python scripts/bench_decode_step.py [--batch 172] [--steps 40] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch
from _bench import load_bridge_and_plain, machine_info, sync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=172, help="rows per batch (default 172: the run's test prompts)")
    ap.add_argument("--steps", type=int, default=40, help="new tokens per row (default 40)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    args = ap.parse_args()

    from refusal_lens.decoding import greedy
    from refusal_lens.interventions import Ablation
    from refusal_lens.models import dtype_name, resolve_device, resolve_dtype
    from refusal_lens.pipeline import RunConfig
    from refusal_lens.prompts import batches, chat_format

    print(machine_info(), flush=True)
    device = resolve_device(args.device)
    model, hf, tok = load_bridge_and_plain(device=str(device), dtype=dtype_name(resolve_dtype(args.dtype, device)))
    splits = RunConfig().load_splits()
    prompts = (splits.harmful["test"] + splits.harmless["test"])[: args.batch]
    b = next(batches(tok, prompts, len(prompts), chat_format(model)))
    ablation = Ablation(model, torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)))
    ids, mask = b.input_ids.to(device), b.attention_mask.to(device)

    def ablated():
        with ablation:
            greedy(model, b.input_ids, b.attention_mask, max_new_tokens=args.steps, eos_id=None)

    runs = {
        "greedy, bridge": lambda: greedy(model, b.input_ids, b.attention_mask, max_new_tokens=args.steps, eos_id=None),
        "greedy, plain model": lambda: greedy(hf, b.input_ids, b.attention_mask, max_new_tokens=args.steps, eos_id=None),
        "greedy, bridge + ablation": ablated,
        "transformers generate": lambda: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.steps,
                                                     min_new_tokens=args.steps, do_sample=False,
                                                     pad_token_id=tok.pad_token_id),
    }
    print(f"\n{len(prompts)} rows x {args.steps} steps, {device.type}")
    step_ms = {}
    for name, run in runs.items():
        run()
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        s = time.perf_counter() - t0
        step_ms[name] = s / args.steps * 1e3
        print(f"{name:<28}{s:>8.2f} s{step_ms[name]:>9.1f} ms/step{len(prompts) * args.steps / s:>9.0f} tokens/s",
              flush=True)
    print(f"bridge / plain model step time: {step_ms['greedy, bridge'] / step_ms['greedy, plain model']:.2f}x "
          f"(under ablation {step_ms['greedy, bridge + ablation'] / step_ms['greedy, plain model']:.2f}x)")


if __name__ == "__main__":
    main()
