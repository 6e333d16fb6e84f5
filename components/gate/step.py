"""The promotion gate (DESIGN 5.3, 7): policy + registry -> pass | fail | pending_approval.

``run()`` reads ONLY the registry: the version (complete registrations only), its tags, the
files register_model attached under ``registration/v<N>/`` of its source run (dataset_ref.json,
evaluation.json, roi.json) and the current ``champion`` alias. Every check the policy switches
on becomes ``{name, passed, value, threshold, detail}``; a check whose input is missing fails
with the reason.

The decision is an immutable audit record, ``gate/v<N>/<verdict-id>.json`` in the same run,
where verdict-id = sha256 of the policy and the inputs (version, sha256 of each attached file,
champion considered, approver name). A record is never overwritten: a second run with the same
inputs finds it, writes nothing and moves nothing. Then, in order (each only when not already
so, so an interrupted gate completes on a re-run): version tags ``cta.gate.verdict``,
``cta.gate.verdict_id``, ``cta.gate.policy_sha256``, ``cta.gate.record``; on pass the alias
``champion`` moves to the version and the previous champion gets ``cta.gate.superseded_by``;
finally the model card is regenerated.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from components.gate.policy import INSPECTION_FIGURES, GatePolicy, load_policy
from components.model_card.card import publish_card
from components.registry.attachments import Registration, read_registration
from components.registry.client import mlflow_client
from components.registry.names import (
    CHAMPION_ALIAS,
    TAG_MODEL_ID,
    TAG_MODEL_SHA256,
    TAG_POLICY,
    TAG_RECORD,
    TAG_SUPERSEDED_BY,
    TAG_VERDICT,
    TAG_VERDICT_ID,
)
from components.registry.records import gate_records, record_path, write_record

RECORD_VERSION = 1
PASS, FAIL, PENDING = "pass", "fail", "pending_approval"
APPROVAL_CHECK = "approval"
_DELTA_M_KEYS = {
    "primary": "delta_m_primary_pct_higher_better",
    "task_avg": "delta_m_task_avg_pct_higher_better",
}


def _check(name: str, passed: bool, value: Any, threshold: Any, detail: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "passed": bool(passed),
        "value": value,
        "threshold": threshold,
        "detail": detail,
    }


def _missing(name: str, threshold: Any, reason: str) -> dict[str, Any]:
    return _check(name, False, None, threshold, f"input missing: {reason}")


# ------------------------------------------------------------------------------------ checks
def _data_validation(policy: GatePolicy, reg: Registration) -> list[dict[str, Any]]:
    if policy.data_validation is None or not policy.data_validation.required:
        return []
    if reg.dataset_ref is None:
        return [_missing("data_validation", True, "no dataset_ref.json attached")]
    passed = reg.dataset_ref["passed"] is True
    detail = f"manifest {reg.dataset_ref['manifest_sha256'][:12]}"
    if not passed:
        detail += ": validate_data reported failures"
    return [_check("data_validation", passed, reg.dataset_ref["passed"], True, detail)]


def _absolute_minimums(policy: GatePolicy, evaluation: Mapping | None) -> list[dict[str, Any]]:
    from cta_model.tasks import TASKS, metric_directions

    directions = metric_directions(TASKS)
    checks = []
    for key, limit in policy.absolute_minimums.items():
        name = f"minimum.{key}"
        higher = directions[key] == "higher"
        threshold = f"{'>=' if higher else '<='} {limit}"
        if evaluation is None:
            checks.append(_missing(name, threshold, "no evaluation.json attached"))
            continue
        value = evaluation["overall"]["metrics"].get(key)
        if value is None:
            checks.append(_missing(name, threshold, f"overall {key} is null or not scored"))
            continue
        passed = value >= limit if higher else value <= limit
        checks.append(_check(name, passed, value, threshold, f"overall, {directions[key]} better"))
    return checks


def _non_inferiority(
    policy: GatePolicy,
    evaluation: Mapping | None,
    champion: Mapping[str, Any] | None,
) -> list[dict[str, Any]]:
    rule = policy.non_inferiority
    if rule is None or champion is None or champion.get("self"):
        return []
    from cta_model.tasks import get_task

    wanted = {
        f"non_inferiority.{task}.{get_task(task).primary_metric.name}": (task, margin)
        for task, margin in rule.task_margins.items()
    }
    for figure in INSPECTION_FIGURES:
        margin = getattr(rule.inspection, figure)
        if margin is not None:
            wanted[f"non_inferiority.inspection.{figure}"] = (None, margin)

    comparison = evaluation.get("vs_champion") if evaluation else None
    reason = None
    if evaluation is None:
        reason = "no evaluation.json attached"
    elif comparison is None:
        reason = evaluation.get("vs_champion_reason") or "evaluation.json has no vs_champion"
    elif str(comparison.get("version")) != champion["version"] or (
        comparison.get("model_id") not in (None, champion.get("model_id"))
    ):
        reason = (
            f"evaluation.json compares with version {comparison.get('version')} "
            f"({comparison.get('model_id')}), but the champion is version {champion['version']}"
            " - re-evaluate against it"
        )
    checks = []
    for name, (task, margin) in wanted.items():
        threshold = f"p05 > {-margin}"
        if reason is not None:
            checks.append(_missing(name, threshold, reason))
            continue
        if task is None:
            figure = name.rsplit(".", 1)[1]
            entry = (comparison.get("inspection") or {}).get(figure) or {}
        else:
            entry = (comparison.get("metrics") or {}).get(task) or {}
        p05 = entry.get("p05")
        if p05 is None:
            checks.append(_missing(name, threshold, "no bootstrap p05 in vs_champion"))
            continue
        detail = (
            f"paired bootstrap of candidate - champion v{champion['version']} (positive = "
            f"better): p05 {p05:.4g}, p50 {entry.get('p50')}, p95 {entry.get('p95')}"
        )
        checks.append(_check(name, p05 > -margin, p05, threshold, detail))
    return checks


def _task_floor(policy: GatePolicy, evaluation: Mapping | None) -> list[dict[str, Any]]:
    limit = policy.max_task_regression_pct
    if limit is None:
        return []
    threshold = f">= {-limit}"
    if evaluation is None:
        return [_missing("task_floor", threshold, "no evaluation.json attached")]
    delta_m = evaluation.get("delta_m")
    if delta_m is None:
        reason = evaluation.get("delta_m_reason") or "delta_m is null"
        return [_missing("task_floor", threshold, f"no STL comparison: {reason}")]
    per_task = delta_m.get("per_task_pct") or {}
    checks = []
    for task in evaluation["model"]["tasks"]:
        name = f"task_floor.{task}"
        value = per_task.get(task)
        if value is None:
            checks.append(_missing(name, threshold, f"no per_task_pct for {task}"))
            continue
        detail = f"% vs STL baseline of {task} (higher = better)"
        checks.append(_check(name, value >= -limit, value, threshold, detail))
    return checks


def _delta_m(policy: GatePolicy, evaluation: Mapping | None) -> list[dict[str, Any]]:
    rule = policy.delta_m
    if rule is None:
        return []
    name, threshold = f"delta_m.{rule.variant}", f">= {rule.min_pct}"
    if evaluation is None:
        return [_missing(name, threshold, "no evaluation.json attached")]
    delta_m = evaluation.get("delta_m")
    if delta_m is None:
        return [_missing(name, threshold, evaluation.get("delta_m_reason") or "delta_m is null")]
    value = delta_m.get(_DELTA_M_KEYS[rule.variant])
    if value is None:
        return [_missing(name, threshold, f"{_DELTA_M_KEYS[rule.variant]} is null")]
    return [_check(name, value >= rule.min_pct, value, threshold, "% vs STL (higher = better)")]


def _roi(policy: GatePolicy, roi: Mapping | None) -> list[dict[str, Any]]:
    rule = policy.roi
    if rule is None:
        return []
    name, threshold = f"roi.p_roi_positive.{rule.scope}", f">= {rule.min_p_roi_positive}"
    if roi is None:
        return [_missing(name, threshold, "no roi.json attached to this version")]
    value = (roi.get(rule.scope) or {}).get("p_roi_positive")
    if value is None:
        return [_missing(name, threshold, f"roi.json {rule.scope}.p_roi_positive is null")]
    detail = f"P(ROI > 0) from roi.json ({rule.scope})"
    return [_check(name, value >= rule.min_p_roi_positive, value, threshold, detail)]


def _champion_checks(
    policy: GatePolicy, champion: Mapping[str, Any] | None, approver: str | None
) -> list[dict[str, Any]]:
    checks = []
    reasons = []
    if policy.approval.required:
        reasons.append("policy approval.required")
    if champion is None:
        if policy.when_no_champion == "pass":
            checks.append(_check("champion", True, "none", None, "no champion yet: first one"))
        else:
            reasons.append("no champion yet (when_no_champion: require_approval)")
    elif champion.get("self"):
        checks.append(_check("champion", True, "self", None, "already the champion"))
    if reasons:
        detail = "; ".join(reasons) + (f"; approved by {approver}" if approver else "")
        checks.append(
            _check(APPROVAL_CHECK, approver is not None, approver, "a named approver", detail)
        )
    return checks


def evaluate_checks(
    policy: GatePolicy,
    reg: Registration,
    champion: Mapping[str, Any] | None,
    approver: str | None,
) -> tuple[str, list[dict[str, Any]]]:
    """(verdict, checks) of one version under one policy; pure, for tests and the CLI."""
    checks = [
        *_data_validation(policy, reg),
        *_absolute_minimums(policy, reg.evaluation),
        *_non_inferiority(policy, reg.evaluation, champion),
        *_task_floor(policy, reg.evaluation),
        *_delta_m(policy, reg.evaluation),
        *_roi(policy, reg.roi),
        *_champion_checks(policy, champion, approver),
    ]
    if any(not c["passed"] for c in checks if c["name"] != APPROVAL_CHECK):
        return FAIL, checks
    if any(not c["passed"] for c in checks if c["name"] == APPROVAL_CHECK):
        return PENDING, checks
    return PASS, checks


# ---------------------------------------------------------------------------- the decision
def _canonical_sha256(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _inputs(
    reg: Registration, champion: Mapping[str, Any] | None, approver: str | None
) -> dict[str, Any]:
    return {
        "model": {
            "name": reg.name,
            "version": reg.version,
            "model_id": reg.tags.get(TAG_MODEL_ID),
            "sha256": reg.tags.get(TAG_MODEL_SHA256),
        },
        "artefacts_sha256": dict(sorted(reg.sha256.items())),
        "champion": dict(champion) if champion else None,
        "approver": approver,
    }


class _SameInputs:
    """Compares a record's inputs with ours, ignoring the champion."""

    def __init__(self, inputs: Mapping[str, Any], policy_sha256: str) -> None:
        self.inputs = {k: v for k, v in inputs.items() if k != "champion"}
        self.policy = policy_sha256

    def matches(self, record: Mapping[str, Any]) -> bool:
        theirs = {k: v for k, v in record["inputs"].items() if k != "champion"}
        return record["policy"]["sha256"] == self.policy and theirs == self.inputs


def _champion_of(
    client: Any, name: str, version: str, records: Mapping[str, Any], same: _SameInputs
) -> dict[str, Any] | None:
    """The champion the decision is taken against.

    When this version already is the champion, that is the champion of the passing record it
    came from (so a re-run finds the same verdict id), else ``{"self": True}``.
    """
    aliases = client.get_registered_model(name).aliases or {}
    current = aliases.get(CHAMPION_ALIAS)
    if current is None:
        return None
    current = str(current)
    if current == version:
        passing = [r for r in records.values() if r["verdict"] == PASS and same.matches(r)]
        if passing:
            return max(passing, key=lambda r: r["decided_at"])["inputs"]["champion"]
        return {"version": current, "self": True}
    found = client.get_model_version(name, current)
    return {"version": current, "model_id": found.tags.get(TAG_MODEL_ID)}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _set_tag_if_changed(client: Any, name: str, version: Any, key: str, value: str) -> bool:
    current = client.get_model_version(name, str(version)).tags.get(key)
    if current == value:
        return False
    client.set_model_version_tag(name, str(version), key, value)
    return True


def _move_champion(client: Any, reg: Registration, champion: Mapping | None) -> bool:
    """Move ``champion`` to this version unless it is there, or was moved back since.

    A champion that carries ``cta.gate.superseded_by`` = this version was replaced by this
    version before and moved back by hand (a rollback): a re-run of the same gate must not
    undo that.
    """
    aliases = client.get_registered_model(reg.name).aliases or {}
    current = aliases.get(CHAMPION_ALIAS)
    if current is None:
        client.set_registered_model_alias(reg.name, CHAMPION_ALIAS, reg.version)
        return True
    current = str(current)
    if current == reg.version or champion is None or champion.get("self"):
        return False
    previous = client.get_model_version(reg.name, current)
    if previous.tags.get(TAG_SUPERSEDED_BY) == reg.version:
        return False
    client.set_registered_model_alias(reg.name, CHAMPION_ALIAS, reg.version)
    client.set_model_version_tag(reg.name, current, TAG_SUPERSEDED_BY, reg.version)
    return True


def _notify_verdict(model_name: str, version: str, record: dict[str, Any]) -> None:
    """Webhook (``$CTA_WEBHOOK_URL``) for a new verdict; a re-run that changes nothing is quiet."""
    from components.notify import notify

    failed = [c["name"] for c in record["checks"] if not c["passed"]]
    notify(
        "gate_verdict",
        {
            "model_name": model_name,
            "version": version,
            "verdict": record["verdict"],
            "verdict_id": record["verdict_id"],
            "failed_checks": failed,
        },
    )


def run(
    model_name: str,
    version: str | int,
    policy_path: str | os.PathLike[str],
    tracking_uri: str | None = None,
    approver: str | None = None,
) -> dict[str, Any]:
    """Gate one registered version; returns the verdict.

    ``{verdict_id, verdict, checks, model, champion_before, champion_moved, record_uri,
    written, approver}``; ``written`` is False when the record already existed.
    """
    policy = load_policy(policy_path)
    policy_sha256 = policy.sha256()
    approver = (approver or "").strip() or None
    client = mlflow_client(tracking_uri)
    reg = read_registration(client, model_name, version)
    records = gate_records(client, reg)

    same_inputs = _SameInputs(_inputs(reg, None, approver), policy_sha256)
    champion = _champion_of(client, model_name, reg.version, records, same_inputs)
    inputs = _inputs(reg, champion, approver)
    verdict_id = _canonical_sha256({"policy_sha256": policy_sha256, "inputs": inputs})
    record = records.get(verdict_id)
    written = record is None
    if record is None:
        verdict, checks = evaluate_checks(policy, reg, champion, approver)
        decided_at = _now()
        record = {
            "schema_version": RECORD_VERSION,
            "verdict_id": verdict_id,
            "verdict": verdict,
            "model": inputs["model"],
            "policy": {
                "sha256": policy_sha256,
                "path": str(policy_path),
                "content": policy.model_dump(mode="json"),
            },
            "inputs": inputs,
            "checks": checks,
            "approver": {"name": approver, "time": decided_at} if approver else None,
            "decided_at": decided_at,
        }
        write_record(client, reg.run_id, reg.version, record)
        _notify_verdict(model_name, reg.version, record)

    record_uri = f"runs:/{reg.run_id}/{record_path(reg.version, verdict_id)}"
    changed = written
    for key, value in (
        (TAG_VERDICT, record["verdict"]),
        (TAG_VERDICT_ID, verdict_id),
        (TAG_POLICY, policy_sha256),
        (TAG_RECORD, record_uri),
    ):
        changed |= _set_tag_if_changed(client, model_name, reg.version, key, value)
    moved = record["verdict"] == PASS and _move_champion(client, reg, champion)
    if changed or moved:
        publish_card(client, model_name, reg.version)
    return {
        "verdict_id": verdict_id,
        "verdict": record["verdict"],
        "checks": record["checks"],
        "model": record["model"],
        "champion_before": champion,
        "champion_moved": moved,
        "record_uri": record_uri,
        "written": written,
        "approver": record["approver"],
    }


__all__ = ["FAIL", "PASS", "PENDING", "evaluate_checks", "run"]
