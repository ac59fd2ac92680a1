"""Whole-process load time of the embedded default model: cold (cache rebuilt) and warm (cached).

Usage: python scripts/bench_load.py [--repeats 3] [--cold]
--cold rebuilds the cache into a temporary REFUSAL_LENS_CACHE (about a minute, 2.5 GB of disk).
The last line prints the warm median and its ratio to the 10 s target.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CODE = "from refusal_lens import load_model; load_model()"


def timed(env: dict) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", CODE], env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true")
    args = ap.parse_args()
    env = dict(os.environ)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    if args.cold:
        with tempfile.TemporaryDirectory() as d:
            env_cold = env | {"REFUSAL_LENS_CACHE": d}
            print(f"cold load (verify sha256, dequantize GGUF, write cache): {timed(env_cold):.1f} s")
    timed(env)  # make sure the cache exists
    warm = [timed(env) for _ in range(args.repeats)]
    med = statistics.median(warm)
    print("warm loads (s):", ", ".join(f"{w:.1f}" for w in warm))
    print(f"warm load median {med:.1f} s = {med / 10:.2f}x of the 10 s target")


if __name__ == "__main__":
    main()
