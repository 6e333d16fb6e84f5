"""The MLflow server dies during `register_model` (issue 9, faults; DESIGN 6.1).

A dedicated `mlflow server` (its own sqlite store and artefact folder, so that it can be killed
and restarted on the same port) is killed by SIGKILL to its process group at one point of the
registration: when the first version tag is set (after the version and its artefacts exist) or
when the first artefact is uploaded. The step must retry with backoff a bounded number of times
and then fail naming the server; while the version is half-registered no consumer
(`complete_versions`, `fetch_model_folder`) may use it; after a restart on the same store a
re-run completes the SAME version.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from dataset_refs import validated_dataset_ref
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from urllib3.util.retry import Retry

from components.register_model import step
from components.registry.client import HTTP_RETRY_DEFAULTS, bounded_http_retries
from components.registry.models import fetch_model_folder
from components.registry.names import CHALLENGER_ALIAS, COMPLETE, TAG_COMPLETE
from components.registry.versions import complete_versions
from components.train.logged_model import log_model_folder
from cta_model.errors import DataError
from cta_model.model_folder import folder_sha256

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("restore_mlflow_globals"),
    pytest.mark.timeout(600),
]

_STARTUP_TIMEOUT_S = 180.0
_STOP_TIMEOUT_S = 15.0
# HTTP_RETRY_DEFAULTS: 4 retries, backoff factor 1 -> sleeps of 0, 2, 4, 8 s (+ < 1 s jitter).
_MIN_BACKOFF_S = 2 + 4 + 8
_MAX_FAILURE_S = 60.0


class MlflowServer:
    """`mlflow server` on 127.0.0.1 that can be killed and started again on the same port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def ensure_running(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        launcher = Path(sys.prefix) / "bin" / "mlflow"
        command = [
            *([str(launcher)] if launcher.exists() else [sys.executable, "-m", "mlflow"]),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
        ]
        env = {
            **os.environ,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        self.starts += 1
        log_path = self.root / f"server-{self.starts}.log"
        with open(log_path, "wb") as log:
            # Own session: killing the group stops the server's workers too.
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {log_path.read_text()[-3000:]}")
            try:
                with opener.open(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"mlflow server not healthy: {log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """A crash, not a shutdown: SIGKILL to the whole process group."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=_STOP_TIMEOUT_S)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One server for the module: each test leaves it running (restarted after its kill)."""
    with pytest.MonkeyPatch.context() as env:
        for name in HTTP_RETRY_DEFAULTS:  # the step's own bounds are under test
            env.delenv(name, raising=False)
        no_proxy = ",".join(filter(None, ["127.0.0.1,localhost", os.environ.get("NO_PROXY")]))
        env.setenv("NO_PROXY", no_proxy)
        env.setenv("no_proxy", no_proxy)
        instance = MlflowServer(tmp_path_factory.mktemp("mlflow"))
        instance.ensure_running()
        try:
            yield instance
        finally:
            instance.kill()


@pytest.fixture(scope="module")
def dataset_ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return validated_dataset_ref(tmp_path_factory.mktemp("data"), n_lines=1, samples_per_line=4)


def _log_model(model_dir: Path, uri: str) -> str:
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(f"cta-faults-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run():
        return log_model_folder(model_dir).model_id


class RetrySpy:
    """Times of urllib3's retry decisions (each failed attempt of a request calls increment)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.times: list[float] = []
        original = Retry.increment

        def increment(retry: Retry, *args, **kwargs):
            self.times.append(time.monotonic())
            return original(retry, *args, **kwargs)

        monkeypatch.setattr(Retry, "increment", increment)


@pytest.mark.parametrize("die_at", ["set_model_version_tag", "log_artifact"])
def test_server_killed_mid_registration_fails_bounded_and_a_rerun_completes_it(
    die_at: str,
    server: MlflowServer,
    tiny_model_dir: Path,
    dataset_ref: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server.ensure_running()  # after an earlier test that failed before restarting it
    model_id = _log_model(tiny_model_dir, server.url)
    name = f"cta-faults-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)

    original = getattr(MlflowClient, die_at)
    killed_at: list[float] = []

    def dies_first(self, *args, **kwargs):
        if not killed_at:
            server.kill()
            killed_at.append(time.monotonic())
        return original(self, *args, **kwargs)

    spy = RetrySpy(monkeypatch)
    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, die_at, dies_first)
        with pytest.raises(MlflowException) as failure:
            step.run(model_id, name, dataset_ref=str(dataset_ref), tracking_uri=server.url)
    failed_after_s = time.monotonic() - killed_at[0]
    retries = [t for t in spy.times if t >= killed_at[0]]
    print(
        f"\n{die_at}: server killed -> step failed after {failed_after_s:.1f} s, "
        f"{len(retries)} failed attempts"
    )
    # A clear failure naming the server, after bounded retries with backoff.
    assert f"127.0.0.1:{server.port}" in str(failure.value)
    assert "Max retries exceeded" in str(failure.value)
    assert _MIN_BACKOFF_S <= failed_after_s < _MAX_FAILURE_S
    assert len(retries) == int(HTTP_RETRY_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) + 1
    gaps = [later - earlier for earlier, later in zip(retries, retries[1:], strict=False)]
    assert gaps[-1] > gaps[1] > 1.5  # exponential backoff, not a tight loop
    # The step's defaults were for the step only.
    assert not any(name in os.environ for name in HTTP_RETRY_DEFAULTS)

    server.ensure_running()  # same port, same store
    versions = client.search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert TAG_COMPLETE not in versions[0].tags
    assert complete_versions(client, name) == []
    with pytest.raises(DataError, match="registration unfinished"):
        fetch_model_folder(f"models:/{name}/1", dest=tmp_path / "half", tracking_uri=server.url)
    assert not (tmp_path / "half").exists()

    again = step.run(model_id, name, dataset_ref=str(dataset_ref), tracking_uri=server.url)
    assert not again["created"] and again["version"] == "1"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert [str(v.version) for v in complete_versions(client, name)] == ["1"]
    version = client.get_model_version_by_alias(name, CHALLENGER_ALIAS)
    assert str(version.version) == "1" and version.tags[TAG_COMPLETE] == COMPLETE
    folder = fetch_model_folder(
        f"models:/{name}/1", dest=tmp_path / "whole", tracking_uri=server.url
    )
    assert folder_sha256(folder) == folder_sha256(tiny_model_dir)


def test_retry_bounds_yield_to_the_environment_and_are_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    for name in HTTP_RETRY_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")  # the user's choice
    with bounded_http_retries():
        assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 9
        assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
        assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 30
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"
    assert "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR" not in os.environ
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
