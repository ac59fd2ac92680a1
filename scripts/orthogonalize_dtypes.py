"""Orthogonalized weights vs hook ablation on the embedded model, in fp32 and in bf16.

Prints ``refusal_lens.orthogonalize.check_edit`` for both dtypes: max |logit diff|, mean KL (nats) over the
positions of 2 harmful + 2 harmless built-in test prompts, and the max relative residual component along
the direction. The bf16 figures set the bf16 defaults of ``refusal_lens.export.TOLERANCES``.

Usage: python scripts/orthogonalize_dtypes.py   (about 3 minutes on an idle 2-core CPU; 20 under load)
"""

from __future__ import annotations

import time

import torch

from refusal_lens import load_model
from refusal_lens.data import load_builtin
from refusal_lens.directions import candidate_directions
from refusal_lens.orthogonalize import check_edit


def main() -> None:
    t0 = time.perf_counter()
    harmful, harmless = load_builtin("harmful", "train")[:16], load_builtin("harmless", "train")[:16]
    prompts = load_builtin("harmful", "test")[:2] + load_builtin("harmless", "test")[:2]
    model = load_model()
    d = candidate_directions(model, harmful, harmless, positions=[-1], progress=False).direction(14, -1)
    for dtype in (torch.float32, torch.bfloat16):
        if dtype != torch.float32:
            del model
            model = load_model(dtype=dtype)
        c = check_edit(model, d, prompts)
        print(f"{str(dtype):15s} max |logit diff| {c.max_logit_diff:.3g}  mean KL {c.kl:.3g} nats  "
              f"max |x.r|/|x| {c.max_along_r:.3g}  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
