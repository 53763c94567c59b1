"""Notebook and window display: PNG bytes of a figure, inline display, interactive backends."""

from __future__ import annotations

import warnings

from matplotlib.figure import Figure

from camlens.viz.png import GLYPH_MISSING


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """A figure as PNG bytes (through the Agg canvas)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=GLYPH_MISSING)
        fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def in_notebook() -> bool:
    """Whether code runs in a Jupyter/IPython kernel (where figures display inline)."""
    import sys

    ip = sys.modules.get("IPython")
    if ip is None:
        return False
    shell = ip.get_ipython() if hasattr(ip, "get_ipython") else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def interactive_backend() -> bool:
    """Whether matplotlib's current backend can open a window (not Agg, PDF, SVG… nor inline)."""
    import matplotlib
    from matplotlib.backends import BackendFilter, backend_registry

    name = matplotlib.get_backend().lower()
    if "inline" in name:
        return False
    return name not in {b.lower() for b in backend_registry.list_builtin(BackendFilter.NON_INTERACTIVE)}


def display_figure(fig: Figure) -> str:
    """Show ``fig`` now; returns where: ``"notebook"`` (IPython's ``display``, so it shows even when
    the call is not the cell's last expression), ``"window"`` (a pyplot window, in a script with an
    interactive backend; blocks until closed as ``plt.show()`` does), or ``"none"`` (a
    non-interactive backend such as Agg: nothing can be shown; save the figure instead)."""
    if in_notebook():
        from IPython.display import display

        display(fig)
        return "notebook"
    if not interactive_backend():
        return "none"
    import matplotlib.pyplot as plt

    manager = plt.figure().canvas.manager  # a pyplot manager to host our figure
    if manager is None:
        return "none"
    manager.canvas.figure = fig
    fig.set_canvas(manager.canvas)
    plt.show()
    return "window"
