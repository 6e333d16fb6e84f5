"""The rules of a ``dataset_ref.json`` (what validate-data hands on), shared by train and evaluate.

A dataset_ref names a dataset root (``uri``), the sha256 of the manifest that was validated
(``manifest_sha256``), the DVC revision and the ``quarantine``: sample ids the user knowingly
excluded. A reader skips the quarantined samples and refuses a manifest that changed since the
validation. The evaluate step checks the file against ``schemas/dataset_ref.schema.json`` before
it applies these rules; the trainer reads it with :func:`read_dataset_ref`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cta_model.data.line_dataset import MANIFEST_NAME
from cta_model.errors import ConfigError, DataError

#: The file validate-data writes into its output folder (the pipeline's ``dataset`` artefact).
DATASET_REF_NAME = "dataset_ref.json"


def dataset_ref_in(folder: str | Path) -> str:
    """The dataset_ref.json inside a validate-data output folder (or ``dataset`` artefact)."""
    return str(Path(folder) / DATASET_REF_NAME)


def read_dataset_ref(path: str) -> dict[str, Any]:
    """The parsed dataset_ref of the train config's ``data.dataset_ref``; ConfigError when it is
    unreadable or lacks a ``uri`` string or a list of quarantined sample ids."""
    try:
        ref = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"data.dataset_ref: cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"data.dataset_ref: {path} is not valid JSON: {exc}") from None
    if not isinstance(ref, dict) or not isinstance(ref.get("uri"), str) or not ref["uri"]:
        raise ConfigError(f"data.dataset_ref: {path} has no 'uri' string")
    quarantine = ref.get("quarantine", [])
    if not isinstance(quarantine, list) or not all(isinstance(q, str) for q in quarantine):
        raise ConfigError(f"data.dataset_ref: {path}: 'quarantine' must be a list of sample ids")
    return ref


def quarantined_ids(ref: Mapping[str, Any] | None) -> set[str]:
    """The sample ids a reader skips (none without a dataset_ref)."""
    return set(ref.get("quarantine", [])) if ref is not None else set()


def check_manifest(
    ref: Mapping[str, Any] | None, manifest_sha256: str, *, root: str, ref_path: Any
) -> None:
    """DataError when the manifest under ``root`` is not the one the dataset_ref validated."""
    validated = ref.get("manifest_sha256") if ref is not None else None
    if validated and validated != manifest_sha256:
        raise DataError(
            f"{root}/{MANIFEST_NAME}: sha256 {manifest_sha256} differs from the validated "
            f"manifest_sha256 {validated} in {ref_path}; validate the data again"
        )


def refuse_empty_split(kept: int, *, root: str, split: str) -> None:
    """DataError when the quarantine (or the data) leaves ``split`` without a sample."""
    if kept == 0:
        raise DataError(f"{root}: split {split!r} has no samples outside the quarantine")
