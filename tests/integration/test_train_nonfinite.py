"""Issue 18, finding 3: a non-finite loss or gradient never reaches the weights.

A step with a NaN loss or NaN gradients is skipped (weights unchanged) and counted; the skip is
agreed across DDP ranks; a run that keeps diverging stops with a clear error and a non-zero
exit, writes no model folder and logs no LoggedModel (its MLflow run ends FAILED); a model with
non-finite weights is neither written, logged nor registered.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from test_training import run, torchrun_command, write_config

from cta_cli.main import main
from cta_model.data.synthetic_dataset import generate_dataset
from cta_model.errors import DataError, TrainingError
from cta_model.model_folder import WEIGHTS, load_model_folder, nonfinite_tensors, save_model_folder
from cta_model.train_config import validate_train_config
from cta_model.training import Callback, train
from cta_model.training.determinism import parameter_digest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """A tiny line dataset and configs/lines.yaml without defect widths (32 px scenes are far
    too coarse for them)."""
    root = tmp_path_factory.mktemp("lines")
    generate_dataset(
        root / "data", n_lines=2, samples_per_line=12, height=32, width=32, progress=False
    )
    lines = yaml.safe_load((REPO / "configs" / "lines.yaml").read_text())
    for line in lines["lines"]:
        line.pop("min_defect_width_mm", None)
    (root / "lines.yaml").write_text(yaml.safe_dump(lines))
    return {"path": str(root / "data"), "lines_config": str(root / "lines.yaml")}


def config_dict(data: dict[str, str], output: Path, **top: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model": {
            "arch": "hps",
            "backbone": "resnet18",
            "output_stride": 8,
            "tasks": ["semseg", "height"],
            "input_size": [32, 32],
            "decoder_channels": 16,
        },
        "data": {**data, "num_workers": 0},
        "optim": {"name": "adam", "lr": 1e-3},
        "epochs": 2,
        "max_steps": 4,
        "batch_size": 4,
        "progress": False,
        "output": str(output),
    }
    for key, value in top.items():
        section, _, name = key.partition("__")
        if name:
            config[section] = {**config.get(section, {}), name: value}
        else:
            config[key] = value
    return config


class Digests(Callback):
    """The parameters' digest after every step; NaN gradients or infinite weights at steps."""

    def __init__(self, nan_grads_at: frozenset[int] = frozenset(), inf_weights_at: int = 0):
        self.nan_grads_at = nan_grads_at
        self.inf_weights_at = inf_weights_at
        self.digests: dict[int, str] = {}
        self.trainer: Any = None
        self.hooks: list[Any] = []

    def on_train_start(self, trainer) -> None:
        self.trainer = trainer
        self._poison_step(1)

    def _poison_step(self, step: int) -> None:
        if step in self.nan_grads_at:
            parameter = next(self.trainer.model.parameters())
            self.hooks.append(parameter.register_hook(lambda g: torch.full_like(g, math.nan)))

    def on_step_end(self, step, logs) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self._poison_step(step + 1)
        if step == self.inf_weights_at:
            with torch.no_grad():
                next(self.trainer.model.parameters()).fill_(math.inf)
        self.digests[step] = parameter_digest(self.trainer.model)


def test_steps_with_a_nan_loss_or_nan_gradients_are_skipped_and_counted(data, tmp_path):
    # Step 2: the loss value is NaN (debug hook); step 3: a parameter's gradient is NaN.
    config = config_dict(data, tmp_path / "run", debug__nan_loss_steps_by_rank={0: [2]})
    digests = Digests(nan_grads_at=frozenset({3}))
    result = train(validate_train_config(config), callbacks=[digests])
    assert digests.digests[1] == digests.digests[2] == digests.digests[3]  # weights untouched
    assert digests.digests[4] != digests.digests[3]  # and training went on
    assert result.skipped_steps == 2
    assert sum(entry["train"]["skipped_steps"] for entry in result.history) == 2.0
    assert all(math.isfinite(entry["train"]["loss"]) for entry in result.history)
    model, _ = load_model_folder(tmp_path / "run" / "model")
    assert nonfinite_tensors(model.state_dict()) == []


def test_steps_skipped_in_a_row_stop_the_run_with_a_clear_error(data, tmp_path):
    config = config_dict(data, tmp_path / "run", optim__max_skipped_steps_in_a_row=2)
    with pytest.raises(TrainingError, match=r"2 optimizer steps in a row \(up to step 3\)"):
        train(validate_train_config(config), callbacks=[Digests(frozenset({2, 3}))])
    assert not (tmp_path / "run" / "model").exists()


def test_non_finite_final_weights_fail_the_run(data, tmp_path):
    config = config_dict(data, tmp_path / "run", epochs=1, max_steps=2)
    with pytest.raises(TrainingError, match="NaN or infinite values in 1 tensor"):
        train(validate_train_config(config), callbacks=[Digests(inf_weights_at=2)])
    assert not (tmp_path / "run" / "model").exists()
    assert not (tmp_path / "run" / "train_result.json").exists()


def test_ddp_ranks_agree_to_skip_a_step_one_rank_finds_non_finite(data, tmp_path):
    """Rank 1's loss is NaN at step 2 while its gradients are finite: without an agreed
    decision rank 0 would step and rank 1 would not, and the ranks' weights would differ."""
    output = tmp_path / "ddp"
    config = config_dict(
        data,
        output,
        epochs=1,
        batch_size=4,  # global: 2 per process
        debug__nan_loss_steps_by_rank={1: [2]},
        debug__dump_param_hashes=True,
    )
    run(torchrun_command(write_config(tmp_path / "ddp.yaml", config)))
    hashes = [(output / "debug" / f"params-rank{r}.sha256").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    result = json.loads((output / "train_result.json").read_text())
    assert result["skipped_steps"] == 1


# ---------------------------------------------------------------- cta train and MLflow
def _cta_train(data: dict[str, str], tmp_path: Path, *sets: str) -> tuple[Any, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = write_config(tmp_path / "train.yaml", config_dict(data, tmp_path / "run"))
    args = ["train", "--config", str(config), "--no-env", "--tracking-uri", uri]
    for item in sets:
        args += ["--set", item]
    return CliRunner().invoke(main, args), uri


@pytest.mark.usefixtures("restore_mlflow_globals")
def test_cta_train_with_an_infinite_lr_exits_2_before_training(data, tmp_path):
    result, _ = _cta_train(data, tmp_path, "optim.lr=.inf")
    assert result.exit_code == 2
    assert "optim.lr: must be finite, got inf" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.usefixtures("restore_mlflow_globals")
def test_a_diverging_cta_train_exits_2_and_logs_no_model(data, tmp_path):
    # Finite but absurd: the first step sends the weights to ~1e30, then every loss overflows.
    result, uri = _cta_train(data, tmp_path, "optim.lr=1e30", "max_steps=8", "epochs=4")
    assert result.exit_code == 2, result.output
    assert "training diverged" in result.output
    assert not (tmp_path / "run" / "model").exists()
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "cta.model_id" not in runs[0].data.tags
    assert client.search_logged_models([e.experiment_id for e in client.search_experiments()]) == []


# ---------------------------------------------------------------- logging and registering
@pytest.fixture
def nan_model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    model, card = load_model_folder(tiny_model_dir)
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)
    return save_model_folder(
        model, tmp_path / "nan-model", class_names=card.class_names, input_contract=card.input
    )


@pytest.mark.usefixtures("restore_mlflow_globals")
def test_a_model_with_non_finite_weights_is_neither_logged_nor_registered(
    nan_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from components.register_model.step import run as register
    from components.train import logged_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    # An experiment of this store: an earlier test's active experiment id names another store.
    mlflow.set_experiment("nonfinite")
    with pytest.raises(DataError, match=f"{WEIGHTS}: 1 tensor"):
        logged_model.log_model_folder(nan_model_dir)
    # Logged by some other route: the registration still refuses it.
    monkeypatch.setattr(logged_model, "check_finite_weights", lambda path: None)
    info = logged_model.log_model_folder(nan_model_dir)
    with pytest.raises(DataError, match="refusing to register a diverged model"):
        register(info.model_id, "nan-model", tracking_uri=uri)
    assert mlflow.MlflowClient(uri).search_registered_models() == []
    shutil.rmtree(nan_model_dir)
