"""Compare MMLU prompt formats on the embedded model (or --model): accuracy with n and 95 % Wilson interval.

    python scripts/mmlu_formats.py --n-per-subject 2 --out mmlu_formats.json

Every format is asked the same stratified sample (seeded). The last lines print one row per format.
"""

from __future__ import annotations

import argparse
import json
import time

from refusal_lens import load_model
from refusal_lens.data.external import load_mmlu
from refusal_lens.mmlu import FORMATS, mmlu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n-per-subject", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pool = load_mmlu()
    model = load_model(args.model)
    rows = {}
    for name in args.formats.split(","):
        t = time.perf_counter()
        res = mmlu(model, n_per_subject=args.n_per_subject, seed=args.seed, fmt=name, questions=pool,
                   batch_size=args.batch_size)
        rows[name] = res.to_dict() | {"wall_s": round(time.perf_counter() - t, 1)}
        print(f"{name:<18} accuracy {res.accuracy}  {rows[name]['wall_s']:.0f} s", flush=True)
        if args.out:  # after every format, so a long study can be read while it runs
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    print("format             accuracy [95% Wilson] (n)   seconds")
    for name, r in rows.items():
        a = r["accuracy"]
        print(f"{name:<18} {a['rate']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] (n={a['n']})  {r['wall_s']:.0f}")


if __name__ == "__main__":
    main()
