"""Interventions on the residual stream as context managers over TransformerLens hooks.

* :func:`ablate` -- directional ablation ``x <- x - r r^T x`` at every layer's block input, middle
  (after attention) and output (after the MLP), at every position (paper section 2.4).
* :func:`add` -- activation addition ``x <- x + c * r_raw`` at one layer's block input, every
  position, where ``r_raw`` is the un-normalised diff-in-means vector (paper section 2.4); a negative
  coefficient subtracts.

Both compose (nest them) and always remove their own hooks, also when the body raises::

    with ablate(model, direction):
        logits = model(tokens)
    with add(model, direction, coeff=1.0):
        completions = generate(model, harmless)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from refusal_lens.directions import Direction
from refusal_lens.models import patch_kv_cache
from refusal_lens.prompts import ChatFormat, batches

Hook = tuple[str, Callable]


def _vector_for(act: Tensor, vector: Tensor) -> Tensor:
    return vector.to(device=act.device, dtype=act.dtype)


def ablation_hooks(model, vector: Float[Tensor, " d_model"]) -> list[Hook]:
    """Hooks projecting ``vector`` (normalised here) out of the residual stream everywhere."""
    r = vector.detach().flatten().to(torch.float32)
    r = r / r.norm()

    def hook(act, hook):
        rv = _vector_for(act, r)
        return act - (act @ rv).unsqueeze(-1) * rv

    names = []
    for layer in range(model.cfg.n_layers):
        names += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_mid",
                  f"blocks.{layer}.hook_resid_post"]
    return [(name, hook) for name in names]


def addition_hooks(model, vector: Float[Tensor, " d_model"], layer: int, coeff: float = 1.0) -> list[Hook]:
    """Hooks adding ``coeff * vector`` (as given, not normalised) at block ``layer``'s input."""
    v = vector.detach().flatten().to(torch.float32) * coeff

    def hook(act, hook):
        return act + _vector_for(act, v)

    return [(f"blocks.{layer}.hook_resid_pre", hook)]


@contextmanager
def hooks(model, fwd_hooks: Sequence[Hook]) -> Iterator:
    """Attach ``fwd_hooks`` for the duration of the block; they are removed on exit or error."""
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        yield model


@contextmanager
def ablate(model, direction: Direction | Tensor) -> Iterator:
    """Directional ablation of ``direction`` at every layer and position.

    Args:
        direction: a :class:`Direction` (checked against the model) or a ``[d_model]`` tensor.
    """
    if isinstance(direction, Direction):
        direction.check_model(model)
        direction = direction.vector
    with hooks(model, ablation_hooks(model, direction)):
        yield model


@contextmanager
def add(model, direction: Direction, coeff: float = 1.0, layer: int | None = None) -> Iterator:
    """Add ``coeff`` times the raw diff-in-means vector at ``layer`` (default: the direction's layer).

    The raw vector is ``direction.vector * direction.norm``, so ``coeff=1`` adds the mean difference
    between harmful and harmless activations, as in the paper. Negative ``coeff`` subtracts.
    """
    direction.check_model(model)
    layer = direction.layer if layer is None else layer
    with hooks(model, addition_hooks(model, direction.raw, layer, coeff)):
        yield model


def _is_context(item) -> bool:
    # contextlib's context managers are also callable (ContextDecorator): test for __enter__ first
    return hasattr(item, "__enter__")


@contextmanager
def apply(model, interventions: Sequence | None) -> Iterator:
    """Enter several intervention context managers (or callables ``model -> context``) at once."""
    with ExitStack() as stack:
        for item in interventions or []:
            stack.enter_context(item if _is_context(item) else item(model))
        yield model


@torch.no_grad()
def generate(
    model,
    instructions: Sequence[str],
    *,
    interventions: Sequence | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    fmt: ChatFormat | None = None,
    suffix: str = "",
    use_cache: bool = True,
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """Greedy, batched, KV-cached completions of chat prompts, optionally under interventions.

    Args:
        instructions: user messages; the chat template is applied here.
        interventions: context managers such as ``ablate(model, d)`` or callables ``model -> cm``
            (callables are re-entered for every batch, so reusable).
        suffix: text appended to each instruction inside the user turn.

    Returns:
        One completion string per instruction (special tokens removed).
    """
    patch_kv_cache()  # a bridge booted by hand has not been through load_model
    fmt = fmt or ChatFormat.from_tokenizer(model.tokenizer)
    tok = model.tokenizer
    out: list[str] = []
    bar = tqdm(total=len(instructions), desc=desc, disable=not progress, leave=False)
    with apply(model, [i for i in interventions or [] if _is_context(i)]):
        for batch in batches(tok, instructions, batch_size, fmt, suffix=suffix):
            with apply(model, [i for i in interventions or [] if not _is_context(i)]):
                tokens = model.hf_generate(
                    batch.input_ids,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_past_kv_cache=use_cache,
                    use_cache=use_cache,  # hf_generate only forwards True; the model's default is True
                    return_type="tokens",
                    pad_token_id=tok.pad_token_id,
                    top_k=None,
                    top_p=None,
                    temperature=None,
                )
            new = tokens[:, batch.input_ids.shape[1] :]
            out += tok.batch_decode(new, skip_special_tokens=True)
            bar.update(len(batch))
    bar.close()
    return out
