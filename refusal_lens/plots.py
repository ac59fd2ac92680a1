"""Every plotly figure of refusal-lens, one function per figure; results call these from their ``.plot()``.

Each function takes a result (or its plain-dict part) and returns a :class:`plotly.graph_objects.Figure`;
nothing here computes on a model. :mod:`refusal_lens.report` puts the figures on HTML pages.

Example:
    >>> from refusal_lens import plots
    >>> plots.selection_heatmaps(selection).show()        # same as selection.plot()
    >>> plots.hijack_figures(report)["cosine"].show()      # same as report.plot()["cosine"]
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from refusal_lens.attribution import Attribution
    from refusal_lens.hijack import HijackReport
    from refusal_lens.selection import Selection
    from refusal_lens.suffix import SuffixResult

CONDITION_LABELS = {
    "harmful_baseline": "harmful, baseline",
    "harmful_ablated": "harmful, direction ablated",
    "harmless_baseline": "harmless, baseline",
    "harmless_ablated": "harmless, direction ablated",
    "harmless_added_coeff1": "harmless, direction added (coeff 1)",
    "harmless_added_tuned": "harmless, direction added (tuned coeff)",
}
"""Display names of the run's evaluation conditions (``evaluation.json``'s ``conditions`` keys)."""

HIJACK_COLORS = {"harmful": "#c0392b", "harmful+adversarial": "#8e44ad", "harmful+random": "#e67e22",
                 "harmless": "#27ae60"}
"""Colour of each condition of :func:`refusal_lens.hijack.hijack_analysis`."""


# --------------------------------------------------------------------------------------------------
# The run: refusal scores and direction selection
# --------------------------------------------------------------------------------------------------


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


def selection_heatmaps(selection: Selection) -> go.Figure:
    """Heatmaps of bypass / induce / KL (and the screens) over layer x position, the pick marked with a star."""
    import torch

    sel = selection
    metrics = [("bypass", "bypass (lower = refusal removed)"), ("induce", "induce (> 0 = refusal added)"),
               ("kl", "KL on harmless"), ("screen_bypass", "screening bypass"),
               ("screen_kl", "screening KL")]
    metrics = [m for m in metrics if not torch.isnan(sel.grid(m[0])).all()]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[t for _, t in metrics], shared_yaxes=True)
    x = [str(p) for p in sel.positions]
    for c, (m, _title) in enumerate(metrics, start=1):
        z = sel.grid(m).tolist()
        z = [[None if math.isnan(v) else v for v in row] for row in z]
        fig.add_trace(go.Heatmap(z=z, x=x, y=list(range(sel.n_layers)), colorscale="RdBu_r" if m != "kl" else "Viridis",
                                 colorbar={"x": c / len(metrics) - 0.02, "len": 0.8}, name=m,
                                 hovertemplate="layer %{y}, pos %{x}<br>" + m + " %{z:.3f}<extra></extra>"), 1, c)
        fig.add_trace(go.Scatter(x=[str(sel.position)], y=[sel.layer], mode="markers",
                                 marker={"symbol": "star", "size": 16, "color": "gold",
                                         "line": {"color": "black", "width": 1}},
                                 name="selected", showlegend=c == 1), 1, c)
        fig.update_xaxes(title_text="post-instruction position", row=1, col=c)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(title=f"Direction selection: layer {sel.layer}, position {sel.position} ({sel.rule_text})",
                      height=480)
    return fig


# --------------------------------------------------------------------------------------------------
# Direct attribution
# --------------------------------------------------------------------------------------------------


def attribution_figure(attr: Attribution, k: int = 15, title: str | None = None) -> go.Figure:
    """A layer x head heatmap of mean head terms and a bar chart of the top-``k`` terms by ``|value|``."""
    title = title or attr.metadata.get("title", attr.kind)
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.55, 0.45],
        horizontal_spacing=0.12,
        subplot_titles=("heads (mean over prompts)", f"top {k} terms by |value|"),
    )
    mean = attr.mean_heads().numpy()
    lim = float(abs(mean).max()) if mean.size else 1.0
    fig.add_trace(
        go.Heatmap(
            z=mean,
            x=[f"H{h}" for h in range(attr.n_heads)],
            y=[f"L{l}" for l in range(attr.n_layers)],
            colorscale="RdBu",
            zmid=0.0,
            zmin=-lim,
            zmax=lim,
            colorbar=dict(x=0.5, len=0.9),
            hovertemplate="%{y}%{x}: %{z:.4f}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    top = attr.top(k, kind="all", sort="abs")[::-1]
    fig.add_trace(
        go.Bar(
            x=[v for _, v in top],
            y=[n for n, _ in top],
            orientation="h",
            marker_color=["#c0392b" if v > 0 else "#2e86c1" for _, v in top],
            hovertemplate="%{y}: %{x:.4f}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    total = float(attr.total.mean()) if attr.n_prompts else float("nan")
    fig.update_layout(
        title=f"{title} (total {total:.3f}, {attr.n_prompts} prompts)",
        height=max(350, 22 * attr.n_layers + 150),
        showlegend=False,
    )
    return fig


# --------------------------------------------------------------------------------------------------
# Adversarial suffixes and hijacking (paper section 5)
# --------------------------------------------------------------------------------------------------


def suffix_losses(res: SuffixResult) -> go.Figure:
    """The suffix search's loss per step (step 0: the initial suffix) and the running best."""
    steps = list(range(len(res.losses) + 1))
    values = [res.initial_loss] + list(res.losses) if res.initial_loss is not None else res.losses
    best, run = [], float("inf")
    for v in values:
        run = min(run, v)
        best.append(run)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name="current"))
    fig.add_trace(go.Scatter(x=steps, y=best, mode="lines", name="best", line=dict(dash="dash")))
    objective = res.config.get("objective", "")
    fig.update_layout(
        title=f"suffix search ({objective}): {res.suffix!r}",
        xaxis_title="step",
        yaxis_title="loss",
        height=380,
    )
    return fig


# --------------------------------------------------------------------------------------------------
# Hijacking
# --------------------------------------------------------------------------------------------------


def _color(condition: str) -> str:
    return HIJACK_COLORS.get(condition, "#555")


def hijack_cosine(rep: HijackReport) -> go.Figure:
    """Cosine of the last-token residual with the direction per layer, mean +- std band per condition."""
    fig = go.Figure()
    x = list(range(len(rep.layer_labels)))
    for c in rep.conditions:
        mean = rep.cosine_mean[c]
        std = rep.cosine_std[c]
        color = _color(c)
        upper = [m + s for m, s in zip(mean, std, strict=True)]
        lower = [m - s for m, s in zip(mean, std, strict=True)]
        fig.add_trace(
            go.Scatter(
                x=x + x[::-1],
                y=upper + lower[::-1],
                fill="toself",
                fillcolor=color,
                opacity=0.15,
                line=dict(width=0),
                hoverinfo="skip",
                showlegend=False,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=mean,
                mode="lines+markers",
                name=c,
                line=dict(color=color),
                customdata=std,
                hovertemplate=f"{c}<br>layer %{{x}}: %{{y:.3f}} ± %{{customdata:.3f}}<extra></extra>",
            )
        )
    layer = rep.metadata.get("direction_layer")
    if layer is not None:
        fig.add_vline(x=layer, line_dash="dot", annotation_text="direction layer")
    fig.update_layout(
        title="cosine of the last-token residual with the refusal direction (mean ± std)",
        xaxis=dict(
            title="layer (block input; last = final residual)", tickvals=x, ticktext=rep.layer_labels
        ),
        yaxis_title="cosine similarity",
        height=420,
    )
    return fig


def hijack_attribution(rep: HijackReport) -> go.Figure:
    """Direct attribution of the top heads onto the direction, one bar group per condition (std bars)."""
    fig = go.Figure()
    for c in rep.conditions:
        fig.add_trace(
            go.Bar(
                x=rep.head_labels,
                y=rep.head_attr_mean[c],
                name=c,
                marker_color=_color(c),
                error_y=dict(type="data", array=rep.head_attr_std[c], visible=True),
            )
        )
    fig.update_layout(
        barmode="group",
        height=420,
        yaxis_title="direct attribution onto the direction",
        title=f"top {len(rep.top_heads)} heads by direct attribution (chosen on harmful, "
        f"no suffix), at layer {rep.metadata.get('direction_layer')}'s input",
    )
    return fig


def hijack_attention_mass(rep: HijackReport) -> go.Figure:
    """Share of each top head's last-token attention on each span, one panel per span."""
    from refusal_lens.hijack import SPANS

    spans = [s for s in SPANS if any(s in rep.attention_mass[c] for c in rep.conditions)]
    fig = make_subplots(
        rows=1, cols=len(spans), subplot_titles=[f"attention to {s}" for s in spans], shared_yaxes=True
    )
    for j, s in enumerate(spans, start=1):
        for c in rep.conditions:
            vals = rep.attention_mass[c].get(s)
            if vals is None:
                continue
            fig.add_trace(
                go.Bar(
                    x=rep.head_labels,
                    y=vals,
                    name=c,
                    legendgroup=c,
                    showlegend=j == 1,
                    marker_color=_color(c),
                ),
                row=1,
                col=j,
            )
    fig.update_layout(
        barmode="group",
        height=420,
        yaxis_title="share of last-token attention",
        title="where the top heads look from the last token (mean over prompts)",
    )
    return fig


def hijack_attention_tokens(rep: HijackReport) -> go.Figure:
    """Token-level last-token attention of the top heads on one example prompt per condition."""
    conds = [c for c in rep.conditions if c in rep.examples]
    if not conds:
        return go.Figure()
    fig = make_subplots(
        rows=len(conds),
        cols=1,
        vertical_spacing=0.08,
        subplot_titles=[f"{c}: {rep.examples[c]['instruction'][:70]!r}" for c in conds],
    )
    for i, c in enumerate(conds, start=1):
        ex = rep.examples[c]
        toks, spans = ex["tokens"], ex["spans"]
        z = ex["attention"]
        hover = [
            [
                f"{rep.head_labels[h]} -> #{t} {toks[t]!r} [{spans[t]}]: {z[h][t]:.3f}"
                for t in range(len(toks))
            ]
            for h in range(len(z))
        ]
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=list(range(len(toks))),
                y=rep.head_labels,
                text=hover,
                hoverinfo="text",
                colorscale="Viridis",
                zmin=0,
                showscale=i == 1,
            ),
            row=i,
            col=1,
        )
        # shade the suffix span
        suf = [t for t, s in enumerate(spans) if s == "suffix"]
        if suf:
            fig.add_vrect(
                x0=suf[0] - 0.5, x1=suf[-1] + 0.5, line_color="white", line_width=2, row=i, col=1
            )
    fig.update_layout(
        height=260 * len(conds) + 80,
        title="last-token attention of the top heads over the prompt's tokens "
        "(hover for tokens; white box = suffix)",
    )
    return fig


def hijack_behaviour(rep: HijackReport) -> go.Figure:
    """Refused, coherent and suffix-echoing shares of the greedy completions per condition."""
    fig = go.Figure()
    for c in rep.conditions:
        b = rep.behaviour.get(c)
        if not b:
            continue
        keys = ["refusal_score", "coherent_fraction", "echoes_suffix"]
        fig.add_trace(go.Bar(x=keys, y=[b[k] for k in keys], name=c, marker_color=_color(c)))
    fig.update_layout(
        barmode="group", height=380, yaxis=dict(range=[0, 1], title="share of completions"),
        title=f"greedy completions ({rep.metadata.get('max_new_tokens')} tokens): refused, coherent, "
        "echoing the suffix",
    )
    return fig


def hijack_figures(rep: HijackReport) -> dict[str, go.Figure]:
    """All hijack figures: ``behaviour`` (when completions were generated), ``cosine``, ``attribution``,
    ``attention_mass``, ``attention_tokens``."""
    return {
        **({"behaviour": hijack_behaviour(rep)} if rep.behaviour else {}),
        "cosine": hijack_cosine(rep),
        "attribution": hijack_attribution(rep),
        "attention_mass": hijack_attention_mass(rep),
        "attention_tokens": hijack_attention_tokens(rep),
    }
