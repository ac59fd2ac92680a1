"""Interventions on the residual stream: one kind of object, built on TransformerLens hooks.

An :class:`Intervention` is a set of TransformerLens forward hooks bound to a model. It is a
re-enterable context manager (the hooks are attached on entry and removed on exit, also on error), and
it is what :func:`generate`, :func:`refusal_lens.evaluate.last_logits`, selection and evaluation accept.

* :class:`Ablation` -- directional ablation ``x <- x - r r^T x`` (or of a k-dimensional subspace,
  ``x <- x - B^T B x``) at every layer's block input, middle (after attention) and output (after the
  MLP), at every position (paper section 2.4).
* :class:`Addition` -- activation addition ``x <- x + c * v`` at one layer's block input, every position,
  where ``v`` is the un-normalised diff-in-means vector (paper section 2.4); a negative ``c`` subtracts.
* :class:`RowSwitch` -- several conditions in one batch: each row runs under its own group's
  interventions (:func:`complete_each` generates many conditions in one call with it).

A :class:`~refusal_lens.directions.Direction` makes them for you::

    with direction.ablate(model):
        logits = model(tokens)
    with direction.add(model, coeff=1.0):
        completions = generate(model, harmless)
    completions = generate(model, harmful, interventions=[direction.ablate(model)])

Interventions compose by nesting ``with`` blocks or by passing several to ``generate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.utilities import get_act_name

from refusal_lens.decoding import greedy
from refusal_lens.errors import RefusalLensError
from refusal_lens.models import patch_kv_cache
from refusal_lens.prefix import PrefixMemo
from refusal_lens.prompts import ChatFormat, batches, chat_format

Hook = tuple[str, Callable]

RESID_POINTS = ("resid_pre", "resid_mid", "resid_post")


def resid_hook_names(n_layers: int, points: Sequence[str] = RESID_POINTS) -> list[str]:
    """TransformerLens names of ``points`` at every block, in forward order."""
    return [get_act_name(p, layer) for layer in range(n_layers) for p in points]


class _OnDevice:
    """A tensor copied once to each (device, dtype) an activation asks for, then reused."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor
        self._copies: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def like(self, act: Tensor) -> Tensor:
        key = (act.device, act.dtype)
        t = self._copies.get(key)
        if t is None:
            t = self._copies[key] = self.tensor.to(device=act.device, dtype=act.dtype)
        return t


class Intervention:
    """Forward hooks on ``model`` as a re-enterable context manager.

    Subclasses implement :meth:`fwd_hooks`. ``with iv:`` attaches them through TransformerLens's own
    ``model.hooks(...)``; every entry attaches a fresh set, so one object can be entered many times
    (and nested).
    """

    def __init__(self, model):
        self.model = model
        self._active: list = []

    def fwd_hooks(self) -> list[Hook]:
        """``(hook name, hook function)`` pairs, in TransformerLens's ``fwd_hooks`` format."""
        raise NotImplementedError

    def __enter__(self):
        cm = self.model.hooks(fwd_hooks=self.fwd_hooks())
        cm.__enter__()
        self._active.append(cm)
        return self.model

    def __exit__(self, *exc) -> bool | None:
        return self._active.pop().__exit__(*exc)


class Ablation(Intervention):
    """Project a direction (or a subspace) out of the residual stream at every layer and position.

    Args:
        model: the bridge.
        basis: ``[d_model]`` direction (normalised here) or ``[k, d_model]`` spanning vectors
            (made orthonormal here, by QR).
        points: residual-stream hook points per block (default: block input, middle and output).

    Example:
        >>> with Ablation(model, torch.stack([d1.vector, d2.vector])):   # a 2-dimensional subspace
        ...     logits = model(tokens)
    """

    def __init__(self, model, basis: Float[Tensor, "*k d_model"], points: Sequence[str] = RESID_POINTS):
        super().__init__(model)
        b = basis.detach().to(torch.float32)
        if b.ndim == 1:
            b = (b / b.norm()).unsqueeze(0)
        elif b.shape[0] > 1:
            b = torch.linalg.qr(b.T.double()).Q.T.to(torch.float32)
        else:
            b = b / b.norm()
        if b.shape[-1] != int(model.cfg.d_model):
            raise RefusalLensError(f"Ablation basis has width {b.shape[-1]}, the model's d_model is "
                                   f"{model.cfg.d_model}: it belongs to another model.")
        self.basis: Float[Tensor, "k d_model"] = b
        self.points = tuple(points)
        self._basis = _OnDevice(b)
        self._rank1 = _OnDevice(b[0])

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    def _hook(self, act, hook):
        if self.rank == 1:  # the rank-1 formula, kept bit for bit for the paper's single direction
            r = self._rank1.like(act)
            return act - (act @ r).unsqueeze(-1) * r
        b = self._basis.like(act)
        return act - (act @ b.T) @ b

    def fwd_hooks(self) -> list[Hook]:
        return [(name, self._hook) for name in resid_hook_names(self.model.cfg.n_layers, self.points)]


class Addition(Intervention):
    """Add ``coeff * vector`` (as given, not normalised) at block ``layer``'s input, every position."""

    def __init__(self, model, vector: Float[Tensor, " d_model"], layer: int, coeff: float = 1.0):
        super().__init__(model)
        self.layer, self.coeff = int(layer), float(coeff)
        self._v = _OnDevice(vector.detach().flatten().to(torch.float32) * coeff)

    def _hook(self, act, hook):
        return act + self._v.like(act)

    def fwd_hooks(self) -> list[Hook]:
        return [(get_act_name("resid_pre", self.layer), self._hook)]


class RowSwitch(Intervention):
    """Several conditions in one batch: row ``i`` runs under the interventions of group ``rows[i]``.

    Each condition generated in its own call decodes small batches one after another; one batch over all the
    conditions runs wider matrix products and fewer decode steps. At each hook point a group's hooks see only
    that group's rows (gathered, hooked in the order given, written back); rows of a group without hooks there
    pass unchanged. A group that fills the whole batch is hooked as its interventions alone would hook it.

    Args:
        model: the bridge.
        groups: per group, its interventions (an :class:`Intervention`, several, or none: ``[]``).

    ``rows`` (``[batch]`` group ids on the model's device) must be set before each forward; whoever changes
    the batch updates it: :func:`complete_each` per batch, :func:`refusal_lens.decoding.greedy` as rows leave
    it, :class:`refusal_lens.prefix.SharedPrefix` while it runs each group's prefix.

    Example:
        >>> switch = RowSwitch(model, [[], [direction.ablate(model)]])
        >>> switch.rows = torch.tensor([0, 1, 1])        # row 0 as the base model, rows 1-2 ablated
        >>> with switch:
        ...     logits = model(tokens)                      # tokens: [3, seq]
    """

    def __init__(self, model, groups: Sequence[Intervention | Sequence[Intervention] | None]):
        super().__init__(model)
        self.groups = [as_interventions(g) for g in groups]
        self._rows: Tensor | None = None
        self._index: dict[int, Tensor] = {}

    @property
    def rows(self) -> Int[Tensor, " batch"] | None:
        """Group id of each row of the batch that runs next."""
        return self._rows

    @rows.setter
    def rows(self, rows: Int[Tensor, " batch"] | Sequence[int] | None) -> None:
        if rows is None:
            self._rows, self._index = None, {}
            return
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.ndim != 1 or (rows.numel() and not 0 <= int(rows.min()) <= int(rows.max()) < len(self.groups)):
            raise RefusalLensError(f"RowSwitch rows must be group ids in [0, {len(self.groups)}), one per row.")
        self._rows = rows
        self._index = {g: (rows == g).nonzero()[:, 0] for g in rows.unique().tolist()}

    @contextmanager
    def rows_as(self, rows: Int[Tensor, " batch"] | Sequence[int]) -> Iterator[None]:
        """Set :attr:`rows` for the block, then put the previous rows back."""
        before = self._rows
        self.rows = rows
        try:
            yield
        finally:
            self.rows = before

    def fwd_hooks(self) -> list[Hook]:
        by_name: dict[str, dict[int, list[Callable]]] = {}  # hook point -> group -> its hooks there, in order
        for g, ivs in enumerate(self.groups):
            for iv in ivs:
                for name, fn in iv.fwd_hooks():
                    by_name.setdefault(name, {}).setdefault(g, []).append(fn)
        return [(name, partial(self._hook, by_group)) for name, by_group in by_name.items()]

    def _hook(self, by_group: dict[int, list[Callable]], act, hook):
        if self._rows is None or self._rows.shape[0] != act.shape[0]:
            raise RefusalLensError(f"RowSwitch at {hook.name}: a batch of {act.shape[0]} rows, but rows "
                                   f"{'unset' if self._rows is None else f'for {self._rows.shape[0]}'}; set "
                                   "switch.rows (one group id per row) before each forward.")
        out = act
        for g, mine in by_group.items():
            idx = self._index.get(g)
            if idx is None:
                continue
            if idx.numel() == act.shape[0]:  # the whole batch: exactly what the interventions alone do
                for fn in mine:
                    out = fn(out, hook)
                continue
            idx = idx.to(act.device)
            sub = out.index_select(0, idx)
            for fn in mine:
                sub = fn(sub, hook)
            out = out.index_copy(0, idx, sub)
        return out


def as_interventions(interventions: Intervention | Sequence[Intervention] | None) -> list[Intervention]:
    """Normalise ``None`` / one intervention / a sequence into a list, refusing anything else."""
    if interventions is None:
        return []
    items = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    for item in items:
        if not isinstance(item, Intervention):
            raise RefusalLensError(
                f"{item!r} is not an Intervention. Pass objects such as `direction.ablate(model)` or "
                "`direction.add(model, coeff)`.")
    return items


@contextmanager
def applied(interventions: Intervention | Sequence[Intervention] | None) -> Iterator[None]:
    """Enter every intervention for the duration of the block (removed on exit or error)."""
    with ExitStack() as stack:
        for item in as_interventions(interventions):
            stack.enter_context(item)
        yield


@dataclass
class Completions:
    """Greedy completions with what evaluation reuses from the generation itself.

    Attributes:
        texts: one completion per instruction (special tokens removed).
        tokens: per instruction, the new token ids (the end token last when it was emitted).
        logprobs: per instruction, each new token's log-probability (nats) under the model as it generated.
        first_logits: ``[n_instructions, vocab]`` fp32 next-token logits at the last prompt position, as
            :func:`refusal_lens.evaluate.last_logits` gives them (same batches: bitwise equal).
        eos_id: the end token, not part of ``texts``.
    """

    texts: list[str]
    tokens: list[list[int]]
    logprobs: list[list[float]]
    first_logits: Float[Tensor, "n vocab"]
    eos_id: int | None

    def content_tokens(self) -> list[list[int]]:
        """Per completion, its new tokens without the end token (what :meth:`nll` scores)."""
        return [toks[:-1] if toks and toks[-1] == self.eos_id else toks for toks in self.tokens]

    def split(self, sizes: Sequence[int]) -> list[Completions]:
        """Consecutive parts of ``sizes[i]`` completions each: one generation over several prompt sets
        (e.g. :func:`complete_each`'s conditions), given back per set."""
        if sum(sizes) != len(self.texts):
            raise RefusalLensError(f"split sizes {list(sizes)} add up to {sum(sizes)}, not {len(self.texts)} completions.")
        parts, start = [], 0
        for n in sizes:
            part = slice(start, start + n)
            parts.append(Completions(self.texts[part], self.tokens[part], self.logprobs[part], self.first_logits[part],
                                     self.eos_id))
            start += n
        return parts

    def nll(self) -> list[tuple[float, int]]:
        """Per completion: (summed negative log-likelihood in nats, number of tokens) of
        :meth:`content_tokens`, as :func:`refusal_lens.evaluate.completion_nll` scores them
        (``tests/test_decoding.py``)."""
        return [(-sum(lps[: len(toks)]), len(toks))
                for toks, lps in zip(self.content_tokens(), self.logprobs, strict=True)]


@torch.no_grad()
def complete(
    model,
    instructions: Sequence[str],
    *,
    interventions: Intervention | Sequence[Intervention] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    fmt: ChatFormat | None = None,
    suffix: str = "",
    progress: bool = True,
    desc: str = "generating",
) -> Completions:
    """Greedy, batched, KV-cached completions of chat prompts (optionally under interventions), with their
    first-position logits and token log-probabilities (:func:`refusal_lens.decoding.greedy`: a row leaves
    the batch when it ends).

    Example:
        >>> c = complete(model, harmless, max_new_tokens=40)
        >>> c.texts[0], c.first_logits.shape
    """
    with applied(interventions):
        return _complete_rows(model, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size, fmt=fmt,
                              suffix=suffix, progress=progress, desc=desc)


@torch.no_grad()
def complete_each(
    model,
    conditions: Mapping[str, tuple[Sequence[str], Intervention | Sequence[Intervention] | None]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    fmt: ChatFormat | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> dict[str, Completions]:
    """:func:`complete` for several conditions in one call: every condition's prompts in one stream of batches
    of ``batch_size`` rows, each row under its own condition's interventions (a :class:`RowSwitch`).

    Wider batches and fewer decode steps than one call per condition; each condition gets the completions
    it would get alone (``tests/test_decoding.py`` pins the tokens). Conditions given the same intervention
    objects (or none) form one group, whose shared prompt prefix runs once per batch.

    Args:
        conditions: ``{name: (instructions, interventions)}``; the result keeps this order.

    Example:
        >>> ablate = direction.ablate(model)
        >>> done = complete_each(model, {"harmful": (harmful, []), "harmful_ablated": (harmful, [ablate])})
        >>> done["harmful_ablated"].texts
    """
    keys: dict[tuple[int, ...], int] = {}
    groups: list[list[Intervention]] = []
    instructions: list[str] = []
    rows: list[int] = []
    for prompts, ivs in conditions.values():
        ivs = as_interventions(ivs)
        g = keys.setdefault(tuple(id(iv) for iv in ivs), len(groups))
        if g == len(groups):
            groups.append(ivs)
        instructions += list(prompts)
        rows += [g] * len(prompts)
    switch = RowSwitch(model, groups)
    with switch:
        done = _complete_rows(model, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size, fmt=fmt,
                              progress=progress, desc=desc, switch=switch, rows=rows)
    switch.rows = None
    return dict(zip(conditions, done.split([len(p) for p, _ in conditions.values()]), strict=True))


def _complete_rows(model, instructions: Sequence[str], *, max_new_tokens: int, batch_size: int, fmt: ChatFormat | None,
                   progress: bool, desc: str, suffix: str = "", switch: RowSwitch | None = None,
                   rows: Sequence[int] | None = None) -> Completions:
    """The batch loop of :func:`complete` and :func:`complete_each` (``rows``: each instruction's group in
    ``switch``), under the hooks attached now."""
    patch_kv_cache()  # a bridge booted by hand has not been through load_model
    fmt = fmt or chat_format(model)
    tok = model.tokenizer
    texts: list[str] = []
    tokens: list[list[int]] = []
    logprobs: list[list[float]] = []
    first: list[Tensor] = []
    bar = tqdm(total=len(instructions), desc=desc, disable=not progress, leave=False)
    memo = PrefixMemo()
    start = 0
    for batch in batches(tok, instructions, batch_size, fmt, suffix=suffix):
        if switch is not None:
            device = getattr(model, "original_model", model).device
            switch.rows = torch.tensor(rows[start : start + len(batch)], device=None if device.type == "meta" else device)
        g = greedy(model, batch.input_ids, batch.attention_mask, max_new_tokens=max_new_tokens,
                   eos_id=tok.eos_token_id, prefix_memo=memo, switch=switch)
        texts += tok.batch_decode(g.tokens, skip_special_tokens=True)
        tokens += g.tokens
        logprobs += g.logprobs
        first.append(g.first_logits)
        start += len(batch)
        bar.update(len(batch))
    bar.close()
    vocab = int(model.cfg.d_vocab)
    return Completions(texts, tokens, logprobs, torch.cat(first) if first else torch.empty(0, vocab), tok.eos_token_id)


@torch.no_grad()
def generate(
    model,
    instructions: Sequence[str],
    *,
    interventions: Intervention | Sequence[Intervention] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    fmt: ChatFormat | None = None,
    suffix: str = "",
    use_cache: bool = True,
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """Greedy, batched, KV-cached completions of chat prompts, optionally under interventions
    (:func:`complete`'s texts).

    Args:
        instructions: user messages; the chat template is applied here.
        interventions: an :class:`Intervention` or several, e.g. ``[direction.ablate(model)]``.
        suffix: text appended to each instruction inside the user turn.
        use_cache: ``False`` recomputes the whole sequence at every step through ``transformers``'
            ``generate`` (a reference for tests: the same tokens, ~10x slower).

    Returns:
        One completion string per instruction (special tokens removed).

    Example:
        >>> generate(model, ["How do I pick a lock?"], interventions=[direction.ablate(model)], max_new_tokens=32)
    """
    if use_cache:
        return complete(model, instructions, interventions=interventions, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, fmt=fmt, suffix=suffix, progress=progress, desc=desc).texts
    patch_kv_cache()
    fmt = fmt or chat_format(model)
    tok = model.tokenizer
    out: list[str] = []
    bar = tqdm(total=len(instructions), desc=desc, disable=not progress, leave=False)
    with applied(interventions):
        for batch in batches(tok, instructions, batch_size, fmt, suffix=suffix):
            tokens = model.hf_generate(
                batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
                do_sample=False, use_past_kv_cache=False, return_type="tokens", pad_token_id=tok.pad_token_id,
                top_k=None, top_p=None, temperature=None,
                use_cache=False,  # hf_generate forwards only use_past_kv_cache=True; the model's default is True
            )
            out += tok.batch_decode(tokens[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
            bar.update(len(batch))
    bar.close()
    return out
