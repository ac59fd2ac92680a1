"""Streaming mean activations at every layer's block input and chosen token positions.

Means are accumulated in float64 batch by batch, so memory is ``O(layers x positions x d_model)``
whatever the number of prompts. :func:`mean_activations` stops the forward after the last block (no
unembedding), since only residual-stream activations are needed (TransformerLens's ``stop_at_layer``).
:func:`read_prompts` also reads each prompt's next-token logits in the same forward, and averages only the
prompts chosen from them: the paper's filtering and the diff-in-means then cost one pass over the train
prompts instead of two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.utilities import get_act_name

from refusal_lens.errors import DataError
from refusal_lens.prefix import PrefixMemo, SharedPrefix
from refusal_lens.prompts import ChatFormat, PromptBatch, batches, chat_format


@dataclass
class MeanActivations:
    """Mean block-input activations over a prompt set.

    Attributes:
        mean: ``[layer, pos, d_model]`` float64 means.
        positions: negative token offsets of the ``pos`` axis.
        count: number of prompts averaged.
    """

    mean: Float[Tensor, "layer pos d_model"]
    positions: list[int]
    count: int


class PositionSums:
    """Float64 sums of ``blocks.L.hook_resid_pre`` at fixed positions over the rows a caller adds.

    Attach :meth:`hooks` to a forward; they keep that batch's activations at ``positions``. Then
    :meth:`add` sums the rows to count (all, or a mask). :meth:`mean` divides by the rows added.
    """

    def __init__(self, model, positions: Sequence[int], layers: Sequence[int]):
        self.positions, self.layers = list(positions), list(layers)
        self.total = torch.zeros(len(self.layers), len(self.positions), model.cfg.d_model, dtype=torch.float64)
        self.count = 0
        self._index = torch.tensor(self.positions)
        self._batch: list[Tensor | None] = [None] * len(self.layers)

    def hooks(self) -> list[tuple[str, Callable]]:
        """Forward hooks (TransformerLens names) that keep the batch's activations at the positions."""

        def make(i: int):
            def hook(act, hook):  # act: [batch, seq, d_model]
                self._batch[i] = act[:, self._index, :]
                return act

            return hook

        return [(get_act_name("resid_pre", layer), make(i)) for i, layer in enumerate(self.layers)]

    def add(self, rows: Bool[Tensor, " batch"] | None = None) -> None:
        """Add the last forward's rows (those where ``rows`` is true; all by default) to the sums."""
        n = None
        for i, act in enumerate(self._batch):
            if act is None:
                raise DataError(f"No activation was captured at layer {self.layers[i]}; run a forward under "
                                "hooks() before add().")
            picked = act if rows is None else act[rows.to(act.device)]
            self.total[i] += picked.to(torch.float64).sum(0).cpu()
            n = picked.shape[0]
        self.count += n or 0
        self._batch = [None] * len(self.layers)

    def mean(self) -> MeanActivations:
        """The mean over every row added."""
        if self.count == 0:
            raise DataError("No prompt was averaged; pass at least one instruction (or choose at least one).")
        return MeanActivations(mean=self.total / self.count, positions=self.positions, count=self.count)


def _defaults(model, fmt, positions, layers) -> tuple[ChatFormat, list[int], list[int]]:
    fmt = fmt or chat_format(model)
    positions = list(positions if positions is not None else fmt.positions)
    layers = list(layers if layers is not None else range(model.cfg.n_layers))
    return fmt, positions, layers


def _forward(model, batch: PromptBatch, sums: PositionSums, memo: PrefixMemo, *, logits: bool) -> Tensor | None:
    """One forward of ``batch`` with ``sums``'s hooks attached to the rows' own tokens only; the next-token
    logits at the last position ``[batch, vocab]`` when ``logits``."""
    keep = max(-min(sums.positions), 1)
    sp = SharedPrefix.of(model, batch.input_ids, batch.attention_mask, keep=keep, memo=memo)
    if sp is not None:
        # the shared start runs once, before the capturing hooks are attached
        cache = sp.cache()
        with model.hooks(fwd_hooks=sums.hooks()):
            out = sp.forward(cache, logits_to_keep=1)
    elif logits:
        with model.hooks(fwd_hooks=sums.hooks()):
            out = model(batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1)
    else:
        # TransformerLens stops at block ``last``'s input (its resid_pre hook fires first): later blocks and
        # the unembedding never run
        with model.hooks(fwd_hooks=sums.hooks()):
            model(batch.input_ids, attention_mask=batch.attention_mask, stop_at_layer=max(sums.layers))
        return None
    return out[:, -1] if logits else None


def mean_activations(
    model,
    instructions: Sequence[str],
    *,
    positions: list[int] | None = None,
    layers: list[int] | None = None,
    batch_size: int = 16,
    fmt: ChatFormat | None = None,
    suffix: str = "",
    progress: bool = True,
    desc: str = "activations",
) -> MeanActivations:
    """Mean of ``blocks.L.hook_resid_pre`` at ``positions`` over ``instructions``.

    Args:
        positions: negative offsets from the end of each prompt; default all post-instruction positions.
        layers: block indices; default all.
        suffix: text appended to every instruction inside the user turn.

    Returns:
        :class:`MeanActivations` with ``mean`` of shape ``[len(layers), len(positions), d_model]``.
    """
    if len(instructions) == 0:
        raise DataError("Cannot average activations over an empty prompt set; pass at least one instruction.")
    fmt, positions, layers = _defaults(model, fmt, positions, layers)
    sums = PositionSums(model, positions, layers)
    bar = tqdm(total=len(instructions), desc=desc, disable=not progress, leave=False)
    memo = PrefixMemo()
    with torch.no_grad():
        for batch in batches(model.tokenizer, instructions, batch_size, fmt, suffix=suffix):
            _forward(model, batch, sums, memo, logits=False)
            sums.add()
            bar.update(len(batch))
    bar.close()
    return sums.mean()


@dataclass
class PromptReading:
    """What :func:`read_prompts` read in one forward pass over a prompt set.

    Attributes:
        logits: ``[prompt, vocab]`` next-token logits at each prompt's last position (fp32, CPU), in input order.
        chosen: indices of the prompts whose activations were averaged, in input order.
        means: their :class:`MeanActivations`, or ``None`` when no prompt was chosen.
    """

    logits: Float[Tensor, "prompt vocab"]
    chosen: list[int]
    means: MeanActivations | None


@torch.no_grad()
def read_prompts(
    model,
    instructions: Sequence[str],
    *,
    choose: Callable[[Tensor], Tensor] | None = None,
    limit: int | None = None,
    positions: list[int] | None = None,
    layers: list[int] | None = None,
    batch_size: int = 16,
    fmt: ChatFormat | None = None,
    progress: bool = True,
    desc: str = "reading prompts",
) -> PromptReading:
    """Each prompt's next-token logits and, from the same forward, the mean block-input activations of the
    prompts ``choose`` picks from those logits (the first ``limit`` of them).

    The logits are :func:`~refusal_lens.evaluate.last_logits`'s (the same batches; equal to rounding), and
    the means :func:`mean_activations`'s over the chosen prompts (equal to rounding: rows computed in
    different batches round differently).

    Args:
        choose: maps a batch's logits ``[batch, vocab]`` to a bool mask ``[batch]`` of the prompts to
            average (e.g. the paper's filter: refusal metric > 0); default every prompt.
        limit: average at most this many chosen prompts, the first in input order (``None``: all).

    Example:
        >>> r = read_prompts(model, harmful, choose=lambda lg: refusal_metric_from_logits(lg, ids) > 0, limit=128)
        >>> r.means.mean.shape, len(r.chosen)          # [24, 5, 896] on the embedded model
    """
    if len(instructions) == 0:
        raise DataError("Cannot read an empty prompt set; pass at least one instruction.")
    fmt, positions, layers = _defaults(model, fmt, positions, layers)
    sums = PositionSums(model, positions, layers)
    out: list[Tensor] = []
    chosen: list[int] = []
    bar = tqdm(total=len(instructions), desc=desc, disable=not progress, leave=False)
    memo = PrefixMemo()
    start = 0
    for batch in batches(model.tokenizer, instructions, batch_size, fmt):
        logits = _forward(model, batch, sums, memo, logits=True).float().cpu()
        rows = torch.ones(len(batch), dtype=torch.bool) if choose is None else choose(logits).bool()
        room = len(instructions) if limit is None else max(limit - len(chosen), 0)
        rows &= rows.long().cumsum(0) <= room
        sums.add(rows)
        chosen += [start + i for i in rows.nonzero().flatten().tolist()]
        out.append(logits)
        start += len(batch)
        bar.update(len(batch))
    bar.close()
    return PromptReading(torch.cat(out), chosen, sums.mean() if chosen else None)
