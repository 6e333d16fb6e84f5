"""Training end to end on a tiny synthetic line dataset (CPU, 32 x 32, small decoders).

(a) a short run writes a complete model folder; (b) SIGKILL mid-epoch + resume gives weights
bit-identical to an uninterrupted run; (c) a truncated latest checkpoint falls back to the
previous one; (d) torchrun with 2 processes where rank 1 never has height labels keeps the
parameters identical on both ranks; (e) pooled validation metrics are the same on 1 and 2
processes for the same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from cta_model.data.line_dataset import MANIFEST_NAME, LineDataset
from cta_model.data.synthetic import CLASS_NAMES
from cta_model.data.synthetic_dataset import generate_dataset
from cta_model.errors import ConfigError
from cta_model.inference import Predictor
from cta_model.model_folder import verify_checksums
from cta_model.nn.models import ModelSpec, build_model
from cta_model.tasks import metric_directions
from cta_model.train_config import validate_train_config
from cta_model.training import Callback, TrainResult, train, validate
from cta_model.training.checkpoints import list_checkpoints
from cta_model.training.datasets import ensure_synthetic_dataset, open_datasets
from cta_model.training.ema import EMATeacher
from cta_model.training.loaders import ResumableDistributedSampler, ShardSampler
from cta_model.training.optimization import lr_factor

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TRAIN_PROCESS = Path(__file__).with_name("train_process.py")  # calls train / validate
TASKS = ("semseg", "height", "normals")
# press-a and press-b have a height sensor, mill-c has none: partial labels from the start.
LINES = 3
SAMPLES_PER_LINE = 12


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lines") / "data"
    return generate_dataset(
        root, n_lines=LINES, samples_per_line=SAMPLES_PER_LINE, height=32, width=32, progress=False
    )


def config_dict(data_root: Path, output: Path, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model": {
            "arch": "ctal",
            "backbone": "hrnet-w18-small-v2",
            "tasks": list(TASKS),
            "input_size": [32, 32],
            "decoder_channels": 64,
            "affinity_channels": 32,
        },
        "data": {"path": str(data_root), "num_workers": 0},
        "optim": {"name": "adam", "lr": 1e-3},
        "epochs": 2,
        "batch_size": 4,
        "checkpoint": {"every_steps": 2, "keep_last": 3},
        "progress": False,
        "output": str(output),
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            config.setdefault(section, {})[name] = value
        else:
            config[key] = value
    return config


def subprocess_env() -> dict[str, str]:
    # One thread: bit-identity across processes needs the same reduction order in every run.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    for name in ("CTA_ARCH", "CTA_TASKS", "CTA_BACKBONE", "CTA_DATA", "CTA_OUT"):
        env.pop(name, None)
    return env


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def train_command(config_file: Path) -> list[str]:
    return [sys.executable, str(TRAIN_PROCESS), str(config_file)]


def torchrun_command(config_file: Path, *extra: str, nproc: int = 2) -> list[str]:
    launcher = Path(sys.prefix) / "bin" / "torchrun"
    return [
        str(launcher),
        f"--nproc_per_node={nproc}",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(TRAIN_PROCESS),
        str(config_file),
        *extra,
    ]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(command: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def on_train_start(self, trainer) -> None:
        self.calls.append(("start", trainer.lineage()["dataset"]["uri"]))

    def on_step_end(self, step, logs) -> None:
        self.calls.append(("step", (step, dict(logs))))

    def on_epoch_end(self, epoch, train_logs, val_metrics) -> None:
        self.calls.append(("epoch", (epoch, dict(val_metrics))))

    def on_train_end(self, result) -> None:
        self.calls.append(("end", result))


@pytest.fixture(scope="module")
def short_run(dataset_root, tmp_path_factory) -> tuple[dict, TrainResult, Recorder]:
    output = tmp_path_factory.mktemp("short") / "run"
    config = config_dict(dataset_root, output)
    recorder = Recorder()
    result = train(validate_train_config(config), callbacks=[recorder])
    return config, result, recorder


# ---------------------------------------------------------------- samplers and schedule
def test_resumable_sampler_shards_cover_the_epoch_and_resume_mid_way():
    shards = [ResumableDistributedSampler(10, 3, rank, seed=7) for rank in range(3)]
    for sampler in shards:
        sampler.set_epoch(1)
    seen = [index for sampler in shards for index in sampler]
    assert len(seen) == 12 and set(seen) == set(range(10))  # padded to equal shards
    assert all(len(sampler) == 4 for sampler in shards)
    again = ResumableDistributedSampler(10, 3, 1, seed=7)
    again.set_epoch(1)
    assert list(again) == list(shards[1])
    again.set_epoch(1, start_index=3)
    assert list(again) == list(shards[1])[3:] and len(again) == 1
    again.set_epoch(2)
    assert list(again) != list(shards[1])  # a new permutation each epoch


def test_eval_sharding_has_no_padding_and_no_duplicates():
    shards = [list(ShardSampler(7, 3, rank)) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(i for shard in shards for i in shard) == list(range(7))


def test_cosine_schedule_with_warmup():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(50, 100, 0, "constant") == 1.0


# ---------------------------------------------------------------- data sources
def test_synthetic_dataset_is_generated_once_and_reused(tmp_path, monkeypatch):
    config = validate_train_config(
        {
            "data": {
                "synthetic": {"lines": 1, "samples_per_line": 6, "size": 16},
                "cache_dir": str(tmp_path / "cache"),
            },
            "epochs": 1,
            "output": str(tmp_path / "out"),
        }
    )
    root = ensure_synthetic_dataset(config.data)
    assert (root / MANIFEST_NAME).is_file()
    assert root.parent == tmp_path / "cache" / "synthetic"
    import cta_model.training.datasets as datasets_module

    def fail(*_, **__):
        raise AssertionError("regenerated a cached dataset")

    monkeypatch.setattr(datasets_module, "generate_dataset", fail)
    assert ensure_synthetic_dataset(config.data) == root


def test_dataset_ref_quarantine_is_skipped_and_counted(dataset_root, tmp_path):
    train_ids = LineDataset(dataset_root, split="train").sample_ids
    manifest_sha = hashlib.sha256((dataset_root / MANIFEST_NAME).read_bytes()).hexdigest()
    ref = {
        "uri": str(dataset_root),
        "manifest_sha256": manifest_sha,
        "dvc_rev": "abc123",
        "passed": True,
        "quarantine": train_ids[:2],
    }
    ref_file = tmp_path / "dataset_ref.json"
    ref_file.write_text(json.dumps(ref))
    config = validate_train_config(
        {"data": {"dataset_ref": str(ref_file)}, "epochs": 1, "output": str(tmp_path / "o")}
    )
    bundle = open_datasets(config)
    assert len(bundle.train) == len(train_ids) - 2
    assert train_ids[0] not in {bundle.train[i]["sample_id"] for i in range(len(bundle.train))}
    assert bundle.lineage["quarantine_skipped"] == {"train": 2, "val": 0}
    assert bundle.lineage["manifest_sha256"] == manifest_sha
    assert bundle.lineage["dvc_rev"] == "abc123"
    ref["manifest_sha256"] = "0" * 64
    ref_file.write_text(json.dumps(ref))
    with pytest.raises(Exception, match="differs from the validated manifest_sha256"):
        open_datasets(config)


# ---------------------------------------------------------------- (a) the model folder
def test_short_run_writes_a_complete_model_folder(short_run, dataset_root):
    config, result, recorder = short_run
    model_dir = Path(config["output"]) / "model"
    assert result.model_dir == model_dir
    names = {p.name for p in model_dir.iterdir()}
    assert names == {
        "weights.safetensors",
        "model.yaml",
        "SHA256SUMS",
        "lineage.json",
        "reference_stats.parquet",
    }
    verify_checksums(model_dir)

    expected = set(metric_directions(TASKS)) | {"val_loss"}
    assert set(result.best_metrics) == expected
    assert all(set(entry["val"]) == expected for entry in result.history)
    assert [entry["epoch"] for entry in result.history] == [1, 2]
    assert result.steps == 2 * 5  # 21 train samples, batch 4: 5 steps per epoch
    assert result.images_per_s > 0 and 1 <= result.best_epoch <= 2
    saved = json.loads((Path(config["output"]) / "train_result.json").read_text())
    assert saved["best_metrics"] == pytest.approx(result.best_metrics, nan_ok=True)

    predictor = Predictor.from_folder(model_dir)
    images = np.stack([LineDataset(dataset_root, split="val")[i]["image"] for i in range(2)])
    predicted = predictor.predict(images)
    assert set(predicted) == set(TASKS)
    assert predicted["semseg"].shape == (2, 32, 32)
    assert predicted["height"].shape == (2, 32, 32)
    assert predicted["normals"].shape == (2, 32, 32, 3)
    assert predictor.card.class_names == CLASS_NAMES

    lineage = json.loads((model_dir / "lineage.json").read_text())
    manifest = (dataset_root / MANIFEST_NAME).read_bytes()
    assert lineage["dataset"]["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert lineage["dataset"]["uri"] == str(dataset_root.resolve())
    assert lineage["config"]["model"]["arch"] == "ctal"
    assert lineage["world_size"] == 1 and lineage["torch_version"]
    assert "git_commit" in lineage

    stats = pq.read_table(model_dir / "reference_stats.parquet")
    columns = set(stats.column_names)
    for column in ("sample_id", "line_id", "brightness", "contrast", "ratio_rg", "ratio_bg"):
        assert column in columns
    assert {f"pred_frac_{name}" for name in CLASS_NAMES} <= columns
    assert {"pred_height_mean_mm", "pred_height_std_mm", "pred_normals_z_mean"} <= columns
    val_ids = LineDataset(dataset_root, split="val").sample_ids
    assert stats.column("sample_id").to_pylist() == val_ids
    fractions = stats.select([f"pred_frac_{n}" for n in CLASS_NAMES]).to_pandas().sum(axis=1)
    assert np.allclose(fractions, 1.0)

    kinds = [kind for kind, _ in recorder.calls]
    assert kinds == ["start"] + ["step"] * 5 + ["epoch"] + ["step"] * 5 + ["epoch", "end"]
    step_logs = recorder.calls[1][1][1]
    assert {"loss", "lr", "grad_norm", "images_per_s"} <= set(step_logs)
    assert len(list_checkpoints(Path(config["output"]) / "checkpoints")) == 3  # keep_last


def test_resume_refuses_a_different_config_naming_the_key(short_run):
    config, _, _ = short_run
    changed = {**config, "optim": {**config["optim"], "lr": 0.5}}
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.001 -> 0\.5"):
        train(validate_train_config(changed))


# ---------------------------------------------------------------- (c) truncated checkpoint
@pytest.mark.parametrize("damage", ["truncate", "flip_one_byte"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(short_run, tmp_path, damage):
    config, _, _ = short_run
    output = Path(config["output"])
    weights = (output / "model" / "weights.safetensors").read_bytes()
    checkpoints = list_checkpoints(output / "checkpoints")
    latest_step, latest = checkpoints[-1]
    assert latest_step == 10
    data = bytearray(latest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # same length, one bit of a tensor changed: only the sha256 sidecar notices
        data[len(data) // 2] ^= 0x01
    latest.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match=r"step-00000010\.pt: sha256 differs"):
        result = train(validate_train_config(config), resume="auto")
    assert result.steps == 10
    # The previous checkpoint (step 8) was resumed and the last steps re-run exactly.
    assert (output / "model" / "weights.safetensors").read_bytes() == weights


# ---------------------------------------------------------------- (b) SIGKILL and resume
def test_killed_and_resumed_run_is_bit_identical(dataset_root, tmp_path):
    whole = write_config(
        tmp_path / "whole.yaml", config_dict(dataset_root, tmp_path / "whole", epochs=3)
    )
    killed_output = tmp_path / "killed"
    killed = write_config(
        tmp_path / "killed.yaml", config_dict(dataset_root, killed_output, epochs=3)
    )
    run(train_command(whole))

    # Epoch 1 has steps 1-5; checkpoints at 2 and 4 are mid-epoch. Kill at the first one.
    target = killed_output / "checkpoints" / "step-00000002.pt"
    process = subprocess.Popen(
        train_command(killed),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not target.exists():
            assert process.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (killed_output / "model").exists()
    steps = [step for step, _ in list_checkpoints(killed_output / "checkpoints")]
    assert steps and max(steps) % 5 != 0, f"killed too late to test a mid-epoch resume: {steps}"

    resumed = run(train_command(killed))
    assert "steps into it" in resumed.stderr
    whole_weights = (tmp_path / "whole" / "model" / "weights.safetensors").read_bytes()
    resumed_weights = (killed_output / "model" / "weights.safetensors").read_bytes()
    assert resumed_weights == whole_weights


# ---------------------------------------------------------------- (d) DDP with partial labels
def test_ddp_with_a_rank_that_never_has_height_labels(dataset_root, tmp_path):
    output = tmp_path / "ddp"
    config = config_dict(
        dataset_root,
        output,
        loss__weighting="uncertainty",  # learned loss weights must stay in sync too
        debug__mask_tasks_by_rank={1: ["height"]},
        debug__dump_param_hashes=True,
        checkpoint__every_steps=0,
        batch_size=8,  # global: 2 per process and micro-step, DDP no_sync on the first
        grad_accum_steps=2,
    )
    run(torchrun_command(write_config(tmp_path / "ddp.yaml", config)))
    hashes = [(output / "debug" / f"params-rank{r}.sha256").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    verify_checksums(output / "model")
    lineage = json.loads((output / "model" / "lineage.json").read_text())
    assert lineage["world_size"] == 2
    result = json.loads((output / "train_result.json").read_text())
    assert result["steps"] == 2 * 2  # 11 samples per rank: 5 micro-batches of 2 -> 2 steps


# ---------------------------------------------------------------- (e) 1 vs 2 processes
def test_pooled_val_metrics_equal_on_one_and_two_processes(short_run, tmp_path):
    config, result, _ = short_run
    model_dir = Path(config["output"]) / "model"
    eval_config = {
        **config,
        "model": {**config["model"], "init_from": str(model_dir)},
        "eval": {"batch_size": 2},
        "output": str(tmp_path / "eval"),
    }
    one = validate(validate_train_config(eval_config))
    metrics_file = tmp_path / "metrics.json"
    config_file = write_config(tmp_path / "eval.yaml", eval_config)
    run(torchrun_command(config_file, str(metrics_file)))  # validates into metrics_file
    two = json.loads(metrics_file.read_text())
    assert set(one) == set(two) == set(result.best_metrics)
    for key, value in one.items():
        # Integer statistics are exact; float sums may differ in the last bits with batching.
        assert two[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        assert result.best_metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


# ---------------------------------------------------------------- options of a step
def test_teacher_labels_only_what_is_absent():
    import torch

    spec = ModelSpec(
        arch="hps",
        tasks=TASKS,
        input_size=(32, 32),
        num_classes=len(CLASS_NAMES),
        decoder_channels=64,
        affinity_channels=32,
    )
    teacher = EMATeacher(build_model(spec), decay=0.9, seg_confidence=0.0)
    images = torch.randn(2, 3, 32, 32)
    targets = {
        "semseg": torch.full((2, 32, 32), 3, dtype=torch.int64),
        "height": torch.full((2, 1, 32, 32), float("nan")),
        "normals": torch.zeros(2, 3, 32, 32),
    }
    present = {
        "semseg": torch.tensor([True, False]),
        "height": torch.tensor([False, False]),
        "normals": torch.tensor([True, True]),
    }
    filled, flags = teacher.fill_missing(images, targets, present, "cpu", bf16=False)
    assert torch.equal(filled["semseg"][0], targets["semseg"][0])  # present: untouched
    assert not torch.equal(filled["semseg"][1], targets["semseg"][1])
    assert torch.isfinite(filled["height"]).all()
    assert torch.equal(filled["normals"], targets["normals"])
    assert all(bool(f.all()) for f in flags.values())
    strict = EMATeacher(build_model(spec), decay=0.9, seg_confidence=1.01)
    unsure, _ = strict.fill_missing(images, targets, present, "cpu", bf16=False)
    assert (unsure["semseg"][1] == -1).all()  # nothing confident enough: ignored pixels


def test_distill_dwa_channels_last_and_accumulation_run(dataset_root, tmp_path):
    config = config_dict(
        dataset_root,
        tmp_path / "options",
        distill__enabled=True,
        loss__weighting="dwa",
        channels_last=True,
        batch_size=8,
        grad_accum_steps=2,
        epochs=3,
        checkpoint__every_steps=0,
    )
    config["model"]["arch"] = "hps"
    result = train(validate_train_config(config))
    assert result.steps == 6 and len(result.history) == 3  # 21 samples: 5 micro-batches of 4
    assert all(np.isfinite(entry["train"]["loss"]) for entry in result.history)
    weights = result.history[-1]["loss_weights"]
    assert set(weights) == set(TASKS) and sum(weights.values()) == pytest.approx(3.0)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_cpu_autocasts_only_where_the_cpu_has_native_bf16(
    dataset_root, tmp_path, monkeypatch, caplog, native
):
    import logging

    import torch

    from cta_model.training import trainer as trainer_module

    # Forced either way so both branches run on any CPU (emulated bf16 is only slower).
    monkeypatch.setattr(trainer_module, "has_native_bf16", lambda device: native)
    config = config_dict(
        dataset_root, tmp_path / "bf16", precision="bf16", channels_last=True, epochs=1
    )
    with caplog.at_level(logging.INFO, logger=trainer_module.log.name):
        trainer = trainer_module.Trainer(validate_train_config(config))
    dtypes: set[torch.dtype] = set()
    trainer.model.backbone.register_forward_hook(  # HRNet: one fused feature map
        lambda module, inputs, output: dtypes.add(output.dtype)
    )
    result = trainer.fit()
    assert trainer.bf16 is native
    assert dtypes == ({torch.bfloat16} if native else {torch.float32})
    assert all(np.isfinite(entry["train"]["loss"]) for entry in result.history)
    fell_back = "this CPU has no native bf16" in caplog.text
    assert fell_back is not native
    # validated under bf16, so the model folder asks the Predictor to score it under bf16
    card = yaml.safe_load((result.model_dir / "model.yaml").read_text())
    assert card["precision"] == ("bf16" if native else "fp32")


def test_research_format_trains_through_the_formats_registry(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "nyuv2"
    for split, count in (("train", 8), ("val", 3)):
        for folder in ("image", "label", "depth", "normal"):
            (root / split / folder).mkdir(parents=True)
        for i in range(count):
            normals = rng.normal(size=(24, 32, 3)).astype(np.float32)
            normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
            arrays = {
                "image": rng.random((24, 32, 3)).astype(np.float32),
                "label": rng.integers(-1, 13, (24, 32)).astype(np.float32),
                "depth": rng.uniform(0.5, 5.0, (24, 32)).astype(np.float32),
                "normal": normals,
            }
            for folder, array in arrays.items():
                np.save(root / split / folder / f"{i}.npy", array)
    config = {
        "model": {
            "arch": "ctal",
            "tasks": ["semseg", "depth", "normals"],
            "input_size": [24, 32],
            "decoder_channels": 64,
            "affinity_channels": 32,
        },
        "data": {"format": "nyuv2", "path": str(root), "augment": {"scales": [1.0, 1.25]}},
        "loss": {"weights": {"depth": 2.0}},
        "early_stopping": {"metric": "semseg.miou", "patience": 3},
        "epochs": 1,
        "batch_size": 4,
        "progress": False,
        "output": str(tmp_path / "out"),
    }
    result = train(validate_train_config(config))
    assert result.steps == 2
    assert set(result.best_metrics) == set(metric_directions(config["model"]["tasks"])) | {
        "val_loss"
    }
    predictor = Predictor.from_folder(result.model_dir)
    assert predictor.card.class_names[0] == "bed" and len(predictor.card.class_names) == 13
    lineage = json.loads((result.model_dir / "lineage.json").read_text())
    assert lineage["dataset"]["format"] == "nyuv2" and lineage["dataset"]["manifest_sha256"] is None
    stats = pq.read_table(result.model_dir / "reference_stats.parquet")
    assert stats.num_rows == 3 and "pred_depth_mean" in stats.column_names
