"""The registry side of a roll-out: pinned versions, ``line-<id>`` aliases, history tags."""

from __future__ import annotations

import json
from typing import Any

from components.registry.names import TAG_MODEL_SHA256, TAG_ROLLOUT_HISTORY, line_alias, version_uri
from components.rollout.backends import ModelRef
from cta_model.errors import DataError

# MLflow limits a tag value to 5000 characters (MAX_TAG_VAL_LENGTH); the oldest entries go first.
_HISTORY_MAX_CHARS = 5000


def pin_version(name: str, version: str, tracking_uri: str | None) -> ModelRef:
    """The complete registered version with its sha256 (refuses half-registered versions)."""
    from components.registry.models import resolve_version  # imports torch

    uri = version_uri(name, version)
    found = resolve_version(uri, tracking_uri)
    if not found["sha256"]:
        raise DataError(f"{uri}: no {TAG_MODEL_SHA256} tag; cannot pin it")
    return ModelRef(name, str(found["version"]), str(found["sha256"]))


def alias_version(mlflow_client: Any, name: str, line_id: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow_client.get_model_version_by_alias(name, line_alias(line_id)).version)
    except MlflowException:
        return None


def move_alias(mlflow_client: Any, name: str, line_id: str, version: str | None) -> None:
    """Point ``line-<id>`` at ``version``; None removes the alias (the line had none)."""
    if version is None:
        mlflow_client.delete_registered_model_alias(name, line_alias(line_id))
    else:
        mlflow_client.set_registered_model_alias(name, line_alias(line_id), str(version))


def append_history(
    mlflow_client: Any, name: str, version: str, entry: dict[str, Any]
) -> list[dict[str, Any]]:
    """Add ``{line, action, time, decision}`` to the version's ``cta.rollout.history`` tag."""
    tags = mlflow_client.get_model_version(name, version).tags or {}
    try:
        history = json.loads(tags.get(TAG_ROLLOUT_HISTORY, "[]"))
    except ValueError:
        history = []
    history.append(entry)
    text = json.dumps(history, separators=(",", ":"))
    while len(text) > _HISTORY_MAX_CHARS and len(history) > 1:
        history.pop(0)
        text = json.dumps(history, separators=(",", ":"))
    mlflow_client.set_model_version_tag(name, version, TAG_ROLLOUT_HISTORY, text)
    return history
