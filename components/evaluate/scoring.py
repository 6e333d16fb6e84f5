"""One pass of a Predictor over the images of one split, per line: what every figure needs.

``score_split`` runs ``Predictor.inspect`` once per batch (the task outputs and the model's own
defect map and score, ``cta_model.inspection``) and feeds, per line and over all lines:

- the task registry's pooled meters (``metrics``);
- per image: the defect score, whether the TARGET shows a defect (>= 1 pixel of a reject
  class; only for images with a label of the ``classes`` task), which reject classes it shows,
  its part id (manifest ``part_id``, else None) and each task's primary metric on that image
  alone (for paired bootstraps);
- with ``deep``: pixel AUROC and AUPRO of the defect maps (``PixelDetectionAccumulator``: valid
  = the labelled pixels of images with a class label, class map = the target class ids; at most
  ``max_pixels`` pixels kept per group, else the figures are null with a reason), meters
  restricted to pixels within ``boundary_px`` of a label boundary (a pixel whose (2k+1)^2
  neighbourhood in the target class ids holds more than one value), a meter of the
  ``surface_height`` task on sensor drop-out pixels (label invalid where its clean companion,
  ``height_clean``, is known; scored against the companion), and dimension errors of
  ``features.parquet`` (see ``dimension_errors``).

Which task plays which part is the registry's ``TaskSpec.kind``; no task is named here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("cta.evaluate")


def json_number(value: float) -> float | None:
    """A finite float, or None (JSON has no NaN: a metric with nothing valid to score)."""
    value = float(value)
    return value if math.isfinite(value) else None


def meter_inputs(
    task: str, prediction: Any, samples: list[Mapping[str, Any]], num_classes: int | None
) -> tuple[Any, Any, Any]:
    """(pred, target, present) tensors in the layouts the task's meter expects, from the
    Predictor's decoded batch and the samples' labels (``TaskSpec.meter_prediction`` /
    ``label_batch``)."""
    import torch

    from cta_model.tasks import get_task

    spec = get_task(task)
    present = torch.tensor([bool(s["present"][task]) for s in samples], dtype=torch.bool)
    pred = spec.meter_prediction(prediction, num_classes)
    target = spec.label_batch([s[task] for s in samples])
    return pred, target, present


def metrics_of(meters: Mapping[str, Any]) -> dict[str, float | None]:
    """Flat "<task>.<metric>" -> value (None when not scorable) of a dict of meters."""
    from cta_model.tasks import flatten_metrics

    flat = flatten_metrics({task: meter.compute() for task, meter in meters.items()})
    return {key: json_number(value) for key, value in flat.items()}


@dataclass
class LineScores:
    """Everything scored on one line's images (or on all lines, for ``overall``)."""

    sample_ids: list[str] = field(default_factory=list)
    part_ids: list[str | None] = field(default_factory=list)  # None: the image is its own part
    metrics: dict[str, float | None] = field(default_factory=dict)
    score: list[float] = field(default_factory=list)  # defect score; NaN: the model has none
    defective: list[bool] = field(default_factory=list)  # target has a reject-class pixel
    labelled: list[bool] = field(default_factory=list)  # target semseg present
    defect_classes: list[tuple[int, ...]] = field(default_factory=list)  # reject ids in target
    per_image: dict[str, list[float]] = field(default_factory=dict)  # task -> primary metric
    boundary: dict[str, float | None] = field(default_factory=dict)
    dropout: dict[str, float | None] = field(default_factory=dict)
    # (measured - actual mm, measured in-tolerance verdict == true verdict) per feature
    dimensions: list[tuple[float, bool]] = field(default_factory=list)
    # Pixel AUROC / AUPRO (deep only): see ``PixelFigures.figures``
    pixel: dict[str, Any] | None = None

    @property
    def n_images(self) -> int:
        return len(self.sample_ids)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(defect score float64, defective bool, good bool) per image; unlabelled: neither."""
        labelled = np.asarray(self.labelled, dtype=bool)
        defective = np.asarray(self.defective, dtype=bool) & labelled
        score = np.asarray(self.score, dtype=np.float64)
        return score, defective, labelled & ~defective


class PixelFigures:
    """Pixel AUROC and AUPRO of one group of images, fed image by image; the accumulator is
    dropped (and the figures null with a reason) once it would keep more than ``max_pixels``
    pixels, so one huge split cannot exhaust memory."""

    def __init__(self, max_pixels: int, max_fpr: float) -> None:
        from cta_model.detection_metrics import PixelDetectionAccumulator

        self.max_fpr = max_fpr
        self.accumulator: Any = PixelDetectionAccumulator(max_pixels)
        self.reason: str | None = None

    def add(self, defect_map: np.ndarray, target: np.ndarray, reject: np.ndarray) -> None:
        """One labelled image: its (H, W) defect map and target class ids (-1 invalid)."""
        from cta_model.detection_metrics import PixelLimitExceeded

        if self.accumulator is None:
            return
        try:
            self.accumulator.add(
                defect_map, np.isin(target, reject), valid=target >= 0, class_map=target
            )
        except PixelLimitExceeded as exc:
            self.accumulator = None
            self.reason = str(exc)

    def figures(self) -> dict[str, Any]:
        """{pixel_auroc, aupro, per_class: {class_id: {pixel_auroc, aupro, n_regions}},
        reason}; figures None where undefined or over the pixel limit."""
        accumulator = self.accumulator
        if accumulator is None:
            return {
                "pixel_auroc": None,
                "aupro": None,
                "per_class": {},
                "reason": self.reason,
            }
        return {
            **accumulator.pooled_figures(self.max_fpr),
            "per_class": accumulator.per_class(self.max_fpr),
            "reason": None,
        }


def boundary_mask(semseg: Any, boundary_px: int) -> Any:
    """(B, H, W) bool: pixels whose (2k+1)^2 neighbourhood holds more than one label value."""
    import torch.nn.functional as F

    labels = semseg.float().unsqueeze(1)
    size = 2 * boundary_px + 1
    high = F.max_pool2d(labels, size, stride=1, padding=boundary_px)
    low = -F.max_pool2d(-labels, size, stride=1, padding=boundary_px)
    return (high != low).squeeze(1) & (semseg >= 0)


def _box_mean(array: np.ndarray, row: Mapping[str, Any]) -> float:
    region = array[row["y0"] : row["y1"], row["x0"] : row["x1"]]
    finite = region[np.isfinite(region)]
    return float(finite.mean()) if finite.size else float("nan")


def dimension_errors(
    predicted_height: np.ndarray,
    reference_height: np.ndarray,
    features: Iterable[Mapping[str, Any]],
) -> list[tuple[float, bool]]:
    """Per feature: (measured - actual mm, measured verdict == true verdict).

    The gauge is deliberately simple: the mean height over the feature's box. The dimension
    is measured as ``actual_mm + gauge(predicted) - gauge(reference)`` with the reference the
    clean height (``height_clean``, else the label where the sensor saw it): the error is what
    the predicted height moves the gauge by, so the gauge's own bias cancels. The verdict is
    ``|measured - nominal| <= tolerance``; features without any reference pixel are skipped.
    """
    errors = []
    for row in features:
        reference = _box_mean(reference_height, row)
        if not np.isfinite(reference):
            continue
        error = _box_mean(predicted_height, row) - reference
        measured = row["actual_mm"] + error
        verdict = abs(measured - row["nominal_mm"]) <= row["tolerance_mm"]
        errors.append((error, bool(verdict) == bool(row["in_tolerance"])))
    return errors


def _batches(dataset: Any, indices: list[int], batch_size: int) -> Iterator[list[dict]]:
    """Samples of ``indices`` (with their manifest ``part_id``) in batches of at most
    ``batch_size`` images of one size."""
    from cta_model.data.line_dataset import PART_ID

    batch: list[dict[str, Any]] = []
    for index in indices:
        sample = dataset[index]
        sample["part_id"] = dataset.rows[index].get(PART_ID)
        if batch and (len(batch) >= batch_size or sample["image"].shape != batch[0]["image"].shape):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


def read_features(dataset: Any) -> dict[str, list[dict[str, Any]]]:
    """features.parquet rows of the dataset's samples by sample_id; {} only when the dataset has
    no such file: an unreadable or malformed one is a DataError naming it (scoring "no
    features" there would silently drop the dimension figures)."""
    table = dataset.read_features(missing_ok=True)
    if table is None:
        return {}
    rows = table.to_pylist()
    by_sample: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_sample.setdefault(row["sample_id"], []).append(row)
    return by_sample


@dataclass(frozen=True)
class _Roles:
    """The registered tasks the inspection figures read (``TaskSpec.kind``): the class ids of
    the defect verdict and the boundary bands, the surface height (mm, NaN invalid) of the
    drop-out and dimension figures, and that task's clean companion."""

    classes: str | None
    height: str | None
    height_clean: str | None

    @classmethod
    def of_registry(cls) -> _Roles:
        from cta_model.tasks import get_task, task_of_kind

        height = task_of_kind("surface_height")
        line_file = get_task(height).line_file if height else None
        clean = line_file.clean if line_file else None
        return cls(task_of_kind("classes"), height, clean)


class _Accumulator:
    """Meters and per-image lists of one group of images (a line, or all lines)."""

    def __init__(
        self,
        tasks: tuple[str, ...],
        num_classes: int | None,
        miou_rule: str,
        roles: _Roles,
        pixels: PixelFigures | None = None,
    ) -> None:
        from cta_model.tasks import get_task, make_meters

        def new() -> dict[str, Any]:
            return make_meters(tasks, num_classes=num_classes, miou_rule=miou_rule)

        self.meters, self.boundary = new(), new()
        self.height = roles.height
        self.dropout = get_task(roles.height).make_meter() if roles.height else None
        self.pixels = pixels
        self.scores = LineScores(per_image={task: [] for task in tasks})

    def finish(self, deep: bool, has_height: bool) -> LineScores:
        from cta_model.tasks import metric_key

        self.scores.metrics = metrics_of(self.meters)
        if self.pixels is not None:
            self.scores.pixel = self.pixels.figures()
            self.pixels = None  # the pixels kept can be large: free them now
        if deep:
            self.scores.boundary = metrics_of(self.boundary)
            if self.dropout is not None:
                primary = self.dropout.primary_metric
                value = self.dropout.compute()[primary] if has_height else float("nan")
                self.scores.dropout = {metric_key(self.height, primary): json_number(value)}
        return self.scores


def _per_image_primary(
    task: str, pred: Any, target: Any, present: Any, num_classes: int | None, miou_rule: str
) -> list[float]:
    from cta_model.tasks import get_task

    spec = get_task(task)
    values = []
    for i in range(pred.shape[0]):
        meter = spec.make_meter(num_classes=num_classes, miou_rule=miou_rule)
        meter.update(pred[i : i + 1], target[i : i + 1], present[i : i + 1])
        values.append(float(meter.compute()[spec.primary_metric.name]))
    return values


def score_split(
    predictor: Any,
    dataset: Any,
    by_line: Mapping[str, list[int]],
    *,
    batch_size: int,
    reject_classes: tuple[int, ...],
    miou_rule: str = "nanmean_union",
    deep: bool = True,
    boundary_px: int = 2,
    features: Mapping[str, list[dict[str, Any]]] | None = None,
    progress: str | None = None,
    max_pixels: int | None = None,
    aupro_max_fpr: float = 0.3,
) -> tuple[dict[str, LineScores], LineScores]:
    """Score ``predictor`` on the samples ``by_line`` of ``dataset``: (per line, overall).

    ``reject_classes`` say which TARGET pixels are defects (the candidate's, also when a
    champion is scored, so both are judged on the same truth). Without ``deep`` only the
    pooled metrics and the per-image inspection inputs are kept (what a threshold on ``val``
    needs). ``deep`` needs ``dataset`` built with ``include_clean``; with ``max_pixels`` it also
    gives the pixel figures of models that score defects (one line: ``overall`` shares them).
    """
    import torch

    from cta_model.tasks import get_task

    tasks = tuple(predictor.tasks)
    num_classes = predictor.card.spec.num_classes
    roles = _Roles.of_registry()
    has_height = roles.height in tasks
    features = features or {}
    reject = np.asarray(reject_classes, dtype=np.int64)
    with_pixels = deep and max_pixels is not None and predictor.score is not None
    shared_pixels = len(by_line) == 1

    def pixel_figures() -> PixelFigures | None:
        return PixelFigures(max_pixels, aupro_max_fpr) if with_pixels else None

    overall = _Accumulator(
        tasks, num_classes, miou_rule, roles, None if shared_pixels else pixel_figures()
    )
    per_line: dict[str, LineScores] = {}
    for line_id in sorted(by_line):
        if progress:
            log.info("%s: line %s, %d image(s)", progress, line_id, len(by_line[line_id]))
        line = _Accumulator(tasks, num_classes, miou_rule, roles, pixel_figures())
        for samples in _batches(dataset, by_line[line_id], batch_size):
            inspection = predictor.inspect([sample["image"] for sample in samples])
            predictions = inspection.outputs
            target_ids = _class_targets(samples, roles.classes)
            labelled = [bool(s["present"].get(roles.classes)) for s in samples]
            shown = [np.intersect1d(ids, reject) for ids in target_ids]
            defective = [bool(ids.size) for ids in shown]
            if inspection.defect_score is not None:
                image_scores = inspection.defect_score.astype(np.float64).tolist()
            else:
                image_scores = [math.nan] * len(samples)
            for i, has_label in enumerate(labelled):
                if has_label and inspection.defect_map is not None:
                    for group in (line, overall):
                        if group.pixels is not None:
                            group.pixels.add(inspection.defect_map[i], target_ids[i], reject)
            boundary = None
            if deep:
                target_ids = torch.from_numpy(target_ids)
                has_label = torch.tensor(labelled).view(-1, 1, 1)
                boundary = boundary_mask(target_ids, boundary_px) & has_label
            for group in (line, overall):
                scores = group.scores
                scores.sample_ids += [s["sample_id"] for s in samples]
                scores.part_ids += [s.get("part_id") for s in samples]
                scores.labelled += labelled
                scores.defective += defective
                scores.defect_classes += [tuple(int(c) for c in ids) for ids in shown]
                scores.score += image_scores
            for task in tasks:
                pred, target, present = meter_inputs(task, predictions[task], samples, num_classes)
                values = _per_image_primary(task, pred, target, present, num_classes, miou_rule)
                for group in (line, overall):
                    group.meters[task].update(pred, target, present)
                    group.scores.per_image[task] += values
                    if boundary is not None:
                        masked = get_task(task).mask_label(target, boundary)
                        group.boundary[task].update(pred, masked, present)
            if deep and has_height:
                for group in (line, overall):
                    _score_dropout_and_dimensions(predictions, samples, features, roles, group)
        per_line[line_id] = line.finish(deep, has_height)
    finished = overall.finish(deep, has_height)
    if shared_pixels and with_pixels:
        finished.pixel = next(iter(per_line.values())).pixel
    return per_line, finished


def _class_targets(samples: list[dict[str, Any]], classes: str | None) -> np.ndarray:
    """The target class ids (B, H, W) of the samples; all invalid without a classes task."""
    if classes is None:
        return np.full((len(samples), *samples[0]["image"].shape[:2]), -1, dtype=np.int64)
    return np.stack([s[classes] for s in samples])


def _score_dropout_and_dimensions(
    predictions: Mapping[str, np.ndarray],
    samples: list[dict[str, Any]],
    features: Mapping[str, list[dict[str, Any]]],
    roles: _Roles,
    group: _Accumulator,
) -> None:
    import torch

    height = roles.height
    predicted_height = predictions[height]
    for i, sample in enumerate(samples):
        clean = sample.get(roles.height_clean) if roles.height_clean else None
        if clean is None:
            continue
        if sample["present"][height]:
            dropped = np.isnan(sample[height]) & np.isfinite(clean)
            target = np.where(dropped, clean, np.nan).astype(np.float32)
            group.dropout.update(
                torch.from_numpy(np.ascontiguousarray(predicted_height[i]))[None, None],
                torch.from_numpy(target)[None, None],
            )
        reference = np.where(np.isfinite(clean), clean, sample[height])
        group.scores.dimensions += dimension_errors(
            predicted_height[i], reference, features.get(sample["sample_id"], ())
        )


__all__ = [
    "LineScores",
    "PixelFigures",
    "boundary_mask",
    "dimension_errors",
    "json_number",
    "meter_inputs",
    "metrics_of",
    "read_features",
    "score_split",
]
