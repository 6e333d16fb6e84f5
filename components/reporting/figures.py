"""Charts for the self-contained HTML reports (validation, ROI, monitoring): matplotlib without
pyplot (no global state, no display), PNG embedded as base64 so a page refers to no URL.

Money and percent axes use ``money_formatter`` / ``percent_formatter``: tick labels such as
"2.5 M", "300 k" or "1,500 %", never matplotlib's offset ("1e6") or scientific notation.
"""

from __future__ import annotations

import base64
import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter

MINUS = "\N{MINUS SIGN}"  # as matplotlib's own tick labels write it
MONEY_UNITS = ((1e6, " M"), (1e3, " k"))  # the largest unit the axis range reaches, else none
MAX_DECIMALS = 6


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


class _PlainTickFormatter(Formatter):
    """Tick labels with thousands separators, as few decimals as the ticks need and one unit
    for the whole axis (chosen from the axis range); no offset, no scientific notation."""

    def __init__(self, units: tuple[tuple[float, str], ...] = (), suffix: str = "") -> None:
        self.units = units
        self.suffix = suffix
        self.divisor, self.unit, self.decimals = 1.0, "", 0

    def set_locs(self, locs) -> None:
        """Choose the unit and the decimals for this set of ticks (before any is formatted)."""
        super().set_locs(locs)
        low, high = self.axis.get_view_interval() if self.axis is not None else (0.0, 0.0)
        largest = max(abs(low), abs(high))
        self.divisor, self.unit = next(
            ((size, name) for size, name in self.units if largest >= size), (1.0, "")
        )
        self.decimals = _decimals([value / self.divisor for value in locs])

    def __call__(self, value: float, pos: int | None = None) -> str:
        scaled = value / self.divisor
        if abs(scaled) < 0.5 * 10.0**-self.decimals:
            return "0" + self.suffix  # never "-0" or "0.0 M"
        text = f"{scaled:,.{self.decimals}f}".replace("-", MINUS)
        return text + self.unit + self.suffix


def _decimals(values: list[float]) -> int:
    """The fewest decimals that write every value exactly (0.25 M needs two)."""
    for decimals in range(MAX_DECIMALS):
        if all(abs(round(v, decimals) - v) <= 1e-9 * max(1.0, abs(v)) for v in values):
            return decimals
    return MAX_DECIMALS


def money_formatter() -> Formatter:
    """Money ticks in k or M of the currency (the axis label names the currency): "250",
    "300 k", "2.5 M", for any amount from a few units to tens of millions."""
    return _PlainTickFormatter(MONEY_UNITS)


def percent_formatter() -> Formatter:
    """Percent ticks for values already in percent: "−100 %", "2,500 %"."""
    return _PlainTickFormatter(suffix=" %")
