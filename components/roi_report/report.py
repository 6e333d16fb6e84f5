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
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from components.reporting import render_template
from components.reporting.figures import new_figure, png_base64

from .config import INPUT_DOCS
from .roi import cumulative_cash_flow, payback_label

EMBEDDED_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
REGENERATE_COMMAND = "cta roi-report --evaluation EVALUATION_JSON --out OUT_DIR"
TORNADO_ROWS = 12


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
    model = roi.get("model") or {}
    cur = roi["currency"]
    charts = [
        ("cumulative cash flow", _cash_flow_figure(roi)),
        ("ROI distribution", _roi_distribution_figure(roi, samples)),
        ("tornado", _tornado_figure(roi)),
    ]
    return render_template(
        "roi_report.html.j2",
        title=model.get("name") or model.get("model_id") or model.get("sha256", "")[:12],
        roi=roi,
        evaluation=evaluation,
        quality_phrase=_quality_phrase(roi["pilot"]["inputs"]["quality_source"]),
        kpis=_kpis(roi),
        line_columns=[title for _, title, _ in _LINE_COLUMNS],
        line_rows=[
            (label, [_cell(entry[key], kind, cur) for key, _, kind in _LINE_COLUMNS], quality)
            for label, entry, quality in _line_rows(roi)
        ],
        charts=[(title, png) for title, png in charts if png],
        has_replicates=any(samples.get(key) is not None for key in ("pilot", "fleet")),
        stl_columns=_stl_columns(roi["multitask_vs_stl"]),
        stl_rows=[
            *roi["multitask_vs_stl"]["per_line"].items(),
            ("fleet", roi["multitask_vs_stl"]["fleet"]),
        ],
        quality_figure=_quality_figure(evaluation.get("vs_champion"), evaluation.get("delta_m")),
        explain=_embedded_maps(evaluation, evaluation_dir),
        input_rows=input_rows(roi),
        regenerate_command=REGENERATE_COMMAND,
        money=lambda value: format_money(value, cur),
        payback=format_payback,
        pct=format_pct,
        probability=format_probability,
        number=format_number,
    )


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


_LINE_COLUMNS = (
    ("annual_saving", "saving / year", "money"),
    ("investment", "investment", "money"),
    ("payback_months", "payback", "payback"),
    ("npv", "NPV", "money"),
    ("roi_pct_undiscounted", "ROI % (undiscounted)", "pct"),
    ("p_roi_positive", "P(ROI > 0)", "prob"),
    ("roi_pct_p10", "ROI P10", "pct"),
    ("roi_pct_p50", "ROI P50", "pct"),
    ("roi_pct_p90", "ROI P90", "pct"),
    ("cost_current", "cost now / year", "money"),
    ("cost_model", "cost with model / year", "money"),
)


def _cell(value: Any, kind: str, currency: str) -> str:
    if kind == "money":
        return format_money(value, currency)
    if kind == "payback":
        return format_payback(value)
    if kind == "pct":
        return format_pct(value)
    if kind == "prob":
        return "n/a" if value is None else format_probability(value)
    return format_number(value)


def _line_rows(roi: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    rows = []
    for line_id, entry in roi["per_line"].items():
        inputs = entry["inputs"]
        label = f"{line_id} (pilot)" if line_id == roi["pilot_line"] else line_id
        quality = f"r {inputs['recall']:.3f}, f {inputs['frr']:.3f} ({inputs['quality_source']})"
        rows.append((label, entry, quality))
    rows.append(("fleet", roi["fleet"], "per line"))
    return rows


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


def _new_figure(width: float = 10.0, height: float = 3.6) -> Figure:
    return new_figure(width, height)


def _cash_flow_figure(roi: dict[str, Any]) -> str:
    figure = _new_figure()
    horizon, rate = roi["horizon_years"], roi["discount_rate"]
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
            label = "discounted (NPV at year H)" if discounted else "undiscounted"
            axes.plot(years, flows, style, label=label)
        axes.axhline(0, color="#555", linewidth=0.8)
        axes.set_title(f"Cumulative cash flow, {title}")
        axes.set_xlabel("year end")
        axes.set_ylabel(roi["currency"])
        axes.legend(fontsize=8)
    return png_base64(figure)


def _roi_distribution_figure(roi: dict[str, Any], samples: dict[str, Any]) -> str | None:
    available = [
        (title, samples.get(key), roi[key])
        for key, title in (("pilot", f"pilot line {roi['pilot_line']}"), ("fleet", "fleet"))
        if samples.get(key) is not None
    ]
    if not available:
        return None
    figure = _new_figure()
    for axes, (title, values, entry) in zip(
        figure.subplots(1, len(available), squeeze=False)[0], available, strict=True
    ):
        finite = np.asarray(values, dtype=float)
        finite = finite[np.isfinite(finite)]
        axes.hist(finite, bins=40, color="#4c72b0")
        axes.axvline(0, color="#c62828", linewidth=1.2, label="ROI = 0")
        for key, style in (("roi_pct_p10", ":"), ("roi_pct_p50", "-"), ("roi_pct_p90", ":")):
            if entry[key] is not None:
                axes.axvline(entry[key], color="#222", linestyle=style, linewidth=1)
        axes.set_title(
            f"ROI % over {roi['horizon_years']} y, {title}: "
            f"P(ROI>0) = {format_probability(entry['p_roi_positive'])}"
        )
        axes.set_xlabel("ROI % (undiscounted), P10 / P50 / P90 marked")
        axes.set_ylabel("bootstrap replicates")
        axes.legend(fontsize=8)
    return png_base64(figure)


def _tornado_figure(roi: dict[str, Any]) -> str | None:
    rows = roi["tornado"][:TORNADO_ROWS]
    if not rows:
        return None
    base = roi["pilot"]["npv"]
    figure = _new_figure(height=0.35 * len(rows) + 1.2)
    axes = figure.subplots()
    positions = np.arange(len(rows))[::-1]
    for position, row in zip(positions, rows, strict=True):
        for value, color, label in (
            (row["npv_low"], "#dd8452", "input at low"),
            (row["npv_high"], "#4c72b0", "input at high"),
        ):
            axes.barh(position, value - base, left=base, color=color, label=label)
    axes.axvline(base, color="#222", linewidth=1)
    axes.set_yticks(
        positions, [f"{row['input']} ({row['low']:g} / {row['high']:g})" for row in rows]
    )
    axes.set_xlabel(f"NPV, {roi['currency']} (base {format_money(base, roi['currency'])})")
    axes.set_title(f"Tornado: {roi.get('tornado_scope', 'NPV')}, one input at a time")
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes.legend(unique.values(), unique.keys(), fontsize=8, loc="lower right")
    return png_base64(figure)


def _quality_figure(champion: dict | None, delta_m: dict | None) -> str | None:
    panels = []
    if champion and champion.get("metrics"):
        panels.append("champion")
    if delta_m and delta_m.get("per_task_pct"):
        panels.append("stl")
    if not panels:
        return None
    figure = _new_figure()
    for axes, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        if panel == "champion":
            items = [
                (f"{task} {item.get('metric', '')}", item)
                for task, item in champion["metrics"].items()
                if item.get("p50") is not None
            ]
            names = [name for name, _ in items]
            centres = [item["p50"] for _, item in items]
            errors = [
                [item["p50"] - (item.get("p05") or item["p50"]) for _, item in items],
                [(item.get("p95") or item["p50"]) - item["p50"] for _, item in items],
            ]
            axes.errorbar(centres, range(len(items)), xerr=errors, fmt="o", capsize=4)
            axes.set_yticks(range(len(items)), names)
            axes.axvline(0, color="#c62828", linewidth=1)
            axes.set_title("candidate - champion (P05-P95), higher = better")
        else:
            per_task = {k: v for k, v in delta_m["per_task_pct"].items() if v is not None}
            colors = ["#2e7d32" if value >= 0 else "#c62828" for value in per_task.values()]
            axes.barh(list(per_task), list(per_task.values()), color=colors)
            axes.axvline(0, color="#222", linewidth=1)
            axes.set_title("vs single-task baselines, % (higher = better)")
    return png_base64(figure)


# ----------------------------------------------------------------------------- Markdown


def render_markdown(roi: dict[str, Any]) -> str:
    """report.md for the KFP UI's markdown visualisation (tables only, no images)."""
    cur = roi["currency"]
    pilot, fleet = roi["pilot"], roi["fleet"]
    lines = [
        "# Return on investment",
        "",
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
        "| line | " + " | ".join(title for _, title, _ in _LINE_COLUMNS) + " | r, f |",
        "|---|" + "---:|" * len(_LINE_COLUMNS) + "---|",
    ]
    for label, entry, quality in _line_rows(roi):
        cells = [_cell(entry[key], kind, cur) for key, _, kind in _LINE_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {quality} |")
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
