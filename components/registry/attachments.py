"""Read back what register_model attached to a version: the registry is the only source.

Used by the gate and the model card. The files live as artefacts of the version's source run
under ``registration/v<N>/``; the version tags ``cta.artifacts.*`` name that run. Only
complete registrations are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.artifacts import read_json, schema_path
from components.registry.names import (
    DATASET_REF_FILE,
    EVALUATION_FILE,
    ROI_FILE,
    TAG_ARTIFACT_PREFIX,
    registration_dir,
)
from components.registry.versions import get_complete_version
from cta_model.errors import DataError

#: file name -> schema it is checked against on read (roi only once its schema exists).
_ATTACHED = {EVALUATION_FILE: "evaluation", DATASET_REF_FILE: "dataset_ref", ROI_FILE: "roi"}
_PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@contextmanager
def quiet_downloads() -> Iterator[None]:
    """No MLflow progress bars for these small files: they would garble the CLI's output."""
    previous = os.environ.get(_PROGRESS_BAR_ENV)
    os.environ[_PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_PROGRESS_BAR_ENV, None)
        else:
            os.environ[_PROGRESS_BAR_ENV] = previous


@dataclass(frozen=True)
class Registration:
    """A complete registered version and the JSON files attached to it."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str]
    source: str | None
    evaluation: dict[str, Any] | None = None
    dataset_ref: dict[str, Any] | None = None
    roi: dict[str, Any] | None = None
    #: file name -> sha256 of its bytes, None for a file that is not attached.
    sha256: dict[str, str | None] = field(default_factory=dict)


def run_of_version(version: Any) -> str:
    """The run holding the version's artefacts (named by its ``cta.artifacts.*`` tags)."""
    for key, uri in sorted(version.tags.items()):
        if key.startswith(TAG_ARTIFACT_PREFIX) and uri.startswith("runs:/"):
            return uri.removeprefix("runs:/").split("/", 1)[0]
    if version.run_id:
        return version.run_id
    raise DataError(
        f"model {version.name!r} version {version.version}: no source run holds its artefacts"
    )


def _read(path: Path, file_name: str) -> dict[str, Any]:
    schema = _ATTACHED[file_name]
    return read_json(path, schema if schema_path(schema).is_file() else None)


def read_registration(client: Any, name: str, version: str | int) -> Registration:
    """The complete version ``name``/``version`` with its attached JSON files parsed."""
    found = get_complete_version(client, name, version)
    run_id = run_of_version(found)
    folder = registration_dir(found.version)
    present = {Path(info.path).name for info in client.list_artifacts(run_id, folder)}
    parsed: dict[str, dict[str, Any] | None] = {}
    digests: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory(prefix="cta-registration-") as staging, quiet_downloads():
        for file_name in _ATTACHED:
            if file_name not in present:
                parsed[file_name], digests[file_name] = None, None
                continue
            local = Path(client.download_artifacts(run_id, f"{folder}/{file_name}", staging))
            digests[file_name] = hashlib.sha256(local.read_bytes()).hexdigest()
            parsed[file_name] = _read(local, file_name)
    return Registration(
        name=name,
        version=str(found.version),
        run_id=run_id,
        tags=dict(found.tags),
        source=found.source,
        evaluation=parsed[EVALUATION_FILE],
        dataset_ref=parsed[DATASET_REF_FILE],
        roi=parsed[ROI_FILE],
        sha256=digests,
    )


def read_run_json(client: Any, run_id: str, artifact_path: str) -> dict[str, Any]:
    """One JSON artefact of a run, parsed."""
    with tempfile.TemporaryDirectory(prefix="cta-artefact-") as staging, quiet_downloads():
        local = Path(client.download_artifacts(run_id, artifact_path, staging))
        try:
            return json.loads(local.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"runs:/{run_id}/{artifact_path}: not valid JSON: {exc}") from None


__all__ = [
    "Registration",
    "quiet_downloads",
    "read_registration",
    "read_run_json",
    "run_of_version",
]
