"""`cta train`: flags over env over file, MLflow run with a logged model, torchrun launch."""

import json

import mlflow
import pytest
import yaml
from click.testing import CliRunner

from cta_cli.main import main

pytestmark = pytest.mark.integration

SMALL = [
    "--config",
    "configs/demo.yaml",
    "--epochs",
    "1",
    "--backbone",
    "resnet18",
    "--set",
    "model.output_stride=8",
    "--set",
    "model.input_size=[32,32]",
    "--set",
    "data.synthetic={lines: 2, samples_per_line: 8, size: 32, seed: 0}",
    "--batch-size",
    "4",
    "--set",
    "data.tiling={tiles_per_image: 1, val_tiles_per_image: 1}",
]


def _train(tmp_path, *extra, env=None):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*SMALL, "--out", str(tmp_path / "run"), "--tracking-uri", uri, *extra]
    args += ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    result = CliRunner().invoke(main, ["train", *args], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{") :]), uri


def test_train_logs_a_run_and_a_model_and_flags_beat_env(tmp_path):
    summary, uri = _train(
        tmp_path, "--arch", "hps", env={"CTA_ARCH": "ctal", "CTA_TASKS": "height"}
    )
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["model"]["arch"] == "hps"  # the flag wins over CTA_ARCH
    assert resolved["model"]["tasks"] == ["height"]  # env wins over the file
    assert (tmp_path / "run" / "model" / "weights.safetensors").is_file()
    client = mlflow.MlflowClient(uri)
    run = client.get_run(summary["run_id"])
    assert run.data.tags["cta.model_id"] == summary["model_id"]
    assert "height.abs_err_mm" in run.data.metrics
    assert client.search_registered_models() == []  # training never registers


def test_unknown_override_key_is_named(tmp_path):
    result = CliRunner().invoke(
        main, ["train", *SMALL, "--out", str(tmp_path), "--set", "optim.lrr=1"]
    )
    assert result.exit_code == 2
    assert "optim.lrr" in result.output


def test_two_processes_through_torchrun(tmp_path):
    summary, uri = _train(tmp_path, "--nproc-per-node", "2", "--arch", "ctal")
    assert summary["model_id"]
    run = mlflow.MlflowClient(uri).get_run(summary["run_id"])
    assert run.data.params["model.arch"] == "ctal"
    assert "semseg.miou" in run.data.metrics
