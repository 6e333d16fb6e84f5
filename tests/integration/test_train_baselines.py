"""The train_baselines step against the session's `mlflow server`: trains and registers the
missing STL baselines, then (matching ones registered) trains nothing."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml
from dataset_refs import validated_dataset_ref
from mlflow import MlflowClient

from components.evaluate.references import matching_baseline
from components.train_baselines.step import SUMMARY_NAME, missing_baselines, run

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_mlflow_globals")]


def tiny_config(folder: Path) -> Path:
    """configs/demo.yaml made tiny: ResNet-18 at stride 8, 32x32, 2 steps of batches of 4."""
    config = yaml.safe_load(Path("configs/demo.yaml").read_text())
    config["model"].update(backbone="resnet18", output_stride=8, input_size=[32, 32])
    config.update(epochs=1, max_steps=2, batch_size=4, progress=False)
    config["checkpoint"]["every_steps"] = 0
    config["data"]["tiling"].update(tiles_per_image=1, val_tiles_per_image=1)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_missing_baselines_are_trained_once_then_reused(mlflow_server: str, tmp_path: Path) -> None:
    ref_path = validated_dataset_ref(tmp_path, n_lines=2, samples_per_line=8)
    manifest = json.loads(ref_path.read_text())["manifest_sha256"]
    config = tiny_config(tmp_path)
    name = f"cta-stl-{uuid.uuid4().hex[:8]}"
    tasks = ("semseg", "height")
    assert missing_baselines(name, tasks, manifest, tracking_uri=mlflow_server) == list(tasks)

    first = run(
        str(config),
        str(ref_path),
        name,
        str(tmp_path / "first"),
        tasks=("height",),
        tracking_uri=mlflow_server,
    )
    assert set(first["trained"]) == {"height"} and first["reused"] == []
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias(f"{name}-stl-height", "baseline")
    assert str(version.version) == first["trained"]["height"]["version"]
    assert version.tags["cta.registration"] == "complete"
    assert version.tags["cta.data_manifest_sha256"] == manifest
    assert version.tags["cta.split"] == "train"
    assert matching_baseline(client, name, "height", manifest, "train") is not None
    # A single-task STL model was trained, not the multi-task config's CTAL.
    model_card = yaml.safe_load(
        (tmp_path / "first" / "stl-height" / "model" / "model.yaml").read_text()
    )
    assert model_card["model"]["arch"] == "stl" and model_card["model"]["tasks"] == ["height"]
    assert missing_baselines(name, tasks, manifest, tracking_uri=mlflow_server) == ["semseg"]
    # Other data: nothing matches.
    assert missing_baselines(name, ("height",), "0" * 64, tracking_uri=mlflow_server) == ["height"]

    second = run(
        str(config),
        str(ref_path),
        name,
        str(tmp_path / "second"),
        tasks=("height",),
        tracking_uri=mlflow_server,
    )
    assert second["trained"] == {} and second["reused"] == ["height"]
    assert not (tmp_path / "second" / "stl-height").exists()
    assert json.loads((tmp_path / "second" / SUMMARY_NAME).read_text()) == second
    assert len(client.search_model_versions(f"name = '{name}-stl-height'")) == 1
