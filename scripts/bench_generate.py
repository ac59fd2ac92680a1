"""Benchmark batched greedy generation under directional ablation against plain transformers.

On the embedded Qwen2.5-Coder-0.5B-Instruct (fp32), the same harmful test prompts, batch 16, the same
``max_new_tokens``, timed side by side (medians of ``--repeats`` interleaved runs, the order rotated
every repeat, after one untimed warm-up of each):

* ``rl-ablate``   -- :func:`refusal_lens.interventions.generate` with
  ``interventions=[d.ablate(model)]`` (72 hooks: every block's input, middle and output), KV cache;
* ``plain``       -- ``AutoModelForCausalLM.generate`` on its own copy of the weights, no hooks (eager
  attention like the bridge, ``--plain-attn sdpa`` for transformers' default);
* ``rl-plain``    -- refusal-lens ``generate`` without interventions (the bridge's own overhead);
* ``rl-uncached`` -- refusal-lens ``generate(..., use_cache=False)`` under the same ablation, on the first
  ``--uncached-prompts`` prompts only (recomputing the whole sequence every step costs ~10x at 32 tokens),
  beside ``rl-cached-sub``, the cached run on the same subset. The uncached run gets no warm-up (the
  cached runs before it warm the same bridge and hooks).

Every run produces exactly ``max_new_tokens`` tokens per prompt (``min_new_tokens = max_new_tokens`` for
plain ``generate`` and the uncached path; refusal-lens's cached greedy loop is told to ignore the end token),
so tokens/s compare like with like, per decoded token (refusal-lens's dropping of finished prompts, which a
real run gains from, is left out here: ``scripts/bench_run.py`` measures that).

Checks (printed): refusal-lens without interventions == plain transformers greedy tokens, up to each
prompt's first end token;
cached == uncached refusal-lens output, token for token (the bridge's output tokens are recorded by
recorded from :func:`refusal_lens.decoding.greedy` and ``model.hf_generate``); and whether ``use_cache=False`` really turns the KV cache off (the
tokens fed per forward are counted). The direction is ``candidate_directions`` on ``--n-train`` +
``--n-train`` train prompts at ``--layer`` / ``--position``.

The last line is ``refusal-lens (ablation) / plain throughput: N.NNx`` (goal >= 0.8x).

Usage::

    .venv/bin/python scripts/bench_generate.py [--quick] [--repeats 3] [--n-prompts 32] [--max-new-tokens 32]

Not a test: the default takes several minutes on 2 cores; ``--quick`` checks that the script works.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
from _bench import generated_tokens, load_bridge_and_plain, machine_info

# --------------------------------------------------------------------------------------------------
# Instrumentation of the bridge (restored on exit)
# --------------------------------------------------------------------------------------------------


@contextmanager
def generation_config(model, **values):
    """Temporarily set fields of the bridge's HF ``generation_config`` (e.g. ``min_new_tokens``)."""
    gc = model.original_model.generation_config
    old = {k: getattr(gc, k, None) for k in values}
    for k, v in values.items():
        setattr(gc, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(gc, k, v)


@contextmanager
def record_tokens(model, run_to_length: bool = True):
    """Record each batch's new tokens (refusal-lens ``generate`` returns strings): from
    :func:`refusal_lens.decoding.greedy` (the cached path) or ``model.hf_generate`` (the uncached one).

    ``run_to_length``: greedy ignores the end token, so every row runs ``max_new_tokens`` steps, as
    ``min_new_tokens`` makes ``generate`` do (the tokens after an end token then differ: ``generate`` bans
    the end token, greedy emits it and goes on; the checks compare up to the first end token).
    """
    import refusal_lens.interventions as iv

    calls: list[torch.Tensor] = []
    original_greedy, original_hf = iv.greedy, model.hf_generate

    def greedy(m, input_ids, attention_mask, **kwargs):
        if run_to_length:
            kwargs["eos_id"] = None
        out = original_greedy(m, input_ids, attention_mask, **kwargs)
        calls.append(torch.tensor(out.tokens))
        return out

    def hf_generate(*args, **kwargs):
        out = original_hf(*args, **kwargs)
        calls.append(out[:, args[0].shape[1] :].clone())
        return out

    iv.greedy = greedy
    object.__setattr__(model, "hf_generate", hf_generate)
    try:
        yield calls
    finally:
        iv.greedy = original_greedy
        object.__delattr__(model, "hf_generate")


@contextmanager
def count_fed_tokens(module):
    """Record the ``input_ids`` shape of every forward of ``module`` (prefill, then decode steps)."""
    shapes: list[tuple[int, ...]] = []

    def pre_hook(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            shapes.append(tuple(ids.shape))

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield shapes
    finally:
        handle.remove()


def _new_tokens(calls: list[torch.Tensor]) -> list[list[int]]:
    return [row for t in calls for row in t.tolist()]


# --------------------------------------------------------------------------------------------------
# Plain transformers
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def plain_generate(hf, tok, instructions, max_new_tokens: int, batch_size: int):
    """Greedy completions (strings, new-token lists) with plain ``generate``: no hooks, exactly N tokens."""
    texts, tokens = [], []
    for s in range(0, len(instructions), batch_size):
        chunk = [tok.apply_chat_template([{"role": "user", "content": x}], tokenize=False, add_generation_prompt=True)
                 for x in instructions[s : s + batch_size]]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        out = hf.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=max_new_tokens,
                          min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.eos_token_id, top_k=None, top_p=None, temperature=None)
        new = out[:, enc["input_ids"].shape[1] :]
        tokens += new.tolist()
        texts += tok.batch_decode(new, skip_special_tokens=True)
    return texts, tokens


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (< 1 minute): checks that the script works")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved timed repeats (default 3; quick 1)")
    ap.add_argument("--n-prompts", type=int, default=None, help="harmful test prompts (default 32; quick 4)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="= min_new_tokens (default 32; quick 4)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 16 (quick 4)")
    ap.add_argument("--n-train", type=int, default=None, help="train prompts per set for the direction (default 16)")
    ap.add_argument("--layer", type=int, default=14, help="direction layer (default 14)")
    ap.add_argument("--position", type=int, default=-1, help="direction position (default -1)")
    ap.add_argument("--uncached-prompts", type=int, default=None,
                    help="prompts for the cached-vs-uncached comparison (default 4; quick 2; 0 skips it)")
    ap.add_argument("--plain-attn", default="eager", choices=["eager", "sdpa"],
                    help="attention of the plain model (default eager, as the bridge forces)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    n_prompts = args.n_prompts or (4 if args.quick else 32)
    max_new = args.max_new_tokens or (4 if args.quick else 32)
    batch_size = args.batch_size or (4 if args.quick else 16)
    n_train = args.n_train or (4 if args.quick else 16)
    n_sub = args.uncached_prompts if args.uncached_prompts is not None else (2 if args.quick else 4)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from refusal_lens.data import load_builtin
    from refusal_lens.directions import candidate_directions
    from refusal_lens.evaluate import refusal_score
    from refusal_lens.interventions import generate

    print(machine_info(), flush=True)
    model, hf, tok = load_bridge_and_plain(args.plain_attn)

    t0 = time.perf_counter()
    cands = candidate_directions(model, load_builtin("harmful", "train")[:n_train],
                                 load_builtin("harmless", "train")[:n_train], batch_size=16, progress=False)
    direction = cands.direction(args.layer, args.position)
    print(f"direction: layer {args.layer}, position {args.position}, from {n_train} + {n_train} train prompts "
          f"({time.perf_counter() - t0:.1f} s, not timed)", flush=True)

    prompts = load_builtin("harmful", "test")[:n_prompts]
    n_tokens = len(prompts) * max_new
    print(f"workload: {len(prompts)} harmful test prompts, batch {batch_size}, greedy, exactly {max_new} new tokens "
          f"each (min_new_tokens = max_new_tokens) = {n_tokens:,} tokens per run; fp32; plain attention "
          f"{args.plain_attn}", flush=True)

    # does generate(use_cache=False) alone turn the KV cache off? (1 prompt, 3 tokens; tokens fed per forward)
    with count_fed_tokens(model.original_model) as shapes:
        generate(model, prompts[:1], max_new_tokens=3, use_cache=False, progress=False)
    cache_off = len(shapes) > 1 and shapes[1][1] > 1
    print(f"refusal-lens generate(use_cache=False) alone: forwards fed {[s[1] for s in shapes]} tokens -> "
          + ("KV cache off" if cache_off else
             "the KV cache is STILL ON (TransformerBridge.hf_generate passes use_cache only when True, and "
             "the model's generation_config.use_cache=True stays); the uncached runs below also set "
             "generation_config.use_cache=False"), flush=True)

    ablation = [direction.ablate(model)]
    results: dict[str, tuple[list[str], list[list[int]]]] = {}

    def rl_job(name: str, interventions, use_cache: bool, subset: int | None = None):
        def job():
            with generation_config(model, min_new_tokens=max_new, **({} if use_cache else {"use_cache": False})), \
                    record_tokens(model) as calls:
                texts = generate(model, prompts[:subset], interventions=interventions, max_new_tokens=max_new,
                                 batch_size=batch_size, use_cache=use_cache, progress=False)
            results[name] = (texts, _new_tokens(calls))

        return job

    def plain_job():
        results["plain"] = plain_generate(hf, tok, prompts, max_new, batch_size)

    jobs = {"rl-ablate": rl_job("rl-ablate", ablation, True), "plain": plain_job,
            "rl-plain": rl_job("rl-plain", None, True)}
    if n_sub > 0:
        jobs["rl-cached-sub"] = rl_job("rl-cached-sub", ablation, True, n_sub)
        jobs["rl-uncached"] = rl_job("rl-uncached", ablation, False, n_sub)
    for name, job in jobs.items():  # warm-up, untimed (not the slow uncached run: its path is already warm)
        if name != "rl-uncached":
            job()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    names = list(jobs)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            jobs[name]()
            times[name].append(time.perf_counter() - t0)
        print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)

    n_prompts_of = {k: (min(n_sub, len(prompts)) if k in ("rl-cached-sub", "rl-uncached") else len(prompts))
                    for k in jobs}
    for name, (_, toks) in results.items():
        lengths = {len(t) for t in toks}
        if lengths != {max_new} or len(toks) != n_prompts_of[name]:
            raise SystemExit(f"{name} produced {sorted(lengths)} new tokens per prompt, expected {max_new}")
    sec = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: n_prompts_of[k] * max_new / s for k, s in sec.items()}

    print(f"\nmedians of {repeats} interleaved repeats")
    print(f"{'':<52}{'prompts':>8}{'seconds':>10}{'tokens/s':>10}")
    labels = {"rl-ablate": "refusal-lens, ablation hooks, KV cache", "plain": "plain transformers, no hooks",
              "rl-plain": "refusal-lens, no interventions, KV cache",
              "rl-cached-sub": "refusal-lens, ablation hooks, KV cache (subset)",
              "rl-uncached": "refusal-lens, ablation hooks, no KV cache (subset)"}
    for k in jobs:
        print(f"{labels[k]:<52}{n_prompts_of[k]:>8}{sec[k]:>10.1f}{tps[k]:>10.1f}")

    eos = {tok.eos_token_id}
    rl_rows, plain_rows = generated_tokens(results["rl-plain"][1], eos), generated_tokens(results["plain"][1], eos)
    n_diff = sum(a != b for a, b in zip(rl_rows, plain_rows, strict=True))
    same_plain = n_diff == 0
    print(f"check: refusal-lens without interventions == plain greedy tokens (up to the first end token): "
          f"{'yes' if same_plain else f'NO ({n_diff}/{len(prompts)} strings differ)'}")
    if "rl-uncached" in results:
        a, b = results["rl-cached-sub"][1], results["rl-uncached"][1]
        n_bad = sum(x != y for x, y in zip(a, b, strict=True))
        print(f"check: cached == uncached (ablation, {len(a)} prompts), token for token: "
              f"{'yes' if n_bad == 0 else f'NO ({n_bad}/{len(a)} prompts differ)'}")
        print(f"KV cache speedup through refusal-lens (uncached / cached time, same {len(a)} prompts): "
              f"{sec['rl-uncached'] / sec['rl-cached-sub']:.2f}x")
    changed = sum(a != b for a, b in zip(generated_tokens(results["rl-ablate"][1], eos), plain_rows, strict=True))
    print(f"ablation changed {changed}/{len(prompts)} completions; refusal score (substring) plain "
          f"{refusal_score(results['plain'][0]):.2f} -> ablated {refusal_score(results['rl-ablate'][0]):.2f}"
          + (" (too few tokens to judge)" if max_new < 8 else ""))
    print(f"bridge overhead without hooks (refusal-lens / plain throughput): {tps['rl-plain'] / tps['plain']:.2f}x")
    ratio = tps["rl-ablate"] / tps["plain"]
    print(f"goal: refusal-lens under ablation >= 0.8x plain throughput; {'met' if ratio >= 0.8 else 'NOT met'}")
    print(f"refusal-lens (ablation) / plain throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
