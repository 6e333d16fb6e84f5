"""The self-contained HTML report of a data validation (DESIGN 4.5).

One file with inline CSS and figures as base64 PNG data URIs: it renders the same offline, in a
KFP artefact viewer or attached to an e-mail. GX Data Docs are not used: they load their CSS
from a CDN and render bare without network. Nothing in the page refers to a URL.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from components.figures import new_figure, png_base64
from cta_model.data.line_dataset import SPLITS
from cta_model.data.statistics import SEMSEG_FRACTION_COLUMNS
from cta_model.data.synthetic import CLASS_NAMES

from .expectations import MAX_IDS_PER_EXPECTATION, SAMPLES_TABLE, SuiteOutcome, Thresholds

MAX_BAD_SAMPLES_LISTED = 500

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; color: #1d2330; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #d5d9e0; }
.badge { display: inline-block; padding: 0.2em 0.7em; border-radius: 4px; color: #fff;
         font-weight: 600; }
.pass { background: #2e7d32; } .fail { background: #c62828; }
table { border-collapse: collapse; width: 100%; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #d5d9e0; padding: 0.3em 0.5em; text-align: left; vertical-align: top; }
th { background: #f0f2f5; }
tr.failed td:first-child { border-left: 4px solid #c62828; }
td.ids { font-family: ui-monospace, monospace; font-size: 0.85em; word-break: break-all; }
.summary td:first-child { width: 14em; font-weight: 600; }
.figures img { max-width: 100%; margin: 0.5em 0; border: 1px solid #e3e6eb; }
.muted { color: #6b7280; }
code { font-family: ui-monospace, monospace; font-size: 0.9em; }
"""


@dataclass
class ReportInputs:
    uri: str
    manifest_sha256: str
    passed: bool
    statistics: pd.DataFrame  # every sample, with a boolean "quarantined" column
    lines: pd.DataFrame  # the validated per-line table
    outcome: SuiteOutcome
    quarantine: Sequence[str]
    bad_samples: dict[str, list[str]]  # sample id -> reasons
    bad_lines: dict[str, list[str]]  # line id -> reasons
    thresholds: Thresholds = field(default_factory=Thresholds)


def render_report(inputs: ReportInputs) -> str:
    """The report as one HTML document (UTF-8 text)."""
    validated = inputs.statistics[~inputs.statistics["quarantined"]]
    status = (
        '<span class="badge pass">PASSED</span>'
        if inputs.passed
        else '<span class="badge fail">FAILED</span>'
    )
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Data validation: {_e(inputs.uri)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Data validation {status}</h1>",
        '<table class="summary">',
        _summary_row("dataset", f"<code>{_e(inputs.uri)}</code>"),
        _summary_row("manifest sha256", f"<code>{_e(inputs.manifest_sha256)}</code>"),
        _summary_row("samples", f"{len(inputs.statistics)} ({len(validated)} validated)"),
        _summary_row("quarantined", str(len(inputs.quarantine))),
        _summary_row("lines", ", ".join(_e(line) for line in inputs.lines["line_id"])),
        _summary_row(
            "failed expectations",
            f"{len(inputs.outcome.failed)} of {len(inputs.outcome.expectations)}",
        ),
        _summary_row("bad samples", str(len(inputs.bad_samples))),
        _summary_row("generated", generated),
        "</table>",
        _failed_section(inputs),
        _bad_samples_section(inputs),
        _quarantine_section(inputs.quarantine),
        _lines_section(inputs.lines),
        _figures_section(validated, inputs.thresholds),
        _all_expectations_section(inputs.outcome),
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part)


# --- sections ---


def _failed_section(inputs: ReportInputs) -> str:
    failed = inputs.outcome.failed
    if not failed:
        return "<h2>Failed expectations</h2><p>None: every expectation held.</p>"
    rows = []
    for outcome in failed:
        what = "samples" if outcome.table == SAMPLES_TABLE else "lines"
        detail = _e(outcome.error) if outcome.error else _ids_text(outcome.unexpected_ids, what)
        if outcome.observed is not None and not outcome.unexpected_ids:
            detail = f"observed: {_e(outcome.observed)}"
        rows.append(
            '<tr class="failed">'
            f"<td>{_e(outcome.name)}</td><td>{_e(outcome.table)}</td>"
            f"<td><code>{_e(outcome.column or '')}</code></td>"
            f"<td>{outcome.unexpected_count}</td><td class='ids'>{detail}</td></tr>"
        )
    return (
        "<h2>Failed expectations</h2><table><tr><th>expectation</th><th>table</th>"
        "<th>column</th><th>unexpected</th><th>ids</th></tr>" + "".join(rows) + "</table>"
    )


def _bad_samples_section(inputs: ReportInputs) -> str:
    parts = []
    if inputs.bad_samples:
        items = list(inputs.bad_samples.items())
        line_of = dict(
            zip(inputs.statistics["sample_id"], inputs.statistics["line_id"], strict=True)
        )
        rows = "".join(
            f"<tr><td class='ids'>{_e(sample_id)}</td><td>{_e(line_of.get(sample_id, ''))}</td>"
            f"<td>{'<br>'.join(_e(reason) for reason in reasons)}</td></tr>"
            for sample_id, reasons in items[:MAX_BAD_SAMPLES_LISTED]
        )
        more = len(items) - MAX_BAD_SAMPLES_LISTED
        parts.append(
            f"<h2>Bad samples ({len(items)})</h2>"
            "<p class='muted'>Fix them, or exclude them knowingly with "
            "<code>--quarantine FILE</code> (one sample id per line).</p>"
            "<table><tr><th>sample</th><th>line</th><th>problems</th></tr>"
            f"{rows}</table>" + (f"<p>... and {more} more.</p>" if more > 0 else "")
        )
    else:
        parts.append("<h2>Bad samples</h2><p>None.</p>")
    if inputs.bad_lines:
        rows = "".join(
            f"<tr><td>{_e(line_id)}</td><td>{'<br>'.join(_e(r) for r in reasons)}</td></tr>"
            for line_id, reasons in inputs.bad_lines.items()
        )
        parts.append(
            f"<h2>Bad lines ({len(inputs.bad_lines)})</h2>"
            f"<table><tr><th>line</th><th>problems</th></tr>{rows}</table>"
        )
    return "".join(parts)


def _quarantine_section(quarantine: Sequence[str]) -> str:
    if not quarantine:
        return ""
    return (
        f"<h2>Quarantined samples ({len(quarantine)})</h2>"
        "<p class='muted'>Excluded from the expectations on request; listed in "
        "<code>dataset_ref.json</code>.</p>"
        f"<p class='ids'>{', '.join(_e(sample_id) for sample_id in quarantine)}</p>"
    )


def _lines_section(lines: pd.DataFrame) -> str:
    if lines.empty:
        return ""
    header = "".join(f"<th>{_e(column)}</th>" for column in lines.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(_format(value))}</td>" for value in row) + "</tr>"
        for row in lines.itertuples(index=False)
    )
    return f"<h2>Lines</h2><table><tr>{header}</tr>{body}</table>"


def _figures_section(validated: pd.DataFrame, thresholds: Thresholds) -> str:
    if validated.empty:
        return ""
    figures = [
        ("brightness per line", _brightness_figure(validated)),
        ("class frequency per line", _class_frequency_figure(validated)),
        ("split sizes per line", _split_figure(validated)),
        ("cross-task label quality", _label_quality_figure(validated, thresholds)),
    ]
    images = "".join(
        f'<img alt="{_e(title)}" src="data:image/png;base64,{png}">'
        for title, png in figures
        if png
    )
    return f'<h2>Figures</h2><div class="figures">{images}</div>'


def _all_expectations_section(outcome: SuiteOutcome) -> str:
    rows = "".join(
        f"<tr class='{'' if item.success else 'failed'}'><td>{_e(item.name)}</td>"
        f"<td>{_e(item.table)}</td><td><code>{_e(item.column or '')}</code></td>"
        f"<td><code>{_e(item.type)}</code></td>"
        f"<td>{'pass' if item.success else 'FAIL'}</td><td>{item.unexpected_count}</td></tr>"
        for item in outcome.expectations
    )
    return (
        f"<h2>All expectations ({len(outcome.expectations)})</h2><details><summary>show</summary>"
        "<table><tr><th>expectation</th><th>table</th><th>column</th><th>GX type</th>"
        f"<th>result</th><th>unexpected</th></tr>{rows}</table></details>"
    )


# --- figures (matplotlib without pyplot: no global state, no display needed) ---


def _new_figure(width: float = 9.0, height: float = 3.2) -> Figure:
    return new_figure(width, height)


def _brightness_figure(frame: pd.DataFrame) -> str | None:
    values = frame["brightness"].dropna()
    if values.empty:
        return None
    figure = _new_figure()
    axes = figure.add_subplot()
    bins = np.linspace(min(values.min(), 0.0), max(values.max(), 255.0), 52)
    for line_id, group in frame.groupby("line_id", sort=True):
        axes.hist(group["brightness"].dropna(), bins=bins, histtype="step", lw=1.5, label=line_id)
    axes.set_xlabel("mean luma (0-255)")
    axes.set_ylabel("samples")
    axes.set_title("Image brightness per line")
    axes.legend(fontsize="small")
    return png_base64(figure)


def _class_frequency_figure(frame: pd.DataFrame) -> str | None:
    per_line = frame.groupby("line_id", sort=True)[list(SEMSEG_FRACTION_COLUMNS)].mean()
    per_line = per_line.dropna(how="all")
    if per_line.empty:
        return None
    figure = _new_figure(height=3.6)
    axes = figure.add_subplot()
    positions = np.arange(len(CLASS_NAMES))
    width = 0.8 / len(per_line)
    for offset, (line_id, row) in enumerate(per_line.iterrows()):
        fractions = np.nan_to_num(row.to_numpy(dtype=float))
        axes.bar(positions + offset * width - 0.4 + width / 2, fractions, width, label=line_id)
    axes.set_yscale("log")
    axes.set_xticks(positions, CLASS_NAMES, rotation=30, ha="right")
    axes.set_ylabel("share of labelled pixels")
    axes.set_title("Class frequency per line (log scale)")
    axes.legend(fontsize="small")
    return png_base64(figure)


def _split_figure(frame: pd.DataFrame) -> str | None:
    counts = frame.groupby(["line_id", "split"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=list(SPLITS), fill_value=0)
    if counts.empty:
        return None
    figure = _new_figure(height=0.6 + 0.45 * len(counts))
    axes = figure.add_subplot()
    left = np.zeros(len(counts))
    for split in SPLITS:
        axes.barh(counts.index.astype(str), counts[split], left=left, label=split)
        left += counts[split].to_numpy()
    axes.set_xlabel("samples")
    axes.set_title("Split sizes per line")
    axes.legend(fontsize="small", ncols=len(SPLITS))
    return png_base64(figure)


def _label_quality_figure(frame: pd.DataFrame, thresholds: Thresholds) -> str | None:
    tilted_limit = thresholds.max_normals_vs_height_tilted_deg
    panels = [
        (
            "normals_vs_height_tilted_deg",
            "normals vs height gradient on slopes (deg)",
            tilted_limit,
            (0.0, max(2 * tilted_limit, float(frame["normals_vs_height_tilted_deg"].max()))),
        ),
        (
            "defect_height_anomaly",
            "defect pixels that leave the surface (share)",
            thresholds.min_defect_height_anomaly,
            (0.0, 1.0),
        ),
    ]
    panels = [panel for panel in panels if frame[panel[0]].notna().any()]
    if not panels:
        return None
    figure = _new_figure()
    for index, (column, title, limit, span) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        axes.hist(frame[column].dropna(), bins=np.linspace(*span, 41), color="#4c72b0")
        axes.axvline(limit, color="#c62828", linestyle="--", label="limit")
        axes.set_title(title, fontsize="medium")
        axes.set_ylabel("samples")
        axes.legend(fontsize="small")
    return png_base64(figure)


# --- helpers ---


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _summary_row(label: str, value_html: str) -> str:
    return f"<tr><td>{_e(label)}</td><td>{value_html}</td></tr>"


def _ids_text(ids: Iterable[str], what: str) -> str:
    ids = list(ids)
    shown = ", ".join(_e(item) for item in ids[:MAX_IDS_PER_EXPECTATION])
    more = len(ids) - MAX_IDS_PER_EXPECTATION
    return shown + (f" <span class='muted'>... and {more} more {what}</span>" if more > 0 else "")


def _format(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.3g}"
    return str(value)
