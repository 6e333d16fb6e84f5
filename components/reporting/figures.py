"""Charts for the self-contained HTML reports (validation, ROI, monitoring): matplotlib without
pyplot (no global state, no display), PNG embedded as base64 so a page refers to no URL."""

from __future__ import annotations

import base64
import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(width: float = 9.0, height: float = 3.2) -> Figure:
    figure = Figure(figsize=(width, height), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def png_base64(figure: Figure) -> str:
    buffer = io.BytesIO()
    # No "Software" text chunk: the page then holds no URL at all, even encoded.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_data_uri(figure: Figure) -> str:
    return "data:image/png;base64," + png_base64(figure)
