"""The task registry: one declarative spec per dense task (DESIGN 4.1).

Everything that differs between tasks lives here: units, the invalid-label rule, how flips and
scale-crops transform a label, the file encoding, the loss, the metrics with their directions and
the primary metric. Models, losses, meters, logging, model selection and Delta_m all iterate this
registry; nothing else switches on task names. Adding a task means adding one entry to `TASKS`.

Shapes in memory: one sample's label is (H, W) for `semseg` and (C, H, W) for the others; a
batch adds a leading B. Predictions are (B, out_channels, H, W).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from cta_model import losses, metrics
from cta_model.errors import ConfigError

Direction = Literal["higher", "lower"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    direction: Direction
    unit: str = ""


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
    activation: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda x: x)
    fixed_out_channels: int | None = None  # None: depends on the dataset (number of classes)

    @property
    def primary_metric(self) -> MetricSpec:
        return self.metrics[0]

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
            return raw.argmax(dim=1)
        if self.label_channels == 1:
            return raw[:, 0]
        return self.activation(raw).permute(0, 2, 3, 1)

    # ---- file encoding (DESIGN 4.1: semseg invalid is 255 in uint8 and 65535 in uint16) ----
    def decode_file_array(self, array: np.ndarray) -> np.ndarray:
        return _DECODERS.get(self.name, _identity_float32)(array)

    def encode_file_array(self, array: np.ndarray) -> np.ndarray:
        return _ENCODERS.get(self.name, _identity_float32)(array)


def _identity_float32(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _decode_semseg(array: np.ndarray) -> np.ndarray:
    invalid = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}.get(array.dtype)
    out = array.astype(np.int64)
    if invalid is not None:
        out[array == invalid] = -1
    return out


def _encode_semseg(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    wide = array.max(initial=0) >= 255
    dtype, invalid = (np.uint16, 65535) if wide else (np.uint8, 255)
    return np.where(array < 0, invalid, array).astype(dtype)


_DECODERS = {"semseg": _decode_semseg}
_ENCODERS = {"semseg": _encode_semseg}


def _semseg_valid(label: torch.Tensor) -> torch.Tensor:
    return label >= 0  # the upper bound (num_classes) is checked by the loss and the meter


def _height_valid(label: torch.Tensor) -> torch.Tensor:
    return ~torch.isnan(label).any(dim=-3)


def _depth_valid(label: torch.Tensor) -> torch.Tensor:
    return (label != 0).any(dim=-3)


def _normals_valid(label: torch.Tensor) -> torch.Tensor:
    return (label != 0).any(dim=-3)


def _unit_vectors(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1)


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
        fixed_out_channels=1,
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
        activation=_unit_vectors,
        fixed_out_channels=3,
    ),
}


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
