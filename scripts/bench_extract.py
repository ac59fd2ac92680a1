"""Benchmark candidate extraction through refusal-lens against plain transformers + PyTorch hooks.

Both sides compute the same thing on the embedded Qwen2.5-Coder-0.5B-Instruct (fp32): the mean block
input of every layer at every post-instruction position, over harmful and harmless train prompts.

* ``refusal-lens`` -- :func:`refusal_lens.directions.candidate_directions` (two calls of
  :func:`refusal_lens.activations.mean_activations` on the ``TransformerBridge``);
* ``plain``        -- ``AutoModelForCausalLM`` from :func:`refusal_lens.models.embedded_model_folder`
  (eager attention, like the bridge), the chat template applied with the tokenizer, left padding,
  ``add_special_tokens=False``, explicit ``position_ids`` from the attention mask (cumsum - 1, clamped:
  transformers 5.x does not derive them from the mask in a plain forward), and a forward pre-hook on
  every decoder layer that sums its input hidden states (layer 0's input is the embedding output).

refusal-lens stops the forward at the last needed block input (layer L-1's input, so block L-1, the
final norm and the unembedding never run). The plain baseline is given the same early stop (its
pre-hook on layer L-1 raises), so both do the same arithmetic; ``register_forward_hook`` would see the
same inputs but only after each layer ran, too late to stop. Same prompts, same batches, float64 sums.

Timing: medians of ``--repeats`` interleaved runs (A/B, then B/A, ...) after one untimed warm-up of each.
Throughput counts padded tokens (the forward computes padding too); both sides see identical batches.
Achieved FLOP/s counts ``2 x (weights of the decoder blocks that run) x padded tokens``, against the
machine's measured fp32 matmul rate (a 2048^3 ``torch.matmul``, median of repeats): the physical limit.
The last line is ``refusal-lens / plain throughput: N.NNx`` (goal >= 0.9x).

Usage::

    .venv/bin/python scripts/bench_extract.py [--quick] [--repeats 3] [--n-prompts 64] [--batch-size 16]

Not a test: the default takes a few minutes on 2 cores; ``--quick`` checks that the script works.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _bench import load_bridge_and_plain, machine_info


def matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    """Measured fp32 matmul rate (FLOP/s): median over ``repeats`` of an ``n x n @ n x n`` product."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


# --------------------------------------------------------------------------------------------------
# The two implementations
# --------------------------------------------------------------------------------------------------


def refusal_lens_means(model, harmful, harmless, batch_size: int):
    """(harmful mean, harmless mean), each ``[layer, pos, d_model]``, through refusal-lens."""
    from refusal_lens.directions import candidate_directions

    c = candidate_directions(model, harmful, harmless, batch_size=batch_size, progress=False)
    return c.harmful_mean, c.harmless_mean


class _Stop(Exception):
    pass


def plain_tokenize(tok, instructions):
    texts = [tok.apply_chat_template([{"role": "user", "content": x}], tokenize=False, add_generation_prompt=True)
             for x in instructions]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def plain_mean(hf, tok, instructions, positions: list[int], batch_size: int) -> torch.Tensor:
    """Mean input of every decoder layer at ``positions``, ``[layer, pos, d_model]`` float64."""
    layers = hf.model.layers
    n_layers, last = len(layers), len(layers) - 1
    total = torch.zeros(n_layers, len(positions), hf.config.hidden_size, dtype=torch.float64)
    pos_index = torch.tensor(positions)

    def make_hook(i: int):
        def pre_hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            total[i] += h[:, pos_index, :].to(torch.float64).sum(0)
            if i == last:  # everything needed is collected: the last block, norm and lm_head never run
                raise _Stop

        return pre_hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for start in range(0, len(instructions), batch_size):
            ids, mask = plain_tokenize(tok, instructions[start : start + batch_size])
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
            try:
                hf.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return total / len(instructions)


def plain_means(hf, tok, harmful, harmless, positions, batch_size: int):
    return (plain_mean(hf, tok, harmful, positions, batch_size),
            plain_mean(hf, tok, harmless, positions, batch_size))


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (< 1 minute): checks that the script works")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved timed repeats (default 3; quick 2)")
    ap.add_argument("--n-prompts", type=int, default=None, help="harmful and as many harmless prompts (default 64)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 16 (quick 2)")
    ap.add_argument("--matmul-n", type=int, default=2048, help="size of the peak-FLOP/s matmul (default 2048)")
    ap.add_argument("--plain-attn", default="eager", choices=["eager", "sdpa"],
                    help="attention of the plain model (default eager, as the bridge forces)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args()
    repeats = args.repeats or (2 if args.quick else 3)
    n_prompts = args.n_prompts or (2 if args.quick else 64)
    batch_size = args.batch_size or (2 if args.quick else 16)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from refusal_lens.data import load_builtin
    from refusal_lens.prompts import ChatFormat

    print(machine_info(), flush=True)
    peak = matmul_flops(args.matmul_n, 3 if args.quick else 10)
    print(f"fp32 matmul peak: {peak / 1e9:.0f} GFLOP/s ({args.matmul_n}^3 torch.matmul, median)", flush=True)

    model, hf, tok = load_bridge_and_plain(args.plain_attn)

    harmful = load_builtin("harmful", "train")[:n_prompts]
    harmless = load_builtin("harmless", "train")[:n_prompts]
    positions = ChatFormat.from_tokenizer(model.tokenizer).positions
    n_layers = len(hf.model.layers)

    # the workload: identical batches on both sides
    padded = real = n_batches = 0
    for prompts in (harmful, harmless):
        for s in range(0, len(prompts), batch_size):
            ids, mask = plain_tokenize(tok, prompts[s : s + batch_size])
            padded, real, n_batches = padded + ids.numel(), real + int(mask.sum()), n_batches + 1
    run_params = sum(p.numel() for layer in hf.model.layers[: n_layers - 1] for p in layer.parameters())
    all_params = sum(p.numel() for layer in hf.model.layers for p in layer.parameters())
    all_params += sum(p.numel() for p in hf.model.norm.parameters())
    flops = 2 * run_params * padded
    print(f"workload: {len(harmful)} harmful + {len(harmless)} harmless train prompts, batch {batch_size}, "
          f"{n_layers} layers x {len(positions)} positions; {n_batches} batches, {padded:,} padded tokens "
          f"({real:,} real, {1 - real / padded:.0%} padding); fp32; plain attention {args.plain_attn}")
    print(f"both stop at layer {n_layers - 1}'s input: blocks 0-{n_layers - 2} run, no final norm or unembedding",
          flush=True)

    jobs = {
        "refusal-lens": lambda: refusal_lens_means(model, harmful, harmless, batch_size),
        "plain": lambda: plain_means(hf, tok, harmful, harmless, positions, batch_size),
    }
    # warm-up (untimed), and the numerical check
    means = {name: job() for name, job in jobs.items()}
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for r in range(repeats):
        order = list(jobs) if r % 2 == 0 else list(reversed(jobs))
        for name in order:
            t0 = time.perf_counter()
            jobs[name]()
            times[name].append(time.perf_counter() - t0)
        print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)

    (rl_h, rl_hl), (pl_h, pl_hl) = means["refusal-lens"], means["plain"]
    diff_h = float((rl_h.double() - pl_h).abs().max())
    diff_hl = float((rl_hl.double() - pl_hl).abs().max())
    diff_d = float(((rl_h.double() - rl_hl.double()) - (pl_h - pl_hl)).abs().max())
    scale = float(pl_h.abs().max())

    sec = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: padded / s for k, s in sec.items()}
    print(f"\nmedians of {repeats} interleaved repeats")
    print(f"{'':<28}{'refusal-lens':>14}{'plain':>14}")
    print(f"{'seconds':<28}{sec['refusal-lens']:>14.2f}{sec['plain']:>14.2f}")
    print(f"{'tokens/s (padded)':<28}{tps['refusal-lens']:>14.0f}{tps['plain']:>14.0f}")
    print(f"{'tokens/s (real)':<28}{real / sec['refusal-lens']:>14.0f}{real / sec['plain']:>14.0f}")
    print(f"{'achieved GFLOP/s':<28}{flops / sec['refusal-lens'] / 1e9:>14.0f}{flops / sec['plain'] / 1e9:>14.0f}")
    print(f"{'share of matmul peak':<28}{flops / sec['refusal-lens'] / peak:>14.0%}{flops / sec['plain'] / peak:>14.0%}")
    print(f"FLOPs counted: 2 x {run_params / 1e6:.1f} M weights (the {n_layers - 1} decoder blocks that run; "
          f"all {n_layers} blocks + final norm = {all_params / 1e6:.1f} M non-embedding; embedding and lm_head "
          f"excluded) x {padded:,} padded tokens = {flops / 1e12:.2f} TFLOP; attention scores (~4 x seq x d_model "
          "per token and layer, < 1 % here), norms and activations are not counted")
    print(f"physical limit: fp32 matmul {peak / 1e9:.0f} GFLOP/s = {peak / (2 * run_params):.0f} tokens/s at this "
          "FLOP count")
    print(f"same means: max |diff| harmful {diff_h:.2e}, harmless {diff_hl:.2e}, diff-in-means {diff_d:.2e} "
          f"(largest |mean| {scale:.1f}; refusal-lens stores the means as fp32)")
    print(f"goal: refusal-lens >= 0.9x plain throughput; "
          f"{'met' if tps['refusal-lens'] / tps['plain'] >= 0.9 else 'NOT met'}")
    print(f"refusal-lens / plain throughput: {tps['refusal-lens'] / tps['plain']:.2f}x")


if __name__ == "__main__":
    main()
