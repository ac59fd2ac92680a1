"""The tokens every prompt of a batch starts with, computed once per batch instead of once per row.

Chat prompts share their start: the template's system turn and the user turn's opening (24 of the 43-46
tokens of a batch of 16 of the embedded model's built-in val prompts). A left-padded batch computes those tokens again in every
row. :class:`SharedPrefix` finds the longest run of tokens that every row of a batch starts with, runs it
once (batch of one) into a key/value cache, repeats that cache over the batch, and runs only the rest of
each row against it.

The rest of each row is laid out as ``[shared prefix][padding][rest]``: the attention mask has its zeros in
the middle and positions come from the mask, so every real token keeps its position and attends to exactly
the tokens it attended to before. It is the same function as the plain forward; numerically the matrix
shapes differ, so logits agree to rounding (``tests/test_prefix.py``: 1e-5 on the tiny models of every
family, and on the embedded model).

One call over many batches (``last_logits``, ``complete``, ``completion_nll``, ``mean_activations``) passes
one :class:`PrefixMemo` to each batch's split, so the prefix runs once per call: all its batches start with
the same tokens and run under the same hooks and weights. A memo lives for one call only, because weights
edited in place between calls (``orthogonalize``) would make a kept prefix stale.

Hooks fire on both forwards. Interventions therefore apply to the prefix as to any position, which is what
they must do. A hook that *captures* activations must not be attached while the prefix runs. Attach it around
:meth:`SharedPrefix.forward` only, after :meth:`SharedPrefix.cache` (see
:func:`refusal_lens.activations.mean_activations`). Backward passes (the selection's gradient screen) need
gradients at the prefix positions too: they use the plain forward.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import DynamicCache

if TYPE_CHECKING:  # interventions imports decoding, which imports this module
    from refusal_lens.interventions import RowSwitch

#: Shorter shared prefixes are not worth a second forward pass.
MIN_PREFIX = 4

_enabled = True


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run every forward on whole rows inside this block (the reference route, for A/B comparisons)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def on_model_device(model, *tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` moved to the HF model's first device, as ``generate`` does (left where they are when that
    device is ``meta``: a disk-offloaded embedding, whose accelerate hook moves them)."""
    hf = getattr(model, "original_model", model)
    return tensors if hf.device.type == "meta" else tuple(t.to(hf.device) for t in tensors)


class PrefixMemo(dict):
    """Batch-of-one prefix caches of one call, keyed by the prefix's token ids (see the module doc)."""


def shared_prefix_len(input_ids: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"],
                      keep: int | Int[Tensor, " batch"] = 1) -> int:
    """Length of the longest token run that every row of a left-padded batch starts with, capped so that
    each row keeps at least ``keep`` of its real tokens after it (an int, or one per row)."""
    lengths = attention_mask.long().sum(-1)
    n_min = int(lengths.min())
    if n_min == 0:
        return 0
    starts = input_ids.shape[1] - lengths
    firsts = input_ids.gather(1, starts[:, None] + torch.arange(n_min, device=input_ids.device)[None])
    same = (firsts == firsts[:1]).all(0).long()
    n = int(same.cumprod(0).sum())
    keep = torch.as_tensor(keep, device=lengths.device)
    return max(0, min(n, int((lengths - keep).min())))


@dataclass
class SharedPrefix:
    """A left-padded batch split into the prefix its rows share and the rest of each row.

    Attributes:
        model: the bridge (its ``original_model`` runs, so TransformerLens hooks fire) or an HF model.
        prefix_ids: ``[1, n_prefix]`` the shared tokens.
        rest_ids: ``[batch, rest]`` the last ``rest`` columns of the batch (a row's columns before its own
            rest are masked out).
        attention_mask: ``[batch, n_prefix + rest]`` 1 for the prefix and each row's real rest tokens.
        positions: ``[batch, rest]`` position ids of the rest tokens (those of the whole-row forward).
    """

    model: object
    prefix_ids: Int[Tensor, "1 n_prefix"]
    rest_ids: Int[Tensor, "batch rest"]
    attention_mask: Int[Tensor, "batch total"]
    positions: Int[Tensor, "batch rest"]
    memo: PrefixMemo | None = None
    switch: RowSwitch | None = None

    @property
    def n_prefix(self) -> int:
        return self.prefix_ids.shape[1]

    @classmethod
    def of(cls, model, input_ids: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"], *,
           keep: int | Int[Tensor, " batch"] = 1, memo: PrefixMemo | None = None,
           switch: RowSwitch | None = None) -> SharedPrefix | None:
        """The split of this batch, or ``None`` where it does not pay (one row, a prefix shorter than
        :data:`MIN_PREFIX`, or :func:`disabled`). ``keep``: real tokens each row keeps after the prefix
        (a capture at offset ``-k`` needs ``k``; scoring ``n`` completion tokens needs ``n + 1``). ``memo``:
        the calling loop's :class:`PrefixMemo`, shared by its batches. ``switch``: an active
        :class:`~refusal_lens.interventions.RowSwitch` (rows of different groups get different prefixes)."""
        if not _enabled or input_ids.shape[0] < 2:
            return None
        input_ids, attention_mask = on_model_device(model, input_ids, attention_mask)
        n = shared_prefix_len(input_ids, attention_mask, keep)
        if n < MIN_PREFIX:
            return None
        mask = attention_mask.long()
        lengths = mask.sum(-1)
        start0 = input_ids.shape[1] - int(lengths[0])  # row 0's first real column
        rest_len = lengths - n
        width = int(rest_len.max())
        rest_ids = input_ids[:, -width:]
        rest_mask = (torch.arange(width, device=mask.device)[None] >= (width - rest_len)[:, None]).long()
        positions = (n + rest_mask.cumsum(-1) - 1).masked_fill(rest_mask == 0, 0)
        prefix_ids = input_ids[:1, start0 : start0 + n]
        full = torch.cat([rest_mask.new_ones(mask.shape[0], n), rest_mask], -1)
        return cls(model, prefix_ids, rest_ids, full, positions, memo, switch)

    def cache(self) -> DynamicCache:
        """Run the prefix once (or take it from the memo), under the hooks active now, and repeat its key/value
        cache over the batch. Under a :class:`~refusal_lens.interventions.RowSwitch` the prefix runs once per
        group present (a batch of one row per group) and each row gets its group's cache."""
        rows = getattr(self.switch, "rows", None)
        groups, inverse = (None, None) if rows is None else torch.unique(rows, return_inverse=True)
        key = tuple(self.prefix_ids[0].tolist())
        if groups is not None:
            key = (key, tuple(groups.tolist()))
        one = self.memo.get(key) if self.memo is not None else None
        if one is None:
            hf = getattr(self.model, "original_model", self.model)
            one = DynamicCache(config=hf.config)
            ids = self.prefix_ids if groups is None else self.prefix_ids.expand(len(groups), -1)
            with torch.no_grad(), self.switch.rows_as(groups) if groups is not None else contextlib.nullcontext():
                hf(input_ids=ids, attention_mask=torch.ones_like(ids),
                   position_ids=torch.arange(self.n_prefix, device=ids.device)[None].repeat(ids.shape[0], 1),
                   cache=one, use_cache=True, logits_to_keep=1)
            if self.memo is not None:
                self.memo[key] = one
        cache = copy.deepcopy(one)
        if groups is None:
            cache.batch_repeat_interleave(self.rest_ids.shape[0])
        else:
            cache.batch_select_indices(inverse.to(self.prefix_ids.device))
        return cache

    def forward(self, cache: DynamicCache, logits_to_keep: int = 1) -> Float[Tensor, "batch keep vocab"]:
        """Logits of the rest tokens against ``cache`` (the last ``logits_to_keep`` positions; 0: all). The
        cache grows by the rest tokens, so a decoding loop can continue from it."""
        hf = getattr(self.model, "original_model", self.model)
        out = hf(input_ids=self.rest_ids, attention_mask=self.attention_mask, position_ids=self.positions,
                 cache=cache, use_cache=True, logits_to_keep=logits_to_keep)
        return out.logits

    def logits(self, logits_to_keep: int = 1) -> Float[Tensor, "batch keep vocab"]:
        """:meth:`cache` then :meth:`forward`: for callers whose hooks are all interventions."""
        return self.forward(self.cache(), logits_to_keep)
