"""Where MLflow is and the one way to talk to it.

Tracking URI: the argument, else ``MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/.cta/mlflow/mlflow.db`` (absolute; never MLflow's implicit ``./mlruns``).
The registry is always on the same server as tracking.

Retries of transient errors are MLflow's own (its REST client retries with backoff). MLflow's
defaults (7 retries, backoff factor 2, 120 s timeout) keep a step waiting about four minutes on
a dead server; inside ``bounded_http_retries()`` (what register_model runs under)
``HTTP_RETRY_DEFAULTS`` fail it in about 15-20 s with an error naming the server's URL. A value
already set in the environment wins.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_STORE_DIR = Path(".cta") / "mlflow"
SQLITE_PREFIX = "sqlite:///"
# Read by MLflow's REST client on every request (mlflow/environment_variables.py, 3.17). With
# urllib3's backoff (factor * 2**(n-1) after the n-th consecutive error, plus up to 1 s of
# jitter) 4 retries wait about 2 + 4 + 8 s before the step fails.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def default_tracking_uri() -> str:
    return SQLITE_PREFIX + str((Path.cwd() / DEFAULT_STORE_DIR / "mlflow.db").resolve())


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other store or ``:memory:``."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = uri[len(SQLITE_PREFIX) :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The argument, else ``MLFLOW_TRACKING_URI``, else the absolute default sqlite store."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    database = sqlite_path(uri)
    if database is not None:
        # sqlite creates the file, not its folder.
        database.parent.mkdir(parents=True, exist_ok=True)
    return uri


def mlflow_client(tracking_uri: str | None = None) -> Any:
    """An MlflowClient on the resolved tracking URI, registry included."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def bounded_http_retries() -> Iterator[None]:
    """Apply HTTP_RETRY_DEFAULTS where the environment does not set them, for the block only."""
    added = [name for name in HTTP_RETRY_DEFAULTS if name not in os.environ]
    os.environ.update({name: HTTP_RETRY_DEFAULTS[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


__all__ = [
    "HTTP_RETRY_DEFAULTS",
    "bounded_http_retries",
    "default_tracking_uri",
    "mlflow_client",
    "resolve_tracking_uri",
    "sqlite_path",
]
