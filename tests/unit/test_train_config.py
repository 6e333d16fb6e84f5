"""The training config: strict keys, types, cross-field rules, overrides (flag > env > file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cta_model.errors import ConfigError
from cta_model.train_config import (
    ENV_OVERRIDES,
    TrainConfig,
    apply_overrides,
    config_differences,
    env_overrides,
    load_train_config,
    resolve_overrides,
    validate_train_config,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def minimal(**extra) -> dict:
    return {"data": {"path": "/data/lines"}, "epochs": 1, "output": "/tmp/out", **extra}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_train_config(data, "cfg.yaml")
    return str(info.value)


def test_defaults_follow_the_paper_recipe():
    config = validate_train_config(minimal())
    assert config.model.arch == "ctal"
    assert config.model.backbone == "hrnet-w18-small-v2"
    assert config.optim.name == "adam" and config.schedule.name == "cosine"
    assert config.batch_size == 8 and config.loss.deep_supervision
    assert config.early_stopping.metric == "val_loss"
    assert not config.compile and not config.distill.enabled


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (minimal(optimizer={"lr": 1}), "optimizer"),
        (minimal(optim={"lrr": 1e-3}), "optim.lrr"),
        (minimal(model={"arch": "ctal", "headz": 2}), "model.headz"),
        ({**minimal(), "data": {"path": "x", "augment": {"flip": True}}}, "data.augment.flip"),
    ],
)
def test_unknown_keys_are_rejected_by_name(data, key):
    message = error_of(data)
    assert f"cfg.yaml: {key}: unknown key" in message


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (minimal(batch_size="eight"), "batch_size"),
        (minimal(optim={"lr": "fast"}), "optim.lr"),
        (minimal(optim={"lr": -1}), "optim.lr"),
        (minimal(model={"input_size": [64]}), "model.input_size"),
        (minimal(model={"arch": "unet"}), "model.arch"),
        (minimal(precision="fp16"), "precision"),
        (minimal(model={"tasks": "semseg,colour"}), "model.tasks"),
    ],
)
def test_wrong_types_and_values_name_the_key(data, key):
    assert f"cfg.yaml: {key}" in error_of(data)


def test_data_needs_exactly_one_source():
    base = {"epochs": 1, "output": "o"}
    assert "exactly one of data.path, data.dataset_ref, data.synthetic (got none)" in error_of(
        {**base, "data": {}}
    )
    two = {**base, "data": {"path": "x", "synthetic": {"lines": 1}}}
    assert "(got path, synthetic)" in error_of(two)
    three = {**base, "data": {"path": "x", "dataset_ref": "r.json", "synthetic": {}}}
    assert "(got path, dataset_ref, synthetic)" in error_of(three)
    for source in ({"path": "x"}, {"dataset_ref": "r.json"}, {"synthetic": {"lines": 2}}):
        validate_train_config({**base, "data": source})


def test_research_formats_read_data_path():
    config = validate_train_config(minimal(data={"path": "/nyu", "format": "nyuv2"}))
    assert config.data.format == "nyuv2"
    message = error_of({**minimal(), "data": {"synthetic": {}, "format": "cityscapes"}})
    assert "format 'cityscapes' reads data.path" in message


def test_cross_field_rules_have_clear_messages():
    assert "loss.weights names tasks ['depth']" in error_of(minimal(loss={"weights": {"depth": 1}}))
    assert "early_stopping.metric 'semseg.iou' is not a metric" in error_of(
        minimal(early_stopping={"metric": "semseg.iou"})
    )
    assert "arch 'ctal' needs at least 2 tasks" in error_of(minimal(model={"tasks": ["semseg"]}))
    assert "give epochs or max_steps" in error_of({"data": {"path": "x"}, "output": "o"})
    assert "weights apply to weighting 'fixed' only" in error_of(
        minimal(loss={"weighting": "dwa", "weights": {"semseg": 2}})
    )
    assert "output_stride applies to ResNet" in error_of(minimal(model={"output_stride": 8}))
    assert "must divide by grad_accum_steps" in error_of(minimal(batch_size=6, grad_accum_steps=4))


def test_early_stopping_direction_comes_from_the_registry():
    config = validate_train_config(minimal(early_stopping={"metric": "semseg.miou"}))
    assert config.metric_direction("semseg.miou") == "higher"
    assert config.metric_direction("height.abs_err_mm") == "lower"
    assert config.metric_direction("val_loss") == "lower"


def test_global_batch_splits_over_processes_and_accumulation():
    config = validate_train_config(minimal(batch_size=8, grad_accum_steps=2))
    assert config.micro_batch_size(1) == 4
    assert config.micro_batch_size(2) == 2
    with pytest.raises(ConfigError, match="world_size x grad_accum_steps = 3 x 2"):
        config.micro_batch_size(3)


def test_env_overrides_map_the_documented_variables():
    environ = {
        "CTA_ARCH": "hps",
        "CTA_TASKS": "semseg,height",
        "CTA_BACKBONE": "resnet18",
        "CTA_DATA": "s3://bucket/lines",
        "CTA_OUT": "/runs/x",
        "CTA_UNRELATED": "ignored",
        "HOME": "/root",
    }
    assert env_overrides(environ) == {
        "model.arch": "hps",
        "model.tasks": "semseg,height",
        "model.backbone": "resnet18",
        "data.path": "s3://bucket/lines",
        "output": "/runs/x",
    }
    assert set(ENV_OVERRIDES) == {"CTA_ARCH", "CTA_TASKS", "CTA_BACKBONE", "CTA_DATA", "CTA_OUT"}
    assert env_overrides({"CTA_DATA": "/refs/dataset_ref.json"}) == {
        "data.dataset_ref": "/refs/dataset_ref.json"
    }
    assert env_overrides({"CTA_ARCH": ""}) == {}


def test_precedence_is_flag_over_env_over_file(tmp_path):
    path = write(tmp_path, minimal(model={"arch": "ctal", "backbone": "resnet18"}, output="file"))
    environ = {"CTA_ARCH": "hps", "CTA_OUT": "env-out"}
    flags = {"model.arch": "stl", "output": None, "optim.lr": 0.01}  # None: flag not given
    config = load_train_config(path, resolve_overrides(flags, environ))
    assert config.model.arch == "stl"  # flag beats env and file
    assert config.output == "env-out"  # env beats file
    assert config.model.backbone == "resnet18"  # file where nothing overrides
    assert config.optim.lr == 0.01
    assert load_train_config(path, resolve_overrides({}, environ)).model.arch == "hps"
    assert load_train_config(path).model.arch == "ctal"


def test_a_data_override_replaces_the_files_source(tmp_path):
    path = write(tmp_path, {**minimal(), "data": {"synthetic": {"lines": 2}, "num_workers": 3}})
    config = load_train_config(path, env_overrides({"CTA_DATA": "/data/real"}))
    assert config.data.path == "/data/real" and config.data.synthetic is None
    assert config.data.num_workers == 3  # the rest of the section stays
    ref = load_train_config(path, {"data.dataset_ref": "ref.json"})
    assert ref.data.dataset_ref == "ref.json" and ref.data.synthetic is None
    assert apply_overrides({"a": {"b": 1}}, {"a.c": 2}) == {"a": {"b": 1, "c": 2}}


def test_string_overrides_are_parsed_and_unknown_ones_named(tmp_path):
    path = write(tmp_path, minimal())
    config = load_train_config(path, {"batch_size": "16", "model.tasks": "semseg,normals"})
    assert config.batch_size == 16 and config.model.tasks == ("semseg", "normals")
    with pytest.raises(ConfigError, match=r"train.yaml .*optim.betas: unknown key"):
        load_train_config(path, {"optim.betas": [0.9, 0.99]})


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_train_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 1\nepochs: 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_train_config(bad)


def test_trajectory_hash_ignores_where_and_how_often_but_not_what():
    base = validate_train_config(minimal())
    same = validate_train_config(
        minimal(output="/elsewhere", progress=False, checkpoint={"every_steps": 5})
    )
    assert base.trajectory_hash() == same.trajectory_hash()
    other = validate_train_config(minimal(optim={"lr": 0.5}))
    assert base.trajectory_hash() != other.trajectory_hash()
    differences = config_differences(base.trajectory_dict(), other.trajectory_dict())
    assert differences == ["optim.lr: 0.0001 -> 0.5"]


@pytest.mark.parametrize(
    "name", ["demo.yaml", "synthetic-benchmark.yaml", "nyuv2-ctal.yaml", "cityscapes-ctal.yaml"]
)
def test_shipped_configs_validate(name):
    config = load_train_config(REPO / "configs" / name)
    assert isinstance(config, TrainConfig)
    assert config.model.arch == "ctal" and config.model.backbone == "hrnet-w18-small-v2"


def test_paper_recipes():
    nyu = load_train_config(REPO / "configs" / "nyuv2-ctal.yaml")
    assert nyu.model.input_size == (288, 384) and nyu.epochs == 200
    assert (nyu.optim.name, nyu.optim.lr, nyu.optim.weight_decay) == ("adam", 1e-4, 1e-4)
    assert nyu.model.tasks == ("semseg", "depth", "normals") and nyu.batch_size == 8
    assert nyu.data.format == "nyuv2" and nyu.data.augment.scales == (1.0,)
    city = load_train_config(REPO / "configs" / "cityscapes-ctal.yaml")
    assert city.model.input_size == (128, 256) and city.epochs == 75 and city.optim.lr == 5e-4
    assert city.loss.weights == {"semseg": 1.0, "depth": 10.0}
    assert city.data.format == "cityscapes" and city.data.augment.hflip


@pytest.mark.parametrize(
    ("precision", "device_type", "native", "expected"),
    [
        ("fp32", "cuda", True, False),
        ("fp32", "cpu", True, False),
        ("bf16", "cuda", False, True),  # asked for on a GPU: honoured
        ("bf16", "cpu", True, True),  # AVX512-BF16 / AMX
        ("bf16", "cpu", False, False),  # emulated bf16 is slower than fp32
        ("auto", "cuda", True, True),
        ("auto", "cuda", False, False),
        ("auto", "cpu", True, False),  # a CPU run's numerics change only when asked for
    ],
)
def test_precision_decides_bf16_by_device_and_native_support(
    precision, device_type, native, expected
):
    config = validate_train_config(minimal(precision=precision))
    assert config.use_bf16(device_type, native) is expected
