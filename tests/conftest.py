import os

import pytest

# Tests and CI never phone home.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def _unchecked_fleet() -> str:
    """The shipped inventory without min_defect_width_mm, as the default of every test and of
    the processes they start ($CTA_LINES_CONFIG): tests use images of 32-128 px, where the
    shipped lines' smallest defects would span under 3 pixels and training and serving refuse
    (the 3-pixel rule). Tests of that rule name their inventory explicitly."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    import yaml

    shipped = Path(__file__).resolve().parents[1] / "configs" / "lines.yaml"
    data = yaml.safe_load(shipped.read_text())
    for line in data["lines"]:
        line.pop("min_defect_width_mm", None)
    folder = tempfile.mkdtemp(prefix="cta-test-fleet-")
    atexit.register(shutil.rmtree, folder, True)
    path = Path(folder) / "lines.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


os.environ["CTA_LINES_CONFIG"] = _unchecked_fleet()


@pytest.fixture(autouse=True)
def _seeded_torch():
    import torch

    torch.manual_seed(0)
    yield


# --- One MLflow tracking server per test session (DESIGN 6.3), on loopback only ---

# Generous: on a loaded 2-core machine importing mlflow alone can take a minute.
_MLFLOW_SERVER_STARTUP_TIMEOUT_S = 180.0
_MLFLOW_SERVER_STOP_TIMEOUT_S = 15.0


def _mlflow_free_loopback_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _mlflow_wait_healthy(url: str, process, log_path) -> None:
    import time
    import urllib.error
    import urllib.request

    # No proxy handler: an HTTP(S)_PROXY in the environment must not capture loopback calls.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + _MLFLOW_SERVER_STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with {process.returncode}: {log_path.read_text()[-3000:]}"
            )
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(
        f"mlflow server not healthy on {url} within {_MLFLOW_SERVER_STARTUP_TIMEOUT_S:.0f} s: "
        f"{log_path.read_text()[-3000:]}"
    )


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts); yields its URI.

    Tests that use it must not assume the store is empty: other tests share the server.
    """
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path_factory.mktemp("mlflow_server")
    log_path = root / "server.log"
    port = _mlflow_free_loopback_port()
    uri = f"http://127.0.0.1:{port}"
    launcher = Path(sys.prefix) / "bin" / "mlflow"
    command = [
        *([str(launcher)] if launcher.exists() else [sys.executable, "-m", "mlflow"]),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    with pytest.MonkeyPatch.context() as env:
        no_proxy = ",".join(filter(None, ["127.0.0.1,localhost", os.environ.get("NO_PROXY")]))
        env.setenv("NO_PROXY", no_proxy)
        env.setenv("no_proxy", no_proxy)
        # No job runner: tracking and the registry do not need it, and it is one more process
        # importing mlflow at start-up.
        server_env = {
            **os.environ,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        server_env.pop("MLFLOW_TRACKING_URI", None)
        with open(log_path, "wb") as log:
            # Own session: the server's worker processes stop with it.
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=server_env,
                start_new_session=True,
            )
        try:
            _mlflow_wait_healthy(f"{uri}/health", process, log_path)
            yield uri
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=_MLFLOW_SERVER_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=_MLFLOW_SERVER_STOP_TIMEOUT_S)
