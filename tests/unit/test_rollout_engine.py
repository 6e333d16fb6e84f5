"""The roll-out engine's decisions with stand-in line servers (loopback HTTP stubs), a
recording backend and an in-memory registry: wave rollback of already promoted lines, pause and
resume, the next wave waiting for resume."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from components.rollout import engine as engine_module
from components.rollout.backends import ModelRef, deployment_record
from components.rollout.engine import Engine, rollout_key
from components.rollout.health import QaSample
from components.rollout.plan import plan_from_dict
from components.rollout.state import LocalStateStore, lock_holder

pytestmark = pytest.mark.unit

CANDIDATE = ModelRef("cta", "2", "2" * 64)


def served_defect(rejects: bool | None) -> dict[str, Any]:
    """A line server's /readyz ``defect``: without a verdict when ``rejects`` is None."""
    threshold = None if rejects is None else 0.4
    return {
        "threshold": threshold,
        "threshold_source": "none" if threshold is None else "models:/cta/2 evaluation.json",
        "reject_classes": ["defect"],
        "reject_class_ids": [1],
        "window_px": 3,
        "reason": "no operating threshold: no evaluation.json" if threshold is None else None,
    }


class StubServer:
    """/predict answers reject=<rejects> (None: no verdict); /readyz names the verdict;
    /metrics counts answers like cta serve does."""

    def __init__(self, rejects: bool | None) -> None:
        served = {"n": 0}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, body: bytes, kind: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/readyz":
                    ready = {"defect": served_defect(rejects)}
                    self._send(json.dumps(ready).encode(), "application/json")
                    return
                text = f'cta_requests_total{{code="200"}} {served["n"]}\n'
                self._send(text.encode(), "text/plain")

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                served["n"] += 1
                answer = {"defect": {"score": 0.5, "reject": rejects}}
                self._send(json.dumps(answer).encode(), "application/json")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


class RecordingBackend:
    name = "local"

    def __init__(self, rejects_by_line: dict[str, bool | None]) -> None:
        self.rejects_by_line = rejects_by_line
        self.calls: list[tuple[str, str]] = []
        self.servers: list[StubServer] = []

    def _deploy(self, line_id: str, model: ModelRef, role: str) -> dict[str, Any]:
        server = StubServer(self.rejects_by_line[line_id])
        self.servers.append(server)
        return deployment_record(role, model, server.url)

    def deploy_shadow(self, line_id, model):
        self.calls.append(("deploy_shadow", line_id))
        return self._deploy(line_id, model, "shadow")

    def deploy_live(self, line_id, model, previous):
        self.calls.append(("deploy_live", line_id))
        return self._deploy(line_id, model, "live")

    def finish_promotion(self, line_id, candidate, previous):
        self.calls.append(("finish_promotion", line_id))
        return {**candidate, "role": "live"}

    def roll_back(self, line_id, candidate, previous):
        self.calls.append(("roll_back", line_id))
        return previous

    def is_running(self, deployment):
        return False

    def close(self) -> None:
        for server in self.servers:
            server.httpd.shutdown()


@pytest.fixture
def aliases(monkeypatch) -> dict[str, str | None]:
    """An in-memory registry: alias -> version; history entries in aliases['history']."""
    table: dict[str, Any] = {"line-press-a": "1", "line-press-b": "1", "history": []}
    registry = engine_module.registry
    monkeypatch.setattr(engine_module, "mlflow_client", lambda uri: None)
    monkeypatch.setattr(registry, "alias_version", lambda c, name, line: table.get(f"line-{line}"))
    monkeypatch.setattr(
        registry, "move_alias", lambda c, name, line, v: table.__setitem__(f"line-{line}", v)
    )
    monkeypatch.setattr(
        registry, "append_history", lambda c, name, v, entry: table["history"].append(entry)
    )
    return table


def make_engine(tmp_path: Path, backend: RecordingBackend) -> Engine:
    engine = Engine(LocalStateStore(tmp_path / "state"), backend, data_uri="unused")
    # Two qa images per line, both defective.
    engine._samples = {
        line: [QaSample(f"{line}-{i}", b"png", True) for i in range(2)]
        for line in ("press-a", "press-b", "mill-c")
    }
    return engine


def plan(*waves: dict) -> Any:
    return plan_from_dict({"name": "t", "waves": list(waves)}, "plan.yaml")


def test_a_failing_line_rolls_back_the_lines_already_promoted_in_its_wave(tmp_path, aliases):
    backend = RecordingBackend({"press-a": True, "press-b": False})
    engine = make_engine(tmp_path, backend)
    try:
        record = engine.start(
            plan(
                {
                    "lines": ["press-a", "press-b"],
                    "mode": "live",
                    "bake": {"min_samples": 2},
                    "health": {"min_recall": 0.9},
                }
            ),
            CANDIDATE,
            plan_source="plan.yaml",
        )
    finally:
        backend.close()
    assert record["status"] == "halted"
    assert backend.calls == [
        ("deploy_live", "press-a"),
        ("finish_promotion", "press-a"),
        ("deploy_live", "press-b"),
        ("roll_back", "press-a"),
        ("roll_back", "press-b"),
    ]
    lines = record["lines"]
    assert [h["state"] for h in lines["press-a"]["history"]] == [
        "deploying",
        "baking",
        "promoted",
        "rolled_back",
    ]
    assert lines["press-b"]["checks"] == [
        {"check": "recall", "value": 0.0, "threshold": 0.9, "passed": False, "op": ">="}
    ]
    assert (
        "halted: press-b failed health; failed: recall 0 >= 0.9 FAIL"
        in (lines["press-b"]["decision"])
    )
    # press-a's alias moved after its health passed, then back with the wave.
    assert aliases["line-press-a"] == "1" and aliases["line-press-b"] == "1"
    assert [(h["line"], h["action"]) for h in aliases["history"]] == [
        ("press-a", "promoted"),
        ("press-a", "rolled_back"),
        ("press-b", "rolled_back"),
    ]
    assert lock_holder(engine.store, "press-a") is None


def test_pause_stops_before_deploying_and_resume_runs_one_wave_at_a_time(tmp_path, aliases):
    backend = RecordingBackend({"press-a": True, "press-b": True, "mill-c": True})
    engine = make_engine(tmp_path, backend)
    rollout_plan = plan(
        {
            "lines": ["press-a"],
            "mode": "shadow",
            "bake": {"min_samples": 2},
            "health": {"max_error_rate": 0.0},
        },
        {
            "lines": ["press-b", "mill-c"],
            "mode": "live",
            "bake": {"min_samples": 2},
            "health": {"min_recall": 0.9},
        },
    )
    rollout_id = "t--cta--v2"
    original_run = engine.run
    engine.run = lambda rid: engine.pause(rid)  # paused right after being recorded
    engine.start(rollout_plan, CANDIDATE, plan_source="plan.yaml")
    engine.run = original_run
    try:
        assert engine.run(rollout_id)["status"] == "paused"
        assert backend.calls == []
        assert engine.resume(rollout_id)["status"] == "waiting"  # wave 1 done, wave 2 waits
        assert aliases["line-press-a"] == "2" and aliases["line-press-b"] == "1"
        finished = engine.resume(rollout_id)
    finally:
        backend.close()
    assert finished["status"] == "completed"
    assert [w["outcome"] for w in finished["waves"]] == ["promoted", "promoted"]
    assert backend.calls == [
        ("deploy_shadow", "press-a"),
        ("finish_promotion", "press-a"),
        ("deploy_live", "press-b"),
        ("finish_promotion", "press-b"),
        ("deploy_live", "mill-c"),
        ("finish_promotion", "mill-c"),
    ]
    stored = engine.store.read(rollout_key(rollout_id)).data
    shadow = stored["lines"]["press-a"]["health"]
    assert shadow["samples"] == 2 and shadow["server_requests"] == 2
    assert shadow["agreement"] is None  # the line ran nothing before: nothing to compare
    assert engine.store.read("lines/mill-c.json").data["running"]["version"] == "2"


def test_health_judges_with_the_candidates_reject_classes_and_its_own_verdict(
    tmp_path, aliases, monkeypatch
):
    """The qa truth uses the reject classes the served MODEL names (its /readyz), and a
    candidate without an operating threshold gives no verdict: recall is not measured, the
    gate fails and the record says why."""
    asked: list[tuple[str, tuple[int, ...]]] = []

    def qa_samples(data_uri, line_id, reject_classes):
        asked.append((line_id, reject_classes))
        return [QaSample(f"{line_id}-{i}", b"png", True) for i in range(2)]

    monkeypatch.setattr(engine_module, "load_qa_samples", qa_samples)
    backend = RecordingBackend({"press-a": None})
    engine = Engine(LocalStateStore(tmp_path / "state"), backend, data_uri="data")
    try:
        record = engine.start(
            plan(
                {
                    "lines": ["press-a"],
                    "mode": "live",
                    "bake": {"min_samples": 2},
                    "health": {"min_recall": 0.5},
                }
            ),
            CANDIDATE,
            plan_source="plan.yaml",
        )
    finally:
        backend.close()
    assert asked == [("press-a", (1,))]
    entry = record["lines"]["press-a"]
    assert entry["state"] == "rolled_back"
    assert entry["health"]["recall"] is None and entry["health"]["n_defective"] == 2
    assert entry["health"]["verdict"]["threshold"] is None
    assert "no evaluation.json" in entry["health"]["verdict"]["reason"]
    assert "recall n/a >= 0.5 FAIL" in entry["decision"]
