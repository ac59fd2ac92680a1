"""Streaming mean activations at every layer's block input and chosen token positions.

Means are accumulated in float64 batch by batch, so memory is ``O(layers x positions x d_model)``
whatever the number of prompts. The forward stops after the last block (no unembedding), since only
residual-stream activations are needed (TransformerLens's ``stop_at_layer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.utilities import get_act_name

from refusal_lens.errors import DataError
from refusal_lens.prefix import PrefixMemo, SharedPrefix
from refusal_lens.prompts import ChatFormat, batches, chat_format


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
    fmt = fmt or chat_format(model)
    positions = list(positions if positions is not None else fmt.positions)
    layers = list(layers if layers is not None else range(model.cfg.n_layers))
    total = torch.zeros(len(layers), len(positions), model.cfg.d_model, dtype=torch.float64)
    pos_index = torch.tensor(positions)

    def make_hook(i: int):
        def hook(act, hook):  # act: [batch, seq, d_model]
            total[i] += act[:, pos_index, :].to(torch.float64).sum(0).cpu()
            return act

        return hook

    fwd_hooks = [(get_act_name("resid_pre", layer), make_hook(i)) for i, layer in enumerate(layers)]
    last = max(layers)
    n = 0
    bar = tqdm(total=len(instructions), desc=desc, disable=not progress, leave=False)
    memo = PrefixMemo()
    with torch.no_grad():
        for batch in batches(model.tokenizer, instructions, batch_size, fmt, suffix=suffix):
            sp = SharedPrefix.of(model, batch.input_ids, batch.attention_mask, keep=max(-min(positions), 1),
                                 memo=memo)
            if sp is not None:
                # the shared start runs once, before the capturing hooks are attached
                cache = sp.cache()
                with model.hooks(fwd_hooks=fwd_hooks):
                    sp.forward(cache, logits_to_keep=1)
            else:
                # TransformerLens stops at block ``last``'s input (its resid_pre hook fires first): later
                # blocks and the unembedding never run
                with model.hooks(fwd_hooks=fwd_hooks):
                    model(batch.input_ids, attention_mask=batch.attention_mask, stop_at_layer=last)
            n += len(batch)
            bar.update(len(batch))
    bar.close()
    return MeanActivations(mean=total / n, positions=positions, count=n)
