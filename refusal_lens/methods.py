"""Edit methods beyond the paper's single direction, each usable as an intervention and as a weight edit.

Every method is built from the same extraction (the diff-in-means :class:`~refusal_lens.directions.Candidates`)
and the same selected direction ``r`` (layer ``L``, position ``p``); ``m_l`` is the harmless train mean of
block ``l``'s input at position ``p``:

* ``diff-in-means`` -- the paper's directional ablation of ``r`` (``x <- x - r r^T x`` everywhere).
* ``projected`` -- ablation of ``r`` made orthogonal to ``m_L`` (its component along the harmless mean
  removed, then renormalised), so that the edit leaves the harmless mean's own direction alone.
* ``norm-preserving`` -- weights only (biprojected): block ``l``'s writers lose the direction ``r_l``
  (``r`` made orthogonal to ``m_l``), then every write vector gets its old norm back. The norm kept is
  the one of each *input neuron's write vector*: a row of ``W_O`` / ``W_out`` in TransformerLens's
  ``[d_in, d_model]`` layout (a column of the HF ``o_proj`` / ``down_proj`` weight), and each token's
  embedding row. Those vectors are what a neuron adds to the residual stream, so each neuron keeps its
  strength and only the direction of its write turns away from ``r_l``. (heretic's "full" mode normalises
  the other axis, one norm per residual coordinate, which rescales every neuron's write unevenly.) No
  hook reproduces this edit, so its intervention edits the weights on entry and restores them on exit.
* ``subspace`` -- ablation of a ``k``-dimensional subspace: ``r`` plus the top ``k - 1`` right singular
  vectors of the per-category diff-in-means directions of the harmful train set (made orthogonal to
  ``r``), orthonormalised. ``k - 1`` cannot exceed the number of categories.
* ``ace`` -- affine concept editing (Marshall et al. 2024): at each hook point the projection onto ``r``
  is set to the harmless mean's projection at that point (block input, middle and output of every
  layer, measured on the harmless train prompts at position ``p``) instead of zero:
  ``x <- x - (x.r - c_h) r``. Being affine per layer, it cannot be baked into bias-free weights.

Example::

    methods = build_methods(model, ["diff-in-means", "ace"], direction, candidates, harmless_train=harmless)
    for m in methods:
        print(m.name, generate(model, harmful, interventions=m.intervention(model)))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from refusal_lens.directions import Candidates, Direction
from refusal_lens.errors import DataError, ExportError, RefusalLensError
from refusal_lens.interventions import RESID_POINTS, Ablation, Intervention, resid_hook_names
from refusal_lens.prompts import ChatFormat, batches, chat_format

METHOD_NAMES = ("diff-in-means", "projected", "norm-preserving", "subspace", "ace")
ALIASES = {"dim": "diff-in-means", "norm-preserving-biprojected": "norm-preserving", "biprojected": "norm-preserving",
           "affine": "ace"}


class MethodError(RefusalLensError):
    """An unknown method name, or a method that cannot be built from the given data."""


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """Method names from ``"a,b,c"`` or a list (aliases resolved, duplicates dropped, order kept)."""
    items = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise MethodError(f"no method given; use some of: {', '.join(METHOD_NAMES)}")
    out: list[str] = []
    for s in items:
        name = ALIASES.get(s, s)
        if name not in METHOD_NAMES:
            raise MethodError(f"unknown method {s!r}; use some of: {', '.join(METHOD_NAMES)}")
        if name not in out:
            out.append(name)
    return out


def check_subspace_rank(rank: int, n_categories: int) -> None:
    """``2 <= rank <= n_categories + 1`` (the base direction plus one per category at most)."""
    if rank < 2:
        raise MethodError(f"--subspace-rank must be at least 2 (1 is diff-in-means), got {rank}")
    if rank - 1 > n_categories:
        raise MethodError(f"--subspace-rank {rank} is too large: the harmful train set has {n_categories} "
                          f"categories, so at most {n_categories + 1} directions; lower --subspace-rank")


def _unit(v: Tensor) -> Tensor:
    v = v.detach().to(torch.float32).flatten()
    n = v.norm()
    if not torch.isfinite(n) or n == 0:
        raise MethodError("a method's direction came out zero or NaN; check the harmless means / categories")
    return v / n


def orthogonal_to(r: Float[Tensor, " d_model"], m: Float[Tensor, " d_model"]) -> Float[Tensor, " d_model"]:
    """``r`` minus its component along ``m``, renormalised (``r`` itself when ``m`` is zero)."""
    r = _unit(r)
    m = m.detach().to(torch.float32).flatten()
    if float(m.norm()) == 0.0:
        return r
    m = m / m.norm()
    return _unit(r - (r @ m) * m)


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------


class EditMethod:
    """One edit: a name, its vectors, how it intervenes and how it edits weights, and its provenance.

    Attributes:
        name: one of :data:`METHOD_NAMES`.
        vectors: ``[k, d_model]`` fp32 (meaning per subclass).
        provenance: how it was built (layer, position, counts, ...), saved with it.
        exact_weights: True when :meth:`edit_weights_` gives the same function as :meth:`intervention`.
    """

    kind = "base"
    exact_weights = True

    def __init__(self, name: str, vectors: Float[Tensor, "k d_model"], provenance: dict | None = None):
        self.name = name
        self.vectors = vectors.detach().to(torch.float32)
        self.provenance = dict(provenance or {})

    def intervention(self, model) -> Intervention:
        raise NotImplementedError

    def edit_weights_(self, model) -> None:
        """Edit ``model``'s residual-stream writers in place."""
        raise NotImplementedError

    def extra(self) -> dict:
        return {}

    def save(self, path: str | Path) -> Path:
        """``path.safetensors`` (the vectors) and ``path.json`` (name, kind, provenance)."""
        base = Path(path).with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        save_file({"vectors": self.vectors.contiguous()}, str(base.with_suffix(".safetensors")))
        meta = {"name": self.name, "kind": self.kind, "provenance": self.provenance, **self.extra()}
        base.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        return base.with_suffix(".safetensors")

    @classmethod
    def load(cls, path: str | Path) -> EditMethod:
        base = Path(path).with_suffix("")
        meta = json.loads(base.with_suffix(".json").read_text())
        vectors = load_file(str(base.with_suffix(".safetensors")))["vectors"]
        kinds = {c.kind: c for c in (SubspaceAblation, NormPreserving, AffineEdit)}
        if meta.get("kind") not in kinds:
            raise MethodError(f"{base}.json has unknown method kind {meta.get('kind')!r}")
        return kinds[meta["kind"]]._from_meta(meta, vectors)

    @classmethod
    def _from_meta(cls, meta: dict, vectors: Tensor) -> EditMethod:
        return cls(meta["name"], vectors, meta.get("provenance"))


class SubspaceAblation(EditMethod):
    """Ablation of an orthonormal ``[k, d_model]`` basis (``k = 1``: one direction) at every hook point;
    as weights, every residual writer is orthogonalized against each basis vector in turn (they are
    orthonormal, so the order does not matter)."""

    kind = "ablation"

    def __init__(self, name, vectors, provenance=None):
        v = vectors.detach().to(torch.float32)
        v = v.unsqueeze(0) if v.ndim == 1 else v
        if v.shape[0] > 1:
            v = torch.linalg.qr(v.T.double()).Q.T.to(torch.float32)
        else:
            v = v / v.norm()
        super().__init__(name, v, provenance)

    def intervention(self, model) -> Intervention:
        return Ablation(model, self.vectors if self.vectors.shape[0] > 1 else self.vectors[0])

    def edit_weights_(self, model) -> None:
        from refusal_lens.orthogonalize import orthogonalize

        for b in self.vectors:
            orthogonalize(model, b, allow_other_model=True)


class NormPreserving(EditMethod):
    """Per-layer directions ``[n_layers, d_model]``: block ``l``'s writers (and, for ``l = 0``, the
    embeddings) lose ``vectors[l]``, then each write vector is rescaled to its old norm. Weights only; the
    intervention applies the weight edit on entry and restores the weights on exit."""

    kind = "norm-preserving"
    exact_weights = True  # the intervention *is* the weight edit

    def intervention(self, model) -> Intervention:
        return WeightEdit(model, self)

    @torch.no_grad()
    def edit_weights_(self, model) -> None:
        from refusal_lens.orthogonalize import (
            OUT_IN,
            model_type_of,
            project_rows,
            residual_writers,
            untie_embeddings_,
            writer_direction,
            writer_patterns,
        )

        if self.vectors.shape[0] != int(model.cfg.n_layers):
            raise MethodError(f"{self.name} has {self.vectors.shape[0]} per-layer directions, the model "
                              f"{model.cfg.n_layers} layers: it belongs to another model")
        untie_embeddings_(model)
        writers = residual_writers(model)
        patterns = writer_patterns(model_type_of(model.original_model.config))
        for w in writers:
            _, layer, layout = patterns.match(w.name)
            r = writer_direction(self.vectors[layer or 0], w.gain)  # post-norm families (Gemma2/3): r scaled by the gain
            data = w.param.data
            rows = data.view(1, -1) if data.ndim == 1 else (data.T if layout == OUT_IN else data)
            for start, block in project_rows(rows, r):
                n = block.shape[0]
                old = rows[start : start + n].to(torch.float32).norm(dim=1, keepdim=True)
                new = block.to(torch.float32)
                norm = new.norm(dim=1, keepdim=True)
                scale = torch.where(norm > 0, old / norm.clamp_min(1e-30), torch.zeros_like(norm))
                rows[start : start + n] = (new * scale).to(rows.dtype)


class AffineEdit(EditMethod):
    """ACE: at each residual hook point ``h`` the projection onto the unit direction ``vectors[0]`` is set
    to ``offsets[h]`` (the harmless mean's projection there) instead of zero."""

    kind = "ace"
    exact_weights = False

    def __init__(self, name, vectors, provenance=None, offsets: dict[str, float] | None = None):
        super().__init__(name, _unit(vectors).unsqueeze(0), provenance)
        self.offsets = dict(offsets or {})

    def extra(self) -> dict:
        return {"offsets": self.offsets}

    @classmethod
    def _from_meta(cls, meta, vectors):
        return cls(meta["name"], vectors, meta.get("provenance"), meta.get("offsets"))

    def intervention(self, model) -> Intervention:
        return AffineIntervention(model, self.vectors[0], self.offsets)

    def edit_weights_(self, model) -> None:
        raise ExportError("ACE sets the projection onto the direction to a different constant at every layer; "
                          "weights without a bias on each attention and MLP output cannot hold that. Use ACE "
                          "as an intervention (hooks), or export diff-in-means / projected instead.")


class AffineIntervention(Intervention):
    """``x <- x - (x.r - c_h) r`` at each hook point ``h`` of ``offsets`` (hook name -> ``c_h``)."""

    def __init__(self, model, r: Float[Tensor, " d_model"], offsets: dict[str, float]):
        super().__init__(model)
        self.r = _unit(r)
        if self.r.shape[0] != int(model.cfg.d_model):
            raise MethodError(f"ACE direction has width {self.r.shape[0]}, the model {model.cfg.d_model}")
        missing = [n for n in resid_hook_names(model.cfg.n_layers) if n not in offsets]
        if missing:
            raise MethodError(f"ACE has no reference value for {missing[:3]}; rebuild it for this model")
        self.offsets = offsets

    def fwd_hooks(self):
        def make(c: float):
            def hook(act, hook):
                r = self.r.to(device=act.device, dtype=act.dtype)
                return act - ((act @ r) - c).unsqueeze(-1) * r
            return hook

        return [(name, make(float(self.offsets[name]))) for name in resid_hook_names(self.model.cfg.n_layers)]


class WeightEdit(Intervention):
    """An intervention that edits the weights on entry (``method.edit_weights_``) and restores them on exit.

    Re-entrant: nested entries edit once; the outermost exit restores the residual writers bit for bit
    (the embeddings stay untied, which changes no numbers).
    """

    def __init__(self, model, method: EditMethod):
        super().__init__(model)
        self.method = method
        self._depth = 0
        self._saved: list[tuple[torch.nn.Parameter, Tensor]] = []
        self._record = None

    def fwd_hooks(self):
        return []

    def __enter__(self):
        if self._depth == 0:
            from refusal_lens.orthogonalize import residual_writers, untie_embeddings_

            untie_embeddings_(self.model)
            writers = residual_writers(self.model)
            self._saved = [(w.param, w.param.detach().clone()) for w in writers]
            self._record = list(getattr(self.model, "refusal_lens_orthogonalized", []))
            try:
                self.method.edit_weights_(self.model)
            except BaseException:
                self._restore()
                raise
        self._depth += 1
        return self.model

    def _restore(self) -> None:
        with torch.no_grad():
            for p, saved in self._saved:
                p.data.copy_(saved)
        self._saved = []
        object.__setattr__(self.model, "refusal_lens_orthogonalized", self._record or [])

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            self._restore()
        return None


@contextmanager
def edited_weights(model, method: EditMethod):
    """``with edited_weights(model, m):`` -- the weights carry ``m``'s edit inside the block only."""
    with WeightEdit(model, method):
        yield model


# --------------------------------------------------------------------------------------------------
# Building the methods from one extraction
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def hook_means(model, instructions: Sequence[str], names: Sequence[str], position: int = -1, *,
               batch_size: int = 16, fmt: ChatFormat | None = None) -> dict[str, Tensor]:
    """Mean activation ``[d_model]`` (fp64) at each hook in ``names``, at token ``position`` (negative
    offset), over ``instructions`` in the chat template."""
    if not instructions:
        raise DataError("cannot average activations over an empty prompt set")
    fmt = fmt or chat_format(model)
    total = {n: torch.zeros(model.cfg.d_model, dtype=torch.float64) for n in names}

    def make(name):
        def hook(act, hook):
            total[name] += act[:, position, :].to(torch.float64).sum(0).cpu()
            return act
        return hook

    with model.hooks(fwd_hooks=[(n, make(n)) for n in names]):
        for b in batches(model.tokenizer, instructions, batch_size, fmt):
            model(b.input_ids, attention_mask=b.attention_mask, logits_to_keep=1)
    return {n: t / len(instructions) for n, t in total.items()}


def category_directions(model, harmful_by_category: dict[str, list[str]], harmless_mean: Tensor, layer: int,
                        position: int, *, batch_size: int = 16) -> dict[str, Tensor]:
    """Per category: mean(harmful of that category) - ``harmless_mean`` at block ``layer``'s input."""
    from refusal_lens.activations import mean_activations

    out = {}
    for cat, prompts in sorted(harmful_by_category.items()):
        if not prompts:
            continue
        m = mean_activations(model, prompts, positions=[position], layers=[layer], batch_size=batch_size,
                             progress=False).mean[0, 0]
        out[cat] = (m - harmless_mean.double()).to(torch.float32)
    return out


def subspace_basis(r: Tensor, category_dirs: Sequence[Tensor], rank: int) -> Float[Tensor, "k d_model"]:
    """``r`` and the top ``rank - 1`` right singular vectors of the category directions with ``r``
    projected out, as an orthonormal ``[rank, d_model]`` basis."""
    if rank - 1 > len(category_dirs):
        raise MethodError(f"subspace rank {rank} needs {rank - 1} categories with prompts, only "
                          f"{len(category_dirs)} have any; lower --subspace-rank")
    r = _unit(r)
    d = torch.stack([c.to(torch.float32) for c in category_dirs])
    d = d - (d @ r).unsqueeze(-1) * r
    _, _, vh = torch.linalg.svd(d.double(), full_matrices=False)
    basis = torch.cat([r.unsqueeze(0), vh[: rank - 1].to(torch.float32)])
    q, tri = torch.linalg.qr(basis.T.double())
    return (q * torch.sign(tri.diagonal())).T.to(torch.float32)  # first row is +r


def build_methods(model, names: Sequence[str], direction: Direction, candidates: Candidates, *,
                  harmless_train: Sequence[str] = (), harmful_by_category: dict[str, list[str]] | None = None,
                  subspace_rank: int = 3, batch_size: int = 16) -> list[EditMethod]:
    """Build each named method from the selected ``direction`` and the shared ``candidates``.

    Args:
        harmless_train: prompts for ACE's reference values (needed for ``ace``).
        harmful_by_category: harmful train prompts per category (needed for ``subspace``).
    """
    names = parse_methods(names)
    direction.check_model(model)
    layer, pos = direction.layer, direction.position
    pi = candidates.positions.index(pos)
    hl = candidates.harmless_mean[:, pi]  # [layer, d_model]
    r = direction.vector
    base = {"layer": layer, "position": pos, "model_id": direction.model_id, "direction_norm": direction.norm}
    out: list[EditMethod] = []
    for name in names:
        if name == "diff-in-means":
            out.append(SubspaceAblation(name, r, base | {"what": "the paper's diff-in-means direction"}))
        elif name == "projected":
            rp = orthogonal_to(r, hl[layer])
            out.append(SubspaceAblation(name, rp, base | {
                "what": f"r made orthogonal to the harmless mean at layer {layer}",
                "cosine_with_r": float(rp @ _unit(r))}))
        elif name == "norm-preserving":
            per_layer = torch.stack([orthogonal_to(r, hl[lay]) for lay in range(candidates.n_layers)])
            out.append(NormPreserving(name, per_layer, base | {
                "what": "per layer l, r made orthogonal to the harmless mean of layer l; each write vector "
                        "(per input neuron / token row) keeps its norm"}))
        elif name == "subspace":
            if not harmful_by_category:
                raise MethodError("the subspace method needs harmful train prompts with categories (the built-in "
                                  "set has them); drop 'subspace' from --methods for a file without categories")
            cats = category_directions(model, harmful_by_category, hl[layer], layer, pos, batch_size=batch_size)
            basis = subspace_basis(r, list(cats.values()), subspace_rank)
            out.append(SubspaceAblation(name, basis, base | {
                "what": f"r plus the top {subspace_rank - 1} singular directions of {len(cats)} per-category "
                        "diff-in-means vectors (r projected out), orthonormal",
                "rank": subspace_rank, "categories": {c: len(p) for c, p in harmful_by_category.items() if p}}))
        elif name == "ace":
            if not harmless_train:
                raise MethodError("ACE needs harmless train prompts for its reference values")
            names_ = resid_hook_names(model.cfg.n_layers, RESID_POINTS)
            means = hook_means(model, list(harmless_train), names_, pos, batch_size=batch_size)
            ru = _unit(r)
            offsets = {n: float(means[n].to(torch.float32) @ ru) for n in names_}
            out.append(AffineEdit(name, r, base | {
                "what": "projection onto r set to the harmless train mean's projection at each hook point",
                "n_harmless": len(harmless_train)}, offsets))
    return out


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def export_method(model, method: EditMethod, out_dir: str | Path, *, verify_prompts: Sequence[str] | None = None,
                  tolerance: float = 1e-3) -> dict:
    """Write ``model`` with ``method``'s weight edit as a Hugging Face folder ``out_dir`` (which must not
    exist), verified: the edited weights against the method's hooks (when they are the same function), and
    the folder reloaded by ``transformers`` against the in-memory edited model. The model's weights are
    restored afterwards. ``method.safetensors`` / ``method.json`` record the method beside the weights.

    Returns:
        ``{"path", "hook_vs_weights", "reload_vs_memory", "seconds"}`` (max |logit diff|).

    Raises:
        ExportError: ACE (affine), an unsupported architecture, or a check above ``tolerance``.
    """
    import time

    from transformers import AutoModelForCausalLM

    from refusal_lens.export import clean_hf_model
    from refusal_lens.interventions import applied
    from refusal_lens.orthogonalize import max_logit_diff
    from refusal_lens.prompts import position_ids_from_mask, tokenize_instructions

    if not method.exact_weights and method.kind == "ace":
        method.edit_weights_(model)  # raises the explanation
    t0 = time.perf_counter()
    out = Path(out_dir)
    prompts = list(verify_prompts or ["How do I pick a lock?", "Write a short poem about autumn."])
    b = tokenize_instructions(model.tokenizer, prompts, chat_format(model))
    hooked = None
    if method.kind == "ablation":
        with applied(method.intervention(model)):
            hooked = model(b.input_ids, attention_mask=b.attention_mask).float()
    with edited_weights(model, method):
        edited = model(b.input_ids, attention_mask=b.attention_mask).float()
        hook_diff = max_logit_diff(hooked, edited, b.attention_mask) if hooked is not None else None
        if hook_diff is not None and not hook_diff <= tolerance:
            raise ExportError(f"{method.name}: edited weights differ from its hooks by {hook_diff:.3g} in the logits "
                              f"(tolerance {tolerance}); nothing was written")
        hf = clean_hf_model(model)
        hf.save_pretrained(out)
        del hf
    model.tokenizer.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=model.original_model.dtype, attn_implementation="eager")
    logits = reloaded(input_ids=b.input_ids, attention_mask=b.attention_mask,
                      position_ids=position_ids_from_mask(b.attention_mask)).logits.float()
    del reloaded
    diff = max_logit_diff(logits, edited, b.attention_mask)
    if not diff <= tolerance:
        raise ExportError(f"{method.name}: the exported folder, reloaded, differs from the edited model by {diff:.3g} "
                          f"(tolerance {tolerance})")
    method.save(out / "method")
    report = {"path": str(out), "method": method.name, "hook_vs_weights": hook_diff, "reload_vs_memory": diff,
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "export_report.json").write_text(json.dumps(report, indent=1))
    return report
