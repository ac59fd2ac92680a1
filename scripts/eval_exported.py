"""Refusal score of an exported model loaded by plain `transformers` (no refusal-lens model code).

Usage: python scripts/eval_exported.py EXPORTED_FOLDER [--n N] [--max-new-tokens 40]
Only the built-in prompts and the substring list come from refusal-lens.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from refusal_lens.data import load_builtin
from refusal_lens.evaluate import refusal_score


def complete(model, tok, prompts, max_new_tokens, batch_size=16):
    out = []
    tok.padding_side = "left"
    for i in range(0, len(prompts), batch_size):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in prompts[i : i + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folder")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    a = ap.parse_args()
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.folder)
    model = AutoModelForCausalLM.from_pretrained(a.folder, dtype=torch.float32).eval()
    for kind in ("harmful", "harmless"):
        prompts = load_builtin(kind, "test")[: a.n]
        comps = complete(model, tok, prompts, a.max_new_tokens)
        print(f"{kind} test prompts: refusal score {refusal_score(comps):.3f} (n={len(prompts)})", flush=True)
    print(f"({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
