"""The S3 state store against the session's moto server: conditional writes and line locks."""

from __future__ import annotations

import threading

import pytest

from components.rollout.engine import Engine, status
from components.rollout.state import (
    LockHeld,
    S3StateStore,
    StateConflict,
    acquire_lock,
    lock_holder,
    open_store,
    release_lock,
    update,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def store(moto_s3, s3_bucket) -> S3StateStore:
    return S3StateStore(f"s3://{s3_bucket}/rollout", endpoint_url=moto_s3.endpoint_url)


def test_conditional_writes_detect_conflicts(store: S3StateStore, moto_s3, s3_bucket) -> None:
    etag = store.write("rollouts/r.json", {"n": 1}, None)
    with pytest.raises(StateConflict, match="changed since it was read"):
        store.write("rollouts/r.json", {"n": 9}, None)  # IfNoneMatch="*": it exists
    newer = store.write("rollouts/r.json", {"n": 2}, etag)
    with pytest.raises(StateConflict):
        store.write("rollouts/r.json", {"n": 9}, etag)  # IfMatch the stale etag
    with pytest.raises(StateConflict):
        store.write("rollouts/missing.json", {"n": 9}, newer)  # IfMatch on nothing
    assert store.read("rollouts/r.json").data == {"n": 2}
    assert store.read("rollouts/missing.json") is None
    assert store.list("rollouts") == ["rollouts/r.json"]
    key = moto_s3.client().list_objects_v2(Bucket=s3_bucket)["Contents"][0]["Key"]
    assert key == "rollout/rollouts/r.json"


def test_read_modify_write_keeps_every_concurrent_update(store: S3StateStore) -> None:
    store.write("counter.json", {"n": 0}, None)

    def bump() -> None:
        for _ in range(3):
            update(store, "counter.json", lambda d: {"n": d["n"] + 1}, attempts=50)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.read("counter.json").data == {"n": 12}


def test_two_concurrent_starts_cannot_both_take_a_line_lock(store: S3StateStore) -> None:
    outcomes: dict[str, str] = {}
    barrier = threading.Barrier(2)

    def contend(owner: str) -> None:
        barrier.wait()
        try:
            acquire_lock(store, "press-a", owner, ttl_s=60)
            outcomes[owner] = "took"
        except LockHeld as exc:
            outcomes[owner] = str(exc)

    threads = [threading.Thread(target=contend, args=(f"host-{i}:1:x",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [owner for owner, outcome in outcomes.items() if outcome == "took"]
    assert len(winners) == 1, outcomes
    assert lock_holder(store, "press-a") == winners[0]
    # A wave of another roll-out that needs the same line is refused as a whole.
    engine = Engine(store, backend=None, owner="host-9:1:y")  # type: ignore[arg-type]
    from components.rollout.plan import Wave

    with pytest.raises(LockHeld, match=f"locked by {winners[0]}"):
        engine._lock_wave(Wave(lines=("mill-c", "press-a"), mode="live"))
    assert lock_holder(store, "mill-c") is None  # taken, then given back
    assert release_lock(store, "press-a", winners[0])


def test_status_and_pause_through_an_s3_uri(
    store: S3StateStore, moto_s3, monkeypatch, s3_bucket
) -> None:
    monkeypatch.setenv("CTA_S3_ENDPOINT_URL", moto_s3.endpoint_url)
    monkeypatch.setenv("CTA_ROLLOUT_STATE", f"s3://{s3_bucket}/rollout")
    opened = open_store()
    assert isinstance(opened, S3StateStore) and opened.uri == store.uri
    record = {
        "rollout_id": "r",
        "status": "running",
        "paused": False,
        "waves_allowed": 1,
        "model": {"uri": "models:/m/1", "sha256": "a" * 64},
        "backend": "local",
        "waves": [],
        "lines": {"press-a": {"state": "baking", "decision": "d"}},
    }
    store.write("rollouts/r.json", record, None)
    store.write("current.json", {"rollout_id": "r"}, None)
    Engine(opened, backend=None).pause("r")  # type: ignore[arg-type]
    report = status(opened)
    assert report["rollout"]["status"] == "paused" and report["rollout"]["paused"] is True
    assert report["lines"]["press-a"]["rollout_state"] == "baking"
