"""The models a candidate is compared with, looked up in the MLflow registry (DESIGN 5.3, 7).

- STL baselines: ``<model>-stl-<task>`` with alias ``baseline``, tag ``cta.registration =
  complete`` and tag ``cta.data_manifest_sha256`` equal to the evaluated data's (and, where
  asked, ``cta.split``). Delta_m needs one per task of the candidate.
- Champion: ``<model>@champion``, a complete registration only.

Model folders come through ``components.registry.models.fetch_model_folder`` (checksums and
the version's ``cta.model_sha256`` verified there).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from components.registry.names import (
    BASELINE_ALIAS,
    CHAMPION_ALIAS,
    TAG_MANIFEST,
    TAG_SPLIT,
    baseline_name,
    version_uri,
)
from components.registry.versions import is_complete, version_by_alias


def matching_baseline(
    client: Any, model_name: str, task: str, manifest_sha256: str, split: str | None = None
) -> Any | None:
    """The complete ``baseline`` version of the task's STL model made on this data, or None."""
    version = version_by_alias(client, baseline_name(model_name, task), BASELINE_ALIAS)
    if version is None:
        return None
    tags = version.tags or {}
    if not is_complete(version) or tags.get(TAG_MANIFEST) != manifest_sha256:
        return None
    if split is not None and tags.get(TAG_SPLIT) != split:
        return None
    return version


def find_baselines(
    client: Any, model_name: str, tasks: Sequence[str], manifest_sha256: str
) -> tuple[dict[str, Any], list[str]]:
    """({task: matching baseline version}, [tasks without one])."""
    found: dict[str, Any] = {}
    missing: list[str] = []
    for task in tasks:
        version = matching_baseline(client, model_name, task, manifest_sha256)
        if version is None:
            missing.append(task)
        else:
            found[task] = version
    return found, missing


def complete_champion(client: Any, model_name: str) -> tuple[Any | None, str | None]:
    """(the ``champion`` version, None) or (None, why there is none to compare with)."""
    version = version_by_alias(client, model_name, CHAMPION_ALIAS)
    if version is None:
        return None, f"no {model_name}@{CHAMPION_ALIAS} registered"
    if not is_complete(version):
        return None, (
            f"{model_name}@{CHAMPION_ALIAS} (version {version.version}) is not a complete "
            "registration"
        )
    return version, None


def fetch_version(name: str, version: str, dest: Path, tracking_uri: str) -> Path:
    """The verified model folder of ``models:/<name>/<version>`` under ``dest``."""
    from components.registry.models import fetch_model_folder  # imports torch

    return fetch_model_folder(version_uri(name, version), dest=dest, tracking_uri=tracking_uri)


def delta_m_section(
    candidate_metrics: Mapping[str, float | None],
    tasks: Sequence[str],
    baselines: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, Any], str | None]:
    """(the evaluation.json ``delta_m`` object, reason when a variant is None).

    ``baselines``: {task: {name, version, metrics: {"<task>.<metric>": value|None}}}; only the
    baseline's own task's metrics are used.
    """
    from cta_model.delta_m import delta_m, relative_improvements
    from cta_model.tasks import metric_directions, metric_key, primary_metrics

    def as_float(values: Mapping[str, float | None]) -> dict[str, float]:
        return {k: math.nan if v is None else float(v) for k, v in values.items()}

    candidate = as_float(candidate_metrics)
    baseline = as_float(
        {
            key: value
            for task, entry in baselines.items()
            for key, value in entry["metrics"].items()
            if key.startswith(f"{task}.")
        }
    )
    primary = primary_metrics(tasks)
    directions = metric_directions(tasks)
    result = delta_m(candidate, baseline, primary, directions)
    reason = result.pop("reason", None)
    primary_keys = {metric_key(task, name): task for task, name in primary.items()}
    improvements = relative_improvements(
        candidate, baseline, {key: directions[key] for key in primary_keys}
    )
    per_task = {
        task: (
            improvements[key] if key in improvements and math.isfinite(improvements[key]) else None
        )
        for key, task in primary_keys.items()
    }
    section = {**result, "per_task_pct": per_task, "baselines": dict(baselines)}
    return section, reason


__all__ = [
    "complete_champion",
    "delta_m_section",
    "fetch_version",
    "find_baselines",
    "matching_baseline",
]
