"""The retraining trigger's decision against a real registry, and webhooks to a real listener."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from components.notify import notify
from components.retrain.step import decide, newest_manifest_sha256
from cta_cli.commands.retrain import retrain

pytestmark = pytest.mark.integration


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    from cta_model.data.synthetic_dataset import generate_dataset

    return generate_dataset(
        tmp_path / "data",
        n_lines=1,
        samples_per_line=2,
        height=16,
        width=16,
        seed=0,
        progress=False,
    )


def _champion_with_data_hash(tracking_uri: str, name: str, manifest_sha: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.create_registered_model(name)
    version = client.create_model_version(name, source="s3://cta-not-used/model")
    client.set_model_version_tag(name, version.version, "cta.data_manifest_sha256", manifest_sha)
    client.set_registered_model_alias(name, "champion", version.version)


def test_same_data_as_the_champion_is_skipped_saying_why(mlflow_server, dataset, request):
    name = f"retrain-same-{request.node.name[-8:]}-{id(dataset) % 10**6}"
    _champion_with_data_hash(mlflow_server, name, newest_manifest_sha256(str(dataset)))
    result = CliRunner().invoke(
        retrain,
        [
            "--data",
            str(dataset),
            "--model-name",
            name,
            "--tracking-uri",
            mlflow_server,
            "--local",
            "--work-dir",
            "unused",
            "--config",
            "configs/demo.yaml",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "retrain: skip (data unchanged" in result.output
    decision = json.loads(result.output[result.output.index("{") :])
    assert decision["action"] == "skip" and decision["data_sha256"] == decision["champion_sha256"]
    assert "run_dir" not in decision  # nothing ran


def test_new_data_or_no_champion_runs(mlflow_server, dataset):
    name = f"retrain-new-{id(dataset) % 10**6}"
    first = decide(str(dataset), name, mlflow_server)
    assert first["action"] == "run" and "no champion" in first["reason"]
    _champion_with_data_hash(mlflow_server, name, "0" * 64)
    changed = decide(str(dataset), name, mlflow_server)
    assert changed["action"] == "run" and changed["reason"].startswith("new data")
    assert decide(str(dataset), name, mlflow_server, force=True)["reason"] == "forced"


def test_drift_report_gates_the_run(mlflow_server, dataset, tmp_path):
    name = f"retrain-drift-{id(dataset) % 10**6}"
    calm = tmp_path / "calm.json"
    calm.write_text(json.dumps({"drifted": False}))
    assert decide(str(dataset), name, mlflow_server, drift_report=calm)["action"] == "skip"
    drifted = tmp_path / "drifted.json"
    drifted.write_text(json.dumps({"drifted": True}))
    assert decide(str(dataset), name, mlflow_server, drift_report=drifted)["action"] == "run"


class _Listener:
    def __init__(self, statuses: list[int]):
        self.received: list[dict] = []
        self.statuses = statuses
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                listener.received.append(
                    {"type": self.headers["Content-Type"], "body": json.loads(body)}
                )
                self.send_response(listener.statuses.pop(0) if listener.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=s3cret"


@pytest.fixture
def listener() -> Iterator[_Listener]:
    created = _Listener(statuses=[])
    thread = threading.Thread(target=created.server.serve_forever, daemon=True)
    thread.start()
    yield created
    created.server.shutdown()
    created.server.server_close()


def test_webhook_posts_json_and_retries_a_failed_delivery(listener, caplog):
    listener.statuses[:] = [503]
    assert notify("drift", {"line": "press-a"}, listener.url, backoff_s=0.01)
    assert len(listener.received) == 2  # the 503, then the delivery
    body = listener.received[-1]["body"]
    assert listener.received[-1]["type"] == "application/json"
    assert body["event"] == "drift" and body["line"] == "press-a" and body["source"] == "cta"


def test_webhook_failure_is_bounded_reported_and_never_leaks_the_token(listener, caplog):
    listener.statuses[:] = [500, 500, 500]
    assert not notify("rollback", {"line": "press-b"}, listener.url, backoff_s=0.01)
    assert len(listener.received) == 3
    assert "failed after 3 attempts" in caplog.text and "s3cret" not in caplog.text


def test_no_webhook_configured_sends_nothing(monkeypatch):
    monkeypatch.delenv("CTA_WEBHOOK_URL", raising=False)
    assert notify("gate_verdict", {"verdict": "pass"}) is False
    with pytest.raises(ValueError, match="unknown webhook event"):
        notify("party", {})
