"""The self-contained HTML report of a data validation (DESIGN 4.5), rendered from
components/reporting/templates/validation_report.html.j2.

One file with inline CSS and figures as base64 PNG data URIs: it renders the same offline, in a
KFP artefact viewer or attached to an e-mail. GX Data Docs are not used: they load their CSS
from a CDN and render bare without network. Nothing in the page refers to a URL.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from components.reporting import render_template
from components.reporting.figures import new_figure, png_base64
from cta_model.data.line_dataset import SPLITS
from cta_model.data.statistics import SEMSEG_FRACTION_COLUMNS
from cta_model.data.synthetic import CLASS_NAMES

from .expectations import MAX_IDS_PER_EXPECTATION, SAMPLES_TABLE, SuiteOutcome, Thresholds

MAX_BAD_SAMPLES_LISTED = 500


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
    class_names: tuple[str, ...] = CLASS_NAMES  # the dataset's, by class id
    warnings: Sequence[str] = ()  # shown above everything; they do not fail validation


def render_report(inputs: ReportInputs) -> str:
    """The report as one HTML document (UTF-8 text)."""
    validated = inputs.statistics[~inputs.statistics["quarantined"]]
    line_of = dict(zip(inputs.statistics["sample_id"], inputs.statistics["line_id"], strict=True))
    listed = list(inputs.bad_samples.items())[:MAX_BAD_SAMPLES_LISTED]
    return render_template(
        "validation_report.html.j2",
        inputs=inputs,
        validated=validated,
        generated=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        max_ids=MAX_IDS_PER_EXPECTATION,
        samples_table=SAMPLES_TABLE,
        bad_sample_rows=[
            (sample_id, line_of.get(sample_id, ""), reasons) for sample_id, reasons in listed
        ],
        bad_samples_not_listed=len(inputs.bad_samples) - len(listed),
        line_rows=None
        if inputs.lines.empty
        else [[_format(value) for value in row] for row in inputs.lines.itertuples(index=False)],
        figures=None
        if validated.empty
        else _figures(validated, inputs.thresholds, inputs.class_names),
    )


def _figures(
    validated: pd.DataFrame, thresholds: Thresholds, class_names: Sequence[str]
) -> list[tuple[str, str]]:
    """(title, base64 PNG) of each figure the data allows."""
    figures = [
        ("brightness per line", _brightness_figure(validated)),
        ("class frequency per line", _class_frequency_figure(validated, class_names)),
        ("split sizes per line", _split_figure(validated)),
        ("cross-task label quality", _label_quality_figure(validated, thresholds)),
    ]
    return [(title, png) for title, png in figures if png]


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


def class_frequency_columns(class_names: Sequence[str]) -> list[tuple[str, str]]:
    """(bar label, statistics column) per class of the dataset, by id. The statistics hold a
    share per id up to the synthetic class count; ids past it are one pooled bar."""
    known = len(SEMSEG_FRACTION_COLUMNS)
    bars = list(zip(class_names[:known], SEMSEG_FRACTION_COLUMNS, strict=False))
    if len(class_names) > known:
        pooled = f"ids {known}-{len(class_names) - 1} ({len(class_names) - known} classes)"
        bars.append((pooled, "semseg_frac_unknown"))
    return bars


def _class_frequency_figure(frame: pd.DataFrame, class_names: Sequence[str]) -> str | None:
    bars = class_frequency_columns(class_names)
    labels = [label for label, _ in bars]
    per_line = frame.groupby("line_id", sort=True)[[column for _, column in bars]].mean()
    per_line = per_line.dropna(how="all")
    if per_line.empty:
        return None
    figure = _new_figure(height=3.6)
    axes = figure.add_subplot()
    positions = np.arange(len(labels))
    width = 0.8 / len(per_line)
    for offset, (line_id, row) in enumerate(per_line.iterrows()):
        fractions = np.nan_to_num(row.to_numpy(dtype=float))
        axes.bar(positions + offset * width - 0.4 + width / 2, fractions, width, label=line_id)
    axes.set_yscale("log")
    axes.set_xticks(positions, labels, rotation=30, ha="right")
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


def _format(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.3g}"
    return str(value)
