"""Shared by the benchmark scripts: a description of the machine and software they ran on, and the
bridge loaded beside a plain ``transformers`` copy of the same weights.

The scripts run as ``python scripts/bench_*.py``, which puts ``scripts/`` on ``sys.path``.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
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


def load_bridge_and_plain(plain_attn: str = "eager", *, device: str | None = None, dtype: str | None = None):
    """The embedded model twice: the refusal-lens bridge, and plain ``AutoModelForCausalLM`` on its own copy
    of the cached weights (``plain_attn`` attention), with its tokenizer padding on the left. ``device`` and
    ``dtype`` are :func:`refusal_lens.models.load_model`'s (default: cuda when available, else cpu; bf16 on a
    GPU, fp32 on a CPU); both copies get the same.

    Returns:
        ``(bridge, hf_model, tokenizer)``; prints how long loading took.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refusal_lens.models import embedded_model_folder, load_model, resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    folder = embedded_model_folder(dtype=dt)
    t0 = time.perf_counter()
    model = load_model(device=dev, dtype=dt)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, attn_implementation=plain_attn).to(dev).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    print(f"loaded the bridge and the plain model ({dev}, {dt}) in {time.perf_counter() - t0:.1f} s", flush=True)
    return model, hf, tok


def sync() -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it (a no-op on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------
# Peak and FLOP accounting
# --------------------------------------------------------------------------------------------------


def generated_tokens(new: torch.Tensor | list[list[int]], eos_ids: set[int]) -> list[list[int]]:
    """Each row's new tokens up to and including its first end token (the padding or tokens after it dropped)."""
    rows = []
    for row in (new.tolist() if isinstance(new, torch.Tensor) else new):
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        rows.append(row[:cut])
    return rows


def matmul_peak(n: int | None = None, repeats: int = 5, *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> float:
    """This process's matmul peak in FLOP/s for ``dtype`` on ``device``: the best of ``repeats`` timed
    ``[n, n] @ [n, n]`` (2 n^3 FLOPs each, after one untimed warm-up), with torch's current thread count.
    ``n`` defaults to 2048 on a CPU and 8192 on a GPU (a 2048^3 product cannot fill a GPU)."""
    device = torch.device(device)
    n = n or (2048 if device.type == "cpu" else 8192)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


@torch.no_grad()
def linear_rate(hf_model, rows: int = 256, repeats: int = 3) -> float:
    """FLOP/s of the model's own matrices: every decoder layer's 2-D weights and the unembedding, each applied
    (``F.linear``) to ``[rows, in]`` random inputs in the model's order, the best of ``repeats`` timed passes
    after an untimed one. The rate a run could reach if it did nothing but its matrix products at this width:
    the useful FLOPs of a run divided by it is a floor on the run's time, read on the same machine state."""
    mats = [p for layer in hf_model.model.layers for p in layer.parameters() if p.ndim == 2]
    mats.append(hf_model.get_output_embeddings().weight)
    inputs = {n: torch.randn(rows, n, device=mats[0].device, dtype=mats[0].dtype) for n in {w.shape[1] for w in mats}}
    flops = 2.0 * rows * sum(w.numel() for w in mats)

    def one_pass():
        for w in mats:
            torch.nn.functional.linear(inputs[w.shape[1]], w)
        sync()

    one_pass()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        one_pass()
        best = min(best, time.perf_counter() - t0)
    return flops / best


@dataclass
class PhaseCount:
    """Work counted in one phase (see :class:`FlopCounter`).

    Attributes:
        forwards: forward passes of the HF model inside the bridge (a generation step is one).
        sequences: rows of those forwards that fed at least one real token.
        token_layers: real (non-padding) tokens x decoder layers they went through.
        grad_token_layers: the part of ``token_layers`` run with autograd on (a backward follows).
        pairs: real (query, key) pairs of causal attention, summed over the layers run.
        fed_token_layers: every fed position x layers run, padding included (what the hardware did).
        fed_pairs: every (query, key) slot attention computed, padding included.
        logit_rows: rows the unembedding computed.
        needed_logit_rows: rows that are needed: one per sequence per forward that reaches the unembedding
            (the next token's distribution; forwards stopped early need none), or, inside completion scoring,
            one per completion token.
        seconds: wall time of the phase.
    """

    forwards: int = 0
    sequences: int = 0
    token_layers: int = 0
    grad_token_layers: int = 0
    pairs: int = 0
    fed_token_layers: int = 0
    fed_pairs: int = 0
    logit_rows: int = 0
    needed_logit_rows: int = 0
    seconds: float = 0.0


@dataclass
class ModelShape:
    """What a FLOP count needs of a model: parameters of one decoder layer's matrices, attention width,
    and the unembedding's size."""

    n_layers: int
    layer_params: int
    attn_width: int
    d_model: int
    d_vocab: int

    @classmethod
    def of(cls, hf_model) -> ModelShape:
        """From a ``transformers`` causal LM (for a bridge: ``model.original_model``): the 2-D weights of its
        first decoder layer (norm gains and biases left out), query heads x head width, hidden size, vocab."""
        cfg = hf_model.config
        seen = {id(p): p.numel() for p in hf_model.model.layers[0].parameters() if p.ndim == 2}
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        return cls(int(cfg.num_hidden_layers), sum(seen.values()), heads * head_dim, int(cfg.hidden_size),
                   int(cfg.vocab_size))

    def useful_flops(self, c: PhaseCount) -> float:
        """Real tokens x 2 x layer parameters (twice for tokens a backward pass follows: input gradients cost
        about a forward), + 4 x attention width per real (query, key) pair, + 2 x d_model x vocab per needed
        logit row."""
        return (2.0 * self.layer_params * (c.token_layers + c.grad_token_layers) + 4.0 * self.attn_width * c.pairs
                + 2.0 * self.d_model * self.d_vocab * c.needed_logit_rows)

    def computed_flops(self, c: PhaseCount) -> float:
        """The same count over what was computed: padding, and every logit row the unembedding produced."""
        return (2.0 * self.layer_params * (c.fed_token_layers + c.grad_token_layers) + 4.0 * self.attn_width * c.fed_pairs
                + 2.0 * self.d_model * self.d_vocab * c.logit_rows)


class FlopCounter:
    """Counts tokens, attention pairs and logit rows of every forward of a ``transformers`` causal LM, per
    phase, with torch forward pre-hooks (on a bridge, hook the HF model inside it, ``model.original_model``,
    which every bridge forward and ``hf_generate`` step goes through): the top module sees each
    forward's ``input_ids`` and ``attention_mask`` (a generation step feeds one position against the whole
    mask), each decoder layer counts the forward's tokens once it has run (so forwards stopped early by
    TransformerLens's ``stop_at_layer`` count only the layers they completed), and the unembedding counts
    the rows it computes. A token is real when its mask is 1 and it is not the pad token (finished
    sequences keep being fed pad tokens during generation).

    Use as a context manager; :meth:`phase` switches the phase the counts go to; :meth:`scoring` marks a
    block whose logits are all needed (``needed_rows`` of them, e.g. completion tokens for CE).
    """

    def __init__(self, hf_model, pad_id: int | None):
        self.hf = hf_model
        self.pad_id = pad_id
        self.counts: dict[str, PhaseCount] = {}
        self.current = "other"
        self._fwd: dict = {}
        self._scoring = False
        self._handles: list = []
        self._phase_start = time.perf_counter()

    def __enter__(self) -> FlopCounter:
        om = self.hf
        self._handles.append(om.register_forward_pre_hook(self._top, with_kwargs=True))
        for layer in om.model.layers:
            self._handles.append(layer.register_forward_hook(self._layer))  # after it ran (stop_at_layer stops early)
        self._handles.append(om.lm_head.register_forward_pre_hook(self._unembed))
        self._phase_start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._close_phase()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def count(self, name: str | None = None) -> PhaseCount:
        return self.counts.setdefault(name or self.current, PhaseCount())

    def _close_phase(self) -> None:
        sync()
        now = time.perf_counter()
        self.count().seconds += now - self._phase_start
        self._phase_start = now

    def phase(self, name: str) -> None:
        """From now on, counts and wall time go to phase ``name``."""
        self._close_phase()
        self.current = name

    @contextmanager
    def scoring(self):
        """Inside this block, needed logit rows are not counted per forward: add them with :meth:`add_needed_rows`."""
        self._scoring = True
        try:
            yield
        finally:
            self._scoring = False

    def add_needed_rows(self, n: int) -> None:
        self.count().needed_logit_rows += int(n)

    def _top(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:  # inputs_embeds only: every position counts as real
            emb = kwargs["inputs_embeds"]
            ids = torch.zeros(emb.shape[:2], dtype=torch.long)
        mask = kwargs.get("attention_mask")
        b, s = ids.shape
        mask = torch.ones(b, s, dtype=torch.long) if mask is None else mask.to("cpu").long()
        new = mask[:, -s:].clone()
        if self.pad_id is not None:
            new &= (ids.to("cpu") != self.pad_id).long()
        keys = mask.cumsum(-1)[:, -s:]  # real keys each query sees (causal, cache included)
        total = mask.shape[1]
        self._fwd = {"tokens": int(new.sum()), "pairs": int((keys * new).sum()), "fed": b * s,
                     # every query position against every key up to it (eager attention does not skip padding)
                     "fed_pairs": b * (s * (total - s) + s * (s + 1) // 2), "grad": torch.is_grad_enabled()}
        c = self.count()
        c.forwards += 1
        self._fwd["live"] = int((new[:, -1] > 0).sum())
        c.sequences += self._fwd["live"]

    def _layer(self, module, args, output) -> None:
        c, f = self.count(), self._fwd
        c.token_layers += f["tokens"]
        c.pairs += f["pairs"]
        c.fed_token_layers += f["fed"]
        c.fed_pairs += f["fed_pairs"]
        if f["grad"]:
            c.grad_token_layers += f["tokens"]

    def _unembed(self, module, args) -> None:
        c = self.count()
        c.logit_rows += int(args[0].shape[:-1].numel())
        if not self._scoring:  # a forward that reaches the unembedding needs each live sequence's next token
            c.needed_logit_rows += self._fwd.get("live", 0)
