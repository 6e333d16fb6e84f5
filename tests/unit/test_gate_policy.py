"""The gate policy model and the checks it switches on, without a registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from components.gate.policy import GatePolicy, load_policy
from components.gate.step import FAIL, PASS, PENDING, evaluate_checks
from components.registry.attachments import Registration
from cta_cli.commands.gate import format_checks
from cta_model.errors import ConfigError

pytestmark = pytest.mark.unit


def _write(tmp_path: Path, data: Any, text: str | None = None) -> Path:
    path = tmp_path / "gate.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", ["configs/gate.yaml", "configs/gate-demo.yaml"])
def test_shipped_policies_load(path: str) -> None:
    policy = load_policy(path)
    assert policy.on_missing_input == "fail"


def test_strict_default_is_strict() -> None:
    policy = load_policy("configs/gate.yaml")
    assert policy.when_no_champion == "require_approval"
    assert policy.max_task_regression_pct == 2.0
    assert policy.delta_m is not None and policy.delta_m.min_pct == 0.0
    assert policy.roi is not None and policy.roi.min_p_roi_positive == 0.9
    assert policy.non_inferiority is not None and policy.non_inferiority.task_margins


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"delta_mm": {"min_pct": 0}}, r"gate\.yaml: delta_mm: unknown key"),
        ({"roi": {"min_p_roi_positive": 0.9, "scop": "pilot"}}, r"roi\.scop: unknown key"),
        (
            {"non_inferiority": {"task_margins": {"semseg": -0.01}}},
            r"non_inferiority\.task_margins: margin of 'semseg' must be >= 0",
        ),
        (
            {"non_inferiority": {"task_margins": {"semseg": "wide"}}},
            r"non_inferiority\.task_margins\.semseg: Input should be a valid number",
        ),
        (
            {"non_inferiority": {"task_margins": {"segm": 0.01}}},
            r"unknown task 'segm'",
        ),
        (
            {"non_inferiority": {"inspection": {"recall": -0.1}}},
            r"non_inferiority\.inspection\.recall: Input should be greater than or equal to 0",
        ),
        ({"absolute_minimums": {"semseg.iou": 0.5}}, r"unknown metric 'semseg\.iou'"),
        ({"roi": {"min_p_roi_positive": 1.5}}, r"roi\.min_p_roi_positive"),
        ({"roi": {"min_p_roi_positive": 0.9, "scope": "line"}}, r"roi\.scope"),
        ({"when_no_champion": "promote"}, r"when_no_champion"),
        ({"on_missing_input": "skip"}, r"on_missing_input"),
        ({"max_task_regression_pct": -2}, r"max_task_regression_pct"),
    ],
)
def test_bad_policies_name_the_file_and_key(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_policy(_write(tmp_path, data))


def test_duplicate_key_and_missing_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="given twice"):
        load_policy(_write(tmp_path, None, "delta_m: null\ndelta_m: null\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_policy(tmp_path / "absent.yaml")


def test_policy_digest_ignores_comments_and_key_order(tmp_path: Path) -> None:
    first = load_policy(
        _write(tmp_path, None, "# strict\nroi: {scope: fleet, min_p_roi_positive: 0.9}\n")
    )
    second = load_policy(_write(tmp_path, None, "roi: {min_p_roi_positive: 0.9, scope: fleet}\n"))
    third = load_policy(_write(tmp_path, None, "roi: {min_p_roi_positive: 0.8, scope: fleet}\n"))
    assert first.sha256() == second.sha256() != third.sha256()


# --------------------------------------------------------------------------- checks (pure)
def _registration(**overrides: Any) -> Registration:
    evaluation = {
        "model": {"tasks": ["semseg", "height"]},
        "overall": {"n_images": 4, "metrics": {"semseg.miou": 0.6, "height.abs_err_mm": 0.4}},
        "delta_m": {
            "delta_m_primary_pct_higher_better": 1.0,
            "per_task_pct": {"semseg": 1.0, "height": 1.0},
        },
        "vs_champion": None,
    }
    fields: dict[str, Any] = {
        "name": "m",
        "version": "2",
        "run_id": "r",
        "tags": {},
        "source": None,
        "evaluation": evaluation,
        "dataset_ref": {"passed": True, "manifest_sha256": "0" * 64},
        "roi": {"pilot": {"p_roi_positive": 0.95}, "fleet": {"p_roi_positive": None}},
    }
    fields.update(overrides)
    return Registration(**fields)


def _policy(**data: Any) -> GatePolicy:
    return GatePolicy.model_validate(data)


def test_minimums_follow_the_metric_direction() -> None:
    policy = _policy(
        absolute_minimums={"semseg.miou": 0.5, "height.abs_err_mm": 0.3}, when_no_champion="pass"
    )
    verdict, checks = evaluate_checks(policy, _registration(), None, None)
    by_name = {c["name"]: c for c in checks}
    assert verdict == FAIL
    assert by_name["minimum.semseg.miou"]["passed"]
    assert by_name["minimum.semseg.miou"]["threshold"] == ">= 0.5"
    # Lower is better for height: 0.4 mm is worse than the 0.3 mm limit.
    assert not by_name["minimum.height.abs_err_mm"]["passed"]
    assert by_name["minimum.height.abs_err_mm"]["threshold"] == "<= 0.3"


def test_a_missing_input_fails_with_its_reason() -> None:
    policy = _policy(roi={"min_p_roi_positive": 0.5, "scope": "fleet"}, when_no_champion="pass")
    verdict, checks = evaluate_checks(policy, _registration(), None, None)
    roi = next(c for c in checks if c["name"] == "roi.p_roi_positive.fleet")
    assert verdict == FAIL and roi["value"] is None and not roi["passed"]
    assert "fleet.p_roi_positive is null" in roi["detail"]
    verdict, checks = evaluate_checks(policy, _registration(roi=None), None, None)
    assert verdict == FAIL and "no roi.json attached" in checks[-2]["detail"]


def test_a_champion_without_comparison_fails_non_inferiority() -> None:
    policy = _policy(non_inferiority={"task_margins": {"semseg": 0.01}})
    champion = {"version": "1", "model_id": "m-1"}
    verdict, checks = evaluate_checks(policy, _registration(), champion, None)
    assert verdict == FAIL
    assert checks[1]["name"] == "non_inferiority.semseg.miou"
    assert "evaluation.json has no vs_champion" in checks[1]["detail"]


@pytest.mark.parametrize(("margin", "verdict"), [(0.05, FAIL), (0.051, PASS)])
def test_non_inferiority_passes_when_p05_is_above_minus_the_margin(
    margin: float, verdict: str
) -> None:
    champion = {"version": "1", "model_id": "m-1"}
    registration = _registration()
    registration.evaluation["vs_champion"] = {
        "version": "1",
        "model_id": "m-1",
        "metrics": {"semseg": {"metric": "miou", "p05": -0.05, "p50": 0.0, "p95": 0.01}},
    }
    policy = _policy(non_inferiority={"task_margins": {"semseg": margin}})
    assert evaluate_checks(policy, registration, champion, None)[0] == verdict


def test_approval_makes_a_passing_version_pending_not_a_failing_one() -> None:
    policy = _policy(approval={"required": True}, when_no_champion="pass")
    verdict, _ = evaluate_checks(policy, _registration(), None, None)
    assert verdict == PENDING
    verdict, _ = evaluate_checks(policy, _registration(), None, "bob")
    assert verdict == PASS
    failing = _registration(dataset_ref={"passed": False, "manifest_sha256": "0" * 64})
    verdict, _ = evaluate_checks(policy, failing, None, None)
    assert verdict == FAIL


def test_check_table_lists_every_check() -> None:
    policy = _policy(delta_m={"min_pct": 2.0}, when_no_champion="pass")
    _, checks = evaluate_checks(policy, _registration(), None, None)
    table = format_checks(checks).splitlines()
    assert table[0].split() == ["result", "check", "value", "threshold", "detail"]
    assert table[2].startswith("FAIL") and "delta_m.primary" in table[2] and ">= 2.0" in table[2]
    assert len(table) == 1 + len(checks)
