"""The roi_report step: evaluation.json + configs/roi.yaml + configs/lines.yaml -> roi.json,
report.html (one self-contained file) and report.md (for the KFP UI's markdown viewer).

``run()`` is the one home of the step: ``cta roi-report`` and the KFP component call it.

- Every line of the fleet inventory is priced. A line's recall r and false-reject rate f are its
  own ``per_line.<id>.inspection`` figures; where the evaluation has none (line not in the test
  data, no segmentation labels, no defective or no good test image) the pooled
  ``overall.inspection`` figure, else the worst case (r = 0, f = 1), and says which
  (``inputs.quality_source``): a test split too small to measure never overstates a saving.
- Risk comes from the paired bootstrap replicates ``bootstrap.replicates.<id>.{recall, frr}``;
  a null replicate or a line without replicates uses the replicate-wise mean of the other lines
  (else the line's point value).
- One multitask model vs T single-task models: the latency ratio is
  ``latency.images_per_s / latency.stl.images_per_s`` when measured, else T (T x one model).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cta_model.errors import DataError

from . import roi as model
from .config import DEFAULT_ROI_CONFIG, RoiConfig, line_economics, load_roi_config

ROI_NAME = "roi.json"
HTML_NAME = "report.html"
MARKDOWN_NAME = "report.md"
SCHEMA_NAME = "roi"
SCHEMA_VERSION = 1
QUALITY_OWN = "line"
QUALITY_POOLED = "pooled"  # overall.inspection: the line has no figures of its own
QUALITY_WORST_CASE = "worst case"  # not measurable on the test split
WORST_CASE = {"recall": 0.0, "frr": 1.0}


def run(
    evaluation: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    roi_config: str | os.PathLike[str] | None = None,
    lines_config: str | os.PathLike[str] | None = None,
    model_version: str | None = None,
) -> dict[str, Any]:
    """Price the evaluated model; write roi.json, report.html and report.md to ``out_dir``.

    ``model_version``: the registry version of the model when the caller knows it (in the
    training pipeline this step runs before registration, and evaluation.json's
    ``model.version`` is null until then); the report's title names it.

    Returns the roi.json content. Raises ConfigError for bad configs and DataError for an
    evaluation.json that breaks its schema, names a line outside the fleet inventory or
    another version than ``model_version``.
    """
    from components.artifacts import read_json, write_json_atomic
    from cta_model.atomic import write_bytes_atomic
    from cta_model.data.lines import load_lines_config

    from .report import render_html, render_markdown

    evaluation_path = Path(evaluation)
    evaluation_data = read_json(evaluation_path, schema_name="evaluation")
    lines = load_lines_config(lines_config or None)
    config = load_roi_config(roi_config or DEFAULT_ROI_CONFIG, lines)
    print(f"roi_report: pricing {len(lines.ids)} lines from {evaluation_path}", flush=True)

    result = compute(
        evaluation_data, config, lines, source=str(evaluation_path), model_version=model_version
    )
    roi_data = result["roi"]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / ROI_NAME, roi_data, schema_name=SCHEMA_NAME)
    html_text = render_html(roi_data, evaluation_data, evaluation_path.parent, result["samples"])
    write_bytes_atomic(out / HTML_NAME, html_text.encode("utf-8"))
    write_bytes_atomic(out / MARKDOWN_NAME, render_markdown(roi_data).encode("utf-8"))
    pilot = roi_data["pilot"]
    print(
        f"roi_report: pilot {roi_data['pilot_line']} payback {pilot['payback_label']}, "
        f"wrote {out / ROI_NAME}, {out / HTML_NAME}, {out / MARKDOWN_NAME}",
        flush=True,
    )
    return roi_data


def compute(
    evaluation: dict[str, Any],
    config: RoiConfig,
    lines: Any,
    source: str = "evaluation.json",
    model_version: str | None = None,
) -> dict[str, Any]:
    """``{"roi": roi.json content, "samples": {"pilot": ROI % array|None, "fleet": ...}}``."""
    unknown = sorted(set(evaluation.get("per_line", {})) - set(lines.ids))
    if unknown:
        raise DataError(
            f"{source}: per_line: line ids not in {lines.source}: {', '.join(unknown)} "
            "(price a model with the fleet inventory it was evaluated on)"
        )
    economics, ranges, sources = {}, {}, {}
    for line in lines.lines:
        recall, frr, quality_source = line_quality(evaluation, line.id)
        economics[line.id], ranges[line.id] = line_economics(config, line, recall, frr)
        sources[line.id] = quality_source
    replicates = paired_replicates(evaluation, {k: (e.recall, e.frr) for k, e in economics.items()})

    samples: dict[str, np.ndarray | None] = {}
    per_line = {}
    for line_id, e in economics.items():
        reps = replicates.get(line_id)
        samples[line_id] = None if reps is None else model.line_roi_samples(e, *reps)
        entry = model.line_result(e, samples[line_id])
        entry["inputs"] = {
            **{key: value for key, value in vars(e).items()},
            "quality_source": sources[line_id],
            "bootstrap_replicates": None if reps is None else len(reps[0]),
            "ranges": {name: list(bounds) for name, bounds in ranges[line_id].items()},
        }
        per_line[line_id] = entry

    pilot_id = lines.pilot.id
    fleet_lines = list(economics.values())
    if all(replicates.get(line_id) is not None for line_id in economics):
        samples["fleet"] = model.fleet_roi_samples(
            fleet_lines,
            [replicates[line_id][0] for line_id in economics],
            [replicates[line_id][1] for line_id in economics],
        )
    else:
        samples["fleet"] = None
    fleet = _fleet_entry(fleet_lines, per_line, samples["fleet"])
    pilot_e = economics[pilot_id]
    roi_data = {
        "schema_version": SCHEMA_VERSION,
        "currency": config.currency,
        "horizon_years": pilot_e.horizon_years,
        "discount_rate": pilot_e.discount_rate,
        "pilot_line": pilot_id,
        "evaluation_warnings": list(evaluation.get("warnings") or []),
        "model": priced_model(evaluation["model"], model_version, source),
        "data": {
            "manifest_sha256": evaluation["data"]["manifest_sha256"],
            "split": evaluation["data"]["split"],
        },
        "flag_action": config.flag_action,
        "inference_device": config.inference_device.name,
        "current_process": config.current_process.description,
        "per_line": per_line,
        "pilot": per_line[pilot_id],
        "fleet": fleet,
        "multitask_vs_stl": _multitask_vs_stl(evaluation, economics),
        "tornado_scope": f"NPV of the pilot line {pilot_id}",
        "tornado": model.tornado(pilot_e, ranges[pilot_id]),
        "formulas": dict(model.FORMULAS),
    }
    roi_data["recommendation"] = recommendation(roi_data)
    return {"roi": roi_data, "samples": {"pilot": samples[pilot_id], "fleet": samples["fleet"]}}


def priced_model(
    model_entry: dict[str, Any], model_version: str | None, source: str
) -> dict[str, Any]:
    """roi.json's ``model``: evaluation.json's name, version, model id and sha256, the version
    filled in from ``model_version`` where evaluation.json has none yet."""
    priced = {key: model_entry.get(key) for key in ("name", "version", "model_id")}
    if model_version:
        if priced["version"] not in (None, model_version):
            raise DataError(
                f"{source}: model.version is {priced['version']!r}, but the model version "
                f"given is {model_version!r}"
            )
        priced["version"] = model_version
    return priced | {"sha256": model_entry["sha256"]}


def line_quality(evaluation: dict[str, Any], line_id: str) -> tuple[float, float, str]:
    """(recall, frr, where they come from) of a line, each figure taken from the line's own
    inspection, else the pooled ``overall.inspection``, else the worst case (recall 0, every
    good part rejected), so that a test split too small to measure never overstates a saving."""
    own = (evaluation.get("per_line", {}).get(line_id) or {}).get("inspection") or {}
    pooled = (evaluation.get("overall") or {}).get("inspection") or {}
    values, sources = [], []
    for name in ("recall", "frr"):
        for candidate, source in ((own, QUALITY_OWN), (pooled, QUALITY_POOLED)):
            if candidate.get(name) is not None:
                values.append(float(candidate[name]))
                sources.append(source)
                break
        else:
            values.append(WORST_CASE[name])
            sources.append(QUALITY_WORST_CASE)
    source = sources[0] if sources[0] == sources[1] else f"recall {sources[0]}, frr {sources[1]}"
    return values[0], values[1], source


def paired_replicates(
    evaluation: dict[str, Any], points: dict[str, tuple[float, float]]
) -> dict[str, tuple[list[float], list[float]] | None]:
    """Per line: paired (recall, frr) replicates. A null replicate (a resample without
    defective or without good images) takes the replicate-wise mean of the other lines, else
    the line's point value; a line without replicates uses the lines that have them."""
    bootstrap = evaluation.get("bootstrap") or {}
    own = {
        line_id: (model.as_array(reps.get("recall") or []), model.as_array(reps.get("frr") or []))
        for line_id, reps in (bootstrap.get("replicates") or {}).items()
        if reps and reps.get("recall") and reps.get("frr")
    }
    if not own:
        return dict.fromkeys(points)
    lengths = {array.size for pair in own.values() for array in pair}
    if len(lengths) != 1:
        raise DataError(
            f"evaluation.json: bootstrap.replicates: recall and frr of every line need the same "
            f"number of replicates, found {sorted(lengths)}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-null columns stay NaN
        pooled = [np.nanmean(np.stack([pair[i] for pair in own.values()]), axis=0) for i in (0, 1)]
    missing = np.full(pooled[0].size, np.nan)
    result = {}
    for line_id, point in points.items():
        pair = own.get(line_id, (missing, missing))
        filled = []
        for i in (0, 1):
            values = np.where(np.isnan(pair[i]), pooled[i], pair[i])
            filled.append(np.where(np.isnan(values), point[i], values).tolist())
        result[line_id] = (filled[0], filled[1])
    return result


def _fleet_entry(
    lines: list[model.LineEconomics], per_line: dict[str, dict], roi_samples: np.ndarray | None
) -> dict[str, Any]:
    saving = sum(entry["annual_saving"] for entry in per_line.values())
    first = lines[0]
    entry = model.summarise(
        model.fleet_investment(lines), saving, first.discount_rate, first.horizon_years, roi_samples
    )
    for key in ("cost_current", "cost_model", "annual_volume", "flagged_model", "flagged_current"):
        entry[key] = float(sum(item[key] for item in per_line.values()))
    entry["n_devices"] = sum(item["n_devices"] for item in per_line.values())
    entry["hw_annual"] = float(sum(item["hw_annual"] for item in per_line.values()))
    entry["inputs"] = {
        "lines": list(per_line),
        "investment_rule": model.FORMULAS["fleet_investment"],
        "bootstrap_replicates": None if roi_samples is None else len(roi_samples),
    }
    return entry


def _multitask_vs_stl(evaluation: dict[str, Any], economics: dict[str, Any]) -> dict[str, Any]:
    latency = evaluation.get("latency") or {}
    stl = latency.get("stl") or {}
    tasks = evaluation["model"].get("tasks") or sorted(
        {key.split(".")[0] for key in evaluation["overall"]["metrics"]}
    )
    n_tasks = int(stl.get("n_models") or len(tasks))
    if stl.get("images_per_s") and latency.get("images_per_s"):
        ratio = float(latency["images_per_s"]) / float(stl["images_per_s"])
        ratio_source = "measured"
        note = (
            f"latency ratio {ratio:.2f} measured by cta evaluate on {latency.get('device')}: "
            f"{n_tasks} single-task models run one after another vs one multitask model"
        )
    else:
        ratio = float(n_tasks)
        ratio_source = "assumed"
        note = (
            f"STL latency not measured: assumed {n_tasks} x one model "
            f"(T = {n_tasks} single-task models, each as fast as the multitask model)"
        )
    per_line = {
        line_id: model.multitask_vs_stl_line(e, n_tasks, ratio) for line_id, e in economics.items()
    }
    stl_lines = [model.stl_economics(e, n_tasks, ratio) for e in economics.values()]
    fleet = {
        key: float(sum(item[key] for item in per_line.values()))
        for key in (
            "cost_multitask",
            "cost_stl",
            "hw_annual_multitask",
            "hw_annual_stl",
            "ops_annual_multitask",
            "ops_annual_stl",
            "annual_saving_of_multitask",
        )
    }
    fleet["investment_multitask"] = model.fleet_investment(list(economics.values()))
    fleet["investment_stl"] = model.fleet_investment(stl_lines)
    return {
        "n_tasks": n_tasks,
        "tasks": list(tasks),
        "latency_ratio": ratio,
        "latency_ratio_source": ratio_source,
        "note": note,
        "per_line": per_line,
        "fleet": fleet,
    }


def recommendation(roi_data: dict[str, Any]) -> dict[str, str]:
    """A verdict (go | go-with-review | hold) and one plain-words sentence for the summary."""
    pilot = roi_data["pilot"]
    line = roi_data["pilot_line"]
    p_positive = pilot["p_roi_positive"]
    roi_positive = (pilot["roi_pct_undiscounted"] or 0) > 0
    if pilot["payback_months"] is None:
        return {
            "verdict": "hold",
            "text": (
                f"Do not start the pilot on {line} yet: at the measured defect recall and "
                "false-reject rate the model would cost more per year than the current process."
            ),
        }
    confident = p_positive >= 0.9 if p_positive is not None else roi_positive
    if confident and pilot["npv"] > 0:
        verdict, text = "go", f"Start the pilot on {line}."
    elif pilot["npv"] > 0 or (p_positive is not None and p_positive >= 0.5):
        verdict, text = (
            "go-with-review",
            f"Start the pilot on {line} with a go/no-go review: the return is positive at base "
            "values but uncertain.",
        )
    else:
        verdict, text = (
            "hold",
            f"Hold the pilot on {line}: the saving does not repay the investment within "
            f"{roi_data['horizon_years']} years.",
        )
    return {"verdict": verdict, "text": text}
