"""MlflowTracker and the logged pyfunc against a sqlite store and a real `mlflow server`.

The tracker is driven through the trainer's callback protocol with fake logs; the model folder
is an untrained tiny CTAL network (no training needed to test tracking).
"""

from __future__ import annotations

import json
import pickle
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cloudpickle
import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.pyfunc import scoring_server
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from components.registry.client import resolve_tracking_uri
from components.registry.names import MODEL_DIR_ARTIFACT, TAG_DROPPED
from components.train.logged_model import PYFUNC_MODEL_FILE
from components.train.tracking import (
    TRUNCATION_MARK,
    MlflowTracker,
    flatten_params,
    sanitize_key,
)
from cta_model.model_folder import folder_sha256

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_mlflow_globals")]

TASKS = ("semseg", "height", "normals")
CONFIG = {
    "model": {"arch": "ctal", "tasks": list(TASKS), "input_size": [32, 32], "backbone": "resnet18"},
    "optim": {"lr": 0.001, "weight_decay": 0.0001},
    "epochs": 2,
    "amp": False,
    "note": "x" * (MAX_PARAM_VAL_LENGTH + 500),
    "odd:key": 1,
}
LINEAGE = {
    "dataset_ref": {
        "uri": "/data/toy",
        "manifest_sha256": "ab" * 32,
        "dvc_rev": "0123abcd",
        "passed": True,
        "quarantine": [],
    },
    "git_commit": "deadbeefcafe",
}
STEPS_PER_EPOCH = 10
EPOCHS = 2
SYSTEM_METRICS_INTERVAL_S = 0.5


@dataclass
class FakeResult:
    model_dir: Path
    best_epoch: int = 2  # 1-based, like cta_model.training
    best_metrics: dict[str, float] = field(
        default_factory=lambda: {"semseg.miou": 0.2, "height.abs_err_mm": 0.5}
    )


@pytest.fixture
def model_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir  # shared, read-only (tests/integration/conftest.py)


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One store for the module: creating an MLflow database takes seconds. Tests use their own
    # experiments and never assume the store is empty.
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'store' / 'mlflow.db'}"


@pytest.fixture(params=["sqlite", "server"])
def tracking_uri(request: pytest.FixtureRequest) -> str:
    fixture = "sqlite_uri" if request.param == "sqlite" else "mlflow_server"
    return request.getfixturevalue(fixture)


def _tracker(uri: str, **kwargs) -> MlflowTracker:
    return MlflowTracker(
        uri,
        experiment=f"cta-test-{uuid.uuid4().hex[:8]}",
        run_name="tiny",
        config=CONFIG,
        lineage=LINEAGE,
        log_every_steps=STEPS_PER_EPOCH // 2,
        system_metrics_interval_s=SYSTEM_METRICS_INTERVAL_S,
        **kwargs,
    )


def _val_miou(epoch: int) -> float:
    return 0.1 * epoch


def _fake_training(tracker: MlflowTracker) -> None:
    """The callback sequence of cta_model.training: steps and epochs count from 1."""
    tracker.on_train_start(object())
    step = 0
    for epoch in range(1, EPOCHS + 1):
        for _ in range(STEPS_PER_EPOCH):
            step += 1
            logs = {"loss": 1.0 / step, "loss_semseg": 0.5, "lr": 1e-3, "grad_norm": 2.0}
            extra = {"images_per_s": np.float32(100.0), "note": "text", "map": np.zeros(3)}
            tracker.on_step_end(step, {**logs, **extra})
        val = {"semseg.miou": _val_miou(epoch), "height.abs_err_mm": 1.0, "val_loss": 0.3}
        tracker.on_epoch_end(epoch, {"loss": 0.5}, val)


def _wait_for_system_metrics(client: MlflowClient, run_id: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(key.startswith("system/") for key in client.get_run(run_id).data.metrics):
            return
        time.sleep(SYSTEM_METRICS_INTERVAL_S / 2)
    raise AssertionError(f"no system/ metric within {timeout_s} s")


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artifact_paths(artifact_uri: str, tracking_uri: str) -> list[str]:
    """Every file below ``artifact_uri``, listed (not downloaded), relative to it."""
    paths: list[str] = []
    pending = [""]
    while pending:
        folder = pending.pop()
        uri = f"{artifact_uri}/{folder}" if folder else artifact_uri
        for info in mlflow.artifacts.list_artifacts(artifact_uri=uri, tracking_uri=tracking_uri):
            name = f"{folder}/{Path(info.path).name}" if folder else Path(info.path).name
            (pending if info.is_dir else paths).append(name)
    return paths


def _refuse_pickle(*args, **kwargs):
    raise AssertionError("pickle deserialization attempted")


def test_training_run_is_recorded_with_its_logged_model(
    tracking_uri: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    tracker = _tracker(tracking_uri)
    client = MlflowClient(tracking_uri)
    with tracker:
        _fake_training(tracker)
        run_id = tracker.run_id
        _wait_for_system_metrics(client, run_id)
        model_info = tracker.on_train_end(FakeResult(model_dir))
    assert model_info is not None and model_info.model_id.startswith("m-")

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.arch"] == "ctal"
    assert params["model.tasks"] == '["semseg", "height", "normals"]'
    assert params["optim.lr"] == "0.001"
    assert params["amp"] == "false"
    assert params["odd_key"] == "1"
    assert len(params["note"]) == MAX_PARAM_VAL_LENGTH and params["note"].endswith(TRUNCATION_MARK)
    tags = run.data.tags
    assert tags["cta.data_manifest_sha256"] == "ab" * 32
    assert tags["cta.dvc_rev"] == "0123abcd"
    assert tags["cta.git_commit"] == "deadbeefcafe"
    assert tags["cta.arch"] == "ctal"
    assert tags["cta.tasks"] == "semseg,height,normals"
    assert tags["cta.model_id"] == model_info.model_id
    assert tags["cta.best_epoch"] == "2"
    assert TAG_DROPPED not in tags

    # Per-epoch validation metrics under their registry names, step = epoch.
    epochs = list(range(1, EPOCHS + 1))
    assert _history(client, run_id, "semseg.miou") == [(e, _val_miou(e)) for e in epochs]
    assert [s for s, _ in _history(client, run_id, "val_loss")] == epochs
    assert [s for s, _ in _history(client, run_id, "train_epoch/loss")] == epochs
    # Per-step metrics, throttled to every log_every_steps; non-numbers skipped.
    every = tracker.log_every_steps
    logged_steps = list(range(every, EPOCHS * STEPS_PER_EPOCH + 1, every))
    assert [s for s, _ in _history(client, run_id, "train/loss")] == logged_steps
    assert [s for s, _ in _history(client, run_id, "train/loss_semseg")] == logged_steps
    assert run.data.metrics["train/images_per_s"] == 100.0
    assert "train/note" not in run.data.metrics and "train/map" not in run.data.metrics
    assert _history(client, run_id, "best/semseg.miou") == [(2, 0.2)]
    assert any(key.startswith("system/") for key in run.data.metrics)

    config_text = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    assert yaml.safe_load(config_text) == CONFIG

    logged = client.get_logged_model(model_info.model_id)
    assert logged.source_run_id == run_id
    assert logged.tags["cta.model_sha256"] == folder_sha256(model_dir)
    assert logged.tags["cta.data_manifest_sha256"] == "ab" * 32
    assert {(m.key, m.step, m.value) for m in logged.metrics} >= {("best/semseg.miou", 2, 0.2)}
    run_files = _artifact_paths(run.info.artifact_uri, tracking_uri)
    model_files = _artifact_paths(logged.artifact_location, tracking_uri)
    assert {"config.yaml", "lineage.json"} <= set(run_files)
    assert {PYFUNC_MODEL_FILE.name, "MLmodel", "artifacts/model/weights.safetensors"} <= set(
        model_files
    )
    assert not [p for p in run_files + model_files if p.endswith((".pkl", ".pickle"))]
    mlmodel = yaml.safe_load(mlflow.artifacts.load_text(f"{logged.artifact_location}/MLmodel"))
    pyfunc_flavor = mlmodel["flavors"]["python_function"]
    # Models from code: no cloudpickled python_model, the code file is stored instead.
    assert "python_model" not in pyfunc_flavor
    assert Path(pyfunc_flavor["model_code_path"]).name == PYFUNC_MODEL_FILE.name
    assert pyfunc_flavor["artifacts"][MODEL_DIR_ARTIFACT]["path"] == "artifacts/model"

    # Loads by its LoggedModel URI without any pickle, and predicts every task.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    for module, name in [(pickle, "load"), (pickle, "loads"), (cloudpickle, "load")]:
        monkeypatch.setattr(module, name, _refuse_pickle)
    loaded = mlflow.pyfunc.load_model(f"models:/{model_info.model_id}")
    images = np.random.default_rng(1).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    predictions = loaded.predict(images)
    assert set(predictions) == set(TASKS)
    assert predictions["semseg"].shape == (2, 40, 48)
    assert predictions["semseg"].dtype == np.int64
    assert predictions["height"].shape == (2, 40, 48)
    assert predictions["normals"].shape == (2, 40, 48, 3)
    # What `mlflow models serve` answers: JSON integers in, a dict of per-task lists out.
    response = scoring_server.invocations(
        json.dumps({"inputs": images[:1].tolist()}),
        "application/json",
        loaded,
        loaded.metadata.get_input_schema(),
    )
    assert response.status == 200, response.response
    served = json.loads(response.response)["predictions"]
    assert {task: np.asarray(served[task]).shape for task in TASKS} == {
        "semseg": (1, 40, 48),
        "height": (1, 40, 48),
        "normals": (1, 40, 48, 3),
    }
    # Without MLflow's schema check (which wants a batch) the pyfunc also takes one image.
    single = loaded.unwrap_python_model().predict(None, images[0])
    assert single["normals"].shape == (1, 40, 48, 3)

    # Training never registers. (The stores are shared with other tests, which may register
    # their own models; no test in this module does.)
    assert client.search_model_versions(f"run_id = '{run_id}'") == []
    if tracking_uri.startswith("sqlite"):
        assert client.search_registered_models() == []


def test_a_failing_training_ends_the_run_failed(tracking_uri: str):
    tracker = _tracker(tracking_uri)
    with pytest.raises(RuntimeError, match="loss is NaN"), tracker:
        tracker.on_step_end(0, {"loss": 1.0})
        raise RuntimeError("loss is NaN")
    run = MlflowClient(tracking_uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["cta.failure"] == "RuntimeError: loss is NaN"
    assert "cta.model_id" not in run.data.tags
    assert mlflow.active_run() is None


class FakeTrainer:
    """What cta_model.training.Trainer.lineage() returns (the model folder's lineage.json)."""

    def lineage(self) -> dict:
        return {
            "config": CONFIG,
            "dataset": {"uri": "/data/toy", "manifest_sha256": "cd" * 32, "dvc_rev": None},
            "git_commit": "0badc0de",
        }


def test_the_trainers_lineage_fills_missing_tags(sqlite_uri: str):
    tracker = MlflowTracker(
        sqlite_uri, f"cta-test-{uuid.uuid4().hex[:8]}", None, {}, {"git_commit": "given"}
    )
    with tracker:
        tracker.on_train_start(FakeTrainer())
    tags = MlflowClient(sqlite_uri).get_run(tracker.run_id).data.tags
    assert tags["cta.data_manifest_sha256"] == "cd" * 32
    assert tags["cta.git_commit"] == "given"  # the caller's lineage wins
    assert tags["cta.arch"] == "ctal"
    assert tags["cta.tasks"] == "semseg,height,normals"
    assert "cta.dvc_rev" not in tags


def test_inside_an_active_run_the_tracker_nests(sqlite_uri: str):
    uri = sqlite_uri
    tracker = _tracker(uri, log_system_metrics=False)
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment(f"parent-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run(experiment_id=experiment_id) as parent:
        with tracker:
            child_id = tracker.run_id
        assert mlflow.active_run().info.run_id == parent.info.run_id
    child = MlflowClient(uri).get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.status == "FINISHED"


def test_tracking_uri_argument_then_env_then_absolute_sqlite_default(
    tmp_path: Path, sqlite_uri: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = resolve_tracking_uri(None)
    assert default == f"sqlite:///{tmp_path.resolve()}/.cta/mlflow/mlflow.db"
    assert (tmp_path / ".cta" / "mlflow").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:1"
    assert resolve_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"

    # A sqlite store keeps its artifacts beside the database, never in ./mlruns.
    with _tracker(sqlite_uri, log_system_metrics=False) as tracker:
        tracker.on_epoch_end(0, {}, {"semseg.miou": 0.5})
    run = MlflowClient(sqlite_uri).get_run(tracker.run_id)
    store_dir = Path(sqlite_uri.removeprefix("sqlite:///")).parent
    assert run.info.artifact_uri.startswith((store_dir / "artifacts").as_uri())
    assert list((store_dir / "artifacts").rglob("config.yaml"))
    assert not (tmp_path / "mlruns").exists()


def test_params_are_flattened_and_keys_made_valid():
    params = flatten_params({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None, "f": {}})
    assert params == {"a.b.c": "1", "a.d": "[1, 2]", "e": "null", "f": "{}"}
    assert sanitize_key("loss:semseg") == "loss_semseg"
    assert sanitize_key("/a//b/") == "a/b"
    assert sanitize_key("..x") == "_..x"
    long_a, long_b = sanitize_key("k" * 300 + "a"), sanitize_key("k" * 300 + "b")
    assert len(long_a) == 250 and long_a != long_b


# --- transient HTTP failures: MLflow's own retries (what tracking.py relies on) ---


class _FlakyProxy(ThreadingHTTPServer):
    """Forwards to the MLflow server, answering 503 to the first `failures` matching calls."""

    daemon_threads = True

    def __init__(self, upstream: str, fail_path: str, failures: int):
        super().__init__(("127.0.0.1", 0), _ForwardingHandler)
        self.upstream = upstream
        self.fail_path = fail_path
        self.remaining = failures
        self.injected = 0
        self.lock = threading.Lock()
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ForwardingHandler(BaseHTTPRequestHandler):
    server: _FlakyProxy
    _HOP_HEADERS = {"host", "content-length", "connection", "accept-encoding"}

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        proxy = self.server
        with proxy.lock:
            inject = self.path.startswith(proxy.fail_path) and proxy.remaining > 0
            if inject:
                proxy.remaining -= 1
                proxy.injected += 1
        if inject:
            self._reply(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE"}', "application/json")
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self._HOP_HEADERS}
        request = urllib.request.Request(
            proxy.upstream + self.path, data=body or None, headers=headers, method=self.command
        )
        try:
            with proxy.opener.open(request, timeout=60) as response:
                self._reply(response.status, response.read(), response.headers["Content-Type"])
        except urllib.error.HTTPError as error:
            self._reply(error.code, error.read(), error.headers["Content-Type"])

    def _reply(self, status: int, data: bytes, content_type: str | None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.fixture
def flaky_proxy(mlflow_server: str, request: pytest.FixtureRequest) -> Iterator[_FlakyProxy]:
    proxy = _FlakyProxy(mlflow_server, "/api/2.0/mlflow/runs/log-batch", request.param)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()
    thread.join(timeout=10)


@pytest.mark.parametrize("flaky_proxy", [2], indirect=True)
def test_transient_http_failures_are_retried_by_mlflow(
    flaky_proxy: _FlakyProxy, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    with _tracker(flaky_proxy.uri, log_system_metrics=False) as tracker:
        tracker.on_epoch_end(0, {}, {"semseg.miou": 0.5})
    assert flaky_proxy.injected == 2
    run = MlflowClient(flaky_proxy.uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.arch"] == "ctal"  # the first log-batch, failed twice
    assert run.data.metrics["semseg.miou"] == 0.5
    assert TAG_DROPPED not in run.data.tags


@pytest.mark.parametrize("flaky_proxy", [0], indirect=True)
def test_metrics_lost_after_retries_do_not_stop_training(
    flaky_proxy: _FlakyProxy, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    with _tracker(flaky_proxy.uri, log_system_metrics=False) as tracker:
        flaky_proxy.remaining = 5  # the run started fine; now the server stays down
        tracker.on_epoch_end(0, {}, {"semseg.miou": 0.5})
        flaky_proxy.remaining = 0
        tracker.on_epoch_end(1, {}, {"semseg.miou": 0.6})
        assert tracker.dropped_logs == 1
    run = MlflowClient(flaky_proxy.uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_DROPPED] == "1"
    assert _history(MlflowClient(flaky_proxy.uri), run.info.run_id, "semseg.miou") == [(1, 0.6)]
