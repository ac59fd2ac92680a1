"""Plotly figures that render with no network, in Jupyter and in a notebook's HTML export.

Plotly's ``notebook_connected`` renderer loads plotly.js from a CDN, and its ``notebook`` renderer adds a
MathJax script from a CDN to every figure: opened offline (a laptop on a train, an air-gapped cluster) the
first shows blank figures. :func:`offline_figures` inlines plotly.js once, in the output of the cell that
calls it, and every later figure is plain HTML that draws with it.
"""

from __future__ import annotations

import plotly.io as pio
from plotly.io.base_renderers import MimetypeRenderer

RENDERER = "refusal_lens_offline"


class OfflineRenderer(MimetypeRenderer):
    """Figures as ``text/html`` that use the plotly.js inlined by :func:`offline_figures` (no CDN)."""

    def __init__(self, height: int = 480):
        self.height = height

    def to_mimebundle(self, fig_dict) -> dict:
        html = pio.to_html(fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
                           default_width="100%", default_height=self.height, validate=False)
        return {"text/html": html}


def plotlyjs_html() -> str:
    """A ``<script>`` holding the whole plotly.js bundle (about 4.6 MB), as figures need it offline."""
    from plotly.offline import get_plotlyjs

    return f"<script type=\"text/javascript\">{get_plotlyjs()}</script>"


def offline_figures(height: int = 480) -> None:
    """Make every plotly figure shown in this notebook render offline (call it once, near the top).

    Displays plotly.js inline in this cell's output and makes :class:`OfflineRenderer` the default
    renderer, so the notebook and its HTML export (``jupyter nbconvert --to html``) need no network.

    Example:
        >>> from refusal_lens import offline_figures
        >>> offline_figures()          # in the first code cell of a notebook
        >>> fig.show()                 # or just end a cell with a figure
    """
    from IPython.display import HTML, display

    pio.renderers[RENDERER] = OfflineRenderer(height)
    pio.renderers.default = RENDERER
    display(HTML(plotlyjs_html()))
