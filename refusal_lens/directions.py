"""Refusal directions: the :class:`Direction` dataclass and diff-in-means candidates.

A candidate is ``r[l, i] = mean(harmful activations) - mean(harmless activations)`` at the block input
(``blocks.l.hook_resid_pre``) of layer ``l`` and post-instruction position ``i`` (a negative offset, see
``prompts.py``). A :class:`Direction` keeps the unit vector, the raw diff-in-means norm, and where it
came from; it saves as ``<name>.safetensors`` (the vector) + ``<name>.json`` (everything else).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from refusal_lens.activations import MeanActivations, mean_activations
from refusal_lens.errors import DirectionError
from refusal_lens.interventions import Ablation, Addition
from refusal_lens.io import atomic_files, pair_paths

FORMAT_VERSION = 1


@dataclass
class Direction:
    """A unit direction in the residual stream of one model.

    Attributes:
        vector: ``[d_model]`` unit vector (fp32).
        layer: block whose input it was read at.
        position: post-instruction position, a negative offset from the end (``-1`` = last token).
        model_id: the model it belongs to (``refusal_lens.models.model_id``).
        norm: the norm of the raw diff-in-means vector, in residual-stream units (used for addition).
        provenance: free-form record (prompt sets, splits, counts, library version, selection notes).

    Example:
        >>> direction = cands.direction(layer=15, position=-1)   # or Direction.load("runs/demo/direction")
        >>> with direction.ablate(model):
        ...     print(generate(model, ["How do I pick a lock?"]))
    """

    vector: Float[Tensor, " d_model"]
    layer: int
    position: int
    model_id: str
    norm: float = 1.0
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = self.vector.detach().to(torch.float32).flatten()
        n = float(v.norm())
        if not math.isfinite(n) or n == 0.0:
            raise DirectionError(
                f"Direction at layer {self.layer}, position {self.position} is zero or NaN (norm {n}); "
                "it cannot be normalised. Pick another candidate (layer 0 template positions are "
                "identical for every prompt, so their diff-in-means is zero)."
            )
        # already-unit vectors (e.g. loaded from disk) are kept bit for bit
        self.vector = v if abs(n - 1.0) < 1e-6 else v / n

    @property
    def d_model(self) -> int:
        return self.vector.shape[0]

    @property
    def raw(self) -> Float[Tensor, " d_model"]:
        """The un-normalised diff-in-means vector (``vector * norm``)."""
        return self.vector * self.norm

    def check_model(self, model) -> None:
        """Raise :class:`DirectionError` unless this direction fits ``model`` (width and model id)."""
        from refusal_lens.models import model_id

        d_model = int(model.cfg.d_model)
        if self.d_model != d_model:
            raise DirectionError(
                f"Direction has width {self.d_model} but the model's d_model is {d_model}: it belongs to "
                f"another model ({self.model_id}). Extract a direction for this model with "
                "`refusal-lens extract`."
            )
        mid = model_id(model)
        if self.model_id != mid:
            raise DirectionError(
                f"Direction was extracted from {self.model_id!r}, not from {mid!r}. Pass the model it was "
                "extracted from (--model), or extract one for this model with `refusal-lens run` or `extract`."
            )
        if not 0 <= self.layer < int(model.cfg.n_layers):
            raise DirectionError(f"Direction layer {self.layer} is outside the model's {model.cfg.n_layers} layers.")

    def ablate(self, model) -> Ablation:
        """Directional ablation of this direction at every layer and position (checked against ``model``).

        Example:
            >>> with direction.ablate(model):
            ...     logits = model(tokens)
        """
        self.check_model(model)
        return Ablation(model, self.vector)

    def add(self, model, coeff: float = 1.0, layer: int | None = None) -> Addition:
        """Add ``coeff`` times the raw diff-in-means vector at ``layer`` (default: the direction's layer).

        The raw vector is ``vector * norm``, so ``coeff=1`` adds the mean difference between harmful and
        harmless activations, as in the paper. A negative ``coeff`` subtracts.

        Example:
            >>> generate(model, harmless, interventions=[direction.add(model, coeff=1.5)])
        """
        self.check_model(model)
        return Addition(model, self.raw, self.layer if layer is None else layer, coeff)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``path.safetensors`` and ``path.json`` atomically (``path`` may end in either suffix or none).

        Raises :class:`~refusal_lens.errors.OutputExistsError` if either file exists (unless ``overwrite``)
        or is a symbolic link; nothing is written then.
        """
        st, js = pair_paths(path)
        meta = {k: v for k, v in asdict(self).items() if k != "vector"}
        meta.update(format_version=FORMAT_VERSION, d_model=self.d_model)
        with atomic_files([st, js], overwrite=overwrite) as (tmp_st, tmp_js):
            save_file({"direction": self.vector.contiguous()}, str(tmp_st))
            tmp_js.write_text(json.dumps(meta, indent=2))
        return st

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        """Read a direction saved by :meth:`save` (safetensors + json; never a pickle); ``path`` may also be a
        run folder (its ``direction`` pair is read).

        Raises :class:`DirectionError` naming the fix for a missing, empty, truncated or incomplete pair.
        """
        st, js = pair_paths(Path(path) / "direction" if Path(path).is_dir() else path)  # a run folder works too
        what = "a direction is a .safetensors + .json pair written by `refusal-lens run`, `select` or Direction.save"
        meta = _read_json(js, what, {"layer": int, "position": int, "model_id": str})
        vector = _read_tensors(st, what, ("direction",))["direction"]
        if vector.ndim != 1:
            raise DirectionError(f"{st} holds a tensor of shape {tuple(vector.shape)}, not one vector; {what}.")
        if meta.get("d_model") not in (None, vector.shape[0]):
            raise DirectionError(f"{st} holds a vector of width {vector.shape[0]}, its json says {meta['d_model']}; "
                                 "the two files are from different directions. Re-extract it.")
        try:
            norm = float(meta.get("norm", 1.0))
        except (TypeError, ValueError) as e:
            raise DirectionError(f"{js}: 'norm' is {meta.get('norm')!r}, not a number; {what}.") from e
        provenance = meta.get("provenance", {})
        return cls(vector=vector, layer=meta["layer"], position=meta["position"], model_id=meta["model_id"],
                   norm=norm, provenance=dict(provenance) if isinstance(provenance, dict) else {})


def _read_json(path: Path, what: str, required: dict[str, type]) -> dict:
    """The JSON object at ``path`` with ``required`` keys of the given types, or :class:`DirectionError`."""
    if not path.is_file():
        raise DirectionError(f"{path} is missing; {what}.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DirectionError(f"{path} is not readable JSON ({e}); {what}. Re-create it.") from e
    if not isinstance(meta, dict):
        raise DirectionError(f"{path} holds a JSON {type(meta).__name__}, not an object; {what}.")
    for key, typ in required.items():
        if key not in meta:
            raise DirectionError(f"{path} has no {key!r} field; {what}. Re-create it.")
        value = meta[key]
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if not ok:
            raise DirectionError(f"{path}: {key!r} is {value!r}, not {'an integer' if typ is int else typ.__name__}; "
                                 f"{what}. Re-create it.")
    return meta


def _read_tensors(path: Path, what: str, keys: tuple[str, ...]) -> dict[str, Tensor]:
    """The tensors of a safetensors file holding ``keys``, or :class:`DirectionError` (never a pickle)."""
    from safetensors import SafetensorError

    if not path.is_file():
        raise DirectionError(f"{path} is missing; {what}.")
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise DirectionError(f"{path} is empty, truncated or not a safetensors file ({e}); {what}. "
                             "Re-create it.") from e
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise DirectionError(f"{path} has no tensor {missing[0]!r} (it holds {sorted(tensors) or 'none'}); {what}.")
    return tensors


@dataclass
class Candidates:
    """Diff-in-means candidates at every layer and post-instruction position.

    Attributes:
        diffs: ``[layer, pos, d_model]`` raw diff-in-means vectors (fp64 means, stored fp32).
        positions: the negative offsets of the ``pos`` axis.
        model_id: the model they belong to.
        harmful_mean, harmless_mean: ``[layer, pos, d_model]`` the two means.
        provenance: prompt counts and splits.
    """

    diffs: Float[Tensor, "layer pos d_model"]
    positions: list[int]
    model_id: str
    harmful_mean: Float[Tensor, "layer pos d_model"]
    harmless_mean: Float[Tensor, "layer pos d_model"]
    provenance: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.diffs.shape[0]

    @property
    def norms(self) -> Float[Tensor, "layer pos"]:
        return self.diffs.norm(dim=-1)

    def is_valid(self, layer: int, pos_index: int, rel_tol: float = 1e-6) -> bool:
        """False for zero / NaN candidates (e.g. layer 0 at template tokens, identical in both sets)."""
        n = float(self.norms[layer, pos_index])
        scale = float(self.harmful_mean[layer, pos_index].norm()) + 1e-12
        return math.isfinite(n) and n > rel_tol * scale

    def direction(self, layer: int, position: int) -> Direction:
        """The :class:`Direction` of candidate (``layer``, ``position``), position a negative offset."""
        if position not in self.positions:
            raise DirectionError(f"Position {position} is not one of the candidate positions {self.positions}.")
        i = self.positions.index(position)
        return Direction(
            vector=self.diffs[layer, i].clone(),
            layer=layer,
            position=position,
            model_id=self.model_id,
            norm=float(self.norms[layer, i]),
            provenance=dict(self.provenance),
        )

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``path.safetensors`` (the three tensors) and ``path.json`` atomically (see :meth:`Direction.save`)."""
        st, js = pair_paths(path)
        meta = {"positions": self.positions, "model_id": self.model_id, "provenance": self.provenance}
        with atomic_files([st, js], overwrite=overwrite) as (tmp_st, tmp_js):
            save_file({"diffs": self.diffs.contiguous(), "harmful_mean": self.harmful_mean.contiguous(),
                       "harmless_mean": self.harmless_mean.contiguous()}, str(tmp_st))
            tmp_js.write_text(json.dumps(meta, indent=2))
        return st

    @classmethod
    def load(cls, path: str | Path) -> Candidates:
        """Read candidates saved by :meth:`save`; :class:`DirectionError` naming the fix on a bad pair."""
        st, js = pair_paths(Path(path) / "candidates" if Path(path).is_dir() else path)  # a run folder works too
        what = "candidates are a .safetensors + .json pair written by `refusal-lens extract` or `run`"
        meta = _read_json(js, what, {"positions": list, "model_id": str})
        t = _read_tensors(st, what, ("diffs", "harmful_mean", "harmless_mean"))
        positions = meta["positions"]
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
            raise DirectionError(f"{js}: 'positions' must be a list of integers, got {positions!r}; {what}.")
        shape = tuple(t["diffs"].shape)
        if (t["diffs"].ndim != 3 or shape[1] != len(positions)
                or any(tuple(t[k].shape) != shape for k in ("harmful_mean", "harmless_mean"))):
            raise DirectionError(f"{st} holds tensors of shapes {[tuple(v.shape) for v in t.values()]}, which do "
                                 f"not match {len(positions)} positions; the two files do not belong together. "
                                 "Re-extract them.")
        provenance = meta.get("provenance", {})
        return cls(t["diffs"], list(positions), meta["model_id"], t["harmful_mean"], t["harmless_mean"],
                   provenance if isinstance(provenance, dict) else {})


def candidate_directions(model, harmful: list[str], harmless: list[str], *, batch_size: int = 16,
                         positions: list[int] | None = None, progress: bool = True) -> Candidates:
    """Diff-in-means candidates at every layer's block input and every post-instruction position.

    Args:
        harmful, harmless: instructions (raw user text; the chat template is applied here).
        positions: negative offsets; defaults to all post-instruction positions of the chat template.

    Returns:
        :class:`Candidates` with ``diffs`` of shape ``[n_layers, n_positions, d_model]``.

    Example:
        >>> cands = candidate_directions(model, load_builtin("harmful", "train"), load_builtin("harmless", "train"))
        >>> cands.diffs.shape                  # [24, 5, 896] on the embedded model
    """
    h = mean_activations(model, harmful, positions=positions, batch_size=batch_size, progress=progress,
                         desc="harmful activations")
    hl = mean_activations(model, harmless, positions=positions, batch_size=batch_size, progress=progress,
                          desc="harmless activations")
    return candidates_from_means(model, h, hl)


def candidates_from_means(model, harmful: MeanActivations, harmless: MeanActivations) -> Candidates:
    """Diff-in-means candidates from the two sets' mean activations (e.g. read while filtering,
    :func:`refusal_lens.activations.read_prompts`); what :func:`candidate_directions` returns."""
    from refusal_lens.models import model_id

    if harmful.positions != harmless.positions or harmful.mean.shape != harmless.mean.shape:
        raise DirectionError(f"The harmful and harmless means do not match (positions {harmful.positions} vs "
                             f"{harmless.positions}, shapes {tuple(harmful.mean.shape)} vs {tuple(harmless.mean.shape)}); "
                             "read both with the same layers and positions.")
    diffs = (harmful.mean - harmless.mean).to(torch.float32)
    return Candidates(
        diffs=diffs,
        positions=harmful.positions,
        model_id=model_id(model),
        harmful_mean=harmful.mean.to(torch.float32),
        harmless_mean=harmless.mean.to(torch.float32),
        provenance={"n_harmful": harmful.count, "n_harmless": harmless.count},
    )
