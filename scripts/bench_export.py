"""Benchmark the streaming export against load-everything-edit-save on the embedded model.

Re-saves the embedded Qwen2.5-Coder-0.5B-Instruct (fp32, untied, 2.5 GB) in ~100 MB shards into a temp
folder, then runs, each in its own subprocess (so that peak RSS is that of the job alone):

* ``baseline``  -- the imports only (interpreter + torch + transformers + refusal_lens): the floor;
* ``streaming`` -- :func:`refusal_lens.export.export_streaming` on the sharded folder;
* ``full``      -- ``AutoModelForCausalLM.from_pretrained`` + the same edit in memory + ``save_pretrained``.

Peak RSS is each child's ``ru_maxrss`` from ``os.wait4``; the page cache is synced before each job. The embedding (151,936 x 896 fp32, 545 MB) is one
tensor, so it is the largest shard whatever ``--shard-mb`` says. Prints medians side by side; the last
line is ``streaming peak RSS / largest shard: N.Nx``.

Usage::

    .venv/bin/python scripts/bench_export.py [--repeats 3] [--shard-mb 100] [--keep DIR]

Not a test: it writes ~2.5 GB per run and takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1 << 20


# --------------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------------


def _direction(d_model: int):
    import torch

    from refusal_lens.directions import Direction

    g = torch.Generator().manual_seed(0)
    return Direction(torch.randn(d_model, generator=g), layer=14, position=-1, model_id="bench")


def child_resave(src: str, dst: str, shard_mb: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(dst, max_shard_size=f"{shard_mb}MB")
    for p in Path(src).iterdir():
        if p.is_file() and not p.name.endswith((".safetensors", ".safetensors.index.json")) \
                and p.name != "refusal_lens_cache.json" and not (Path(dst) / p.name).exists():
            shutil.copy2(p, Path(dst) / p.name)
    return {}


def child_baseline() -> dict:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import refusal_lens.export  # noqa: F401

    return {"seconds": 0.0}


def child_streaming(src: str, out: str) -> dict:
    import transformers  # noqa: F401  (imported before the clock, as in baseline)

    from refusal_lens.export import export_streaming

    cfg = json.loads((Path(src) / "config.json").read_text())
    t0 = time.perf_counter()
    export_streaming(src, _direction(cfg["hidden_size"]), out, overwrite=True, allow_other_model=True)
    return {"seconds": time.perf_counter() - t0}


def child_full(src: str, out: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from refusal_lens.orthogonalize import model_type_of, project_out_, unit_vector, writer_patterns

    cfg = json.loads((Path(src) / "config.json").read_text())
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    r = unit_vector(_direction(cfg["hidden_size"]))
    names = [n for n, _ in model.named_parameters()]
    patterns = writer_patterns(model_type_of(model.config), names)
    for name, p in model.named_parameters():
        hit = patterns.match(name)
        if hit is not None:
            project_out_(p, r, hit[2])
    model.config.tie_word_embeddings = False
    if os.path.exists(out):
        shutil.rmtree(out)
    model.save_pretrained(out)
    return {"seconds": time.perf_counter() - t0}


CHILDREN = {"resave": child_resave, "baseline": child_baseline, "streaming": child_streaming, "full": child_full}


# --------------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------------


def run_child(mode: str, *args: str) -> dict:
    """Run one job in a fresh interpreter; return its JSON result plus wall time and peak RSS.

    ``os.sync()`` first, so that no job pays for writing back the previous job's dirty pages.
    """
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(wall=time.perf_counter() - t0, peak_rss_mb=usage.ru_maxrss / 1024)  # ru_maxrss is in kB
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-mb", type=int, default=100)
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, *rest = args.child
        if mode == "resave":
            rest = [rest[0], rest[1], int(rest[2])]
        print(json.dumps(CHILDREN[mode](*rest)))
        return

    from refusal_lens.models import embedded_model_folder

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_export-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        folder = embedded_model_folder()
        src = work / "sharded"
        if not (src / "model.safetensors.index.json").is_file():
            print(f"re-saving {folder} in {args.shard_mb} MB shards into {src} ...", flush=True)
            shutil.rmtree(src, ignore_errors=True)
            run_child("resave", str(folder), str(src), str(args.shard_mb))
        shards = sorted(src.glob("*.safetensors"))
        largest = max(p.stat().st_size for p in shards) / MB
        total = sum(p.stat().st_size for p in shards) / MB
        print(f"{len(shards)} shards, {total:.0f} MB in all, largest {largest:.0f} MB", flush=True)

        runs: dict[str, list[dict]] = {"baseline": [], "streaming": [], "full": []}
        for i in range(args.repeats):
            runs["baseline"].append(run_child("baseline"))
            runs["streaming"].append(run_child("streaming", str(src), str(work / "out-streaming")))
            runs["full"].append(run_child("full", str(src), str(work / "out-full")))
            print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(
                f"{k} {v[-1]['seconds']:.1f} s / {v[-1]['peak_rss_mb']:.0f} MB" for k, v in runs.items()), flush=True)

        def med(mode: str, key: str) -> float:
            return statistics.median(r[key] for r in runs[mode])

        base = med("baseline", "peak_rss_mb")
        print(f"\nmedians of {args.repeats} runs (each a fresh process; seconds exclude imports)")
        print(f"{'':<32}{'streaming':>12}{'load-edit-save':>16}")
        print(f"{'export seconds':<32}{med('streaming', 'seconds'):>12.1f}{med('full', 'seconds'):>16.1f}")
        print(f"{'process wall seconds':<32}{med('streaming', 'wall'):>12.1f}{med('full', 'wall'):>16.1f}")
        print(f"{'peak RSS MB':<32}{med('streaming', 'peak_rss_mb'):>12.0f}{med('full', 'peak_rss_mb'):>16.0f}")
        print(f"{'peak RSS above baseline MB':<32}{med('streaming', 'peak_rss_mb') - base:>12.0f}"
              f"{med('full', 'peak_rss_mb') - base:>16.0f}")
        print(f"interpreter baseline (imports only): {base:.0f} MB; largest shard {largest:.0f} MB; "
              f"model {total:.0f} MB")
        stream_peak = med("streaming", "peak_rss_mb")
        print(f"budget: 1.5 x largest shard + baseline = {1.5 * largest + base:.0f} MB; streaming peak "
              f"{stream_peak:.0f} MB ({'within' if stream_peak <= 1.5 * largest + base else 'OVER'} budget)")
        print(f"streaming peak RSS incl. baseline / largest shard: {stream_peak / largest:.1f}x")
        print(f"streaming peak RSS / largest shard: {(stream_peak - base) / largest:.1f}x (above the baseline)")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
