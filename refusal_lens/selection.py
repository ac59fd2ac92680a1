"""Select one refusal direction among the diff-in-means candidates (paper appendix C).

For each candidate ``r`` at (layer ``l``, position ``i``):

* **bypass score** -- mean refusal metric on harmful val prompts with ``r`` ablated at every layer
  (lower is better: refusal removed);
* **induce score** -- mean refusal metric on harmless val prompts with ``r`` added at layer ``l``
  (must be > 0: adding it makes the model refuse);
* **KL score** -- ``KL(base || ablated)`` of the next-token distribution at the last position on
  harmless val prompts (must be < 0.1: ablation barely changes harmless behaviour).

The paper keeps candidates with induce > 0, KL < 0.1 and ``l < 0.8 L`` and picks the lowest bypass.
When no candidate passes, :func:`select_direction` relaxes the filters in a fixed, documented order
(:data:`FALLBACKS`) and records which rule picked the direction.

Two strategies:

* ``"exhaustive"`` -- every candidate gets all three scores on the full val sets (the paper).
* ``"fast"`` (default) -- every candidate gets a *screening* bypass estimate; the best position of each
  layer and the ``2 * top_k`` best candidates get a *screening* KL on ``n_screen`` harmless val prompts;
  ``top_k`` candidates get the full three scores: first those whose screens pass fallback 1 (screening
  bypass effective, screening KL < ``kl_slack * max_kl``), then the best low-KL layers, then the lowest
  screening bypass overall. The bypass screen is either

  - ``screen="gradient"`` (default): a first-order (attribution-patching) estimate of the bypass score
    for *all* candidates from one forward + backward pass over the harmful val prompts. Ablating ``r``
    everywhere is the same as removing ``r`` from every write into the residual stream (embedding,
    attention outputs, MLP outputs; appendix E), so with ``w_c`` those writes and ``g_c`` the gradient of
    the mean refusal metric at the point each write lands, the change is
    ``sum_c g_c . (-(w_c . r) r) = -r^T M r`` with ``M = sum_c g_c w_c^T`` (a ``d_model x d_model``
    matrix accumulated once). Every candidate then costs one quadratic form.
  - ``screen="exact"``: the exact bypass score on ``n_screen`` harmful val prompts per candidate.

  Candidates that are zero / NaN are never scored. ``scripts/bench_select.py`` measures fast against
  exhaustive side by side.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformer_lens.utilities import get_act_name

from refusal_lens.directions import Candidates, Direction
from refusal_lens.errors import DataError, DirectionError
from refusal_lens.evaluate import kl_last, last_logits, last_position_logits, refusal_metric_from_logits
from refusal_lens.interventions import Ablation, Addition, Intervention
from refusal_lens.jsonio import json_safe

FALLBACKS = (
    "paper: induce > 0, KL < max_kl, layer < max_layer_frac * L; lowest bypass",
    "fallback 1: drop the induce filter; among effective candidates with KL < max_kl, lowest bypass",
    "fallback 2: no effective candidate has KL < max_kl; among effective candidates, lowest KL",
    "fallback 3: no effective candidate; lowest bypass + kl_weight * KL",
)
"""Selection rules in order. A candidate is *effective* when ablating it closes at least half of the gap
between the mean refusal metric of harmful and of harmless val prompts without intervention (bypass <=
the midpoint of the two baselines, :func:`effective_threshold`): a direction that passes the KL filter
but barely moves refusal is no refusal direction. Rule 2 prefers the least damaging direction that works
over one that does not work."""


def effective_threshold(baseline: dict) -> float:
    """The bypass score at or below which a candidate counts as effective: the midpoint of the harmful and
    harmless val baselines of the refusal metric (``Selection.baseline``)."""
    return 0.5 * (baseline["harmful_refusal_metric"] + baseline["harmless_refusal_metric"])


@dataclass
class CandidateScore:
    """Scores of one candidate (``nan`` where not computed)."""

    layer: int
    position: int
    bypass: float = math.nan
    induce: float = math.nan
    kl: float = math.nan
    screen_bypass: float = math.nan
    screen_kl: float = math.nan
    passes: bool = False


@dataclass
class Selection:
    """The result of :func:`select_direction`: every candidate's scores and the pick.

    Attributes:
        scores: one :class:`CandidateScore` per scored (or screened) candidate.
        layer, position: the pick.
        rule: which rule of :data:`FALLBACKS` picked it (0 = the paper's filters).
        baseline: mean refusal metric on harmful / harmless val prompts without intervention.
        config: the thresholds and strategy used; ``seconds``: wall time.
    """

    scores: list[CandidateScore]
    layer: int
    position: int
    rule: int
    baseline: dict
    config: dict
    n_layers: int
    positions: list[int]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def passed_paper_filters(self) -> bool:
        return self.rule == 0

    @property
    def rule_text(self) -> str:
        return FALLBACKS[self.rule]

    def score_of(self, layer: int, position: int) -> CandidateScore | None:
        return next((s for s in self.scores if (s.layer, s.position) == (layer, position)), None)

    def grid(self, metric: str) -> torch.Tensor:
        """``[layer, pos]`` grid of one metric (``bypass``, ``induce``, ``kl`` or ``screen_bypass``)."""
        g = torch.full((self.n_layers, len(self.positions)), math.nan)
        for s in self.scores:
            g[s.layer, self.positions.index(s.position)] = getattr(s, metric)
        return g

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rule_text"] = self.rule_text
        d["passed_paper_filters"] = self.passed_paper_filters
        return d

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write JSON atomically; an existing file is replaced only with ``overwrite``, a link never."""
        from refusal_lens.io import write_text_atomic

        return write_text_atomic(path, json.dumps(json_safe(self.to_dict()), indent=1), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> Selection:
        d = json.loads(Path(path).read_text())
        d.pop("rule_text", None)
        d.pop("passed_paper_filters", None)
        d["scores"] = [CandidateScore(**{k: (math.nan if v is None else v) for k, v in s.items()}) for s in d["scores"]]
        return cls(**d)

    def plot(self):
        """Heatmaps of bypass / induce / KL over layer x position, the pick starred
        (:func:`refusal_lens.plots.selection_heatmaps`)."""
        from refusal_lens.plots import selection_heatmaps

        return selection_heatmaps(self)


def _metric(model, prompts, refusal_ids, intervention: Intervention, batch_size) -> float:
    logits = last_logits(model, prompts, interventions=intervention, batch_size=batch_size)
    return float(refusal_metric_from_logits(logits, refusal_ids).mean())


def score_candidate(model, direction: Direction, harmful_val: Sequence[str], harmless_val: Sequence[str],
                    refusal_ids: Sequence[int], base_harmless_logits: torch.Tensor, *, batch_size: int = 16,
                    induce_coeff: float = 1.0) -> tuple[float, float, float]:
    """(bypass, induce, kl) of one candidate; three forward passes over the val sets."""
    abl = Ablation(model, direction.vector)
    bypass = _metric(model, harmful_val, refusal_ids, abl, batch_size)
    induce = _metric(model, harmless_val, refusal_ids,
                     Addition(model, direction.raw, direction.layer, induce_coeff), batch_size)
    kl = kl_last(base_harmless_logits, last_logits(model, harmless_val, interventions=abl, batch_size=batch_size))
    return bypass, induce, kl


def _write_hooks(model) -> list[str]:
    """Hook names of every write into the residual stream, in order."""
    names = [get_act_name("embed")]
    if get_act_name("pos_embed") in model.hook_dict:
        names.append(get_act_name("pos_embed"))
    for layer in range(model.cfg.n_layers):
        names += [get_act_name("attn_out", layer), get_act_name("mlp_out", layer)]
    return names


def gradient_screen_matrix(model, prompts: Sequence[str], refusal_ids: Sequence[int], *,
                           batch_size: int = 8, progress: bool = True) -> tuple[torch.Tensor, float]:
    """``M = sum_c g_c w_c^T / n`` over residual writes ``w_c`` and the gradients ``g_c`` of the mean
    refusal metric there; ``-r^T M r`` estimates the change of the bypass score when ``r`` is ablated.

    Returns:
        ``(M [d_model, d_model] float64, mean refusal metric without intervention)``.
    """
    from refusal_lens.prompts import batches, chat_format

    d = model.cfg.d_model
    M = torch.zeros(d, d, dtype=torch.float64)
    total_metric, n = 0.0, len(prompts)
    names = _write_hooks(model)
    acts: list[torch.Tensor] = []

    def keep(act, hook):
        act = act if act.requires_grad else act.detach().requires_grad_(True)
        act.retain_grad()
        acts.append(act)
        return act

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # only activation gradients are needed: no weight gradients (a third of the cost)
        p.requires_grad_(False)
    try:
        for b in tqdm(list(batches(model.tokenizer, prompts, batch_size, chat_format(model))), desc="gradient screen", disable=not progress,
                      leave=False):
            acts.clear()
            total_metric += _accumulate_screen(model, b, names, keep, acts, refusal_ids, n, M)
    finally:
        for p in params:
            p.requires_grad_(True)
    return M, total_metric / n


def _accumulate_screen(model, b, names, keep, acts, refusal_ids, n, M) -> float:
    with torch.enable_grad(), model.hooks(fwd_hooks=[(name, keep) for name in names]):
        # whole rows: the gradients at the shared prefix's positions count too
        logits = last_position_logits(model, b.input_ids, b.attention_mask, shared_prefix=False)
        metric = refusal_metric_from_logits(logits, refusal_ids)
        metric.sum().div(n).backward()
    for act in acts:
        if act.grad is not None:
            mask = b.attention_mask.bool().to(act.device)
            g, w = act.grad[mask].double(), act.detach()[mask].double()  # [tokens, d_model]
            M += (g.T @ w).to(M.device)
    return float(metric.detach().sum())


def _pick(scores: list[CandidateScore], max_kl: float, kl_weight: float,
          effective: float = math.inf) -> tuple[CandidateScore, int]:
    """Apply :data:`FALLBACKS` in order; ``effective`` is the bypass threshold of rules 1-2."""
    full = [s for s in scores if not math.isnan(s.bypass)]
    works = [s for s in full if s.bypass <= effective]
    paper = [s for s in full if s.induce > 0 and s.kl < max_kl]
    if paper:
        return min(paper, key=lambda s: s.bypass), 0
    if pool := [s for s in works if s.kl < max_kl]:
        return min(pool, key=lambda s: s.bypass), 1
    if works:
        return min(works, key=lambda s: s.kl), 2
    return min(full, key=lambda s: s.bypass + kl_weight * s.kl), 3


def select_direction(
    model,
    candidates: Candidates,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_ids: Sequence[int],
    *,
    strategy: str = "fast",
    max_layer_frac: float = 0.8,
    max_kl: float = 0.1,
    kl_weight: float = 10.0,
    screen: str = "gradient",
    n_screen: int = 8,
    top_k: int = 6,
    kl_slack: float = 1.5,
    batch_size: int = 16,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    base_logits: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
) -> tuple[Direction, Selection]:
    """Pick a direction by the paper's bypass / induce / KL rule.

    Args:
        candidates: from :func:`refusal_lens.directions.candidate_directions`.
        harmful_val, harmless_val: validation instructions (disjoint from the extraction prompts).
        refusal_ids: the model's refusal tokens (:func:`refusal_lens.evaluate.find_refusal_tokens`).
        strategy: ``"fast"`` (screen then score the ``top_k``) or ``"exhaustive"`` (score all).
        layers, positions: restrict the search (e.g. for a quick look); default all below the layer limit.
        base_logits: the base model's last-position logits ``([n_harmful_val, vocab], [n_harmless_val, vocab])``
            of the val prompts, when already read (the paper's filtering reads them); default: computed here.

    Returns:
        The selected :class:`Direction` (its provenance records the scores and rule) and the
        :class:`Selection` with every candidate's scores.

    Example:
        >>> direction, selection = select_direction(model, cands, harmful_val, harmless_val, refusal_ids)
        >>> selection.rule_text, selection.plot()
    """
    if strategy not in ("fast", "exhaustive"):
        raise DataError(f"Unknown selection strategy {strategy!r}; use 'fast' or 'exhaustive'.")
    if not harmful_val or not harmless_val:
        raise DataError("Selection needs non-empty harmful and harmless validation sets (e.g. the 'val' split).")
    t0 = time.perf_counter()
    n_layers = candidates.n_layers
    max_layer = int(max_layer_frac * n_layers)
    pool = [(layer, pos) for layer in range(max_layer) for i, pos in enumerate(candidates.positions)
            if candidates.is_valid(layer, i) and (layers is None or layer in layers)
            and (positions is None or pos in positions)]
    if not pool:
        raise DirectionError(
            f"No valid (non-zero, finite) candidate below layer {max_layer} ({max_layer_frac} x {n_layers} layers); "
            "raise max_layer_frac (--max-layer-frac) or extract with more varied prompts.")
    notes = []
    skipped = len(range(max_layer)) * len(candidates.positions) - len(pool)
    if skipped:
        notes.append(f"{skipped} zero or NaN candidates skipped (e.g. layer 0 at template tokens).")

    if base_logits is None:
        base_harmful = last_logits(model, harmful_val, batch_size=batch_size)
        base_harmless = last_logits(model, harmless_val, batch_size=batch_size)
    else:
        base_harmful, base_harmless = base_logits
        if (len(base_harmful), len(base_harmless)) != (len(harmful_val), len(harmless_val)):
            raise DataError(f"base_logits hold {len(base_harmful)} harmful and {len(base_harmless)} harmless rows for "
                            f"{len(harmful_val)} and {len(harmless_val)} val prompts; pass the logits of these "
                            "prompts, in order (or none: they are computed here).")
    baseline = {
        "harmful_refusal_metric": float(refusal_metric_from_logits(base_harmful, refusal_ids).mean()),
        "harmless_refusal_metric": float(refusal_metric_from_logits(base_harmless, refusal_ids).mean()),
    }
    threshold = effective_threshold(baseline)
    scores = {key: CandidateScore(*key) for key in pool}

    to_score = pool
    if strategy == "fast" and len(pool) > top_k:
        if screen == "gradient":
            M, base_metric = gradient_screen_matrix(model, list(harmful_val), refusal_ids,
                                                    batch_size=max(1, batch_size // 2), progress=progress)
            for layer, pos in pool:
                r = candidates.direction(layer, pos).vector.double()
                scores[(layer, pos)].screen_bypass = base_metric - float(r @ M @ r)
            how = f"a first-order (gradient) bypass estimate on {len(harmful_val)} harmful val prompts"
        elif screen == "exact":
            screen_prompts = list(harmful_val[:n_screen])
            for layer, pos in tqdm(pool, desc="screening candidates", disable=not progress, leave=False):
                d = candidates.direction(layer, pos)
                scores[(layer, pos)].screen_bypass = _metric(model, screen_prompts, refusal_ids,
                                                             Ablation(model, d.vector), batch_size)
            how = f"the exact bypass score on {len(screen_prompts)} harmful val prompts"
        else:
            raise DataError(f"Unknown screen {screen!r}; use 'gradient' or 'exact'.")
        # the KL filter decides the pick on most models, so screen KL too (n_screen harmless val prompts):
        # on the best position of every layer (by screening bypass; finds the low-KL layers) and on the
        # 2 * top_k best candidates overall (where the pick lies; neighbouring positions differ in KL)
        per_layer: dict[int, tuple[int, int]] = {}
        overall = sorted(pool, key=lambda k: scores[k].screen_bypass)
        for key in overall:
            per_layer.setdefault(key[0], key)
        kl_keys = list(dict.fromkeys(list(per_layer.values()) + overall[: 2 * top_k]))
        kl_prompts = list(harmless_val[:n_screen])
        base_kl_logits = base_harmless[: len(kl_prompts)]
        for key in tqdm(kl_keys, desc="screening KL", disable=not progress, leave=False):
            d = candidates.direction(*key)
            scores[key].screen_kl = kl_last(base_kl_logits, last_logits(model, kl_prompts, batch_size=batch_size,
                                                                        interventions=Ablation(model, d.vector)))
        # score, in this order: the candidates rule 1 would pick by the screens (screening bypass effective,
        # screening KL low), the best low-KL layers, then the best overall (which may be the only effective
        # ones): all three kinds feed the rules of FALLBACKS
        low = [k for k in overall if scores[k].screen_kl < max_kl * kl_slack]  # unscreened: NaN, never low
        rule1 = [k for k in low if scores[k].screen_bypass <= threshold]
        best_of_layer = set(per_layer.values())
        low_layers = [k for k in low if k in best_of_layer]
        to_score = list(dict.fromkeys(rule1 + low_layers[: (top_k + 1) // 2] + overall))[:top_k]
        notes.append(f"fast selection: screened {len(pool)} candidates by {how}; screened KL on {len(kl_keys)} "
                     f"(the best position of each of {len(per_layer)} layers and the {2 * top_k} best overall; "
                     f"{len(kl_prompts)} harmless val prompts); scored fully {len(to_score)}: first those whose "
                     f"screens pass rule 1 (bypass <= {threshold:.2f}, KL < {kl_slack} x {max_kl}), then the best "
                     "low-KL layers, then the best overall.")

    for layer, pos in tqdm(to_score, desc="scoring candidates", disable=not progress, leave=False):
        d = candidates.direction(layer, pos)
        s = scores[(layer, pos)]
        s.bypass, s.induce, s.kl = score_candidate(model, d, harmful_val, harmless_val, refusal_ids,
                                                   base_harmless, batch_size=batch_size)
        s.passes = s.induce > 0 and s.kl < max_kl

    best, rule = _pick(list(scores.values()), max_kl, kl_weight, effective=threshold)
    if rule:
        notes.append(f"No candidate passed the paper's filters; picked by {FALLBACKS[rule]}.")
    config = {"strategy": strategy, "screen": screen, "max_layer_frac": max_layer_frac, "max_kl": max_kl, "kl_weight": kl_weight,
              "n_screen": n_screen, "top_k": top_k, "n_harmful_val": len(harmful_val),
              "n_harmless_val": len(harmless_val), "refusal_ids": list(refusal_ids)}
    selection = Selection(list(scores.values()), best.layer, best.position, rule, baseline, config, n_layers,
                          list(candidates.positions), time.perf_counter() - t0, notes)
    direction = candidates.direction(best.layer, best.position)
    direction.provenance.update(selection={"rule": FALLBACKS[rule], "bypass": best.bypass, "induce": best.induce,
                                           "kl": best.kl, "strategy": strategy})
    return direction, selection


# --------------------------------------------------------------------------------------------------
# The addition coefficient (the paper's induce step, when coefficient 1 induces too little)
# --------------------------------------------------------------------------------------------------

ADD_COEFFS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)


def choose_addition_coeff(model, direction: Direction, harmless_val: list[str], refusal_ids, target: float,
                          batch_size: int, progress: bool = True) -> tuple[float, dict]:
    """Smallest coefficient in :data:`ADD_COEFFS` whose share of harmless val prompts with refusal
    metric > 0 reaches ``target`` (one forward pass per coefficient; no generation).

    When none reaches it, the coefficient with the highest share (the smallest among ties): large
    coefficients break the model (the share falls again as the output turns to noise), so the last
    coefficient tried is not a safe default.
    """
    shares = {}
    for c in tqdm(ADD_COEFFS, desc="addition coefficient", disable=not progress, leave=False):
        logits = last_logits(model, harmless_val, interventions=direction.add(model, c), batch_size=batch_size)
        m = refusal_metric_from_logits(logits, refusal_ids)
        shares[c] = float((m > 0).float().mean())
        if shares[c] >= target:
            return c, shares
    return max(shares, key=lambda c: (shares[c], -c)), shares
