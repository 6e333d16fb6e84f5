"""Streaming evaluation meters with exact, named semantics, mergeable across processes.

One meter per task kind (DESIGN.md 4.1 and 5.1). Each meter is fed batch by batch with
``update(pred, target, present=None)`` and reports plain floats from ``compute()``; the first
name in ``metric_names`` is the task's primary metric. Metric directions (higher / lower is
better) belong to the task registry; this module imports nothing from ``cta_model``. Comparing
a model with single-task baselines (Delta_m) is ``cta_model/delta_m.py``.

Tensor conventions (per batch):

==========  ==========================  =================================================
task        prediction                  target (invalid marker)
==========  ==========================  =================================================
semseg      logits (B, C, H, W)         int ids (B, H, W); any id outside [0, C) ignored
height      (B, 1, H, W) mm             (B, 1, H, W) float mm; NaN = invalid
depth       (B, 1, H, W) metres         (B, 1, H, W) float metres; 0 = invalid
normals     (B, 3, H, W), any length    (B, 3, H, W) unit vectors; (0, 0, 0) = invalid
==========  ==========================  =================================================

``present`` is an optional (B,) bool tensor; samples with ``present=False`` are dropped before
anything else, exactly as if they had not been in the batch.

Reductions:

* ``pooled`` (default, LibMTL): one set of sufficient statistics over every valid pixel of the
  split. The result depends only on the multiset of valid pixels, so sharding the split across
  processes without padding and merging gives the single-process numbers. Integer statistics
  (confusion matrix, counts, histogram) and the exact median are bit-identical under any split;
  float error sums are summed per batch in float64 and then combined exactly across batches,
  so a different batching can move them only by the float64 rounding of per-batch sums.
* ``batch_mean``: the metric of each ``update`` call, averaged over calls, for every metric
  (no reference does this for segmentation). It is only meaningful with a fixed batch size, no
  shuffling and one process (the last short batch weighs as much as a full one). Calls with no
  valid pixel are skipped. A per-batch NaN for any other reason (``miou_rule="strict"`` with a
  class missing from the batch, NaN predictions) propagates into the mean on purpose.
* ``mtan`` (a preset, MTAN's evaluation loop, lorenmt/mtan ``utils.py``): segmentation
  ``pooled`` (one confusion matrix over the epoch for mIoU and pixel accuracy), every other
  meter ``batch_mean`` (MTAN averages the depth and normals errors per batch). With
  ``miou_rule="strict"`` (MTAN's plain mean over classes) it reproduces MTAN's numbers.

NaN policy: a meter with no valid pixels returns NaN for every metric. A NaN prediction at a
valid pixel makes the task's metrics NaN (for segmentation: a NaN logit at a valid pixel), so
model bugs are not hidden; an inf prediction gives an inf error. Predictions at invalid pixels
are never looked at. Only the documented marker makes a target invalid: a NaN depth or
normals target is a data bug and makes the metrics NaN too.

Merging: ``merge`` and ``reduce_distributed`` add counters, concatenate per-pixel error lists
and add float sums exactly (Shewchuk partials, as ``math.fsum``), so the merged result does not
depend on the order meters are merged in.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

from cta_model.nn.functional import class_ids

Reduction = Literal["pooled", "batch_mean"]
MiouRule = Literal["nanmean_union", "strict", "zero_union_as_0"]

REDUCTIONS: tuple[str, ...] = get_args(Reduction)
#: Named presets: each meter class resolves a preset to one reduction (``preset_reductions``).
REDUCTION_PRESETS: tuple[str, ...] = ("mtan",)
#: What ``reduction=`` accepts: a reduction for every meter, or a preset.
EVAL_REDUCTIONS: tuple[str, ...] = REDUCTIONS + REDUCTION_PRESETS
MIOU_RULES: tuple[str, ...] = get_args(MiouRule)

#: Depth predictions are clamped to at least this before any error, as CTAL's code does.
DEPTH_MIN_PREDICTION = 1e-9
#: Thresholds (degrees) of the ``within_*`` normals metrics; an angle counts when strictly below.
NORMALS_THRESHOLDS_DEG: tuple[float, ...] = (11.25, 22.5, 30.0)
NORMALS_WITHIN_NAMES: tuple[str, ...] = ("within_11.25", "within_22.5", "within_30")

__all__ = [
    "DEPTH_MIN_PREDICTION",
    "EVAL_REDUCTIONS",
    "MIOU_RULES",
    "NORMALS_THRESHOLDS_DEG",
    "REDUCTIONS",
    "REDUCTION_PRESETS",
    "DepthMeter",
    "HeightMeter",
    "Meter",
    "NormalsMeter",
    "SegmentationMeter",
]


class _ExactSum:
    """A running float sum that stays exact until it is read (Shewchuk's partials, as fsum).

    Adding and merging are exact, so totals do not depend on the order in which batches or
    processes are combined. Non-finite terms are kept apart in an ordinary sum so that inf and
    NaN propagate instead of corrupting the partials.
    """

    __slots__ = ("_nonfinite", "_partials")

    def __init__(self, partials: list[float] | None = None, nonfinite: float = 0.0) -> None:
        self._partials: list[float] = list(partials or [])
        self._nonfinite = float(nonfinite)

    def add(self, value: float) -> None:
        x = float(value)
        if not math.isfinite(x):
            self._nonfinite += x
            return
        partials = self._partials
        i = 0
        for y in partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            if math.isinf(hi):  # overflow of a finite total: nothing sensible left to keep
                self._nonfinite += hi
                self._partials = []
                return
            lo = y - (hi - x)
            if lo:
                partials[i] = lo
                i += 1
            x = hi
        partials[i:] = [x]

    def merge(self, other: _ExactSum) -> None:
        for partial in list(other._partials):  # copy: other may be self
            self.add(partial)
        self._nonfinite += other._nonfinite

    def value(self) -> float:
        if self._nonfinite != 0.0:  # +-inf or NaN dominates any finite total
            return self._nonfinite
        try:
            return math.fsum(self._partials)
        except OverflowError:
            return math.copysign(math.inf, sum(self._partials))

    def to_state(self) -> dict[str, Any]:
        return {"partials": list(self._partials), "nonfinite": self._nonfinite}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _ExactSum:
        return cls(list(state["partials"]), float(state["nonfinite"]))

    @classmethod
    def of(cls, value: float) -> _ExactSum:
        total = cls()
        total.add(value)
        return total


def _nan_metrics(names: tuple[str, ...]) -> dict[str, float]:
    return dict.fromkeys(names, math.nan)


def _export_value(value: Any) -> Any:
    """Copy one state entry into plain, picklable data (for state_dict / all_gather_object)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, _ExactSum):
        return value.to_state()
    if isinstance(value, list):
        return [item.clone() for item in value]
    return value


def _import_value(template: Any, exported: Any) -> Any:
    """Inverse of :func:`_export_value`, guided by the type of the entry in an empty state."""
    if isinstance(template, torch.Tensor):
        tensor = torch.as_tensor(exported).to("cpu", template.dtype).clone()
        if tensor.shape != template.shape:
            raise ValueError(
                f"state tensor has shape {tuple(tensor.shape)}, expected {tuple(template.shape)}"
            )
        return tensor
    if isinstance(template, _ExactSum):
        return _ExactSum.from_state(exported)
    if isinstance(template, list):
        return [torch.as_tensor(item).cpu() for item in exported]
    return type(template)(exported)


def _merge_states(total: dict[str, Any], part: Mapping[str, Any]) -> None:
    """Fold ``part`` into ``total``: add counters, add sums exactly, concatenate error lists.

    Only the keys of ``total`` are merged, so a batch state may carry extra entries that the
    pooled state deliberately does not keep (per-batch errors under ``batch_mean``).
    """
    for key, current in total.items():
        incoming = part[key]
        if isinstance(current, _ExactSum):
            current.merge(incoming)
        elif isinstance(current, list):
            current.extend(incoming)
        else:
            total[key] = current + incoming


def _select_present(
    pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if present is None:
        return pred, target
    if not isinstance(present, torch.Tensor) or present.dtype != torch.bool:
        raise TypeError("present must be a bool tensor of shape (B,)")
    if present.shape != (pred.shape[0],):
        raise ValueError(
            f"present has shape {tuple(present.shape)}, expected ({pred.shape[0]},) for a batch "
            f"of {pred.shape[0]}"
        )
    return pred[present.to(pred.device)], target[present.to(target.device)]


def _float64_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float64)


class Meter(ABC):
    """Streaming metric over a split: ``update`` per batch, then ``compute``.

    Subclasses describe their sufficient statistics as a dict of int64 tensors, ints,
    exact float sums and lists of per-pixel tensors (``_empty_state`` / ``_batch_state``);
    accumulation, merging, serialisation and the two reductions are shared here.
    """

    #: Metric names returned by :meth:`compute`, primary first.
    metric_names: ClassVar[tuple[str, ...]]
    #: The reduction each preset gives this kind of meter (MTAN: errors averaged per batch).
    preset_reductions: ClassVar[dict[str, Reduction]] = {"mtan": "batch_mean"}

    def __init__(self, reduction: str = "pooled") -> None:
        if reduction not in EVAL_REDUCTIONS:
            raise ValueError(
                f"unknown reduction {reduction!r}; choose one of {list(EVAL_REDUCTIONS)}"
            )
        resolved = self.preset_reductions.get(reduction, reduction)
        self.reduction: Reduction = resolved  # type: ignore[assignment]
        self.reset()

    @property
    def primary_metric(self) -> str:
        return self.metric_names[0]

    # -- subclass hooks -------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        """Everything two meters must share to be merged."""
        return {"reduction": self.reduction}

    @abstractmethod
    def _empty_state(self) -> dict[str, Any]:
        """Pooled statistics of no pixels."""

    @abstractmethod
    def _check_inputs(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Raise ValueError / TypeError naming the problem when shapes or dtypes are wrong."""

    @abstractmethod
    def _batch_state(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
        """Statistics of one batch (same keys as the pooled state, maybe more), on the CPU."""

    @abstractmethod
    def _valid_count(self, state: Mapping[str, Any]) -> int:
        """Number of valid pixels the statistics cover."""

    @abstractmethod
    def _metrics(self, state: Mapping[str, Any]) -> dict[str, float]:
        """Metrics of statistics covering at least one valid pixel."""

    # -- public interface -----------------------------------------------------------------
    def reset(self) -> None:
        self._state: dict[str, Any] = self._empty_state()
        self._batch_metric_sums = {name: _ExactSum() for name in self.metric_names}
        self._batch_count = 0
        self._reduced = False

    @torch.no_grad()
    def update(
        self, pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor | None = None
    ) -> None:
        """Accumulate one batch; samples whose ``present`` flag is False are dropped first."""
        pred, target = pred.detach(), target.detach()
        self._check_inputs(pred, target)
        pred, target = _select_present(pred, target, present)
        batch = self._batch_state(pred, target)
        _merge_states(self._state, batch)
        if self.reduction == "batch_mean" and self._valid_count(batch) > 0:
            for name, value in self._metrics(batch).items():
                self._batch_metric_sums[name].add(value)
            self._batch_count += 1

    def compute(self) -> dict[str, float]:
        """Metric name -> value, primary first; every value NaN when nothing valid was seen."""
        if self.reduction == "pooled":
            if self._valid_count(self._state) == 0:
                return _nan_metrics(self.metric_names)
            return self._metrics(self._state)
        if self._batch_count == 0:
            return _nan_metrics(self.metric_names)
        return {
            name: total.value() / self._batch_count
            for name, total in self._batch_metric_sums.items()
        }

    @property
    def valid_pixels(self) -> int:
        """Valid pixels accumulated so far (after ``present`` and invalid markers)."""
        return self._valid_count(self._state)

    def state_dict(self) -> dict[str, Any]:
        """Picklable copy of the statistics (CPU tensors, floats, ints, lists)."""
        return {
            "meter": type(self).__name__,
            "config": self._config(),
            "state": {key: _export_value(value) for key, value in self._state.items()},
            "batch_metric_sums": {
                name: total.to_state() for name, total in self._batch_metric_sums.items()
            },
            "batch_count": self._batch_count,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this meter's statistics with those of ``state`` (same meter and config)."""
        self.reset()
        self._merge_state_dict(state)

    def merge(self, other: Meter) -> None:
        """Add another meter's statistics to this one (counters add, error lists concatenate)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        self._merge_state_dict(other.state_dict())

    def reduce_distributed(self, group: Any = None) -> None:
        """Give every rank the merged statistics of all ranks; a no-op without a process group.

        Uses ``all_gather_object`` (works with gloo; with NCCL, set the CUDA device first).
        Every rank merges the gathered states in rank order, so all ranks report identical
        numbers. Call it once, after the last ``update``: a second call would count the other
        ranks twice, so it raises until ``reset()``.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        world_size = dist.get_world_size(group)
        if world_size <= 1:
            return
        if self._reduced:
            raise RuntimeError("meter already reduced across processes; call reset() first")
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, self.state_dict(), group=group)
        self.reset()
        for state in gathered:
            self._merge_state_dict(state)
        self._reduced = True

    # -- internals --------------------------------------------------------------------------
    def _merge_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("meter") != type(self).__name__:
            raise ValueError(
                f"state of a {state.get('meter')!r} cannot be merged into a {type(self).__name__}"
            )
        if state["config"] != self._config():
            raise ValueError(
                f"cannot merge meters with different settings: {state['config']} vs "
                f"{self._config()}"
            )
        template = self._empty_state()
        incoming = {key: _import_value(template[key], state["state"][key]) for key in template}
        _merge_states(self._state, incoming)
        for name, total in self._batch_metric_sums.items():
            total.merge(_ExactSum.from_state(state["batch_metric_sums"][name]))
        self._batch_count += int(state["batch_count"])


def _check_dense(pred: torch.Tensor, target: torch.Tensor, channels: int, task: str) -> None:
    if pred.ndim != 4 or pred.shape[1] != channels:
        raise ValueError(
            f"{task} predictions must have shape (B, {channels}, H, W), got {tuple(pred.shape)}"
        )
    if target.shape != pred.shape:
        raise ValueError(
            f"{task} targets must have the predictions' shape {tuple(pred.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if not target.is_floating_point():
        raise TypeError(f"{task} targets must be floating point, got {target.dtype}")


class SegmentationMeter(Meter):
    """Semantic segmentation from one C x C confusion matrix (rows = target, cols = pred).

    Per batch: ``bincount(C * target + argmax(pred), minlength=C*C)`` over pixels with
    0 <= target < C; IoU_c = diag / (row + col - diag); pixel_acc = trace / valid pixels.

    ``miou_rule`` decides what a class with zero union (absent from targets and predictions)
    does; a class predicted but absent from the targets always has IoU 0 and counts:

    * ``nanmean_union`` (default): zero-union classes are left out of the mean;
    * ``strict``: plain mean over all C classes, NaN if any class has zero union (LibMTL, MTAN);
    * ``zero_union_as_0``: zero-union classes count as IoU 0 (Vandenhende et al.).
    """

    metric_names = ("miou", "pixel_acc")
    # MTAN pools one confusion matrix over the epoch.
    preset_reductions: ClassVar[dict[str, Reduction]] = {"mtan": "pooled"}

    def __init__(
        self,
        num_classes: int,
        miou_rule: MiouRule = "nanmean_union",
        reduction: str = "pooled",
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if miou_rule not in MIOU_RULES:
            raise ValueError(f"unknown miou_rule {miou_rule!r}; choose one of {list(MIOU_RULES)}")
        self.num_classes = num_classes
        self.miou_rule: MiouRule = miou_rule
        super().__init__(reduction)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "num_classes": self.num_classes, "miou_rule": self.miou_rule}

    def _empty_state(self) -> dict[str, Any]:
        c = self.num_classes
        # nan_pixels: valid pixels whose logits contain NaN (argmax of those is meaningless).
        return {"confusion": torch.zeros(c, c, dtype=torch.int64), "nan_pixels": 0}

    def _check_inputs(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.ndim != 4 or pred.shape[1] != self.num_classes:
            raise ValueError(
                f"semseg logits must have shape (B, {self.num_classes}, H, W), "
                f"got {tuple(pred.shape)}"
            )
        expected = (pred.shape[0], *pred.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(
                f"semseg targets must have shape {expected}, got {tuple(target.shape)}"
            )
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"semseg targets must be integer class ids, got {target.dtype}")

    def _batch_state(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
        c = self.num_classes
        # argmax and the NaN check run where the logits live; only int labels move to the CPU.
        labels = class_ids(pred).to("cpu", torch.int64)
        nan_logits = torch.isnan(pred).any(dim=1).cpu()
        target = target.to("cpu", torch.int64)
        valid = (target >= 0) & (target < c)
        flat = c * target[valid] + labels[valid]
        confusion = torch.bincount(flat, minlength=c * c).reshape(c, c)
        return {"confusion": confusion, "nan_pixels": int(nan_logits[valid].sum())}

    def _valid_count(self, state: Mapping[str, Any]) -> int:
        return int(state["confusion"].sum())

    @staticmethod
    def _iou(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class IoU (NaN where the union is 0) and the union, both float64."""
        cm = confusion.to(torch.float64)
        diag = cm.diagonal()
        union = cm.sum(dim=1) + cm.sum(dim=0) - diag
        iou = torch.where(union > 0, diag / union.clamp_min(1.0), torch.full_like(diag, math.nan))
        return iou, union

    def _metrics(self, state: Mapping[str, Any]) -> dict[str, float]:
        if state["nan_pixels"]:
            return _nan_metrics(self.metric_names)
        confusion = state["confusion"]
        iou, union = self._iou(confusion)
        if self.miou_rule == "nanmean_union":
            miou = float(iou[union > 0].mean())
        elif self.miou_rule == "strict":
            miou = math.nan if bool((union == 0).any()) else float(iou.mean())
        else:  # zero_union_as_0
            miou = float(torch.nan_to_num(iou, nan=0.0).mean())
        pixel_acc = float(confusion.diagonal().sum()) / float(confusion.sum())
        return {"miou": miou, "pixel_acc": pixel_acc}

    @property
    def confusion_matrix(self) -> torch.Tensor:
        """Pooled C x C int64 confusion matrix (rows = target, cols = prediction), a copy."""
        return self._state["confusion"].clone()

    def per_class_iou(self) -> list[float]:
        """Pooled IoU per class (also under ``batch_mean``); NaN where the union is 0."""
        iou, _ = self._iou(self._state["confusion"])
        return [float(value) for value in iou]


class HeightMeter(Meter):
    """Height in mm: ``abs_err_mm`` = mean |pred - gt|, ``rmse_mm`` = sqrt(mean (pred - gt)^2).

    Over pixels whose target is not NaN. Non-finite predictions are not skipped: a NaN
    prediction at a valid pixel makes both metrics NaN, so a model bug cannot hide.
    """

    metric_names = ("abs_err_mm", "rmse_mm")

    def _empty_state(self) -> dict[str, Any]:
        return {"count": 0, "abs_sum": _ExactSum(), "squared_sum": _ExactSum()}

    def _check_inputs(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        _check_dense(pred, target, 1, "height")

    def _batch_state(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
        pred, target = _float64_cpu(pred), _float64_cpu(target)
        valid = ~torch.isnan(target)
        error = pred[valid] - target[valid]
        return {
            "count": int(valid.sum()),
            "abs_sum": _ExactSum.of(float(error.abs().sum())),
            "squared_sum": _ExactSum.of(float(error.square().sum())),
        }

    def _valid_count(self, state: Mapping[str, Any]) -> int:
        return state["count"]

    def _metrics(self, state: Mapping[str, Any]) -> dict[str, float]:
        count = state["count"]
        return {
            "abs_err_mm": state["abs_sum"].value() / count,
            "rmse_mm": math.sqrt(state["squared_sum"].value() / count),
        }


class DepthMeter(Meter):
    """Depth in metres: ``abs_err`` = mean |p - gt|, ``rel_err`` = mean |p - gt| / gt.

    Over pixels with target != 0, where p = max(pred, 1e-9). As in CTAL's code, the clamped
    prediction is used for both errors (it only matters for predictions below 1e-9 m).
    """

    metric_names = ("abs_err", "rel_err")

    def _empty_state(self) -> dict[str, Any]:
        return {"count": 0, "abs_sum": _ExactSum(), "rel_sum": _ExactSum()}

    def _check_inputs(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        _check_dense(pred, target, 1, "depth")

    def _batch_state(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
        pred, target = _float64_cpu(pred), _float64_cpu(target)
        valid = target != 0
        truth = target[valid]
        abs_error = (pred[valid].clamp_min(DEPTH_MIN_PREDICTION) - truth).abs()
        return {
            "count": int(valid.sum()),
            "abs_sum": _ExactSum.of(float(abs_error.sum())),
            "rel_sum": _ExactSum.of(float((abs_error / truth).sum())),
        }

    def _valid_count(self, state: Mapping[str, Any]) -> int:
        return state["count"]

    def _metrics(self, state: Mapping[str, Any]) -> dict[str, float]:
        count = state["count"]
        return {
            "abs_err": state["abs_sum"].value() / count,
            "rel_err": state["rel_sum"].value() / count,
        }


class NormalsMeter(Meter):
    """Surface normals: angular error in degrees over pixels whose target is not (0, 0, 0).

    angle = degrees(arccos(clamp(dot(normalize(pred), gt), -1, 1))); the prediction is
    normalised with ``F.normalize`` (a zero-length prediction has no direction and scores 90
    degrees), the target is used as given. Metrics: ``mean``, ``median``, ``within_11.25``,
    ``within_22.5``, ``within_30`` (fractions in [0, 1] of angles strictly below the threshold)
    and ``median_hist``.

    ``median`` is exact when ``exact_median`` (default): every per-pixel angle is kept as
    float32 and, for an even count, the median is the mean of the two middle values
    (``torch.median`` would return the lower one). ``median_hist`` is always reported: the
    median of a fixed ``hist_bins``-bin histogram over [0, 180] degrees, linearly interpolated
    inside the bin holding the middle rank (error below one bin width, 0.1 degree by default),
    for splits too large to keep every angle; with ``exact_median=False`` no angles are kept and
    ``median`` equals ``median_hist``. Any non-finite angle (NaN prediction) makes every
    metric NaN.
    """

    metric_names = ("mean", "median", *NORMALS_WITHIN_NAMES, "median_hist")

    def __init__(
        self, reduction: str = "pooled", exact_median: bool = True, hist_bins: int = 1800
    ) -> None:
        if isinstance(hist_bins, bool) or not isinstance(hist_bins, int) or hist_bins < 1:
            raise ValueError(f"hist_bins must be a positive int, got {hist_bins!r}")
        self.exact_median = bool(exact_median)
        self.hist_bins = hist_bins
        super().__init__(reduction)

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "exact_median": self.exact_median,
            "hist_bins": self.hist_bins,
        }

    def _empty_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "count": 0,
            "nonfinite": 0,
            "angle_sum": _ExactSum(),
            "within": torch.zeros(len(NORMALS_THRESHOLDS_DEG), dtype=torch.int64),
            "hist": torch.zeros(self.hist_bins, dtype=torch.int64),
        }
        # batch_mean takes each batch's median from that batch, so the split-wide list of
        # angles (the memory-hungry part) is kept only for a pooled exact median.
        if self.exact_median and self.reduction == "pooled":
            state["errors"] = []
        return state

    def _check_inputs(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        _check_dense(pred, target, 3, "normals")

    def _batch_state(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
        pred, target = _float64_cpu(pred), _float64_cpu(target)
        valid = (target != 0).any(dim=1)  # (B, H, W)
        pred_vectors = F.normalize(pred.permute(0, 2, 3, 1)[valid], dim=1)
        true_vectors = target.permute(0, 2, 3, 1)[valid]
        cosine = (pred_vectors * true_vectors).sum(dim=1).clamp(-1.0, 1.0)
        angles = torch.rad2deg(torch.arccos(cosine))
        finite = torch.isfinite(angles)
        within = torch.stack([(angles < limit).sum() for limit in NORMALS_THRESHOLDS_DEG])
        bins = (angles[finite] * (self.hist_bins / 180.0)).floor().to(torch.int64)
        hist = torch.bincount(bins.clamp(0, self.hist_bins - 1), minlength=self.hist_bins)
        state: dict[str, Any] = {
            "count": int(angles.numel()),
            "nonfinite": int((~finite).sum()),
            "angle_sum": _ExactSum.of(float(angles.sum())),
            "within": within.to(torch.int64),
            "hist": hist,
        }
        if self.exact_median:
            state["errors"] = [angles.to(torch.float32)]
        return state

    def _valid_count(self, state: Mapping[str, Any]) -> int:
        return state["count"]

    def _metrics(self, state: Mapping[str, Any]) -> dict[str, float]:
        if state["nonfinite"]:
            return _nan_metrics(self.metric_names)
        count = state["count"]
        median_hist = _histogram_median(state["hist"], count, self.hist_bins)
        median = _exact_median(state["errors"]) if self.exact_median else median_hist
        within = {
            name: int(hits) / count
            for name, hits in zip(NORMALS_WITHIN_NAMES, state["within"].tolist(), strict=True)
        }
        return {
            "mean": state["angle_sum"].value() / count,
            "median": median,
            **within,
            "median_hist": median_hist,
        }


def _exact_median(chunks: list[torch.Tensor]) -> float:
    """True median; for an even count the mean of the two middle values."""
    values = torch.cat(chunks).numpy() if len(chunks) != 1 else chunks[0].numpy()
    if len(chunks) > 1:  # keep one array so repeated compute() does not concatenate again
        chunks[:] = [torch.from_numpy(values)]
    middle = values.size // 2
    if values.size % 2:
        return float(np.partition(values, middle)[middle])
    lower, upper = np.partition(values, [middle - 1, middle])[[middle - 1, middle]]
    return (float(lower) + float(upper)) / 2.0


def _histogram_median(hist: torch.Tensor, count: int, bins: int) -> float:
    """Median of grouped data: the bin holding rank count/2, interpolated linearly inside it."""
    cumulative = np.cumsum(hist.numpy())
    half = count / 2.0
    k = int(np.searchsorted(cumulative, half, side="left"))
    below = int(cumulative[k - 1]) if k > 0 else 0
    fraction = (half - below) / int(hist[k])
    return (k + fraction) * 180.0 / bins
