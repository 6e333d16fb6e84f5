"""The monitoring report as one self-contained HTML file: the plain-words verdict first, then
time-series charts of the statistics that moved (window means against the reference's
5th-95th percentile band), the reject rate per window, and the full table. Inline CSS, charts
as base64 PNG data URIs, no URL anywhere."""

from __future__ import annotations

import html
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.figures import new_figure, png_data_uri
from cta_model.atomic import write_bytes_atomic

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #1d2330;
       padding: 0 1em; line-height: 1.4; }
.verdict { font-size: 1.15em; padding: 0.8em 1em; border-radius: 6px; }
.drifted { background: #fdecea; border-left: 6px solid #c62828; }
.stable { background: #e8f5e9; border-left: 6px solid #2e7d32; }
.unknown { background: #f0f2f5; border-left: 6px solid #6b7280; }
table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
th, td { border: 1px solid #d5d9e0; padding: 0.3em 0.5em; text-align: left; }
th { background: #f0f2f5; } tr.moved td { background: #fff4e5; font-weight: 600; }
img { max-width: 100%; border: 1px solid #e3e6eb; margin: 0.4em 0; }
"""


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
    axes.set_ylim(bottom=0)
    axes.set_title("reject rate per window")
    axes.legend(loc="upper left", fontsize=7)
    figure.autofmt_xdate()
    return png_data_uri(figure)


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def write_html(report: dict[str, Any], reference, recent, path: Path) -> Path:
    state = "unknown" if not report["enough_data"] else "drifted" if report["drifted"] else "stable"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Line {html.escape(report['line_id'])} monitoring</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Line {html.escape(report['line_id'])}: monitoring</h1>",
        f"<p class='verdict {state}' id='verdict'>{html.escape(report['summary'])}</p>",
        f"<p>Model {html.escape(report['model']['uri'])}; {report['recent']['n_images']} served "
        f"images against {report['reference']['n_images']} reference images.</p>",
    ]
    shown = report["moved"] or list(report["statistics"])[:4]
    if shown and len(recent):
        parts.append("<h2>Statistics over time</h2>")
        for name in shown:
            parts.append(
                f"<img alt='{html.escape(name)}' src='{_statistic_chart(name, reference, recent)}'>"
            )
    reject = _reject_chart(report)
    if reject:
        parts.append(f"<h2>Defect rate</h2><img alt='reject rate' src='{reject}'>")
    if report["qa"]:
        qa = report["qa"]
        parts.append(
            "<h2>QA samples</h2><p>"
            + ", ".join(f"{html.escape(k)}: {_number(v)}" for k, v in qa.items())
            + "</p>"
        )
    parts.append(
        "<h2>Every statistic</h2><table><tr><th>statistic</th><th>reference mean</th>"
        "<th>recent mean</th><th>PSI</th><th>KS statistic</th><th>KS p-value</th>"
        "<th>moved</th></tr>"
    )
    for name, s in report["statistics"].items():
        css = " class='moved'" if s["moved"] else ""
        parts.append(
            f"<tr{css}><td>{html.escape(name)}</td><td>{_number(s['reference_mean'])}</td>"
            f"<td>{_number(s['recent_mean'])}</td><td>{_number(s['psi'])}</td>"
            f"<td>{_number(s['ks_statistic'])}</td><td>{_number(s['ks_p_value'])}</td>"
            f"<td>{'yes' if s['moved'] else 'no'}</td></tr>"
        )
    t = report["thresholds"]
    parts.append(
        "</table><h2>How this is decided</h2><p>A statistic moved when its population "
        f"stability index exceeds {t['psi_threshold']} and the two-sample Kolmogorov-Smirnov "
        f"p-value is below {t['ks_alpha']} divided by the number of statistics compared, and "
        "its mean moved by at least its minimum shift where one is configured "
        f"({html.escape(_shift_floors(t.get('min_shift') or {}))}); the "
        "line drifted when any statistic moved. The reference is the model's "
        "reference_stats.parquet (its validation images).</p></body></html>"
    )
    write_bytes_atomic(path, "\n".join(parts).encode())
    return path


def _shift_floors(min_shift: dict[str, float]) -> str:
    return ", ".join(f"{pattern} {floor:g}" for pattern, floor in min_shift.items()) or "none"
