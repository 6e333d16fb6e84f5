"""What a run needs for defect inspection, decided once at its start.

- the class task and its reject classes: the train config's ``inspection.reject_classes``, else
  the dataset's own (an imported benchmark names its defects), else configs/inspection.yaml;
- the defect score the model folder records (reject classes, window);
- the input contract: whole images resized to ``model.input_size``, or tiles of that size cut
  at the images' own pitch (``data.tiling``);
- the resolution check: per line of the training data, its smallest defect to find
  (configs/lines.yaml ``min_defect_width_mm``) must span at least 3 pixels at the pitch the
  model sees, else the run is refused naming the line;
- the defect census of the training split, and a loud warning when it shows no defect pixel
  and no synthetic anomalies are pasted (the model could only learn "all good").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cta_model.errors import ConfigError
from cta_model.inspection import (
    ScoreDefinition,
    check_defect_resolution,
    load_inspection_config,
    pitch_seen,
)
from cta_model.model_folder import InputContract
from cta_model.tasks import task_of_kind
from cta_model.train_config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InspectionSetup:
    class_task: str | None
    reject_classes: tuple[int, ...]
    score: ScoreDefinition | None  # None: the model has no class task
    contract: InputContract
    trained_pitch_mm_per_px: tuple[float, float] | None


@dataclass(frozen=True)
class DefectCensus:
    images: int  # images of the split with a class label
    defective_images: int  # ... with at least one reject-class pixel
    defect_pixels: int
    labelled_pixels: int
    defective_indices: tuple[int, ...] = ()  # dataset indices of the defective images

    def describe(self) -> str:
        share = self.defect_pixels / self.labelled_pixels if self.labelled_pixels else 0.0
        return (
            f"{self.defective_images} of {self.images} labelled images show reject-class "
            f"pixels ({self.defect_pixels} pixels, {100 * share:.3f} % of labelled pixels)"
        )


def _rows(dataset: Any) -> list[Mapping[str, Any]]:
    """The manifest rows behind a line dataset (or a Subset of one); [] for other formats."""
    base = getattr(dataset, "base", None)
    if base is not None and hasattr(dataset, "indices"):
        rows = getattr(base, "rows", None)
        return [rows[i] for i in dataset.indices] if rows is not None else []
    return list(getattr(dataset, "rows", []) or [])


def lines_of(dataset: Any) -> Any | None:
    """The fleet inventory a line dataset (or a Subset of one) checked its line ids against."""
    return getattr(getattr(dataset, "base", dataset), "lines_config", None)


def pitch_by_line(dataset: Any) -> dict[str, tuple[float, float]]:
    """(finest, coarsest) pitch in mm/px of each line's samples; lines without any known
    pitch are left out."""
    out: dict[str, tuple[float, float]] = {}
    for row in _rows(dataset):
        pitch = row.get("pitch_mm_per_px")
        if pitch is None or not math.isfinite(float(pitch)) or float(pitch) <= 0:
            continue
        low, high = out.get(row["line_id"], (math.inf, 0.0))
        out[row["line_id"]] = (min(low, float(pitch)), max(high, float(pitch)))
    return out


def _image_sizes(dataset: Any) -> dict[str, tuple[int, int]]:
    """The largest (height, width) of each line's images, from the manifest."""
    out: dict[str, tuple[int, int]] = {}
    for row in _rows(dataset):
        height, width = row.get("image_height"), row.get("image_width")
        if height is None or width is None:
            continue
        old = out.get(row["line_id"], (0, 0))
        out[row["line_id"]] = (max(old[0], int(height)), max(old[1], int(width)))
    return out


def inspection_setup(config: TrainConfig, train_set: Any, dataset_rejects: Iterable[int] | None):
    """Decide the run's inspection settings (see the module docstring)."""
    class_task = task_of_kind("classes", config.model.tasks)
    tiling = config.data.tiling
    contract = (
        InputContract(resize_policy="tile", tile_overlap_px=tiling.overlap_px)
        if tiling is not None
        else InputContract()
    )
    pitches = pitch_by_line(train_set)
    trained = None
    if pitches:
        trained = (min(p[0] for p in pitches.values()), max(p[1] for p in pitches.values()))
    if class_task is None:
        return InspectionSetup(None, (), None, contract, trained)
    chosen = config.inspection.reject_classes
    source = "inspection.reject_classes"
    if chosen is None and dataset_rejects is not None:
        chosen, source = tuple(dataset_rejects), "the dataset's reject_classes"
    if chosen is None:
        chosen, source = load_inspection_config().reject_classes, "configs/inspection.yaml"
    score = ScoreDefinition(tuple(int(c) for c in chosen), config.inspection.score_window_px)
    log.info("reject classes %s (from %s)", list(score.reject_classes), source)
    return InspectionSetup(class_task, score.reject_classes, score, contract, trained)


def check_resolution(
    config: TrainConfig, train_set: Any, contract: InputContract, lines: Any | None
) -> None:
    """Refuse (ConfigError naming the line) a line whose smallest defect spans < 3 px at the
    pitch the model sees; lines unknown to ``lines`` or without a stated width are skipped."""
    if lines is None:
        return
    known = {line.id: line for line in lines.lines}
    sizes = _image_sizes(train_set)
    for line_id, (_, coarsest) in sorted(pitch_by_line(train_set).items()):
        line = known.get(line_id)
        if line is None:
            continue
        seen = pitch_seen(
            coarsest,
            sizes.get(line_id, config.model.input_size),
            config.model.input_size,
            contract.resize_policy,
        )
        check_defect_resolution(
            line_id, line.min_defect_width_mm, seen, "cta train", str(lines.source)
        )


def defect_census(dataset: Any, class_task: str, reject_classes: Iterable[int]) -> DefectCensus:
    """Count reject-class pixels in the class labels of ``dataset`` (reads every sample)."""
    rejects = np.asarray(list(reject_classes))
    images = defect_pixels = labelled = 0
    defective: list[int] = []
    for index in range(len(dataset)):
        sample = dataset[index]
        if class_task not in sample or not sample.get("present", {}).get(class_task, True):
            continue
        label = np.asarray(sample[class_task])
        hits = int(np.isin(label, rejects).sum())
        images += 1
        if hits:
            defective.append(index)
        defect_pixels += hits
        labelled += int((label >= 0).sum())
    return DefectCensus(images, len(defective), defect_pixels, labelled, tuple(defective))


def warn_if_defect_free(census: DefectCensus, anomalies_on: bool, split: str) -> str | None:
    """The warning to shout when the training split has no defect to learn from (None: fine)."""
    if census.defect_pixels or anomalies_on:
        return None
    return (
        f"WARNING: the {split} split has no reject-class pixel ({census.describe()}) and "
        "data.anomalies is off: the model can only learn that every part is good. Turn on "
        "synthetic anomalies (data.anomalies) or add labelled defects."
    )


def require_class_task_for_anomalies(config: TrainConfig, class_task: str | None) -> None:
    if config.data.anomalies is not None and class_task is None:
        raise ConfigError(
            "data.anomalies: pasted anomalies are labelled in the segmentation task; "
            f"model.tasks {list(config.model.tasks)} has none"
        )
