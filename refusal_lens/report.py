"""Self-contained HTML pages of results, all built on one :func:`write_report`.

* :func:`write_run_report` -- ``report.html`` of a ``refusal-lens run`` (refusal scores, side effects,
  selection, data, wall time, sample completions);
* :func:`write_hijack_report` -- ``hijack.html`` of :func:`refusal_lens.hijack.hijack_analysis`.

Pages read like a paper's results section: a short paragraph, tables with units and rounded figures, then
the figures of :mod:`refusal_lens.plots`. plotly.js is inlined once per page, so a page renders offline.

Example:
    >>> write_report("page.html", title="my result", summary_html="<p>...</p>",
    ...              sections=[("Scores", [table(["a", "b (nats)"], [[1, 0.123]])]), ("Figure", [fig])])
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import plotly.graph_objects as go

from refusal_lens.plots import CONDITION_LABELS, refusal_bars

if TYPE_CHECKING:
    from refusal_lens.directions import Direction
    from refusal_lens.hijack import HijackReport
    from refusal_lens.selection import Selection

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 6px;
vertical-align:top;white-space:pre-wrap}th{background:#f3f3f3}td.instr{font-weight:600;max-width:220px}
td.num{text-align:right;font-variant-numeric:tabular-nums}caption{text-align:left;font-size:13px;color:#555;
padding:.3em 0;caption-side:bottom}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:.6em 1em}code{background:#f3f3f3;padding:0 3px}
"""

Part = str | go.Figure
"""One block of a section: an HTML fragment or a plotly figure."""


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def fmt(x, digits: int = 2, *, percent: bool = False) -> str:
    """A number rounded for a table (``percent``: as a whole percentage); ``None`` / NaN as an en dash."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return html.escape(str(x))
    if percent:
        return f"{x:.0%}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence], *, caption: str = "") -> str:
    """An HTML table; numbers in ``rows`` should already be formatted (see :func:`fmt`), strings are escaped.

    Cells that look numeric are right-aligned. ``headers`` name the unit in brackets, e.g. ``"KL (nats)"``.
    """
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            text = str(cell)
            numeric = text.replace(".", "", 1).replace("-", "", 1).replace("%", "").replace("–", "").isdigit()
            cells.append(f"<td class='num'>{text}</td>" if numeric else f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<tr>{head}</tr>{''.join(body)}</table>"


def completions_table(rows: list[dict], conditions: list[str], max_rows: int = 12) -> str:
    """HTML table of sample completions, one column per condition."""
    head = "".join(f"<th>{html.escape(CONDITION_LABELS.get(c, c))}</th>" for c in conditions)
    body = []
    for r in rows[:max_rows]:
        cells = "".join(f"<td>{html.escape(r.get(c, ''))}</td>" for c in conditions)
        body.append(f"<tr><td class='instr'>{html.escape(r['instruction'])}</td>{cells}</tr>")
    return f"<table><tr><th>instruction</th>{head}</tr>{''.join(body)}</table>"


def write_report(path: str | Path, *, title: str, summary_html: str,
                 sections: Sequence[tuple[str, Sequence[Part]]]) -> Path:
    """Write a self-contained HTML page: the title, ``summary_html``, then each ``(heading, parts)`` section.

    plotly.js is inlined once, with the page's first figure; the others reuse it (no CDN, renders offline).
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{summary_html}"]
    js_included = False
    for heading, blocks in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for block in blocks:
            if isinstance(block, go.Figure):
                parts.append(block.to_html(full_html=False, include_plotlyjs=not js_included))
                js_included = True
            else:
                parts.append(block)
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# The run's report.html
# --------------------------------------------------------------------------------------------------


def _filtering_text(filtering: dict | None) -> str:
    if not filtering:
        return "Train and val prompts were used unfiltered."
    return ("The paper's filtering kept harmful train/val prompts the model refuses and harmless ones it "
            "answers (refusal metric > 0 / < 0); the test split is not filtered.")


def _run_tables(selection: Selection, evaluation: dict, direction: Direction) -> dict[str, str]:
    c = evaluation["conditions"]
    conds = [k for k in CONDITION_LABELS if k in c]
    refusal = table(
        ["condition", "prompts", "refusal score (share)", "coherent (%)", "median perplexity",
         "mean 3-gram repetition (share)"],
        [[CONDITION_LABELS[k], c[k]["n"], fmt(c[k]["refusal_score"]),
          fmt(c[k].get("coherent_fraction"), percent=True), fmt(c[k].get("median_perplexity"), 1),
          fmt(c[k].get("mean_repetition"))] for k in conds],
        caption="Refusal score: share of greedy completions containing one of the paper's refusal phrases. "
                "Coherence is judged under the base model (perplexity and repetition), on ablated completions.")
    ce = evaluation["ce_loss_harmless_completions"]
    effects = table(
        ["measure", "baseline", "direction ablated", "change"],
        [["KL(base ‖ ablated), last token (nats)", "0", fmt(evaluation["kl_harmless_test_last_token"], 3),
          fmt(evaluation["kl_harmless_test_last_token"], 3)],
         ["cross-entropy on the base model's completions (nats/token)", fmt(ce["baseline"], 3),
          fmt(ce["ablated"], 3), fmt(ce["delta"], 3)]],
        caption="Side effects of ablation on the harmless test prompts.")
    scored = sorted((s for s in selection.scores if not math.isnan(s.bypass)), key=lambda s: s.bypass)
    picked = (direction.layer, direction.position)
    sel = table(
        ["layer", "position", "bypass (log-odds)", "induce (log-odds)", "KL (nats)", "passes paper filters",
         "selected"],
        [[s.layer, s.position, fmt(s.bypass), fmt(s.induce), fmt(s.kl, 3), "yes" if s.passes else "no",
          "★" if (s.layer, s.position) == picked else ""] for s in scored],
        caption=f"Every fully scored candidate on the val split, by bypass score. Refusal metric without "
                f"intervention: harmful {fmt(selection.baseline['harmful_refusal_metric'])}, harmless "
                f"{fmt(selection.baseline['harmless_refusal_metric'])} (log-odds of the refusal tokens). "
                f"Rule: {selection.rule_text}.")
    search = selection.config.get("addition_coeff_search") or {}
    shares = search.get("share_metric_positive_by_coeff") or {}
    addition = table(
        ["coefficient (× direction norm)", "harmless val prompts with refusal metric > 0 (%)"],
        [[fmt(float(k), 1), fmt(v, percent=True)] for k, v in shares.items()],
        caption=f"Addition-coefficient search at the direction's layer; chosen: {search.get('chosen')}.")
    filtering = evaluation.get("filtering")
    data = table(
        ["set and split", "scored", "kept by the filter", "used"],
        [[k.replace("_", " "), v["scored"], v["kept"], v["used"]] for k, v in (filtering or {}).items()],
        caption=_filtering_text(filtering))
    timings = evaluation.get("timings_s") or {}
    wall = table(["step", "wall time (s)"],
                 [[k, fmt(float(v), 0)] for k, v in timings.items()]
                 + [["total", fmt(float(evaluation.get("seconds_total", math.nan)), 0)]])
    return {"refusal": refusal, "effects": effects, "selection": sel, "addition": addition,
            "data": data if filtering else f"<p>{html.escape(_filtering_text(filtering))}</p>", "wall": wall}


def _mmlu_html(m: dict) -> str:
    """MMLU base vs ablated, each with n and its 95 % Wilson interval (or why it was skipped)."""
    if "skipped" in m:
        return f"<p>MMLU skipped: {html.escape(m['skipped'])}</p>"
    b, e = m["base"], m["edited"]
    return (f"<p>MMLU accuracy ({html.escape(m['format'])}, n={b['n']}): {b['rate']:.3f} [{b['ci95'][0]:.2f}, "
            f"{b['ci95'][1]:.2f}] base -> {e['rate']:.3f} [{e['ci95'][0]:.2f}, {e['ci95'][1]:.2f}] ablated; answers "
            f"changed on {m['answer_changed']['rate']:.2f} of the questions.</p>")


def write_run_report(path: str | Path, direction: Direction, selection: Selection, evaluation: dict,
                     rows: list[dict]) -> Path:
    """The run's self-contained ``report.html`` (``rows``: the lines of ``completions.jsonl``)."""
    c = evaluation["conditions"]
    best = selection.score_of(direction.layer, direction.position)
    warn = "" if selection.passed_paper_filters else (
        f"<p class='warn'>No candidate passed the paper's filters (induce &gt; 0, KL &lt; {selection.config['max_kl']}, "
        f"layer &lt; {selection.config['max_layer_frac']}L). The direction was picked by: "
        f"<b>{html.escape(selection.rule_text)}</b>.</p>")
    add = evaluation["addition"]
    summary = (
        f"<p>Model <code>{html.escape(evaluation['model_id'])}</code>. Selected direction: layer "
        f"<b>{direction.layer}</b>, post-instruction position <b>{direction.position}</b> "
        f"(bypass {fmt(best.bypass)}, induce {fmt(best.induce)}, KL {fmt(best.kl, 3)} nats on the val split). "
        f"Refusal tokens: {html.escape(', '.join(repr(s) for s in evaluation['refusal_tokens']))}.</p>{warn}"
        f"<p>Ablating the direction takes the refusal score of harmful test prompts from "
        f"<b>{fmt(c['harmful_baseline']['refusal_score'])}</b> to <b>{fmt(c['harmful_ablated']['refusal_score'])}</b> "
        f"({fmt(c['harmful_ablated'].get('coherent_fraction'), percent=True)} of completions coherent); adding it "
        f"to harmless prompts takes theirs from {fmt(c['harmless_baseline']['refusal_score'])} to "
        f"{fmt(add['coeff1_refusal'])} (coefficient 1) and {fmt(add['tuned_refusal'])} (coefficient "
        f"{fmt(add['tuned_coeff'], 1)}). The run took {fmt(float(evaluation['seconds_total']), 0)} s.</p>")
    t = _run_tables(selection, evaluation, direction)
    conds = [k for k in CONDITION_LABELS if k in c]
    by_instr: dict[str, dict] = {}
    for r in rows:
        by_instr.setdefault(r["instruction"], {"instruction": r["instruction"]})[r["condition"]] = r["completion"]
    harmful_rows = [v for v in by_instr.values() if "harmful_baseline" in v]
    harmless_rows = [v for v in by_instr.values() if "harmless_baseline" in v]
    notes = "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in selection.notes) + "</ul>"
    sections: list[tuple[str, list[Part]]] = [
        ("Refusal on the test split", [t["refusal"], refusal_bars(evaluation)]),
        ("Side effects of ablation", [t["effects"]]),
        *([("MMLU (capability probe)", [_mmlu_html(evaluation["mmlu"])])] if evaluation.get("mmlu") else []),
        ("Direction selection", [t["selection"], selection.plot(), notes if selection.notes else ""]),
        ("Addition coefficient", [t["addition"]]),
        ("Data", [t["data"]]),
        ("Sample completions: harmful prompts",
         [completions_table(harmful_rows, [k for k in conds if k.startswith("harmful")])]),
        ("Sample completions: harmless prompts",
         [completions_table(harmless_rows, [k for k in conds if k.startswith("harmless")])]),
        ("Wall time", [t["wall"]]),
    ]
    return write_report(path, title="refusal-lens run", summary_html=summary, sections=sections)


# --------------------------------------------------------------------------------------------------
# The hijack analysis' hijack.html
# --------------------------------------------------------------------------------------------------


def write_hijack_report(report: HijackReport, path: str | Path) -> Path:
    """The self-contained ``hijack.html`` of a :class:`~refusal_lens.hijack.HijackReport`."""
    from refusal_lens.hijack import HARMLESS, SPANS

    rep, meta = report, report.metadata
    s = rep.summary()
    layer = meta.get("direction_layer")
    n = {c: meta.get("n_harmless") if c == HARMLESS else meta.get("n_harmful") for c in rep.conditions}
    suffixes = "" if meta.get("suffix") is None else (
        f" Adversarial suffix ({meta.get('suffix_tokens')} tokens): <code>{html.escape(str(meta['suffix']))}</code>; "
        f"random suffix of the same length: <code>{html.escape(str(meta.get('random_suffix')))}</code>.")
    summary = (
        f"<p>Model <code>{html.escape(str(meta.get('model_id')))}</code>; refusal direction at layer {layer}, "
        f"post-instruction position {meta.get('direction_position')}. Everything is read at the last token of "
        f"{meta.get('n_harmful')} harmful and {meta.get('n_harmless')} harmless prompts.{suffixes}</p>")
    sections: list[tuple[str, list[Part]]] = []
    if rep.behaviour:
        keys = ("refusal_score", "coherent_fraction", "echoes_suffix")
        sections.append(("What the model says", [table(
            ["condition", "prompts", "refusal score (share)", "coherent (%)", "echoes the suffix (%)"],
            [[c, n[c], fmt(rep.behaviour[c][keys[0]]), fmt(rep.behaviour[c][keys[1]], percent=True),
              fmt(rep.behaviour[c][keys[2]], percent=True)] for c in rep.conditions if c in rep.behaviour],
            caption=f"Greedy completions of {meta.get('max_new_tokens')} tokens; refusal score: share with a "
                    "refusal phrase."), rep.plot_behaviour()]))
    sections.append(("Alignment with the refusal direction", [table(
        ["condition", f"cosine at layer {layer}", "cosine, final residual", f"projection at layer {layer}",
         f"top-{len(rep.top_heads)} head attribution (sum)"],
        [[c, fmt(s["cosine_at_layer"][c], 3), fmt(s["cosine_final"][c], 3), fmt(s["projection_at_layer"][c]),
          fmt(s["top_head_attribution_sum"][c])] for c in rep.conditions],
        caption="Cosine (unitless) and projection (residual-stream units) of the last-token residual on the "
                "unit direction, mean over prompts."
                + ("" if "cosine_drop_adversarial_vs_random" not in s else
                   " Cosine at the direction's layer, random minus adversarial suffix: "
                   f"{fmt(s['cosine_drop_adversarial_vs_random'], 3)} (positive: the adversarial suffix "
                   "suppresses the direction more).")),
        rep.plot_cosine()]))
    sections.append(("Top heads", [table(
        ["head"] + [f"{c} (attribution)" for c in rep.conditions],
        [[h] + [fmt(rep.head_attr_mean[c][i]) for c in rep.conditions] for i, h in enumerate(rep.head_labels)],
        caption=f"Direct attribution of each head's last-token output onto the direction at layer {layer}'s "
                "input (residual-stream units, mean over prompts); heads chosen on harmful prompts without a "
                "suffix."), rep.plot_attribution()]))
    shares = s["attention_share_mean_over_top_heads"]
    sections.append(("Where the top heads look", [table(
        ["condition"] + [f"{sp.replace('_', ' ')} (%)" for sp in SPANS],
        [[c] + [fmt(shares[c].get(sp), percent=True) for sp in SPANS] for c in rep.conditions],
        caption="Share of the last token's attention on each span, mean over the top heads and prompts."),
        rep.plot_attention_mass(), rep.plot_attention_tokens()]))
    return write_report(path, title="Adversarial suffixes and the refusal direction", summary_html=summary,
                        sections=sections)
