"""The gate component through kfp.local: a tiny pipeline gates a step on its string output."""

import json
import warnings
from pathlib import Path

import mlflow
import pytest
import yaml
from kfp import dsl, local

from components.gate.component import gate
from components.image import PROJECT_IMAGE
from components.register_model.step import run as register
from components.train.logged_model import log_model_folder
from components.train.tracking import get_or_create_experiment
from cta_model.model_folder import folder_sha256, save_model_folder
from cta_model.nn.models import ModelSpec, build_model

pytestmark = pytest.mark.e2e

PROMOTED_TASK = "announce-promotion"


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def announce_promotion(verdict: str) -> str:
    return f"promoted ({verdict})"


@dsl.pipeline(name="gate-only")
def gate_only(model_name: str, version: str, policy_path: str, tracking_uri: str) -> str:
    verdict = gate(
        model_name=model_name,
        version=version,
        policy_path=policy_path,
        tracking_uri=tracking_uri,
        approver="",
    )
    with dsl.If(verdict.output == "pass", name="passed"):
        announce_promotion(verdict=verdict.output).set_display_name(PROMOTED_TASK)
    return verdict.output


@pytest.fixture
def registered(tmp_path: Path) -> tuple[str, str, str]:
    """(tracking URI, model name, version 1) in a sqlite store, registered with its files."""
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    (tmp_path / "mlflow").mkdir()
    spec = ModelSpec(
        arch="ctal",
        tasks=("semseg", "height", "normals"),
        input_size=(32, 32),
        backbone="resnet18",
        output_stride=8,
        num_classes=10,
    )
    folder = save_model_folder(build_model(spec), tmp_path / "model")
    mlflow.set_tracking_uri(uri)
    experiment_id = get_or_create_experiment("cta-gate-e2e", uri)
    try:
        with mlflow.start_run(experiment_id=experiment_id):
            model_id = log_model_folder(folder).model_id
    finally:
        mlflow.set_tracking_uri(None)
    ref = {
        "uri": "/data",
        "manifest_sha256": "cd" * 32,
        "dvc_rev": None,
        "passed": True,
        "quarantine": [],
    }
    metrics = {"semseg.miou": 0.6, "height.abs_err_mm": 0.3}
    evaluation = {
        "schema_version": 2,
        "model": {
            "name": None,
            "version": None,
            "model_id": model_id,
            "sha256": folder_sha256(folder),
            "tasks": ["semseg", "height"],
        },
        "data": {"uri": "/data", "manifest_sha256": "cd" * 32, "split": "test"},
        "per_line": {"press-a": {"n_images": 4, "metrics": metrics}},
        "overall": {"n_images": 4, "metrics": metrics},
        "warnings": [],
        "delta_m": None,
        "delta_m_reason": "no STL baselines",
    }
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    (tmp_path / "evaluation.json").write_text(json.dumps(evaluation))
    result = register(
        model_id,
        "cta-e2e-gate",
        evaluation=str(tmp_path / "evaluation.json"),
        dataset_ref=str(tmp_path / "ref.json"),
        tracking_uri=uri,
    )
    return uri, "cta-e2e-gate", result["version"]


def _run(tmp_path: Path, policy: dict, uri: str, name: str, version: str) -> tuple[str, Path]:
    policy_path = tmp_path / f"policy-{len(list(tmp_path.glob('policy-*')))}.yaml"
    policy_path.write_text(yaml.safe_dump(policy))
    root = tmp_path / "kfp"
    root.mkdir(exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True
    )
    before = set(root.iterdir())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        task = gate_only(
            model_name=name, version=version, policy_path=str(policy_path), tracking_uri=uri
        )
    (run_dir,) = set(root.iterdir()) - before
    return task.output, run_dir


def test_gate_component_returns_the_verdict_and_gates_the_next_step(
    registered: tuple[str, str, str], tmp_path: Path
) -> None:
    uri, name, version = registered
    strict = {"delta_m": {"min_pct": 0.0}, "when_no_champion": "pass"}
    verdict, run_dir = _run(tmp_path, strict, uri, name, version)
    assert verdict == "fail"  # delta_m is null: the check fails with its reason
    assert not (run_dir / PROMOTED_TASK).exists()

    loose = {"absolute_minimums": {"semseg.miou": 0.5}, "when_no_champion": "pass"}
    verdict, run_dir = _run(tmp_path, loose, uri, name, version)
    assert verdict == "pass"
    assert (run_dir / PROMOTED_TASK / "executor_output.json").is_file()
    client = mlflow.MlflowClient(uri)
    assert str(client.get_model_version_by_alias(name, "champion").version) == version
