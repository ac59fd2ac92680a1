"""Figures and one self-contained HTML report of a ``refusal-lens run``."""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go

CONDITION_LABELS = {
    "harmful_baseline": "harmful, baseline",
    "harmful_ablated": "harmful, direction ablated",
    "harmless_baseline": "harmless, baseline",
    "harmless_ablated": "harmless, direction ablated",
    "harmless_added_coeff1": "harmless, direction added (coeff 1)",
    "harmless_added_tuned": "harmless, direction added (tuned coeff)",
}


def refusal_bars(evaluation: dict) -> go.Figure:
    """Bar chart: refusal score (substring) per condition, coherent share printed on the bars."""
    conds = [c for c in CONDITION_LABELS if c in evaluation["conditions"]]
    ys = [evaluation["conditions"][c]["refusal_score"] for c in conds]
    text = []
    for c in conds:
        coh = evaluation["conditions"][c].get("coherent_fraction")
        text.append(f"{evaluation['conditions'][c]['refusal_score']:.2f}" + (f" (coherent {coh:.0%})" if coh is not None else ""))
    colors = ["#c0392b" if c.startswith("harmful") else "#2980b9" for c in conds]
    fig = go.Figure(go.Bar(x=[CONDITION_LABELS[c] for c in conds], y=ys, text=text, marker_color=colors,
                           hovertemplate="%{x}<br>refusal score %{y:.3f}<extra></extra>"))
    fig.update_layout(title="Refusal score on the test split (fraction of completions with a refusal phrase)",
                      yaxis={"range": [0, 1.05], "title": "refusal score"}, height=420)
    return fig


def completions_table(rows: list[dict], conditions: list[str], max_rows: int = 12) -> str:
    """HTML table of sample completions, one column per condition."""
    head = "".join(f"<th>{html.escape(CONDITION_LABELS.get(c, c))}</th>" for c in conditions)
    body = []
    for r in rows[:max_rows]:
        cells = "".join(f"<td>{html.escape(r.get(c, ''))}</td>" for c in conditions)
        body.append(f"<tr><td class='instr'>{html.escape(r['instruction'])}</td>{cells}</tr>")
    return f"<table><tr><th>instruction</th>{head}</tr>{''.join(body)}</table>"


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 6px;
vertical-align:top;white-space:pre-wrap}th{background:#f3f3f3}td.instr{font-weight:600;max-width:220px}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:.6em 1em}code{background:#f3f3f3;padding:0 3px}
"""


def write_report(path: str | Path, *, title: str, summary_html: str, figures: list[go.Figure],
                 sections: list[tuple[str, str]]) -> Path:
    """Write a self-contained HTML page: plotly.js inlined once, then each figure and section."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{summary_html}"]
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False))
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
