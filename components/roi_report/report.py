"""report.html (one self-contained file) and report.md of the ROI step.

The HTML has inline CSS, charts as base64 PNG data URIs (matplotlib, no "Software" chunk) and
the affinity-map images embedded the same way: nothing refers to a URL, no script runs. The
executive summary comes first, so the pilot line's payback is on the first screen. The
figures shown are formatted by the functions below, the same ones that fill roi.json's labels,
so the page and the JSON cannot disagree.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from components.figures import new_figure, png_base64

from .config import INPUT_DOCS
from .roi import cumulative_cash_flow, payback_label

EMBEDDED_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
REGENERATE_COMMAND = "cta roi-report --evaluation EVALUATION_JSON --out OUT_DIR"
TORNADO_ROWS = 12

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.2em auto;
       max-width: 1100px; color: #1d2330; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.45em; margin: 0 0 0.3em 0; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #d5d9e0; }
.summary { border: 2px solid #1d4ed8; border-radius: 6px; padding: 0.8em 1.2em;
           background: #f5f8ff; }
.summary p { margin: 0.4em 0; }
.kpis { display: flex; flex-wrap: wrap; gap: 1em; margin: 0.6em 0; }
.kpi { background: #fff; border: 1px solid #c7d2fe; border-radius: 6px; padding: 0.4em 0.9em; }
.kpi .label { font-size: 0.8em; color: #4b5563; display: block; }
.kpi .value { font-size: 1.35em; font-weight: 700; }
.verdict { display: inline-block; padding: 0.15em 0.6em; border-radius: 4px; color: #fff;
           font-weight: 600; }
.go { background: #2e7d32; } .go-with-review { background: #b26a00; } .hold { background: #c62828; }
table { border-collapse: collapse; width: 100%; font-size: 0.88em; margin: 0.5em 0; }
th, td { border: 1px solid #d5d9e0; padding: 0.3em 0.5em; text-align: left; vertical-align: top; }
td:first-child { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th { background: #f0f2f5; }
.scroll { overflow-x: auto; }
.figures img, .maps img { max-width: 100%; margin: 0.5em 0; border: 1px solid #e3e6eb; }
.maps figure { display: inline-block; margin: 0.3em; max-width: 48%; vertical-align: top; }
.maps img { min-width: 256px; image-rendering: pixelated; }
.muted { color: #6b7280; }
pre { background: #f6f7f9; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
code { font-family: ui-monospace, monospace; font-size: 0.9em; }
"""


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
    title = model.get("name") or model.get("model_id") or model.get("sha256", "")[:12]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>ROI: {_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Return on investment: inspection model {_e(title)}</h1>",
        _summary_section(roi),
        _lines_section(roi),
        _charts_section(roi, samples),
        _stl_section(roi),
        _quality_section(evaluation),
        _explain_section(evaluation, evaluation_dir),
        _inputs_section(roi),
        _formulas_section(roi),
        _provenance_section(roi),
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part)


def _summary_section(roi: dict[str, Any]) -> str:
    cur = roi["currency"]
    pilot, fleet = roi["pilot"], roi["fleet"]
    line = roi["pilot_line"]
    verdict = roi["recommendation"]["verdict"]
    inputs = pilot["inputs"]
    risk = (
        f"P(ROI &gt; 0) = <span id='pilot-p-roi-positive'>"
        f"{_e(format_probability(pilot['p_roi_positive']))}</span>, ROI over "
        f"{roi['horizon_years']} years between {_e(format_pct(pilot['roi_pct_p10']))} (P10) and "
        f"{_e(format_pct(pilot['roi_pct_p90']))} (P90), from the bootstrap of the test images"
    )
    kpis = [
        ("Pilot payback", "pilot-payback-months", format_payback(pilot["payback_months"])),
        (f"Pilot NPV ({roi['horizon_years']} y)", "pilot-npv", format_money(pilot["npv"], cur)),
        ("Pilot saving / year", "pilot-annual-saving", format_money(pilot["annual_saving"], cur)),
        ("Pilot investment", "pilot-investment", format_money(pilot["investment"], cur)),
        ("Fleet NPV", "fleet-npv", format_money(fleet["npv"], cur)),
        ("Fleet payback", "fleet-payback-months", format_payback(fleet["payback_months"])),
    ]
    kpi_html = "".join(
        f'<div class="kpi"><span class="label">{_e(label)}</span>'
        f'<span class="value" id="{element_id}">{_e(value)}</span></div>'
        for label, element_id, value in kpis
    )
    fleet_text = (
        f"Rolled out to all {len(roi['per_line'])} lines, the model saves "
        f"{_e(format_money(fleet['annual_saving'], cur))} a year for an investment of "
        f"{_e(format_money(fleet['investment'], cur))} (payback "
        f"{_e(format_payback(fleet['payback_months']))}, NPV "
        f"{_e(format_money(fleet['npv'], cur))}, P(ROI &gt; 0) "
        f"{_e(format_probability(fleet['p_roi_positive']))})."
    )
    return (
        '<section class="summary" id="executive-summary">'
        f'<p><span class="verdict {_e(verdict)}" id="recommendation-verdict">{_e(verdict)}</span> '
        f'<strong id="recommendation">{_e(roi["recommendation"]["text"])}</strong></p>'
        f"<p>Pilot line <strong>{_e(line)}</strong> {_payback_phrase(pilot)}, NPV "
        f"<strong>{_e(format_money(pilot['npv'], cur))}</strong> over "
        f"{roi['horizon_years']} years at {100 * roi['discount_rate']:.0f} % discount, "
        f"with defect recall {inputs['recall']:.1%} and false-reject rate {inputs['frr']:.1%} "
        f"({_e(_quality_phrase(inputs['quality_source']))}). Risk: {risk}.</p>"
        f'<div class="kpis">{kpi_html}</div>'
        f"<p>{fleet_text}</p>"
        "</section>"
    )


def _payback_phrase(entry: dict[str, Any]) -> str:
    if entry["payback_months"] is None:
        return "<strong>never</strong> pays back (the model costs more per year than it saves)"
    return f"pays back in <strong>{_e(format_payback(entry['payback_months']))}</strong>"


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


def _lines_section(roi: dict[str, Any]) -> str:
    cur = roi["currency"]
    header = "".join(f"<th>{_e(title)}</th>" for _, title, _ in _LINE_COLUMNS)
    body = "".join(
        f"<tr><td>{_e(label)}</td>"
        + "".join(
            f'<td class="num">{_e(_cell(entry[key], kind, cur))}</td>'
            for key, _, kind in _LINE_COLUMNS
        )
        + f"<td>{_e(quality)}</td></tr>"
        for label, entry, quality in _line_rows(roi)
    )
    return (
        "<h2>Per line</h2>"
        "<p class='muted'>Each line as a stand-alone project (all four investment items); the "
        "fleet counts training compute and the pilot once. Recall r and false-reject rate f are "
        "the line's own test figures, or <em>pooled</em> over the evaluated lines where the "
        "evaluation has none for the line.</p>"
        f"<div class='scroll'><table id='per-line'><tr><th>line</th>{header}"
        "<th>recall r, false-reject f</th></tr>"
        f"{body}</table></div>"
    )


def _charts_section(roi: dict[str, Any], samples: dict[str, np.ndarray | None]) -> str:
    figures = [
        ("cumulative cash flow", _cash_flow_figure(roi)),
        ("ROI distribution", _roi_distribution_figure(roi, samples)),
        ("tornado", _tornado_figure(roi)),
    ]
    images = "".join(
        f'<img alt="{_e(title)}" src="data:image/png;base64,{png}">'
        for title, png in figures
        if png
    )
    notes = ""
    if all(samples.get(key) is None for key in ("pilot", "fleet")):
        notes = (
            "<p class='muted'>No bootstrap replicates in evaluation.json: no ROI distribution.</p>"
        )
    return f'<h2>Charts</h2><div class="figures">{images}</div>{notes}'


def _stl_section(roi: dict[str, Any]) -> str:
    comparison = roi["multitask_vs_stl"]
    cur = roi["currency"]
    keys = (
        ("cost_multitask", "cost / year, multitask"),
        ("cost_stl", f"cost / year, {comparison['n_tasks']} single-task"),
        ("hw_annual_multitask", "hardware / year, multitask"),
        ("hw_annual_stl", "hardware / year, single-task"),
        ("ops_annual_multitask", "operations / year, multitask"),
        ("ops_annual_stl", "operations / year, single-task"),
        ("annual_saving_of_multitask", "saving / year of one multitask model"),
    )
    header = "".join(f"<th>{_e(title)}</th>" for _, title in keys)
    rows = [*comparison["per_line"].items(), ("fleet", comparison["fleet"])]
    body = "".join(
        f"<tr><td>{_e(name)}</td>"
        + "".join(f'<td class="num">{_e(format_money(entry[key], cur))}</td>' for key, _ in keys)
        + "</tr>"
        for name, entry in rows
    )
    return (
        f"<h2>One multitask model vs {comparison['n_tasks']} single-task models</h2>"
        f"<p>{_e(comparison['note'])}. Same inspection quality assumed (the single-task models'"
        " defect figures are not measured).</p>"
        f"<div class='scroll'><table id='multitask-vs-stl'><tr><th>line</th>{header}</tr>"
        f"{body}</table></div>"
    )


def _quality_section(evaluation: dict[str, Any]) -> str:
    champion = evaluation.get("vs_champion")
    delta_m = evaluation.get("delta_m")
    parts = ["<h2>Quality vs the champion and the single-task baselines</h2>"]
    if champion:
        parts.append(
            f"<p>Champion: {_e(champion.get('name'))} version {_e(champion.get('version'))}; "
            "paired bootstrap of candidate minus champion on the same test images "
            "(positive = candidate better).</p>"
        )
        rows = "".join(
            f"<tr><td>{_e(task)}</td><td>{_e(item.get('metric'))}</td>"
            + "".join(
                f'<td class="num">{_e(format_number(item.get(key)))}</td>'
                for key in ("candidate", "champion", "diff_higher_better", "p05", "p50", "p95")
            )
            + "</tr>"
            for task, item in (champion.get("metrics") or {}).items()
        )
        parts.append(
            "<table id='vs-champion'><tr><th>task</th><th>metric</th><th>candidate</th>"
            "<th>champion</th><th>diff (higher = better)</th><th>P05</th><th>P50</th>"
            f"<th>P95</th></tr>{rows}</table>"
        )
    else:
        reason = evaluation.get("vs_champion_reason")
        parts.append(
            "<p id='no-champion'>No champion yet" + (f": {_e(reason)}" if reason else "") + ".</p>"
        )
    if delta_m:
        per_task = delta_m.get("per_task_pct") or {}
        rows = "".join(
            f'<tr><td>{_e(task)}</td><td class="num">{_e(format_number(value))}</td></tr>'
            for task, value in per_task.items()
        )
        parts.append(
            "<p>Delta_m vs the single-task baselines (percent, higher = better): primary "
            f"{_e(format_number(delta_m.get('delta_m_primary_pct_higher_better')))}, "
            f"task-averaged {_e(format_number(delta_m.get('delta_m_task_avg_pct_higher_better')))}."
            "</p>"
            f"<table id='delta-m'><tr><th>task</th><th>vs STL, % (higher = better)</th></tr>"
            f"{rows}</table>"
        )
    else:
        reason = evaluation.get("delta_m_reason")
        parts.append(
            "<p id='no-baselines'>No baselines" + (f": {_e(reason)}" if reason else "") + ".</p>"
        )
    figure = _quality_figure(champion, delta_m)
    if figure:
        parts.append(
            f'<div class="figures"><img alt="quality vs champion and STL" '
            f'src="data:image/png;base64,{figure}"></div>'
        )
    return "".join(parts)


def _explain_section(evaluation: dict[str, Any], evaluation_dir: Path) -> str:
    explain = evaluation.get("explain") or {}
    paths = explain.get("affinity_maps") or []
    head = "<h2>Explainability: cross-task affinity maps</h2>"
    if not paths:
        return head + "<p id='no-affinity-maps'>No affinity maps in evaluation.json.</p>"
    figures, missing = [], []
    for relative in paths:
        path = evaluation_dir / relative
        mime = EMBEDDED_IMAGE_TYPES.get(path.suffix.lower())
        if mime is None or not path.is_file():
            missing.append(relative)
            continue
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        figures.append(
            f'<figure><img alt="{_e(relative)}" src="data:{mime};base64,{data}">'
            f"<figcaption class='muted'>{_e(relative)}</figcaption></figure>"
        )
    pixels = explain.get("pixels") or []
    text = (
        "<p>Where each task's prediction at a pixel draws from (per task and fused)"
        + (f", for pixels {_e(', '.join(str(tuple(p)) for p in pixels))}" if pixels else "")
        + ".</p>"
    )
    note = (
        f"<p class='muted'>Not embedded (missing or not PNG/JPEG): {_e(', '.join(missing))}</p>"
        if missing
        else ""
    )
    return head + text + f'<div class="maps">{"".join(figures)}</div>' + note


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


def _inputs_section(roi: dict[str, Any]) -> str:
    line_headers = "".join(f"<th>{_e(line_id)}</th>" for line_id in roi["per_line"])
    body = "".join(
        f"<tr><td><code>{_e(name)}</code></td><td>{_e(unit)}</td><td>{_e(meaning)}</td>"
        f'<td class="num">{_e(span)}</td>'
        + "".join(f'<td class="num">{_e(value)}</td>' for value in values)
        + "</tr>"
        for name, unit, meaning, span, values in input_rows(roi)
    )
    return (
        "<h2>Inputs</h2>"
        f"<p>Currency {_e(roi['currency'])}; flag action <code>{_e(roi.get('flag_action'))}</code>;"
        f" inference device: {_e(roi.get('inference_device'))}; current process: "
        f"{_e(roi.get('current_process'))}. Sources: configs/roi.yaml, configs/lines.yaml, "
        "evaluation.json (recall, false-reject rate, latency).</p>"
        "<div class='scroll'><table id='inputs'><tr><th>input</th><th>unit</th><th>meaning</th>"
        f"<th>low - high (pilot, tornado)</th>{line_headers}</tr>{body}</table></div>"
    )


def _formulas_section(roi: dict[str, Any]) -> str:
    text = "\n".join(f"{name}: {formula}" for name, formula in roi["formulas"].items())
    return f"<h2>Formulas</h2><pre id='formulas'>{_e(text)}</pre>"


def _provenance_section(roi: dict[str, Any]) -> str:
    model = roi.get("model") or {}
    data = roi.get("data") or {}
    return (
        "<h2>Provenance</h2><p class='muted'>"
        f"model sha256 <code>{_e(model.get('sha256'))}</code>, model id "
        f"<code>{_e(model.get('model_id'))}</code>, version {_e(model.get('version'))}; data "
        f"manifest <code>{_e(data.get('manifest_sha256'))}</code>, split {_e(data.get('split'))}."
        f" Regenerate: <code>{_e(REGENERATE_COMMAND)}</code>.</p>"
    )


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


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
