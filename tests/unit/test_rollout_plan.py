"""Roll-out plan validation, health judging and the local state store (no servers)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml

from components.rollout.health import TargetLog, judge, summarise
from components.rollout.plan import HealthGates, load_plan
from components.rollout.state import (
    LocalStateStore,
    LockHeld,
    StateConflict,
    acquire_lock,
    lock_holder,
    open_store,
    release_lock,
)
from cta_model.errors import ConfigError

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def write_plan(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def plan_data(**wave_overrides) -> dict:
    return {
        "name": "t",
        "waves": [{"lines": ["press-a"], "mode": "shadow", **wave_overrides}],
    }


@pytest.mark.parametrize("name", ["rollout-plan.yaml", "rollout-demo.yaml"])
def test_shipped_plans_load_and_start_at_the_pilot(name: str) -> None:
    plan = load_plan(REPO / "configs" / name)
    assert plan.waves[0].lines == ("press-a",)
    assert plan.waves[0].mode == "shadow"
    assert plan.waves[1].mode == "live" and plan.waves[1].health.min_recall is not None


def test_unknown_line_is_refused_naming_file_and_key(tmp_path: Path) -> None:
    data = plan_data()
    data["waves"].append({"lines": ["press-b", "press-z"], "mode": "live"})
    path = write_plan(tmp_path, data)
    with pytest.raises(
        ConfigError, match=rf"{path}: waves\[1\]\.lines\[1\]: unknown line id 'press-z'"
    ):
        load_plan(path)


def test_unknown_key_and_misplaced_gates_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"waves\[0\]\.bake\.min_sample: unknown key"):
        load_plan(write_plan(tmp_path, plan_data(bake={"min_sample": 3})))
    with pytest.raises(ConfigError, match="min_recall applies to live waves only"):
        load_plan(write_plan(tmp_path, plan_data(health={"min_recall": 0.9})))
    data = plan_data()
    data["waves"].append({"lines": ["press-a"], "mode": "live"})
    with pytest.raises(ConfigError, match="line 'press-a' is in waves"):
        load_plan(write_plan(tmp_path, data))


def test_judge_lists_every_enforced_gate_and_fails_on_missing_values() -> None:
    candidate = TargetLog(
        [10.0, 20.0, 30.0, 400.0], [200, 200, 200, 500], [True, False, None, None]
    )
    current = TargetLog([5.0] * 4, [200] * 4, [True, True, False, False])
    values = summarise(
        candidate, current, [True, True, False, None], {"200": 1}, {"200": 4, "500": 1}
    )
    assert values["error_rate"] == 0.25
    assert values["agreement"] == 0.5  # two comparable answers, one agrees
    assert values["recall"] == 0.5
    passed, checks = judge(values, HealthGates(max_error_rate=0.3, max_p95_latency_ms=1000))
    assert passed and [c["check"] for c in checks] == ["error_rate", "p95_latency_ms"]
    passed, checks = judge(values, HealthGates(max_error_rate=0.1, min_agreement=0.4))
    assert not passed
    assert checks[0] == {
        "check": "error_rate",
        "value": 0.25,
        "threshold": 0.1,
        "passed": False,
        "op": "<=",
    }
    values["recall"] = None
    passed, checks = judge(values, HealthGates(min_recall=0.0))
    assert not passed and checks[0]["value"] is None


def test_local_store_compare_and_swap(tmp_path: Path) -> None:
    store = LocalStateStore(tmp_path / "state")
    etag = store.write("rollouts/a.json", {"n": 1}, None)
    with pytest.raises(StateConflict):
        store.write("rollouts/a.json", {"n": 2}, None)
    with pytest.raises(StateConflict):
        store.write("rollouts/a.json", {"n": 2}, "0" * 64)
    store.write("rollouts/a.json", {"n": 2}, etag)
    assert store.read("rollouts/a.json").data == {"n": 2}
    assert store.list("rollouts") == ["rollouts/a.json"]
    with pytest.raises(ConfigError):
        store.read("../escape.json")


def test_default_state_uri_comes_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CTA_ROLLOUT_STATE", str(tmp_path / "env-state"))
    assert open_store().uri == str(tmp_path / "env-state")
    monkeypatch.delenv("CTA_ROLLOUT_STATE")
    monkeypatch.chdir(tmp_path)
    assert open_store().uri == str(tmp_path / ".cta/demo/rollout")


def test_only_one_of_many_racing_owners_takes_a_line_lock(tmp_path: Path) -> None:
    store = LocalStateStore(tmp_path / "state")
    winners, barrier = [], threading.Barrier(6)

    def contend(owner: str) -> None:
        barrier.wait()
        try:
            acquire_lock(store, "press-a", owner, ttl_s=60)
            winners.append(owner)
        except LockHeld:
            pass

    threads = [threading.Thread(target=contend, args=(f"otherhost:1:{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    assert lock_holder(store, "press-a") == winners[0]
    assert not release_lock(store, "press-a", "otherhost:1:nobody")
    assert release_lock(store, "press-a", winners[0])
    assert lock_holder(store, "press-a") is None


def test_an_expired_lock_or_a_dead_local_owner_is_taken_over(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    store = LocalStateStore(tmp_path / "state")
    acquire_lock(store, "press-a", "otherhost:1:x", ttl_s=-1)  # already expired
    acquire_lock(store, "press-a", "me", ttl_s=60)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    acquire_lock(store, "press-b", f"{socket.gethostname()}:{dead}:y", ttl_s=600)
    acquire_lock(store, "press-b", "me", ttl_s=60)
    assert lock_holder(store, "press-b") == "me"
    acquire_lock(store, "mill-c", "otherhost:1:z", ttl_s=600)
    with pytest.raises(LockHeld, match="locked by otherhost:1:z"):
        acquire_lock(store, "mill-c", "me", ttl_s=60)


def test_pause_and_status_through_the_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cta_cli.commands.rollout import rollout

    store = LocalStateStore(tmp_path / "state")
    record = {
        "rollout_id": "demo--cta--v2",
        "status": "running",
        "paused": False,
        "waves_allowed": 1,
        "model": {"uri": "models:/cta/2", "sha256": "c" * 64},
        "backend": "local",
        "waves": [{"index": 0, "mode": "shadow", "lines": ["press-a"]}],
        "lines": {"press-a": {"state": "baking", "decision": "wave 1 shadow: baking"}},
    }
    store.write("rollouts/demo--cta--v2.json", record, None)
    store.write("current.json", {"rollout_id": "demo--cta--v2"}, None)
    store.write(
        "lines/press-a.json",
        {
            "line": "press-a",
            "since": "2026-11-28T10:00:00Z",
            "decision": "promoted by gate",
            "running": {
                "version": "1",
                "sha256": "d" * 64,
                "url": "http://127.0.0.1:9",
                "pid": None,
            },
        },
        None,
    )
    runner = CliRunner()
    paused = runner.invoke(rollout, ["pause", "--state", store.uri])
    assert paused.exit_code == 0, paused.output
    assert store.read("rollouts/demo--cta--v2.json").data["paused"] is True
    shown = runner.invoke(rollout, ["status", "--state", store.uri])
    assert shown.exit_code == 0, shown.output
    assert "roll-out demo--cta--v2: paused (paused)" in shown.output
    assert "press-a: runs v1 sha256 dddddddddddd http://127.0.0.1:9 since 2026-11-28T10:00:00Z" in (
        shown.output
    )
    assert "decision: promoted by gate" in shown.output
    assert "this roll-out: baking" in shown.output
