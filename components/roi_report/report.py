"""report.html (one self-contained file, from components/reporting/templates/roi_report.html.j2)
and report.md of the ROI step.

The HTML has inline CSS, charts as base64 PNG data URIs (matplotlib, no "Software" chunk) and
the affinity-map images embedded the same way: nothing refers to a URL, no script runs. The
executive summary comes first, so the pilot line's payback is on the first screen. The
figures shown are formatted by the functions below, the same ones that fill roi.json's labels,
so the page and the JSON cannot disagree.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from components.reporting import render_template
from components.reporting.figures import (
    money_formatter,
    new_figure,
    percent_formatter,
    png_base64,
)

from .config import INPUT_DOCS
from .roi import cumulative_cash_flow, payback_label

EMBEDDED_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
REGENERATE_COMMAND = "cta roi-report --evaluation EVALUATION_JSON --out OUT_DIR"
TORNADO_ROWS = 12
CHART_WIDTH = 12.0  # inches at 90 dpi: the page's 1080 px content width
TORNADO_LINE_HEIGHT = 0.17  # inches per line of a tornado row's label
TORNADO_LABEL_WIDTH = 24  # characters per line of an input name
TORNADO_NAME_LINES = 2  # a longer name is cut with an ellipsis
QUALITY_LABEL_WIDTH = 20
NBSP = "\u00a0"
# step.QUALITY_OWN (step imports this module, so not the other way round): a line priced with
# its own test figures needs no note in the table.
OWN_QUALITY_SOURCE = "line"


# ------------------------------------------------------------ the one formatting of figures


def format_money(value: float | None, currency: str) -> str:
    return "n/a" if value is None else f"{currency} {value:,.0f}"


def format_payback(months: float | None) -> str:
    """ "14.2 months" or "never" (the same text as roi.json's payback_label)."""
    return payback_label(months)


def format_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} %"


def format_probability(value: float | None) -> str:
    return "n/a (no bootstrap replicates)" if value is None else f"{100 * value:.0f} %"


def format_number(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool | str):
        return str(value)
    if isinstance(value, int) or float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:,.4g}"


# -------------------------------------------------------------------------------- HTML


def render_html(
    roi: dict[str, Any],
    evaluation: dict[str, Any],
    evaluation_dir: Path,
    samples: dict[str, np.ndarray | None],
) -> str:
    """The report as one HTML document (UTF-8 text)."""
    cur = roi["currency"]
    title, subtitle = model_heading(roi.get("model") or {})
    quality_chart = quality_figure(evaluation.get("vs_champion"), evaluation.get("delta_m"))
    return render_template(
        "roi_report.html.j2",
        title=title,
        subtitle=subtitle,
        roi=roi,
        evaluation=evaluation,
        quality_phrase=_quality_phrase(roi["pilot"]["inputs"]["quality_source"]),
        kpis=_kpis(roi),
        line_columns=LINE_COLUMNS,
        line_rows=line_rows(roi),
        charts=[(alt, png_base64(figure)) for alt, figure in charts(roi, samples)],
        has_replicates=any(samples.get(key) is not None for key in ("pilot", "fleet")),
        stl_columns=_stl_columns(roi["multitask_vs_stl"]),
        stl_rows=[
            *roi["multitask_vs_stl"]["per_line"].items(),
            ("fleet", roi["multitask_vs_stl"]["fleet"]),
        ],
        quality_figure=None if quality_chart is None else png_base64(quality_chart),
        explain=_embedded_maps(evaluation, evaluation_dir),
        input_rows=input_rows(roi),
        regenerate_command=REGENERATE_COMMAND,
        money=lambda value: format_money(value, cur),
        payback=format_payback,
        pct=format_pct,
        probability=format_probability,
        number=format_number,
    )


def model_heading(model: dict[str, Any]) -> tuple[str, str]:
    """(title, subtitle) naming the priced model: "cta-inspection v3" / "registered version 3,
    model id m-..."; before registration "cta-inspection" / "unregistered (model id m-...)"."""
    name = model.get("name") or "unnamed model"
    version = model.get("version")
    identity = (
        f"model id {model['model_id']}"
        if model.get("model_id")
        else f"sha256 {model.get('sha256', '')[:12]}"
    )
    if version:
        return f"{name} v{version.removeprefix('v')}", f"registered version {version}, {identity}"
    return name, f"unregistered ({identity})"


def _kpis(roi: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, element id, value) of the figures on the first screen."""
    cur, pilot, fleet = roi["currency"], roi["pilot"], roi["fleet"]
    return [
        ("Pilot payback", "pilot-payback-months", format_payback(pilot["payback_months"])),
        (f"Pilot NPV ({roi['horizon_years']} y)", "pilot-npv", format_money(pilot["npv"], cur)),
        ("Pilot saving / year", "pilot-annual-saving", format_money(pilot["annual_saving"], cur)),
        ("Pilot investment", "pilot-investment", format_money(pilot["investment"], cur)),
        ("Fleet NPV", "fleet-npv", format_money(fleet["npv"], cur)),
        ("Fleet payback", "fleet-payback-months", format_payback(fleet["payback_months"])),
    ]


def _quality_phrase(source: str) -> str:
    if source == "line":
        return "measured on the line's test images"
    if source == "pooled":
        return "pooled over the evaluated lines"
    return (
        f"{source}; a figure the test split cannot measure is priced at its worst case: "
        "recall 0 %, false-reject rate 100 %"
    )


# (roi.json key, heading, kind) of the per-line table. Money cells are plain amounts (the
# text above the table names the currency) so that the table fits the page; "roi_range" is
# P10 / P50 / P90 in one cell.
_LINE_COLUMNS = (
    ("annual_saving", "saving / year", "money"),
    ("investment", "investment", "money"),
    ("payback_months", "payback", "payback"),
    ("npv", "NPV", "money"),
    ("roi_pct_undiscounted", "ROI", "pct"),
    ("p_roi_positive", "P(ROI > 0)", "prob"),
    ("roi_pct_p50", "ROI P10 / P50 / P90", "roi_range"),
    ("cost_current", "cost now / year", "money"),
    ("cost_model", "cost with model / year", "money"),
)
LINE_COLUMNS = ["line", *(title for _, title, _ in _LINE_COLUMNS), "recall r / false-reject f"]


def line_rows(roi: dict[str, Any]) -> list[list[str]]:
    """The per-line table's cells: every line (the pilot marked), then the fleet."""
    rows = []
    for line_id, entry in roi["per_line"].items():
        inputs = entry["inputs"]
        label = f"{line_id} (pilot)" if line_id == roi["pilot_line"] else line_id
        # "92.0 %" never splits; where the column is narrow, the cell wraps after the " / ".
        quality = " / ".join(f"{100 * inputs[key]:.1f}{NBSP}%" for key in ("recall", "frr"))
        if inputs["quality_source"] != OWN_QUALITY_SOURCE:
            quality += f" ({inputs['quality_source']})"
        rows.append([label, *_cells(entry), quality])
    rows.append(["fleet", *_cells(roi["fleet"]), "per line"])
    return rows


def _cells(entry: dict[str, Any]) -> list[str]:
    cells = []
    for key, _, kind in _LINE_COLUMNS:
        value = entry[key]
        if kind == "money":
            cells.append(format_number(None if value is None else round(value)))
        elif kind == "payback":
            cells.append(format_payback(value))
        elif kind == "pct":
            cells.append(format_pct(value))
        elif kind == "prob":
            cells.append("n/a" if value is None else format_probability(value))
        else:
            spread = [entry[f"roi_pct_p{p}"] for p in (10, 50, 90)]
            cells.append(
                "n/a" if None in spread else " / ".join(f"{v:,.0f}" for v in spread) + " %"
            )
    return cells


def _stl_columns(comparison: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("cost_multitask", "cost / year, multitask"),
        ("cost_stl", f"cost / year, {comparison['n_tasks']} single-task"),
        ("hw_annual_multitask", "hardware / year, multitask"),
        ("hw_annual_stl", "hardware / year, single-task"),
        ("ops_annual_multitask", "operations / year, multitask"),
        ("ops_annual_stl", "operations / year, single-task"),
        ("annual_saving_of_multitask", "saving / year of one multitask model"),
    ]


def _embedded_maps(evaluation: dict[str, Any], evaluation_dir: Path) -> dict[str, Any]:
    """The affinity maps of evaluation.json: {paths, embedded: [(relative, mime, base64)],
    missing: [relative], pixels: text}; a map that is not a PNG/JPEG file is listed as missing."""
    explain = evaluation.get("explain") or {}
    paths = explain.get("affinity_maps") or []
    embedded, missing = [], []
    for relative in paths:
        path = evaluation_dir / relative
        mime = EMBEDDED_IMAGE_TYPES.get(path.suffix.lower())
        if mime is None or not path.is_file():
            missing.append(relative)
            continue
        embedded.append((relative, mime, base64.b64encode(path.read_bytes()).decode("ascii")))
    pixels = ", ".join(str(tuple(p)) for p in explain.get("pixels") or [])
    return {"paths": paths, "embedded": embedded, "missing": missing, "pixels": pixels}


def input_rows(roi: dict[str, Any]) -> list[tuple[str, str, str, str, list[str]]]:
    """(input, unit, meaning, pilot low-high, base value per line) for the inputs table."""
    cur = roi["currency"]
    pilot_ranges = roi["pilot"]["inputs"]["ranges"]
    rows = []
    for name, (unit, meaning) in INPUT_DOCS.items():
        bounds = pilot_ranges.get(name)
        span = "" if bounds is None else f"{format_number(bounds[0])} - {format_number(bounds[1])}"
        values = [format_number(entry["inputs"][name]) for entry in roi["per_line"].values()]
        rows.append((name, unit.format(cur=cur), meaning, span, values))
    return rows


# ------------------------------------------------------------------------------- charts
# Every legend sits outside the axes (it never hides data), titles wrap onto a second line
# rather than run into the neighbouring panel, and long tick labels wrap; the unit test checks
# the rendered text extents of each chart for overlaps.


def charts(roi: dict[str, Any], samples: dict[str, Any]) -> list[tuple[str, Figure]]:
    """(alt text, figure) of the charts section, in page order; a chart without data is left
    out (the page says why)."""
    figures = [
        ("cumulative cash flow", cash_flow_figure(roi)),
        ("ROI distribution", roi_distribution_figure(roi, samples)),
        ("tornado", tornado_figure(roi)),
    ]
    return [(title, figure) for title, figure in figures if figure is not None]


def cash_flow_figure(roi: dict[str, Any]) -> Figure:
    figure = new_figure(CHART_WIDTH, 4.0)
    cur, horizon, rate = roi["currency"], roi["horizon_years"], roi["discount_rate"]
    years = list(range(horizon + 1))
    for axes, (title, entry) in zip(
        figure.subplots(1, 2),
        ((f"pilot line {roi['pilot_line']}", roi["pilot"]), ("fleet", roi["fleet"])),
        strict=True,
    ):
        for discounted, style in ((True, "-o"), (False, "--")):
            flows = cumulative_cash_flow(
                entry["investment"], entry["annual_saving"], rate, horizon, discounted
            )
            label = "discounted (NPV at the last year)" if discounted else "undiscounted"
            axes.plot(years, flows, style, label=label)
        axes.axhline(0, color="#555", linewidth=0.8)
        axes.set_title(
            f"Cumulative cash flow, {title}\npayback {format_payback(entry['payback_months'])}"
            f", NPV {format_money(entry['npv'], cur)}"
        )
        axes.set_xlabel("year end (0 = investment)")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(cur)
        axes.yaxis.set_major_formatter(money_formatter())
    _legend_below(figure, axes, ncols=2)
    return figure


def roi_distribution_figure(roi: dict[str, Any], samples: dict[str, Any]) -> Figure | None:
    available = [
        (title, samples.get(key), roi[key])
        for key, title in (("pilot", f"pilot line {roi['pilot_line']}"), ("fleet", "fleet"))
        if samples.get(key) is not None
    ]
    if not available:
        return None
    figure = new_figure(CHART_WIDTH, 4.0)
    for axes, (title, values, entry) in zip(
        figure.subplots(1, len(available), squeeze=False)[0], available, strict=True
    ):
        finite = np.asarray(values, dtype=float)
        finite = finite[np.isfinite(finite)]
        axes.hist(finite, bins=40, color="#4c72b0")
        axes.axvline(0, color="#c62828", linewidth=1.2, label="ROI = 0")
        for key, style, label in (
            ("roi_pct_p10", ":", "P10 / P90"),
            ("roi_pct_p50", "-", "P50"),
            ("roi_pct_p90", ":", "P10 / P90"),
        ):
            if entry[key] is not None:
                axes.axvline(entry[key], color="#222", linestyle=style, linewidth=1, label=label)
        axes.set_title(
            f"ROI over {roi['horizon_years']} years, {title}\n"
            f"P(ROI > 0) = {format_probability(entry['p_roi_positive'])}"
        )
        axes.set_xlabel("ROI, undiscounted")
        axes.xaxis.set_major_formatter(percent_formatter())
        axes.set_ylabel("bootstrap replicates")
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_below(figure, axes, ncols=3)
    return figure


def tornado_figure(roi: dict[str, Any]) -> Figure | None:
    rows = roi["tornado"][:TORNADO_ROWS]
    if not rows:
        return None
    cur, base = roi["currency"], roi["pilot"]["npv"]
    labels = [tornado_label(row, cur) for row in rows]
    # Rows are evenly spaced: each gets the height of the tallest label.
    row_height = TORNADO_LINE_HEIGHT * max(label.count("\n") + 1 for label in labels) + 0.1
    figure = new_figure(CHART_WIDTH, row_height * len(rows) + 1.4)
    axes = figure.subplots()
    positions = np.arange(len(rows))[::-1]
    for position, row in zip(positions, rows, strict=True):
        for value, color, label in (
            (row["npv_low"], "#dd8452", "input at its low value"),
            (row["npv_high"], "#4c72b0", "input at its high value"),
        ):
            axes.barh(position, value - base, left=base, color=color, label=label)
    axes.axvline(base, color="#222", linewidth=1)
    axes.set_yticks(positions, labels)
    axes.set_ylim(-0.6, len(rows) - 0.4)
    axes.set_xlabel(f"NPV, {cur} (base {format_money(base, cur)})")
    axes.xaxis.set_major_formatter(money_formatter())
    axes.set_title(f"Tornado: {roi.get('tornado_scope', 'NPV')}, one input at a time")
    _legend_below(figure, axes, ncols=2)
    return figure


def tornado_label(row: dict[str, Any], currency: str) -> str:
    """The input's name (wrapped at underscores, at most two lines) over its low - high range
    with its unit: "C_escape" / "15 - 120 EUR/part", "discount_rate" / "5 - 12 %/year"."""
    name, low, high = row["input"], row["low"], row["high"]
    unit = INPUT_DOCS.get(name, ("", ""))[0].format(cur=currency)
    if unit in ("fraction", "1/year"):
        low, high = 100 * low, 100 * high
        unit = "%" if unit == "fraction" else "%/year"
    elif unit == "-":
        unit = ""
    span = f"{_compact(low)} - {_compact(high)} {unit}".rstrip()
    name_lines = wrap_identifier(name, TORNADO_LABEL_WIDTH)
    if len(name_lines) > TORNADO_NAME_LINES:
        kept = name_lines[TORNADO_NAME_LINES - 1][: TORNADO_LABEL_WIDTH - 1]
        name_lines = [*name_lines[: TORNADO_NAME_LINES - 1], kept + "\N{HORIZONTAL ELLIPSIS}"]
    return "\n".join([*name_lines, span])


def wrap_identifier(name: str, width: int) -> list[str]:
    """``name`` in lines of at most ``width`` characters, broken after underscores (a part
    longer than ``width`` is cut)."""
    lines: list[str] = []
    for part in re.findall(r"[^_]*_|[^_]+", name):
        while len(part) > width:
            lines.append(part[:width])
            part = part[width:]
        if lines and len(lines[-1]) + len(part) <= width:
            lines[-1] += part
        else:
            lines.append(part)
    return lines or [name]


def _compact(value: float) -> str:
    """A range end in few characters: 0.045, 15, 8 k, 1.5 M."""
    for size, unit in ((1e6, " M"), (1e3, " k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def quality_figure(champion: dict | None, delta_m: dict | None) -> Figure | None:
    panels = []
    if champion and champion.get("metrics"):
        panels.append("champion")
    if delta_m and delta_m.get("per_task_pct"):
        panels.append("stl")
    if not panels:
        return None
    figure = new_figure(CHART_WIDTH, 3.8)
    for axes, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        if panel == "champion":
            items = [
                (f"{task} {item.get('metric', '')}", item)
                for task, item in champion["metrics"].items()
                if item.get("p50") is not None
            ]
            names = ["\n".join(wrap_identifier(name, QUALITY_LABEL_WIDTH)) for name, _ in items]
            centres = [item["p50"] for _, item in items]
            errors = [
                [item["p50"] - (item.get("p05") or item["p50"]) for _, item in items],
                [(item.get("p95") or item["p50"]) - item["p50"] for _, item in items],
            ]
            axes.errorbar(centres, range(len(items)), xerr=errors, fmt="o", capsize=4)
            axes.set_yticks(range(len(items)), names)
            axes.set_ylim(-0.5, len(items) - 0.5)
            axes.axvline(0, color="#c62828", linewidth=1)
            axes.ticklabel_format(axis="x", style="plain", useOffset=False)
            axes.set_title("candidate - champion, P05 to P95\n(higher = better)")
        else:
            per_task = {k: v for k, v in delta_m["per_task_pct"].items() if v is not None}
            colors = ["#2e7d32" if value >= 0 else "#c62828" for value in per_task.values()]
            names = ["\n".join(wrap_identifier(name, QUALITY_LABEL_WIDTH)) for name in per_task]
            axes.barh(names, list(per_task.values()), color=colors)
            axes.axvline(0, color="#222", linewidth=1)
            axes.xaxis.set_major_formatter(percent_formatter())
            axes.set_title("vs single-task baselines\n(higher = better)")
    return figure


def _legend_below(figure: Figure, axes: Axes, ncols: int) -> None:
    """One legend for all panels, under the figure: it never covers data."""
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    figure.legend(unique.values(), unique.keys(), loc="outside lower center", ncols=ncols)


# ----------------------------------------------------------------------------- Markdown


def render_markdown(roi: dict[str, Any]) -> str:
    """report.md for the KFP UI's markdown visualisation (tables only, no images)."""
    cur = roi["currency"]
    pilot, fleet = roi["pilot"], roi["fleet"]
    title, subtitle = model_heading(roi.get("model") or {})
    lines = [
        f"# Return on investment: {title}",
        "",
        subtitle,
        "",
        *(
            ["**Warnings from the evaluation:**", ""]
            + [f"- {warning}" for warning in roi.get("evaluation_warnings") or []]
            + [""]
            if roi.get("evaluation_warnings")
            else []
        ),
        f"**{roi['recommendation']['verdict']}**: {roi['recommendation']['text']}",
        "",
        f"- Pilot line **{roi['pilot_line']}**: payback"
        f" **{format_payback(pilot['payback_months'])}**,"
        f" NPV **{format_money(pilot['npv'], cur)}** over {roi['horizon_years']} years"
        f" at {100 * roi['discount_rate']:.0f} % discount.",
        f"- Risk: P(ROI > 0) = {format_probability(pilot['p_roi_positive'])}, ROI P10"
        f" {format_pct(pilot['roi_pct_p10'])}, P90 {format_pct(pilot['roi_pct_p90'])}.",
        f"- Fleet ({len(roi['per_line'])} lines): saving"
        f" {format_money(fleet['annual_saving'], cur)}"
        f" / year, investment {format_money(fleet['investment'], cur)}, payback"
        f" {format_payback(fleet['payback_months'])}, NPV {format_money(fleet['npv'], cur)}.",
        "",
        "## Per line",
        "",
        f"Amounts in {cur}; ROI undiscounted over {roi['horizon_years']} years.",
        "",
        "| " + " | ".join(LINE_COLUMNS) + " |",
        "|---|" + "---:|" * len(_LINE_COLUMNS) + "---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in line_rows(roi)]
    comparison = roi["multitask_vs_stl"]
    lines += [
        "",
        f"## One multitask model vs {comparison['n_tasks']} single-task models",
        "",
        comparison["note"] + ".",
        "",
        f"Fleet cost / year: multitask {format_money(comparison['fleet']['cost_multitask'], cur)},"
        f" single-task {format_money(comparison['fleet']['cost_stl'], cur)}.",
        "",
        f"## Tornado ({roi.get('tornado_scope', 'NPV')})",
        "",
        "| input | low | high | NPV at low | NPV at high |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in roi["tornado"][:TORNADO_ROWS]:
        lines.append(
            f"| {row['input']} | {row['low']:g} | {row['high']:g} | "
            f"{format_money(row['npv_low'], cur)} | {format_money(row['npv_high'], cur)} |"
        )
    lines += [
        "",
        "## Inputs",
        "",
        "| input | unit | meaning | low - high (pilot) | " + " | ".join(roi["per_line"]) + " |",
        "|---|---|---|---:|" + "---:|" * len(roi["per_line"]),
    ]
    for name, unit, meaning, span, values in input_rows(roi):
        lines.append(f"| {name} | {unit} | {meaning} | {span} | " + " | ".join(values) + " |")
    lines += ["", "## Formulas", "", "```"]
    lines += [f"{name}: {formula}" for name, formula in roi["formulas"].items()]
    lines += ["```", "", f"Regenerate: `{REGENERATE_COMMAND}`", ""]
    return "\n".join(lines)
