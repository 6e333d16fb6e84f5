"""Register a model folder with a contract-shaped evaluation.json that records operating
thresholds (``per_line.<line>.inspection.threshold``, ``overall.inspection.threshold``), as
`cta evaluate` writes them (evaluation schema version 2): what a line server reads when it
serves a registered version."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import mlflow

from components.register_model.step import run as register
from components.train.logged_model import log_model_folder
from cta_model.model_folder import folder_sha256, read_model_card


def _scored(threshold: float | None) -> dict[str, Any]:
    scored: dict[str, Any] = {"n_images": 4, "metrics": {"semseg.miou": 0.5}}
    if threshold is not None:
        scored["inspection"] = {"threshold": threshold}
    return scored


def evaluation_with_thresholds(
    folder: Path, model_id: str, per_line: dict[str, float], overall: float | None
) -> dict[str, Any]:
    return {
        "schema_version": 2,
        "model": {
            "name": None,
            "version": None,
            "model_id": model_id,
            "sha256": folder_sha256(folder),
            "tasks": list(read_model_card(folder).spec.tasks),
        },
        "data": {"uri": "/data/lines", "manifest_sha256": "ab" * 32, "split": "test"},
        "per_line": {line: _scored(threshold) for line, threshold in per_line.items()},
        "overall": _scored(overall),
        "delta_m": None,
        "delta_m_reason": "no STL baseline in this test",
        "warnings": [],
    }


def register_with_thresholds(
    folder: Path,
    name: str,
    tracking_uri: str,
    scratch: Path,
    per_line: dict[str, float],
    overall: float | None = None,
) -> str:
    """Log ``folder`` as a LoggedModel and register it as ``name`` with the thresholds; returns
    the version."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(f"cta-thresholds-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run():
        model_id = log_model_folder(folder).model_id
    path = scratch / f"evaluation-{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps(evaluation_with_thresholds(folder, model_id, per_line, overall)))
    return str(register(model_id, name, evaluation=path, tracking_uri=tracking_uri)["version"])
