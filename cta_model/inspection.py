"""Image-level inspection decisions from a predicted segmentation (DESIGN 5.2).

A part is a reject when the predicted area of reject classes reaches a threshold in pixels;
the threshold is chosen on `val` for a target recall and then applied unchanged elsewhere
(evaluate, serve, roll-out health). Pure numpy: no MLOps package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from cta_model.config import StrictModel, load_config

DEFAULT_INSPECTION_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "inspection.yaml"


class InspectionConfig(StrictModel):
    reject_classes: tuple[int, ...] = Field(min_length=1)
    target_recall: float = Field(default=0.95, gt=0.0, le=1.0)
    min_area_px: int = Field(default=1, ge=1)

    @field_validator("reject_classes")
    @classmethod
    def _non_negative_unique(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 0 for c in value) or len(set(value)) != len(value):
            raise ValueError(f"must be distinct class ids >= 0, got {list(value)}")
        return value


def load_inspection_config(path: str | Path = DEFAULT_INSPECTION_CONFIG) -> InspectionConfig:
    return load_config(InspectionConfig, path)


def reject_area(semseg: np.ndarray, reject_classes: tuple[int, ...]) -> np.ndarray:
    """Pixels of reject classes per image: (B, H, W) or (H, W) class ids -> int64 (B,) or ()."""
    mask = np.isin(semseg, np.asarray(reject_classes))
    return mask.sum(axis=(-2, -1)).astype(np.int64)


def is_reject(area: np.ndarray | int, threshold_px: int) -> np.ndarray:
    return np.asarray(area) >= threshold_px


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


def choose_threshold(
    areas: np.ndarray, truly_defective: np.ndarray, target_recall: float, min_area_px: int = 1
) -> int:
    """The largest area threshold (fewest false rejects) whose recall reaches target_recall.

    Without defective parts, or when even ``min_area_px`` misses the target, ``min_area_px``.
    """
    areas = np.asarray(areas, dtype=np.int64)
    truth = np.asarray(truly_defective, dtype=bool)
    bad_areas = np.sort(areas[truth])
    if bad_areas.size == 0:
        return int(min_area_px)
    # Recall at threshold t = fraction of defective parts with area >= t; allow k misses.
    allowed_misses = int(np.floor((1.0 - target_recall) * bad_areas.size + 1e-9))
    threshold = int(bad_areas[allowed_misses])
    return max(threshold, int(min_area_px))


def pr_curve(
    areas: np.ndarray, truly_defective: np.ndarray, thresholds: np.ndarray
) -> dict[str, list[float | None]]:
    """Recall, precision and false-reject rate of ``area >= t`` for each threshold ``t``.

    Lists aligned with ``thresholds``; a rate whose denominator is 0 (no defective part, no
    predicted reject, no good part) is None.
    """
    areas = np.asarray(areas, dtype=np.int64)
    truth = np.asarray(truly_defective, dtype=bool)
    thresholds = np.asarray(thresholds, dtype=np.int64)
    predicted = areas[None, :] >= thresholds[:, None]  # (T, N)
    true_rejects = (predicted & truth).sum(axis=1)
    false_rejects = (predicted & ~truth).sum(axis=1)
    n_bad, n_good = int(truth.sum()), int((~truth).sum())
    n_predicted = predicted.sum(axis=1)

    def ratio(numerator: np.ndarray, denominator: np.ndarray | int) -> list[float | None]:
        denominators = np.broadcast_to(np.asarray(denominator), numerator.shape)
        return [float(n / d) if d else None for n, d in zip(numerator, denominators, strict=True)]

    return {
        "threshold_px": [int(t) for t in thresholds],
        "recall": ratio(true_rejects, n_bad),
        "precision": ratio(true_rejects, n_predicted),
        "frr": ratio(false_rejects, n_good),
    }


def curve_thresholds(
    areas: np.ndarray, min_area_px: int = 1, chosen: int | None = None, max_points: int = 50
) -> np.ndarray:
    """Thresholds worth plotting: the distinct areas >= ``min_area_px`` (and ``chosen``),
    thinned to at most ``max_points`` evenly spaced by rank, ascending."""
    values = np.asarray(areas, dtype=np.int64)
    candidates = np.unique(np.concatenate([values[values >= min_area_px], [min_area_px]]))
    if candidates.size > max_points:
        keep = np.unique(np.linspace(0, candidates.size - 1, max_points).round().astype(int))
        candidates = candidates[keep]
    if chosen is not None:
        candidates = np.union1d(candidates, [chosen])
    return candidates


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
