"""Retraining trigger's decision: run the training pipeline on the newest data, or skip and say
why (`cta retrain`, cta_cli/commands/retrain.py, starts the run).

The newest data is what ``data_uri`` holds now (a folder or ``s3://`` prefix that the data
team updates, e.g. by ``dvc pull`` of the latest revision). Its manifest sha256 is compared with
the tag ``cta.data_manifest_sha256`` of the current champion: equal means nothing new to learn
from, so the run is skipped. ``force`` runs anyway; a drift report (from ``cta monitor``) can
be required with ``only_on_drift``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from components.registry.client import mlflow_client
from components.registry.names import CHAMPION_ALIAS, TAG_MANIFEST
from cta_model.errors import DataError


def newest_manifest_sha256(data_uri: str) -> str:
    from components.storage import opener_for
    from cta_model.data.line_dataset import MANIFEST_NAME, sha256_hex

    try:
        return sha256_hex(opener_for(data_uri)(MANIFEST_NAME))
    except FileNotFoundError:
        raise DataError(f"{data_uri}: no {MANIFEST_NAME}; is this a line dataset?") from None


def champion_manifest_sha256(model_name: str, tracking_uri: str | None) -> str | None:
    """The champion's data hash, or None when there is no champion (yet)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return (version.tags or {}).get(TAG_MANIFEST)


def drift_flagged(report_path: str | os.PathLike[str]) -> bool:
    report = json.loads(Path(report_path).read_text(encoding="utf-8"))
    if "drifted" not in report:
        raise DataError(f"{report_path}: not a monitor report (no 'drifted' field)")
    return bool(report["drifted"])


def decide(
    data_uri: str,
    model_name: str,
    tracking_uri: str | None,
    *,
    force: bool = False,
    drift_report: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """{"action": "run" | "skip", "reason", "data_sha256", "champion_sha256"}."""
    data_sha = newest_manifest_sha256(data_uri)
    champion_sha = champion_manifest_sha256(model_name, tracking_uri)
    decision = {"data_sha256": data_sha, "champion_sha256": champion_sha}
    if force:
        return {"action": "run", "reason": "forced", **decision}
    if drift_report is not None and not drift_flagged(drift_report):
        return {"action": "skip", "reason": f"no drift in {drift_report}", **decision}
    if champion_sha is None:
        return {"action": "run", "reason": f"{model_name} has no champion yet", **decision}
    if champion_sha == data_sha:
        return {
            "action": "skip",
            "reason": f"data unchanged: manifest sha256 {data_sha[:12]} equals the champion's",
            **decision,
        }
    return {
        "action": "run",
        "reason": f"new data: manifest sha256 {data_sha[:12]} != champion's {champion_sha[:12]}",
        **decision,
    }
