"""The training pipeline through kfp.local: clean data trains; broken data skips training."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cta_model.data.line_dataset import MANIFEST_NAME, generate_dataset
from pipelines.run import run_local
from pipelines.training import EVALUATE_TASK, REGISTER_TASK, TRAIN_TASK, VALIDATE_TASK

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline") / "data"
    return generate_dataset(
        root, n_lines=2, samples_per_line=8, height=32, width=32, seed=0, progress=False
    )


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    """configs/demo.yaml made tiny: ResNet-18 at stride 8, 32x32, one epoch of batches of 4."""
    config = yaml.safe_load(Path("configs/demo.yaml").read_text())
    config["model"].update(backbone="resnet18", output_stride=8, input_size=[32, 32])
    config.update(epochs=1, batch_size=4, progress=False)
    config["checkpoint"]["every_steps"] = 0
    # The pipeline replaces the data source with the validated dataset_ref and sets output.
    path = tmp_path_factory.mktemp("config") / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _corrupt_one_png(root: Path) -> str:
    row = pq.read_table(root / MANIFEST_NAME).to_pylist()[3]
    image = root / row["image_path"]
    image.write_bytes(image.read_bytes()[:40])  # truncated: not a readable PNG any more
    return row["sample_id"]


def test_clean_data_is_validated_trained_evaluated_and_registered(data_root, config_path, tmp_path):
    import mlflow

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_local(str(data_root), tmp_path / "work", config_path, tracking_uri)

    tasks = result["tasks"]
    assert tasks[VALIDATE_TASK] == {"state": "ran", "outputs": {"Output": True}}
    assert tasks[TRAIN_TASK]["state"] == "ran"
    model_id = tasks[TRAIN_TASK]["outputs"]["Output"]
    assert model_id

    work = tmp_path / "work"
    dataset_ref = json.loads((work / "validate_data" / "dataset_ref.json").read_text())
    assert dataset_ref["passed"] is True and dataset_ref["uri"] == str(data_root.resolve())
    summary = json.loads((work / "train" / "train_summary.json").read_text())
    assert summary["model_id"] == model_id
    model_dir = Path(summary["model_dir"])
    assert model_dir == work / "train" / "model"
    assert (model_dir / "weights.safetensors").is_file()
    # Trained on the validated data, tracked in the store the pipeline was given.
    resolved = yaml.safe_load((work / "train" / "config.yaml").read_text())
    assert resolved["data"]["dataset_ref"] == str(work / "validate_data" / "dataset_ref.json")
    client = mlflow.MlflowClient(tracking_uri)
    assert client.get_logged_model(model_id).model_id == model_id
    # Evaluated on test and registered as the challenger, registration completed last.
    assert tasks[EVALUATE_TASK]["state"] == "ran"
    evaluation = json.loads((work / "evaluate" / "evaluation.json").read_text())
    assert evaluation["model"]["model_id"] == model_id
    assert evaluation["data"]["split"] == "test"
    version = tasks[REGISTER_TASK]["outputs"]["Output"]
    registered = client.get_model_version_by_alias("cta-inspection", "challenger")
    assert str(registered.version) == version
    assert registered.tags["cta.registration"] == "complete"
    assert registered.tags["cta.model_id"] == model_id


def test_failed_validation_skips_training(data_root, config_path, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(data_root, broken)
    sample_id = _corrupt_one_png(broken)

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_local(str(broken), tmp_path / "work", config_path, tracking_uri)

    tasks = result["tasks"]
    assert tasks[VALIDATE_TASK] == {"state": "ran", "outputs": {"Output": False}}
    for skipped in (TRAIN_TASK, EVALUATE_TASK, REGISTER_TASK):
        assert tasks[skipped] == {"state": "skipped", "outputs": {}}
    work = tmp_path / "work"
    assert not (work / "train").exists()
    dataset_ref = json.loads((work / "validate_data" / "dataset_ref.json").read_text())
    assert dataset_ref["passed"] is False
    assert sample_id in (work / "validate_data" / "validation_result.json").read_text()
