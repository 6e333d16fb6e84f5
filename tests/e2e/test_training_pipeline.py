"""The training pipeline through kfp.local, driven by `cta retrain --local`.

1. No champion yet: the retrain trigger runs the whole pipeline; the steps hand each other
   KFP artefacts (dataset, model, evaluation, roi); the STL baselines are trained, the model is
   trained, evaluated, priced, registered, passes a permissive
   gate and wave 1 of the roll-out starts a line server for the pilot line.
2. The same data again: the trigger skips, saying the data is the champion's.
3. Broken data: validation fails and every later step is skipped.

Reused baselines are tests/e2e/test_baselines_branch.py's; a failing gate skipping the roll-out
is the compiled IR's (tests/unit/test_pipeline_compile.py) and the gate component's
(tests/e2e/test_gate_component.py): a third whole run here would only repeat them.
"""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from pipeline_inputs import PERMISSIVE_GATE, pilot_shadow_plan, write_tiny_config

from cta_cli.commands.retrain import retrain
from cta_model.data.line_dataset import MANIFEST_NAME
from cta_model.data.synthetic_dataset import generate_dataset
from pipelines.run import run_local
from pipelines.summary import summary_lines
from pipelines.training import (
    EVALUATE_TASK,
    GATE_TASK,
    REGISTER_TASK,
    ROI_TASK,
    ROLLOUT_TASK,
    TRAIN_BASELINES_TASK,
    TRAIN_TASK,
    VALIDATE_TASK,
)

pytestmark = pytest.mark.e2e

ROLLOUT_PLAN = pilot_shadow_plan("e2e")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline") / "data"
    return generate_dataset(
        root, n_lines=2, samples_per_line=10, height=32, width=32, seed=0, progress=False
    )


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    return write_tiny_config(tmp_path_factory.mktemp("config") / "train.yaml")


def _corrupt_one_png(root: Path) -> str:
    row = pq.read_table(root / MANIFEST_NAME).to_pylist()[3]
    image = root / row["image_path"]
    image.write_bytes(image.read_bytes()[:40])  # truncated: not a readable PNG any more
    return row["sample_id"]


def _retrain(data_root, work, config_path, tracking_uri, *extra) -> dict:
    result = CliRunner().invoke(
        retrain,
        [
            "--data", str(data_root), "--tracking-uri", tracking_uri, "--local",
            "--work-dir", str(work), "--config", str(config_path), *extra,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # The decision is printed last; kfp.local's own logs come before it.
    return json.loads(result.output[result.output.rindex('{\n  "action"') :])


def _artifact(run_dir: str, task: str, name: str) -> dict:
    """The output artefact ``name`` of ``task`` as kfp.local recorded it (uri, metadata)."""
    executor_output = json.loads((Path(run_dir) / task / "executor_output.json").read_text())
    (artifact,) = executor_output["artifacts"][name]["artifacts"]
    return artifact


def _states(run_dir: str) -> dict:
    from pipelines.run import TASKS, task_result

    return {task: task_result(run_dir, task) for task in TASKS}


def test_retrain_runs_the_whole_pipeline_then_skips_unchanged_data(
    data_root, config_path, tmp_path, monkeypatch
):
    import mlflow

    from components.rollout.engine import status, stop_all
    from components.rollout.state import open_store

    state_uri = str(tmp_path / "rollout")
    monkeypatch.setenv("CTA_ROLLOUT_STATE", state_uri)
    monkeypatch.delenv("CTA_WEBHOOK_URL", raising=False)
    policy = tmp_path / "gate.yaml"
    policy.write_text(yaml.safe_dump(PERMISSIVE_GATE))
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(ROLLOUT_PLAN))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri)
    work = tmp_path / "work"
    chosen = ("--gate-policy", str(policy), "--rollout-plan", str(plan))
    try:
        first = _retrain(data_root, work, config_path, tracking_uri, *chosen)
        assert first["action"] == "run" and "no champion" in first["reason"]
        tasks = _states(first["run_dir"])
        assert tasks[VALIDATE_TASK]["outputs"] == {"Output": True}
        for ran in (TRAIN_BASELINES_TASK, TRAIN_TASK, EVALUATE_TASK, ROI_TASK, REGISTER_TASK):
            assert tasks[ran]["state"] == "ran", ran
        assert set(tasks[TRAIN_BASELINES_TASK]["outputs"]["Output"].split(",")) == {
            "semseg",
            "height",
            "normals",
        }
        model_id = tasks[TRAIN_TASK]["outputs"]["Output"]
        # Every hand-over is an artefact under the pipeline root, none under a shared work dir.
        run_dir = Path(first["run_dir"])
        for task in (VALIDATE_TASK, TRAIN_TASK, EVALUATE_TASK, ROI_TASK):
            for path in tasks[task]["artifacts"].values():
                assert Path(path).is_relative_to(run_dir), (task, path)
        dataset = Path(tasks[VALIDATE_TASK]["artifacts"]["dataset"])
        dataset_ref = json.loads((dataset / "dataset_ref.json").read_text())
        assert dataset_ref["passed"] is True and dataset_ref["uri"] == str(data_root.resolve())
        assert _artifact(first["run_dir"], VALIDATE_TASK, "dataset")["metadata"] == {
            "uri": dataset_ref["uri"],
            "manifest_sha256": dataset_ref["manifest_sha256"],
        }
        model = _artifact(first["run_dir"], TRAIN_TASK, "model")
        assert model["metadata"]["model_id"] == model_id
        assert (Path(model["uri"]) / "model" / "SHA256SUMS").is_file()
        assert not (Path(model["uri"]) / "checkpoints").exists()  # the model, not resume state
        evaluated = Path(tasks[EVALUATE_TASK]["artifacts"]["evaluation"])
        evaluation = json.loads((evaluated / "evaluation.json").read_text())
        assert evaluation["model"]["model_id"] == model_id
        # evaluate fetched the LoggedModel train logged: the same folder, byte for byte.
        from cta_model.model_folder import folder_sha256

        assert evaluation["model"]["sha256"] == folder_sha256(Path(model["uri"]) / "model")
        assert evaluation["delta_m"] is not None  # the baselines just trained were found
        roi_dir = Path(tasks[ROI_TASK]["artifacts"]["roi"])
        # What the KFP UI shows: the evaluate step's Metrics, the ROI report as HTML + Markdown.
        metrics = _artifact(first["run_dir"], EVALUATE_TASK, "metrics")
        assert metrics["metadata"]["semseg.miou"] == evaluation["overall"]["metrics"]["semseg.miou"]
        confusion = _artifact(first["run_dir"], EVALUATE_TASK, "confusion")["metadata"]
        matrix = confusion["confusionMatrix"]
        assert [c["displayName"] for c in matrix["annotationSpecs"]] == ["good", "defective"]
        counts = [row["row"] for row in matrix["rows"]]
        inspection = evaluation["overall"]["inspection"]
        assert [sum(counts[0]), sum(counts[1])] == [inspection["n_good"], inspection["n_defective"]]
        html = _artifact(first["run_dir"], ROI_TASK, "report")
        assert Path(html["uri"]).read_bytes() == (roi_dir / "report.html").read_bytes()
        markdown = _artifact(first["run_dir"], ROI_TASK, "summary")
        assert "payback" in Path(markdown["uri"]).read_text()
        version = tasks[REGISTER_TASK]["outputs"]["Output"]
        registered = client.get_model_version("cta-inspection", version)
        assert registered.tags["cta.registration"] == "complete"
        assert registered.tags["cta.model_id"] == model_id
        assert "cta.artifacts.roi" in registered.tags
        for task in ("semseg", "height", "normals"):
            baseline = client.get_model_version_by_alias(f"cta-inspection-stl-{task}", "baseline")
            assert baseline.tags["cta.registration"] == "complete"
        assert tasks[GATE_TASK]["outputs"] == {"Output": "pass"}
        champion = client.get_model_version_by_alias("cta-inspection", "champion")
        assert str(champion.version) == version
        assert tasks[ROLLOUT_TASK]["state"] == "ran"
        pilot = status(open_store(state_uri))["lines"]["press-a"]
        assert str(pilot["running"]["version"]) == version and pilot["alive"]
        # The printed summary shows what MLflow holds.
        summary = "\n".join(
            summary_lines({"tasks": tasks}, tracking_uri, "cta-inspection", state_uri)
        )
        tagged = {k.removeprefix("cta.evaluation."): v for k, v in registered.tags.items()}
        primaries = [k for k in evaluation["overall"]["metrics"] if k in tagged]
        assert len(primaries) == 3  # one primary metric per task, tagged at registration
        for key in primaries:
            assert f"(MLflow: {tagged[key]})" in summary, key
        assert f"registered: cta-inspection version {version}" in summary
        assert "gate: pass (MLflow tag cta.gate.verdict=pass)" in summary
        assert f"press-a    runs v{version}" in summary
        assert "STL baselines: trained and registered" in summary
        assert f"evaluation:        {evaluated / 'evaluation.json'}" in summary
        assert "pilot line press-a: payback" in summary

        second = _retrain(data_root, work, config_path, tracking_uri, *chosen)
        assert second["action"] == "skip" and "data unchanged" in second["reason"]

    finally:
        stop_all(open_store(state_uri))


def test_failed_validation_skips_training(data_root, config_path, tmp_path):
    from pipelines.run import TASKS

    broken = tmp_path / "data"
    shutil.copytree(data_root, broken)
    sample_id = _corrupt_one_png(broken)

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_local(str(broken), tmp_path / "work", config_path, tracking_uri)

    tasks = result["tasks"]
    assert tasks[VALIDATE_TASK]["state"] == "ran"
    assert tasks[VALIDATE_TASK]["outputs"] == {"Output": False}
    for skipped in TASKS[1:]:
        assert tasks[skipped] == {"state": "skipped", "outputs": {}, "artifacts": {}}
    dataset = Path(tasks[VALIDATE_TASK]["artifacts"]["dataset"])
    dataset_ref = json.loads((dataset / "dataset_ref.json").read_text())
    assert dataset_ref["passed"] is False
    assert sample_id in (dataset / "validation_result.json").read_text()
    # The failed validation's report still reaches the KFP UI.
    assert sample_id in Path(tasks[VALIDATE_TASK]["artifacts"]["report"]).read_text()
