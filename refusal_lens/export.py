"""Export an orthogonalized model as a plain Hugging Face folder, in memory or shard by shard.

Two routes, equal bit for bit on the tensors they write (``tests/test_export.py``):

* :func:`export` takes a loaded model (a TransformerBridge), orthogonalizes it **in place** (unless it
  already is, against the same direction), checks it against hook ablation, writes a clean HF folder
  (safetensors, ``config.json`` with ``tie_word_embeddings: false``, generation config, tokenizer with its
  chat template, a model card) and reloads that folder with plain ``transformers`` to verify the logits.
* :func:`export_streaming` edits a safetensors HF folder without loading the model: one shard at a time,
  one residual writer at a time, every other tensor copied byte for byte. Peak memory is about the
  largest residual-writer tensor (the embedding), not the model.

Both write into a temporary folder beside the target and rename it at the end, so a failed or
interrupted export leaves nothing at the target (and an existing target untouched).

The exported model has no refusal direction: **its safety refusals are removed**. It is meant for
research on refusal, not for deployment; the model card says so.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from refusal_lens.directions import Direction
from refusal_lens.errors import DirectionError, ExportError
from refusal_lens.io import atomic_dir, check_output_dir
from refusal_lens.orthogonalize import (
    ROWS,
    _rows_view,
    check_direction,
    check_edit,
    is_orthogonalized,
    max_logit_diff,
    mean_kl,
    model_type_of,
    project_rows,
    read_param,
    residual_writers,
    unit_vector,
    writer_direction,
    writer_patterns,
)

logger = logging.getLogger(__name__)

REPORT_NAME = "export_report.json"
CARD_NAME = "README.md"
#: Files never copied from a source folder: pickled or foreign weight formats (a loader could pick them
#: up instead of the edited safetensors) and refusal-lens's own cache marker.
_SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".pkl")
_SKIP_NAMES = ("refusal_lens_cache.json", CARD_NAME, REPORT_NAME)
_COPY_CHUNK = 1 << 24


@dataclass
class ExportReport:
    """What an export wrote and how well it matched.

    Attributes:
        path: the exported folder.
        max_logit_diff: max |logit diff| between the folder reloaded with ``transformers`` and the
            in-memory orthogonalized model (``None`` for the streaming export, which loads no model).
        seconds: wall time of the export.
        hook_ablation_diff: max |logit diff| between the orthogonalized weights and hook ablation on the
            unedited model (``None`` when the model came in already orthogonalized, or streaming).
        method: ``"in-memory"`` or ``"streaming"``.
        source_model_id: the model the direction was applied to.
        direction: layer, position, model id, norm and provenance of the direction.
        tolerance: the verification threshold.
        n_verify_prompts: prompts used for the verification.
        evaluation: evaluation numbers passed by the caller (also in the model card).
        files: the files written.
        kl_vs_hook_ablation: mean over the verification prompts' positions of KL(hook ablation ||
            orthogonalized), nats (``None`` when not computed).
        max_resid_along_r: max relative component ``|x . r| / |x|`` of the orthogonalized model's residual
            stream, over every layer and position of the verification prompts.
        exact: the edit is the same function as hook ablation (``False`` for Gemma2/3 and OLMo2, whose
            norms after o_proj / down_proj make it a different, still r-free, function).
    """

    path: str
    max_logit_diff: float | None
    seconds: float
    hook_ablation_diff: float | None = None
    method: str = "in-memory"
    source_model_id: str = ""
    direction: dict = field(default_factory=dict)
    tolerance: float | None = None
    n_verify_prompts: int = 0
    evaluation: dict | None = None
    files: list[str] = field(default_factory=list)
    kl_vs_hook_ablation: float | None = None
    max_resid_along_r: float | None = None
    exact: bool | None = None

    def save(self, path: str | Path | None = None) -> Path:
        """Write the report as JSON (default: ``<path>/export_report.json``)."""
        target = Path(path) if path is not None else Path(self.path) / REPORT_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(asdict(self), indent=2, default=str) + "\n")
        return target

    @classmethod
    def load(cls, path: str | Path) -> ExportReport:
        p = Path(path)
        if p.is_dir():
            p = p / REPORT_NAME
        return cls(**json.loads(p.read_text()))


# --------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------


def _direction_info(direction: Direction | torch.Tensor) -> dict:
    if not isinstance(direction, Direction):
        return {"layer": None, "position": None, "model_id": None, "norm": None, "provenance": {}}
    return {"layer": direction.layer, "position": direction.position, "model_id": direction.model_id,
            "norm": direction.norm, "provenance": direction.provenance}


def model_card(source_model_id: str, direction: dict, *, method: str, evaluation: dict | None = None,
               max_logit_diff: float | None = None, hook_ablation_diff: float | None = None,
               exact: bool = True, kl: float | None = None, along_r: float | None = None) -> str:
    """The README.md of an exported model."""
    from refusal_lens import __version__

    lines = [
        "---",
        "tags:",
        "- refusal-lens",
        "- orthogonalized",
        "- research",
        "---",
        "",
        f"# {source_model_id} with the refusal direction orthogonalized out",
        "",
        "> **Warning: this model's safety refusals have been removed.** It complies with harmful requests "
        "that the source model refuses. It is intended for research on how refusal works in language "
        "models (interpretability, red-teaming of safety training), not for deployment or for serving "
        "end users.",
        "",
        "## How it was made",
        "",
        f"- Source model: `{source_model_id}`",
        f"- Tool: refusal-lens {__version__} ({method} export), reproducing Arditi et al. 2024, "
        "*Refusal in Language Models Is Mediated by a Single Direction*.",
        "- A refusal direction `r` (unit vector, difference of mean residual-stream activations on harmful vs "
        "harmless instructions) was projected out of every matrix that writes to the residual stream: the "
        "token embedding, the positional embedding if any, every attention output projection and every MLP "
        "output projection, with their biases (`W <- W - r r^T W`)."
        + (" This is equivalent to ablating `r` from the residual stream at every layer and position." if exact
           else ""),
    ]
    if not exact:
        lines += [
            "- This family normalises the attention and MLP outputs after `o_proj` / `down_proj` (gain `g`), so "
            "those were projected against `normalize(g * r)`: every write is orthogonal to `r` and the residual "
            "stream never holds `r`, but the norm now rescales the edited outputs, so the model is close to, "
            "not equal to, hook ablation (KL below).",
        ]
    lines += [
        "- The input and output embeddings are untied (`tie_word_embeddings: false`), so the unembedding is "
        "the source model's.",
        "",
        "## Direction",
        "",
        f"- Layer (block input): {direction.get('layer')}",
        f"- Post-instruction position: {direction.get('position')}",
        f"- Extracted from: `{direction.get('model_id')}`",
        f"- Diff-in-means norm: {direction.get('norm')}",
    ]
    provenance = direction.get("provenance") or {}
    if provenance:
        lines += ["- Provenance:", "", "```json", json.dumps(provenance, indent=2, default=str), "```"]
    lines += ["", "## Verification", ""]
    if hook_ablation_diff is not None:
        lines.append(f"- Max |logit difference| vs. hook ablation on the source model: {hook_ablation_diff:.3g}")
    if kl is not None:
        lines.append(f"- Mean KL(hook ablation || this model) per position: {kl:.3g} nats")
    if along_r is not None:
        lines.append(f"- Max relative component of the residual stream along `r`: {along_r:.3g}")
    if max_logit_diff is not None:
        lines.append(f"- Max |logit difference| of this folder, reloaded with transformers, vs. the edited "
                     f"model in memory: {max_logit_diff:.3g}")
    if hook_ablation_diff is None and max_logit_diff is None:
        lines.append("- Written shard by shard without loading the model; not re-run after export.")
    if evaluation:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        for key, value in evaluation.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {key} | {shown} |")
    lines += ["", f"Exported {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# In-memory export
# --------------------------------------------------------------------------------------------------


def _default_verify_prompts() -> list[str]:
    from refusal_lens.data import load_builtin

    return load_builtin("harmful", "test")[:2] + load_builtin("harmless", "test")[:2]


def _untied_config(config):
    cfg = copy.deepcopy(config)
    cfg.tie_word_embeddings = False
    text = getattr(cfg, "get_text_config", lambda: None)()
    if text is not None:
        text.tie_word_embeddings = False
    return cfg


def _clean_state(model) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """``(fresh model on the meta device, {HF key: the bridge's tensor})`` for the keys the fresh model has.

    Parameters that accelerate offloaded are ``meta`` tensors here; read them by key with
    :func:`refusal_lens.orthogonalize.read_param`.
    """
    from transformers import AutoModelForCausalLM

    hf = model.original_model
    cfg = _untied_config(hf.config)
    stripped: dict[str, torch.Tensor] = {}
    for key, tensor in hf.state_dict().items():
        stripped.setdefault(key.replace("._original_component", ""), tensor)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(cfg, dtype=hf.dtype)
    wanted = list(fresh.state_dict().keys())
    missing = [k for k in wanted if k not in stripped]
    if missing:
        raise ExportError(
            f"Cannot map the bridged model back to {type(fresh).__name__}: missing {missing[:5]}. "
            "Export from a folder instead with export_streaming()."
        )
    for key in set(stripped) - set(wanted):
        value = read_param(hf, key) if stripped[key].device.type == "meta" else stripped[key]
        if key.endswith("lm_head.bias") and bool(value.abs().max() > 0):
            raise ExportError(
                f"The unembedding has a non-zero bias, which {type(fresh).__name__} cannot hold; refusing to "
                "drop it silently."
            )
    return fresh, {k: stripped[k] for k in wanted}


def clean_hf_model(model):
    """A plain ``transformers`` model sharing the bridge's (edited) tensors, for ``save_pretrained``.

    The bridge wraps the HF modules, so the HF state-dict keys gain ``._original_component`` segments and
    bridge aliases (``attn.o``, ``mlp.out``, ...). The keys are stripped of that segment and matched to the
    keys of a fresh model built on the meta device from the (untied) config; the tensors are assigned,
    not copied. Extra bridge-only entries are dropped (the bridge's zero ``lm_head.bias`` is checked to be
    zero). Not for models with offloaded parameters (see :func:`_save_offloaded`).
    """
    hf = model.original_model
    fresh, state = _clean_state(model)
    fresh.load_state_dict({k: t.detach() for k, t in state.items()}, strict=True, assign=True)
    fresh.generation_config = copy.deepcopy(hf.generation_config)
    fresh.eval()
    return fresh


def is_offloaded(model) -> bool:
    """Whether accelerate offloaded some of ``model``'s parameters (they sit on the ``meta`` device)."""
    return any(p.device.type == "meta" for p in model.original_model.parameters())


def _save_offloaded(model, folder: Path, max_shard_size: str | int) -> None:
    """Write the model's weights tensor by tensor, loading each offloaded one alone (peak: one tensor).

    ``save_pretrained`` cannot be used on the bridged HF model (its keys carry ``._original_component``)
    and a fresh model cannot share meta tensors, so the shards are written with the streaming export's
    writer: offloaded parameters are read from accelerate's weights map (the edited copies), the rest
    from memory. Shards named like ``save_pretrained``'s, with an index when there are several.
    """
    from huggingface_hub.serialization._base import parse_size_to_int

    hf = model.original_model
    _, state = _clean_state(model)
    limit = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    st_dtype = {v: k for k, v in _ST_DTYPES.items()}
    shards: list[list[tuple[str, str, list[int], int]]] = [[]]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, st_dtype[t.dtype], list(t.shape), nbytes))
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, entries in zip(names, shards, strict=True):
        writer = _ShardWriter(folder / name, entries, {"format": "pt"})
        try:
            for key, *_ in entries:
                t = state[key]
                writer.write_tensor((read_param(hf, key) if t.device.type == "meta" else t).detach().to("cpu"))
                weight_map[key] = name
        finally:
            writer.close()
    if n > 1:
        total = sum(e[3] for entries in shards for e in entries)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _untied_config(hf.config).save_pretrained(folder)
    hf.generation_config.save_pretrained(folder)


def _reload_logits(folder: Path, batch, dtype, device_map=None) -> torch.Tensor:
    """Logits of the folder loaded with plain transformers (eager attention).

    Position ids are passed explicitly from the attention mask: the bridge numbers left-padded rows from
    their first real token (as ``generate`` does), while a plain HF forward counts the padding, which moves
    absolute position embeddings (GPT-2: logits differ by ~7 on padded rows). A ``device_map`` (the
    source model's) reloads it dispatched the same way, offloading into a temporary folder.
    """
    import tempfile

    from transformers import AutoModelForCausalLM

    from refusal_lens.prompts import position_ids_from_mask

    with tempfile.TemporaryDirectory(prefix=".reload-offload.", dir=folder.parent) as offload:
        extra = {"device_map": device_map, "offload_folder": offload} if device_map else {}
        reloaded = AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager", dtype=dtype, use_safetensors=True, **extra
        )
        reloaded.eval()
        with torch.no_grad():
            logits = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=position_ids_from_mask(batch.attention_mask)).logits.float()
        del reloaded
    return logits


#: Default checks of :func:`export` by weight dtype: (max |logit diff|, mean KL in nats, max relative
#: residual component along r); ``None``: not checked. In fp32 the orthogonalized weights and hook ablation
#: agree to rounding (measured 3.9e-5 in the logits on the embedded model). In bf16 every weight and
#: activation is rounded to 8 bits, differently on the two sides, so max |logit diff| is noise (measured
#: 1.89 on the embedded model in bf16, 0.34 on tiny llama) and the checks are on the distributions
#: instead: mean KL measured 0.0138 (embedded, bf16) and 5e-4 (tiny), residual component 8.5e-4 and 1.3e-3.
#: fp16 keeps 3 more mantissa bits than bf16 and gets bf16's bounds (not measured separately).
TOLERANCES: dict[torch.dtype, tuple[float | None, float | None, float]] = {
    torch.float32: (1e-3, None, 1e-4),
    torch.float64: (1e-3, None, 1e-4),
    torch.bfloat16: (None, 0.05, 1e-2),
    torch.float16: (None, 0.05, 1e-2),
}


def export(
    model,
    direction: Direction,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    evaluation: dict | None = None,
    verify_prompts: Sequence[str] | None = None,
    tolerance: float | None = None,
    allow_other_model: bool = False,
    max_shard_size: str | int = "2GB",
) -> ExportReport:
    """Orthogonalize ``model`` in place and write it as a Hugging Face folder.

    **The model is edited in place** (weights orthogonalized, embeddings untied) and stays edited after
    the call, also when the verification fails. A model already orthogonalized against ``direction``
    (by :func:`refusal_lens.orthogonalize.orthogonalize`) is exported as it is.

    Steps: check the direction and the target; compute hook-ablated logits on ``verify_prompts``,
    orthogonalize and compare (``hook_ablation_diff``, ``kl_vs_hook_ablation``, ``max_resid_along_r``);
    write config, generation config, tokenizer (with its chat template), safetensors weights and a model
    card into a temp folder beside ``out_dir``; reload it with ``AutoModelForCausalLM.from_pretrained``
    (eager attention; a dispatched model with its own ``device_map``) and compare its logits with the
    in-memory model (``max_logit_diff``); rename the temp folder to ``out_dir``.

    Works in the model's dtype (bf16 weights are written as bf16) and on models dispatched by accelerate
    (``device_map`` with ``"cpu"`` / ``"disk"`` entries): offloaded weights are edited where accelerate
    keeps them and written one tensor at a time (:func:`_save_offloaded`).

    Args:
        model: a TransformerBridge from :func:`refusal_lens.models.load_model`.
        direction: the refusal direction of this model.
        out_dir: the folder to create.
        overwrite: replace an existing ``out_dir`` (only once the new export has been verified).
        evaluation: numbers for the model card and report (e.g. refusal scores before/after).
        verify_prompts: chat instructions for the checks (default: two harmful and two harmless built-in
            test prompts).
        tolerance: max allowed |logit diff| of the reload check and, for families where the edit equals
            hook ablation, of the hook-ablation check (default by dtype, :data:`TOLERANCES`: 1e-3 for
            fp32; bf16 / fp16 are checked on the mean KL instead). Every family is also checked on the
            residual component along ``r``; for Gemma2/3 and OLMo2 that is the check of the edit.
        allow_other_model: accept a direction recorded for another model id (the width is still checked).
        max_shard_size: passed to ``save_pretrained``.

    Returns:
        :class:`ExportReport` (also saved as ``out_dir/export_report.json``).

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false.
        DirectionError: the direction does not fit the model.
        ExportError: unsupported architecture, or a check over ``tolerance`` (nothing is left at
            ``out_dir`` then).

    Example:
        >>> report = export(load_model(), Direction.load("direction"), "qwen-orthogonalized")
        >>> report.max_logit_diff
    """
    from refusal_lens.models import model_id
    from refusal_lens.orthogonalize import _batch, _logits

    t0 = time.perf_counter()
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    check_direction(model, direction, allow_other_model=allow_other_model)
    writers = residual_writers(model)  # unsupported architectures fail before any work
    exact = all(w.gain is None for w in writers)
    hf_dtype = model.original_model.dtype
    default_tol, kl_tol, along_tol = TOLERANCES.get(hf_dtype, TOLERANCES[torch.float32])
    tolerance = default_tol if tolerance is None else tolerance
    prompts = list(verify_prompts) if verify_prompts is not None else _default_verify_prompts()
    batch = _batch(model, prompts)

    check = None
    if not is_orthogonalized(model, direction):
        if is_orthogonalized(model):
            raise ExportError(
                "The model is already orthogonalized against a different direction. Reload it with "
                "refusal_lens.load_model() and export again."
            )
        check = check_edit(model, direction, batch, keep=True, allow_other_model=True)
        logger.info("orthogonalized weights vs hook ablation: max |logit diff| %.3g, KL %.3g, max |x.r|/|x| %.3g",
                    check.max_logit_diff, check.kl, check.max_along_r)
        if exact and tolerance is not None and not check.max_logit_diff <= tolerance:
            raise ExportError(
                f"The orthogonalized model differs from hook ablation by {check.max_logit_diff:.3g} in the "
                f"logits (tolerance {tolerance}); nothing was written. The model is left edited in memory."
            )
        if exact and kl_tol is not None and not check.kl <= kl_tol:
            raise ExportError(
                f"The orthogonalized model differs from hook ablation by a mean KL of {check.kl:.3g} nats "
                f"(tolerance {kl_tol} in {hf_dtype}); nothing was written. The model is left edited in memory."
            )
        if not check.max_along_r <= along_tol:
            raise ExportError(
                f"The orthogonalized model's residual stream keeps a relative component {check.max_along_r:.3g} "
                f"along the direction (tolerance {along_tol}); nothing was written. The model is left edited "
                "in memory."
            )
    in_memory = _logits(model, batch)
    source_id = model_id(model)
    info = _direction_info(direction)
    offloaded = is_offloaded(model)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        if offloaded:
            _save_offloaded(model, tmp, max_shard_size)
        else:
            hf = clean_hf_model(model)
            hf.save_pretrained(tmp, max_shard_size=max_shard_size)
            del hf
        model.tokenizer.save_pretrained(tmp)
        device_map = getattr(model.original_model, "hf_device_map", None) if offloaded else None
        reloaded = _reload_logits(tmp, batch, hf_dtype, device_map)
        diff = max_logit_diff(reloaded, in_memory, batch.attention_mask)
        reload_kl = mean_kl(in_memory, reloaded, batch.attention_mask)
        logger.info("reloaded export vs in-memory model: max |logit diff| %.3g, KL %.3g", diff, reload_kl)
        if (tolerance is not None and not diff <= tolerance) or (kl_tol is not None and not reload_kl <= kl_tol):
            raise ExportError(
                f"The exported folder, reloaded with transformers, differs from the in-memory model by "
                f"{diff:.3g} in the logits, mean KL {reload_kl:.3g} (tolerances {tolerance}, {kl_tol}); nothing "
                f"was written to {out}."
            )
        hook_diff = None if check is None else check.max_logit_diff
        kl = None if check is None else check.kl
        along = None if check is None else check.max_along_r
        (tmp / CARD_NAME).write_text(model_card(source_id, info, method="in-memory", evaluation=evaluation,
                                                max_logit_diff=diff, hook_ablation_diff=hook_diff,
                                                exact=exact, kl=kl, along_r=along))
        report = ExportReport(
            path=str(out), max_logit_diff=diff, seconds=0.0, hook_ablation_diff=hook_diff,
            method="in-memory", source_model_id=source_id, direction=info, tolerance=tolerance,
            n_verify_prompts=len(prompts), evaluation=evaluation,
            files=sorted([p.name for p in tmp.iterdir()] + [REPORT_NAME]),
            kl_vs_hook_ablation=kl, max_resid_along_r=along, exact=exact,
        )
        report.seconds = time.perf_counter() - t0
        report.save(tmp / REPORT_NAME)
    return report


# --------------------------------------------------------------------------------------------------
# Streaming export
# --------------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_header(path: Path) -> tuple[int, dict]:
    """``(data_start, header)`` of a safetensors file, validated against the file size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
        data = size - 8 - n
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            if not 0 <= start <= end <= data:
                raise ValueError(f"tensor {name} lies outside the file")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{path} is not a readable safetensors file ({e}). Re-download or re-save it.") from e
    return 8 + n, header


class _ShardWriter:
    """Write a safetensors file tensor by tensor (the header is known up front), never the whole shard."""

    def __init__(self, path: Path, entries: list[tuple[str, str, list[int], int]], metadata: dict | None):
        header: dict = {}
        offset = 0
        for name, dtype, shape, nbytes in entries:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.total = offset
        self.written = 0
        self.f = open(path, "wb", buffering=0)  # unbuffered: large writes go straight to the kernel
        self._write_all(len(raw).to_bytes(8, "little") + raw)

    def _write_all(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < view.nbytes:
            done += self.f.write(view[done:])
        return done

    def write(self, data) -> None:
        self.written += self._write_all(data)

    def write_tensor(self, t: torch.Tensor) -> None:
        self.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())

    def copy_from(self, src, offset: int, nbytes: int) -> None:
        """Append ``nbytes`` of ``src`` from ``offset``: in the kernel where possible (no user-space copy)."""
        left = nbytes
        if hasattr(os, "copy_file_range"):
            try:
                while left:
                    n = os.copy_file_range(src.fileno(), self.f.fileno(), left, offset + nbytes - left)
                    if n == 0:
                        raise ExportError(f"{src.name} ended early; the shard is truncated.")
                    left -= n
                    self.written += n
            except OSError:  # e.g. unsupported by this file system: fall back to read / write
                pass
        src.seek(offset + nbytes - left)
        while left:
            chunk = src.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise ExportError(f"{src.name} ended early; the shard is truncated.")
            self.write(chunk)
            left -= len(chunk)

    def close(self) -> None:
        self.f.close()
        if self.written != self.total:
            raise ExportError(f"Internal error: wrote {self.written} of {self.total} bytes to {self.f.name}.")


def _source_weights(src: Path) -> tuple[dict[str, str], list[str]]:
    """``(weight_map, shard files in order)`` of an HF folder; :class:`ExportError` on anything broken."""
    indexes = sorted(src.glob("*.safetensors.index.json"))
    singles = sorted(src.glob("*.safetensors"))
    if not indexes and not singles:
        pickles = sorted(p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise ExportError(
                f"{src} holds only pickle weights ({', '.join(pickles[:3])}), which are not loaded because "
                "unpickling can run arbitrary code. Convert them to safetensors (e.g. "
                "`model.save_pretrained(dir, safe_serialization=True)` in a trusted environment) and export "
                "the converted folder."
            )
        raise ExportError(f"{src} holds no *.safetensors weights. Pass a Hugging Face model folder.")
    if len(indexes) > 1:
        raise ExportError(f"{src} holds several safetensors indexes ({[p.name for p in indexes]}); keep one.")
    if not indexes:
        if len(singles) > 1:
            raise ExportError(
                f"{src} holds several .safetensors files ({[p.name for p in singles][:4]}) but no "
                "model.safetensors.index.json saying which tensor lives where. Re-save the model."
            )
        path = singles[0]
        _, header = _read_header(path)
        return {k: path.name for k in header if k != "__metadata__"}, [path.name]
    index = indexes[0]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(
            f"The index {index} is broken ({type(e).__name__}: {e}). Re-download the model or re-save it "
            "with save_pretrained."
        ) from e
    files = list(dict.fromkeys(weight_map.values()))
    missing = [f for f in files if not (src / f).is_file() or Path(f).name != f]
    if missing:
        raise ExportError(
            f"{src} is missing shard(s) listed in {index.name}: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}. Re-download the missing files."
        )
    return weight_map, files


def _folder_model_ids(src: Path, config_json: dict) -> set[str]:
    """The ids ``load_model(src)`` may have recorded for this folder."""
    from refusal_lens.models import _MARKER, EMBEDDED_NAME, EMBEDDED_SHA256

    ids = {str(src), str(src.absolute()), str(src.resolve())}
    for key in ("_name_or_path", "_model_name_or_path"):
        if config_json.get(key):
            ids.add(str(config_json[key]))
    marker = src / _MARKER
    if marker.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            if str(json.loads(marker.read_text()).get("source", "")).startswith(f"{EMBEDDED_NAME}@sha256:{EMBEDDED_SHA256}"):
                ids.add(f"{EMBEDDED_NAME}@{EMBEDDED_SHA256[:12]}")
    return ids


def export_streaming(
    src_folder: str | os.PathLike,
    direction: Direction,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    evaluation: dict | None = None,
    allow_other_model: bool = False,
) -> ExportReport:
    """Orthogonalize a safetensors Hugging Face folder shard by shard, without loading the model.

    Each source shard is opened with ``safetensors.safe_open``; the residual writers it holds (found by
    their HF parameter names, :data:`refusal_lens.orthogonalize.WRITER_PATTERNS`) are edited one at a time
    with the same fp32 arithmetic as :func:`refusal_lens.orthogonalize.orthogonalize`, every other tensor
    is copied byte for byte, and the output shard is written tensor by tensor. With tied embeddings
    (``tie_word_embeddings`` true, the transformers default for some families), ``lm_head.weight`` is
    written from the *unedited* embedding into an extra shard and the config is untied. The output shards
    are named ``model-0000i-of-0000n.safetensors`` with a fresh index; tokenizer, configs and other files
    are copied; ``config.json`` gets ``tie_word_embeddings: false``; a model card is added.

    Args:
        src_folder: an HF folder with ``*.safetensors`` (sharded with an index, or one file).
        direction: the direction; its width must be the model's hidden size, and its ``model_id`` one
            that :func:`refusal_lens.models.load_model` records for this folder (unless
            ``allow_other_model``).
        out_dir: the folder to create (atomically).
        overwrite: replace an existing ``out_dir``.
        evaluation: numbers for the model card and report.

    Raises:
        OutputExistsError, DirectionError, ExportError (no safetensors, pickle-only folder, missing shard,
        broken index or shard, unsupported architecture).
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    t0 = time.perf_counter()
    src, out = Path(src_folder), Path(out_dir)
    check_output_dir(out, overwrite)
    if not (src / "config.json").is_file():
        raise ExportError(f"{src} is not a Hugging Face model folder (no config.json).")
    config_json = json.loads((src / "config.json").read_text())
    config = AutoConfig.from_pretrained(src)
    text_cfg = config.get_text_config()
    mtype = model_type_of(config)
    weight_map, files = _source_weights(src)
    patterns = writer_patterns(mtype, list(weight_map))

    d_model, n_layers = int(text_cfg.hidden_size), int(text_cfg.num_hidden_layers)
    width = direction.d_model
    if width != d_model:
        raise DirectionError(
            f"Direction has width {width} but {src}'s hidden size is {d_model}: it belongs to another model "
            f"({direction.model_id}). Extract a direction for this model with `refusal-lens extract`."
        )
    if not allow_other_model:
        ids = _folder_model_ids(src, config_json)
        if direction.model_id not in ids:
            raise DirectionError(
                f"Direction was extracted from {direction.model_id!r}, not from the model in {src} "
                f"(known as {sorted(ids)[0]!r}). Extract one for this model, or pass --allow-other-model if "
                "you mean to transfer it."
            )
    if not 0 <= direction.layer < n_layers:
        raise DirectionError(f"Direction layer {direction.layer} is outside the model's {n_layers} layers.")

    # Which tensors to edit, and a structure check: an embedding and every layer's two out projections.
    writers: dict[str, str] = {}
    seen: set[tuple[str, int | None]] = set()
    embed_name = None
    for name in weight_map:
        hit = patterns.match(name)
        if hit is None:
            continue
        kind, layer, layout = hit
        writers[name] = layout
        if not name.endswith(".bias"):
            seen.add((kind, layer))
        if kind == "embed":
            embed_name = name
    needed = {("embed", None)} | {(k, i) for i in range(n_layers) for k in ("attn_out", "mlp_out")}
    if patterns.pos_embed is not None:
        needed.add(("pos_embed", None))
    if needed - seen or embed_name is None:
        raise ExportError(
            f"{src} does not hold the residual writers expected of a {mtype!r} model (missing "
            f"{sorted(needed - seen, key=str)[:4]}); the folder is incomplete or not a {mtype} checkpoint."
        )
    tied = bool(getattr(text_cfg, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
    lm_head = "lm_head.weight"
    r = unit_vector(direction)
    # Post-norm families (Gemma2/3, OLMo2): each writer is projected against normalize(gain * r), with
    # the gain of the norm after it read from the source (small tensors, read before any writing).
    directions = {name: r for name in writers}
    for name in writers:
        norm = patterns.norm_name(name)
        if norm is None:
            continue
        if norm not in weight_map:
            raise ExportError(f"{src} has no {norm}, the norm after {name}; the folder is incomplete.")
        with safe_open(src / weight_map[norm], framework="pt") as st:
            gain = patterns.norm_offset + st.get_tensor(norm).to(torch.float32)
        directions[name] = writer_direction(r, gain)

    n_out = len(files) + (1 if tied else 0)
    out_names = [f"model-{i + 1:05d}-of-{n_out:05d}.safetensors" for i in range(n_out)]
    new_map: dict[str, str] = {}
    total = 0
    with atomic_dir(out, overwrite=overwrite) as tmp:
        embed_src: tuple[Path, int, dict] | None = None
        for shard, out_name in zip(files, out_names, strict=False):
            path = src / shard
            data_start, header = _read_header(path)
            names = [k for k, v in weight_map.items() if v == shard and not (tied and k == lm_head)]
            absent = [k for k in names if k not in header]
            if absent:
                raise ExportError(
                    f"The index says {absent[:3]} live in {shard}, but that file does not hold them: the index "
                    "and the shards are from different versions. Re-download the model."
                )
            names.sort(key=lambda k: header[k]["data_offsets"][0])
            entries = []
            for k in names:
                e = header[k]
                if e["dtype"] not in _ST_DTYPES and k in writers:
                    raise ExportError(f"{k} in {shard} has dtype {e['dtype']}, which cannot be orthogonalized.")
                start, end = e["data_offsets"]
                entries.append((k, e["dtype"], list(e["shape"]), end - start))
            writer = _ShardWriter(tmp / out_name, entries, header.get("__metadata__"))
            try:
                with open(path, "rb") as raw, safe_open(path, framework="pt") as st:
                    for k, _, _, nbytes in entries:
                        start = header[k]["data_offsets"][0]
                        layout = writers.get(k)
                        if layout is None:
                            writer.copy_from(raw, data_start + start, nbytes)
                        else:
                            _write_edited(writer, st.get_tensor(k), directions[k], layout)
                        new_map[k] = out_name
                        total += nbytes
            finally:
                writer.close()
            if tied and embed_name in names:
                embed_src = (path, data_start, header[embed_name])
            logger.info("wrote %s (%d tensors)", out_name, len(entries))
        if tied:
            if embed_src is None:
                raise ExportError(f"Internal error: the embedding {embed_name} was not found in any shard.")
            path, data_start, e = embed_src
            start, end = e["data_offsets"]
            writer = _ShardWriter(tmp / out_names[-1], [(lm_head, e["dtype"], list(e["shape"]), end - start)],
                                  {"format": "pt"})
            try:
                with open(path, "rb") as raw:
                    writer.copy_from(raw, data_start + start, end - start)  # the unedited embedding
            finally:
                writer.close()
            new_map[lm_head] = out_names[-1]
            total += end - start

        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _copy_rest(src, tmp, files)
        config_json["tie_word_embeddings"] = False
        if isinstance(config_json.get("text_config"), dict):
            config_json["text_config"]["tie_word_embeddings"] = False
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        source_id = str(config_json.get("_name_or_path") or direction.model_id)
        info = _direction_info(direction)
        exact = patterns.mlp_norm is None
        (tmp / CARD_NAME).write_text(model_card(source_id, info, method="streaming", evaluation=evaluation,
                                                exact=exact))
        report = ExportReport(
            path=str(out), max_logit_diff=None, seconds=0.0, method="streaming", source_model_id=source_id,
            direction=info, evaluation=evaluation, files=sorted([p.name for p in tmp.iterdir()] + [REPORT_NAME]),
            exact=exact,
        )
        report.seconds = time.perf_counter() - t0
        report.save(tmp / REPORT_NAME)
    return report


def _write_edited(writer: _ShardWriter, t: torch.Tensor, r: torch.Tensor, layout: str) -> None:
    """Write ``t`` with ``r`` projected out; embedding-like rows go out block by block."""
    if not t.is_floating_point():
        raise ExportError(f"A residual writer has dtype {t.dtype}; only floating-point weights can be edited.")
    rows = _rows_view(t, layout)
    if layout == ROWS and rows.is_contiguous():
        for _, block in project_rows(rows, r):
            writer.write_tensor(block)
        return
    edited = torch.empty_like(t, memory_format=torch.contiguous_format)
    rows_out = _rows_view(edited, layout)
    for start, block in project_rows(rows, r):
        rows_out[start : start + block.shape[0]] = block
    writer.write_tensor(edited)


def _copy_rest(src: Path, dst: Path, shard_files: Sequence[str]) -> None:
    """Copy tokenizer, configs and other top-level files; never weights, indexes or pickles."""
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name in shard_files or p.name in _SKIP_NAMES or p.name == "config.json":
            continue
        if p.name.endswith((".safetensors", ".safetensors.index.json")) or p.suffix in _SKIP_SUFFIXES:
            if p.suffix in _SKIP_SUFFIXES:
                logger.warning("not copying %s (pickled or foreign weights)", p.name)
            continue
        shutil.copy2(p, dst / p.name)
