"""The training config (`cta train --config FILE`): one strict pydantic model, no unknown keys.

Sections (every key is optional unless marked; defaults follow the paper's recipe, DESIGN 3.1)::

    model:          arch (stl | hps | hps-light | ctal), backbone, tasks ("a,b" or a list),
                    input_size [h, w], output_stride (ResNet: 8 | 16 | 32), backbone_weights
                    (a local file), init_from (a model folder whose weights start the run),
                    decoder_channels, affinity_channels, gamma, fusion_kernel_size,
                    shared_fusion, affinity_mode (auto | dense | blocked | linear | pooled),
                    affinity_block_size (null = sized by memory), affinity_pool_factor
                    (pooled only), num_classes (default: from the dataset)
    loss:           weighting (fixed | uncertainty | dwa), weights {task: float} (fixed only),
                    deep_supervision, dwa_temperature, defects {reject_weight, focal_gamma,
                    dice_weight} (the class task's loss for rare defects; defaults = plain CE)
    data:           exactly one of path (line dataset folder, s3:// URI, or a research-format
                    root with `format`), dataset_ref (dataset_ref.json: its `uri` is read and
                    its `quarantine` skipped) or synthetic {lines, samples_per_line, size, seed}
                    (generated once into <cache_dir>/synthetic/<hash>); format (line | nyuv2 |
                    cityscapes | mvtec-ad | mvtec-3d-ad), format_options, lines_config,
                    train_split, val_split (never `test` for a line dataset: test is scored
                    once per model), augment {hflip, scales}, tiling (null = whole images
                    resized to model.input_size; else tiles of input_size cut at the images'
                    own pitch: defect_fraction, tiles_per_image, val_tiles_per_image,
                    overlap_px), anomalies (null = off; synthetic anomalies pasted into
                    training images: cta_model.data.anomalies.AnomalyConfig keys plus
                    class_id, region_classes), num_workers, cache_dir, memory_cache_mb
                    (decoded samples kept in memory per loader process, up to this many MiB;
                    0 = decode every time; with num_workers > 0 each worker's cache lasts one
                    epoch, as the workers do)
    inspection:     reject_classes (null = the dataset's, else configs/inspection.yaml's),
                    score_window_px: the defect score the model folder records
    optim:          name (adam | adamw | sgd), lr, weight_decay, momentum (sgd), grad_clip,
                    max_skipped_steps_in_a_row (a step with a non-finite loss or gradient is
                    skipped on every rank; this many in a row stop the run with an error)
    schedule:       name (cosine | constant), warmup_steps
    epochs / max_steps (at least one; training stops at whichever comes first)
    batch_size      GLOBAL samples per optimizer step, over all processes and accumulation
                    micro-steps (so a recipe means the same on 1 or N processes); it must divide
                    by world_size * grad_accum_steps
    grad_accum_steps, seed, deterministic, precision (fp32 | bf16: autocast on CUDA and on
    CPUs with native bf16 | auto: bf16 on GPUs with bf16, fp32 on CPUs), channels_last,
    compile, progress
    checkpoint:     every_steps (0 = only at epoch ends), keep_last
    early_stopping: metric ("val_loss" or "<task>.<metric>", direction from the task
                    registry; also the model-selection metric), patience (null = never stop),
                    min_delta
    eval:           miou_rule, reduction (pooled | batch_mean | mtan), batch_size (per process)
    distill:        enabled, ema_decay, seg_confidence (EMA-teacher labels for absent tasks)
    output          (required) run folder: checkpoints/, model/, train_result.json
    debug:          test hooks: mask_tasks_by_rank {rank: [tasks]}, dump_param_hashes,
                    nan_loss_steps_by_rank {rank: [steps]}

Precedence flag > env > file: the CLI builds `resolve_overrides(flags, os.environ)` and calls
`load_train_config(path, overrides)`. Environment variables (`ENV_OVERRIDES`):

    CTA_ARCH -> model.arch        CTA_TASKS -> model.tasks      CTA_BACKBONE -> model.backbone
    CTA_DATA -> data.path (data.dataset_ref when it ends in .json)            CTA_OUT -> output

Setting any data source (path, dataset_ref, synthetic) through an override replaces the file's
source, so `CTA_DATA=/data/x` works with a config that names a synthetic dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from cta_model.config import StrictModel, read_yaml, set_dotted, validate_config
from cta_model.data.anomalies import AnomalyConfig
from cta_model.errors import ConfigError
from cta_model.nn.models import ModelSpec, NetworkSettings
from cta_model.tasks import metric_directions

DataFormat = Literal["line", "nyuv2", "cityscapes", "mvtec-ad", "mvtec-3d-ad"]
VAL_LOSS = "val_loss"
TEST_SPLIT = "test"

#: Environment variable -> dotted config key (the middle layer of flag > env > file).
ENV_OVERRIDES: dict[str, str] = {
    "CTA_ARCH": "model.arch",
    "CTA_TASKS": "model.tasks",
    "CTA_BACKBONE": "model.backbone",
    "CTA_DATA": "data.path",
    "CTA_OUT": "output",
}
_DATA_SOURCES = ("path", "dataset_ref", "synthetic")

# Stated bounds (docs/training.md); every float is finite (cta_model.config.StrictModel).
MAX_SEED = 2**32 - 1  # what numpy's seeding accepts
MAX_EPOCHS = 100_000
MAX_STEPS = 1_000_000_000
MAX_BATCH_SIZE = 65_536
MAX_WORKERS = 256
MAX_SCALE = 8.0  # zoom factor of augment.scales
MAX_IMAGE_SIDE = 8192  # synthetic scene size (model.input_size: cta_model.nn.models)


class ModelConfig(NetworkSettings):
    """The network's settings (defaults and checks in `NetworkSettings`) plus where its
    initial weights come from."""

    init_from: str | None = None

    def spec(self, num_classes: int | None) -> ModelSpec:
        """The network to train, with `num_classes` resolved from the dataset."""
        settings = self.model_dump(exclude={"init_from"})
        return ModelSpec(**{**settings, "num_classes": num_classes})


class DefectLossConfig(StrictModel):
    """The class task's loss for rare defects (cta_model.losses.DefectAwareCrossEntropy)."""

    reject_weight: float = Field(default=1.0, gt=0, le=1000)
    focal_gamma: float = Field(default=0.0, ge=0, le=10)
    dice_weight: float = Field(default=0.0, ge=0, le=100)

    @property
    def is_plain(self) -> bool:
        return self.reject_weight == 1.0 and not self.focal_gamma and not self.dice_weight


class InspectionSettings(StrictModel):
    """What the model folder records about its defect score (cta_model.inspection)."""

    reject_classes: tuple[int, ...] | None = None
    score_window_px: int = 3

    @field_validator("reject_classes")
    @classmethod
    def _distinct(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and (not value or min(value) < 0 or len(set(value)) != len(value)):
            raise ValueError(f"must be distinct class ids >= 0, got {list(value)}")
        return value

    @field_validator("score_window_px")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value < 1 or value % 2 == 0 or value > 101:
            raise ValueError(f"must be an odd number of pixels in [1, 101], got {value}")
        return value


class LossConfig(StrictModel):
    weighting: Literal["fixed", "uncertainty", "dwa"] = "fixed"
    weights: dict[str, Annotated[float, Field(ge=0, le=1e6)]] = Field(default_factory=dict)
    deep_supervision: bool = True
    dwa_temperature: float = Field(default=2.0, gt=0, le=1e6)
    defects: DefectLossConfig = Field(default_factory=DefectLossConfig)

    @model_validator(mode="after")
    def _weights_for_fixed(self) -> LossConfig:
        if self.weights and self.weighting != "fixed":
            raise ValueError(
                f"weights apply to weighting 'fixed' only; weighting {self.weighting!r} "
                "learns or computes its own"
            )
        return self


class SyntheticData(StrictModel):
    lines: int = Field(default=3, ge=1, le=1000)
    samples_per_line: int = Field(default=200, ge=2, le=1_000_000)
    size: int = Field(default=128, ge=16, le=MAX_IMAGE_SIDE)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)


class AugmentConfig(StrictModel):
    hflip: bool = True
    scales: tuple[float, ...] = (1.0,)

    @field_validator("scales")
    @classmethod
    def _positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or min(value) <= 0 or max(value) > MAX_SCALE:
            raise ValueError(
                f"must be a non-empty list of zoom factors in (0, {MAX_SCALE:g}], got {list(value)}"
            )
        return value


class TilingConfig(StrictModel):
    """Train on tiles of model.input_size cut at the images' own pitch (no resampling)."""

    # Share of training tiles centred on a reject-class pixel (images with such pixels only):
    # oversampling of rare defects. The rest are centred on a random labelled pixel.
    defect_fraction: float = Field(default=0.5, ge=0, le=1)
    tiles_per_image: int = Field(default=1, ge=1, le=64)  # training tiles per image per epoch
    val_tiles_per_image: int = Field(default=4, ge=1, le=64)  # fixed validation tiles
    overlap_px: int = Field(
        default=16, ge=0, le=MAX_IMAGE_SIDE
    )  # between tiles at inference (model.yaml)


class AnomalyTrainConfig(AnomalyConfig):
    """Synthetic anomalies pasted into training images (cta_model.data.anomalies)."""

    class_id: int | None = Field(default=None, ge=0)  # label of pasted pixels (a reject class;
    # null = the first reject class)
    region_classes: tuple[int, ...] | None = None  # where anomalies go (null = anywhere labelled)


class DataConfig(StrictModel):
    path: str | None = None
    dataset_ref: str | None = None
    synthetic: SyntheticData | None = None
    format: DataFormat = "line"
    format_options: dict[str, Any] = Field(default_factory=dict)
    lines_config: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    tiling: TilingConfig | None = None
    anomalies: AnomalyTrainConfig | None = None
    num_workers: int = Field(default=0, ge=0, le=MAX_WORKERS)
    cache_dir: str = ".cta/cache"
    # Decoded train / val samples kept in memory (each loader process its own), in MiB: a
    # tile is a fraction of its image, so without it every tile decodes the whole image again.
    memory_cache_mb: int = Field(default=0, ge=0, le=2**20)

    @model_validator(mode="after")
    def _exactly_one_source(self) -> DataConfig:
        given = [name for name in _DATA_SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            what = "none" if not given else ", ".join(given)
            raise ValueError(
                f"give exactly one of data.path, data.dataset_ref, data.synthetic (got {what})"
            )
        if self.format != "line" and self.path is None:
            raise ValueError(f"format {self.format!r} reads data.path; set data.path to its root")
        if self.format == "line" and self.format_options:
            raise ValueError("format_options apply to research formats (data.format), not 'line'")
        if self.train_split == self.val_split:
            raise ValueError(f"train_split and val_split are both {self.train_split!r}")
        return self

    @field_validator("train_split", "val_split")
    @classmethod
    def _never_test(cls, value: str, info: ValidationInfo) -> str:
        if value == TEST_SPLIT and info.data.get("format", "line") == "line":
            raise ValueError(
                f"{TEST_SPLIT!r}: the test split is scored once per model and never trains or "
                "selects one (DESIGN 5.3); use train and val (an imported dataset carves val "
                "from its test images: cta data import)"
            )
        return value


class OptimConfig(StrictModel):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    grad_clip: float | None = Field(default=None, gt=0)
    # A step whose loss or gradients are not finite is skipped (on every rank); this many in a
    # row stop the run with an error.
    max_skipped_steps_in_a_row: int = Field(default=5, ge=1, le=10_000)


class ScheduleConfig(StrictModel):
    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0, le=MAX_STEPS)


class CheckpointConfig(StrictModel):
    every_steps: int = Field(default=0, ge=0, le=MAX_STEPS)
    keep_last: int = Field(default=3, ge=1, le=1000)


class EarlyStoppingConfig(StrictModel):
    metric: str = VAL_LOSS
    patience: int | None = Field(default=None, ge=1, le=MAX_EPOCHS)
    min_delta: float = Field(default=0.0, ge=0)


class EvalConfig(StrictModel):
    miou_rule: Literal["nanmean_union", "strict", "zero_union_as_0"] = "nanmean_union"
    reduction: Literal["pooled", "batch_mean", "mtan"] = "pooled"  # metrics.EVAL_REDUCTIONS
    batch_size: int | None = Field(default=None, ge=1, le=MAX_BATCH_SIZE)


class DistillConfig(StrictModel):
    enabled: bool = False
    ema_decay: float = Field(default=0.999, ge=0, lt=1)
    seg_confidence: float = Field(default=0.9, ge=0, le=1)


class DebugConfig(StrictModel):
    """Test hooks; never needed in a real run."""

    # Pretend rank r has no labels for these tasks (partial labels by rank, for the DDP test).
    mask_tasks_by_rank: dict[int, tuple[str, ...]] = Field(default_factory=dict)
    # Each rank writes <output>/debug/params-rank<r>.sha256 at the end.
    dump_param_hashes: bool = False
    # Rank r's loss value is NaN at these optimizer steps (1-based; its gradients stay finite):
    # the step must be skipped on every rank.
    nan_loss_steps_by_rank: dict[int, tuple[int, ...]] = Field(default_factory=dict)


class TrainConfig(StrictModel):
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    epochs: int | None = Field(default=None, ge=1, le=MAX_EPOCHS)
    max_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    batch_size: int = Field(default=8, ge=1, le=MAX_BATCH_SIZE)
    grad_accum_steps: int = Field(default=1, ge=1, le=MAX_BATCH_SIZE)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    deterministic: bool = True
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    channels_last: bool = False
    compile: bool = False
    progress: bool = True
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    inspection: InspectionSettings = Field(default_factory=InspectionSettings)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    output: str
    debug: DebugConfig = Field(default_factory=DebugConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
        tasks = self.model.tasks
        unknown = sorted(set(self.loss.weights) - set(tasks))
        if unknown:
            raise ValueError(
                f"loss.weights names tasks {unknown} that are not in model.tasks {list(tasks)}"
            )
        metric = self.early_stopping.metric
        known = [VAL_LOSS, *metric_directions(tasks)]
        if metric not in known:
            raise ValueError(
                f"early_stopping.metric {metric!r} is not a metric of this run; "
                f"choose one of {', '.join(known)}"
            )
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give epochs or max_steps (or both: the first reached stops)")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"batch_size {self.batch_size} must divide by grad_accum_steps "
                f"{self.grad_accum_steps}"
            )
        for rank, masked in self.debug.mask_tasks_by_rank.items():
            if set(masked) - set(tasks):
                raise ValueError(f"debug.mask_tasks_by_rank[{rank}] names tasks not in model.tasks")
        return self

    # ---- derived values -----------------------------------------------------------------
    def metric_direction(self, metric: str) -> Literal["higher", "lower"]:
        return "lower" if metric == VAL_LOSS else metric_directions(self.model.tasks)[metric]

    def use_bf16(self, device_type: str, native_bf16: bool) -> bool:
        """bf16 autocast or not. ``bf16``: always on CUDA, on a CPU where bf16 is native
        (emulated it is slower than fp32). ``auto``: on a GPU with bf16; CPUs stay fp32, so a
        CPU run's numerics change only when asked for."""
        if self.precision == "bf16":
            return device_type == "cuda" or (device_type == "cpu" and native_bf16)
        return self.precision == "auto" and device_type == "cuda" and native_bf16

    def micro_batch_size(self, world_size: int) -> int:
        per_step = world_size * self.grad_accum_steps
        if self.batch_size % per_step:
            raise ConfigError(
                f"batch_size {self.batch_size} (global, per optimizer step) must divide by "
                f"world_size x grad_accum_steps = {world_size} x {self.grad_accum_steps}"
            )
        return self.batch_size // per_step

    def trajectory_dict(self) -> dict[str, Any]:
        """The keys that decide the training trajectory (what a resume must agree on).

        Where output goes, progress bars, worker count, checkpoint cadence and debug hooks do
        not change the weights, so a resumed run may change them.
        """
        data = self.model_dump(mode="json")
        for key in ("output", "progress", "checkpoint", "debug"):
            data.pop(key)
        data["optim"].pop("max_skipped_steps_in_a_row")  # stops a run, never changes its steps
        data["data"].pop("num_workers")
        data["data"].pop("cache_dir")
        data["data"].pop("memory_cache_mb")  # the same samples, decoded once or every time
        return data

    def trajectory_hash(self) -> str:
        text = json.dumps(self.trajectory_dict(), sort_keys=True, allow_nan=True)
        return hashlib.sha256(text.encode()).hexdigest()


def config_differences(
    old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts, with both values."""
    out: list[str] = []
    for key in sorted(set(old) | set(new), key=str):
        where = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(config_differences(a, b, where + "."))
        elif not _same(a, b):
            out.append(f"{where}: {a!r} -> {b!r}")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


# ---- loading with overrides ------------------------------------------------------------------
def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Dotted overrides from the CTA_* environment variables in ENV_OVERRIDES (unset or empty
    variables are skipped). CTA_DATA ending in .json is taken as a dataset_ref file."""
    out: dict[str, Any] = {}
    for variable, key in ENV_OVERRIDES.items():
        value = environ.get(variable)
        if not value:
            continue
        if variable == "CTA_DATA" and value.endswith(".json"):
            key = "data.dataset_ref"
        out[key] = value
    return out


def resolve_overrides(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """flag > env: environment overrides first, then flags (a None flag means 'not given')."""
    merged = env_overrides(environ or {})
    for key, value in (flags or {}).items():
        if value is not None:
            merged[key] = value
    return merged


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set each dotted key; a data source override replaces the source given below it."""
    out = dict(data)
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head == "data" and rest.split(".")[0] in _DATA_SOURCES:
            source = rest.split(".")[0]
            section = dict(out.get("data") or {})
            for other in _DATA_SOURCES:
                if other != source:
                    section.pop(other, None)
            out["data"] = section
        out = set_dotted(out, key, value)
    return out


def validate_train_config(data: Any, source: str = "<config>") -> TrainConfig:
    return validate_config(TrainConfig, data, source)


def load_train_config(
    path: str | Path | None, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """Read the YAML file (or start empty with path None), apply dotted overrides, validate.

    Errors name the file and the key path, e.g. `configs/demo.yaml: optim.lr: ...`.
    """
    data: Any = {} if path is None else read_yaml(path)
    if data is None:
        data = {}
    source = "<overrides>" if path is None else str(path)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} (with overrides {', '.join(overrides)})"
    return validate_train_config(data, source)


__all__ = [
    "ENV_OVERRIDES",
    "VAL_LOSS",
    "TrainConfig",
    "apply_overrides",
    "config_differences",
    "env_overrides",
    "load_train_config",
    "resolve_overrides",
    "validate_train_config",
]
