"""Defect scores and image-level inspection decisions (DESIGN 5.2).

One definition, used by the Predictor, `cta evaluate`, `cta serve`, roll-out health and
monitoring alike:

- **Defect map** (per pixel): the probability mass of the reject classes, i.e. the sum of the
  segmentation softmax over ``reject_classes`` (in [0, 1]).
- **Defect score** (per image): the maximum over the image of the defect map averaged over a
  ``score_window_px`` x ``score_window_px`` window (a box filter; windows at the border average
  only the pixels inside the image). The window keeps one stray pixel from deciding a part while
  a defect a few pixels wide still reaches a high score; ``score_window_px = 1`` is the plain
  maximum.
- **Verdict**: reject when ``score >= threshold``. The threshold is chosen on ``val`` for the
  configured target recall (`choose_threshold`) and applied unchanged to ``test``, ``qa`` and
  serving. Thresholds below ``min_score`` are not considered: a probability mass that small is
  noise, so a model that needs one to reach the target recall is reported as missing it.
- **Resolution**: a defect narrower than ``MIN_DEFECT_PX`` pixels at the pitch the model sees is
  not reliably visible (inspection practice); `check_defect_resolution` refuses such a set-up.

Pure numpy/torch: no MLOps package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from cta_model.config import StrictModel, load_config
from cta_model.errors import ConfigError

DEFAULT_INSPECTION_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "inspection.yaml"
#: The smallest defect to find must span at least this many pixels where the model sees it.
MIN_DEFECT_PX = 3.0


def _odd_window(value: int) -> int:
    if value < 1 or value % 2 == 0:
        raise ValueError(f"must be an odd number of pixels >= 1, got {value}")
    return value


class InspectionConfig(StrictModel):
    """configs/inspection.yaml: the defaults of what a model's own model.yaml does not say."""

    reject_classes: tuple[int, ...] = Field(min_length=1)
    target_recall: float = Field(default=0.95, gt=0.0, le=1.0)
    score_window_px: int = 3
    min_score: float = Field(default=0.05, gt=0.0, lt=1.0)

    @field_validator("reject_classes")
    @classmethod
    def _non_negative_unique(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 0 for c in value) or len(set(value)) != len(value):
            raise ValueError(f"must be distinct class ids >= 0, got {list(value)}")
        return value

    @field_validator("score_window_px")
    @classmethod
    def _odd(cls, value: int) -> int:
        return _odd_window(value)


def load_inspection_config(path: str | Path = DEFAULT_INSPECTION_CONFIG) -> InspectionConfig:
    return load_config(InspectionConfig, path)


@dataclass(frozen=True)
class ScoreDefinition:
    """What a model folder says about its own defect score (model.yaml ``inspection``)."""

    reject_classes: tuple[int, ...]
    score_window_px: int = 3

    def __post_init__(self) -> None:
        if not self.reject_classes:
            raise ConfigError("inspection.reject_classes: at least one class id")
        if any(int(c) < 0 for c in self.reject_classes):
            raise ConfigError(f"inspection.reject_classes: ids >= 0, got {self.reject_classes}")
        try:
            _odd_window(self.score_window_px)
        except ValueError as exc:
            raise ConfigError(f"inspection.score_window_px: {exc}") from None


# ------------------------------------------------------------------------- scores


def defect_map(class_probs: torch.Tensor, reject_classes: Sequence[int]) -> torch.Tensor:
    """(B, C, H, W) class probabilities -> (B, H, W) probability mass of the reject classes."""
    num_classes = class_probs.shape[1]
    wanted = [int(c) for c in reject_classes if 0 <= int(c) < num_classes]
    if not wanted:
        raise ConfigError(
            f"reject classes {list(reject_classes)} name no class of this {num_classes}-class "
            "segmentation"
        )
    return class_probs[:, wanted].sum(dim=1).clamp_(0.0, 1.0)


def image_scores(defect_maps: torch.Tensor, window_px: int = 3) -> torch.Tensor:
    """(B, H, W) defect maps -> (B,) scores: the max of the window-averaged map."""
    _odd_window(window_px)
    maps = defect_maps.float().unsqueeze(1)
    if window_px > 1:
        maps = F.avg_pool2d(
            maps, window_px, stride=1, padding=window_px // 2, count_include_pad=False
        )
    return maps.flatten(1).amax(dim=1)


def is_reject(scores: np.ndarray | float, threshold: float) -> np.ndarray:
    return np.asarray(scores) >= threshold


# ------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    reached: bool  # the target recall is reached on the images it was chosen on
    recall: float | None  # recall at the chosen threshold on those images (None: none defective)
    reason: str | None = None  # why it was not reached


def choose_threshold(
    scores: np.ndarray, truly_defective: np.ndarray, target_recall: float, min_score: float
) -> ThresholdChoice:
    """The largest threshold (fewest false rejects) whose recall reaches ``target_recall``.

    Candidates are the defective images' scores; a threshold below ``min_score`` is not
    considered, so when the target needs one the threshold is ``min_score`` and ``reached`` is
    False. Without defective images the threshold is ``min_score``, also not reached.
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truly_defective, dtype=bool)
    if scores.shape != truth.shape:
        raise ValueError(f"scores {scores.shape} and labels {truth.shape} differ in shape")
    if not np.isfinite(scores).all():
        raise ValueError("scores: NaN or infinite values")
    bad = np.sort(scores[truth])[::-1]
    if bad.size == 0:
        return ThresholdChoice(float(min_score), False, None, "no defective image to choose on")
    needed = max(1, math.ceil(target_recall * bad.size - 1e-9))
    threshold = float(bad[needed - 1])
    if threshold >= min_score:
        return ThresholdChoice(threshold, True, float((bad >= threshold).mean()))
    recall = float((bad >= min_score).mean())
    return ThresholdChoice(
        float(min_score),
        False,
        recall,
        f"recall {recall:.3f} < target {target_recall:g} at the smallest threshold considered "
        f"(min_score {min_score:g})",
    )


def recall_and_frr(
    predicted_reject: np.ndarray, truly_defective: np.ndarray
) -> tuple[float | None, float | None]:
    """(recall over defective parts, false-reject rate over good parts); None without any."""
    predicted = np.asarray(predicted_reject, dtype=bool)
    truth = np.asarray(truly_defective, dtype=bool)
    n_bad, n_good = int(truth.sum()), int((~truth).sum())
    recall = float((predicted & truth).sum() / n_bad) if n_bad else None
    frr = float((predicted & ~truth).sum() / n_good) if n_good else None
    return recall, frr


def pr_curve(
    scores: np.ndarray, truly_defective: np.ndarray, thresholds: np.ndarray
) -> dict[str, list[float | None]]:
    """Recall, precision and false-reject rate of ``score >= t`` for each threshold ``t``.

    Lists aligned with ``thresholds``; a rate whose denominator is 0 (no defective part, no
    predicted reject, no good part) is None.
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truly_defective, dtype=bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    predicted = scores[None, :] >= thresholds[:, None]  # (T, N)
    true_rejects = (predicted & truth).sum(axis=1)
    false_rejects = (predicted & ~truth).sum(axis=1)
    n_bad, n_good = int(truth.sum()), int((~truth).sum())
    n_predicted = predicted.sum(axis=1)

    def ratio(numerator: np.ndarray, denominator: np.ndarray | int) -> list[float | None]:
        denominators = np.broadcast_to(np.asarray(denominator), numerator.shape)
        return [float(n / d) if d else None for n, d in zip(numerator, denominators, strict=True)]

    return {
        "threshold": [float(t) for t in thresholds],
        "recall": ratio(true_rejects, n_bad),
        "precision": ratio(true_rejects, n_predicted),
        "frr": ratio(false_rejects, n_good),
    }


def curve_thresholds(
    scores: np.ndarray, chosen: float | None = None, max_points: int = 50
) -> np.ndarray:
    """Thresholds worth plotting: the distinct scores (and ``chosen``), thinned to at most
    ``max_points`` evenly spaced by rank, ascending."""
    candidates = np.unique(np.asarray(scores, dtype=np.float64))
    if candidates.size > max_points:
        keep = np.unique(np.linspace(0, candidates.size - 1, max_points).round().astype(int))
        candidates = candidates[keep]
    if chosen is not None:
        candidates = np.union1d(candidates, [chosen])
    return candidates


# ----------------------------------------------------------------------- bootstrap


def bootstrap_indices(n_items: int, n_replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(n_replicates, n_items) indices drawn with replacement: one resample per row."""
    if n_items < 1 or n_replicates < 1:
        raise ValueError(f"need n_items >= 1 and n_replicates >= 1, got {n_items}, {n_replicates}")
    return rng.integers(0, n_items, size=(n_replicates, n_items))


def resampled_recall_and_frr(
    predicted_reject: np.ndarray, defective: np.ndarray, good: np.ndarray, indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Recall and false-reject rate of each resample (row of ``indices``), paired: row k of
    both uses the same resample. ``defective`` / ``good`` mark labelled parts (a part with
    neither is unlabelled and counts in neither rate). NaN where a resample has no defective
    (recall) or no good (frr) part."""
    predicted = np.asarray(predicted_reject, dtype=bool)[indices]
    bad = np.asarray(defective, dtype=bool)[indices]
    ok = np.asarray(good, dtype=bool)[indices]
    n_bad, n_good = bad.sum(axis=1), ok.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(n_bad > 0, (predicted & bad).sum(axis=1) / n_bad, np.nan)
        frr = np.where(n_good > 0, (predicted & ok).sum(axis=1) / n_good, np.nan)
    return recall, frr


# ---------------------------------------------------------------------- resolution


def pitch_seen(
    image_pitch_mm_per_px: float,
    image_size: Sequence[int],
    model_size: Sequence[int],
    resize_policy: str,
) -> float:
    """The pitch (mm/px) at which the network sees an image: the image's own pitch when it is
    tiled or fed as is, coarser by the downscale factor when it is resized to the model's
    input size."""
    if resize_policy != "resize":
        return float(image_pitch_mm_per_px)
    factor = max(image_size[0] / model_size[0], image_size[1] / model_size[1])
    return float(image_pitch_mm_per_px) * factor


def defect_pixels(min_defect_width_mm: float, pitch_mm_per_px: float) -> float:
    return float(min_defect_width_mm) / float(pitch_mm_per_px)


def check_defect_resolution(
    line_id: str,
    min_defect_width_mm: float | None,
    pitch_mm_per_px: float,
    where: str,
    inventory: str = "configs/lines.yaml",
) -> None:
    """Refuse a set-up where line ``line_id``'s smallest defect to find spans fewer than
    MIN_DEFECT_PX pixels at the pitch the model sees. ``min_defect_width_mm`` None: the line
    states none, nothing to check."""
    if min_defect_width_mm is None:
        return
    if not (pitch_mm_per_px > 0 and math.isfinite(pitch_mm_per_px)):
        raise ConfigError(f"{where}: line {line_id}: pitch {pitch_mm_per_px!r} mm/px is unusable")
    pixels = defect_pixels(min_defect_width_mm, pitch_mm_per_px)
    if pixels < MIN_DEFECT_PX - 1e-9:
        raise ConfigError(
            f"{where}: line {line_id}: its smallest defect to find ({min_defect_width_mm:g} mm, "
            f"min_defect_width_mm in {inventory}) spans {pixels:.2f} px at the "
            f"{pitch_mm_per_px:.3g} mm/px the model sees; at least {MIN_DEFECT_PX:g} px are "
            "needed. Use images at a finer pitch (a larger image size, or tiles cut at the "
            "camera's pitch instead of resizing: data.tiling in the train config)."
        )
