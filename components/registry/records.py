"""The gate's audit records of a version: ``gate/v<N>/<verdict-id>.json`` in its source run.

A record is written once and never overwritten (the gate finds an existing one by its verdict
id); the gate writes them, the model card lists them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from components.artifacts import write_json_atomic
from components.registry.attachments import Registration, read_run_json
from components.registry.names import record_dir


def gate_records(client: Any, reg: Registration) -> dict[str, dict[str, Any]]:
    """verdict id -> audit record, for every record of this version (oldest first)."""
    records = [
        read_run_json(client, reg.run_id, info.path)
        for info in client.list_artifacts(reg.run_id, record_dir(reg.version))
        if info.path.endswith(".json")
    ]
    # The same source run could hold another name's version N (one LoggedModel, two names).
    mine = [r for r in records if r["model"]["name"] == reg.name]
    return {r["verdict_id"]: r for r in sorted(mine, key=lambda r: r["decided_at"])}


def record_path(version: str | int, verdict_id: str) -> str:
    """The record's path inside the version's source run."""
    return f"{record_dir(version)}/{verdict_id}.json"


def write_record(client: Any, run_id: str, version: str, record: Mapping[str, Any]) -> None:
    """Log ``record`` as ``gate/v<version>/<verdict_id>.json`` of ``run_id``."""
    with tempfile.TemporaryDirectory(prefix="cta-gate-") as staging:
        path = write_json_atomic(Path(staging) / f"{record['verdict_id']}.json", record)
        client.log_artifact(run_id, str(path), artifact_path=record_dir(version))


__all__ = ["gate_records", "record_path", "write_record"]
