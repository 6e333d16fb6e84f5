"""The task registry: one declarative spec per dense task (DESIGN 4.1).

Everything that differs between tasks lives here: units, the invalid-label rule, how flips and
scale-crops transform a label, how it is stored in a line dataset, the loss, the metrics with
their directions and the primary metric, how a prediction is summarised for serving and which
role (``kind``) the inspection figures give it. Models, losses, meters, the line-dataset format,
evaluation, serving, logging, model selection and Delta_m all iterate this registry; nothing else
switches on task names. Adding a task means adding one `TaskSpec`: to `TASKS` here, or from a
plugin module named in ``$CTA_TASK_PLUGINS`` (see `load_task_plugins`).

Layouts: a label in memory (torch) is (H, W) for class ids and (C, H, W) otherwise; a batch adds
a leading B. The numpy layout (datasets, files, decoded predictions) is (H, W) for class ids and
one-channel labels, (H, W, C) otherwise. Raw predictions are (B, out_channels, H, W).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from cta_model import losses, metrics
from cta_model.errors import ConfigError
from cta_model.nn.functional import class_ids, unit_vectors

Direction = Literal["higher", "lower"]
#: The role a task plays beyond its own metrics (at most one task of each but ``values``):
#: ``classes`` gives the class ids ((H, W) int, -1 invalid) that the inspection verdict, the
#: defect truth and the boundary bands read; ``surface_height`` the heights ((H, W) float mm,
#: NaN invalid) that the dimension checks and the drop-out robustness read; ``values``: none.
TaskKind = Literal["classes", "surface_height", "values"]
Summary = Callable[[np.ndarray, Sequence[str]], dict[str, Any]]

#: Environment variable naming plugin modules (comma-separated) whose TASK_SPECS are registered
#: when this module is imported, in every process (training workers, `cta serve`, ...).
TASK_PLUGINS_ENV = "CTA_TASK_PLUGINS"
#: Invalid class id in semseg files (-1 in memory), by the file's integer width (DESIGN 4.1).
SEMSEG_INVALID_UINT8 = 255
SEMSEG_INVALID_UINT16 = 65535
_TASK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # a column stem, folder and metric-key prefix


@dataclass(frozen=True)
class MetricSpec:
    name: str
    direction: Direction
    unit: str = ""


def _identity_float32(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


@dataclass(frozen=True)
class LineFile:
    """How a task's labels are stored in a line dataset (DESIGN 4.2).

    Files: ``<task>/<line>/<sample_id><suffix>``, in the numpy layout; manifest columns
    ``<task>_path``, ``has_<task>`` and ``sha256_<task>``. A ``.png`` holds integer ids (mode L
    or I;16), a ``.npy`` float32. ``encode`` maps a label (numpy layout, invalid as in memory) to
    the array written; ``decode`` maps the array read back. ``clean`` names a companion ``.npy``
    (same layout, folder and columns named after it) with the label before sensor drop-out:
    synthetic data carry it, evaluation scores drop-out robustness against it.
    """

    suffix: Literal[".png", ".npy"]
    encode: Callable[[np.ndarray], np.ndarray] = _identity_float32
    decode: Callable[[np.ndarray], np.ndarray] = _identity_float32
    clean: str | None = None

    @property
    def companions(self) -> tuple[str, ...]:
        return (self.clean,) if self.clean else ()


@dataclass(frozen=True)
class TaskSpec:
    """How one task is stored, transformed, learned and scored."""

    name: str
    description: str
    unit: str
    label_channels: int  # channels of a label in memory; 0 = no channel axis (class ids)
    label_dtype: torch.dtype
    invalid_rule: str  # human-readable, shown in docs and errors
    valid_mask: Callable[[torch.Tensor], torch.Tensor]  # label -> bool mask (B, H, W) / (H, W)
    fill_value: float  # what an absent label is filled with so batches still collate
    flip_negates_channel: int | None  # normals: n_x changes sign under a horizontal flip
    divide_by_scale: bool  # depth: a scale-crop by s brings the scene s times closer
    renormalize_after_resize: bool  # normals stay unit vectors after nearest resize
    loss: str  # name in losses.PIXEL_LOSSES
    metrics: tuple[MetricSpec, ...]  # primary first
    make_meter: Callable[..., metrics.Meter]
    # One image's decoded prediction (numpy layout) and the class names -> the JSON summary
    # `cta serve` answers under "tasks".
    summarize: Summary
    activation: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda x: x)
    fixed_out_channels: int | None = None  # None: depends on the dataset (number of classes)
    kind: TaskKind = "values"
    line_file: LineFile | None = None  # None: not stored in line datasets (research formats)
    sensor: str | None = None  # the line sensor whose data give the label (None: annotated)

    @property
    def primary_metric(self) -> MetricSpec:
        return self.metrics[0]

    @property
    def needs_num_classes(self) -> bool:
        return self.fixed_out_channels is None

    # ---- the numpy layout: one sample (H, W) / (H, W, C) ----
    def numpy_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (height, width) if self.label_channels <= 1 else (height, width, self.label_channels)

    def absent_label(self, height: int, width: int) -> np.ndarray:
        """The label of a sample without one: every pixel invalid (numpy layout)."""
        dtype = np.int64 if self.label_channels == 0 else np.float32
        return np.full(self.numpy_shape(height, width), self.fill_value, dtype=dtype)

    def out_channels(self, num_classes: int | None = None) -> int:
        if self.fixed_out_channels is not None:
            return self.fixed_out_channels
        if not num_classes or num_classes < 2:
            raise ConfigError(f"task {self.name!r} needs num_classes >= 2, got {num_classes!r}")
        return num_classes

    def metric_direction(self, metric: str) -> Direction:
        for spec in self.metrics:
            if spec.name == metric:
                return spec.direction
        raise KeyError(f"task {self.name!r} has no metric {metric!r}")

    # ---- geometric transforms of a label (one sample or a batch; width is the last axis) ----
    def hflip(self, label: torch.Tensor) -> torch.Tensor:
        flipped = label.flip(-1)
        if self.flip_negates_channel is not None:
            channel_axis = -3
            sign = torch.ones(label.shape[channel_axis], dtype=label.dtype, device=label.device)
            sign[self.flip_negates_channel] = -1
            flipped = flipped * sign.view(-1, 1, 1)
        return flipped

    def resize(
        self, label: torch.Tensor, size: tuple[int, int], scale: float = 1.0
    ) -> torch.Tensor:
        """Nearest resize to `size`; `scale` is the zoom factor s of a scale-crop."""
        no_channel_axis = self.label_channels == 0
        x = label.unsqueeze(-3) if no_channel_axis else label
        batched = x.dim() == 4
        x = x if batched else x.unsqueeze(0)
        # nearest-exact samples at pixel centres, as the image's bilinear resize does.
        out = F.interpolate(x.float(), size=size, mode="nearest-exact").to(label.dtype)
        out = out if batched else out.squeeze(0)
        out = out.squeeze(-3) if no_channel_axis else out
        if self.divide_by_scale:
            out = out / scale
        if self.renormalize_after_resize:
            norm = out.norm(dim=-3, keepdim=True)
            out = torch.where(norm > 0, out / norm.clamp_min(1e-12), out)
        return out

    def decode_prediction(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw head output (B, C, H, W) -> the label's layout: class ids (B, H, W), one value
        (B, H, W), or channels-last vectors (B, H, W, C) after the task's activation."""
        if self.label_channels == 0:
            return class_ids(raw)
        if self.label_channels == 1:
            return raw[:, 0]
        return self.activation(raw).permute(0, 2, 3, 1)

    # ---- scoring: numpy-layout batches -> the meter's tensors ----
    def label_batch(self, labels: Sequence[np.ndarray]) -> torch.Tensor:
        """Per-sample labels (numpy layout) -> one batch in the memory layout."""
        return self._memory_layout(np.stack(labels))

    def meter_prediction(self, decoded: np.ndarray, num_classes: int | None) -> torch.Tensor:
        """A decoded prediction batch (numpy layout, as the Predictor returns it) -> the meter's
        prediction. The meter of class ids takes scores and their argmax, so ids become a
        one-hot (uint8) score map whose argmax is the id itself."""
        if self.label_channels != 0:
            return self._memory_layout(decoded)
        if not num_classes:
            raise ConfigError(f"the model card has no num_classes for {self.name}")
        ids = torch.from_numpy(np.ascontiguousarray(decoded)).to(torch.int64)
        scores = torch.zeros((ids.shape[0], num_classes, *ids.shape[1:]), dtype=torch.uint8)
        return scores.scatter_(1, ids.unsqueeze(1), 1)

    def mask_label(self, label: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """A label batch (memory layout) with the pixels outside ``keep`` (B, H, W) invalid."""
        keep = keep if self.label_channels == 0 else keep.unsqueeze(1)
        return torch.where(keep, label, torch.full_like(label, self.fill_value))

    def _memory_layout(self, batch: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(batch))
        if self.label_channels == 0:
            return tensor.to(self.label_dtype)
        if self.label_channels == 1:
            return tensor.unsqueeze(1)
        return tensor.permute(0, 3, 1, 2)


def _decode_semseg(array: np.ndarray) -> np.ndarray:
    invalid = {np.dtype(np.uint8): SEMSEG_INVALID_UINT8, np.dtype(np.uint16): SEMSEG_INVALID_UINT16}
    out = array.astype(np.int64)
    marker = invalid.get(array.dtype)
    if marker is not None:
        out[array == marker] = -1
    return out


def _encode_semseg(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    wide = array.max(initial=0) >= SEMSEG_INVALID_UINT8
    dtype, invalid = (
        (np.uint16, SEMSEG_INVALID_UINT16) if wide else (np.uint8, SEMSEG_INVALID_UINT8)
    )
    return np.where(array < 0, invalid, array).astype(dtype)


def _semseg_valid(label: torch.Tensor) -> torch.Tensor:
    return label >= 0  # the upper bound (num_classes) is checked by the loss and the meter


def _height_valid(label: torch.Tensor) -> torch.Tensor:
    return ~torch.isnan(label).any(dim=-3)


def _depth_valid(label: torch.Tensor) -> torch.Tensor:
    return (label != 0).any(dim=-3)


def _normals_valid(label: torch.Tensor) -> torch.Tensor:
    return (label != 0).any(dim=-3)


def _unit_vectors(x: torch.Tensor) -> torch.Tensor:
    return unit_vectors(x, dim=1)


# ---- what `cta serve` answers per task for one image (decoded prediction, numpy layout) ----
def _summarize_classes(ids: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    counts = np.bincount(ids.ravel(), minlength=len(class_names))
    return {
        "class_names": list(class_names),
        "class_fractions": (counts / counts.sum()).round(6).tolist(),
    }


def _summarize_height(height: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    return {
        "mean_mm": float(height.mean()),
        "std_mm": float(height.std()),
        "p95_mm": float(np.percentile(height, 95)),
    }


def _summarize_depth(depth: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    return {"mean": float(depth.mean())}


def _summarize_normals(normals: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    z = np.clip(normals[..., 2], -1.0, 1.0)
    tilt = np.degrees(np.arccos(z))
    return {
        "z_mean": float(z.mean()),
        "tilt_deg_mean": float(tilt.mean()),
        "tilt_deg_p95": float(np.percentile(tilt, 95)),
    }


_ANGLE_METRICS = (
    MetricSpec("mean", "lower", "deg"),
    MetricSpec("median", "lower", "deg"),
    MetricSpec("within_11.25", "higher"),
    MetricSpec("within_22.5", "higher"),
    MetricSpec("within_30", "higher"),
    MetricSpec("median_hist", "lower", "deg"),
)

TASKS: dict[str, TaskSpec] = {
    "semseg": TaskSpec(
        name="semseg",
        description="defect / part segmentation, one class id per pixel",
        unit="class id",
        label_channels=0,
        label_dtype=torch.int64,
        invalid_rule="-1 in memory; 255 in uint8 files, 65535 in uint16 files",
        valid_mask=_semseg_valid,
        fill_value=-1,
        flip_negates_channel=None,
        divide_by_scale=False,
        renormalize_after_resize=False,
        loss="masked_cross_entropy",
        metrics=(MetricSpec("miou", "higher"), MetricSpec("pixel_acc", "higher")),
        make_meter=lambda num_classes=None, miou_rule="nanmean_union", reduction="pooled": (
            metrics.SegmentationMeter(num_classes, miou_rule=miou_rule, reduction=reduction)
        ),
        summarize=_summarize_classes,
        kind="classes",
        # DESIGN 4.1: invalid is 255 in uint8 files and 65535 in uint16 files.
        line_file=LineFile(".png", encode=_encode_semseg, decode=_decode_semseg),
    ),
    "height": TaskSpec(
        name="height",
        description="surface height in mm, signed, relative to the part datum",
        unit="mm",
        label_channels=1,
        label_dtype=torch.float32,
        invalid_rule="NaN in files and in memory",
        valid_mask=_height_valid,
        fill_value=float("nan"),
        flip_negates_channel=None,
        divide_by_scale=False,
        renormalize_after_resize=False,
        loss="masked_l1_nan_invalid",
        metrics=(MetricSpec("abs_err_mm", "lower", "mm"), MetricSpec("rmse_mm", "lower", "mm")),
        make_meter=lambda reduction="pooled", **_: metrics.HeightMeter(reduction=reduction),
        summarize=_summarize_height,
        fixed_out_channels=1,
        kind="surface_height",
        line_file=LineFile(".npy", clean="height_clean"),
        sensor="height",
    ),
    "depth": TaskSpec(
        name="depth",
        description="depth in metres (research formats)",
        unit="m",
        label_channels=1,
        label_dtype=torch.float32,
        invalid_rule="0",
        valid_mask=_depth_valid,
        fill_value=0.0,
        flip_negates_channel=None,
        divide_by_scale=True,
        renormalize_after_resize=False,
        loss="masked_l1_zero_invalid",
        metrics=(MetricSpec("abs_err", "lower", "m"), MetricSpec("rel_err", "lower")),
        make_meter=lambda reduction="pooled", **_: metrics.DepthMeter(reduction=reduction),
        summarize=_summarize_depth,
        fixed_out_channels=1,
    ),
    "normals": TaskSpec(
        name="normals",
        description="unit surface normals: +x image right, +y image down, +z towards the camera",
        unit="unit vector",
        label_channels=3,
        label_dtype=torch.float32,
        invalid_rule="(0, 0, 0)",
        valid_mask=_normals_valid,
        fill_value=0.0,
        flip_negates_channel=0,
        divide_by_scale=False,
        renormalize_after_resize=True,
        loss="cosine",
        metrics=_ANGLE_METRICS,
        make_meter=lambda reduction="pooled", **_: metrics.NormalsMeter(reduction=reduction),
        summarize=_summarize_normals,
        activation=_unit_vectors,
        fixed_out_channels=3,
        line_file=LineFile(".npy"),
        sensor="height",  # computed from the height sensor's surface
    ),
}


def register_task(spec: TaskSpec) -> None:
    """Add ``spec`` to the registry (a plugin's task; the built-in ones are listed above)."""
    if not _TASK_NAME.fullmatch(spec.name):
        raise ConfigError(f"task name {spec.name!r} must match {_TASK_NAME.pattern}")
    if spec.name in TASKS:
        raise ConfigError(f"task {spec.name!r} is already registered")
    if spec.kind != "values" and task_of_kind(spec.kind) is not None:
        raise ConfigError(
            f"task {spec.name!r}: kind {spec.kind!r} is taken by {task_of_kind(spec.kind)!r}"
        )
    TASKS[spec.name] = spec


def load_task_plugins(modules: str | Iterable[str]) -> tuple[str, ...]:
    """Import each module ('a.b,c.d' or a list) and register the TaskSpecs of its ``TASK_SPECS``;
    returns the names registered. Runs at import for ``$CTA_TASK_PLUGINS``, so every process
    that imports the registry (data-loader workers, ``cta serve``) knows the same tasks."""
    names = [m.strip() for m in modules.split(",")] if isinstance(modules, str) else modules
    registered = []
    for module_name in filter(None, names):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"task plugin {module_name!r} cannot be imported: {exc}") from None
        specs = getattr(module, "TASK_SPECS", None)
        if specs is None:
            raise ConfigError(f"task plugin {module_name!r} defines no TASK_SPECS")
        for spec in specs:
            register_task(spec)
            registered.append(spec.name)
    return tuple(registered)


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except (KeyError, TypeError):  # TypeError: a list or mapping where a name belongs
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def parse_tasks(tasks: str | Iterable[str]) -> tuple[str, ...]:
    """'semseg,height' or a list -> validated, de-duplicated tuple in the given order."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [n for n in names if n]
    if not names:
        raise ConfigError("no tasks given (e.g. --tasks semseg,height,normals)")
    for name in names:
        get_task(name)
    if len(set(names)) != len(names):
        raise ConfigError(f"task listed twice in {names}")
    return tuple(names)


def out_channels(tasks: Iterable[str], num_classes: int | None = None) -> dict[str, int]:
    return {t: get_task(t).out_channels(num_classes) for t in tasks}


def metric_key(task: str, metric: str) -> str:
    """The one name of a metric everywhere (evaluation.json, MLflow, reports)."""
    return f"{task}.{metric}"


def metric_directions(tasks: Iterable[str]) -> dict[str, Direction]:
    return {metric_key(t, m.name): m.direction for t in tasks for m in get_task(t).metrics}


def primary_metrics(tasks: Iterable[str]) -> dict[str, str]:
    return {t: get_task(t).primary_metric.name for t in tasks}


def make_meters(
    tasks: Iterable[str],
    num_classes: int | None = None,
    miou_rule: str = "nanmean_union",
    reduction: str = "pooled",
) -> dict[str, metrics.Meter]:
    return {
        t: get_task(t).make_meter(num_classes=num_classes, miou_rule=miou_rule, reduction=reduction)
        for t in tasks
    }


def flatten_metrics(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {metric_key(t, m): v for t, values in per_task.items() for m, v in values.items()}


def pixel_loss(task: str) -> losses.PixelLoss:
    return losses.PIXEL_LOSSES[get_task(task).loss]


def task_of_kind(kind: TaskKind, tasks: Iterable[str] | None = None) -> str | None:
    """The one task of ``kind`` among ``tasks`` (default: every registered task), else None."""
    found = [t for t in (TASKS if tasks is None else tasks) if get_task(t).kind == kind]
    if len(found) > 1:
        raise ConfigError(f"tasks {', '.join(found)} are all of kind {kind!r}; at most one may be")
    return found[0] if found else None


def line_dataset_tasks() -> tuple[str, ...]:
    """The registered tasks a line dataset can carry, in registry order."""
    return tuple(name for name, spec in TASKS.items() if spec.line_file is not None)


load_task_plugins(os.environ.get(TASK_PLUGINS_ENV, ""))
