"""Defect-detection figures as MVTec AD and anomalib report them (DESIGN 5.2).

Scores are continuous defect scores (higher = more likely a defect); a decision rejects what
scores ``>= t``. Every figure is computed from one sort of the scores and cumulative counts at
each *distinct* score, so tied scores form one curve point (the point after all of them):

* :func:`roc_auc` - area under the ROC curve, as scikit-learn's ``roc_auc_score`` defines it
  (``roc_curve`` points at distinct thresholds, starting at (0, 0), trapezoid rule).
* :func:`average_precision` - scikit-learn's ``average_precision_score``:
  AP = sum_n (R_n - R_{n-1}) P_n over distinct thresholds, R_0 = 0 (a step sum, not the
  interpolated or trapezoidal area).
* :func:`f1_max` - the best F1 over thresholds at distinct scores: an ORACLE figure, its
  threshold is picked on the very data it scores.
* :func:`recall_at_frr` - the largest recall whose false-reject rate is <= a bound.
* :class:`PixelDetectionAccumulator` - pixel AUROC and AUPRO (area under the per-region overlap
  curve to a false-positive rate of 0.3, Bergmann et al., "The MVTec Anomaly Detection
  Dataset", IJCV 2021), pooled and per defect class, fed one image at a time.
* :func:`per_class_image_figures` and :func:`resampled_roc_auc` - image figures per defect
  class and paired bootstrap replicates of image AUROC.

Figures are plain Python floats, or None where undefined (a class missing). Pure numpy and
scipy: no MLOps package.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cta_model.errors import CtaError

__all__ = [
    "PixelDetectionAccumulator",
    "PixelLimitExceeded",
    "average_precision",
    "f1_max",
    "per_class_image_figures",
    "recall_at_frr",
    "resampled_roc_auc",
    "roc_auc",
]

# 8-connectivity: pixels touching at a corner belong to the same defect region (MVTec AD).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class PixelLimitExceeded(CtaError, RuntimeError):
    """A pixel-level accumulator would keep more pixels than its ``max_pixels`` allows."""


# --- validation ------------------------------------------------------------------------------


def _binary_labels(name: str, values: object) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == bool:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must be bool or 0/1, got dtype {array.dtype}")
    if array.size and not np.isin(array, (0, 1)).all():
        bad = array[~np.isin(array, (0, 1))][0]
        raise ValueError(f"{name} must be bool or 0/1, found the value {bad!r}")
    return array.astype(bool)


def _finite_scores(name: str, values: object) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be real numbers: {exc}") from exc
    if not np.isfinite(array).all():
        where = np.flatnonzero(~np.isfinite(array.ravel()))
        raise ValueError(
            f"{name} must be finite; {where.size} value(s) are NaN or infinite "
            f"(first at flat index {int(where[0])})"
        )
    return array


def _labels_and_scores(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray]:
    y = _binary_labels("labels", labels)
    s = _finite_scores("scores", scores)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(
            f"labels and scores must be 1-D of the same length, got shapes {y.shape} and {s.shape}"
        )
    return y, s


# --- curves ----------------------------------------------------------------------------------


def _distinct_score_counts(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, false positives, threshold) of ``score >= t`` at each distinct score
    ``t``, from the highest score down; ties are one point."""
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    group_ends = np.append(np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), scores.size - 1)
    true_positives = np.cumsum(labels[order], dtype=np.int64)[group_ends]
    false_positives = group_ends + 1 - true_positives
    return true_positives, false_positives, sorted_scores[group_ends]


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the curve (x, y) from x[0] to ``x_max``, the curve interpolated
    linearly at ``x_max``. ``x`` is non-decreasing and reaches at least ``x_max``."""
    n_inside = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    area = _trapezoid(x[:n_inside], y[:n_inside])
    x0, y0 = x[n_inside - 1], y[n_inside - 1]
    if x0 < x_max:  # the next point lies beyond x_max: cut its segment there
        x1, y1 = x[n_inside], y[n_inside]
        y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += float((x_max - x0) * (y0 + y_cut) / 2.0)
    return area


def _roc_area(true_positives: np.ndarray, false_positives: np.ndarray) -> float:
    """Area under the ROC curve through (0, 0) and the cumulative counts (last = totals)."""
    tpr = np.concatenate(([0.0], true_positives / true_positives[-1]))
    fpr = np.concatenate(([0.0], false_positives / false_positives[-1]))
    return _trapezoid(fpr, tpr)


# --- image-level figures ---------------------------------------------------------------------


def roc_auc(
    labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> float | None:
    """Area under the ROC curve of ``score >= t`` (image or pixel level); None unless both
    classes are present.

    scikit-learn's definition (``roc_auc_score`` over ``roc_curve``): one curve point
    (FPR, TPR) per distinct score, ties as one point, the curve starting at (0, 0), area by the
    trapezoid rule. A tie between a positive and a negative therefore counts one half, as in
    the Mann-Whitney U statistic.
    """
    y, s = _labels_and_scores(labels, scores)
    return _checked_roc_auc(y, s)


def _checked_roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    if labels.all() or not labels.any():
        return None
    true_positives, false_positives, _ = _distinct_score_counts(labels, scores)
    return _roc_area(true_positives, false_positives)


def average_precision(
    labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> float | None:
    """Average precision as scikit-learn's ``average_precision_score`` defines it; None
    without a positive.

    AP = sum_n (R_n - R_{n-1}) P_n over the distinct scores t_n from the highest down, where
    P_n and R_n are the precision and recall of ``score >= t_n`` and R_0 = 0: a step sum over
    the precision-recall curve, neither interpolated nor trapezoidal. With no negative it is 1.
    """
    y, s = _labels_and_scores(labels, scores)
    if not y.any():
        return None
    true_positives, false_positives, _ = _distinct_score_counts(y, s)
    recall = true_positives / true_positives[-1]
    precision = true_positives / (true_positives + false_positives)
    recall_steps = np.diff(recall, prepend=0.0)
    return float(np.sum(recall_steps * precision))


def f1_max(
    labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[float, float] | None:
    """(best F1, its threshold) over the decisions ``score >= t`` at each distinct score ``t``;
    None without a positive.

    F1 = 2 TP / (2 TP + FP + FN), the harmonic mean of precision and recall. Among thresholds
    with the same best F1 the highest one (fewest rejects) is returned.

    This is an ORACLE figure: the threshold is picked on the scored data itself, so the F1 is
    optimistic for that data. Report it as such; an operating threshold is chosen on ``val``.
    """
    y, s = _labels_and_scores(labels, scores)
    if not y.any():
        return None
    true_positives, false_positives, thresholds = _distinct_score_counts(y, s)
    n_positive = true_positives[-1]
    f1 = 2.0 * true_positives / (true_positives + false_positives + n_positive)
    best = int(np.argmax(f1))  # first maximum = highest threshold
    return float(f1[best]), float(thresholds[best])


def recall_at_frr(
    labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray, max_frr: float
) -> tuple[float, float] | None:
    """(recall, threshold) of the decision ``score >= threshold`` with the largest recall whose
    false-reject rate (false-positive rate over the negatives) is <= ``max_frr``; None unless
    both classes are present.

    Thresholds are the distinct scores; among those reaching the same recall the highest one
    (fewest false rejects) is returned. When no threshold within ``max_frr`` catches a
    positive (e.g. a good part has the highest score and ``max_frr`` is 0), the recall is 0 and
    the threshold the next float above the highest score: reject nothing. Like :func:`f1_max`
    this picks its threshold on the scored data.
    """
    if not 0.0 <= max_frr <= 1.0:
        raise ValueError(f"max_frr must lie in [0, 1], got {max_frr}")
    y, s = _labels_and_scores(labels, scores)
    if y.all() or not y.any():
        return None
    true_positives, false_positives, thresholds = _distinct_score_counts(y, s)
    allowed = false_positives / false_positives[-1] <= max_frr
    best_true_positives = true_positives[allowed].max(initial=0)
    if best_true_positives == 0:
        return 0.0, float(np.nextafter(thresholds[0], np.inf))
    # Recall never falls as the threshold drops; take the first point reaching the best recall.
    best = int(np.flatnonzero(allowed & (true_positives == best_true_positives))[0])
    return float(true_positives[best] / true_positives[-1]), float(thresholds[best])


def per_class_image_figures(
    image_scores: Sequence[float] | np.ndarray,
    image_classes: Sequence[Iterable[int]],
    reject_classes: Iterable[int],
) -> dict[int, dict[str, float | int | None]]:
    """Image AUROC and AP per defect class: ``{class_id: {"auroc", "ap", "n_positive"}}``.

    For class c: positives are the images containing c (``c in image_classes[i]``), negatives
    the images containing no reject class at all; images with only other defect classes are
    left out, so each figure answers "does the score tell class c from good parts". A class
    without a positive image has None figures; without a good image its AUROC is None.
    """
    scores = _finite_scores("image_scores", image_scores)
    if scores.ndim != 1 or len(image_classes) != scores.size:
        raise ValueError(
            f"image_scores must be 1-D with one score per entry of image_classes, got shape "
            f"{scores.shape} and {len(image_classes)} entries"
        )
    reject = [int(c) for c in dict.fromkeys(reject_classes)]
    present = [set(int(c) for c in classes) for classes in image_classes]
    good = np.array([not (classes & set(reject)) for classes in present], dtype=bool)
    figures: dict[int, dict[str, float | int | None]] = {}
    for class_id in reject:
        positive = np.array([class_id in classes for classes in present], dtype=bool)
        keep = positive | good
        figures[class_id] = {
            "auroc": roc_auc(positive[keep], scores[keep]),
            "ap": average_precision(positive[keep], scores[keep]),
            "n_positive": int(positive.sum()),
        }
    return figures


def resampled_roc_auc(
    labels: Sequence[bool] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    indices: np.ndarray,
) -> np.ndarray:
    """Image AUROC of each resample (row of ``indices``), float64 (n_replicates,); NaN where a
    resample lacks a class.

    ``indices`` is an (n_replicates, n_images) matrix, e.g. from
    :func:`cta_model.inspection.bootstrap_indices`; passing the same matrix for two models (or
    to :func:`cta_model.inspection.resampled_recall_and_frr`) pairs their replicates.
    """
    y, s = _labels_and_scores(labels, scores)
    rows = np.asarray(indices)
    if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"indices must be a 2-D integer matrix, got {rows.dtype} {rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= y.size):
        raise ValueError(f"indices must lie in [0, {y.size}), got [{rows.min()}, {rows.max()}]")
    replicates = np.full(rows.shape[0], np.nan)
    for k, row in enumerate(rows):
        value = _checked_roc_auc(y[row], s[row])
        if value is not None:
            replicates[k] = value
    return replicates


# --- pixel-level figures ---------------------------------------------------------------------


def _pixel_mask(name: str, values: object, shape: tuple[int, ...]) -> np.ndarray:
    mask = _binary_labels(name, values)
    if mask.shape != shape:
        raise ValueError(f"{name} must have the shape of score_map {shape}, got {mask.shape}")
    return mask


def _region_sizes(mask: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, int]:
    """Per ``kept`` pixel (row-major order) the number of kept pixels in its 8-connected
    region of ``mask`` (meaningless for kept pixels outside ``mask``), and how many regions
    have a kept pixel."""
    region_ids, n_regions = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    ids = region_ids[kept]
    sizes = np.bincount(ids, minlength=n_regions + 1)
    return sizes[ids], int(np.count_nonzero(sizes[1:]))


class PixelDetectionAccumulator:
    """Pixel AUROC and AUPRO over a split, pooled and per defect class, fed image by image.

    Call :meth:`add` once per image with its score map, defect mask and optionally a validity
    mask and a class map; then read :meth:`pixel_auroc`, :meth:`aupro` and :meth:`per_class`.

    Pixels: only valid pixels count. Positives are the defect pixels, negatives the defect-free
    pixels of every image, good images included. Per class c, positives are the defect pixels
    of class c and negatives the same defect-free pixels; defect pixels of other classes are
    left out.

    AUPRO (Bergmann et al., IJCV 2021, Sec. 4): the defect regions are the 8-connected
    components of each image's defect mask (per class: of that class's part of the mask),
    labelled on the whole mask and counting the region's valid pixels; a region without a
    valid pixel is dropped. For a threshold t, FPR(t) is the fraction of all negatives with
    score >= t and PRO(t) the mean over all R regions of the split of the fraction of the
    region's pixels with score >= t; each region weighs the same whatever its size. The curve
    has one point per distinct score (ties are one point, the one after all tied pixels),
    starts at (0, 0) and ends at (1, 1). AUPRO is the trapezoid area under PRO(FPR) from 0 to
    ``max_fpr`` (the curve interpolated linearly at ``max_fpr``), divided by ``max_fpr`` so a
    perfect detector scores 1. Computed with one sort of all pixels and cumulative sums (each
    defect pixel adds 1 / (R * |its region|) to PRO), O(P log P) for P pixels.

    Memory: scores are stored as float32 (scores closer than float32 resolution tie): 4 bytes
    per valid pixel plus 28 per defect pixel. Computing a figure takes up to about 60 bytes
    per pixel for a moment (the sort and the curve) and keeps 8 bytes per distinct score for
    the next figure, until the next :meth:`add`. ``max_pixels`` caps the pixels kept:
    :meth:`add` raises :class:`PixelLimitExceeded` instead of exhausting memory.
    ``n_images`` and ``n_pixels`` count the images and valid pixels added.
    """

    def __init__(self, max_pixels: int | None = None) -> None:
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1 or None, got {max_pixels}")
        self.max_pixels = max_pixels
        self.n_images = 0
        self.n_pixels = 0
        self._negative_scores: list[np.ndarray] = []
        self._defect_scores: list[np.ndarray] = []
        self._defect_region_sizes: list[np.ndarray] = []
        self._defect_classes: list[np.ndarray] = []
        self._defect_class_region_sizes: list[np.ndarray] = []
        self._n_regions = 0
        self._class_regions: dict[int, int] = {}
        self._images_without_class_map = 0
        self._sorted: _SortedPixels | None = None

    def add(
        self,
        score_map: np.ndarray,
        defect_mask: np.ndarray,
        valid: np.ndarray | None = None,
        class_map: np.ndarray | None = None,
    ) -> None:
        """Add one image: ``score_map`` (H, W) float defect scores (finite where valid),
        ``defect_mask`` (H, W) bool, ``valid`` (H, W) bool (None: every pixel) and
        ``class_map`` (H, W) int defect class ids >= 0 at defect pixels (None: no per-class
        figures, unless the image has no defect pixel)."""
        scores = np.asarray(score_map)
        if scores.ndim != 2:
            raise ValueError(f"score_map must be 2-D (H, W), got shape {scores.shape}")
        if not np.issubdtype(scores.dtype, np.number) or np.iscomplexobj(scores):
            raise ValueError(f"score_map must be real numbers, got dtype {scores.dtype}")
        shape = scores.shape
        defect = _pixel_mask("defect_mask", defect_mask, shape)
        kept = np.ones(shape, dtype=bool) if valid is None else _pixel_mask("valid", valid, shape)
        kept_scores = scores[kept].astype(np.float32)
        if not np.isfinite(kept_scores).all():
            raise ValueError(
                f"score_map of image #{self.n_images} has NaN or infinite scores at "
                f"{int((~np.isfinite(kept_scores)).sum())} valid pixel(s) (after float32)"
            )
        n_new = kept_scores.size
        if self.max_pixels is not None and self.n_pixels + n_new > self.max_pixels:
            raise PixelLimitExceeded(
                f"pixel AUROC / AUPRO: image #{self.n_images} would bring the pixels kept to "
                f"{self.n_pixels + n_new}, over max_pixels={self.max_pixels} (float32 scores "
                f"of every valid pixel are kept); score fewer or smaller images, or raise it"
            )

        defect_kept = defect & kept
        classes = None
        if class_map is not None:
            class_ids = np.asarray(class_map)
            if class_ids.shape != shape or not np.issubdtype(class_ids.dtype, np.integer):
                raise ValueError(
                    f"class_map must be integer with the shape of score_map {shape}, got "
                    f"{class_ids.dtype} {class_ids.shape}"
                )
            classes = class_ids[defect_kept].astype(np.int64)
            if classes.size and classes.min() < 0:
                raise ValueError(
                    f"class_map has negative class ids at defect pixels: {classes.min()}"
                )

        region_sizes, n_regions = _region_sizes(defect, defect_kept)
        class_region_sizes = np.zeros_like(region_sizes)
        class_regions: dict[int, int] = {}
        if classes is not None:
            for class_id in np.unique(classes):
                of_class = classes == class_id
                sizes, n = _region_sizes(defect & (class_ids == class_id), defect_kept)
                class_region_sizes[of_class] = sizes[of_class]
                class_regions[int(class_id)] = n
        elif defect_kept.any():
            self._images_without_class_map += 1
            classes = np.full(region_sizes.size, -1, dtype=np.int64)
        else:
            classes = np.empty(0, dtype=np.int64)

        defect_of_kept = defect[kept]
        self._negative_scores.append(kept_scores[~defect_of_kept])
        self._defect_scores.append(kept_scores[defect_of_kept])
        self._defect_region_sizes.append(region_sizes)
        self._defect_classes.append(classes)
        self._defect_class_region_sizes.append(class_region_sizes)
        self._n_regions += n_regions
        for class_id, n in class_regions.items():
            self._class_regions[class_id] = self._class_regions.get(class_id, 0) + n
        self.n_images += 1
        self.n_pixels += n_new
        self._sorted = None

    # -- figures --

    def pixel_auroc(self) -> float | None:
        """ROC AUC over every valid pixel (defect vs defect-free); None without both."""
        curve = self._counts(class_id=None)
        return None if curve is None else _roc_area(curve[1], curve[0])

    def pooled_figures(self, max_fpr: float = 0.3) -> dict[str, float | None]:
        """``{"pixel_auroc", "aupro"}`` pooled over every defect class, from one pass over the
        sorted pixels (what `pixel_auroc` and `aupro` give one at a time)."""
        curve = self._counts(class_id=None)
        return {
            "pixel_auroc": None if curve is None else _roc_area(curve[1], curve[0]),
            "aupro": self._aupro(None, max_fpr, curve),
        }

    def aupro(self, max_fpr: float = 0.3) -> float | None:
        """Normalised area under the PRO curve to FPR ``max_fpr`` (class docstring); None
        without a defect region or a defect-free pixel."""
        return self._aupro(None, max_fpr, self._counts(None))

    def pro_curve(self, class_id: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """The PRO curve (FPR, PRO) as float64 arrays from (0, 0) to (1, 1), one point per
        distinct score (plus repeats where only pixels left out of this figure change);
        pooled, or of one defect class."""
        return self._pro_from_counts(self._counts(class_id), class_id)

    def per_class(self, max_fpr: float = 0.3) -> dict[int, dict[str, float | int | None]]:
        """``{class_id: {"pixel_auroc", "aupro", "n_regions"}}`` for every defect class seen.

        Needs a ``class_map`` for every image with defect pixels.
        """
        if self._images_without_class_map:
            raise ValueError(
                f"per-class pixel figures need a class_map for every image with defect "
                f"pixels; {self._images_without_class_map} image(s) were added without one"
            )
        figures: dict[int, dict[str, float | int | None]] = {}
        for class_id in sorted(self._class_regions):
            curve = self._counts(class_id)  # once per class: both figures read it
            auroc = None if curve is None else _roc_area(curve[1], curve[0])
            figures[class_id] = {
                "pixel_auroc": auroc,
                "aupro": self._aupro(class_id, max_fpr, curve),
                "n_regions": self._class_regions[class_id],
            }
        return figures

    # -- internals --

    def _pro_from_counts(
        self, counts: tuple[np.ndarray, np.ndarray, np.ndarray] | None, class_id: int | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        if counts is None:
            return None
        false_positives, _, region_share = counts
        n_regions = self._n_regions if class_id is None else self._class_regions[class_id]
        fpr = np.concatenate(([0.0], false_positives / false_positives[-1]))
        pro = np.concatenate(([0.0], region_share / n_regions))
        return fpr, pro

    def _aupro(
        self,
        class_id: int | None,
        max_fpr: float,
        counts: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    ) -> float | None:
        """From ``counts`` = ``_counts(class_id)``, which the caller may have for another
        figure already (computing it is most of the cost)."""
        if not 0.0 < max_fpr <= 1.0:
            raise ValueError(f"max_fpr must lie in (0, 1], got {max_fpr}")
        curve = self._pro_from_counts(counts, class_id)
        if curve is None:
            return None
        fpr, pro = curve
        return _area_up_to(fpr, pro, max_fpr) / max_fpr

    def _counts(self, class_id: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(false positives, true positives, summed 1/|region| of the true positives) of
        ``score >= t`` at each distinct score from the highest down; None without a positive
        or a negative pixel."""
        pixels = self._sorted_pixels()
        if pixels.n_negative == 0:
            return None
        if class_id is None:
            chosen = np.ones(pixels.defect_rank.size, dtype=bool)
            region_sizes = pixels.region_sizes
        else:
            chosen = pixels.classes == class_id
            region_sizes = pixels.class_region_sizes
        if not chosen.any():
            return None
        ranks = pixels.defect_rank[chosen]
        # Pixels of rank <= a group's last rank score >= that group's score.
        true_positives = np.searchsorted(ranks, pixels.group_ends, side="right")
        any_defect = np.searchsorted(pixels.defect_rank, pixels.group_ends, side="right")
        false_positives = pixels.group_ends + 1 - any_defect
        shares = np.concatenate(([0.0], np.cumsum(1.0 / region_sizes[chosen])))
        return false_positives, true_positives, shares[true_positives]

    def _sorted_pixels(self) -> _SortedPixels:
        if self._sorted is None:
            self._sorted = _SortedPixels.sort(
                np.concatenate([np.empty(0, np.float32), *self._negative_scores]),
                np.concatenate([np.empty(0, np.float32), *self._defect_scores]),
                np.concatenate([np.empty(0, np.int64), *self._defect_region_sizes]),
                np.concatenate([np.empty(0, np.int64), *self._defect_classes]),
                np.concatenate([np.empty(0, np.int64), *self._defect_class_region_sizes]),
            )
        return self._sorted


@dataclass(frozen=True)
class _SortedPixels:
    """Every kept pixel sorted by score from the highest down, held compactly: the rank of the
    last pixel of each distinct score, and the ranks (ascending) and attributes of the defect
    pixels (-1 as class: added without a class map)."""

    n_negative: int
    group_ends: np.ndarray
    defect_rank: np.ndarray
    region_sizes: np.ndarray
    classes: np.ndarray
    class_region_sizes: np.ndarray

    @classmethod
    def sort(
        cls,
        negative_scores: np.ndarray,
        defect_scores: np.ndarray,
        region_sizes: np.ndarray,
        classes: np.ndarray,
        class_region_sizes: np.ndarray,
    ) -> _SortedPixels:
        n_negative = negative_scores.size
        scores = np.concatenate([negative_scores, defect_scores])
        order = np.argsort(scores, kind="stable")[::-1]
        sorted_scores = scores[order]
        del scores
        group_ends = np.append(
            np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), sorted_scores.size - 1
        )
        del sorted_scores
        defect_rank = np.flatnonzero(order >= n_negative)
        defect_index = order[defect_rank] - n_negative
        return cls(
            n_negative,
            group_ends,
            defect_rank,
            region_sizes[defect_index],
            classes[defect_index],
            class_region_sizes[defect_index],
        )
