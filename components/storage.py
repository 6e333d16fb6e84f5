"""Where datasets and artefacts live: local folders or ``s3://`` prefixes (DESIGN 4.2, 6).

``opener_for(uri)`` gives the callable a LineDataset reads through: a LocalOpener for a folder
(or ``file://`` URI), an S3Opener for an ``s3://bucket/prefix``. The tree and single-object
helpers (upload_tree, download_tree, read_bytes, write_bytes_atomic) serve the pipeline steps.

S3 settings come from the environment, never from code or config files in git:

- endpoint: the ``endpoint_url`` argument, else ``CTA_S3_ENDPOINT_URL``, else
  ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (MinIO, Ceph, moto); unset means AWS itself;
- credentials and region: the standard boto3 chain (``AWS_ACCESS_KEY_ID`` ..., profiles, IRSA);
  this module never reads, stores, pickles or logs them;
- ``CTA_S3_MAX_ATTEMPTS`` (requests in all, the first included; default 5, boto3 "standard"
  retry mode), ``CTA_S3_CONNECT_TIMEOUT`` and ``CTA_S3_READ_TIMEOUT`` (seconds, defaults 10
  and 60).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from cta_model import atomic
from cta_model.data.line_dataset import MANIFEST_NAME, LocalOpener, check_relative_path
from cta_model.errors import ConfigError, DataError

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0
# Below botocore's default connection pool (10), so no transfer waits for a connection.
DEFAULT_TRANSFER_WORKERS = 8
# Larger files go through boto3's managed (multipart, ranged) transfers.
_SINGLE_REQUEST_MAX_BYTES = 64 * 1024 * 1024
# Error codes S3 (and S3-compatible stores) answer for an object that is not there.
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchBucket"})

Opener = Callable[[str], bytes]


# --- URIs ---


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for an ``s3://`` URI; local paths and ``file://`` URIs are not remote."""
    return str(uri).startswith(S3_SCHEME)


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix`` split into its parts; ``prefix`` has no leading/trailing '/'."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not uri.startswith(S3_SCHEME):
            raise ConfigError(f"{uri!r} is not an s3:// URI")
        bucket, _, prefix = uri[len(S3_SCHEME) :].partition("/")
        if not bucket:
            raise ConfigError(f"{uri!r}: no bucket name (expected s3://bucket/prefix)")
        return cls(bucket, prefix.strip("/"))

    @property
    def uri(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key_for(self, relative: str) -> str:
        """The object key of a root-relative path; ValueError for a path leaving the root."""
        check_relative_path(relative)
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def uri_for(self, relative: str) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key_for(relative)}"


def local_path(uri: str | os.PathLike[str]) -> Path:
    """The path of a local path or ``file://`` URI; ConfigError for any other scheme."""
    text = os.fspath(uri)
    if text.startswith(FILE_SCHEME):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"{text!r}: file:// URIs on another host are not supported")
        return Path(unquote(parsed.path))
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise ConfigError(f"{text!r}: unsupported scheme {scheme!r} (use a path, file:// or s3://)")
    return Path(text)


# --- S3 client ---


def _env_number(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not a number") from None
    if value < minimum:
        raise ConfigError(f"environment variable {name}={raw!r} must be >= {minimum:g}")
    return value


def resolve_endpoint_url(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint: the argument, else CTA_S3_ENDPOINT_URL, AWS_ENDPOINT_URL_S3,
    AWS_ENDPOINT_URL; None means the AWS default endpoint for the region."""
    for candidate in (
        endpoint_url,
        os.environ.get("CTA_S3_ENDPOINT_URL"),
        os.environ.get("AWS_ENDPOINT_URL_S3"),
        os.environ.get("AWS_ENDPOINT_URL"),
    ):
        if candidate:
            return candidate
    return None


def make_s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client with bounded retries and timeouts (credentials: the boto3 chain)."""
    import boto3
    import botocore.session
    from botocore.config import Config

    endpoint = resolve_endpoint_url(endpoint_url)
    config = Config(
        # total_max_attempts counts the first try too (botocore's max_attempts counts retries
        # only, so max_attempts=5 would mean 6 requests); the same meaning as AWS_MAX_ATTEMPTS.
        retries={
            "mode": "standard",
            "total_max_attempts": int(_env_number("CTA_S3_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, 1)),
        },
        connect_timeout=_env_number("CTA_S3_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_S, 0.1),
        read_timeout=_env_number("CTA_S3_READ_TIMEOUT", DEFAULT_READ_TIMEOUT_S, 0.1),
        # S3-compatible stores (MinIO, moto, Ceph) behind an IP or a single host name do not
        # resolve bucket.host names; path-style works on all of them.
        s3={"addressing_style": "path"} if endpoint else None,
    )
    # A session per client (the default boto3 session is not thread-safe to create clients
    # from, and each session resolves credentials afresh), sharing one loader of the service
    # models: parsing them is most of the cost of a client (~100 ms -> ~15 ms).
    botocore_session = botocore.session.get_session()
    botocore_session.register_component("data_loader", _shared_loader())
    session = boto3.session.Session(botocore_session=botocore_session)
    return session.client("s3", endpoint_url=endpoint, config=config)


_loader_lock = threading.Lock()
_loader: Any = None


def _shared_loader() -> Any:
    global _loader
    with _loader_lock:
        if _loader is None:
            import botocore.loaders

            _loader = botocore.loaders.create_loader()
        return _loader


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _get_object(client: Any, bucket: str, key: str) -> bytes:
    """The object's bytes; DataError naming the URI when it is missing, OSError otherwise."""
    from botocore.exceptions import BotoCoreError, ClientError

    uri = f"{S3_SCHEME}{bucket}/{key}"
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        with response["Body"] as body:
            return body.read()
    except ClientError as exc:
        code = _error_code(exc)
        if code in _MISSING_CODES:
            what = "bucket missing" if code == "NoSuchBucket" else "object missing"
            raise DataError(f"{uri}: {what} ({code})") from None
        raise OSError(f"{uri}: cannot read: {code or exc}") from None
    except BotoCoreError as exc:
        # Connection errors after the retries; LineDataset turns OSError into a DataError.
        raise OSError(f"{uri}: cannot read: {exc}") from None


def _put_object(client: Any, bucket: str, key: str, data: bytes) -> None:
    """One atomic put; OSError naming the URI when S3 refuses it."""
    from botocore.exceptions import BotoCoreError, ClientError

    uri = f"{S3_SCHEME}{bucket}/{key}"
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data)
    except ClientError as exc:
        raise OSError(f"{uri}: cannot write: {_error_code(exc) or exc}") from None
    except BotoCoreError as exc:
        raise OSError(f"{uri}: cannot write: {exc}") from None


class S3Opener:
    """Read root-relative paths below ``s3://bucket/prefix`` (the LineDataset opener for S3).

    Keys never leave the prefix (check_relative_path). Picklable for DataLoader workers: the
    boto3 client is created lazily and left out of the pickled state, and a forked worker makes
    its own (connection pools must not be shared across fork).
    """

    def __init__(self, uri: str, endpoint_url: str | None = None, client: Any = None) -> None:
        self.location = S3Location.parse(uri)
        self.endpoint_url = resolve_endpoint_url(endpoint_url)
        self._client = client
        self._client_pid = os.getpid() if client is not None else None
        self._lock = threading.Lock()

    @property
    def uri(self) -> str:
        return self.location.uri

    @property
    def client(self) -> Any:
        if self._client is None or self._client_pid != os.getpid():
            with self._lock:
                if self._client is None or self._client_pid != os.getpid():
                    self._client = make_s3_client(self.endpoint_url)
                    self._client_pid = os.getpid()
        return self._client

    def __call__(self, relative: str) -> bytes:
        key = self.location.key_for(relative)  # raises before any request for a bad path
        return _get_object(self.client, self.location.bucket, key)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_client_pid"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Opener({self.uri!r}, endpoint_url={self.endpoint_url!r})"


def opener_for(uri: str | os.PathLike[str], **s3_options: Any) -> Opener:
    """The opener of a dataset root: S3Opener for ``s3://``, LocalOpener for a path or
    ``file://``. ``s3_options`` (endpoint_url, client) apply to S3 only."""
    if is_remote(uri):
        return S3Opener(os.fspath(uri), **s3_options)
    return LocalOpener(local_path(uri))


# --- trees and single objects ---


def _iter_files(root: Path) -> Iterable[str]:
    """Root-relative POSIX paths of the regular files below ``root``, sorted."""
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if path.is_file():
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def upload_tree(
    local_dir: str | Path,
    s3_uri: str,
    *,
    endpoint_url: str | None = None,
    client: Any = None,
    last: Iterable[str] = (MANIFEST_NAME,),
    workers: int = DEFAULT_TRANSFER_WORKERS,
) -> list[str]:
    """Upload every file below ``local_dir`` to ``s3_uri``; returns the relative paths in
    upload order.

    Paths named in ``last`` go after all others have landed: a line dataset is complete once
    its manifest exists, so a reader never sees a manifest whose files are still on their way.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    location = S3Location.parse(s3_uri)
    client = client if client is not None else make_s3_client(endpoint_url)
    delayed = set(last)
    relatives = _iter_files(root)
    for relative in relatives:
        location.key_for(relative)  # refuse the whole tree before uploading any of it

    def upload(relative: str) -> None:
        path, key = root / relative, location.key_for(relative)
        if path.stat().st_size <= _SINGLE_REQUEST_MAX_BYTES:
            # One request; upload_file would start a transfer thread pool per file.
            _put_object(client, location.bucket, key, path.read_bytes())
        else:
            client.upload_file(str(path), location.bucket, key)  # multipart

    first = [p for p in relatives if p not in delayed]
    final = [p for p in relatives if p in delayed]
    _run_parallel(upload, first, workers)
    _run_parallel(upload, final, workers)
    return first + final


def download_tree(
    s3_uri: str,
    local_dir: str | Path,
    *,
    endpoint_url: str | None = None,
    client: Any = None,
    workers: int = DEFAULT_TRANSFER_WORKERS,
) -> list[str]:
    """Download every object below ``s3_uri`` into ``local_dir``; returns the relative paths.

    A key that would land outside ``local_dir`` ('..', absolute) is a DataError, raised before
    anything is written; files are written atomically.
    """
    location = S3Location.parse(s3_uri)
    client = client if client is not None else make_s3_client(endpoint_url)
    root = Path(local_dir)
    key_prefix = f"{location.prefix}/" if location.prefix else ""
    sizes: dict[str, int] = {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=location.bucket, Prefix=key_prefix):
        for entry in page.get("Contents", []):
            relative = entry["Key"][len(key_prefix) :]
            if not relative or relative.endswith("/"):
                continue  # folder markers some tools create
            try:
                check_relative_path(relative)
            except ValueError as exc:
                raise DataError(f"s3://{location.bucket}/{entry['Key']}: {exc}") from None
            sizes[relative] = int(entry.get("Size", 0))

    def download(relative: str) -> None:
        key, target = location.key_for(relative), root / PurePosixPath(relative)
        if sizes[relative] <= _SINGLE_REQUEST_MAX_BYTES:
            atomic.write_bytes_atomic(target, _get_object(client, location.bucket, key))
        else:
            # Ranged parts, streamed to a temporary file that s3transfer renames at the end.
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(location.bucket, key, str(target))

    if not sizes:
        # Most often a mistyped prefix; an empty result would look like an empty dataset.
        raise DataError(f"{location.uri}: no objects below this prefix")
    relatives = sorted(sizes)
    _run_parallel(download, relatives, workers)
    return relatives


def _run_parallel(function: Callable[[str], None], items: list[str], workers: int) -> None:
    """Call ``function`` on every item in a thread pool (boto3 clients are thread-safe);
    the first error is raised once the running calls have finished."""
    if workers <= 1 or len(items) <= 1:
        for item in items:
            function(item)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(function, item) for item in items]
        for future in futures:
            error = future.exception()
            if error is not None:
                for pending in futures:
                    pending.cancel()
                raise error


def read_bytes(
    uri: str | os.PathLike[str], *, endpoint_url: str | None = None, client: Any = None
) -> bytes:
    """The bytes of one local file or S3 object; DataError naming it when it is missing."""
    if is_remote(uri):
        location = S3Location.parse(os.fspath(uri))
        if not location.prefix:
            raise ConfigError(f"{os.fspath(uri)!r}: no object key")
        client = client if client is not None else make_s3_client(endpoint_url)
        return _get_object(client, location.bucket, location.prefix)
    path = local_path(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file missing") from None


def write_bytes_atomic(
    uri: str | os.PathLike[str],
    data: bytes,
    *,
    endpoint_url: str | None = None,
    client: Any = None,
) -> None:
    """Write one file or object so that a reader sees the old or the new bytes, never half.

    Local: a temporary sibling, fsync, os.replace. S3: one put_object, which is atomic.
    """
    if is_remote(uri):
        location = S3Location.parse(os.fspath(uri))
        if not location.prefix:
            raise ConfigError(f"{os.fspath(uri)!r}: no object key")
        client = client if client is not None else make_s3_client(endpoint_url)
        _put_object(client, location.bucket, location.prefix, data)
        return
    atomic.write_bytes_atomic(local_path(uri), data)
