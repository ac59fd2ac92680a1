"""Adversarial suffix search (GCG-style, written here) and random-suffix controls.

Greedy Coordinate Gradient (Zou et al. 2023) over a suffix of ``n_tokens`` tokens appended to every
instruction inside the user turn (``instruction + suffix``, the suffix text normally starting with a space):

1. gradient: the loss's gradient with respect to the suffix's one-hot tokens is ``grad(e) @ W_E^T`` where
   ``e`` is the embedding output (``hook_embed``) at the suffix positions and ``W_E`` the input embedding
   matrix (``model.original_model.get_input_embeddings()``); a model that scales its embeddings (Gemma)
   multiplies this by a positive constant, which leaves the per-position top-k unchanged.
2. candidates: ``search_width`` copies of the current suffix, each with one position replaced by one of
   that position's ``topk`` most promising tokens (seeded generator, so runs are deterministic).
3. filter: a candidate survives only if the full chat prompt, re-tokenized from text, gives back exactly
   the template tokens + the instruction's tokens + the candidate's ids, for every prompt; special tokens
   and (by default) non-ASCII, non-printable or blank tokens are never proposed.
4. evaluate every surviving candidate on every prompt (batched) and keep the best (the universal loss is
   the mean over prompts).

Objectives:

* ``"direction"`` (default) -- minimise the projection of the residual stream onto the refusal direction at
  the direction's position (last token by default), at the block input of ``layers`` (default: the
  direction's layer). Only blocks before the deepest layer run (``stop_at_layer``).
* ``"target"`` -- minimise the cross-entropy of a target reply (``"Sure, here is"``) after the template.

The template + instruction prefix is the same for every candidate of a prompt, so its key/value cache is
computed once and reused (``prefix_cache=True``); each candidate then costs only its suffix and the
post-instruction tokens. A step costs, per prompt, one gradient pass and ``search_width`` candidate passes
of those few tokens through the blocks up to the deepest objective layer; the README's suffix section gives
measured times.

Example:
    >>> res = search_suffix(model, harmful[:8], direction=d, n_tokens=16, steps=40, search_width=32)
    >>> res.save("suffix.json"); completions = generate(model, harmful_test, suffix=res.suffix)
    >>> control = random_suffix(model.tokenizer, n_tokens=16, seed=0)
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from refusal_lens.attribution import resid_hook_name
from refusal_lens.directions import Direction
from refusal_lens.errors import DataError, DirectionError, RefusalLensError
from refusal_lens.prompts import ChatFormat, chat_format

FORMAT_VERSION = 1
Objective = Literal["direction", "target"]


class SuffixError(RefusalLensError):
    """A suffix cannot be searched for or applied (wrong tokenizer, too long, does not re-tokenize)."""


# --------------------------------------------------------------------------------------------------
# Tokenizer helpers
# --------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> dict:
    """Vocabulary size and a hash of 64 evenly spaced token strings: identifies a tokenizer cheaply."""
    n = len(tokenizer)
    ids = sorted({round(i * (n - 1) / 63) for i in range(64)}) if n > 1 else [0]
    toks = tokenizer.convert_ids_to_tokens(ids)
    digest = hashlib.sha256("\x00".join(str(t) for t in toks).encode("utf-8")).hexdigest()[:16]
    return {"vocab_size": n, "hash": digest}


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=8)
def _allowed_cached(key: tuple, tokenizer_ref, n_rows: int, allow_non_ascii: bool) -> tuple[Tensor, Tensor]:
    tokenizer = tokenizer_ref()
    n = min(len(tokenizer), n_rows)
    texts = tokenizer.batch_decode(
        [[i] for i in range(n)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    allowed = torch.zeros(n_rows, dtype=torch.bool)
    leading = torch.zeros(n_rows, dtype=torch.bool)
    for i, s in enumerate(texts):
        if i in special or not s.strip() or "\ufffd" in s:
            continue
        if not allow_non_ascii and not (s.isascii() and s.isprintable()):
            continue
        allowed[i] = True
        leading[i] = s.startswith(" ") and len(s) > 1
    return allowed, leading


def allowed_tokens(
    tokenizer, n_rows: int | None = None, allow_non_ascii: bool = False
) -> tuple[Tensor, Tensor]:
    """Boolean masks over embedding rows: tokens GCG may propose, and those starting with a space.

    Excluded: special and added tokens, rows past the tokenizer's vocabulary, tokens that decode to
    whitespace or to an incomplete UTF-8 sequence, and (unless ``allow_non_ascii``) non-ASCII or
    non-printable tokens.
    """
    import weakref

    n_rows = len(tokenizer) if n_rows is None else n_rows
    key = tuple(tokenizer_fingerprint(tokenizer).values())
    return _allowed_cached(key, weakref.ref(tokenizer), n_rows, allow_non_ascii)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class SuffixResult:
    """A suffix found by :func:`search_suffix` (``kind="gcg"``) or drawn by :func:`random_suffix`.

    Attributes:
        suffix: the text to append to an instruction (``instruction + suffix``); usually starts with a space.
        token_ids: its token ids (``len == n_tokens``).
        losses: loss of the current suffix after each step (GCG moves to the step's best candidate).
        initial_loss: loss of the initial suffix; ``best_loss`` the lowest seen (that of ``suffix``).
        seconds: wall time of the search.
        config: search settings (objective, layers, widths, seed, ...).
        tokenizer: :func:`tokenizer_fingerprint` of the tokenizer the ids belong to.
        model_id: model the search ran on (``None`` for a random suffix).
        prompts: instructions the suffix was optimised on.
    """

    suffix: str
    token_ids: list[int]
    losses: list[float] = field(default_factory=list)
    initial_loss: float | None = None
    best_loss: float | None = None
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    tokenizer: dict = field(default_factory=dict)
    model_id: str | None = None
    prompts: list[str] = field(default_factory=list)
    kind: str = "gcg"

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def steps(self) -> int:
        return len(self.losses)

    def check_tokenizer(self, tokenizer) -> None:
        """Raise :class:`SuffixError` unless ``tokenizer`` is the one the token ids belong to."""
        fp = tokenizer_fingerprint(tokenizer)
        if self.tokenizer and self.tokenizer != fp:
            raise SuffixError(
                "This suffix was found for another tokenizer (vocabulary "
                f"{self.tokenizer.get('vocab_size')}, fingerprint {self.tokenizer.get('hash')}); this one "
                f"has vocabulary {fp['vocab_size']}, "
                f"fingerprint {fp['hash']}. Search a suffix for this model with `search_suffix`."
            )
        if any(not 0 <= i < fp["vocab_size"] for i in self.token_ids):
            raise SuffixError(
                "The suffix's token ids are outside this tokenizer's vocabulary; search a new one."
            )

    def text_for(self, tokenizer) -> str:
        """The suffix text after checking the tokenizer (use with ``generate(..., suffix=...)``)."""
        self.check_tokenizer(tokenizer)
        return self.suffix

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write JSON (the suffix, its ids, loss history, settings, tokenizer fingerprint) atomically; an
        existing file is replaced only with ``overwrite``, a symbolic link never."""
        from refusal_lens.io import write_text_atomic

        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> SuffixResult:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SuffixError(f"Cannot read the suffix file {path}: {e}. Re-run the suffix search.") from e
        if not isinstance(d, dict):
            raise SuffixError(f"{path} holds a JSON {type(d).__name__}, not a suffix file written by SuffixResult.save.")
        d.pop("format_version", None)
        try:
            return cls(**d)
        except TypeError as e:
            raise SuffixError(f"{path} is not a suffix file written by SuffixResult.save ({e}).") from e

    def plot(self):
        """Plotly line chart of the loss per step and the running best (:func:`refusal_lens.plots.suffix_losses`)."""
        from refusal_lens.plots import suffix_losses

        return suffix_losses(self)


# --------------------------------------------------------------------------------------------------
# Prompt layout and the objective
# --------------------------------------------------------------------------------------------------


@dataclass
class _Prompt:
    instruction: str
    before: Tensor  # [1, n_before] template prefix + instruction
    after: Tensor  # [1, n_after] post-instruction tokens (+ target)
    n_target: int
    cache: object | None = None  # HF cache of ``before`` (batch 1)


@dataclass
class _Spec:
    objective: str
    vector: Tensor | None
    layers: list[int]
    position: int  # negative offset from the end of the prompt (before any target tokens)
    n_layers: int


def _layout(model, fmt: ChatFormat, instructions: Sequence[str], target_ids: list[int]) -> list[_Prompt]:
    tok = model.tokenizer
    post = list(fmt.post_instruction_ids)
    out = []
    for instr in instructions:
        before = _encode(tok, fmt.prefix + instr)
        out.append(_Prompt(instr, torch.tensor([before]), torch.tensor([post + target_ids]), len(target_ids)))
    return out


def _retokenizes(tokenizer, fmt: ChatFormat, prompts: list[_Prompt], cands: Tensor) -> Tensor:
    """``[B]`` mask: candidate text re-tokenizes to its own ids inside every prompt."""
    texts = tokenizer.batch_decode(
        cands.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    ok = torch.ones(len(texts), dtype=torch.bool)
    post = list(fmt.post_instruction_ids)
    for p in prompts:
        full = [fmt.format(p.instruction + t) for t in texts]
        enc = tokenizer(full, add_special_tokens=False)["input_ids"]
        before = p.before[0].tolist()
        for i, ids in enumerate(enc):
            if ok[i] and ids != before + cands[i].tolist() + post:
                ok[i] = False
    return ok


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers 5.x warns that ``past_key_values`` is deprecated on every cached call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        yield


def _forward_objective(model, prompt: _Prompt, cands: Tensor, spec: _Spec, use_cache: bool) -> Tensor:
    """Per-candidate loss ``[B]`` on one prompt (gradients flow if enabled by the caller)."""
    B = cands.shape[0]
    after = prompt.after.expand(B, -1)
    if use_cache and prompt.cache is not None:
        ids = torch.cat([cands, after], 1)
        cache = copy.deepcopy(prompt.cache)
        if B > 1:
            cache.batch_repeat_interleave(B)
        n_total = prompt.before.shape[1] + ids.shape[1]
        kwargs = {"past_key_values": cache, "attention_mask": torch.ones(B, n_total, dtype=torch.long)}
    else:
        ids = torch.cat([prompt.before.expand(B, -1), cands, after], 1)
        kwargs = {}
    if spec.objective == "target":
        logits = model(ids, **kwargs)
        nt = prompt.n_target
        pred = logits[:, -nt - 1 : -1].float()
        target = ids[:, -nt:]
        return torch.nn.functional.cross_entropy(pred.transpose(1, 2), target, reduction="none").mean(1)
    # direction objective: projection of resid_pre[layer] at the position, mean over layers
    r = spec.vector
    deepest = max(spec.layers)
    grabbed: dict[int, Tensor] = {}

    def grab(layer: int):
        def hook(act, hook):
            grabbed[layer] = act[:, spec.position]
            return act

        return hook

    # plain hooks, not run_with_cache: the cache detaches its activations, and the token gradient of the
    # search flows through them (the last layer is the stop_at_layer output itself)
    hooks = []
    for layer in spec.layers:
        if layer == deepest and layer < spec.n_layers:
            continue
        hooks.append((resid_hook_name(spec.n_layers, layer), grab(layer)))
    stop = deepest if deepest < spec.n_layers else None
    with model.hooks(fwd_hooks=hooks):
        out = model(ids, stop_at_layer=stop, **kwargs)
    if stop is not None:
        grabbed[deepest] = out[:, spec.position]
    return torch.stack([grabbed[layer].float() @ r for layer in spec.layers], 0).mean(0)


def _candidate_losses(
    model, prompts: list[_Prompt], cands: Tensor, spec: _Spec, use_cache: bool, batch_size: int
) -> Tensor:
    """Mean loss over prompts for each candidate, ``[B]``."""
    total = torch.zeros(cands.shape[0])
    with torch.no_grad():
        for p in prompts:
            for i in range(0, cands.shape[0], batch_size):
                total[i : i + batch_size] += _forward_objective(
                    model, p, cands[i : i + batch_size], spec, use_cache
                )
    return total / len(prompts)


def _token_gradient(
    model, prompts: list[_Prompt], cur: Tensor, spec: _Spec, use_cache: bool, W_E: Tensor
) -> tuple[Tensor, float]:
    """``[n_tokens, n_rows]`` gradient of the universal loss w.r.t. one-hot suffix tokens, and the loss."""
    n = cur.shape[1]
    grad_sum = torch.zeros(n, W_E.shape[1])
    loss_sum = 0.0
    for p in prompts:
        start = 0 if (use_cache and p.cache is not None) else p.before.shape[1]
        leaf: dict[str, Tensor] = {}

        def hook(act, hook, start=start, leaf=leaf):
            e = act.detach().clone().requires_grad_(True)
            leaf["e"] = e
            return e

        with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", hook)]):
            loss = _forward_objective(model, p, cur, spec, use_cache)[0]
            (g,) = torch.autograd.grad(loss, leaf["e"])
        grad_sum += g[0, start : start + n].float()
        loss_sum += float(loss.detach())
    grad = grad_sum / len(prompts)
    return grad @ W_E.T, loss_sum / len(prompts)


def _sample_candidates(
    cur: Tensor, token_grad: Tensor, allowed: Tensor, width: int, topk: int, gen: torch.Generator
) -> Tensor:
    """``width`` copies of ``cur`` [1, n] with one position each set to a random top-k token."""
    n = cur.shape[1]
    scores = (-token_grad).masked_fill(~allowed.unsqueeze(0), float("-inf"))
    k = min(topk, int(allowed.sum()))
    top = scores.topk(k, dim=1).indices  # [n, k]
    pos = torch.randperm(n, generator=gen).repeat(width // n + 1)[:width]
    choice = torch.randint(0, k, (width,), generator=gen)
    new = top[pos, choice]
    cands = cur.repeat(width, 1)
    cands[torch.arange(width), pos] = new
    return cands


def _make_spec(model, objective: str, direction: Direction | None, layers, position) -> _Spec:
    n_layers = int(model.cfg.n_layers)
    if objective == "target":
        return _Spec("target", None, [], -1, n_layers)
    if objective != "direction":
        raise SuffixError(f"Unknown objective {objective!r}; use 'direction' or 'target'.")
    if direction is None:
        raise DirectionError(
            "The 'direction' objective needs a Direction (direction=...); or use objective='target'."
        )
    if not isinstance(direction, Direction):
        raise DirectionError(
            "Pass a refusal_lens Direction (it carries its model id and layer), not a raw tensor."
        )
    direction.check_model(model)
    layers = sorted({int(x) for x in (layers if layers is not None else [direction.layer])})
    if not layers or layers[0] < 1 or layers[-1] > n_layers:
        raise SuffixError(
            f"Objective layers must be in 1..{n_layers} (block inputs; {n_layers} = final residual), "
            f"got {layers}."
        )
    position = direction.position if position is None else int(position)
    if position >= 0:
        raise SuffixError(
            f"position is a negative offset from the end of the prompt (-1 = last), got {position}."
        )
    return _Spec("direction", direction.vector.to(torch.float32), layers, position, n_layers)


def _prepare(model, prompts: Sequence[str], fmt: ChatFormat | None, objective: str, target: str):
    if isinstance(prompts, str):
        raise DataError("Pass a list of prompts, not a single string (wrap it: [prompt]).")
    prompts = list(prompts)
    if not prompts:
        raise DataError("The prompt set is empty; pass at least one instruction to optimise the suffix on.")
    fmt = fmt or chat_format(model)
    target_ids = _encode(model.tokenizer, target) if objective == "target" else []
    if objective == "target" and not target_ids:
        raise SuffixError("The target string is empty; pass e.g. target='Sure, here is'.")
    return prompts, fmt, _layout(model, fmt, prompts, target_ids)


def _check_length(model, layout: list[_Prompt], n_tokens: int) -> None:
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    longest = max(p.before.shape[1] + p.after.shape[1] for p in layout) + n_tokens
    if n_ctx and longest > n_ctx:
        raise SuffixError(
            f"The longest prompt with a {n_tokens}-token suffix is {longest} tokens, more than the model's "
            f"context of {n_ctx}. Use a shorter suffix (n_tokens) or shorter prompts."
        )


def _fill_caches(model, layout: list[_Prompt]) -> None:
    from refusal_lens.models import patch_kv_cache

    patch_kv_cache()  # TL 4.3 + transformers 5.x: make attention read the cache it is given
    with torch.no_grad():
        for p in layout:
            _, p.cache = model(p.before, return_type="logits_and_cache")


def _init_ids(
    model, fmt: ChatFormat, layout: list[_Prompt], n_tokens: int, init: str | None, allowed: Tensor
) -> Tensor:
    tok = model.tokenizer
    text = init if init is not None else " !" * n_tokens
    ids = _encode(tok, text)
    if init is None:
        ids = ids[:n_tokens]
    if len(ids) != n_tokens:
        raise SuffixError(f"The initial suffix {text!r} is {len(ids)} tokens, not n_tokens={n_tokens}.")
    cur = torch.tensor([ids])
    if not bool(_retokenizes(tok, fmt, layout, cur)[0]):
        raise SuffixError(
            f"The initial suffix {text!r} does not re-tokenize to the same ids inside the chat prompts (it "
            "merges with the instruction or the template). Pass init= a text starting with a space, e.g. "
            "' x x x'."
        )
    return cur


def search_suffix(
    model,
    prompts: Sequence[str],
    *,
    direction: Direction | None = None,
    objective: Objective = "direction",
    n_tokens: int = 20,
    steps: int = 50,
    search_width: int = 64,
    topk: int = 64,
    batch_size: int = 64,
    layers: Sequence[int] | None = None,
    position: int | None = None,
    target: str = "Sure, here is",
    init: str | None = None,
    seed: int = 0,
    prefix_cache: bool = True,
    allow_non_ascii: bool = False,
    max_seconds: float | None = None,
    fmt: ChatFormat | None = None,
    progress: bool = True,
    on_step: Callable[[int, SuffixResult], bool | None] | None = None,
) -> SuffixResult:
    """Search a universal adversarial suffix with greedy coordinate gradient.

    Args:
        prompts: instructions the suffix must work on (the loss is their mean).
        direction: the refusal direction (``objective="direction"``); checked against the model.
        objective: ``"direction"`` (minimise the projection onto the direction) or ``"target"`` (cross-
            entropy of ``target`` as the start of the reply).
        n_tokens: suffix length in tokens.
        steps: GCG iterations (``max_seconds`` may stop earlier).
        search_width: candidates per step; ``topk``: tokens considered per position.
        batch_size: candidates per forward pass.
        layers: block inputs for the direction objective (default ``[direction.layer]``).
        position: token position for the direction objective (default ``direction.position``).
        init: initial suffix text (default ``" !"`` repeated, truncated to ``n_tokens`` tokens).
        seed: seeds candidate sampling; same seed, same model, same prompts -> same suffix.
        prefix_cache: reuse the template + instruction key/value cache (same numbers, faster).
        max_seconds: stop after the step that crosses this wall-time budget.
        on_step: called after every step with ``(step, result_so_far)`` (e.g. to checkpoint); returning
            ``True`` stops the search (e.g. on a CPU-time budget).

    Raises:
        DataError: empty prompt list. DirectionError: missing direction, or one from another model.
        SuffixError: suffix longer than the context, bad layers/position, an initial suffix that does not
            re-tokenize.
    """
    from refusal_lens.models import model_id

    if n_tokens < 1:
        raise SuffixError(f"n_tokens must be >= 1, got {n_tokens}.")
    if search_width < 1 or topk < 1 or batch_size < 1:
        raise SuffixError("search_width, topk and batch_size must be >= 1.")
    spec = _make_spec(model, objective, direction, layers, position)
    prompts, fmt, layout = _prepare(model, prompts, fmt, objective, target)
    _check_length(model, layout, n_tokens)
    if spec.objective == "direction" and -spec.position > fmt.n_post:
        raise SuffixError(
            f"position {spec.position} is not a post-instruction position (the template has {fmt.n_post}: "
            f"{fmt.positions}); the objective is read after the suffix."
        )
    tok = model.tokenizer
    W_E = model.original_model.get_input_embeddings().weight.detach().to(torch.float32)
    allowed, _ = allowed_tokens(tok, W_E.shape[0], allow_non_ascii)
    if int(allowed.sum()) == 0:
        raise SuffixError("No token of this tokenizer is allowed in a suffix; pass allow_non_ascii=True.")
    cur = _init_ids(model, fmt, layout, n_tokens, init, allowed)
    config = {
        "objective": objective,
        "n_tokens": n_tokens,
        "steps": steps,
        "search_width": search_width,
        "topk": topk,
        "layers": spec.layers,
        "position": spec.position,
        "target": target if objective == "target" else None,
        "seed": seed,
        "prefix_cache": prefix_cache,
        "allow_non_ascii": allow_non_ascii,
        "n_prompts": len(prompts),
        "direction_layer": getattr(direction, "layer", None),
        "direction_position": getattr(direction, "position", None),
    }
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    try:
        with _quiet():
            if prefix_cache:
                _fill_caches(model, layout)
            initial = float(_candidate_losses(model, layout, cur, spec, prefix_cache, batch_size)[0])
            result = SuffixResult(
                suffix=_decode(tok, cur[0].tolist()),
                token_ids=cur[0].tolist(),
                initial_loss=initial,
                best_loss=initial,
                config=config,
                tokenizer=tokenizer_fingerprint(tok),
                model_id=model_id(model),
                prompts=prompts,
            )
            best_loss = initial
            bar = tqdm(range(steps), desc=f"GCG ({objective})", disable=not progress)
            for step in bar:
                token_grad, _ = _token_gradient(model, layout, cur, spec, prefix_cache, W_E)
                cands = None
                for _attempt in range(5):
                    sampled = torch.unique(
                        _sample_candidates(cur, token_grad, allowed, search_width, topk, gen), dim=0
                    )
                    keep = _retokenizes(tok, fmt, layout, sampled)
                    if keep.any():
                        cands = sampled[keep]
                        break
                if cands is None:  # nothing survived the filter: keep the suffix, record the step
                    result.losses.append(result.losses[-1] if result.losses else initial)
                    continue
                losses = _candidate_losses(model, layout, cands, spec, prefix_cache, batch_size)
                i = int(losses.argmin())
                cur = cands[i : i + 1].clone()
                loss = float(losses[i])
                result.losses.append(loss)
                if loss < best_loss:
                    best_loss = loss
                    result.token_ids = cur[0].tolist()
                    result.suffix = _decode(tok, result.token_ids)
                    result.best_loss = best_loss
                result.seconds = time.perf_counter() - t0
                result.config["steps_done"] = len(result.losses)
                bar.set_postfix(loss=f"{loss:.3f}", best=f"{best_loss:.3f}", kept=int(cands.shape[0]))
                if on_step is not None and on_step(step, result):
                    break
                if max_seconds is not None and result.seconds > max_seconds:
                    break
            bar.close()
    finally:
        for p in layout:
            p.cache = None
    result.config["steps_done"] = len(result.losses)
    result.seconds = time.perf_counter() - t0
    return result


def suffix_losses(
    model,
    prompts: Sequence[str],
    suffix: SuffixResult | Sequence[int],
    *,
    direction: Direction | None = None,
    objective: Objective = "direction",
    layers: Sequence[int] | None = None,
    position: int | None = None,
    target: str = "Sure, here is",
    fmt: ChatFormat | None = None,
    batch_size: int = 16,
) -> Tensor:
    """Per-prompt loss ``[n_prompts]`` of a suffix under an objective (same definition as the search).

    ``suffix`` may be a :class:`SuffixResult` (its tokenizer is checked) or a list of token ids; an
    empty id list measures the prompts without a suffix.
    """
    if isinstance(suffix, SuffixResult):
        suffix.check_tokenizer(model.tokenizer)
        ids = list(suffix.token_ids)
    else:
        ids = list(suffix)
    spec = _make_spec(model, objective, direction, layers, position)
    prompts, fmt, layout = _prepare(model, prompts, fmt, objective, target)
    _check_length(model, layout, len(ids))
    cand = torch.tensor([ids], dtype=torch.long).reshape(1, len(ids))
    with _quiet(), torch.no_grad():
        return torch.stack([_forward_objective(model, p, cand, spec, False)[0] for p in layout])


def random_suffix(
    tokenizer,
    n_tokens: int,
    seed: int = 0,
    *,
    allow_non_ascii: bool = False,
    probe: str = "Tell me a story.",
    max_tries: int = 200,
) -> SuffixResult:
    """A control suffix of ``n_tokens`` random allowed tokens (first token starts with a space).

    The draw is repeated until the text re-tokenizes to the same ids, alone and after ``probe`` inside the
    tokenizer's chat template (when it has one).
    """
    if n_tokens < 1:
        raise SuffixError(f"n_tokens must be >= 1, got {n_tokens}.")
    allowed, leading = allowed_tokens(tokenizer, None, allow_non_ascii)
    pool = allowed.nonzero().flatten()
    first_pool = (allowed & leading).nonzero().flatten()
    if len(first_pool) == 0:
        first_pool = pool
    if len(pool) == 0:
        raise SuffixError("No token of this tokenizer is allowed in a suffix; pass allow_non_ascii=True.")
    try:
        fmt = ChatFormat.from_tokenizer(tokenizer)
    except RefusalLensError:
        fmt = None
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_tries):
        ids = [int(first_pool[torch.randint(len(first_pool), (1,), generator=gen)])]
        ids += pool[torch.randint(len(pool), (n_tokens - 1,), generator=gen)].tolist()
        text = _decode(tokenizer, ids)
        if _encode(tokenizer, text) != ids:
            continue
        if fmt is not None:
            full = _encode(tokenizer, fmt.format(probe + text))
            if full != _encode(tokenizer, fmt.prefix + probe) + ids + list(fmt.post_instruction_ids):
                continue
        return SuffixResult(
            suffix=text,
            token_ids=ids,
            config={"kind": "random", "seed": seed, "n_tokens": n_tokens},
            tokenizer=tokenizer_fingerprint(tokenizer),
            kind="random",
        )
    raise SuffixError(
        f"Could not draw a random {n_tokens}-token suffix that re-tokenizes in {max_tries} tries; "
        "use fewer tokens."
    )
