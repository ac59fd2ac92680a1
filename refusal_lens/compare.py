"""Edit methods side by side: the same splits, the same selected direction and the same judges.

``run_compare`` is what ``refusal-lens compare`` calls. The expensive shared work runs once:

1. refusal tokens, the paper's filtering, diff-in-means candidates (one extraction) and one selection;
2. the base model's completions, last-token logits, CE and MMLU answers (shared by every method);
3. per method, under its intervention: completions on the harmful test split, HarmBench and the harmless
   test split, all three in one stream of batches; the refusal metric and KL(base || edited) on harmless
   test, both read from the generation's prefill logits (no second pass); CE of the base model's own
   harmless completions; MMLU on the same questions; then the base model judges the coherence of its
   completions.

Every rate is a :class:`~refusal_lens.stats.Rate` (k, n, 95 % Wilson interval). The output folder (written
atomically) holds ``compare.json``, ``table.md``, ``completions.jsonl``, ``methods/<name>.*`` and
``report.html`` with the two Pareto figures.
"""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import torch
from rich.console import Console

from refusal_lens import __version__
from refusal_lens.data import load_builtin_records
from refusal_lens.data.external import load_harmbench, mmlu_jsonl
from refusal_lens.evaluate import (
    coherence,
    completion_ce,
    is_refusal,
    kl_last,
    refusal_metric_from_logits,
)
from refusal_lens.interventions import complete
from refusal_lens.io import atomic_dir, check_output_dir
from refusal_lens.jsonio import json_safe
from refusal_lens.methods import (
    METHOD_NAMES,
    EditMethod,
    MethodError,
    build_methods,
    check_subspace_rank,
    export_method,
    parse_methods,
)
from refusal_lens.mmlu import change, load_mmlu, mmlu, resolve_format
from refusal_lens.models import model_id
from refusal_lens.stats import Rate

console = Console(stderr=True, soft_wrap=True)

SETS = ("harmful_test", "harmbench", "harmless_test")


@dataclass
class CompareConfig:
    """Settings of ``refusal-lens compare`` (each is a CLI option)."""

    methods: list[str] = field(default_factory=lambda: list(METHOD_NAMES))
    subspace_rank: int = 3
    n_train: int = 128
    n_val: int = 32
    n_test: int | None = None
    n_harmbench: int | None = None  # None: every standard test behaviour (159); 0: skip HarmBench
    harmbench_categories: list[str] | None = None
    mmlu_per_subject: int = 1  # 0: skip MMLU
    mmlu_format: str = "zero-shot-prefix"
    max_new_tokens: int = 40
    batch_size: int = 16
    gen_batch_size: int = 256  # prompts per generation batch, the sets of a method together (finished prompts leave it)
    strategy: str = "fast"
    top_k: int = 6
    max_layer_frac: float = 0.8
    filter: bool = True
    refusal_ids: list[int] | None = None
    seed: int = 0


def validate_compare(cfg: CompareConfig) -> list[str]:
    """Every check that needs no model: methods, subspace rank, data packages, HarmBench categories,
    MMLU format, built-in splits. Returns the parsed method names.

    Raises:
        MethodError, DataError: one line naming the fix.
    """
    names = parse_methods(cfg.methods)
    if "subspace" in names:
        # without filtering the first n_train train prompts are used; filtering may drop more later
        records = load_builtin_records("harmful", "train")[: None if cfg.filter else cfg.n_train]
        check_subspace_rank(cfg.subspace_rank, len({r.category for r in records if r.category}))
    if cfg.n_harmbench != 0:
        if cfg.harmbench_categories is not None and not [c for c in cfg.harmbench_categories if c.strip()]:
            raise MethodError("--harmbench-categories is empty; name at least one category or leave it out")
        load_harmbench("test", categories=cfg.harmbench_categories)
    if cfg.mmlu_per_subject > 0:
        mmlu_jsonl()
        resolve_format(cfg.mmlu_format)
    elif cfg.mmlu_per_subject < 0:
        raise MethodError(f"--mmlu-per-subject must be >= 0 (0 skips MMLU), got {cfg.mmlu_per_subject}")
    if cfg.max_new_tokens < 1 or cfg.batch_size < 1 or cfg.gen_batch_size < 1:
        raise MethodError("--max-new-tokens, --batch-size and --gen-batch-size must be >= 1")
    return names


def _run_config(cfg: CompareConfig):
    from refusal_lens.pipeline import RunConfig

    return RunConfig(n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, max_new_tokens=cfg.max_new_tokens,
                     batch_size=cfg.batch_size, gen_batch_size=cfg.gen_batch_size, strategy=cfg.strategy, top_k=cfg.top_k,
                     filter=cfg.filter,
                     max_layer_frac=cfg.max_layer_frac,
                     refusal_ids=cfg.refusal_ids, seed=cfg.seed, mmlu_per_subject=0)


# --------------------------------------------------------------------------------------------------
# Judging one condition (the base model or one method)
# --------------------------------------------------------------------------------------------------


def _judge(model, iv, prompts: dict[str, list[str]], refusal_ids, cfg: CompareConfig, *, base: dict | None,
           mmlu_pool) -> tuple[dict, dict[str, list[str]]]:
    """Completions and numbers of one condition; ``iv`` is entered once around all of it."""
    from contextlib import nullcontext

    out: dict = {}
    sets = {s: ps for s, ps in prompts.items() if ps}
    with iv if iv is not None else nullcontext():
        # every set in one stream of batches; the prefill's last-position logits are the sets' next-token logits
        done = complete(model, [p for ps in sets.values() for p in ps], max_new_tokens=cfg.max_new_tokens,
                        batch_size=cfg.gen_batch_size, desc=" + ".join(sets))
        parts = dict(zip(sets, done.split([len(ps) for ps in sets.values()]), strict=True))
        comps = {s: c.texts for s, c in parts.items()}
        for s, texts in comps.items():
            out[f"{s}_refusal"] = Rate.of(is_refusal(c) for c in texts).to_dict()
        harmless = prompts["harmless_test"]
        logits_hl = parts["harmless_test"].first_logits
        metric = refusal_metric_from_logits(parts["harmful_test"].first_logits, refusal_ids)
        out["refusal_metric_harmful"] = float(metric.mean())
        ref_completions = comps["harmless_test"] if base is None else base["_harmless_completions"]
        out["ce_harmless"] = completion_ce(model, harmless, ref_completions, batch_size=cfg.batch_size)
        mm = None
        if mmlu_pool is not None:
            mm = mmlu(model, n_per_subject=cfg.mmlu_per_subject, seed=cfg.seed, fmt=cfg.mmlu_format,
                      questions=mmlu_pool, batch_size=max(1, cfg.batch_size // 2))
    out["_logits_harmless"] = logits_hl
    out["_harmless_completions"] = comps["harmless_test"]
    out["_mmlu"] = mm
    if mm is not None:
        out["mmlu"] = mm.accuracy.to_dict()
    if base is None:
        out["kl_harmless"] = 0.0
        out["ce_delta"] = 0.0
    else:
        out["kl_harmless"] = kl_last(base["_logits_harmless"], logits_hl)
        out["ce_delta"] = out["ce_harmless"] - base["ce_harmless"]
        if mm is not None:
            ch = change(base["_mmlu"], mm)
            out["mmlu_delta"], out["mmlu_answer_changed"] = ch["delta"], ch["answer_changed"]
    return out, comps


def _coherence(model, prompts: dict[str, list[str]], comps: dict[str, list[str]], cfg) -> dict:
    """The base model judges the completions of the harmful sets (what an edit is meant to unlock)."""
    flags, by = [], {}
    for s in ("harmful_test", "harmbench"):
        if s in comps:
            c = coherence(model, prompts[s], comps[s], batch_size=max(1, cfg.batch_size // 2))
            by[s] = Rate.of(c.coherent).to_dict()
            flags += c.coherent
    return {"coherent": Rate.of(flags).to_dict(), "coherent_by_set": by}


def pareto_front(rows: list[dict], x: str, y: str = "harmful_test_refusal") -> list[str]:
    """Methods no other method beats on both ``x`` (lower is better; absolute value for a change) and the
    harmful refusal rate (lower is better)."""
    def xv(r):
        v = r.get(x)
        return abs(v) if v is not None else math.inf

    pts = [(r["method"], xv(r), r[y]["rate"]) for r in rows if r.get(y)]
    return [n for n, a, b in pts if not any((a2 <= a and b2 <= b) and (a2 < a or b2 < b) for _, a2, b2 in pts)]


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


@dataclass
class CompareResult:
    out: Path
    rows: list[dict]
    info: dict
    seconds: float


def _harmful_by_category(prompts: list[str]) -> dict[str, list[str]]:
    cat = {r.instruction: r.category for r in load_builtin_records("harmful")}
    by: dict[str, list[str]] = {}
    for p in prompts:
        if cat.get(p):
            by.setdefault(cat[p], []).append(p)
    return by


def run_compare(model, out: str | Path, cfg: CompareConfig | None = None, *, overwrite: bool = False,
                export_all: str | Path | None = None) -> CompareResult:
    """Compare the edit methods of ``cfg.methods`` on one model; write the folder ``out`` (see module doc)."""
    from refusal_lens.pipeline import extract_candidates, prepare_data
    from refusal_lens.selection import select_direction

    cfg = cfg or CompareConfig()
    names = validate_compare(cfg)
    check_output_dir(out, overwrite)
    if export_all is not None:
        check_output_dir(export_all, overwrite)
    rc = _run_config(cfg)
    splits = rc.load_splits()
    harmbench = [] if cfg.n_harmbench == 0 else load_harmbench("test", categories=cfg.harmbench_categories)
    harmbench = harmbench[: cfg.n_harmbench] if cfg.n_harmbench else harmbench
    mmlu_pool = load_mmlu() if cfg.mmlu_per_subject > 0 else None
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    with torch.no_grad(), atomic_dir(out, overwrite=overwrite) as tmp:
        t = time.perf_counter()
        console.print("[bold]1/4 extract and select[/] (once, for every method)")
        data = prepare_data(model, rc, splits)  # the same first step as `run`
        rtoks, filtering = data.refusal_tokens, data.filtering
        cands = extract_candidates(model, data, rc)  # run's too: the means read by the filtering pass
        direction, selection = select_direction(model, cands, splits.harmful["val"], splits.harmless["val"], rtoks.ids,
                                                strategy=cfg.strategy, top_k=cfg.top_k, batch_size=cfg.batch_size,
                                                max_layer_frac=cfg.max_layer_frac, base_logits=data.val_logits)
        direction.provenance.update(version=__version__, filtering=filtering)
        direction.save(tmp / "direction")
        selection.save(tmp / "selection.json")
        console.print(f"  direction: layer {direction.layer}, position {direction.position} ({selection.rule_text})")
        methods = build_methods(model, names, direction, cands, harmless_train=splits.harmless["train"],
                                harmful_by_category=_harmful_by_category(splits.harmful["train"]),
                                subspace_rank=cfg.subspace_rank, batch_size=cfg.batch_size)
        for m in methods:
            m.save(tmp / "methods" / m.name)
        timings["extract_select_build"] = round(time.perf_counter() - t, 1)

        prompts = {"harmful_test": splits.harmful["test"], "harmbench": harmbench, "harmless_test": splits.harmless["test"]}
        t = time.perf_counter()
        console.print("[bold]2/4 base model[/] (shared by every method)")
        base, base_comps = _judge(model, None, prompts, rtoks.ids, cfg, base=None, mmlu_pool=mmlu_pool)
        base.update(method="base", seconds=round(time.perf_counter() - t, 1))
        rows_out = {"base": base}
        all_comps = {"base": base_comps}
        for i, m in enumerate(methods, 1):
            t = time.perf_counter()
            console.print(f"[bold]3/4 method {i}/{len(methods)}: {m.name}[/]")
            res, comps = _judge(model, m.intervention(model), prompts, rtoks.ids, cfg, base=base, mmlu_pool=mmlu_pool)
            res.update(_coherence(model, prompts, comps, cfg))
            res.update(method=m.name, seconds=round(time.perf_counter() - t, 1), exact_weights=m.exact_weights,
                       provenance=m.provenance)
            rows_out[m.name] = res
            all_comps[m.name] = comps
            console.print("  " + format_row(res))
        rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows_out.values()]
        method_rows = [r for r in rows if r["method"] != "base"]
        info = {
            "model_id": model_id(model), "version": __version__, "config": asdict(cfg),
            "direction": {"layer": direction.layer, "position": direction.position, "rule": selection.rule_text},
            "refusal_tokens": rtoks.strings, "filtering": filtering,
            "n": {s: len(p) for s, p in prompts.items()} | {"mmlu": len(base["_mmlu"].records) if base["_mmlu"] else 0},
            "pareto": {"kl_harmless": pareto_front(method_rows, "kl_harmless"),
                       "mmlu_delta": pareto_front(method_rows, "mmlu_delta") if mmlu_pool is not None else []},
            "timings_s": timings,
        }
        t = time.perf_counter()
        with open(tmp / "completions.jsonl", "w") as f:
            for name, comps in all_comps.items():
                for s, cs in comps.items():
                    for p, c in zip(prompts[s], cs, strict=True):
                        f.write(json.dumps({"method": name, "set": s, "instruction": p, "completion": c}) + "\n")
        info["seconds_total"] = round(time.perf_counter() - t0, 1)
        (tmp / "compare.json").write_text(json.dumps(json_safe({"info": info, "rows": rows}), indent=1))
        (tmp / "table.md").write_text(markdown_table(rows) + "\n")
        write_compare_report(tmp / "report.html", rows, info, all_comps, prompts)
    exports = {}
    if export_all is not None:
        console.print(f"[bold]4/4 export[/] every method's weights -> {export_all}")
        exports = export_all_methods(model, methods, export_all, overwrite=overwrite)
    return CompareResult(Path(out), rows, info | {"exports": exports}, time.perf_counter() - t0)


def export_all_methods(model, methods: list[EditMethod], out: str | Path, *, overwrite: bool = False) -> dict:
    """``out/<method>/``: each method's edited weights as a verified HF folder (ACE is skipped, with the
    reason in ``out/exports.json``)."""
    from refusal_lens.errors import ExportError

    report = {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for m in methods:
            try:
                report[m.name] = export_method(model, m, tmp / m.name)
                report[m.name]["path"] = str(Path(out) / m.name)
            except ExportError as e:
                if m.kind != "ace":
                    raise
                report[m.name] = {"skipped": str(e)}
            console.print(f"  {m.name}: {report[m.name]}")
        (tmp / "exports.json").write_text(json.dumps(report, indent=1))
    return report


# --------------------------------------------------------------------------------------------------
# Table, figures, report
# --------------------------------------------------------------------------------------------------

COLUMNS = ("method", "harmful refusal", "HarmBench refusal", "harmless refusal", "refusal metric", "KL",
           "CE (delta)", "MMLU (delta)", "coherent", "seconds")


def _rate(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{d['rate']:.2f} [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}] n={d['n']}"


def _cells(r: dict) -> list[str]:
    mm = _rate(r.get("mmlu"))
    if r.get("mmlu_delta") is not None:
        mm += f" ({r['mmlu_delta']:+.3f})"
    return [r["method"], _rate(r.get("harmful_test_refusal")), _rate(r.get("harmbench_refusal")),
            _rate(r.get("harmless_test_refusal")), f"{r['refusal_metric_harmful']:+.2f}", f"{r['kl_harmless']:.3f}",
            f"{r['ce_harmless']:.3f} ({r['ce_delta']:+.3f})", mm, _rate(r.get("coherent")), f"{r['seconds']:.0f}"]


def format_row(r: dict) -> str:
    """One method's numbers on one line (CLI)."""
    return "; ".join(f"{c} {v}" for c, v in zip(COLUMNS, _cells(r), strict=True))


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a markdown table: rates as ``rate [Wilson 95 %] n=``."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def pareto_figure(rows: list[dict], x: str, title: str, xlabel: str) -> go.Figure:
    """Harmful refusal (y, with Wilson bars) against ``x`` for each method and the base model."""
    fig = go.Figure()
    for r in rows:
        if r.get(x) is None or not r.get("harmful_test_refusal"):
            continue
        y = r["harmful_test_refusal"]
        fig.add_trace(go.Scatter(
            x=[r[x]], y=[y["rate"]], mode="markers+text", name=r["method"], text=[r["method"]],
            textposition="top center",
            error_y={"type": "data", "symmetric": False, "array": [y["ci95"][1] - y["rate"]],
                     "arrayminus": [y["rate"] - y["ci95"][0]]},
            hovertemplate=f"{r['method']}<br>{xlabel} %{{x:.3f}}<br>harmful refusal %{{y:.2f}} (n={y['n']})<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis={"title": "harmful refusal (test split)", "range": [-0.05, 1.05]},
                      height=460, showlegend=False)
    return fig


def write_compare_report(path: Path, rows: list[dict], info: dict, comps: dict, prompts: dict) -> Path:
    """``report.html``: the table, the two Pareto figures, each method's provenance and sample completions."""
    from refusal_lens.report import write_report

    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows)
    d = info["direction"]
    summary = (
        f"<p>Model <code>{html.escape(info['model_id'])}</code>; one extraction and one selection for every method: "
        f"layer <b>{d['layer']}</b>, position <b>{d['position']}</b> ({html.escape(d['rule'])}). Prompts: "
        + ", ".join(f"{k} {v}" for k, v in info["n"].items())
        + ". Rates are shown as rate [95 % Wilson interval] n. KL(base || edited) is at the last token of the "
        "harmless test prompts; CE is on the base model's own greedy harmless completions; coherence is judged by "
        f"the base model on the harmful completions. Wall time {info['seconds_total']:.0f} s.</p>"
        f"<table><tr>{head}</tr>{body}</table>"
        f"<p>Pareto front (harmful refusal vs KL): {html.escape(', '.join(info['pareto']['kl_harmless']))}; "
        f"vs MMLU change: {html.escape(', '.join(info['pareto']['mmlu_delta']) or '-')}.</p>")
    figs = [pareto_figure(rows, "kl_harmless", "Harmful refusal vs KL on harmless prompts", "KL(base || edited)")]
    if any(r.get("mmlu_delta") is not None for r in rows):
        figs.append(pareto_figure([r for r in rows if r["method"] != "base"] + [rows[0] | {"mmlu_delta": 0.0}],
                                  "mmlu_delta", "Harmful refusal vs MMLU change", "MMLU accuracy change"))
    sections = [("Pareto figures", figs)]
    for r in rows[1:]:
        prov = html.escape(json.dumps(r.get("provenance", {}), indent=1))
        sample = "".join(
            f"<tr><td class='instr'>{html.escape(p)}</td><td>{html.escape(comps['base']['harmful_test'][i])}</td>"
            f"<td>{html.escape(comps[r['method']]['harmful_test'][i])}</td></tr>"
            for i, p in enumerate(prompts["harmful_test"][:6]))
        sections.append((f"{r['method']}", [f"<pre>{prov}</pre><table><tr><th>harmful instruction</th><th>base</th>"
                                            f"<th>{html.escape(r['method'])}</th></tr>{sample}</table>"]))
    return write_report(path, title="refusal-lens compare", summary_html=summary, sections=sections)


def load_compare(out: str | Path) -> dict:
    """Read ``compare.json`` of a compare folder."""
    return json.loads((Path(out) / "compare.json").read_text())
