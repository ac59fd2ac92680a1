"""Greedy decoding with a key/value cache that drops finished sequences.

``transformers``' ``generate`` keeps computing a sequence after it has emitted its end token (it feeds it
pad tokens until the whole batch is done). Refusals end after a dozen tokens, so in a batch of harmful
prompts most rows would be computed for nothing. :func:`greedy` is the same greedy loop (prefill with
the last position's logits only, then one token per step against the cache, positions from the attention
mask) that removes a row from the batch, and from the cache, as soon as it ends. The prefill runs the
tokens every prompt starts with once (:class:`refusal_lens.prefix.SharedPrefix`).

It runs the Hugging Face model inside the bridge (``model.original_model``), through which every forward
of the bridge goes, so TransformerLens hooks (interventions) fire as in any forward. It also keeps what
evaluation would otherwise recompute: the prefill's last-position logits (the next-token distribution
that KL is measured on) and the log-probability of every chosen token (the completion's cross-entropy
under the model that generated it).

The tokens are those of ``generate`` with ``do_sample=False`` and the tokenizer's end token, whenever
dropping a row does not change the floating-point result of the rows left; ``tests/test_decoding.py``
pins identical tokens on the tiny models and ``scripts/bench_run.py`` checks them on the embedded model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import DynamicCache

from refusal_lens.prefix import PrefixMemo, SharedPrefix, on_model_device
from refusal_lens.prompts import position_ids_from_mask

if TYPE_CHECKING:  # interventions imports this module
    from refusal_lens.interventions import RowSwitch


@dataclass
class Greedy:
    """The result of :func:`greedy` for one batch.

    Attributes:
        tokens: per prompt, its new token ids, up to and including the end token when it was emitted.
        logprobs: per prompt, the log-probability (nats) of each token of ``tokens`` under the model as it
            ran (interventions included).
        first_logits: ``[batch, vocab]`` fp32 logits at the last prompt position (CPU).
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    first_logits: Float[Tensor, "batch vocab"]


def _forward(hf, ids, mask, positions, cache) -> Tensor:
    out = hf(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
             logits_to_keep=1)
    return out.logits[:, -1].float()


@torch.no_grad()
def greedy(model, input_ids: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"], *,
           max_new_tokens: int, eos_id: int | None, prefix_memo: PrefixMemo | None = None,
           switch: RowSwitch | None = None) -> Greedy:
    """Greedy completions of a left-padded batch, each row dropped from the batch once it emits ``eos_id``.

    Args:
        model: a TransformerBridge (its ``original_model`` runs) or a ``transformers`` causal LM.
        input_ids, attention_mask: a left-padded batch (``refusal_lens.prompts.batches``).
        max_new_tokens: at most this many new tokens per row.
        eos_id: the end token (``None``: every row runs ``max_new_tokens``).
        prefix_memo: the calling loop's :class:`~refusal_lens.prefix.PrefixMemo` (its batches share the prefix).
        switch: an active :class:`~refusal_lens.interventions.RowSwitch` whose ``rows`` give this batch's
            groups; its rows follow the batch as rows leave it.
    """
    hf = getattr(model, "original_model", model)
    input_ids, attention_mask = on_model_device(model, input_ids, attention_mask)
    n = input_ids.shape[0]
    if switch is not None and (switch.rows is None or switch.rows.shape[0] != n):
        raise ValueError(f"switch.rows must give one group per row of this batch of {n}")
    sp = SharedPrefix.of(model, input_ids, attention_mask, memo=prefix_memo, switch=switch)
    if sp is not None:  # prefill: the tokens every prompt starts with run once (see refusal_lens.prefix)
        cache, ids, mask, positions = sp.cache(), sp.rest_ids, sp.attention_mask, sp.positions
    else:
        mask = attention_mask.long()
        cache, ids, positions = DynamicCache(config=hf.config), input_ids, position_ids_from_mask(mask)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    alive = list(range(n))  # batch row -> prompt index
    first_logits = torch.empty(0)
    for step in range(max_new_tokens):
        logits = _forward(hf, ids, mask, positions, cache)
        if step == 0:
            first_logits = logits.cpu()
        chosen = logits.argmax(-1)
        lp = logits.log_softmax(-1).gather(-1, chosen[:, None])[:, 0]
        for i, tok, p in zip(alive, chosen.tolist(), lp.tolist(), strict=True):
            tokens[i].append(tok)
            logprobs[i].append(p)
        ended = chosen == eos_id if eos_id is not None else torch.zeros_like(chosen, dtype=torch.bool)
        if step == max_new_tokens - 1 or bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero()[:, 0]
            cache.batch_select_indices(keep)
            alive = [alive[r] for r in keep.tolist()]
            if switch is not None:
                switch.rows = switch.rows[keep.to(switch.rows.device)]
            chosen, mask, positions = chosen[keep], mask[keep], positions[keep]
        ids = chosen[:, None]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        positions = positions[:, -1:] + 1
    return Greedy(tokens, logprobs, first_logits)
