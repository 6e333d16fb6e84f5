"""The monitoring report as one self-contained HTML file (template
components/reporting/templates/monitor.html.j2): the plain-words verdict first, then
time-series charts of the statistics that moved (window means against the reference's
5th-95th percentile band), the reject rate per window (against the production prevalence and
the reference images' rate at the served threshold), and the full table. Inline CSS, charts
as base64 PNG data URIs, no URL anywhere."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.reporting import render_template
from components.reporting.figures import new_figure, png_data_uri
from cta_model.atomic import write_bytes_atomic


def _time_axis(recent) -> list[datetime]:
    return [datetime.fromtimestamp(t, UTC) for t in recent["unix_time"]]


def _statistic_chart(name: str, reference, recent) -> str:
    figure = new_figure(8, 2.6)
    axes = figure.add_subplot()
    low, high = reference[name].quantile([0.05, 0.95])
    times = _time_axis(recent)
    axes.axhspan(low, high, color="#2e7d32", alpha=0.15, label="reference p05-p95")
    axes.plot(times, recent[name], ".", color="#c62828", markersize=3, label="served images")
    rolling = recent[name].rolling(10, min_periods=1).mean()
    axes.plot(times, rolling, "-", color="#1d2330", linewidth=1, label="rolling mean (10)")
    axes.set_title(name)
    axes.legend(loc="upper left", fontsize=7)
    figure.autofmt_xdate()
    return png_data_uri(figure)


def _reject_chart(report: dict[str, Any]) -> str | None:
    windows = [w for w in report["windows"] if w["reject_rate"] is not None]
    if not windows:
        return None
    figure = new_figure(8, 2.4)
    axes = figure.add_subplot()
    times = [datetime.fromtimestamp(w["start_unix"], UTC) for w in windows]
    axes.step(times, [w["reject_rate"] for w in windows], where="post", label="reject rate")
    prevalence = report["defect_rate"]["production_prevalence"]
    axes.axhline(prevalence, color="#6b7280", linestyle="--", label="production prevalence")
    reference = report["defect_rate"].get("reference_reject_rate")
    if reference is not None:
        axes.axhline(
            reference, color="#2e7d32", linestyle=":", label="reference images at the threshold"
        )
    axes.set_ylim(bottom=0)
    axes.set_title("reject rate per window")
    axes.legend(loc="upper left", fontsize=7)
    figure.autofmt_xdate()
    return png_data_uri(figure)


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def write_html(report: dict[str, Any], reference, recent, path: Path) -> Path:
    state = "unknown" if not report["enough_data"] else "drifted" if report["drifted"] else "stable"
    shown = report["moved"] or list(report["statistics"])[:4]
    charts = (
        [(name, _statistic_chart(name, reference, recent)) for name in shown] if len(recent) else []
    )
    text = render_template(
        "monitor.html.j2",
        report=report,
        state=state,
        statistic_charts=charts,
        reject_chart=_reject_chart(report),
        shift_floors=_shift_floors(report["thresholds"].get("min_shift") or {}),
        number=_number,
    )
    write_bytes_atomic(path, text.encode())
    return path


def _shift_floors(min_shift: dict[str, float]) -> str:
    return ", ".join(f"{pattern} {floor:g}" for pattern, floor in min_shift.items()) or "none"
