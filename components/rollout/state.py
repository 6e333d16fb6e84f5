"""Where roll-out state lives: a StateStore of small JSON documents written compare-and-swap.

Two implementations of one protocol:

- :class:`LocalStateStore`: a folder. A write holds an exclusive ``flock`` on ``.store.lock``
  while it compares the current document's etag (sha256 of its bytes) and renames the new bytes
  into place (``write_bytes_atomic``), so readers never see half a file and writers never lose
  an update.
- :class:`S3StateStore`: ``s3://bucket/prefix``. S3 conditional writes do the comparison:
  ``put_object(IfNoneMatch="*")`` creates only if absent, ``put_object(IfMatch=etag)``
  replaces only the version that was read; a loser gets HTTP 412 (or 409 for a concurrent
  conditional write) and sees :class:`StateConflict` (moto 5.2.5 implements both headers).

Documents (keys relative to the store root):

- ``rollouts/<rollout_id>.json``: one roll-out record (plan, model, per-line progress);
- ``current.json``: the id of the newest roll-out, the default of status/pause/resume;
- ``lines/<line_id>.json``: what runs on the line now (version, sha256, url, pid), since when,
  and which decision put it there;
- ``locks/<line_id>.json``: the line's lock ``{owner, expires_at}``; owner null = free.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cta_model.atomic import write_bytes_atomic
from cta_model.errors import ConfigError, CtaError, DataError

STATE_ENV = "CTA_ROLLOUT_STATE"
DEFAULT_STATE_URI = ".cta/demo/rollout"
DEFAULT_LOCK_TTL_S = 300.0


class StateConflict(CtaError):
    """A compare-and-swap write lost: the document changed (or appeared) since it was read."""


class LockHeld(CtaError):
    """Another live roll-out holds the line's lock."""


@dataclass(frozen=True)
class Versioned:
    data: dict[str, Any]
    etag: str


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _encode(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _decode(raw: bytes, where: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise DataError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object")
    return data


def _check_key(key: str) -> str:
    parts = key.split("/")
    if key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ConfigError(f"state key {key!r} must be a relative path without '.' or '..'")
    return key


class StateStore(Protocol):
    uri: str

    def read(self, key: str) -> Versioned | None: ...

    def write(self, key: str, data: dict[str, Any], expected_etag: str | None) -> str:
        """Write ``data`` if the document's etag is ``expected_etag`` (None: if absent);
        return the new etag, else raise StateConflict."""
        ...

    def list(self, prefix: str) -> list[str]: ...


class LocalStateStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def read(self, key: str) -> Versioned | None:
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        return Versioned(_decode(raw, str(path)), hashlib.sha256(raw).hexdigest())

    def write(self, key: str, data: dict[str, Any], expected_etag: str | None) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        raw = _encode(data)
        with open(self.root / ".store.lock", "a+b") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            current = self.read(key)
            if (current.etag if current else None) != expected_etag:
                raise StateConflict(
                    f"{self._path(key)}: changed since it was read (expected "
                    f"{'absent' if expected_etag is None else expected_etag[:12]}, found "
                    f"{'absent' if current is None else current.etag[:12]})"
                )
            write_bytes_atomic(self._path(key), raw)
        return hashlib.sha256(raw).hexdigest()

    def list(self, prefix: str) -> list[str]:
        folder = self._path(prefix.rstrip("/"))
        if not folder.is_dir():
            return []
        return sorted(
            f"{prefix.rstrip('/')}/{path.name}"
            for path in folder.iterdir()
            if path.suffix == ".json" and not path.name.startswith(".")
        )


class S3StateStore:
    """Needs a store with S3 conditional writes (AWS S3 since 2024, MinIO, moto >= 5.0.x)."""

    def __init__(self, uri: str, client: Any = None, endpoint_url: str | None = None) -> None:
        from components.storage import S3Location, make_s3_client

        self.location = S3Location.parse(uri)
        self.uri = self.location.uri
        self.client = client if client is not None else make_s3_client(endpoint_url)

    def read(self, key: str) -> Versioned | None:
        from botocore.exceptions import ClientError

        object_key = self.location.key_for(_check_key(key))
        try:
            answer = self.client.get_object(Bucket=self.location.bucket, Key=object_key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        raw = answer["Body"].read()
        return Versioned(_decode(raw, self.location.uri_for(key)), answer["ETag"])

    def write(self, key: str, data: dict[str, Any], expected_etag: str | None) -> str:
        from botocore.exceptions import ClientError

        object_key = self.location.key_for(_check_key(key))
        condition = {"IfNoneMatch": "*"} if expected_etag is None else {"IfMatch": expected_etag}
        try:
            answer = self.client.put_object(
                Bucket=self.location.bucket,
                Key=object_key,
                Body=_encode(data),
                ContentType="application/json",
                **condition,
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            # 412: the condition failed; 409: a concurrent conditional write won; 404: IfMatch
            # on an object deleted meanwhile.
            if status in (404, 409, 412) or code in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
            ):
                raise StateConflict(
                    f"{self.location.uri_for(key)}: changed since it was read ({code})"
                ) from None
            raise
        return answer["ETag"]

    def list(self, prefix: str) -> list[str]:
        base = self.location.key_for(_check_key(prefix.rstrip("/"))) + "/"
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.location.bucket, Prefix=base):
            for item in page.get("Contents", []):
                name = item["Key"][len(base) :]
                if name.endswith(".json") and "/" not in name:
                    keys.append(f"{prefix.rstrip('/')}/{name}")
        return sorted(keys)


def resolve_state_uri(uri: str | None) -> str:
    return uri or os.environ.get(STATE_ENV) or DEFAULT_STATE_URI


def open_store(uri: str | None = None, *, endpoint_url: str | None = None) -> StateStore:
    """``--state URI``: default ``$CTA_ROLLOUT_STATE``, else ``.cta/demo/rollout``."""
    from components.storage import is_remote, local_path

    resolved = resolve_state_uri(uri)
    if is_remote(resolved):
        return S3StateStore(resolved, endpoint_url=endpoint_url)
    return LocalStateStore(local_path(resolved))


def update(
    store: StateStore,
    key: str,
    change: Callable[[dict[str, Any] | None], dict[str, Any]],
    attempts: int = 8,
) -> dict[str, Any]:
    """Read-modify-write with compare-and-swap, retrying when another writer got in between."""
    for _ in range(attempts):
        current = store.read(key)
        new = change(None if current is None else json.loads(json.dumps(current.data)))
        try:
            store.write(key, new, None if current is None else current.etag)
            return new
        except StateConflict:
            time.sleep(0.05)
    raise StateConflict(f"{store.uri}/{key}: still changing after {attempts} attempts")


# ------------------------------------------------------------------------------------ locks
def new_owner() -> str:
    """host:pid:random - the pid lets a resume on the same host see that the owner died."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_is_dead(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another host: only the expiry can free it
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # A zombie (killed, not yet reaped by its parent) is dead too.
    try:
        status = Path(f"/proc/{pid_text}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" in status


def acquire_lock(
    store: StateStore, line_id: str, owner: str, ttl_s: float = DEFAULT_LOCK_TTL_S
) -> dict[str, Any]:
    """Take (or renew) the line's lock; LockHeld naming the owner when another live one has it.

    A lock is free when its owner is null, its expiry has passed, or its owner is a process of
    this host that no longer runs (a killed ``start``; ``resume`` takes over at once).
    """
    key = f"locks/{line_id}.json"
    current = store.read(key)
    if current is not None:
        holder = current.data.get("owner")
        expired = float(current.data.get("expires_at_epoch") or 0) < time.time()
        if holder not in (None, owner) and not expired and not _owner_is_dead(holder):
            raise LockHeld(
                f"line {line_id!r} is locked by {holder} until {current.data.get('expires_at')} "
                f"(state {store.uri}); wait, or stop that roll-out"
            )
    expires = time.time() + ttl_s
    record = {
        "line": line_id,
        "owner": owner,
        "acquired_at": utc_now(),
        "expires_at_epoch": expires,
        "expires_at": datetime.fromtimestamp(expires, UTC).isoformat(timespec="seconds"),
    }
    try:
        store.write(key, record, None if current is None else current.etag)
    except StateConflict:
        raise LockHeld(
            f"line {line_id!r}: another roll-out took the lock at the same time"
        ) from None
    return record


def release_lock(store: StateStore, line_id: str, owner: str) -> bool:
    """Free the lock if ``owner`` holds it; False when someone else holds it (left alone)."""
    key = f"locks/{line_id}.json"
    current = store.read(key)
    if current is None or current.data.get("owner") != owner:
        return False
    free = {"line": line_id, "owner": None, "released_at": utc_now(), "expires_at_epoch": 0}
    try:
        store.write(key, free, current.etag)
    except StateConflict:
        return False
    return True


def lock_holder(store: StateStore, line_id: str) -> str | None:
    current = store.read(f"locks/{line_id}.json")
    if current is None or not current.data.get("owner"):
        return None
    if float(current.data.get("expires_at_epoch") or 0) < time.time():
        return None
    return current.data["owner"]
