"""The roll-out engine: waves of lines, health from QA replay, alias moves, rollback, resume.

One roll-out = one registered version + one plan, recorded in ``rollouts/<id>.json``. ``start``
runs wave 1 only (``all_waves`` runs every wave); ``resume`` finishes an interrupted wave, or
when the last allowed wave is done, runs the next one. Per line of a wave, in order:

1. take the line's lock (all lines of the wave, all or none);
2. deploy the candidate ``models:/NAME/<version>`` + sha256 (shadow: beside the current model;
   live: it serves, the previous one stays as standby) - recorded before anything is measured;
3. replay the line's ``qa`` split until the bake is met; judge the wave's health gates;
4. pass: move ``line-<id>`` to the version, retire the previous deployment, record the decision;
   fail: roll the whole wave back (aliases back, previous deployments running, candidates
   stopped), mark the roll-out ``rolled_back`` with the failed checks and halt.

Every step is written to the state store before the next one starts, so a killed ``start``
continues from the recorded state on ``resume`` (a recorded candidate that still runs is reused,
otherwise deployed again; its bake restarts).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from components.registry.client import mlflow_client
from components.rollout import registry
from components.rollout.backends import Backend, ModelRef
from components.rollout.health import describe, judge, load_qa_samples, replay, served_defect
from components.rollout.plan import RolloutPlan, Wave
from components.rollout.state import (
    DEFAULT_LOCK_TTL_S,
    StateConflict,
    StateStore,
    acquire_lock,
    lock_holder,
    new_owner,
    release_lock,
    update,
    utc_now,
)
from cta_model.errors import ConfigError

SCHEMA_VERSION = 1
# Line states in a roll-out record.
PENDING, DEPLOYING, BAKING, PROMOTED, FAILED, ROLLED_BACK = (
    "pending",
    "deploying",
    "baking",
    "promoted",
    "failed",
    "rolled_back",
)
# Roll-out statuses.
RUNNING, WAITING, PAUSED, COMPLETED, HALTED = "running", "waiting", "paused", "completed", "halted"
_PAUSE_POLL_S = 0.5


def rollout_key(rollout_id: str) -> str:
    return f"rollouts/{rollout_id}.json"


def line_key(line_id: str) -> str:
    return f"lines/{line_id}.json"


def make_rollout_id(plan: RolloutPlan, model: ModelRef) -> str:
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", model.name)
    return f"{plan.name}--{safe_name}--v{model.version}"


def _history(entry: dict[str, Any], state: str, decision: str) -> None:
    now = utc_now()
    entry.update(state=state, since=now, decision=decision)
    entry.setdefault("history", []).append({"time": now, "state": state, "decision": decision})


@dataclass
class Engine:
    store: StateStore
    backend: Backend
    tracking_uri: str | None = None
    data_uri: str | None = None
    # Recorded so that resume and rollback start line servers with the same inventory.
    lines_config: str | None = None
    owner: str = field(default_factory=new_owner)
    lock_ttl_s: float = DEFAULT_LOCK_TTL_S
    _samples: dict[str, Any] = field(default_factory=dict)
    _held: set[str] = field(default_factory=set)

    # ---------------------------------------------------------------- record access
    def read(self, rollout_id: str) -> dict[str, Any]:
        current = self.store.read(rollout_key(rollout_id))
        if current is None:
            raise ConfigError(f"no roll-out {rollout_id!r} in {self.store.uri}")
        return current.data

    def _save(self, rollout_id: str, change) -> dict[str, Any]:
        def apply(data: dict[str, Any] | None) -> dict[str, Any]:
            assert data is not None
            change(data)
            data["updated_at"] = utc_now()
            return data

        return update(self.store, rollout_key(rollout_id), apply)

    def _save_line(self, rollout_id: str, line_id: str, change) -> dict[str, Any]:
        return self._save(rollout_id, lambda data: change(data["lines"][line_id]))

    def _set_line_doc(self, line_id: str, **fields: Any) -> None:
        def apply(data: dict[str, Any] | None) -> dict[str, Any]:
            data = data or {"line": line_id, "history": []}
            data.update(fields, since=utc_now())
            data["history"] = [
                *data.get("history", [])[-49:],
                {
                    "time": data["since"],
                    "version": (data.get("running") or {}).get("version"),
                    "decision": fields.get("decision"),
                },
            ]
            return data

        update(self.store, line_key(line_id), apply)

    def line_doc(self, line_id: str) -> dict[str, Any] | None:
        current = self.store.read(line_key(line_id))
        return None if current is None else current.data

    # ---------------------------------------------------------------- commands
    def start(
        self,
        plan: RolloutPlan,
        model: ModelRef,
        *,
        plan_source: str,
        all_waves: bool = False,
    ) -> dict[str, Any]:
        rollout_id = make_rollout_id(plan, model)
        record = {
            "schema_version": SCHEMA_VERSION,
            "rollout_id": rollout_id,
            "plan": plan.model_dump(mode="json"),
            "plan_source": plan_source,
            "plan_sha256": plan.digest(),
            "model": {
                "name": model.name,
                "version": model.version,
                "uri": model.uri,
                "sha256": model.sha256,
            },
            "backend": self.backend.name,
            "data_uri": self.data_uri,
            "tracking_uri": self.tracking_uri,
            "lines_config": self.lines_config,
            "created_at": utc_now(),
            "updated_at": utc_now(),
            "status": RUNNING,
            "paused": False,
            "waves_allowed": len(plan.waves) if all_waves else 1,
            "waves": [
                {"index": i, "mode": w.mode, "lines": list(w.lines)}
                for i, w in enumerate(plan.waves)
            ],
            "lines": {
                line_id: {
                    "wave": plan.wave_of(line_id),
                    "state": PENDING,
                    "version": model.version,
                    "sha256": model.sha256,
                    "since": utc_now(),
                    "decision": "planned",
                    "history": [],
                }
                for line_id in plan.line_ids
            },
        }
        try:
            self.store.write(rollout_key(rollout_id), record, None)
        except StateConflict:
            raise ConfigError(
                f"roll-out {rollout_id!r} already exists in {self.store.uri}; use "
                "`cta rollout resume` (or `status`) instead of starting it again"
            ) from None
        update(self.store, "current.json", lambda _: {"rollout_id": rollout_id})
        print(f"[rollout] {rollout_id}: started ({len(plan.waves)} waves)", flush=True)
        return self.run(rollout_id)

    def resume(self, rollout_id: str, all_waves: bool = False) -> dict[str, Any]:
        record = self.read(rollout_id)
        if record["status"] in (HALTED, COMPLETED):
            print(f"[rollout] {rollout_id}: {record['status']}; nothing to resume", flush=True)
            return record
        plan = RolloutPlan.model_validate(record["plan"])

        def allow_next(data: dict[str, Any]) -> None:
            data["paused"] = False
            data["status"] = RUNNING
            allowed = data["waves_allowed"]
            last_done = all(
                data["lines"][line]["state"] == PROMOTED for line in plan.waves[allowed - 1].lines
            )
            if all_waves:
                data["waves_allowed"] = len(plan.waves)
            elif last_done and allowed < len(plan.waves):
                data["waves_allowed"] = allowed + 1

        self._save(rollout_id, allow_next)
        return self.run(rollout_id)

    def pause(self, rollout_id: str) -> dict[str, Any]:
        def apply(data: dict[str, Any]) -> None:
            data["paused"] = True
            if data["status"] in (RUNNING, WAITING):
                data["status"] = PAUSED

        return self._save(rollout_id, apply)

    # ---------------------------------------------------------------- the loop
    def run(self, rollout_id: str) -> dict[str, Any]:
        record = self.read(rollout_id)
        plan = RolloutPlan.model_validate(record["plan"])
        model = ModelRef(**{k: record["model"][k] for k in ("name", "version", "sha256")})
        try:
            for wave_index, wave in enumerate(plan.waves):
                record = self.read(rollout_id)
                states = [record["lines"][line]["state"] for line in wave.lines]
                if all(state == PROMOTED for state in states):
                    continue
                if record["paused"]:
                    return self._save(rollout_id, lambda d: d.update(status=PAUSED))
                if wave_index >= record["waves_allowed"]:
                    print(
                        f"[rollout] {rollout_id}: wave {wave_index + 1} waits for "
                        "`cta rollout resume`",
                        flush=True,
                    )
                    return self._save(rollout_id, lambda d: d.update(status=WAITING))
                outcome = self._run_wave(rollout_id, plan, wave_index, wave, model)
                if outcome != PROMOTED:
                    return self.read(rollout_id)
            print(f"[rollout] {rollout_id}: completed", flush=True)
            return self._save(rollout_id, lambda d: d.update(status=COMPLETED))
        finally:
            for line_id in sorted(self._held):
                release_lock(self.store, line_id, self.owner)
            self._held.clear()

    def _lock_wave(self, wave: Wave) -> None:
        taken = []
        try:
            for line_id in wave.lines:
                acquire_lock(self.store, line_id, self.owner, self.lock_ttl_s)
                taken.append(line_id)
        except Exception:
            for line_id in taken:
                release_lock(self.store, line_id, self.owner)
            raise
        self._held.update(taken)

    def _run_wave(
        self, rollout_id: str, plan: RolloutPlan, wave_index: int, wave: Wave, model: ModelRef
    ) -> str:
        self._lock_wave(wave)
        started = time.monotonic()
        label = f"wave {wave_index + 1} ({wave.mode})"
        print(f"[rollout] {rollout_id}: {label}: lines {', '.join(wave.lines)}", flush=True)
        self._save(
            rollout_id,
            lambda d: d["waves"][wave_index].setdefault("started_at", utc_now()),
        )
        for line_id in wave.lines:
            record = self.read(rollout_id)
            if record["lines"][line_id]["state"] == PROMOTED:
                continue
            acquire_lock(self.store, line_id, self.owner, self.lock_ttl_s)  # renew
            if record["lines"][line_id]["state"] in (FAILED, ROLLED_BACK):
                outcome = FAILED  # judged before an interruption: finish its rollback
            elif record["paused"]:
                outcome = PAUSED
            else:
                outcome = self._advance_line(rollout_id, wave_index, wave, line_id, model)
            if outcome == PAUSED:
                self._save(rollout_id, lambda d: d.update(status=PAUSED))
                print(f"[rollout] {rollout_id}: paused at line {line_id}", flush=True)
                return PAUSED
            if outcome == FAILED:
                self._roll_back_lines(
                    rollout_id,
                    list(wave.lines),
                    f"{label} halted: {line_id} failed health",
                    action="rolled_back",
                )
                self._finish_wave(rollout_id, wave_index, started, "rolled_back")
                self._save(rollout_id, lambda d: d.update(status=HALTED))
                _notify_rollback(rollout_id, label, line_id, model)
                return FAILED
        self._finish_wave(rollout_id, wave_index, started, "promoted")
        return PROMOTED

    def _finish_wave(self, rollout_id: str, wave_index: int, started: float, outcome: str):
        seconds = round(time.monotonic() - started, 3)
        print(f"[rollout] wave {wave_index + 1}: {outcome} in {seconds:.1f} s", flush=True)

        def apply(data: dict[str, Any]) -> None:
            data["waves"][wave_index].update(
                finished_at=utc_now(), seconds=seconds, outcome=outcome
            )

        self._save(rollout_id, apply)

    def _qa_samples(self, line_id: str, verdict: dict[str, Any]) -> list:
        """The line's qa images, defective by the reject classes of the served model."""
        if line_id not in self._samples:
            if not self.data_uri:
                raise ConfigError("--data is required: health replays the line's qa split")
            reject = tuple(verdict["reject_class_ids"])
            self._samples[line_id] = load_qa_samples(self.data_uri, line_id, reject)
        return self._samples[line_id]

    def _keep_going(self, rollout_id: str, line_id: str):
        last = {"check": 0.0, "renew": time.monotonic()}

        def keep_going() -> bool:
            now = time.monotonic()
            if now - last["renew"] > self.lock_ttl_s / 3:
                acquire_lock(self.store, line_id, self.owner, self.lock_ttl_s)
                last["renew"] = now
            if now - last["check"] < _PAUSE_POLL_S:
                return True
            last["check"] = now
            return not self.read(rollout_id)["paused"]

        return keep_going

    def _advance_line(
        self, rollout_id: str, wave_index: int, wave: Wave, line_id: str, model: ModelRef
    ) -> str:
        mlflow = mlflow_client(self.tracking_uri)
        entry = self.read(rollout_id)["lines"][line_id]
        if entry["state"] == PENDING:
            doc = self.line_doc(line_id) or {}
            previous = doc.get("running")
            previous_alias = registry.alias_version(mlflow, model.name, line_id)

            def begin(e: dict[str, Any]) -> None:
                e.update(previous=previous, previous_alias=previous_alias, candidate=None)
                _history(e, DEPLOYING, f"wave {wave_index + 1} {wave.mode}: deploying")

            entry = self._save_line(rollout_id, line_id, begin)["lines"][line_id]
        previous = entry.get("previous")
        candidate = entry.get("candidate")
        if candidate is None or not self.backend.is_running(candidate):
            if wave.mode == "shadow":
                candidate = self.backend.deploy_shadow(line_id, model)
            else:
                candidate = self.backend.deploy_live(line_id, model, previous)

            def deployed(e: dict[str, Any]) -> None:
                e["candidate"] = candidate
                _history(e, BAKING, f"wave {wave_index + 1} {wave.mode}: baking")

            self._save_line(rollout_id, line_id, deployed)
            if wave.mode == "live":
                self._set_line_doc(
                    line_id,
                    running=candidate,
                    standby=previous,
                    rollout_id=rollout_id,
                    decision=f"{rollout_id}: wave {wave_index + 1} live bake of v{model.version}",
                )
        compare_url = None
        if wave.mode == "shadow" and previous and self.backend.is_running(previous):
            compare_url = previous.get("url")
        # The candidate judges with its model's reject classes and the threshold its server
        # found for this line (the version's evaluation.json), never a global default.
        verdict = served_defect(candidate["url"])
        if verdict["reason"]:
            print(f"[rollout] {line_id}: the candidate gives no verdict: {verdict['reason']}")
        samples = self._qa_samples(line_id, verdict)
        print(
            f"[rollout] {line_id}: replaying {len(samples)} qa images (bake "
            f"{wave.bake.min_samples} samples, {wave.bake.min_seconds:g} s; threshold "
            f"{verdict['threshold']} from {verdict['threshold_source']})",
            flush=True,
        )
        values = replay(
            candidate["url"],
            samples,
            wave.bake,
            compare_url,
            keep_going=self._keep_going(rollout_id, line_id),
        )
        values["verdict"] = {
            key: verdict.get(key)
            for key in ("threshold", "threshold_source", "reject_classes", "reason")
        }
        if not values["complete"]:
            return PAUSED
        passed, checks = judge(values, wave.health)
        verdict = describe(checks)
        print(
            f"[rollout] {line_id}: health {'passed' if passed else 'FAILED'}: {verdict}", flush=True
        )
        if not passed:
            decision = f"wave {wave_index + 1} {wave.mode}: health failed: {verdict}"

            def failed(e: dict[str, Any]) -> None:
                e.update(health=values, checks=checks)
                _history(e, FAILED, decision)

            self._save_line(rollout_id, line_id, failed)
            return FAILED
        # Only now, after health passed, does the line's alias move.
        registry.move_alias(mlflow, model.name, line_id, model.version)
        live = self.backend.finish_promotion(line_id, candidate, previous)
        decision = f"{rollout_id}: wave {wave_index + 1} {wave.mode} health passed: {verdict}"
        self._set_line_doc(
            line_id, running=live, standby=None, rollout_id=rollout_id, decision=decision
        )

        def promoted(e: dict[str, Any]) -> None:
            e.update(health=values, checks=checks, candidate=live)
            _history(e, PROMOTED, decision)

        self._save_line(rollout_id, line_id, promoted)
        registry.append_history(
            mlflow,
            model.name,
            model.version,
            {"line": line_id, "action": "promoted", "time": utc_now(), "decision": decision},
        )
        return PROMOTED

    # ---------------------------------------------------------------- rollback
    def _roll_back_lines(
        self, rollout_id: str, line_ids: list[str], reason: str, action: str
    ) -> list[str]:
        record = self.read(rollout_id)
        name, version = record["model"]["name"], record["model"]["version"]
        mlflow = mlflow_client(self.tracking_uri)
        done = []
        for line_id in line_ids:
            entry = record["lines"][line_id]
            if entry["state"] in (PENDING, ROLLED_BACK):
                continue
            previous, candidate = entry.get("previous"), entry.get("candidate")
            failed_checks = [c for c in entry.get("checks", []) if not c["passed"]]
            detail = f"; failed: {describe(failed_checks)}" if failed_checks else ""
            decision = f"{rollout_id}: {reason}{detail}"
            if registry.alias_version(mlflow, name, line_id) != entry.get("previous_alias"):
                registry.move_alias(mlflow, name, line_id, entry.get("previous_alias"))
            restored = self.backend.roll_back(line_id, candidate, previous)
            self._set_line_doc(
                line_id,
                running=restored,
                standby=None,
                rollout_id=rollout_id,
                decision=decision,
            )

            def rolled_back(
                e: dict[str, Any], decision: str = decision, candidate: Any = candidate
            ) -> None:
                e.update(candidate=None, retired_candidate=candidate)
                _history(e, ROLLED_BACK, decision)

            self._save_line(rollout_id, line_id, rolled_back)
            registry.append_history(
                mlflow,
                name,
                version,
                {"line": line_id, "action": action, "time": utc_now(), "decision": decision},
            )
            print(f"[rollout] {line_id}: rolled back ({reason})", flush=True)
            done.append(line_id)
        return done

    def rollback(self, rollout_id: str, line_id: str | None = None) -> dict[str, Any]:
        """Manual rollback of one line or of every line the roll-out touched."""
        record = self.read(rollout_id)
        targets = [line_id] if line_id else list(record["lines"])
        unknown = [t for t in targets if t not in record["lines"]]
        if unknown:
            raise ConfigError(
                f"--line {unknown[0]!r} is not in roll-out {rollout_id!r} "
                f"(lines: {', '.join(record['lines'])})"
            )
        try:
            for target in targets:
                acquire_lock(self.store, target, self.owner, self.lock_ttl_s)
                self._held.add(target)
            self._roll_back_lines(rollout_id, targets, "manual rollback", action="rollback")
            if line_id is None:
                self._save(rollout_id, lambda d: d.update(status=HALTED))
        finally:
            for target in sorted(self._held):
                release_lock(self.store, target, self.owner)
            self._held.clear()
        return self.read(rollout_id)


def _notify_rollback(rollout_id: str, wave: str, line_id: str, model: Any) -> None:
    from components.notify import notify

    notify(
        "rollback",
        {
            "rollout_id": rollout_id,
            "wave": wave,
            "failed_line": line_id,
            "model": getattr(model, "uri", str(model)),
        },
    )


def current_rollout_id(store: StateStore) -> str:
    current = store.read("current.json")
    if current is None:
        raise ConfigError(
            f"no roll-out recorded in {store.uri}; start one with `cta rollout start`"
        )
    return current.data["rollout_id"]


def status(store: StateStore, rollout_id: str | None = None) -> dict[str, Any]:
    """Per line: what runs (version, sha, url/pid), since when, which decision put it there."""
    from components.rollout.backends.local import is_serve_process

    record = None
    if rollout_id or store.read("current.json"):
        rid = rollout_id or current_rollout_id(store)
        current = store.read(rollout_key(rid))
        record = current.data if current else None
    line_ids = sorted(
        {key.removeprefix("lines/").removesuffix(".json") for key in store.list("lines")}
        | set(record["lines"] if record else [])
    )
    lines = {}
    for line_id in line_ids:
        doc = store.read(line_key(line_id)) or None
        data = doc.data if doc else {}
        running = data.get("running")
        alive = None
        if running and isinstance(running.get("pid"), int):
            alive = is_serve_process(running["pid"])
        entry = (record or {}).get("lines", {}).get(line_id, {})
        lines[line_id] = {
            "running": running,
            "alive": alive,
            "since": data.get("since"),
            "decision": data.get("decision"),
            "rollout_state": entry.get("state"),
            "rollout_decision": entry.get("decision"),
            "lock": lock_holder(store, line_id),
        }
    summary = None
    if record:
        summary = {
            k: record[k]
            for k in (
                "rollout_id",
                "status",
                "paused",
                "waves_allowed",
                "model",
                "backend",
                "waves",
            )
        }
    return {"state": store.uri, "rollout": summary, "lines": lines}


def format_status(report: dict[str, Any]) -> str:
    out = [f"state: {report['state']}"]
    rollout = report["rollout"]
    if rollout:
        out.append(
            f"roll-out {rollout['rollout_id']}: {rollout['status']}"
            f"{' (paused)' if rollout['paused'] else ''}; model {rollout['model']['uri']} "
            f"sha256 {rollout['model']['sha256'][:12]}; backend {rollout['backend']}"
        )
        for wave in rollout["waves"]:
            timing = f", {wave['seconds']:.1f} s" if "seconds" in wave else ""
            out.append(
                f"  wave {wave['index'] + 1} ({wave['mode']}): {', '.join(wave['lines'])} -> "
                f"{wave.get('outcome', 'not finished')}{timing}"
            )
    if not rollout and not report["lines"]:
        out.append("no roll-out recorded yet (cta rollout start ...)")
    for line_id, line in report["lines"].items():
        running = line["running"]
        if running:
            where = running.get("url") or ""
            if running.get("pid"):
                where += f" pid {running['pid']}{'' if line['alive'] else ' (NOT RUNNING)'}"
            what = f"v{running['version']} sha256 {running['sha256'][:12]} {where}".rstrip()
        else:
            what = "nothing"
        out.append(f"{line_id}: runs {what} since {line['since'] or '-'}")
        out.append(f"    decision: {line['decision'] or '-'}")
        if line["rollout_state"]:
            out.append(f"    this roll-out: {line['rollout_state']} ({line['rollout_decision']})")
        if line["lock"]:
            out.append(f"    locked by {line['lock']}")
    return "\n".join(out)


def stop_all(store: StateStore) -> list[int]:
    """Stop every local line server recorded in the state (``make demo-clean``)."""
    from components.rollout.backends.local import stop_pid

    pids: set[int] = set()
    for key in store.list("lines"):
        doc = store.read(key)
        for role in ("running", "standby"):
            deployment = (doc.data if doc else {}).get(role) or {}
            if isinstance(deployment.get("pid"), int):
                pids.add(deployment["pid"])
    for key in store.list("rollouts"):
        doc = store.read(key)
        for entry in (doc.data if doc else {}).get("lines", {}).values():
            for role in ("candidate", "previous"):
                deployment = entry.get(role) or {}
                if isinstance(deployment.get("pid"), int):
                    pids.add(deployment["pid"])
    stopped = sorted(pid for pid in pids if stop_pid(pid))
    for key in store.list("lines"):
        line_id = key.removeprefix("lines/").removesuffix(".json")

        def clear(data: dict[str, Any] | None, line_id: str = line_id) -> dict[str, Any]:
            data = data or {"line": line_id}
            if (data.get("running") or {}).get("backend") == "local":
                data.update(
                    running=None,
                    standby=None,
                    since=utc_now(),
                    decision="stop-all: local line servers stopped",
                )
            return data

        update(store, key, clear)
    return stopped
