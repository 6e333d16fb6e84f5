"""Metric meters against values worked out by hand, plus merge / split / distributed equality."""

from __future__ import annotations

import math
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cta_model.delta_m import (
    DELTA_ALL_METRICS_KEY,
    DELTA_PRIMARY_KEY,
    DELTA_TASK_AVG_KEY,
    delta_m,
    relative_improvements,
)
from cta_model.metrics import (
    EVAL_REDUCTIONS,
    MIOU_RULES,
    NORMALS_WITHIN_NAMES,
    REDUCTIONS,
    DepthMeter,
    HeightMeter,
    Meter,
    NormalsMeter,
    SegmentationMeter,
)

pytestmark = pytest.mark.unit

NAN = math.nan
KINDS = ("semseg", "height", "depth", "normals")
SEG_CLASSES_RANDOM = 5


# -- helpers ------------------------------------------------------------------------------------


def seg_logits(labels: list, num_classes: int) -> torch.Tensor:
    """One-hot logits (B, C, H, W) whose argmax is ``labels`` (B, H, W)."""
    one_hot = F.one_hot(torch.tensor(labels), num_classes)
    return one_hot.permute(0, 3, 1, 2).float() * 10.0


def dense(rows: list) -> torch.Tensor:
    """(H, W) nested list -> (1, 1, H, W) float32."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def normals_batch(pairs: list[tuple[tuple, tuple]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(pred_xyz, gt_xyz), ...] -> pred, target of shape (1, 3, 1, N) float32."""
    pred = torch.tensor([p for p, _ in pairs], dtype=torch.float32).T.reshape(1, 3, 1, -1)
    target = torch.tensor([g for _, g in pairs], dtype=torch.float32).T.reshape(1, 3, 1, -1)
    return pred, target


def direction_at(degrees: float, scale: float = 1.0) -> tuple[float, float, float]:
    """A vector at ``degrees`` from +z (in the x-z plane), of length ``scale``."""
    rad = math.radians(degrees)
    return (scale * math.sin(rad), 0.0, scale * math.cos(rad))


def assert_identical(actual: dict[str, float], expected: dict[str, float]) -> None:
    """Bit-for-bit equal, NaN equal to NaN."""
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        both_nan = math.isnan(value) and math.isnan(actual[key])
        assert both_nan or actual[key] == value, (key, actual[key], value)


def make_meter(kind: str, reduction: str = "pooled", **kwargs) -> Meter:
    if kind == "semseg":
        return SegmentationMeter(SEG_CLASSES_RANDOM, reduction=reduction, **kwargs)
    if kind == "height":
        return HeightMeter(reduction=reduction)
    if kind == "depth":
        return DepthMeter(reduction=reduction)
    return NormalsMeter(reduction=reduction, **kwargs)


def random_batch(
    kind: str, generator: torch.Generator, batch: int = 3, height: int = 6, width: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random predictions and targets with every kind of invalid marker sprinkled in."""
    shape = (batch, 1, height, width)
    invalid = torch.rand(shape, generator=generator) < 0.2
    if kind == "semseg":
        logits = torch.randn(batch, SEG_CLASSES_RANDOM, height, width, generator=generator)
        # -1 and SEG_CLASSES_RANDOM (out of range) are both ignored, and so is 255.
        target = torch.randint(
            -1, SEG_CLASSES_RANDOM + 1, (batch, height, width), generator=generator
        )
        target[invalid[:, 0]] = 255
        return logits, target
    if kind == "height":
        pred = torch.randn(shape, generator=generator) * 3
        target = torch.randn(shape, generator=generator) * 3
        target[invalid] = NAN
        return pred, target
    if kind == "depth":
        pred = torch.rand(shape, generator=generator) * 5 - 0.5  # some below 0: clamped
        target = torch.rand(shape, generator=generator) * 5 + 0.1
        target[invalid] = 0.0
        return pred, target
    pred = torch.randn(batch, 3, height, width, generator=generator) * 4  # not unit length
    target = F.normalize(torch.randn(batch, 3, height, width, generator=generator), dim=1)
    target = target * (~invalid).float()  # (0, 0, 0) = invalid
    return pred, target


# -- segmentation, by hand --------------------------------------------------------------------
#
# C = 4. Batch 1 (1 x 2 x 3):
#   target [[0, 0, 1], [1, -1, 255]]   pred [[0, 1, 1], [2, 3, 0]]
#   valid pairs (t, p): (0,0) (0,1) (1,1) (1,2); -1 and 255 ignored (so pred 3 never counts).
#   confusion rows [1,1,0,0] [0,1,1,0] [0,0,0,0] [0,0,0,0]
#   diag [1,1,0,0], row [2,2,0,0], col [1,2,1,0], union [2,3,1,0]
#   IoU [1/2, 1/3, 0 (class 2 predicted, absent from targets), undefined (class 3 absent)]
#   nanmean_union = (1/2 + 1/3 + 0) / 3 = 5/18; strict = NaN; zero_union_as_0 = (5/6) / 4 = 5/24
#   pixel_acc = 2/4 = 1/2
# Batch 2 (1 x 2 x 3):
#   target [[3, 3, 2], [0, 7, 0]]   pred [[3, 0, 2], [0, 1, 1]]
#   valid pairs: (3,3) (3,0) (2,2) (0,0) (0,1); 7 >= C ignored.
#   confusion rows [1,1,0,0] [0,0,0,0] [0,0,1,0] [1,0,0,1]
#   diag [1,0,1,1], row [2,0,1,2], col [2,1,1,1], union [3,1,1,2]
#   IoU [1/3, 0 (class 1 predicted only), 1, 1/2] -> every rule: (11/6) / 4 = 11/24
#   pixel_acc = 3/5
# Pooled: confusion rows [2,2,0,0] [0,1,1,0] [0,0,1,0] [1,0,0,1]
#   diag [2,1,1,1] (trace 5), row [4,2,1,2] (9 valid), col [3,3,2,1], union [5,4,2,2]
#   IoU [2/5, 1/4, 1/2, 1/2] -> every rule: 1.65 / 4 = 33/80; pixel_acc = 5/9
# batch_mean: nanmean (5/18 + 11/24) / 2 = 53/144; strict (NaN + 11/24) / 2 = NaN;
#   zero_union_as_0 (5/24 + 11/24) / 2 = 1/3; pixel_acc (1/2 + 3/5) / 2 = 11/20

SEG_TARGET_1 = [[[0, 0, 1], [1, -1, 255]]]
SEG_PRED_1 = [[[0, 1, 1], [2, 3, 0]]]
SEG_TARGET_2 = [[[3, 3, 2], [0, 7, 0]]]
SEG_PRED_2 = [[[3, 0, 2], [0, 1, 1]]]

SEG_BATCH_1_MIOU = {"nanmean_union": 5 / 18, "strict": NAN, "zero_union_as_0": 5 / 24}
SEG_BOTH_EXPECTED = {
    ("nanmean_union", "pooled"): {"miou": 33 / 80, "pixel_acc": 5 / 9},
    ("strict", "pooled"): {"miou": 33 / 80, "pixel_acc": 5 / 9},
    ("zero_union_as_0", "pooled"): {"miou": 33 / 80, "pixel_acc": 5 / 9},
    ("nanmean_union", "batch_mean"): {"miou": 53 / 144, "pixel_acc": 11 / 20},
    ("strict", "batch_mean"): {"miou": NAN, "pixel_acc": 11 / 20},
    ("zero_union_as_0", "batch_mean"): {"miou": 1 / 3, "pixel_acc": 11 / 20},
}


def feed_seg(meter: SegmentationMeter, *batches: tuple[list, list]) -> None:
    for target, pred in batches:
        meter.update(seg_logits(pred, 4), torch.tensor(target))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("rule", MIOU_RULES)
def test_segmentation_one_batch_by_hand(rule: str, reduction: str) -> None:
    meter = SegmentationMeter(4, miou_rule=rule, reduction=reduction)
    feed_seg(meter, (SEG_TARGET_1, SEG_PRED_1))
    expected = {"miou": SEG_BATCH_1_MIOU[rule], "pixel_acc": 0.5}
    assert meter.compute() == pytest.approx(expected, rel=1e-12, nan_ok=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("rule", MIOU_RULES)
def test_segmentation_two_batches_by_hand(rule: str, reduction: str) -> None:
    meter = SegmentationMeter(4, miou_rule=rule, reduction=reduction)
    feed_seg(meter, (SEG_TARGET_1, SEG_PRED_1), (SEG_TARGET_2, SEG_PRED_2))
    expected = SEG_BOTH_EXPECTED[(rule, reduction)]
    assert meter.compute() == pytest.approx(expected, rel=1e-12, nan_ok=True)


def test_segmentation_confusion_matrix_and_per_class_iou() -> None:
    meter = SegmentationMeter(4)
    feed_seg(meter, (SEG_TARGET_1, SEG_PRED_1))
    expected_cm = [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert meter.confusion_matrix.tolist() == expected_cm
    assert meter.confusion_matrix.dtype == torch.int64
    assert meter.per_class_iou() == pytest.approx([1 / 2, 1 / 3, 0.0, NAN], nan_ok=True)
    feed_seg(meter, (SEG_TARGET_2, SEG_PRED_2))
    assert meter.confusion_matrix.tolist() == [
        [2, 2, 0, 0],
        [0, 1, 1, 0],
        [0, 0, 1, 0],
        [1, 0, 0, 1],
    ]
    assert meter.per_class_iou() == pytest.approx([2 / 5, 1 / 4, 1 / 2, 1 / 2])
    assert meter.valid_pixels == 9


def test_segmentation_batch_mean_skips_batches_without_valid_pixels() -> None:
    # Batch 2, an all-ignored batch, batch 2 again: the middle one is skipped, so strict is
    # finite here (every class has a union in each counted batch): (11/24 + 11/24) / 2.
    meter = SegmentationMeter(4, miou_rule="strict", reduction="batch_mean")
    feed_seg(meter, (SEG_TARGET_2, SEG_PRED_2), ([[[-1, 255, 4]]], [[[0, 1, 2]]]))
    feed_seg(meter, (SEG_TARGET_2, SEG_PRED_2))
    assert meter.compute() == pytest.approx({"miou": 11 / 24, "pixel_acc": 3 / 5}, rel=1e-12)


def test_segmentation_accepts_uint8_targets_with_255_ignore() -> None:
    meter = SegmentationMeter(4)
    target = torch.tensor(SEG_TARGET_1)
    target[target < 0] = 255
    meter.update(seg_logits(SEG_PRED_1, 4), target.to(torch.uint8))
    assert meter.compute() == pytest.approx({"miou": 5 / 18, "pixel_acc": 0.5})


def test_segmentation_nan_logit_at_valid_pixel_gives_nan() -> None:
    logits = seg_logits(SEG_PRED_1, 4)
    ignored = logits.clone()
    ignored[0, :, 1, 1] = NAN  # target -1 there: not looked at
    meter = SegmentationMeter(4)
    meter.update(ignored, torch.tensor(SEG_TARGET_1))
    assert meter.compute() == pytest.approx({"miou": 5 / 18, "pixel_acc": 0.5})
    logits[0, 2, 0, 0] = NAN  # target 0 there
    meter = SegmentationMeter(4)
    meter.update(logits, torch.tensor(SEG_TARGET_1))
    assert all(math.isnan(v) for v in meter.compute().values())


def test_unknown_miou_rule_and_reduction_are_named() -> None:
    with pytest.raises(ValueError, match=r"'mean_iou'.*nanmean_union.*strict.*zero_union_as_0"):
        SegmentationMeter(3, miou_rule="mean_iou")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'sum'.*pooled.*batch_mean"):
        HeightMeter(reduction="sum")  # type: ignore[arg-type]


def test_bad_inputs_raise_naming_the_problem() -> None:
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        SegmentationMeter(4).update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class ids"):
        SegmentationMeter(4).update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="height targets"):
        HeightMeter().update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        NormalsMeter().update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(TypeError, match="bool"):
        DepthMeter().update(torch.ones(2, 1, 1, 1), torch.ones(2, 1, 1, 1), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="present has shape"):
        DepthMeter().update(torch.ones(2, 1, 1, 1), torch.ones(2, 1, 1, 1), torch.tensor([True]))


# -- height, by hand --------------------------------------------------------------------------
#
# Batch 1: target [[1, NaN, 3], [0, -2, NaN]], pred [[2, NaN, 1], [0, -2.5, 7]]
#   (the NaN prediction sits on an invalid pixel, so it is never looked at)
#   errors 1, 2, 0, 0.5 -> abs = 3.5 / 4 = 0.875; squares 1 + 4 + 0 + 0.25 = 5.25,
#   rmse = sqrt(5.25 / 4) = sqrt(1.3125)
# Batch 2: target [[NaN, 4]], pred [[9, 1]] -> error 3: abs 3, rmse 3
# Pooled: abs = 6.5 / 5 = 1.3, rmse = sqrt(14.25 / 5) = sqrt(2.85)
# batch_mean: abs (0.875 + 3) / 2 = 1.9375, rmse (sqrt(1.3125) + 3) / 2

HEIGHT_BATCHES = [
    (dense([[2, NAN, 1], [0, -2.5, 7]]), dense([[1, NAN, 3], [0, -2, NAN]])),
    (dense([[9, 1]]), dense([[NAN, 4]])),
]
HEIGHT_EXPECTED = {
    "pooled": {"abs_err_mm": 1.3, "rmse_mm": math.sqrt(2.85)},
    "batch_mean": {"abs_err_mm": 1.9375, "rmse_mm": (math.sqrt(1.3125) + 3) / 2},
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_height_by_hand(reduction: str) -> None:
    meter = HeightMeter(reduction=reduction)
    first = HeightMeter(reduction=reduction)
    first.update(*HEIGHT_BATCHES[0])
    assert first.compute() == pytest.approx({"abs_err_mm": 0.875, "rmse_mm": math.sqrt(1.3125)})
    for pred, target in HEIGHT_BATCHES:
        meter.update(pred, target)
    assert meter.compute() == pytest.approx(HEIGHT_EXPECTED[reduction], rel=1e-12)


def test_height_nan_prediction_on_valid_pixel_is_not_hidden() -> None:
    meter = HeightMeter()
    meter.update(dense([[NAN, 1.0]]), dense([[0.0, 1.0]]))
    assert all(math.isnan(v) for v in meter.compute().values())


# -- depth, by hand ---------------------------------------------------------------------------
#
# Batch 1: target [[2, 0], [4, 1]], pred [[1, 5], [5, -3]]; the 0 target is invalid.
#   (2, 1): abs 1, rel 1/2; (4, 5): abs 1, rel 1/4;
#   (1, -3): pred clamped to 1e-9 first -> abs 1 - 1e-9 (not 4), rel (1 - 1e-9) / 1
#   abs = (3 - 1e-9) / 3, rel = (1.75 - 1e-9) / 3
# Batch 2: target [[0.5, 0]], pred [[1.5, 2]] -> abs 1, rel 1 / 0.5 = 2
# Pooled: abs = (4 - 1e-9) / 4, rel = (3.75 - 1e-9) / 4
# batch_mean: abs ((3 - 1e-9) / 3 + 1) / 2, rel ((1.75 - 1e-9) / 3 + 2) / 2

DEPTH_BATCHES = [
    (dense([[1, 5], [5, -3]]), dense([[2, 0], [4, 1]])),
    (dense([[1.5, 2]]), dense([[0.5, 0]])),
]
DEPTH_EXPECTED = {
    "pooled": {"abs_err": (4 - 1e-9) / 4, "rel_err": (3.75 - 1e-9) / 4},
    "batch_mean": {
        "abs_err": ((3 - 1e-9) / 3 + 1) / 2,
        "rel_err": ((1.75 - 1e-9) / 3 + 2) / 2,
    },
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_depth_by_hand(reduction: str) -> None:
    meter = DepthMeter(reduction=reduction)
    for pred, target in DEPTH_BATCHES:
        meter.update(pred, target)
    assert meter.compute() == pytest.approx(DEPTH_EXPECTED[reduction], rel=1e-12)


# -- normals, by hand -------------------------------------------------------------------------
#
# Batch 1 (predictions deliberately not unit length):
#   gt +z, pred (0,0,5) -> 0 deg; gt +z, pred (3,0,3) -> 45; gt +x, pred (0,0,2) -> 90;
#   gt (0,0,0), pred (1,1,1) -> invalid.             angles [0, 45, 90]
# Batch 2: gt +z at 10 deg (length 2) -> 10; gt +y, pred 0.5*(sin20, cos20, 0) -> 20;
#   gt +z, pred (sqrt3, 0, 1) -> 60; gt (0,0,0) with a perfect pred -> invalid;
#   gt +z, pred (0,0,-3) -> 180.                      angles [10, 20, 60, 180]
# Pooled (7 angles, sorted 0 10 20 45 60 90 180): mean 405/7, median 45,
#   within_11.25 2/7 (0, 10), within_22.5 3/7, within_30 3/7.
# batch_mean: mean (45 + 67.5) / 2 = 56.25; median (45 + (20 + 60) / 2) / 2 = 42.5;
#   within_11.25 (1/3 + 1/4) / 2 = 7/24, within_22.5 and within_30 (1/3 + 2/4) / 2 = 5/12.
# Histogram median with 7 bins of 180/7 deg (no angle near an edge; 180 clamps to the last bin):
#   batch 1: bins of [0, 45, 90] = 0, 1 (1.75), 3 (3.5); rank 1.5 falls in bin 1 holding 1
#     angle after 1 below it -> (1 + 0.5/1) * 180/7 = 270/7
#   batch 2: bins of [10, 20, 60, 180] = 0, 0, 2, 6; rank 2 is reached at the end of bin 0
#     (2 angles) -> (0 + 2/2) * 180/7 = 180/7
#   pooled: hist [3,1,1,1,0,0,1], rank 3.5 in bin 1 after 3 below -> (1 + 0.5) * 180/7 = 270/7
#   batch_mean: (270/7 + 180/7) / 2 = 225/7

PLUS_Z = (0.0, 0.0, 1.0)
NORMALS_BATCHES = [
    normals_batch(
        [
            ((0.0, 0.0, 5.0), PLUS_Z),
            ((3.0, 0.0, 3.0), PLUS_Z),
            ((0.0, 0.0, 2.0), (1.0, 0.0, 0.0)),
            ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
        ]
    ),
    normals_batch(
        [
            (direction_at(10, scale=2.0), PLUS_Z),
            ((0.5 * math.sin(math.radians(20)), 0.5 * math.cos(math.radians(20)), 0.0), (0, 1, 0)),
            ((math.sqrt(3.0), 0.0, 1.0), PLUS_Z),
            (PLUS_Z, (0.0, 0.0, 0.0)),
            ((0.0, 0.0, -3.0), PLUS_Z),
        ]
    ),
]
NORMALS_EXPECTED = {
    "pooled": {
        "mean": 405 / 7,
        "median": 45.0,
        "within_11.25": 2 / 7,
        "within_22.5": 3 / 7,
        "within_30": 3 / 7,
        "median_hist": 270 / 7,
    },
    "batch_mean": {
        "mean": 56.25,
        "median": 42.5,
        "within_11.25": 7 / 24,
        "within_22.5": 5 / 12,
        "within_30": 5 / 12,
        "median_hist": 225 / 7,
    },
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_normals_by_hand(reduction: str) -> None:
    meter = NormalsMeter(reduction=reduction, hist_bins=7)
    for pred, target in NORMALS_BATCHES:
        meter.update(pred, target)
    result = meter.compute()
    assert list(result) == [
        "mean",
        "median",
        "within_11.25",
        "within_22.5",
        "within_30",
        "median_hist",
    ]
    # angles come from float32 vectors, so allow 1e-4 deg; fractions are exact counts
    assert result == pytest.approx(NORMALS_EXPECTED[reduction], abs=1e-4)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_normals_without_exact_median_reports_histogram_median(reduction: str) -> None:
    meter = NormalsMeter(reduction=reduction, exact_median=False, hist_bins=7)
    for pred, target in NORMALS_BATCHES:
        meter.update(pred, target)
    result = meter.compute()
    assert result["median"] == result["median_hist"]
    assert result["median"] == pytest.approx(NORMALS_EXPECTED[reduction]["median_hist"])
    assert "errors" not in meter.state_dict()["state"]  # no per-pixel angles kept


def test_normals_even_count_median_is_mean_of_middle_two() -> None:
    meter = NormalsMeter()
    meter.update(*NORMALS_BATCHES[1])  # angles [10, 20, 60, 180]
    assert meter.compute()["median"] == pytest.approx(40.0, abs=1e-4)  # (20 + 60) / 2
    # torch.median would have said 20 (the lower middle value)
    assert float(torch.median(torch.tensor([10.0, 20.0, 60.0, 180.0]))) == 20.0


def test_normals_default_histogram_median_is_within_a_bin_of_exact() -> None:
    meter = NormalsMeter()  # 1800 bins of 0.1 deg
    for pred, target in NORMALS_BATCHES:
        meter.update(pred, target)
    result = meter.compute()
    assert result["median"] == pytest.approx(45.0, abs=1e-4)
    assert result["median_hist"] == pytest.approx(45.0, abs=0.1)


def test_normals_prediction_length_does_not_matter() -> None:
    generator = torch.Generator().manual_seed(3)
    pred, target = random_batch("normals", generator)
    short, long = NormalsMeter(), NormalsMeter()
    short.update(pred * 1e-3, target)
    long.update(F.normalize(pred, dim=1) * 7.0, target)
    assert short.compute() == pytest.approx(long.compute(), abs=1e-4)


def test_normals_nan_prediction_makes_every_metric_nan() -> None:
    pred, target = (t.clone() for t in NORMALS_BATCHES[0])
    pred[0, 0, 0, 3] = NAN  # invalid target there: ignored
    meter = NormalsMeter()
    meter.update(pred, target)
    assert meter.compute()["mean"] == pytest.approx(45.0, abs=1e-4)
    pred[0, 1, 0, 0] = NAN
    meter.update(pred, target)
    assert all(math.isnan(v) for v in meter.compute().values())


# -- shared behaviour ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_empty_and_all_invalid_meters_give_nan(kind: str, reduction: str) -> None:
    meter = make_meter(kind, reduction)
    assert set(meter.compute()) == set(meter.metric_names)
    assert all(math.isnan(v) for v in meter.compute().values())
    pred, target = random_batch(kind, torch.Generator().manual_seed(0), batch=2)
    meter.update(pred, target, present=torch.tensor([False, False]))
    if kind == "semseg":
        target = torch.full_like(target, -1)
    elif kind == "height":
        target = torch.full_like(target, NAN)
    else:
        target = torch.zeros_like(target)
    meter.update(pred, target)
    assert meter.valid_pixels == 0
    assert all(math.isnan(v) for v in meter.compute().values())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_absent_samples_are_ignored(kind: str, reduction: str) -> None:
    generator = torch.Generator().manual_seed(1)
    pred, target = random_batch(kind, generator, batch=3)
    with_flags, kept_only = make_meter(kind, reduction), make_meter(kind, reduction)
    with_flags.update(pred, target, present=torch.tensor([True, False, True]))
    kept_only.update(pred[[0, 2]], target[[0, 2]])
    assert_identical(with_flags.compute(), kept_only.compute())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_one_meter_fed_every_batch(kind: str, reduction: str) -> None:
    generator = torch.Generator().manual_seed(2)
    batches = [random_batch(kind, generator, batch=b) for b in (2, 3, 1)]
    whole = make_meter(kind, reduction)
    parts = [make_meter(kind, reduction) for _ in batches]
    for part, (pred, target) in zip(parts, batches, strict=True):
        whole.update(pred, target)
        part.update(pred, target)
    forward = make_meter(kind, reduction)
    for part in parts:
        forward.merge(part)
    backward = make_meter(kind, reduction)
    for part in reversed(parts):
        backward.merge(part)
    # float sums are combined exactly, so even the order of merging leaves no trace
    assert_identical(forward.compute(), whole.compute())
    assert_identical(backward.compute(), whole.compute())
    two = make_meter(kind, reduction)
    two.update(*batches[0])
    two.update(*batches[1])
    parts[0].merge(parts[1])
    assert_identical(parts[0].compute(), two.compute())


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_and_incompatible_merges(kind: str) -> None:
    meter = make_meter(kind)
    meter.update(*random_batch(kind, torch.Generator().manual_seed(4)))
    restored = make_meter(kind)
    restored.load_state_dict(meter.state_dict())
    assert_identical(restored.compute(), meter.compute())
    with pytest.raises(ValueError, match="different settings"):
        make_meter(kind, "batch_mean").merge(meter)
    other = HeightMeter() if kind != "height" else DepthMeter()
    with pytest.raises(TypeError, match="cannot merge"):
        meter.merge(other)


EXACT_UNDER_SPLIT = {"miou", "pixel_acc", "median", "median_hist", "within_11.25"}
EXACT_UNDER_SPLIT |= {"within_22.5", "within_30"}


@pytest.mark.parametrize("kind", KINDS)
def test_splitting_a_batch_without_padding_keeps_pooled_metrics(kind: str) -> None:
    # What makes 1-process and N-process pooled evaluation agree: only the set of pixels counts.
    pred, target = random_batch(kind, torch.Generator().manual_seed(5), batch=5)
    whole, split = make_meter(kind), make_meter(kind)
    whole.update(pred, target)
    split.update(pred[:2], target[:2])
    split.update(pred[2:], target[2:])
    expected, actual = whole.compute(), split.compute()
    # counts and the exact median are bit-identical; float error sums may differ by rounding
    assert actual == pytest.approx(expected, rel=1e-12)
    for key in EXACT_UNDER_SPLIT & expected.keys():
        assert actual[key] == expected[key], key


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_segmentation_merge_is_order_independent(data: st.DataObject) -> None:
    num_classes = data.draw(st.integers(1, 4), label="num_classes")
    rule = data.draw(st.sampled_from(MIOU_RULES), label="rule")
    reduction = data.draw(st.sampled_from(REDUCTIONS), label="reduction")
    meters = []
    for _ in range(data.draw(st.integers(1, 5), label="batches")):
        height, width = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
        size = height * width
        labels = st.lists(st.integers(-1, num_classes), min_size=size, max_size=size)
        preds = st.lists(st.integers(0, num_classes - 1), min_size=size, max_size=size)
        target = torch.tensor(data.draw(labels)).reshape(1, height, width)
        pred = torch.tensor(data.draw(preds)).reshape(1, height, width)
        meter = SegmentationMeter(num_classes, miou_rule=rule, reduction=reduction)
        meter.update(seg_logits(pred.tolist(), num_classes), target)
        meters.append(meter)
    order = data.draw(st.permutations(range(len(meters))), label="order")
    in_order = SegmentationMeter(num_classes, miou_rule=rule, reduction=reduction)
    for meter in meters:
        in_order.merge(meter)
    shuffled = SegmentationMeter(num_classes, miou_rule=rule, reduction=reduction)
    for index in order:
        shuffled.merge(meters[index])
    assert torch.equal(in_order.confusion_matrix, shuffled.confusion_matrix)
    assert_identical(shuffled.compute(), in_order.compute())


# -- distributed --------------------------------------------------------------------------------

DIST_SAMPLES = 7  # odd on purpose: shards of 4 and 3, no padding
DIST_BATCH = 2


def _dist_dataset() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The same samples in every process: kind -> (pred, target, present)."""
    generator = torch.Generator().manual_seed(11)
    data = {}
    for kind in KINDS:
        pred, target = random_batch(kind, generator, batch=DIST_SAMPLES, height=8, width=8)
        present = torch.ones(DIST_SAMPLES, dtype=torch.bool)
        present[5] = False
        data[kind] = (pred, target, present)
    return data


def _evaluate(kind: str, indices: torch.Tensor, data: dict) -> Meter:
    meter = make_meter(kind)
    pred, target, present = data[kind]
    for chunk in indices.split(DIST_BATCH):
        meter.update(pred[chunk], target[chunk], present[chunk])
    return meter


def _dist_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=20),
    )
    try:
        data = _dist_dataset()
        shard = torch.tensor_split(torch.arange(DIST_SAMPLES), world_size)[rank]
        results: dict = {}
        for kind in KINDS:
            meter = _evaluate(kind, shard, data)
            meter.reduce_distributed()
            results[kind] = meter.compute()
            try:
                meter.reduce_distributed()  # would double count: must refuse
                results[f"{kind}.second_reduce"] = "allowed"
            except RuntimeError:
                results[f"{kind}.second_reduce"] = "refused"
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_reduce_distributed_is_a_no_op_without_a_process_group() -> None:
    assert not dist.is_initialized()
    meter = HeightMeter()
    meter.update(*HEIGHT_BATCHES[0])
    meter.reduce_distributed()
    meter.reduce_distributed()
    assert meter.compute() == pytest.approx({"abs_err_mm": 0.875, "rmse_mm": math.sqrt(1.3125)})


def test_reduce_distributed_over_two_gloo_processes_equals_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only, whatever the hostname says
    # torch.multiprocessing's spawn API with the fork start method (as torch's own c10d tests
    # do): two fresh interpreters importing torch take 6-15 s on 2 cores, forks well under 1 s.
    # Safe here: the workers use one intra-op thread and the parent holds no process group.
    mp.start_processes(
        _dist_worker,
        args=(2, _free_port(), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    data = _dist_dataset()
    for kind in KINDS:
        single = _evaluate(kind, torch.arange(DIST_SAMPLES), data).compute()
        # the shards hold the same batches as the single process, so the match is exact
        assert_identical(ranks[0][kind], single)
        assert_identical(ranks[1][kind], single)
        assert ranks[0][f"{kind}.second_reduce"] == "refused"


# -- Delta_m --------------------------------------------------------------------------------------
#
# semseg.miou 0.5 -> 0.625: +25 %; semseg.pixel_acc 0.8 -> 0.8: 0 %
# depth.abs_err (lower better) 0.5 -> 0.375: -(0.375 - 0.5) / 0.5 = +25 %
# depth.rel_err (lower better) 0.25 -> 0.3125: -(0.0625 / 0.25) = -25 %
# primary (miou, abs_err): (25 + 25) / 2 = 25
# task average: semseg (25 + 0) / 2 = 12.5, depth (25 - 25) / 2 = 0 -> 6.25
# all metrics, lower = better: -(25 + 0 + 25 - 25) / 4 = -6.25

DIRECTIONS = {
    "semseg.miou": "higher",
    "semseg.pixel_acc": "higher",
    "depth.abs_err": "lower",
    "depth.rel_err": "lower",
    "height.abs_err_mm": "lower",
}
PRIMARY = {"semseg": "miou", "depth": "abs_err"}
BASELINE = {
    "semseg.miou": 0.5,
    "semseg.pixel_acc": 0.8,
    "depth.abs_err": 0.5,
    "depth.rel_err": 0.25,
}
CANDIDATE = {
    "semseg.miou": 0.625,
    "semseg.pixel_acc": 0.8,
    "depth.abs_err": 0.375,
    "depth.rel_err": 0.3125,
}


def test_delta_m_by_hand() -> None:
    result = delta_m(CANDIDATE, BASELINE, PRIMARY, DIRECTIONS)
    assert result == pytest.approx(
        {DELTA_PRIMARY_KEY: 25.0, DELTA_TASK_AVG_KEY: 6.25, DELTA_ALL_METRICS_KEY: -6.25}
    )
    assert "reason" not in result
    assert relative_improvements(CANDIDATE, BASELINE, DIRECTIONS) == pytest.approx(
        {
            "semseg.miou": 25.0,
            "semseg.pixel_acc": 0.0,
            "depth.abs_err": 25.0,
            "depth.rel_err": -25.0,
        }
    )


def test_delta_m_signs_for_a_better_lower_is_better_metric() -> None:
    # abs_err 0.5 -> 0.4 is 20 % better: positive in the higher-better keys, negative in the
    # lower-better one.
    result = delta_m(
        {"depth.abs_err": 0.4}, {"depth.abs_err": 0.5}, {"depth": "abs_err"}, DIRECTIONS
    )
    assert result[DELTA_PRIMARY_KEY] == pytest.approx(20.0)
    assert result[DELTA_TASK_AVG_KEY] == pytest.approx(20.0)
    assert result[DELTA_ALL_METRICS_KEY] == pytest.approx(-20.0)


def test_delta_m_skips_unusable_baselines_and_missing_tasks() -> None:
    baseline = {**BASELINE, "semseg.pixel_acc": 0.0, "depth.rel_err": NAN}
    primary = {**PRIMARY, "height": "abs_err_mm"}  # height has no baseline: skipped
    result = delta_m({**CANDIDATE, "height.abs_err_mm": 1.0}, baseline, primary, DIRECTIONS)
    # only miou (+25) and abs_err (+25) are left: every variant is +-25
    assert result == pytest.approx(
        {DELTA_PRIMARY_KEY: 25.0, DELTA_TASK_AVG_KEY: 25.0, DELTA_ALL_METRICS_KEY: -25.0}
    )


def test_delta_m_missing_primary_is_none_with_reason() -> None:
    candidate = {k: v for k, v in CANDIDATE.items() if k != "depth.abs_err"}
    result = delta_m(candidate, BASELINE, PRIMARY, DIRECTIONS)
    assert result[DELTA_PRIMARY_KEY] is None
    assert "depth.abs_err" in str(result["reason"])
    # semseg (25 + 0) / 2 = 12.5 and depth rel_err -25 -> (12.5 - 25) / 2 = -6.25
    assert result[DELTA_TASK_AVG_KEY] == pytest.approx(-6.25)
    assert result[DELTA_ALL_METRICS_KEY] == pytest.approx(0.0)  # -(25 + 0 - 25) / 3


def test_delta_m_non_finite_candidate_and_no_baseline_give_none() -> None:
    result = delta_m({**CANDIDATE, "semseg.miou": NAN}, BASELINE, PRIMARY, DIRECTIONS)
    assert result[DELTA_PRIMARY_KEY] is None
    assert result[DELTA_TASK_AVG_KEY] is None
    assert "semseg.miou" in str(result["reason"])
    nothing = delta_m(CANDIDATE, {}, PRIMARY, DIRECTIONS)
    assert nothing[DELTA_PRIMARY_KEY] is None and nothing[DELTA_ALL_METRICS_KEY] is None
    assert isinstance(nothing["reason"], str) and nothing["reason"]
    with pytest.raises(ValueError, match="'better'"):
        delta_m(CANDIDATE, BASELINE, PRIMARY, {**DIRECTIONS, "semseg.miou": "better"})


# -- the MTAN preset against MTAN's own evaluation loop (lorenmt/mtan utils.py) ----------------


def _mtan_reference(batches, num_classes):
    """MTAN's loop, literally: ConfMatrix updated every batch and read once at the end;
    depth_error and normal_error computed per batch and averaged over the batches."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    depth_sums = torch.zeros(2, dtype=torch.float64)
    normal_sums = torch.zeros(5, dtype=torch.float64)
    for seg_pred, seg_true, depth_pred, depth_true, normal_pred, normal_true in batches:
        pred = seg_pred.argmax(1).flatten()
        true = seg_true.flatten()
        keep = (true >= 0) & (true < num_classes)
        index = num_classes * true[keep] + pred[keep]
        confusion += torch.bincount(index, minlength=num_classes**2).view(num_classes, -1)
        mask = (depth_true.sum(1) != 0).unsqueeze(1)
        pred_true = depth_pred.double().masked_select(mask)
        truth = depth_true.double().masked_select(mask)
        abs_err = (pred_true - truth).abs()
        depth_sums += torch.stack([abs_err.sum(), (abs_err / truth).sum()]) / mask.sum()
        mask = normal_true.sum(1) != 0
        unit = F.normalize(normal_pred.double(), dim=1)  # MTAN's decoder normalises its output
        cosine = (unit * normal_true.double()).sum(1).masked_select(mask).clamp(-1, 1)
        error = torch.rad2deg(torch.acos(cosine))
        median = error.median() if error.numel() % 2 else _even_median(error)
        within = [(error < limit).double().mean() for limit in (11.25, 22.5, 30)]
        normal_sums += torch.stack([error.mean(), median, *within])
    h = confusion.double()
    iou = h.diagonal() / (h.sum(0) + h.sum(1) - h.diagonal())
    n = len(batches)
    return {
        "semseg": {"miou": float(iou.mean()), "pixel_acc": float(h.diagonal().sum() / h.sum())},
        "depth": dict(zip(("abs_err", "rel_err"), (depth_sums / n).tolist(), strict=True)),
        "normals": dict(
            zip(("mean", "median", *NORMALS_WITHIN_NAMES), (normal_sums / n).tolist(), strict=True)
        ),
    }


def _even_median(values):
    """np.median's mean of the two middle values (torch.median returns the lower one)."""
    ordered = values.sort().values
    middle = values.numel() // 2
    return (ordered[middle - 1] + ordered[middle]) / 2


def _mtan_batches(num_classes=4, batches=3, size=6):
    generator = torch.Generator().manual_seed(7)
    out = []
    for b in range(batches):
        batch = 2 if b < batches - 1 else 1  # a short last batch weighs as much as a full one
        seg_true = torch.randint(0, num_classes, (batch, size, size), generator=generator)
        seg_true[0, 0, :] = 255  # ignored pixels
        depth_true = torch.rand(batch, 1, size, size, generator=generator) + 0.5
        depth_true[:, :, : b + 1] = 0  # invalid depth, a different share per batch
        normal_true = F.normalize(torch.randn(batch, 3, size, size, generator=generator), dim=1)
        normal_true[:, :, -1, : b + 2] = 0
        out.append(
            (
                torch.randn(batch, num_classes, size, size, generator=generator),
                seg_true,
                torch.rand(batch, 1, size, size, generator=generator) + 0.5,
                depth_true,
                torch.randn(batch, 3, size, size, generator=generator),
                normal_true,
            )
        )
    return out


def test_the_mtan_preset_reproduces_mtans_evaluation_loop() -> None:
    from cta_model.tasks import make_meters

    batches = _mtan_batches()
    meters = make_meters(
        ("semseg", "depth", "normals"), num_classes=4, miou_rule="strict", reduction="mtan"
    )
    assert meters["semseg"].reduction == "pooled"
    assert meters["depth"].reduction == meters["normals"].reduction == "batch_mean"
    for seg_pred, seg_true, depth_pred, depth_true, normal_pred, normal_true in batches:
        meters["semseg"].update(seg_pred, seg_true)
        meters["depth"].update(depth_pred, depth_true)
        meters["normals"].update(normal_pred, normal_true)
    expected = _mtan_reference(batches, 4)
    for task, values in expected.items():
        got = meters[task].compute()
        for name, value in values.items():
            assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, name)
    # The all-batch_mean reduction averages mIoU per batch instead: not MTAN's number here.
    per_batch = make_meters(("semseg",), num_classes=4, miou_rule="strict", reduction="batch_mean")
    for seg_pred, seg_true, *_ in batches:
        per_batch["semseg"].update(seg_pred, seg_true)
    assert per_batch["semseg"].compute()["miou"] != pytest.approx(expected["semseg"]["miou"])


def test_presets_resolve_per_meter_and_merge_like_their_reduction() -> None:
    assert set(REDUCTIONS) < set(EVAL_REDUCTIONS) and "mtan" in EVAL_REDUCTIONS
    assert SegmentationMeter(3, reduction="mtan").reduction == "pooled"
    assert HeightMeter(reduction="mtan").reduction == "batch_mean"
    with pytest.raises(ValueError, match="mtan"):
        DepthMeter(reduction="libmtl")
