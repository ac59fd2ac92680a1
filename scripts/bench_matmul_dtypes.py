"""Matmul throughput per dtype on this machine's CPU (or GPU with --device cuda): is bf16 worth it here?

    python scripts/bench_matmul_dtypes.py [--device cpu] [--n 512] [--d 1536]

Prints GFLOP/s of ``F.linear`` ([n, d] x [d, d]^T, the shape of a 1.5 B model's projections) for float32,
bfloat16 and float16 (median of 5), the CPU's vector extensions, and bf16's ratio to float32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def gflops(dtype: torch.dtype, n: int, d: int, device: str, reps: int = 5) -> float:
    x = torch.randn(n, d, dtype=dtype, device=device)
    w = torch.randn(d, d, dtype=dtype, device=device)
    F.linear(x, w)
    times = []
    for _ in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        F.linear(x, w)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n * d * d / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--d", type=int, default=1536)
    args = ap.parse_args()
    if args.device == "cpu":
        print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")
    res = {dt: gflops(dt, args.n, args.d, args.device) for dt in (torch.float32, torch.bfloat16, torch.float16)}
    for dt, g in res.items():
        print(f"{str(dt).removeprefix('torch.'):<9} {g:8.1f} GFLOP/s")
    print(f"bfloat16 / float32 throughput: {res[torch.bfloat16] / res[torch.float32]:.2f}x")


if __name__ == "__main__":
    main()
