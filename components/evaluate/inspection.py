"""Inspection figures, paired bootstrap replicates and the champion comparison (DESIGN 5.2, 5.3).

Scores are the model's own defect scores (``Predictor.inspect``, ``cta_model.inspection``);
a part is rejected when its score reaches the threshold. Only images with a class label count
(defective = >= 1 reject-class pixel in the target).

- Operating threshold: chosen on a line's ``val`` images with
  ``cta_model.inspection.choose_threshold`` for the config's target recall (never below its
  ``min_score``), then applied unchanged to ``test``; ``overall`` chooses one on all lines'
  ``val`` images pooled. Recall and false-reject rate at it, with bootstrap intervals.
- Threshold-free figures (``cta_model.detection_metrics``): image AUROC and AP, F1-max (an
  ORACLE figure: its threshold is picked on the scored split), pixel AUROC and AUPRO to FPR
  0.3, pooled and per reject class (classes named from the model card).
- Parts: where the images carry a manifest ``part_id``, a part's score is the max of its
  images' scores and it is defective when any of its images is; recall and FRR at the same
  threshold.
- Bootstrap: per line, B resamples with replacement of that line's test images from
  ``numpy.random.default_rng([seed, crc32(line_id)])`` (independent of the other lines, so
  adding a line changes no line's replicates). Replicate k of recall and of frr use the same
  resample; image AUROC resamples the line's labelled images the same way (the very same
  resamples when every image is labelled). ``overall`` and the champion comparison stack the
  lines' resamples (stratified over lines).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from components.evaluate.scoring import LineScores, json_number

#: Printed beside every F1-max: its threshold is not an operating point.
F1_ORACLE_NOTE = (
    "oracle figure: the threshold is picked on the scored split itself, so the F1 is "
    "optimistic; the operating threshold is the one chosen on val"
)
NO_VAL_IMAGE = "no val image of this line"


# ----------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class ThresholdOnVal:
    """The operating threshold chosen on val, with what it was chosen on."""

    choice: Any  # cta_model.inspection.ThresholdChoice
    n_defective: int
    n_good: int
    n_below_min_score: int  # defective val images scoring below min_score

    @property
    def threshold(self) -> float:
        return float(self.choice.threshold)

    def section(self) -> dict[str, Any]:
        return {
            "split": "val",
            "reached": bool(self.choice.reached),
            "recall": self.choice.recall,
            "n_defective": self.n_defective,
            "n_good": self.n_good,
            "reason": self.choice.reason,
        }

    def warnings(self, config: Any) -> list[str]:
        """Why the operating point is not the one asked for; [] when val reached it."""
        if self.choice.reached:
            return []
        fallback = f"the operating threshold falls back to min_score {config.min_score:g}"
        if self.choice.recall is None:
            if self.choice.reason == NO_VAL_IMAGE:
                what = "val has no image of this line"
            elif self.n_good == 0:
                what = "val has no image with a class label"
            else:
                what = f"val has no defective image ({self.n_good} good)"
            return [
                f"{what}: no threshold can be chosen for the target recall "
                f"{config.target_recall:g}; {fallback}"
            ]
        return [
            f"val cannot reach the target recall {config.target_recall:g}: it reaches "
            f"{self.choice.recall:.3f} at the smallest threshold considered, because "
            f"{self.n_below_min_score} of its {self.n_defective} defective image(s) score below "
            f"min_score {config.min_score:g} (the model gives them almost no defect "
            f"probability); {fallback}"
        ]


def choose_line_threshold(val: LineScores | None, config: Any) -> ThresholdOnVal:
    """The operating threshold chosen on ``val`` (``min_score``, not reached, without a val
    image)."""
    from cta_model.inspection import ThresholdChoice, choose_threshold

    if val is None or val.n_images == 0:
        return ThresholdOnVal(
            ThresholdChoice(float(config.min_score), False, None, NO_VAL_IMAGE), 0, 0, 0
        )
    score, defective, good = val.arrays()
    labelled = defective | good
    choice = choose_threshold(
        score[labelled], defective[labelled], config.target_recall, config.min_score
    )
    return ThresholdOnVal(
        choice,
        int(defective.sum()),
        int(good.sum()),
        int((score[defective] < config.min_score).sum()),
    )


# ------------------------------------------------------------------------ bootstrap


def line_resamples(n_images: int, n: int, seed: int, line_id: str) -> np.ndarray:
    """(n, n_images) bootstrap indices of one line's test images, reproducible per line."""
    from cta_model.inspection import bootstrap_indices

    rng = np.random.default_rng([seed, zlib.crc32(line_id.encode())])
    return bootstrap_indices(n_images, n, rng)


@dataclass(frozen=True)
class Resamples:
    """Bootstrap resamples of a group's test images: ``images`` (B, n_images) over all of
    them (recall and FRR, paired; the champion comparison), ``labelled`` (B, n_labelled) over
    those with a class label (image AUROC); None without any labelled image."""

    images: np.ndarray
    labelled: np.ndarray | None


def resamples_of(scores: LineScores, n: int, seed: int, line_id: str) -> Resamples:
    n_labelled = int(np.count_nonzero(scores.labelled))
    return Resamples(
        line_resamples(scores.n_images, n, seed, line_id),
        line_resamples(n_labelled, n, seed, line_id) if n_labelled else None,
    )


def _stacked(matrices: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    """Per-line resamples side by side, as indices into the lines' items concatenated."""
    offsets = np.cumsum([0, *sizes[:-1]])
    return np.concatenate(
        [matrix + offset for matrix, offset in zip(matrices, offsets, strict=True)], axis=1
    )


def stratified(resamples: Mapping[str, Resamples], scores: Mapping[str, LineScores]) -> Resamples:
    """The lines' resamples stacked (sorted line order, as ``overall`` holds the images)."""
    lines = sorted(resamples)
    images = _stacked(
        [resamples[line].images for line in lines], [scores[line].n_images for line in lines]
    )
    with_labels = [line for line in lines if resamples[line].labelled is not None]
    labelled = (
        _stacked(
            [resamples[line].labelled for line in with_labels],
            [int(np.count_nonzero(scores[line].labelled)) for line in with_labels],
        )
        if with_labels
        else None
    )
    return Resamples(images, labelled)


def _nullable(values: np.ndarray) -> list[float | None]:
    return [json_number(v) for v in values]


def bootstrap_replicates(
    test: LineScores, threshold: float, resamples: np.ndarray
) -> dict[str, list[float | None]]:
    """{recall: [...], frr: [...]} of each resample, paired (row k of both = resample k)."""
    from cta_model.inspection import is_reject, resampled_recall_and_frr

    score, defective, good = test.arrays()
    recall, frr = resampled_recall_and_frr(is_reject(score, threshold), defective, good, resamples)
    return {"recall": _nullable(recall), "frr": _nullable(frr)}


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"p05": None, "p50": None, "p95": None}
    p05, p50, p95 = np.percentile(finite, [5, 50, 95])
    return {"p05": float(p05), "p50": float(p50), "p95": float(p95)}


def _resampled_auroc(test: LineScores, labelled_resamples: np.ndarray | None) -> np.ndarray:
    """Image AUROC of each resample of the labelled images (NaN: a class missing)."""
    from cta_model.detection_metrics import resampled_roc_auc

    if labelled_resamples is None:
        return np.full(1, np.nan)
    score, defective, good = test.arrays()
    labelled = defective | good
    return resampled_roc_auc(defective[labelled], score[labelled], labelled_resamples)


def _intervals(test: LineScores, threshold: float, resamples: Resamples) -> dict[str, Any]:
    from cta_model.inspection import resampled_recall_and_frr

    score, defective, good = test.arrays()
    recall, frr = resampled_recall_and_frr(score >= threshold, defective, good, resamples.images)
    return {
        "recall": _quantiles(recall),
        "frr": _quantiles(frr),
        "image_auroc": _quantiles(_resampled_auroc(test, resamples.labelled)),
    }


# -------------------------------------------------------------------------- figures


def part_figures(test: LineScores, threshold: float) -> dict[str, Any] | None:
    """Part verdicts {n_parts, n_defective, n_good, recall, frr} at ``threshold``; None when no
    image carries a part id. An image without one is a part of its own. A part is defective
    when any of its labelled images is, good when all its images are labelled and none is;
    its score is the max of its images' scores."""
    from cta_model.inspection import recall_and_frr

    if all(part is None for part in test.part_ids):
        return None
    score, defective, good = test.arrays()
    parts: dict[Any, list[int]] = {}
    for index, (sample_id, part) in enumerate(zip(test.sample_ids, test.part_ids, strict=True)):
        parts.setdefault(("part", part) if part is not None else ("image", sample_id), []).append(
            index
        )
    members = list(parts.values())
    part_defective = np.array([defective[m].any() for m in members], dtype=bool)
    part_good = np.array([good[m].all() for m in members], dtype=bool)
    rejected = np.array([score[m].max() >= threshold for m in members], dtype=bool)
    labelled = part_defective | part_good
    recall, frr = recall_and_frr(rejected[labelled], part_defective[labelled])
    return {
        "n_parts": len(members),
        "n_defective": int(part_defective.sum()),
        "n_good": int(part_good.sum()),
        "recall": recall,
        "frr": frr,
    }


def _per_class(
    score: np.ndarray,
    classes: Sequence[tuple[int, ...]],
    threshold: float,
    class_names: Mapping[int, str],
    pixel: Mapping[str, Any] | None,
) -> dict[str, dict[str, Any]]:
    """Per reject class (keyed by name): images showing it, recall at the operating
    threshold among them, image AUROC / AP against the good images, pixel AUROC / AUPRO."""
    from cta_model.detection_metrics import per_class_image_figures

    image = per_class_image_figures(score, classes, list(class_names))
    pixels_known = pixel is not None and pixel.get("reason") is None
    out: dict[str, dict[str, Any]] = {}
    for class_id, name in class_names.items():
        positive = np.array([class_id in shown for shown in classes], dtype=bool)
        own = (pixel or {}).get("per_class", {}).get(class_id) or {}
        out[name] = {
            "class_id": int(class_id),
            "n_images": int(positive.sum()),
            "recall": float((score[positive] >= threshold).mean()) if positive.any() else None,
            "image_auroc": image[class_id]["auroc"],
            "image_ap": image[class_id]["ap"],
            "pixel_auroc": own.get("pixel_auroc"),
            "aupro": own.get("aupro"),
            "n_regions": int(own.get("n_regions", 0)) if pixels_known else None,
        }
    return out


def _test_warnings(n_defective: int, n_good: int, pixel: Mapping[str, Any] | None) -> list[str]:
    out = []
    if n_defective == 0:
        out.append(
            f"test has no defective image ({n_good} good): recall, image AUROC / AP, F1-max "
            "and the pixel figures are undefined (null)"
        )
    if n_good == 0:
        out.append(
            f"test has no good image ({n_defective} defective): the false-reject rate and "
            "AUROC are undefined (null)"
        )
    if pixel is not None and pixel.get("reason"):
        out.append(f"pixel AUROC / AUPRO not computed: {pixel['reason']}")
    return out


def inspection_figures(
    test: LineScores,
    on_val: ThresholdOnVal,
    config: Any,
    class_names: Mapping[int, str],
    resamples: Resamples,
) -> dict[str, Any] | None:
    """The ``inspection`` entry of one group on ``test`` (see the schema's ``inspection``);
    None when no test image has a class label."""
    from cta_model.detection_metrics import average_precision, f1_max, roc_auc
    from cta_model.inspection import curve_thresholds, is_reject, pr_curve, recall_and_frr

    score, defective, good = test.arrays()
    labelled = defective | good
    if not labelled.any():
        return None
    threshold = on_val.threshold
    score_l, truth = score[labelled], defective[labelled]
    classes = [c for c, keep in zip(test.defect_classes, labelled, strict=True) if keep]
    recall, frr = recall_and_frr(is_reject(score_l, threshold), truth)
    best = f1_max(truth, score_l)
    pixel = test.pixel
    n_defective, n_good = int(truth.sum()), int((~truth).sum())
    return {
        "threshold": threshold,
        "target_recall": float(config.target_recall),
        "threshold_choice": on_val.section(),
        "recall": recall,
        "frr": frr,
        "n_defective": n_defective,
        "n_good": n_good,
        "intervals": _intervals(test, threshold, resamples),
        "image_auroc": roc_auc(truth, score_l),
        "image_ap": average_precision(truth, score_l),
        "f1_max_oracle": None
        if best is None
        else {"f1": best[0], "threshold": best[1], "note": F1_ORACLE_NOTE},
        "pixel_auroc": None if pixel is None else pixel["pixel_auroc"],
        "aupro": None if pixel is None else pixel["aupro"],
        "per_class": _per_class(score_l, classes, threshold, class_names, pixel),
        "parts": part_figures(test, threshold),
        "pr_curve": pr_curve(score_l, truth, curve_thresholds(score_l, chosen=threshold)),
        "warnings": on_val.warnings(config) + _test_warnings(n_defective, n_good, pixel),
    }


def n_defective(scores: LineScores) -> int | None:
    """Images whose target semseg has a reject-class pixel; None without semseg labels."""
    _, defective, good = scores.arrays()
    return int(defective.sum()) if (defective | good).any() else None


# ------------------------------------------------------------------ vs the champion


def _concatenated_decisions(
    scores: Mapping[str, LineScores], thresholds: Mapping[str, float], lines: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rejects, bads, goods = [], [], []
    for line in lines:
        score, defective, good = scores[line].arrays()
        rejects.append(score >= thresholds[line])
        bads.append(defective)
        goods.append(good)
    return np.concatenate(rejects), np.concatenate(bads), np.concatenate(goods)


def _pooled(scores: Mapping[str, LineScores], lines: list[str]) -> LineScores:
    """The lines' images as one group (score, truth and labels only)."""
    return LineScores(
        sample_ids=[i for line in lines for i in scores[line].sample_ids],
        score=[v for line in lines for v in scores[line].score],
        defective=[v for line in lines for v in scores[line].defective],
        labelled=[v for line in lines for v in scores[line].labelled],
    )


def compare_with_champion(
    candidate: Mapping[str, LineScores],
    champion: Mapping[str, LineScores],
    candidate_overall: Mapping[str, float | None],
    champion_overall: Mapping[str, float | None],
    candidate_thresholds: Mapping[str, float] | None,
    champion_thresholds: Mapping[str, float] | None,
    resamples: Mapping[str, Resamples],
) -> dict[str, Any]:
    """{metrics: {task: {...}}, inspection: {recall: q, frr: q, image_auroc: q} | None} of
    candidate - champion.

    Per task (the candidate's tasks the champion also has), the primary metric per image:
    each bootstrap replicate is the mean over its resampled images of the per-image
    difference, signed so that positive = candidate better. ``inspection`` compares each
    model's score decisions at its own per-line threshold (chosen on val) and the image AUROC
    of its scores, on the same resamples; None unless both score defects.
    """
    from cta_model.inspection import resampled_recall_and_frr
    from cta_model.tasks import get_task, metric_key

    lines = sorted(candidate)
    for line in lines:
        if candidate[line].sample_ids != champion[line].sample_ids:
            raise ValueError(f"line {line}: candidate and champion scored different images")
    stacked = stratified({line: resamples[line] for line in lines}, candidate)
    indices = stacked.images
    metrics: dict[str, Any] = {}
    for task in candidate[lines[0]].per_image:
        if task not in champion[lines[0]].per_image:
            continue
        spec = get_task(task).primary_metric
        sign = 1.0 if spec.direction == "higher" else -1.0
        ours = np.concatenate([candidate[line].per_image[task] for line in lines])
        theirs = np.concatenate([champion[line].per_image[task] for line in lines])
        resampled = (sign * (ours - theirs))[indices]
        # Mean over the images that task scores (NaN per image: no label for it).
        scored = np.isfinite(resampled)
        counts = scored.sum(axis=1)
        sums = np.where(scored, resampled, 0.0).sum(axis=1)
        replicate_means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        key = metric_key(task, spec.name)
        ours_pooled, theirs_pooled = candidate_overall.get(key), champion_overall.get(key)
        both = ours_pooled is not None and theirs_pooled is not None
        metrics[task] = {
            "metric": spec.name,
            "candidate": ours_pooled,
            "champion": theirs_pooled,
            "diff_higher_better": sign * (ours_pooled - theirs_pooled) if both else None,
            **_quantiles(replicate_means),
        }
    inspection = None
    if candidate_thresholds is not None and champion_thresholds is not None:
        ours_reject, defective, good = _concatenated_decisions(
            candidate, candidate_thresholds, lines
        )
        theirs_reject, _, _ = _concatenated_decisions(champion, champion_thresholds, lines)
        our_recall, our_frr = resampled_recall_and_frr(ours_reject, defective, good, indices)
        their_recall, their_frr = resampled_recall_and_frr(theirs_reject, defective, good, indices)
        our_auroc = _resampled_auroc(_pooled(candidate, lines), stacked.labelled)
        their_auroc = _resampled_auroc(_pooled(champion, lines), stacked.labelled)
        inspection = {
            "recall": _quantiles(our_recall - their_recall),
            "frr": _quantiles(their_frr - our_frr),
            "image_auroc": _quantiles(our_auroc - their_auroc),
        }
    return {"metrics": metrics, "inspection": inspection}
