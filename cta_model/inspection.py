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
