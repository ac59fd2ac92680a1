"""Peak memory of load + extraction, as a multiple of the model's parameter bytes, per dtype.

Each measurement runs in a fresh Python process (``ru_maxrss`` is a per-process high-water mark), after a
warm-up process has built that dtype's model cache, so the figure is a warm load (read the cached
safetensors, boot the bridge) plus diff-in-means extraction on ``--n`` harmful + ``--n`` harmless train
prompts. The ratio includes the interpreter, torch and TransformerLens (about 0.5 GB by themselves).

    PYTHONPATH=$PWD python scripts/bench_memory.py                 # embedded model, float32 and bfloat16
    PYTHONPATH=$PWD python scripts/bench_memory.py --model qwen2.5-coder-1.5b --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def child(model: str | None, dtype: str, n: int, batch_size: int) -> None:
    import resource

    import torch

    from refusal_lens.data import load_builtin
    from refusal_lens.directions import candidate_directions
    from refusal_lens.models import load_model

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    t0 = time.perf_counter()
    m = load_model(model, dtype=dtype, device="cpu")
    t_load = time.perf_counter() - t0
    param_bytes = sum(p.numel() * p.element_size() for p in m.original_model.parameters())
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cands = candidate_directions(m, load_builtin("harmful", "train")[:n], load_builtin("harmless", "train")[:n],
                                 batch_size=batch_size, progress=False)
    assert cands.diffs.dtype == torch.float32 and torch.isfinite(cands.diffs).all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"dtype": dtype, "param_bytes": param_bytes, "peak_after_load": rss_load, "peak": peak,
                      "ratio": peak / param_bytes, "load_s": round(t_load, 1),
                      "total_s": round(time.perf_counter() - t0, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model name (default: the embedded model)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--n", type=int, default=16, help="prompts per set")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.model, args.child, args.n, args.batch_size)
        return
    rows = []
    for dtype in args.dtypes.split(","):
        warm = [sys.executable, "-c", "import sys; from refusal_lens.models import load_model; "
                f"load_model({args.model!r}, dtype={dtype!r}, device='cpu')"]
        subprocess.run(warm, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cmd = [sys.executable, __file__, "--child", dtype, "--n", str(args.n), "--batch-size", str(args.batch_size)]
        if args.model:
            cmd += ["--model", args.model]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(out, flush=True)  # each row as soon as it is measured
    name = args.model or "embedded qwen2.5-coder-0.5b"
    print(f"{name}: load + extraction ({args.n} + {args.n} prompts), peak RSS / parameter bytes")
    print(f"{'dtype':<10} {'params GB':>9} {'peak GB':>8} {'ratio':>6} {'load s':>7} {'total s':>8}")
    for r in rows:
        print(f"{r['dtype']:<10} {r['param_bytes'] / 1e9:>9.2f} {r['peak'] / 1e9:>8.2f} {r['ratio']:>6.2f} "
              f"{r['load_s']:>7.1f} {r['total_s']:>8.1f}")


if __name__ == "__main__":
    main()
