"""Re-judge a ``refusal-lens compare`` folder's base model and ``diff-in-means`` rows the way ``compare``
judges now, and check them against the folder.

``compare`` decodes a method's three sets (harmful test, HarmBench, harmless test) in one stream of batches
and reads the refusal metric and KL from the generation's prefill logits. A folder written before that
(one ``generate`` call per set, then ``last_logits`` again) is the reference: this script takes its prompts
(``completions.jsonl``), its direction and refusal tokens, decodes the three sets in one ``complete`` call
for the base model and under the direction's ablation, and prints per set how many completions are
identical, then the refusal metric and KL beside the folder's (greedy fp32 on a CPU: identical completions,
the metric and KL equal to rounding).

Usage::

    .venv/bin/python scripts/check_compare_stream.py runs/cmp_old [--batch-size 256] [--max-new-tokens 40]

Session 9 ran it on a reduced folder written by the old code (``refusal-lens compare --n-test 24
--n-harmbench 16 --n-train 64 --gen-batch-size 64``): 64/64 completions identical for both rows, the metric
and KL agreeing to 2e-7.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SETS = ("harmful_test", "harmbench", "harmless_test")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a compare output folder")
    ap.add_argument("--batch-size", type=int, default=256, help="generation batch (default 256, compare's)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the folder's")
    args = ap.parse_args()

    from refusal_lens.directions import Direction
    from refusal_lens.evaluate import kl_last, refusal_metric_from_logits
    from refusal_lens.interventions import complete
    from refusal_lens.models import load_model

    torch.set_grad_enabled(False)
    info = json.loads((args.folder / "compare.json").read_text())
    old = {r["method"]: r for r in info["rows"]}
    rows = [json.loads(x) for x in (args.folder / "completions.jsonl").read_text().splitlines()]
    ids = json.loads((args.folder / "selection.json").read_text())["config"]["refusal_ids"]
    max_new = args.max_new_tokens or info["info"]["config"]["max_new_tokens"]
    prompts = {s: [r["instruction"] for r in rows if r["method"] == "base" and r["set"] == s] for s in SETS}
    sets = [s for s in SETS if prompts[s]]
    model = load_model()
    direction = Direction.load(args.folder / "direction")
    first = {}
    for name, iv in (("base", None), ("diff-in-means", direction.ablate(model))):
        done = complete(model, [p for s in sets for p in prompts[s]], max_new_tokens=max_new,
                        batch_size=args.batch_size, interventions=iv, progress=False)
        parts = dict(zip(sets, done.split([len(prompts[s]) for s in sets]), strict=True))
        for s in sets:
            want = [r["completion"] for r in rows if r["method"] == name and r["set"] == s]
            same = sum(a == b for a, b in zip(parts[s].texts, want, strict=True))
            print(f"{name:>14} {s:>13}: {same}/{len(want)} completions identical", flush=True)
        metric = float(refusal_metric_from_logits(parts["harmful_test"].first_logits, ids).mean())
        print(f"{name:>14} refusal metric {metric:.7f} (folder: {old[name]['refusal_metric_harmful']:.7f})")
        first[name] = parts["harmless_test"].first_logits
    kl = kl_last(first["base"], first["diff-in-means"])
    print(f"KL(base || diff-in-means) on harmless test {kl:.8f} (folder: {old['diff-in-means']['kl_harmless']:.8f})")


if __name__ == "__main__":
    main()
