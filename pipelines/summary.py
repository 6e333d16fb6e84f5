"""The short summary a person reads after a local pipeline run (``cta pipeline run --local``,
``make demo``): task states, test metrics, the pilot line's inspection figures (image AUROC,
recall and false-reject rate with their bootstrap intervals) and evaluate's warnings, Delta_m,
the pilot line's payback, the registered version and its gate verdict, which line runs which
version, and where every report is.

The registered version, its metrics and its verdict are read back from the MLflow registry
(tags written by register-model and the gate), so the summary shows what MLflow holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from components.registry.names import CHALLENGER_ALIAS, TAG_VERDICT, evaluation_tag


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _with_interval(value: Any, interval: dict[str, Any] | None) -> str:
    """``0.91 [0.85, 0.96]``: the figure and its bootstrap p05-p95 (omitted when unknown)."""
    low, high = (interval or {}).get("p05"), (interval or {}).get("p95")
    if value is None or low is None or high is None:
        return _number(value)
    return f"{_number(value)} [{_number(low)}, {_number(high)}]"


def inspection_lines(evaluation: dict[str, Any], pilot_line: str | None) -> list[str]:
    """The pilot line's (else the pooled) defect figures at the operating threshold, and every
    warning evaluate gave (e.g. val cannot reach the target recall)."""
    entries = []
    pilot = (evaluation["per_line"].get(pilot_line) or {}) if pilot_line else {}
    if pilot.get("inspection"):
        entries.append((f"pilot line {pilot_line}", pilot["inspection"]))
    if not entries or len(evaluation["per_line"]) > 1:
        entries.append(("all lines", evaluation["overall"].get("inspection")))
    lines = []
    for scope, inspection in entries:
        if not inspection:
            lines.append(f"  {scope}: no defect figures (no class labels or no defect score)")
            continue
        intervals = inspection.get("intervals") or {}
        lines.append(
            f"  {scope}: image AUROC "
            f"{_with_interval(inspection.get('image_auroc'), intervals.get('image_auroc'))}, "
            f"recall {_with_interval(inspection.get('recall'), intervals.get('recall'))}, "
            f"false-reject rate {_with_interval(inspection.get('frr'), intervals.get('frr'))} "
            f"at threshold {_number(inspection.get('threshold'))} chosen on val for recall "
            f"{_number(inspection.get('target_recall'))} ({inspection.get('n_defective')} "
            f"defective, {inspection.get('n_good')} good test images)"
        )
    warnings = evaluation.get("warnings") or []
    if warnings:
        lines.append(f"evaluation warnings ({len(warnings)}):")
        lines += [f"  {warning}" for warning in warnings]
    return ["defect inspection on test ([p05, p95] of the bootstrap):", *lines]


def _registered(tracking_uri: str, model_name: str, version: str) -> dict[str, str]:
    from components.registry.client import mlflow_client

    return dict(mlflow_client(tracking_uri).get_model_version(model_name, version).tags or {})


def _rollout_lines(state_uri: str) -> list[str]:
    from components.rollout.engine import status
    from components.rollout.state import open_store

    report = status(open_store(state_uri))
    out = []
    for line_id, line in report["lines"].items():
        running = line["running"]
        what = f"v{running['version']} at {running.get('url') or '-'}" if running else "nothing"
        out.append(f"  {line_id:<10} runs {what} ({line['decision'] or 'no decision yet'})")
    return out


def _artifact(tasks: dict, task: str, name: str, *parts: str) -> Path | None:
    """The local path of ``task``'s artefact ``name`` (joined with ``parts``), None when the
    task did not run."""
    uri = tasks.get(task, {}).get("artifacts", {}).get(name)
    return Path(uri, *parts) if uri else None


def summary_lines(
    result: dict,
    tracking_uri: str,
    model_name: str = "cta-inspection",
    rollout_state: str | None = None,
) -> list[str]:
    from components.evaluate.step import EVALUATION_NAME
    from components.roi_report.step import HTML_NAME, ROI_NAME
    from components.train_baselines.step import SUMMARY_NAME as BASELINES_SUMMARY
    from components.validate_data.step import REPORT_NAME
    from pipelines.training import (
        EVALUATE_TASK,
        GATE_TASK,
        REGISTER_TASK,
        ROI_TASK,
        TRAIN_BASELINES_TASK,
        TRAIN_TASK,
        VALIDATE_TASK,
    )

    tasks = result["tasks"]
    lines = ["pipeline tasks: " + ", ".join(f"{t} {i['state']}" for t, i in tasks.items())]
    version = tasks.get(REGISTER_TASK, {}).get("outputs", {}).get("Output")
    tags = _registered(tracking_uri, model_name, version) if version else {}
    evaluation_path = _artifact(tasks, EVALUATE_TASK, "evaluation", EVALUATION_NAME)
    roi_path = _artifact(tasks, ROI_TASK, "roi", ROI_NAME)
    roi = json.loads(roi_path.read_text()) if roi_path and roi_path.is_file() else None
    evaluation: dict[str, Any] = {}
    if evaluation_path and evaluation_path.is_file():
        evaluation = json.loads(evaluation_path.read_text())
        overall = evaluation["overall"]
        lines.append(f"test metrics ({overall['n_images']} images):")
        for name, value in overall["metrics"].items():
            registered = tags.get(evaluation_tag(name))
            note = f"   (MLflow: {registered})" if registered else ""
            lines.append(f"  {name:<24} {_number(value)}{note}")
        lines += inspection_lines(evaluation, roi["pilot_line"] if roi else None)
        delta_m = evaluation.get("delta_m")
        if delta_m:
            lines.append(
                f"Delta_m vs STL baselines: {delta_m['delta_m_primary_pct_higher_better']:+.2f} % "
                "(higher is better)"
            )
        else:
            lines.append(f"Delta_m: n/a ({evaluation.get('delta_m_reason')})")
    baselines_path = _artifact(tasks, TRAIN_BASELINES_TASK, "baselines", BASELINES_SUMMARY)
    if baselines_path and baselines_path.is_file():
        baselines = json.loads(baselines_path.read_text())
        if baselines.get("disabled"):
            state = "none trained (stl_baselines off)"
            if not evaluation.get("delta_m"):
                state = "none registered for this data and " + state
        elif baselines.get("trained"):
            state = f"trained and registered ({', '.join(sorted(baselines['trained']))})"
        else:
            state = f"reused from the registry ({', '.join(baselines.get('reused', []))})"
        lines.append(f"STL baselines: {state}")
    if roi is not None:
        pilot = roi["pilot"]
        lines.append(
            f"pilot line {roi['pilot_line']}: payback {pilot['payback_label']}, NPV "
            f"{roi['currency']} {pilot['npv']:,.0f}, P(ROI > 0) {_number(pilot['p_roi_positive'])}"
        )
    if version:
        lines.append(f"registered: {model_name} version {version} (alias {CHALLENGER_ALIAS})")
    verdict = tasks.get(GATE_TASK, {}).get("outputs", {}).get("Output")
    if verdict:
        lines.append(f"gate: {verdict} (MLflow tag {TAG_VERDICT}={tags.get(TAG_VERDICT)})")
    if rollout_state and Path(rollout_state).exists():
        lines.append("lines:")
        lines += _rollout_lines(rollout_state)
    for label, path in (
        ("validation report", _artifact(tasks, VALIDATE_TASK, "dataset", REPORT_NAME)),
        ("evaluation", evaluation_path),
        ("ROI report", _artifact(tasks, ROI_TASK, "roi", HTML_NAME)),
        ("model folder", _artifact(tasks, TRAIN_TASK, "model", "model")),
    ):
        if path is not None:
            lines.append(f"{label + ':':<18} {path}")
    lines += [
        f"MLflow store:      {tracking_uri}",
        f"open the MLflow UI: mlflow ui --backend-store-uri {tracking_uri}",
    ]
    if rollout_state:
        lines.append(f"roll-out status:   cta rollout status --state {rollout_state}")
    return lines
