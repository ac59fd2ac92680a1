"""Weight orthogonalization: bake directional ablation into the weights (paper section 4.1, appendix E).

Every matrix that writes to the residual stream -- the token embedding, the positional embedding where
there is one, each attention output projection and each MLP output projection, with their biases -- is
replaced by its projection onto the complement of the unit direction ``r``::

    W_out <- W_out - r r^T W_out          (nn.Linear weight, [d_model, d_in])
    W     <- W - (W r) r^T                (embedding rows and GPT-2 Conv1D weights, [n, d_model])
    b     <- b - (b . r) r

The residual stream is then a sum of vectors orthogonal to ``r``, which is what
:func:`refusal_lens.interventions.ablate` enforces with hooks at every ``resid_pre / resid_mid /
resid_post``. The two agree to float rounding (:func:`check_equivalence`), provided that

* nothing transforms a writer's output before it is added to the stream. Gemma2/3 and OLMo2 apply an
  RMSNorm *after* ``o_proj`` / ``down_proj``: the norm rescales each coordinate by its own gain, which
  brings a component along ``r`` back, so such models are refused with :class:`ExportError` (hook
  ablation still works for them);
* the unembedding is not the (edited) embedding: tied embeddings are untied first (otherwise the edit
  also projects ``r`` out of the unembedding and logits move by O(1); measured 1.55 on SmolLM2).

Which parameters write to the stream is decided from the Hugging Face ``config.model_type`` and the
parameter names of that family (:data:`WRITER_PATTERNS`), then cross-checked by identity against the
bridge's components (``embed``, ``pos_embed``, ``blocks[L].attn.o``, ``blocks[L].mlp.out``): a model whose
structure differs from its family's table is refused rather than half edited. The same table drives
the streaming shard-by-shard export in ``export.py``, and both paths use :func:`project_rows` so that
their results are equal bit for bit.

Example::

    model = load_model()
    d = Direction.load("direction")
    err = check_equivalence(model, d, ["How do I bake bread?"])   # leaves the model unchanged
    orthogonalize(model, d)                                        # edits the weights in place
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from refusal_lens.directions import Direction
from refusal_lens.errors import DirectionError, ExportError

logger = logging.getLogger(__name__)

# Layouts of a residual writer. "rows": the last axis is d_model (embeddings, GPT-2 Conv1D [in, out],
# biases viewed as one row), edit W <- W - (W r) r^T. "out_in": nn.Linear [d_model, d_in], edit
# W <- W - r r^T W, i.e. the "rows" edit of the transposed view.
ROWS = "rows"
OUT_IN = "out_in"

# Elements per block of the fp32 edit (64 MB): bounds the extra memory for bf16/fp16 weights. Blocks
# depend on the tensor's shape only, so the in-memory and the streaming export compute the same bits.
BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class WriterPatterns:
    """Hugging Face parameter names of one family's residual writers (regexes on full names).

    A name may carry any prefix (``transformer.h.0...`` or ``h.0...``), so that checkpoints saved with
    and without the base-model prefix match alike. ``attn_out``/``mlp_out`` capture the layer index.
    """

    embed: str
    attn_out: str
    mlp_out: str
    pos_embed: str | None = None
    linear_layout: str = OUT_IN  # layout of attn_out / mlp_out weights

    def match(self, name: str) -> tuple[str, int | None, str] | None:
        """``(kind, layer, layout)`` if ``name`` is a residual writer, else ``None``."""
        for kind, pattern in (("embed", self.embed), ("pos_embed", self.pos_embed),
                              ("attn_out", self.attn_out), ("mlp_out", self.mlp_out)):
            if pattern is None:
                continue
            m = re.fullmatch(r"(?:.*\.)?" + pattern, name)
            if m is None:
                continue
            layer = int(m.group("layer")) if "layer" in m.groupdict() else None
            is_bias = name.endswith(".bias")
            layout = ROWS if kind in ("embed", "pos_embed") or is_bias else self.linear_layout
            return kind, layer, layout
        return None


_LLAMA = WriterPatterns(
    embed=r"model\.embed_tokens\.weight",
    attn_out=r"model\.layers\.(?P<layer>\d+)\.self_attn\.o_proj\.(?:weight|bias)",
    mlp_out=r"model\.layers\.(?P<layer>\d+)\.mlp\.down_proj\.(?:weight|bias)",
)
_GPT2 = WriterPatterns(
    embed=r"wte\.weight",
    pos_embed=r"wpe\.weight",
    attn_out=r"h\.(?P<layer>\d+)\.attn\.c_proj\.(?:weight|bias)",
    mlp_out=r"h\.(?P<layer>\d+)\.mlp\.c_proj\.(?:weight|bias)",
    linear_layout=ROWS,  # transformers' Conv1D stores [in, out]
)

#: Supported ``config.model_type`` -> parameter names of its residual writers. All are sequential
#: pre-norm blocks: attention and MLP outputs are added to the stream as they leave o_proj / down_proj.
WRITER_PATTERNS: dict[str, WriterPatterns] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": _GPT2,
}

#: Families with a norm between a residual writer and the residual stream.
POST_NORM_MODEL_TYPES = ("gemma2", "gemma3", "gemma3_text", "olmo2", "cohere2")
_POST_NORM_NAMES = ("post_feedforward_layernorm", "ln1_post", "ln2_post")


class Writer(NamedTuple):
    """One residual-stream writer: its Hugging Face name, the (shared) parameter and its layout."""

    name: str
    param: torch.nn.Parameter
    layout: str


# --------------------------------------------------------------------------------------------------
# Which parameters write to the residual stream
# --------------------------------------------------------------------------------------------------


def _post_norm_error(model_type: str) -> ExportError:
    return ExportError(
        f"Cannot orthogonalize a {model_type!r} model: it applies a norm AFTER the attention and MLP "
        "output projections (e.g. Gemma2's post_attention_layernorm / post_feedforward_layernorm) before "
        "their output is added to the residual stream. The norm divides by the output's RMS and multiplies "
        "each coordinate by its own gain, which re-introduces a component along the direction, so no edit "
        "of o_proj / down_proj reproduces directional ablation. Use hook ablation "
        "(`refusal_lens.interventions.ablate`) for this model; weight export is not supported for it."
    )


def _unsupported_error(model_type: str, detail: str = "") -> ExportError:
    supported = ", ".join(sorted(WRITER_PATTERNS))
    return ExportError(
        f"Weight orthogonalization does not support architecture {model_type!r}{detail}. Supported "
        f"model types: {supported}. Hook ablation (`refusal_lens.interventions.ablate`) works for any "
        "model TransformerLens can load."
    )


def model_type_of(config) -> str:
    """The text model's ``model_type`` of an HF config (multimodal configs: their text config)."""
    text = getattr(config, "get_text_config", lambda: config)()
    return str(getattr(text, "model_type", None) or getattr(config, "model_type", "unknown"))


def writer_patterns(model_type: str, param_names: Sequence[str] = ()) -> WriterPatterns:
    """The writer table of ``model_type``; raises :class:`ExportError` for unknown / post-norm families.

    ``param_names`` (HF parameter names) are searched for norms after the writers, so that a renamed
    post-norm architecture is refused as well.
    """
    if model_type in POST_NORM_MODEL_TYPES or any(
        part in _POST_NORM_NAMES for name in param_names for part in name.split(".")
    ):
        raise _post_norm_error(model_type)
    patterns = WRITER_PATTERNS.get(model_type)
    if patterns is None:
        raise _unsupported_error(model_type)
    return patterns


def _hf_named_parameters(hf_model) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """HF-style names of the bridged HF model's parameters (``._original_component`` stripped)."""
    seen: set[str] = set()
    for name, p in hf_model.named_parameters(remove_duplicate=False):
        clean = name.replace("._original_component", "")
        if clean not in seen:
            seen.add(clean)
            yield clean, p


def _expected_writers(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The writer parameters according to the bridge's own components, for the cross-check."""
    expected = [("embed.weight", model.embed.weight)]
    pos = getattr(model, "pos_embed", None)
    if pos is not None and getattr(pos, "weight", None) is not None:
        expected.append(("pos_embed.weight", pos.weight))
    for layer, block in enumerate(model.blocks):
        for comp, attr in (("attn.o", block.attn.o), ("mlp.out", block.mlp.out)):
            expected.append((f"blocks.{layer}.{comp}.weight", attr.weight))
            bias = getattr(attr, "bias", None)
            if bias is not None:
                expected.append((f"blocks.{layer}.{comp}.bias", bias))
    return expected


def residual_writers(model) -> list[Writer]:
    """Every parameter of ``model`` (a TransformerBridge) that writes to the residual stream.

    Returns:
        ``Writer(name, param, layout)`` items (they unpack as tuples): ``name`` the Hugging Face parameter
        name, ``param`` the Parameter shared by the bridge and the HF model, ``layout`` :data:`ROWS`
        (last axis is d_model) or :data:`OUT_IN` (first axis is d_model).

    Raises:
        ExportError: for an unknown architecture, one with norms after its writers (Gemma2), or one
            whose modules differ from its family's table.
    """
    hf = model.original_model
    mtype = model_type_of(hf.config)
    named = list(_hf_named_parameters(hf))
    patterns = writer_patterns(mtype, [n for n, _ in named])
    if any(hasattr(b, "ln1_post") or hasattr(b, "ln2_post") for b in model.blocks):
        raise _post_norm_error(mtype)
    d_model = int(model.cfg.d_model)
    writers = []
    for name, p in named:
        hit = patterns.match(name)
        if hit is not None:
            writers.append(Writer(name, p, hit[2]))
    # Cross-check by identity against the bridge's components: same set, nothing missing or extra.
    expected = _expected_writers(model)
    found = {id(w.param) for w in writers}
    missing = [label for label, p in expected if id(p) not in found]
    extra = found - {id(p) for _, p in expected}
    if missing or extra or len(found) != len(writers):
        raise _unsupported_error(
            mtype, f" in this form (its modules do not match the {mtype} table: missing {missing[:4]}, "
            f"{len(extra)} unexpected)",
        )
    for w in writers:
        width = w.param.shape[-1] if w.layout == ROWS else w.param.shape[0]
        if width != d_model:
            raise _unsupported_error(mtype, f" ({w.name} has shape {tuple(w.param.shape)}, not d_model {d_model})")
    return writers


# --------------------------------------------------------------------------------------------------
# The edit
# --------------------------------------------------------------------------------------------------


def _rows_view(t: Tensor, layout: str) -> Tensor:
    """``t`` as a ``[n, d_model]`` view (biases one row, ``OUT_IN`` transposed)."""
    if t.ndim == 1:
        return t.view(1, -1)
    return t.T if layout == OUT_IN else t


def project_rows(rows: Tensor, r: Float[Tensor, " d_model"]) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(start, block)``: row blocks of ``rows - (rows r) r^T`` in ``rows``' dtype.

    The math is fp32 (``r`` must be fp32 and unit norm); blocks of :data:`BLOCK_ELEMENTS` elements keep
    the fp32 temporaries small. Reading a block happens before it is yielded, so callers may write the
    block back into ``rows`` in place.
    """
    n, d = rows.shape
    step = max(1, BLOCK_ELEMENTS // max(d, 1))
    for start in range(0, n, step):
        block = rows[start : start + step].to(torch.float32)
        edited = torch.addr(block, block @ r, r, alpha=-1.0)
        yield start, edited.to(rows.dtype)


@torch.no_grad()
def project_out_(param: Tensor, r: Float[Tensor, " d_model"], layout: str) -> None:
    """Edit one residual writer in place (fp32 math, cast back to the parameter's dtype)."""
    rows = _rows_view(param.data, layout)
    for start, block in project_rows(rows, r):
        rows[start : start + block.shape[0]] = block


def unit_vector(direction: Direction | Tensor) -> Float[Tensor, " d_model"]:
    """The fp32 unit vector of a :class:`Direction` or tensor."""
    v = direction.vector if isinstance(direction, Direction) else direction
    v = v.detach().flatten().to(device="cpu", dtype=torch.float32)
    n = float(v.norm())
    if not math.isfinite(n) or n == 0.0:
        raise DirectionError("The direction is zero or NaN; it cannot be projected out.")
    return v / n


def check_direction(model, direction: Direction | Tensor, *, allow_other_model: bool = False) -> None:
    """Raise :class:`DirectionError` unless ``direction`` fits ``model`` (width; model id unless allowed)."""
    d_model = int(model.cfg.d_model)
    if isinstance(direction, Direction) and not allow_other_model:
        direction.check_model(model)
        return
    width = direction.d_model if isinstance(direction, Direction) else direction.numel()
    if width != d_model:
        raise DirectionError(
            f"Direction has width {width} but the model's d_model is {d_model}: it belongs to another "
            "model. Extract a direction for this model with `refusal-lens extract`."
        )


def untie_embeddings_(model) -> bool:
    """Give the unembedding its own weights (returns whether they were tied).

    Uses :func:`refusal_lens.models._untie_` on the HF model; the bridge's ``unembed`` forwards to the HF
    ``lm_head``, which is checked (a stale reference to the embedding would make the edit leak into
    the logits).
    """
    from refusal_lens.models import _untie_

    hf = model.original_model
    was_tied = model.unembed.weight is model.embed.weight
    _untie_(hf)
    if model.unembed.weight is model.embed.weight or hf.get_output_embeddings().weight is model.embed.weight:
        raise ExportError(
            "Untying the embeddings failed: the unembedding still shares the embedding's weights, so "
            "orthogonalizing would change the logits. Load the model with refusal_lens.load_model()."
        )
    if model.unembed.weight is not hf.get_output_embeddings().weight:
        raise ExportError(
            "The bridge's unembedding is not the HF model's lm_head; the bridge holds a stale reference. "
            "Reload the model with refusal_lens.load_model()."
        )
    return was_tied


def _record(model, r: Tensor, direction) -> None:
    done = list(getattr(model, "refusal_lens_orthogonalized", []))
    meta = {"vector": r.clone()}
    if isinstance(direction, Direction):
        meta.update(layer=direction.layer, position=direction.position, model_id=direction.model_id)
    done.append(meta)
    object.__setattr__(model, "refusal_lens_orthogonalized", done)


def is_orthogonalized(model, direction: Direction | Tensor | None = None) -> bool:
    """Whether :func:`orthogonalize` edited ``model`` (against ``direction``, when given)."""
    done = getattr(model, "refusal_lens_orthogonalized", [])
    if direction is None:
        return bool(done)
    r = unit_vector(direction)
    return any(torch.equal(m["vector"], r) for m in done)


@torch.no_grad()
def orthogonalize(model, direction: Direction | Tensor, *, allow_other_model: bool = False) -> list[Writer]:
    """Project ``direction`` out of every residual-stream writer of ``model``, in place.

    Unties tied embeddings first. Editing the same model twice with the same direction is a no-op.

    Args:
        model: a TransformerBridge from :func:`refusal_lens.models.load_model` (unprocessed weights).
        direction: a :class:`Direction` of this model (or a ``[d_model]`` tensor).
        allow_other_model: accept a direction recorded for another model id (width is still checked).

    Returns:
        The edited writers.

    Raises:
        DirectionError: wrong width / other model.
        ExportError: unsupported architecture (see :func:`residual_writers`).
    """
    check_direction(model, direction, allow_other_model=allow_other_model)
    writers = residual_writers(model)
    r = unit_vector(direction)
    if is_orthogonalized(model, r):
        logger.info("model is already orthogonalized against this direction; nothing to do")
        return writers
    if untie_embeddings_(model):
        logger.info("untied the input and output embeddings before orthogonalizing")
    for w in writers:
        project_out_(w.param, r, w.layout)
    _record(model, r, direction)
    return writers


# --------------------------------------------------------------------------------------------------
# Equivalence with hook ablation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _logits(model, batch) -> Tensor:
    return model(batch.input_ids, attention_mask=batch.attention_mask).float()


def _batch(model, prompts):
    from refusal_lens.prompts import PromptBatch, tokenize_instructions

    if isinstance(prompts, PromptBatch):
        return prompts
    return tokenize_instructions(model.tokenizer, list(prompts))


def max_logit_diff(a: Tensor, b: Tensor, attention_mask: Tensor) -> float:
    """Max ``|a - b|`` over real (non-padding) positions of ``[batch, seq, vocab]`` logits."""
    keep = attention_mask.bool()
    return float((a[keep] - b[keep]).abs().max())


@torch.no_grad()
def check_equivalence(model, direction: Direction | Tensor, prompts, *, keep: bool = False,
                      allow_other_model: bool = False) -> float:
    """Max |logit diff| between hook ablation and orthogonalized weights on ``prompts``.

    How the "unedited copy" is obtained without copying the model: the hook-ablated logits are computed
    first on the unedited model, the residual writers are snapshot (cloned; about 40 % of a 0.5B
    model), the model is orthogonalized in place and run without hooks, then the snapshot is restored.
    Untying the embeddings is kept (it changes no numerics).

    Args:
        model: an unedited TransformerBridge.
        direction: the direction (checked against the model).
        prompts: instructions (the chat template is applied) or a ``PromptBatch``.
        keep: leave the model orthogonalized (skips the snapshot; used by the export).

    Returns:
        The max absolute logit difference over real (non-padding) positions.

    Raises:
        ExportError: when the model is already orthogonalized (the comparison would be vacuous).
    """
    from refusal_lens.interventions import Ablation

    check_direction(model, direction, allow_other_model=allow_other_model)
    if is_orthogonalized(model):
        raise ExportError(
            "check_equivalence needs the unedited model, but this one is already orthogonalized. "
            "Reload it with refusal_lens.load_model()."
        )
    batch = _batch(model, prompts)
    r = unit_vector(direction)
    with Ablation(model, r):
        reference = _logits(model, batch)
    writers = residual_writers(model)
    snapshot = None if keep else [w.param.detach().clone() for w in writers]
    orthogonalize(model, direction, allow_other_model=True)
    try:
        edited = _logits(model, batch)
    finally:
        if snapshot is not None:
            for w, saved in zip(writers, snapshot, strict=True):
                w.param.data.copy_(saved)
            object.__setattr__(model, "refusal_lens_orthogonalized", [])
    return max_logit_diff(reference, edited, batch.attention_mask)
