"""Inspection figures, paired bootstrap replicates and the champion comparison (DESIGN 5.2, 5.3).

- The reject-area threshold of a line is chosen on that line's ``val`` images with
  ``cta_model.inspection.choose_threshold`` for the config's target recall, then applied
  unchanged to ``test``; ``overall`` chooses one threshold on all lines' ``val`` images pooled.
  Only images with a semseg label count (defective = >= 1 reject-class pixel in the target).
- Bootstrap: per line, B resamples with replacement of that line's test images from
  ``numpy.random.default_rng([seed, crc32(line_id)])`` (independent of the other lines, so
  adding a line changes no line's replicates). Replicate k of recall and of frr use the same
  resample; the champion comparison reuses exactly these resamples, stratified over lines.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from components.evaluate.scoring import LineScores, json_number


def choose_line_threshold(val: LineScores | None, config: Any) -> int:
    """Area threshold chosen on ``val`` (``min_area_px`` when there is no val image)."""
    from cta_model.inspection import choose_threshold

    if val is None:
        return int(config.min_area_px)
    area, defective, good = val.arrays()
    labelled = defective | good
    return choose_threshold(
        area[labelled], defective[labelled], config.target_recall, config.min_area_px
    )


def inspection_figures(test: LineScores, threshold_px: int, config: Any) -> dict[str, Any] | None:
    """{threshold_px, target_recall, recall, frr, n_defective, n_good, pr_curve} on ``test``;
    None when no test image has a semseg label."""
    from cta_model.inspection import curve_thresholds, is_reject, pr_curve, recall_and_frr

    area, defective, good = test.arrays()
    labelled = defective | good
    if not labelled.any():
        return None
    area, truth = area[labelled], defective[labelled]
    recall, frr = recall_and_frr(is_reject(area, threshold_px), truth)
    thresholds = curve_thresholds(area, config.min_area_px, chosen=threshold_px)
    return {
        "threshold_px": int(threshold_px),
        "target_recall": float(config.target_recall),
        "recall": recall,
        "frr": frr,
        "n_defective": int(truth.sum()),
        "n_good": int((~truth).sum()),
        "pr_curve": pr_curve(area, truth, thresholds),
    }


def n_defective(scores: LineScores) -> int | None:
    """Images whose target semseg has a reject-class pixel; None without semseg labels."""
    _, defective, good = scores.arrays()
    return int(defective.sum()) if (defective | good).any() else None


def line_resamples(n_images: int, n: int, seed: int, line_id: str) -> np.ndarray:
    """(n, n_images) bootstrap indices of one line's test images, reproducible per line."""
    from cta_model.inspection import bootstrap_indices

    rng = np.random.default_rng([seed, zlib.crc32(line_id.encode())])
    return bootstrap_indices(n_images, n, rng)


def _nullable(values: np.ndarray) -> list[float | None]:
    return [json_number(v) for v in values]


def bootstrap_replicates(
    test: LineScores, threshold_px: int, resamples: np.ndarray
) -> dict[str, list[float | None]]:
    """{recall: [...], frr: [...]} of each resample, paired (row k of both = resample k)."""
    from cta_model.inspection import is_reject, resampled_recall_and_frr

    area, defective, good = test.arrays()
    recall, frr = resampled_recall_and_frr(
        is_reject(area, threshold_px), defective, good, resamples
    )
    return {"recall": _nullable(recall), "frr": _nullable(frr)}


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"p05": None, "p50": None, "p95": None}
    p05, p50, p95 = np.percentile(finite, [5, 50, 95])
    return {"p05": float(p05), "p50": float(p50), "p95": float(p95)}


def _stratified(resamples: Mapping[str, np.ndarray], lines: list[str]) -> np.ndarray:
    """Per-line resamples side by side, as indices into the lines' images concatenated."""
    offsets = np.cumsum([0] + [resamples[line].shape[1] for line in lines[:-1]])
    return np.concatenate(
        [resamples[line] + offset for line, offset in zip(lines, offsets, strict=True)], axis=1
    )


def _concatenated_decisions(
    scores: Mapping[str, LineScores], thresholds: Mapping[str, int], lines: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rejects, bads, goods = [], [], []
    for line in lines:
        area, defective, good = scores[line].arrays()
        rejects.append(area >= thresholds[line])
        bads.append(defective)
        goods.append(good)
    return np.concatenate(rejects), np.concatenate(bads), np.concatenate(goods)


def compare_with_champion(
    candidate: Mapping[str, LineScores],
    champion: Mapping[str, LineScores],
    candidate_overall: Mapping[str, float | None],
    champion_overall: Mapping[str, float | None],
    candidate_thresholds: Mapping[str, int] | None,
    champion_thresholds: Mapping[str, int] | None,
    resamples: Mapping[str, np.ndarray],
) -> dict[str, Any]:
    """{metrics: {task: {...}}, inspection: {recall: q, frr: q} | None} of candidate - champion.

    Per task (the candidate's tasks the champion also has), the primary metric per image:
    each bootstrap replicate is the mean over its resampled images of the per-image
    difference, signed so that positive = candidate better. ``inspection`` compares each
    model's decisions with its own per-line thresholds; None unless both segment.
    """
    from cta_model.inspection import resampled_recall_and_frr
    from cta_model.tasks import get_task, metric_key

    lines = sorted(candidate)
    for line in lines:
        if candidate[line].sample_ids != champion[line].sample_ids:
            raise ValueError(f"line {line}: candidate and champion scored different images")
    indices = _stratified(resamples, lines)
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
        inspection = {
            "recall": _quantiles(our_recall - their_recall),
            "frr": _quantiles(their_frr - our_frr),
        }
    return {"metrics": metrics, "inspection": inspection}
