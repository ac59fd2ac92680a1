"""Weight orthogonalization: bake directional ablation into the weights (paper section 4.1, appendix E).

Every matrix that writes to the residual stream -- the token embedding, the positional embedding where
there is one, each attention output projection and each MLP output projection, with their biases -- is
replaced by its projection onto the complement of the unit direction ``r``::

    W_out <- W_out - r r^T W_out          (nn.Linear weight, [d_model, d_in])
    W     <- W - (W r) r^T                (embedding rows and GPT-2 Conv1D weights, [n, d_model])
    b     <- b - (b . r) r

The residual stream is then a sum of vectors orthogonal to ``r``, which is what
:meth:`Direction.ablate <refusal_lens.directions.Direction.ablate>` enforces with hooks at every ``resid_pre / resid_mid /
resid_post``. The two agree to float rounding (:func:`check_equivalence`), provided that the
unembedding is not the (edited) embedding: tied embeddings are untied first (otherwise the edit also
projects ``r`` out of the unembedding and logits move by O(1); measured 1.55 on SmolLM2).

**Norms after the writers (Gemma2, Gemma3, OLMo2).** These apply an RMSNorm to the output ``y`` of
``o_proj`` / ``down_proj`` before it is added to the stream: ``g * y / rms(y)``, with the gain
``g = 1 + w`` (Gemma, computed in fp32) or ``g = w`` (OLMo2). Its component along ``r`` is
``(g * r) . y / rms(y)``, so those writers are projected against ``u = normalize(g * r)`` instead of
``r``: every write is then orthogonal to ``r`` whatever the RMS, and the residual stream never holds
``r`` (``tests/test_architectures.py``: relative component <= 1e-5 at every layer). The embedding (Gemma
scales it by ``sqrt(d_model)``, a scalar) is projected against ``r`` as usual. This is *not* the same
function as hook ablation -- the norm now divides by the RMS of the edited output -- so
:func:`check_edit` reports the KL between the two instead of requiring equal logits.

**Low precision and offloading.** Each matrix is edited in fp32 blocks and cast back to its own dtype
(bf16 / fp16 weights stay bf16 / fp16). Parameters that accelerate offloaded (``device_map`` with
``"cpu"`` / ``"disk"`` entries: the module's parameter is on the ``meta`` device and its value lives in
the hook's ``weights_map``) are read from that map, edited, and written back to it: in place for
tensors held in memory, as a fresh ``.dat`` file in the offload folder (accelerate's own
``offload_weight``, the index entry updated) for tensors on disk -- the source checkpoint is never
modified.

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

import dataclasses
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from refusal_lens.directions import Direction
from refusal_lens.errors import DirectionError, ExportError
from refusal_lens.interventions import resid_hook_names

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
    #: names (``{layer}`` filled in, same prefix as the writer) of the norm weights applied to the
    #: attention / MLP output before the residual add, for post-norm families; ``None`` otherwise.
    attn_norm: str | None = None
    mlp_norm: str | None = None
    #: the norm multiplies by ``norm_offset + weight`` (1.0 for Gemma's ``(1 + w)``, 0.0 for OLMo2).
    norm_offset: float = 0.0

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

    def norm_name(self, name: str) -> str | None:
        """The HF name of the norm weight applied to writer ``name``'s output, if the family has one."""
        hit = self.match(name)
        if hit is None:
            return None
        kind, layer, _ = hit
        template = {"attn_out": self.attn_norm, "mlp_out": self.mlp_norm}.get(kind)
        if template is None:
            return None
        pattern = self.attn_out if kind == "attn_out" else self.mlp_out
        m = re.fullmatch(r"(?P<prefix>(?:.*\.)?)" + pattern, name)
        assert m is not None
        return m.group("prefix") + template.format(layer=layer)


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

_POST_NORMS = dict(
    attn_norm="model.layers.{layer}.post_attention_layernorm.weight",
    mlp_norm="model.layers.{layer}.post_feedforward_layernorm.weight",
)
_GEMMA = dataclasses.replace(_LLAMA, **_POST_NORMS, norm_offset=1.0)  # Gemma2/3RMSNorm: x * (1 + w)
_OLMO2 = dataclasses.replace(_LLAMA, **_POST_NORMS, norm_offset=0.0)  # Olmo2RMSNorm: w * x

#: Supported ``config.model_type`` -> parameter names of its residual writers. Llama-like families (Phi-3
#: included: only its q/k/v and gate/up projections are fused) add attention and MLP outputs to the stream
#: as they leave o_proj / down_proj; Gemma2/3 and OLMo2 normalise them first (``attn_norm``/``mlp_norm``).
WRITER_PATTERNS: dict[str, WriterPatterns] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "phi3": _LLAMA,
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "gemma3_text": _GEMMA,
    "olmo2": _OLMO2,
    "gpt2": _GPT2,
}

#: Parameter names of norms after a writer; a family outside the table that has them is refused.
_POST_NORM_NAMES = ("post_feedforward_layernorm", "ln1_post", "ln2_post")


class Writer(NamedTuple):
    """One residual-stream writer: its Hugging Face name, the (shared) parameter and its layout.

    ``gain`` is the fp32 ``[d_model]`` gain of the norm applied to its output before the residual add
    (Gemma2/3: ``1 + w``; OLMo2: ``w``), ``None`` when the output is added as it is.
    """

    name: str
    param: torch.nn.Parameter
    layout: str
    gain: Tensor | None = None


# --------------------------------------------------------------------------------------------------
# Which parameters write to the residual stream
# --------------------------------------------------------------------------------------------------


def _post_norm_error(model_type: str) -> ExportError:
    return ExportError(
        f"Cannot orthogonalize a {model_type!r} model: it applies a norm AFTER the attention and MLP "
        "output projections (like Gemma2's post_feedforward_layernorm) whose form refusal-lens does not "
        "know for this family, so the edit cannot be adapted to it. Use hook ablation "
        "(`direction.ablate(model)`) for this model; weight export is not supported for it."
    )


def _unsupported_error(model_type: str, detail: str = "") -> ExportError:
    supported = ", ".join(sorted(WRITER_PATTERNS))
    return ExportError(
        f"Weight orthogonalization does not support architecture {model_type!r}{detail}. Supported "
        f"model types: {supported}. Hook ablation (`direction.ablate(model)`) works for any "
        "model TransformerLens can load."
    )


def model_type_of(config) -> str:
    """The text model's ``model_type`` of an HF config (multimodal configs: their text config)."""
    text = getattr(config, "get_text_config", lambda: config)()
    return str(getattr(text, "model_type", None) or getattr(config, "model_type", "unknown"))


def writer_patterns(model_type: str, param_names: Sequence[str] = ()) -> WriterPatterns:
    """The writer table of ``model_type``; raises :class:`ExportError` for unknown / post-norm families.

    ``param_names`` (HF parameter names) are searched for norms after the writers, so that a post-norm
    architecture filed under a pre-norm family's type is refused as well.
    """
    patterns = WRITER_PATTERNS.get(model_type)
    post_norm = any(part in _POST_NORM_NAMES for name in param_names for part in name.split("."))
    if post_norm and (patterns is None or patterns.mlp_norm is None):
        raise _post_norm_error(model_type)
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
    has_post = [hasattr(b, "ln1_post") or hasattr(b, "ln2_post") for b in model.blocks]
    if any(has_post) and patterns.mlp_norm is None:
        raise _post_norm_error(mtype)
    by_name = dict(named)
    d_model = int(model.cfg.d_model)
    writers = []
    for name, p in named:
        hit = patterns.match(name)
        if hit is None:
            continue
        gain = None
        norm = patterns.norm_name(name)
        if norm is not None:
            if norm not in by_name:
                raise _unsupported_error(mtype, f" in this form ({name} has no norm {norm} after it)")
            gain = patterns.norm_offset + read_param(hf, norm).detach().to("cpu", torch.float32)
        writers.append(Writer(name, p, hit[2], gain))
    if any(has_post) and not any(w.gain is not None for w in writers):
        raise _post_norm_error(mtype)
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
        # Always a fresh contiguous fp32 copy: BLAS results depend on the operands' memory alignment and
        # layout (measured: 1 ulp between an fp32 parameter edited in place and the same tensor read from
        # a file), so every caller must hand the matmul the same kind of buffer to get the same bits.
        view = rows[start : start + step]
        block = torch.empty(view.shape, dtype=torch.float32, device=view.device).copy_(view)
        edited = torch.addr(block, block @ r, r, alpha=-1.0)
        yield start, edited.to(rows.dtype)


@torch.no_grad()
def project_out_(param: Tensor, r: Float[Tensor, " d_model"], layout: str) -> None:
    """Edit one residual writer in place (fp32 math, cast back to the parameter's dtype)."""
    rows = _rows_view(param.data, layout)
    for start, block in project_rows(rows, r.to(rows.device)):
        rows[start : start + block.shape[0]] = block


def writer_direction(r: Float[Tensor, " d_model"], gain: Tensor | None) -> Float[Tensor, " d_model"]:
    """The unit vector to project out of a writer whose output is scaled by ``gain`` (or ``r`` itself).

    ``(gain * y) . r == y . (gain * r)``: a write ``y`` orthogonal to ``normalize(gain * r)`` stays
    orthogonal to ``r`` after any norm that divides by a scalar and multiplies by ``gain``.
    """
    if gain is None:
        return r
    u = gain.to(torch.float32) * r
    n = float(u.norm())
    if not math.isfinite(n) or n == 0.0:
        raise ExportError("A post-norm gain is zero or NaN along the whole direction; check the model's weights.")
    return u / n


# --------------------------------------------------------------------------------------------------
# Parameters offloaded by accelerate (device_map with "cpu" / "disk" entries)
# --------------------------------------------------------------------------------------------------


def _locate(hf_model, name: str) -> tuple[dict, list[str], str]:
    """``(modules by path, owner module path as parts, parameter attribute)`` of HF parameter ``name``.

    By name, not by identity: accelerate's hooks replace an offloaded module's Parameter object at every
    forward (real tensor in ``pre_forward``, a new meta one in ``post_forward``).
    """
    modules = dict(hf_model.named_modules(remove_duplicate=False))
    for path, module in modules.items():
        clean = path.replace("._original_component", "").replace("_original_component.", "")
        for pname in module._parameters:
            if (f"{clean}.{pname}" if clean else pname) == name:
                return modules, path.split(".") if path else [], pname
    raise ExportError(f"The model has no parameter {name}; reload it with refusal_lens.load_model().")


def _live_param(hf_model, name: str) -> Tensor:
    modules, parts, pname = _locate(hf_model, name)
    return modules[".".join(parts)]._parameters[pname]


def _offload_slot(hf_model, name: str) -> tuple[Mapping, str]:
    """``(store, key)``: where accelerate keeps the value of the offloaded (meta) parameter ``name``.

    accelerate's ``AlignDevicesHook`` on the module owning the parameter (or on an ancestor) holds a
    ``weights_map`` (``PrefixedDataset`` over a state dict or an ``OffloadedWeightsLoader``); the
    parameter's value is ``weights_map[path relative to the hooked module]``.
    """
    from accelerate.utils.offload import PrefixedDataset

    modules, parts, pname = _locate(hf_model, name)
    for i in range(len(parts), -1, -1):
        hook = getattr(modules.get(".".join(parts[:i])), "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):
            weights_map = getattr(h, "weights_map", None)
            if weights_map is None:
                continue
            key = ".".join(parts[i:] + [pname])
            while isinstance(weights_map, PrefixedDataset):
                key = weights_map.prefix + key
                weights_map = weights_map.dataset
            return weights_map, key
    raise ExportError(
        f"{name} is on the meta device but no accelerate offload hook holds its value. Load the model with "
        "refusal_lens.load_model() (or transformers' from_pretrained with a device_map)."
    )


def read_param(hf_model, name: str) -> Tensor:
    """The value of HF parameter ``name``: the tensor, or for an accelerate-offloaded one its stored copy."""
    param = _live_param(hf_model, name)
    if param.device.type != "meta":
        return param.data
    store, key = _offload_slot(hf_model, name)
    return store[key]


@torch.no_grad()
def write_param_(hf_model, name: str, value: Tensor) -> None:
    """Set HF parameter ``name`` to ``value`` in place; an offloaded one where accelerate keeps it.

    A tensor kept in memory is overwritten in place; one on disk is written with accelerate's
    ``offload_weight`` as ``<key>.dat`` in the loader's ``save_folder`` (the model's offload folder) and
    its index entry replaced -- an entry that pointed into the source ``.safetensors`` file now points
    to that copy, and the source file is never written.
    """
    param = _live_param(hf_model, name)
    if param.device.type != "meta":
        param.data.copy_(value)
        return
    from accelerate.utils import offload_weight
    from accelerate.utils.offload import OffloadedWeightsLoader

    store, key = _offload_slot(hf_model, name)
    if isinstance(store, OffloadedWeightsLoader) and key not in store.state_dict:
        if store.save_folder is None:
            raise ExportError(
                f"{key} is offloaded to disk without an offload folder to write the edited copy to. Load "
                "the model with an offload folder (transformers: `offload_folder=...`)."
            )
        offload_weight(value.to(store[key].dtype).cpu(), key, store.save_folder, index=store.index)
        return
    target = store.state_dict[key] if isinstance(store, OffloadedWeightsLoader) else store[key]
    if not isinstance(target, Tensor) or target.shape != value.shape:
        raise ExportError(f"Cannot write the offloaded parameter {key}: unknown accelerate weights map.")
    target.copy_(value)


@torch.no_grad()
def edit_writer_(hf_model, writer: Writer, r: Float[Tensor, " d_model"]) -> None:
    """Project ``writer_direction(r, writer.gain)`` out of one writer, wherever its value lives."""
    u = writer_direction(r, writer.gain)
    param = _live_param(hf_model, writer.name)
    if param.device.type != "meta":
        project_out_(param, u, writer.layout)
        return
    value = read_param(hf_model, writer.name).clone()
    project_out_(value, u, writer.layout)
    write_param_(hf_model, writer.name, value)


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
        edit_writer_(model.original_model, w, r)
    _record(model, r, direction)
    return writers


# --------------------------------------------------------------------------------------------------
# Equivalence with hook ablation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _logits(model, batch) -> Tensor:
    return model(batch.input_ids, attention_mask=batch.attention_mask).float()


def _batch(model, prompts):
    from refusal_lens.prompts import PromptBatch, chat_format, tokenize_instructions

    if isinstance(prompts, PromptBatch):
        return prompts
    return tokenize_instructions(model.tokenizer, list(prompts), chat_format(model))


def max_logit_diff(a: Tensor, b: Tensor, attention_mask: Tensor) -> float:
    """Max ``|a - b|`` over real (non-padding) positions of ``[batch, seq, vocab]`` logits."""
    keep = attention_mask.bool().to(a.device)
    return float((a[keep] - b.to(a.device)[keep]).abs().max())


def is_exact(model) -> bool:
    """Whether orthogonalizing ``model`` computes the same function as hook ablation (no post-norms)."""
    return all(w.gain is None for w in residual_writers(model))


@dataclass
class EditCheck:
    """How an orthogonalized model compares with hook ablation of the same direction on the unedited one.

    Attributes:
        max_logit_diff: max |logit difference| over real (non-padding) positions.
        kl: mean over real positions of ``KL(hook-ablated || orthogonalized)`` of the next-token
            distribution, in nats.
        max_along_r: max over every layer's ``resid_pre``/``resid_mid``/``resid_post`` and every real
            position of ``|x . r| / |x|`` in the orthogonalized model (0 up to rounding).
        exact: the family's edit is the same function as hook ablation (no norm after the writers), so
            ``max_logit_diff`` is rounding only; for Gemma2/3 and OLMo2 it is not (see the module doc).
    """

    max_logit_diff: float
    kl: float
    max_along_r: float
    exact: bool


def _resid_names(model) -> list[str]:
    return resid_hook_names(model.cfg.n_layers)


@torch.no_grad()
def max_component_along(model, batch, r: Float[Tensor, " d_model"]) -> float:
    """Max of ``|x . r| / |x|`` over every layer's residual stream (pre, mid, post) at real positions."""
    names = set(_resid_names(model))
    _, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                    names_filter=lambda name: name in names)
    worst = 0.0
    for name in names:
        x = cache[name][batch.attention_mask.bool().to(cache[name].device)].float()
        rel = (x @ r.to(x.device)).abs() / x.norm(dim=-1).clamp_min(1e-30)
        worst = max(worst, float(rel.max()))
    return worst


def mean_kl(base: Tensor, other: Tensor, attention_mask: Tensor) -> float:
    """Mean over real positions of ``KL(base || other)`` of ``[batch, seq, vocab]`` logits, in nats."""
    keep = attention_mask.bool().to(base.device)
    lp, lq = base[keep].double().log_softmax(-1), other.to(base.device)[keep].double().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@torch.no_grad()
def check_edit(model, direction: Direction | Tensor, prompts, *, keep: bool = False,
               allow_other_model: bool = False) -> EditCheck:
    """Compare orthogonalized weights with hook ablation on ``prompts`` (any supported family).

    How the "unedited copy" is obtained without copying the model: the hook-ablated logits are computed
    first on the unedited model, the residual writers are snapshot (cloned; about 40 % of a 0.5B
    model), the model is orthogonalized in place and run without hooks, then the snapshot is restored
    (offloaded writers are restored where accelerate keeps them). Untying the embeddings is kept (it
    changes no numerics).

    Args:
        model: an unedited TransformerBridge.
        direction: the direction (checked against the model).
        prompts: instructions (the chat template is applied) or a ``PromptBatch``.
        keep: leave the model orthogonalized (skips the snapshot; used by the export).

    Returns:
        :class:`EditCheck`.

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
    hf = model.original_model
    snapshot = None if keep else [read_param(hf, w.name).detach().clone() for w in writers]
    orthogonalize(model, direction, allow_other_model=True)
    try:
        edited = _logits(model, batch)
        along = max_component_along(model, batch, r)
    finally:
        if snapshot is not None:
            for w, saved in zip(writers, snapshot, strict=True):
                write_param_(hf, w.name, saved)
            object.__setattr__(model, "refusal_lens_orthogonalized", [])
    return EditCheck(
        max_logit_diff=max_logit_diff(reference, edited, batch.attention_mask),
        kl=mean_kl(reference, edited, batch.attention_mask),
        max_along_r=along,
        exact=all(w.gain is None for w in writers),
    )


def check_equivalence(model, direction: Direction | Tensor, prompts, *, keep: bool = False,
                      allow_other_model: bool = False) -> float:
    """Max |logit diff| between hook ablation and orthogonalized weights on ``prompts``.

    For families whose edit equals hook ablation (no norm after the writers); see :func:`check_edit`,
    which this calls, for the method and for Gemma2/3 and OLMo2.

    Raises:
        ExportError: already orthogonalized, or a family with norms after its writers (Gemma2/3,
            OLMo2), where the two are different functions: use :func:`check_edit`.

    Example:
        >>> check_equivalence(model, direction, load_builtin("harmless", "test")[:8])   # 3.9e-05 on the embedded model
    """
    check_direction(model, direction, allow_other_model=allow_other_model)
    if not is_exact(model):
        raise ExportError(
            f"Orthogonalizing a {model_type_of(model.original_model.config)!r} model is exact (the residual "
            "stream never holds the direction) but not the same function as hook ablation: a norm after "
            "o_proj / down_proj rescales the edited output. Use check_edit(), which reports the KL between "
            "the two and the residual component along the direction."
        )
    return check_edit(model, direction, prompts, keep=keep, allow_other_model=allow_other_model).max_logit_diff
