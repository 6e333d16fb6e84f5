"""The promotion gate against the session's real `mlflow server`.

Versions are registered with register_model.step.run() from LoggedModels of the tiny model
folder, with contract-shaped evaluation.json / roi.json / dataset_ref.json written here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from components.gate.step import FAIL, PASS, PENDING
from components.gate.step import run as gate
from components.register_model.step import run as register
from components.registry.names import (
    CHAMPION_ALIAS,
    TAG_POLICY,
    TAG_RECORD,
    TAG_SUPERSEDED_BY,
    TAG_VERDICT,
)
from components.train.logged_model import log_model_folder
from cta_cli.commands.gate import gate as gate_command
from cta_model.errors import DataError
from cta_model.model_folder import folder_sha256

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_mlflow_globals")]

MANIFEST = "ab" * 32
LINES = ("press-a", "mill-c")


# ----------------------------------------------------------------- contract-shaped artefacts
def _scored(n_images: int, *, height: bool = True, miou: float = 0.7) -> dict[str, Any]:
    metrics = {
        "semseg.miou": miou,
        "semseg.pixel_acc": 0.9,
        "height.abs_err_mm": 0.2 if height else None,
        "height.rmse_mm": 0.3 if height else None,
        "normals.mean": 8.0 if height else None,
    }
    return {
        "n_images": n_images,
        "n_defective": n_images // 2,
        "metrics": metrics,
        "inspection": inspection_entry(n_images // 2, n_images - n_images // 2),
        "dimensions": {"n_features": 4, "mae_mm": 0.05, "p95_mm": 0.1, "in_tol_acc": 0.97}
        if height
        else None,
        "robustness": {
            "boundary": {"semseg.miou": miou - 0.1},
            "dropout": {"height.abs_err_mm": 0.25 if height else None},
        },
    }


def inspection_entry(n_defective: int, n_good: int, recall: float = 0.96, frr: float = 0.04):
    """An evaluation.json ``inspection`` entry (schema version 2) with every field."""
    return {
        "threshold": 0.42,
        "target_recall": 0.95,
        "threshold_choice": {
            "split": "val",
            "reached": True,
            "recall": 0.96,
            "n_defective": n_defective,
            "n_good": n_good,
            "reason": None,
        },
        "recall": recall,
        "frr": frr,
        "n_defective": n_defective,
        "n_good": n_good,
        "intervals": {
            "recall": {"p05": recall - 0.05, "p50": recall, "p95": min(1.0, recall + 0.03)},
            "frr": {"p05": max(0.0, frr - 0.03), "p50": frr, "p95": frr + 0.05},
            "image_auroc": {"p05": 0.95, "p50": 0.98, "p95": 0.99},
        },
        "image_auroc": 0.98,
        "image_ap": 0.97,
        "f1_max_oracle": {"f1": 0.93, "threshold": 0.4, "note": "oracle figure"},
        "pixel_auroc": 0.97,
        "aupro": 0.88,
        "per_class": {
            "scratch": {
                "class_id": 5,
                "n_images": n_defective,
                "recall": recall,
                "image_auroc": 0.97,
                "image_ap": 0.96,
                "pixel_auroc": 0.96,
                "aupro": 0.85,
                "n_regions": n_defective,
            }
        },
        "parts": None,
        "pr_curve": {
            "threshold": [0.1, 0.42],
            "recall": [0.99, recall],
            "precision": [0.6, 0.8],
            "frr": [0.2, frr],
        },
        "warnings": [],
    }


def make_evaluation(
    model_id: str,
    sha256: str,
    *,
    champion: dict[str, str] | None = None,
    semseg_p05: float = 0.01,
    recall_p05: float = 0.0,
    auroc_p05: float = 0.0,
    delta_m: dict[str, Any] | None | str = "good",
    height_pct: float = 1.0,
) -> dict[str, Any]:
    """An evaluation.json as the evaluate step writes it (contracts.md), 2 lines, 3 tasks."""
    per_line = {LINES[0]: _scored(6), LINES[1]: _scored(6, height=False)}
    evaluation: dict[str, Any] = {
        "schema_version": 2,
        "model": {
            "name": None,
            "version": None,
            "model_id": model_id,
            "sha256": sha256,
            "tasks": ["semseg", "height", "normals"],
        },
        "data": {
            "uri": "/data/lines",
            "manifest_sha256": MANIFEST,
            "split": "test",
            "dvc_rev": None,
            "quarantine_skipped": 0,
        },
        "metric_settings": {"reduction": "pooled", "miou_rule": "nanmean_union"},
        "per_line": per_line,
        "overall": _scored(12),
        "warnings": [],
        "delta_m": None,
        "delta_m_reason": "no STL baseline registered for manifest " + MANIFEST[:12],
        "vs_champion": None,
        "vs_champion_reason": "no champion",
        "bootstrap": {
            "unit": "image",
            "n": 1000,
            "seed": 0,
            "replicates": {line: {"recall": [0.96] * 1000, "frr": [0.04] * 1000} for line in LINES},
        },
        "latency": {
            "device": "cpu",
            "batch": 1,
            "image_size": [32, 32],
            "p50_ms": 5.0,
            "p95_ms": 7.0,
            "images_per_s": 190.0,
            "stl": None,
        },
        "explain": {"affinity_maps": [], "pixels": [[8, 8]]},
    }
    if delta_m == "good":
        evaluation["delta_m"] = {
            "delta_m_primary_pct_higher_better": 1.5,
            "delta_m_task_avg_pct_higher_better": 1.2,
            "delta_m_all_metrics_pct_lower_better": -1.1,
            "per_task_pct": {"semseg": 2.0, "height": height_pct, "normals": 0.5},
            "baselines": {
                task: {"name": f"cta-stl-{task}", "version": "1", "metrics": {}}
                for task in ("semseg", "height", "normals")
            },
        }
        evaluation["delta_m_reason"] = None
    if champion is not None:
        evaluation["vs_champion"] = {
            "name": champion["name"],
            "version": champion["version"],
            "model_id": champion["model_id"],
            "metrics": {
                "semseg": {
                    "metric": "miou",
                    "candidate": 0.7,
                    "champion": 0.69,
                    "diff_higher_better": 0.01,
                    "p05": semseg_p05,
                    "p50": semseg_p05 + 0.01,
                    "p95": semseg_p05 + 0.02,
                },
                "height": {
                    "metric": "abs_err_mm",
                    "candidate": 0.2,
                    "champion": 0.21,
                    "diff_higher_better": 0.01,
                    "p05": 0.0,
                    "p50": 0.01,
                    "p95": 0.02,
                },
            },
            "inspection": {
                "recall": {"p05": recall_p05, "p50": recall_p05 + 0.01, "p95": 0.03},
                "frr": {"p05": 0.0, "p50": 0.01, "p95": 0.02},
                "image_auroc": {"p05": auroc_p05, "p50": auroc_p05 + 0.005, "p95": 0.01},
            },
        }
        evaluation["vs_champion_reason"] = None
    return evaluation


def _roi_entry(p_roi_positive: float) -> dict[str, Any]:
    return {
        "annual_saving": 120000.0,
        "investment": 80000.0,
        "payback_months": 8.0,
        "payback_label": "8.0 months",
        "npv": 230000.0,
        "roi_pct_undiscounted": 350.0,
        "p_roi_positive": p_roi_positive,
        "roi_pct_p10": 120.0,
        "roi_pct_p50": 340.0,
        "roi_pct_p90": 520.0,
        "cost_current": 300000.0,
        "cost_model": 180000.0,
        "inputs": {},
    }


def make_roi(p_roi_positive: float = 0.97) -> dict[str, Any]:
    """A roi.json as roi_report writes it (contracts.md)."""
    return {
        "schema_version": 1,
        "currency": "EUR",
        "horizon_years": 3,
        "discount_rate": 0.08,
        "pilot_line": LINES[0],
        "per_line": {line: _roi_entry(p_roi_positive) for line in LINES},
        "pilot": _roi_entry(p_roi_positive),
        "fleet": _roi_entry(p_roi_positive),
        "multitask_vs_stl": {
            "n_tasks": 3,
            "latency_ratio": 0.4,
            "latency_ratio_source": "measured",
            "per_line": {},
            "fleet": {"cost_multitask": 1.0, "cost_stl": 2.0, "annual_saving_of_multitask": 1.0},
        },
        "tornado": [],
        "formulas": {},
    }


def make_dataset_ref(passed: bool = True) -> dict[str, Any]:
    return {
        "uri": "/data/lines",
        "manifest_sha256": MANIFEST,
        "dvc_rev": None,
        "passed": passed,
        "quarantine": [],
    }


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def logged_models(
    tiny_model_dir: Path, mlflow_server: str
) -> tuple[list[str], str]:  # (model ids, folder sha256)
    """Five LoggedModels of the tiny folder: 0-2 for one registered model, 3-4 for another.

    Never one LoggedModel under two names: both would attach to ``registration/v<N>/`` of the
    same source run.
    """
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment(f"cta-gate-{uuid.uuid4().hex[:8]}")
    ids = []
    for _ in range(5):
        with mlflow.start_run():
            ids.append(log_model_folder(tiny_model_dir).model_id)
    return ids, folder_sha256(tiny_model_dir)


Registrar = Callable[..., str]


@pytest.fixture(scope="module")
def register_version(
    logged_models: tuple[list[str], str],
    mlflow_server: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Registrar:
    """register(name, index, evaluation=..., roi=..., dataset_ref=...) -> version."""
    ids, sha = logged_models
    tmp_path = tmp_path_factory.mktemp("registrations")

    def _register(
        name: str,
        index: int,
        *,
        evaluation: dict[str, Any] | None = None,
        roi: dict[str, Any] | None = None,
        dataset_ref: dict[str, Any] | None = None,
    ) -> str:
        folder = tmp_path / f"{name}-{index}"
        folder.mkdir()
        files = {
            "evaluation": evaluation or make_evaluation(ids[index], sha),
            "roi": roi or make_roi(),
            "dataset_ref": dataset_ref or make_dataset_ref(),
        }
        paths = {}
        for key, data in files.items():
            paths[key] = folder / f"{key}.json"
            paths[key].write_text(json.dumps(data))
        result = register(
            ids[index],
            name,
            evaluation=str(paths["evaluation"]),
            dataset_ref=str(paths["dataset_ref"]),
            roi=str(paths["roi"]),
            tracking_uri=mlflow_server,
        )
        return result["version"]

    return _register


def base_policy(**overrides: Any) -> dict[str, Any]:
    """A policy with every check on, which the good artefacts above pass."""
    policy: dict[str, Any] = {
        "schema_version": 1,
        "data_validation": {"required": True},
        "absolute_minimums": {"semseg.miou": 0.5, "height.abs_err_mm": 0.5},
        "non_inferiority": {
            "task_margins": {"semseg": 0.02, "height": 0.05},
            "inspection": {"recall": 0.01, "frr": 0.01},
        },
        "max_task_regression_pct": 2.0,
        "delta_m": {"min_pct": 0.0},
        "roi": {"min_p_roi_positive": 0.9, "scope": "pilot"},
        "approval": {"required": False},
        "when_no_champion": "require_approval",
    }
    policy.update(overrides)
    return policy


def write_policy(folder: Path, policy: dict[str, Any]) -> Path:
    path = folder / f"policy-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _champion(client: MlflowClient, name: str) -> str | None:
    version = (client.get_registered_model(name).aliases or {}).get(CHAMPION_ALIAS)
    return None if version is None else str(version)


def _records(client: MlflowClient, name: str, version: str) -> list[str]:
    run_id = client.get_model_version(name, version).tags[TAG_RECORD].split("/")[1]
    return sorted(info.path for info in client.list_artifacts(run_id, f"gate/v{version}"))


def _by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in result["checks"]}


def _json_of(output: str) -> dict[str, Any]:
    lines = output.splitlines()
    return json.loads("\n".join(lines[lines.index("{") :]))


# ------------------------------------------------------------------------------------ tests
def test_first_champion_needs_an_approver_then_the_next_version_replaces_it(
    register_version: Registrar,
    logged_models: tuple[list[str], str],
    mlflow_server: str,
    tmp_path: Path,
) -> None:
    ids, sha = logged_models
    name = f"cta-gate-{uuid.uuid4().hex[:8]}"
    client = _client(mlflow_server)
    policy = write_policy(tmp_path, base_policy())
    v1 = register_version(name, 0)

    # No champion and when_no_champion: require_approval -> pending, exit code 4.
    args = ["--model-name", name, "--version", v1, "--policy", str(policy)]
    pending = CliRunner().invoke(gate_command, [*args, "--tracking-uri", mlflow_server])
    assert pending.exit_code == 4, pending.output
    assert any(
        line.startswith("FAIL") and " approval " in line for line in pending.output.splitlines()
    )
    assert _json_of(pending.output)["verdict"] == PENDING
    assert _champion(client, name) is None
    assert client.get_model_version(name, v1).tags[TAG_VERDICT] == PENDING

    approved = gate(name, v1, policy, tracking_uri=mlflow_server, approver="alice")
    assert approved["verdict"] == PASS and approved["champion_moved"]
    assert approved["approver"]["name"] == "alice" and approved["approver"]["time"]
    assert _by_name(approved)["approval"] == {
        "name": "approval",
        "passed": True,
        "value": "alice",
        "threshold": "a named approver",
        "detail": "no champion yet (when_no_champion: require_approval); approved by alice",
    }
    # Non-inferiority has nothing to compare with: not among the checks.
    assert not [c for c in approved["checks"] if c["name"].startswith("non_inferiority")]
    assert _champion(client, name) == v1
    assert len(_records(client, name, v1)) == 2  # pending + pass, both kept

    again = gate(name, v1, policy, tracking_uri=mlflow_server, approver="alice")
    assert again["verdict_id"] == approved["verdict_id"]
    assert not again["written"] and not again["champion_moved"]
    assert len(_records(client, name, v1)) == 2

    # Version 2 was evaluated against the champion (v1) and is non-inferior.
    champion = {"name": name, "version": v1, "model_id": ids[0]}
    v2 = register_version(name, 1, evaluation=make_evaluation(ids[1], sha, champion=champion))
    promoted = gate(name, v2, policy, tracking_uri=mlflow_server)
    assert promoted["verdict"] == PASS, promoted["checks"]
    assert promoted["champion_moved"] and promoted["champion_before"]["version"] == v1
    checks = _by_name(promoted)
    assert checks["non_inferiority.semseg.miou"]["value"] == pytest.approx(0.01)
    assert checks["non_inferiority.semseg.miou"]["threshold"] == "p05 > -0.02"
    assert checks["roi.p_roi_positive.pilot"]["value"] == pytest.approx(0.97)
    assert {"task_floor.semseg", "task_floor.height", "task_floor.normals"} <= set(checks)
    assert all(check["passed"] for check in promoted["checks"])

    assert _champion(client, name) == v2
    tags = client.get_model_version(name, v2).tags
    assert tags[TAG_VERDICT] == PASS and tags["cta.gate.verdict_id"] == promoted["verdict_id"]
    assert tags[TAG_RECORD] == promoted["record_uri"]
    assert tags[TAG_RECORD].endswith(f"gate/v{v2}/{promoted['verdict_id']}.json")
    assert len(tags[TAG_POLICY]) == 64
    assert client.get_model_version(name, v1).tags[TAG_SUPERSEDED_BY] == v2
    # The audit record is the decision itself, with the policy and the inputs it was made on.
    run_id = tags[TAG_RECORD].split("/")[1]
    local = client.download_artifacts(run_id, f"gate/v{v2}/{promoted['verdict_id']}.json", None)
    record = json.loads(Path(local).read_text())
    assert record["verdict"] == PASS and record["checks"] == promoted["checks"]
    assert record["inputs"]["champion"] == {"version": v1, "model_id": ids[0]}
    assert record["policy"]["sha256"] == tags[TAG_POLICY]

    # Twice: same verdict id, no new record, alias not moved again.
    result = CliRunner().invoke(
        gate_command,
        ["--model-name", name, "--version", v2, "--policy", str(policy)]
        + ["--tracking-uri", mlflow_server],
    )
    assert result.exit_code == 0, result.output
    assert "recorded before; nothing changed" in result.output
    second = _json_of(result.output)
    assert second["verdict_id"] == promoted["verdict_id"] and not second["champion_moved"]
    assert _records(client, name, v2) == [f"gate/v{v2}/{promoted['verdict_id']}.json"]
    assert client.get_model_version(name, v1).tags[TAG_SUPERSEDED_BY] == v2

    # Version 3 was compared with v1, which is no longer the champion, and hides a task 5 %
    # worse than its STL baseline behind a good average.
    v3 = register_version(
        name, 2, evaluation=make_evaluation(ids[2], sha, champion=champion, height_pct=-5.0)
    )
    result = CliRunner().invoke(
        gate_command,
        ["--model-name", name, "--version", v3, "--policy", str(policy)]
        + ["--tracking-uri", mlflow_server],
    )
    assert result.exit_code == 3, result.output
    stale = _json_of(result.output)
    checks = _by_name(stale)
    assert stale["verdict"] == FAIL
    assert checks["non_inferiority.semseg.miou"]["value"] is None
    assert f"but the champion is version {v2}" in checks["non_inferiority.semseg.miou"]["detail"]
    assert checks["task_floor.height"] == {
        "name": "task_floor.height",
        "passed": False,
        "value": -5.0,
        "threshold": ">= -2.0",
        "detail": "% vs STL baseline of height (higher = better)",
    }
    assert checks["task_floor.semseg"]["passed"] and checks["delta_m.primary"]["passed"]

    # A champion moved back by hand (rollback) is not re-promoted by re-running the same gate.
    client.set_registered_model_alias(name, CHAMPION_ALIAS, v1)
    rerun = gate(name, v2, policy, tracking_uri=mlflow_server)
    assert rerun["verdict_id"] == promoted["verdict_id"] and not rerun["champion_moved"]
    assert _champion(client, name) == v1


@pytest.fixture(scope="module")
def weak_candidate(
    register_version: Registrar,
    logged_models: tuple[list[str], str],
    mlflow_server: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, str, str]:
    """(name, champion v1, weak v2): v2 fails a different check under each policy below.

    Shared by the tests below, which therefore never move its champion.
    """
    ids, sha = logged_models
    tmp_path = tmp_path_factory.mktemp("weak")
    name = f"cta-gate-fail-{uuid.uuid4().hex[:8]}"
    v1 = register_version(name, 3)
    first = gate(
        name,
        v1,
        write_policy(tmp_path, base_policy(when_no_champion="pass")),
        tracking_uri=mlflow_server,
    )
    assert first["verdict"] == PASS and _by_name(first)["champion"]["passed"]
    champion = {"name": name, "version": v1, "model_id": ids[3]}
    weak = make_evaluation(
        ids[4],
        sha,
        champion=champion,
        semseg_p05=-0.05,
        recall_p05=-0.03,
        auroc_p05=-0.04,
        delta_m=None,
    )
    v2 = register_version(
        name, 4, evaluation=weak, roi=make_roi(0.4), dataset_ref=make_dataset_ref(passed=False)
    )
    return name, v1, v2


OFF = {
    "data_validation": None,
    "absolute_minimums": {},
    "non_inferiority": None,
    "max_task_regression_pct": None,
    "delta_m": None,
    "roi": None,
}

FAIL_CASES = [
    pytest.param(
        {"non_inferiority": {"task_margins": {"semseg": 0.02}}},
        "non_inferiority.semseg.miou",
        -0.05,
        "p05 > -0.02",
        id="non-inferiority-below-margin",
    ),
    pytest.param(
        {"non_inferiority": {"inspection": {"recall": 0.01}}},
        "non_inferiority.inspection.recall",
        -0.03,
        "p05 > -0.01",
        id="inspection-recall-below-margin",
    ),
    pytest.param(
        {"non_inferiority": {"inspection": {"image_auroc": 0.02}}},
        "non_inferiority.inspection.image_auroc",
        -0.04,
        "p05 > -0.02",
        id="inspection-image-auroc-below-margin",
    ),
    pytest.param(
        {"delta_m": {"min_pct": 0.0}},
        "delta_m.primary",
        None,
        ">= 0.0",
        id="delta-m-null",
    ),
    pytest.param(
        {"max_task_regression_pct": 2.0},
        "task_floor",
        None,
        ">= -2.0",
        id="floor-without-stl",
    ),
    pytest.param(
        {"data_validation": {"required": True}},
        "data_validation",
        False,
        True,
        id="data-not-validated",
    ),
    pytest.param(
        {"roi": {"min_p_roi_positive": 0.9}},
        "roi.p_roi_positive.pilot",
        0.4,
        ">= 0.9",
        id="p-roi-low",
    ),
]


@pytest.mark.parametrize(("switch_on", "check", "value", "threshold"), FAIL_CASES)
def test_each_check_fails_the_weak_candidate(
    weak_candidate: tuple[str, str, str],
    mlflow_server: str,
    tmp_path: Path,
    switch_on: dict[str, Any],
    check: str,
    value: Any,
    threshold: Any,
) -> None:
    name, v1, v2 = weak_candidate
    policy = write_policy(tmp_path, base_policy(**{**OFF, **switch_on}, when_no_champion="pass"))
    result = gate(name, v2, policy, tracking_uri=mlflow_server)
    assert result["verdict"] == FAIL
    failed = [c for c in result["checks"] if not c["passed"]]
    assert [c["name"] for c in failed] == [check]
    assert failed[0]["value"] == (pytest.approx(value) if isinstance(value, float) else value)
    assert failed[0]["threshold"] == threshold
    if value is None:  # a missing input fails with its reason
        assert "no STL baseline registered" in failed[0]["detail"]
    assert _champion(_client(mlflow_server), name) == v1
    assert _client(mlflow_server).get_model_version(name, v2).tags[TAG_VERDICT] == FAIL


def test_approval_required_keeps_the_champion(
    weak_candidate: tuple[str, str, str], mlflow_server: str, tmp_path: Path
) -> None:
    name, v1, v2 = weak_candidate
    approval = write_policy(tmp_path, base_policy(**{**OFF, "approval": {"required": True}}))
    result = CliRunner().invoke(
        gate_command,
        ["--model-name", name, "--version", v2, "--policy", str(approval)]
        + ["--tracking-uri", mlflow_server],
    )
    assert result.exit_code == 4, result.output
    pending = _json_of(result.output)
    assert pending["verdict"] == PENDING and not pending["champion_moved"]
    assert _by_name(pending)["approval"]["detail"] == "policy approval.required"
    assert _champion(_client(mlflow_server), name) == v1
    assert _client(mlflow_server).get_model_version(name, v2).tags[TAG_VERDICT] == PENDING


def test_incomplete_registration_is_refused(
    logged_models: tuple[list[str], str], mlflow_server: str, tmp_path: Path
) -> None:
    ids, _ = logged_models
    client = _client(mlflow_server)
    name = f"cta-gate-half-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    logged = client.get_logged_model(ids[0])
    half = client.create_model_version(
        name, logged.artifact_location, run_id=logged.source_run_id, model_id=ids[0]
    )
    policy = write_policy(tmp_path, base_policy(**OFF, when_no_champion="pass"))
    with pytest.raises(DataError, match="registration not complete"):
        gate(name, str(half.version), policy, tracking_uri=mlflow_server)
    assert _champion(client, name) is None
    assert TAG_VERDICT not in client.get_model_version(name, str(half.version)).tags
