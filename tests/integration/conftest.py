"""Servers for integration tests, on loopback only: one moto S3 server per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_STARTUP_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class MotoS3:
    endpoint_url: str
    log_path: Path

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _moto_command(port: int) -> list[str]:
    script = Path(sys.prefix) / "bin" / "moto_server"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    return [*launcher, "-H", "127.0.0.1", "-p", str(port)]


def _wait_until_answering(url: str, process: subprocess.Popen, log_path: Path) -> None:
    # No proxy handler: an HTTP(S)_PROXY in the environment must not capture loopback calls.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"moto server exited with {process.returncode}: {log_path.read_text()[-2000:]}"
            )
        try:
            with opener.open(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer on {url} within {_STARTUP_TIMEOUT_S:.0f} s")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=_STOP_TIMEOUT_S)


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """A real moto S3 server on 127.0.0.1 with test credentials in the environment.

    The environment is isolated from any AWS config on the machine (profiles, metadata
    service, proxies); everything is restored when the session ends. Endpoints are not put in
    the environment: each test passes ``endpoint_url`` so that nothing reaches AWS by accident.
    """
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with pytest.MonkeyPatch.context() as env:
        for name in (
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_SECURITY_TOKEN",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "CTA_S3_ENDPOINT_URL",
        ):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        # Empty files, not /dev/null: aiobotocore (DVC's s3fs) refuses a config that is not a file.
        empty_config = log_path.parent / "aws-config-empty"
        empty_config.touch()
        env.setenv("AWS_CONFIG_FILE", str(empty_config))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty_config))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        no_proxy = ",".join(filter(None, ["127.0.0.1,localhost", os.environ.get("NO_PROXY")]))
        env.setenv("NO_PROXY", no_proxy)
        env.setenv("no_proxy", no_proxy)

        port = _free_loopback_port()
        endpoint_url = f"http://127.0.0.1:{port}"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                _moto_command(port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            _wait_until_answering(f"{endpoint_url}/", process, log_path)
            yield MotoS3(endpoint_url=endpoint_url, log_path=log_path)
        finally:
            _stop(process)


@pytest.fixture
def s3_bucket(moto_s3: MotoS3) -> str:
    """The name of a fresh, empty bucket on the session's moto server."""
    name = f"cta-test-{uuid.uuid4().hex[:12]}"
    moto_s3.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained CTAL model folder (semseg with the synthetic scenes' 10 classes, height,
    normals; 32x32, ResNet-18 at stride 8): enough to log, evaluate and register quickly.
    Tests read it only; one that needs to change it copies it first."""
    from cta_model.model_folder import save_model_folder
    from cta_model.nn.models import ModelSpec, build_model

    spec = ModelSpec(
        arch="ctal",
        tasks=("semseg", "height", "normals"),
        input_size=(32, 32),
        backbone="resnet18",
        output_stride=8,
        num_classes=10,
    )
    return save_model_folder(build_model(spec), tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def restore_mlflow_globals() -> Iterator[None]:
    """The tracker sets the process-wide tracking URI (MLflow also exports it to the
    environment) and may leave a run active: put both back after the test."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)
