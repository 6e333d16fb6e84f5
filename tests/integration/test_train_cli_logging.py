"""`cta train` configures logging: the epoch summaries reach stderr, so a pod's log shows them
(issue 16: a 3-minute run printed none). A subprocess, as in a pod: pytest's own log capture
would otherwise swallow the records."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_cta_train_prints_its_epoch_summaries(tmp_path):
    command = [
        sys.executable,
        "-m",
        "cta_cli",
        "train",
        "--config",
        "configs/demo.yaml",
        "--arch",
        "hps",
        "--tasks",
        "height",
        "--backbone",
        "resnet18",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--set",
        "model.output_stride=8",
        "--set",
        "model.input_size=[32,32]",
        "--set",
        # 384 px scenes: the lines' smallest defects must span 3 px at the tiles' pitch.
        "data.synthetic={lines: 2, samples_per_line: 6, size: 384, seed: 0}",
        "--set",
        "data.tiling={tiles_per_image: 1, val_tiles_per_image: 1}",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--out",
        str(tmp_path / "run"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--no-env",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    epoch = [line for line in lines if "cta_model.training.trainer: epoch 1/1 step" in line]
    assert len(epoch) == 1, done.stderr[-3000:]
    assert " INFO " in epoch[0] and "train loss" in epoch[0] and "val_loss" in epoch[0]
    assert any("cta_model.training.trainer: done:" in line for line in lines)
