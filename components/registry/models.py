"""Model folders of registered versions, fetched and verified before anything loads them.

``fetch_model_folder(uri)`` accepts a local model folder, ``models:/NAME/<version>`` or
``models:/NAME@alias`` and returns a local folder whose SHA256SUMS hold and whose folder digest
(``cta_model.model_folder.folder_sha256``) equals the expected one: the ``expected_sha256``
argument, else the version's ``cta.model_sha256`` tag (set at training and registration; a
version without one is refused, since a folder's own SHA256SUMS proves nothing about who wrote
it). Any mismatch raises DataError naming the URI. Only versions tagged
``cta.registration=complete`` are served (DESIGN 6.1): a half-registered version is refused.
``fetch_logged_model(model_id)`` fetches a LoggedModel that is not registered yet (the pipeline's
evaluate step), verified against the ``cta.model_sha256`` tag training set on it.

Where the folder lives: a registered version points at its LoggedModel, a models-from-code
pyfunc whose artifact ``model_dir`` is the model folder (components/train/logged_model.py); the
path inside the LoggedModel's artefacts is read from its ``MLmodel`` file.

Cache: without ``dest`` a fetched folder lands in ``<cache>/<sha256>`` (``$CTA_MODEL_CACHE``,
else ``~/.cache/cta/models``). It is downloaded into a temporary sibling, verified, then renamed
into place, so a reader sees a whole verified folder or none; a cached folder is verified again
before it is reused (a tampered cache entry is replaced, not served).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.registry.client import mlflow_client, resolve_tracking_uri
from components.registry.names import (
    COMPLETE,
    MODEL_DIR_ARTIFACT,
    MODELS_SCHEME,
    TAG_COMPLETE,
    TAG_MODEL_ID,
    TAG_MODEL_SHA256,
)
from components.registry.versions import is_complete
from cta_model.config import read_yaml
from cta_model.errors import ConfigError, DataError
from cta_model.model_folder import CHECKSUMS, folder_sha256, verify_checksums

CACHE_ENV = "CTA_MODEL_CACHE"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "cta" / "models"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# models:/NAME/<digits> or models:/NAME@alias (MLflow's alias alphabet).
_VERSION_RE = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_ALIAS_RE = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[\w\-]+)$")


@dataclass(frozen=True)
class _Registered:
    name: str | None
    version: str | None
    model_id: str | None
    sha256: str | None
    source: str


def _check_sha(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    if not _SHA256_RE.match(value):
        raise ConfigError(f"{what}: {value!r} is not a sha256 (64 hex digits)")
    return value


def is_registry_uri(uri: str) -> bool:
    return uri.startswith(MODELS_SCHEME)


def _lookup(uri: str, client: Any) -> _Registered:
    """The complete registered version ``uri`` names; DataError when missing or incomplete."""
    from mlflow.exceptions import MlflowException

    by_version, by_alias = _VERSION_RE.match(uri), _ALIAS_RE.match(uri)
    if not (by_version or by_alias):
        raise ConfigError(
            f"model URI {uri!r}: expected a folder, models:/NAME/<version> or models:/NAME@alias"
        )
    try:
        if by_version:
            version = client.get_model_version(by_version["name"], by_version["version"])
        else:
            version = client.get_model_version_by_alias(by_alias["name"], by_alias["alias"])
    except MlflowException as exc:
        raise DataError(f"model URI {uri!r}: not found in the registry: {exc.message}") from exc
    tags = version.tags or {}
    if not is_complete(version):
        raise DataError(
            f"model URI {uri!r}: version {version.version} is not tagged "
            f"{TAG_COMPLETE}={COMPLETE} (registration unfinished); refusing to use it"
        )
    model_id = getattr(version, "model_id", None) or tags.get(TAG_MODEL_ID)
    source = version.source
    if model_id:
        # The LoggedModel's own location: a version's source may be a models:/ URI that only
        # the process-wide tracking URI resolves.
        source = client.get_logged_model(model_id).artifact_location
    return _Registered(
        name=version.name,
        version=str(version.version),
        model_id=model_id,
        sha256=_check_sha(tags.get(TAG_MODEL_SHA256), f"{uri}: tag {TAG_MODEL_SHA256}"),
        source=source,
    )


def resolve_version(uri: str, tracking_uri: str | None = None) -> dict[str, str | None]:
    """{name, version, sha256, model_id} of ``uri``; for a local folder name/version/model_id
    are None and sha256 is the folder digest."""
    if not is_registry_uri(uri):
        folder = _local_folder(uri)
        return {"name": None, "version": None, "sha256": folder_sha256(folder), "model_id": None}
    found = _lookup(uri, mlflow_client(tracking_uri))
    return {
        "name": found.name,
        "version": found.version,
        "sha256": found.sha256,
        "model_id": found.model_id,
    }


def _local_folder(uri: str) -> Path:
    folder = Path(uri.removeprefix("file://")).expanduser()
    if not folder.is_dir():
        raise DataError(f"model URI {uri!r}: no such folder")
    if not (folder / CHECKSUMS).is_file():
        raise DataError(f"model URI {uri!r}: {folder / CHECKSUMS} missing; not a model folder")
    return folder.resolve()


def _verify(folder: Path, uri: str, expected_sha256: str | None) -> str:
    """Check SHA256SUMS and the folder digest; return the digest."""
    try:
        verify_checksums(folder)
    except DataError as exc:
        raise DataError(f"model URI {uri!r}: {exc}") from exc
    actual = folder_sha256(folder)
    if expected_sha256 is not None and actual != expected_sha256:
        raise DataError(
            f"model URI {uri!r}: folder sha256 {actual} != expected {expected_sha256}; "
            "refusing to load a model that is not the one registered"
        )
    return actual


def model_dir_path(model_root: Path) -> str:
    """The model folder's path inside the LoggedModel, from its MLmodel file."""
    mlmodel = read_yaml(model_root / "MLmodel") or {}
    artifacts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    entry = artifacts.get(MODEL_DIR_ARTIFACT)
    if not entry or "path" not in entry:
        raise DataError(f"{model_root / 'MLmodel'}: no pyfunc artifact {MODEL_DIR_ARTIFACT!r}")
    return str(entry["path"]).strip("/")


def _download(found: _Registered, staging: Path, tracking_uri: str | None) -> Path:
    import mlflow

    tracking = resolve_tracking_uri(tracking_uri)
    source = found.source.rstrip("/")
    meta = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{source}/MLmodel", dst_path=str(staging / "meta"), tracking_uri=tracking
        )
    ).parent
    relative = model_dir_path(meta)
    downloaded = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{source}/{relative}",
            dst_path=str(staging / "download"),
            tracking_uri=tracking,
        )
    )
    return downloaded


def _cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def _move_into_place(downloaded: Path, target: Path, uri: str, expected: str) -> None:
    """Rename a verified folder to ``target``. A folder already there that verifies (another
    server fetched the same digest meanwhile, and may be loading it) is kept; anything else
    there is replaced."""
    if target.exists():
        try:
            _verify(target, uri, expected)
            return
        except DataError:
            pass
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
        target.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        downloaded.rename(target)
    except OSError:
        if not (target / CHECKSUMS).is_file():
            raise


@dataclass(frozen=True)
class FetchedModel:
    """A verified local model folder and what it is: ``sha256`` is the verified folder
    digest; name, version and model_id are None for a local folder."""

    folder: Path
    sha256: str
    name: str | None = None
    version: str | None = None
    model_id: str | None = None


def fetch_model(
    uri: str,
    dest: Path | None = None,
    tracking_uri: str | None = None,
    expected_sha256: str | None = None,
) -> FetchedModel:
    """``fetch_model_folder`` plus the identity of what was fetched, from one registry lookup
    (an alias that moves meanwhile cannot make the two disagree)."""
    expected = _check_sha(expected_sha256, f"{uri}: expected sha256")
    if not is_registry_uri(uri):
        folder = _local_folder(uri)
        return FetchedModel(folder, _verify(folder, uri, expected))

    found = _lookup(uri, mlflow_client(tracking_uri))
    if expected and found.sha256 and expected != found.sha256:
        raise DataError(
            f"model URI {uri!r}: expected sha256 {expected} but version {found.version} is "
            f"tagged {TAG_MODEL_SHA256}={found.sha256}"
        )
    expected = expected or found.sha256
    if expected is None:
        # Without the digest recorded at registration only the folder's own SHA256SUMS could
        # be checked, and whoever changes the weights can recompute that.
        raise DataError(
            f"model URI {uri!r}: version {found.version} records no {TAG_MODEL_SHA256} and no "
            "expected sha256 was given; refusing weights that cannot be verified"
        )
    return _fetch_verified(found, uri, dest, tracking_uri, expected)


def fetch_logged_model(
    model_id: str, dest: Path | None = None, tracking_uri: str | None = None
) -> FetchedModel:
    """The verified model folder of the LoggedModel ``model_id`` (``models:/<model_id>``), for
    the steps between training and registration (evaluate): it need not be registered, but its
    folder must match the ``cta.model_sha256`` tag that training set on it."""
    from mlflow.exceptions import MlflowException

    uri = f"{MODELS_SCHEME}{model_id}"
    client = mlflow_client(tracking_uri)
    try:
        logged = client.get_logged_model(model_id)
    except MlflowException as exc:
        raise DataError(f"model {uri!r}: no such LoggedModel: {exc.message}") from exc
    expected = _check_sha(
        (logged.tags or {}).get(TAG_MODEL_SHA256), f"{uri}: tag {TAG_MODEL_SHA256}"
    )
    if expected is None:
        raise DataError(
            f"model {uri!r}: the LoggedModel records no {TAG_MODEL_SHA256}; refusing weights "
            "that cannot be verified"
        )
    found = _Registered(
        name=None, version=None, model_id=model_id, sha256=expected, source=logged.artifact_location
    )
    return _fetch_verified(found, uri, dest, tracking_uri, expected)


def _fetch_verified(
    found: _Registered, uri: str, dest: Path | None, tracking_uri: str | None, expected: str
) -> FetchedModel:
    """Download ``found``'s model folder to ``dest`` (else the cache), verified against
    ``expected``; a folder already there that verifies is reused."""
    identity = {"name": found.name, "version": found.version, "model_id": found.model_id}
    target = Path(dest) if dest is not None else _cache_root() / expected
    if (target / CHECKSUMS).is_file():
        try:
            digest = _verify(target, uri, expected)
            return FetchedModel(target.resolve(), digest, **identity)
        except DataError:
            pass  # a damaged or different cached folder: fetch again and replace it
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        downloaded = _download(found, staging, tracking_uri)
        digest = _verify(downloaded, uri, expected)
        _move_into_place(downloaded, target, uri, expected)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return FetchedModel(target.resolve(), digest, **identity)


def fetch_model_folder(
    uri: str,
    dest: Path | None = None,
    tracking_uri: str | None = None,
    expected_sha256: str | None = None,
) -> Path:
    """A verified local model folder for ``uri`` (see the module docstring).

    A local folder is verified in place and returned as is (``dest`` is ignored). A registry
    URI is downloaded to ``dest`` when given, else to the cache; an existing folder there that
    verifies against the expected digest is reused without a download.
    """
    return fetch_model(uri, dest, tracking_uri, expected_sha256).folder


__all__ = [
    "FetchedModel",
    "fetch_logged_model",
    "fetch_model",
    "fetch_model_folder",
    "is_registry_uri",
    "model_dir_path",
    "resolve_version",
]
