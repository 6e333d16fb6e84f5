"""Registered versions as consumers may see them (DESIGN 6.1).

Only versions tagged ``cta.registration=complete`` may be used: one without the tag is a
registration in progress or one that failed half-way.
"""

from __future__ import annotations

from typing import Any

from components.registry.names import COMPLETE, TAG_COMPLETE, TAG_MODEL_ID
from cta_model.errors import ConfigError, DataError


def is_complete(version: Any) -> bool:
    return (version.tags or {}).get(TAG_COMPLETE) == COMPLETE


def _name_filter(name: str) -> str:
    if "'" in name or "\\" in name:
        raise ConfigError(f"model name {name!r} must not contain quotes or backslashes")
    return f"name = '{name}'"


def _all_versions(client: Any, name: str) -> list[Any]:
    versions: list[Any] = []
    page_token = None
    while True:
        page = client.search_model_versions(_name_filter(name), page_token=page_token)
        versions.extend(page)
        page_token = page.token
        if not page_token:
            return sorted(versions, key=lambda v: int(v.version))


def complete_versions(client: Any, name: str) -> list[Any]:
    """Versions of ``name`` tagged ``cta.registration=complete``, oldest first."""
    return [v for v in _all_versions(client, name) if is_complete(v)]


def find_version(client: Any, name: str, model_id: str) -> Any | None:
    """The lowest version of ``name`` registered from ``model_id``, complete or not; None when
    there is none."""
    for version in _all_versions(client, name):
        if getattr(version, "model_id", None) == model_id or (
            version.tags.get(TAG_MODEL_ID) == model_id
        ):
            return version
    return None


def get_complete_version(client: Any, name: str, version: str | int) -> Any:
    """The model version, refused (DataError) unless tagged ``cta.registration=complete``."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise DataError(f"model {name!r} version {version}: not found in the registry") from exc
    if not is_complete(found):
        raise DataError(
            f"model {name!r} version {version}: registration not complete (no tag "
            f"{TAG_COMPLETE}={COMPLETE}); re-run register-model to complete it"
        )
    return found


def version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    """The version ``name@alias``, complete or not; None when the model or the alias does not
    exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


__all__ = [
    "complete_versions",
    "find_version",
    "get_complete_version",
    "is_complete",
    "version_by_alias",
]
