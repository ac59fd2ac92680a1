"""The teaching notebooks run top to bottom, and their HTML export draws its figures with no network.

Each notebook is executed once (nbclient, a fresh kernel), exported to HTML with nbconvert, and checked:
no ``<script src=...>`` from the network in any cell output (plotly's ``notebook_connected`` renderer loads
plotly.js from a CDN and draws blank figures offline), plotly.js inlined exactly once, and every figure
present. nbconvert's own page template links require.js and MathJax from a CDN; figures do not need them
(plotly.js 4 sets ``window.Plotly`` whether or not require.js loaded), so those two are the only remote
scripts allowed in the export.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
REMOTE_SCRIPT = re.compile(r"<script[^>]*\bsrc\s*=\s*['\"]?((?:https?:)?//[^'\" >]+)", re.I)
NBCONVERT_TEMPLATE_SCRIPTS = ("require.js", "mathjax")


def _plotlyjs_signature() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()[:200]


@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_renders_offline(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    html, _ = HTMLExporter().from_notebook_node(nb)
    (tmp_path / f"{path.stem}.html").write_text(html)

    outputs = [o.get("data", {}).get("text/html", "") for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", [])]
    for out in outputs:
        assert not REMOTE_SCRIPT.search(out), REMOTE_SCRIPT.search(out).group(1)
    remote = REMOTE_SCRIPT.findall(html)
    assert all(any(k in url.lower() for k in NBCONVERT_TEMPLATE_SCRIPTS) for url in remote), remote
    assert html.count(_plotlyjs_signature()) == 1  # plotly.js inlined once for the whole notebook
    figures = [o for o in outputs if "plotly-graph-div" in o]
    assert figures, "the notebook shows no plotly figure"
    assert html.count('class="plotly-graph-div"') == len(figures)
