"""The STL baselines step through kfp.local: trained when missing, nothing trained once
registered, nothing asked when switched off."""

import json
import warnings
from pathlib import Path

import pytest
import yaml
from kfp import dsl, local

from components.train_baselines.component import train_baselines
from components.train_baselines.step import SUMMARY_NAME
from cta_model.data.line_dataset import MANIFEST_NAME, sha256_hex
from cta_model.data.synthetic_dataset import generate_dataset
from pipelines.run import task_result

pytestmark = pytest.mark.e2e

TRAIN_TASK = "train-baselines"
PIPELINE_NAME = "baselines-step"


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def dataset_artifact(ref_text: str, dataset: dsl.Output[dsl.Dataset]):
    """What validate-data hands the later steps: a folder holding dataset_ref.json."""
    from pathlib import Path

    Path(dataset.path).mkdir(parents=True)
    (Path(dataset.path) / "dataset_ref.json").write_text(ref_text)


@dsl.pipeline(name=PIPELINE_NAME)
def baselines_step(
    ref_text: str, config_path: str, model_name: str, tracking_uri: str, enabled: bool = True
):
    made = dataset_artifact(ref_text=ref_text)
    trained = train_baselines(
        dataset=made.outputs["dataset"],
        config_path=config_path,
        model_name=model_name,
        tracking_uri=tracking_uri,
        enabled=enabled,
    )
    trained.set_display_name(TRAIN_TASK)


def _run(kfp_root: Path, **arguments: str) -> dict:
    kfp_root.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(kfp_root),
        raise_on_error=True,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        baselines_step(**arguments)
    (run_dir,) = [p for p in kfp_root.iterdir() if p.name.startswith(f"{PIPELINE_NAME}-")]
    result = task_result(run_dir, TRAIN_TASK)
    assert result["state"] == "ran"
    summary = Path(result["artifacts"]["baselines"]) / SUMMARY_NAME
    return {"trained": result["outputs"]["Output"], "summary": json.loads(summary.read_text())}


def test_baselines_are_trained_when_missing_and_skipped_when_registered(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    root = generate_dataset(
        tmp_path / "data",
        n_lines=2,
        samples_per_line=8,
        height=32,
        width=32,
        seed=0,
        progress=False,
    )
    manifest = sha256_hex((root / MANIFEST_NAME).read_bytes())
    ref_path = tmp_path / "dataset_ref.json"
    ref_path.write_text(
        json.dumps(
            {
                "uri": str(root),
                "manifest_sha256": manifest,
                "dvc_rev": None,
                "passed": True,
                "quarantine": [],
            }
        )
    )
    # One task keeps it to one tiny baseline: ResNet-18 at stride 8, 32x32, 2 steps.
    config = yaml.safe_load(Path("configs/demo.yaml").read_text())
    config["model"].update(
        arch="stl", tasks=["height"], backbone="resnet18", output_stride=8, input_size=[32, 32]
    )
    config.update(epochs=1, max_steps=2, batch_size=4, progress=False)
    config["checkpoint"]["every_steps"] = 0
    config["data"]["tiling"].update(tiles_per_image=1, val_tiles_per_image=1)
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(config))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    arguments = {
        "ref_text": ref_path.read_text(),
        "config_path": str(config_path),
        "model_name": "cta-branch",
        "tracking_uri": tracking_uri,
    }

    first = _run(tmp_path / "kfp1", **arguments)
    assert first["trained"] == "height"
    assert set(first["summary"]["trained"]) == {"height"} and first["summary"]["reused"] == []
    version = MlflowClient(tracking_uri).get_model_version_by_alias(
        "cta-branch-stl-height", "baseline"
    )
    assert version.tags["cta.data_manifest_sha256"] == manifest

    second = _run(tmp_path / "kfp2", **arguments)
    assert second["trained"] == ""
    assert second["summary"]["trained"] == {} and second["summary"]["reused"] == ["height"]
    versions = MlflowClient(tracking_uri).search_model_versions("name='cta-branch-stl-height'")
    assert len(versions) == 1

    off = _run(tmp_path / "kfp3", enabled=False, **arguments)
    assert off == {"trained": "", "summary": {"disabled": True}}
