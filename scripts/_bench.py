"""Shared by the benchmark scripts: a description of the machine and software they ran on, and the
bridge loaded beside a plain ``transformers`` copy of the same weights.

The scripts run as ``python scripts/bench_*.py``, which puts ``scripts/`` on ``sys.path``.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from pathlib import Path

import torch


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > (usable or 1)
    return (f"machine: {cpu}; {os.cpu_count()} cores ({usable} usable); torch threads {torch.get_num_threads()}; "
            f"load average {load}\nsoftware: python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {_version('transformers')}, transformer-lens {_version('transformer-lens')}"
            + ("\nWARNING: other work is running (load average above the number of cores): timings are noisy, and "
               "multi-threaded torch suffers most; use a quiet machine, or --threads 1 for a steadier A/B"
               if busy else ""))


def load_bridge_and_plain(plain_attn: str = "eager"):
    """The embedded model twice: the refusal-lens bridge, and plain ``AutoModelForCausalLM`` on its own copy
    of the cached weights (``plain_attn`` attention), with its tokenizer padding on the left.

    Returns:
        ``(bridge, hf_model, tokenizer)``; prints how long loading took.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refusal_lens.models import embedded_model_folder, load_model

    folder = embedded_model_folder()
    t0 = time.perf_counter()
    model = load_model()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=plain_attn).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    print(f"loaded the bridge and the plain model in {time.perf_counter() - t0:.1f} s", flush=True)
    return model, hf, tok
