"""The evaluate step: score a model folder on one split of a line dataset -> evaluation.json.

``run()`` is the one home of the step: ``cta evaluate`` and the KFP component both call it.

- The model is loaded only through ``Predictor.from_folder`` (SHA256SUMS verified first), so
  preprocessing and output decoding are the ones serving uses (DESIGN 6.1).
- ``data_uri`` is a dataset root (folder, ``file://`` or ``s3://``) or a ``dataset_ref.json``:
  then its ``uri`` is read, its ``quarantine`` skipped and its ``manifest_sha256`` must still
  match the manifest (the rules of ``cta_model/data/dataset_ref.py``, shared with training).
- Predictions (at the image resolution) go into the task registry's meters (pooled, DESIGN 5.1)
  per line and over the whole split; absent labels are skipped through the presence flags and
  invalid pixels by each task's invalid marker.
- Defects are scored with the model's own definition (``Predictor.inspect``: its reject classes
  and score window from model.yaml; the inspection config's only for folders without one);
  the target recall and ``min_score`` of the operating threshold come from the inspection
  config. Class names are the model card's (else the dataset's, else ``class_<id>``).
- Inspection figures, robustness (boundary / drop-out), dimensions and bootstrap replicates:
  ``scoring.py`` and ``inspection.py``; Delta_m against the registered STL baselines and the
  champion comparison: ``references.py`` (only with a tracking URI and a model name; else null
  with a reason); latency: ``latency.py``; affinity-map images: ``explain.py``.
- ``evaluation.json`` is checked against ``schemas/evaluation.schema.json`` before it is
  written (atomically); NaN metrics (nothing valid seen) are written as null. Its top-level
  ``warnings`` gather every entry's (val cannot reach the target recall, no defective image,
  pixel limit), each prefixed with where it applies, and a dataset that names other defect
  classes than the model scores.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cta_model.errors import ConfigError

EVALUATION_NAME = "evaluation.json"
SCHEMA_NAME = "evaluation"
SCHEMA_VERSION = 2
DELTA_M_NO_BASELINES = "no STL baselines registered"
#: AUPRO integrates the PRO curve up to this false-positive rate (MVTec AD).
AUPRO_MAX_FPR = 0.3
#: Pixels kept per group for pixel AUROC / AUPRO by default: 4 bytes each, about 60 while a
#: figure is computed (cta_model.detection_metrics.PixelDetectionAccumulator).
DEFAULT_MAX_PIXELS = 1 << 25  # 150 images of 384 x 384 px, pooled
log = logging.getLogger("cta.evaluate")
EXPLAIN_IMAGES = 2  # sample images whose affinity maps are drawn


def resolve_data(data_uri: str | os.PathLike[str]) -> tuple[str, dict[str, Any] | None]:
    """(dataset root, dataset_ref or None): a ``*.json`` file is read as a dataset_ref."""
    from components.artifacts import read_json
    from components.storage import is_remote

    text = os.fspath(data_uri)
    if not is_remote(text) and text.endswith(".json"):
        ref = read_json(text, schema_name="dataset_ref")
        return ref["uri"], ref
    return text, None


def _dataset_root(uri: str) -> str:
    from components.storage import is_remote, local_path

    return uri.rstrip("/") if is_remote(uri) else str(local_path(uri).resolve())


def _load_predictor(model_dir: str | os.PathLike[str], default_score: Any) -> Any:
    """Predictor of a model folder (SHA256SUMS verified) whose tasks a line dataset labels;
    ``default_score`` defines the defect score of folders that do not record their own."""
    from cta_model.inference import Predictor
    from cta_model.tasks import line_dataset_tasks

    predictor = Predictor.from_folder(model_dir, verify=True, default_score=default_score)
    unsupported = [task for task in predictor.tasks if task not in line_dataset_tasks()]
    if unsupported:
        raise ConfigError(
            f"{model_dir}: model task(s) {', '.join(unsupported)} have no labels in a line dataset"
        )
    return predictor


class _Split:
    """The images of one split by line (quarantine skipped), indices into ``dataset``."""

    def __init__(self, dataset: Any, split: str, quarantine: set[str]) -> None:
        self.dataset = dataset
        self.n_rows = 0
        by_line: dict[str, list[int]] = defaultdict(list)
        for index, row in enumerate(dataset.rows):
            if row["split"] != split:
                continue
            self.n_rows += 1
            if row["sample_id"] not in quarantine:
                by_line[row["line_id"]].append(index)
        self.by_line = dict(by_line)


class _Scored:
    """A model scored on test (and, when it segments, on val for its thresholds)."""

    def __init__(
        self,
        predictor: Any,
        test: _Split,
        val: _Split | None,
        settings: Mapping[str, Any],
        deep: bool,
        label: str,
    ) -> None:
        from components.evaluate.inspection import ThresholdOnVal, choose_line_threshold
        from components.evaluate.scoring import score_split

        config = settings["inspection"]
        common = {
            "batch_size": settings["batch_size"],
            "reject_classes": settings["reject_classes"],
            "miou_rule": settings["miou_rule"],
        }
        self.predictor = predictor
        self.per_line, self.overall = score_split(
            predictor,
            test.dataset,
            test.by_line,
            deep=deep,
            boundary_px=settings["boundary_px"],
            features=settings.get("features"),
            progress=f"{label}: test",
            max_pixels=settings["max_pixels"] if deep else None,
            aupro_max_fpr=AUPRO_MAX_FPR,
            **common,
        )
        self.thresholds: dict[str, ThresholdOnVal] | None = None
        self.overall_threshold: ThresholdOnVal | None = None
        if predictor.score is not None:  # it scores defects
            val_lines, val_overall = {}, None
            if val is not None and val.by_line:
                val_lines, val_overall = score_split(
                    predictor,
                    val.dataset,
                    val.by_line,
                    deep=False,
                    progress=f"{label}: val",
                    **common,
                )
            self.thresholds = {
                line: choose_line_threshold(val_lines.get(line), config) for line in self.per_line
            }
            self.overall_threshold = choose_line_threshold(val_overall, config)

    @property
    def threshold_values(self) -> dict[str, float] | None:
        """Each line's operating threshold; None when the model scores no defects."""
        if self.thresholds is None:
            return None
        return {line: on_val.threshold for line, on_val in self.thresholds.items()}


def _dimensions(scores: Any) -> dict[str, Any] | None:
    import numpy as np

    if not scores.dimensions:
        return None
    errors = np.abs(np.array([error for error, _ in scores.dimensions]))
    agree = np.array([same for _, same in scores.dimensions])
    return {
        "n_features": int(errors.size),
        "mae_mm": float(errors.mean()),
        "p95_mm": float(np.percentile(errors, 95)),
        "in_tol_acc": float(agree.mean()),
    }


def class_names_of(card: Any, dataset: Any, class_ids: tuple[int, ...]) -> dict[int, str]:
    """{class id: name} of the reject classes: the model card's names, else the dataset's,
    else ``class_<id>``; a name given twice gets its id appended, so keys stay unique."""
    names = tuple(card.class_names) or tuple(dataset.class_names)
    out: dict[int, str] = {}
    for class_id in class_ids:
        name = names[class_id] if class_id < len(names) else f"class_{class_id}"
        out[class_id] = f"{name}_{class_id}" if name in out.values() else name
    return out


def _entry(
    scores: Any,
    on_val: Any,
    config: Any,
    class_names: Mapping[int, str],
    resamples: Any,
) -> dict[str, Any]:
    from components.evaluate.inspection import inspection_figures, n_defective

    return {
        "n_images": scores.n_images,
        "n_defective": n_defective(scores),
        "metrics": scores.metrics,
        "inspection": (
            None
            if on_val is None
            else inspection_figures(scores, on_val, config, class_names, resamples)
        ),
        "dimensions": _dimensions(scores),
        "robustness": {"boundary": scores.boundary, "dropout": scores.dropout},
    }


def _registry_sections(
    candidate: _Scored,
    test: _Split,
    val: _Split,
    settings: Mapping[str, Any],
    manifest_sha256: str,
    resamples: Mapping[str, Any],
    tracking_uri: str,
    model_name: str,
) -> tuple[dict[str, Any], list[Any]]:
    """delta_m (+ reason) and vs_champion (+ reason) from the registry; the baselines'
    Predictors (for latency.stl)."""
    import tempfile

    from components.evaluate import references
    from components.evaluate.inspection import compare_with_champion
    from components.registry import names
    from components.registry.client import mlflow_client

    tasks = tuple(candidate.predictor.tasks)
    client = mlflow_client(tracking_uri)
    sections: dict[str, Any] = {}
    baseline_predictors: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="cta-evaluate-") as staging:
        found, missing = references.find_baselines(client, model_name, tasks, manifest_sha256)
        if missing:
            missing_names = ", ".join(names.baseline_name(model_name, task) for task in missing)
            sections["delta_m"] = None
            sections["delta_m_reason"] = (
                f"{DELTA_M_NO_BASELINES} for this data: no complete "
                f"@{names.BASELINE_ALIAS} version of {missing_names} with "
                f"{names.TAG_MANIFEST}={manifest_sha256}"
            )
        else:
            baselines: dict[str, Any] = {}
            for task, version in found.items():
                folder = references.fetch_version(
                    version.name, version.version, Path(staging) / f"stl-{task}", tracking_uri
                )
                predictor = _load_predictor(folder, settings["default_score"])
                scored = _Scored(predictor, test, None, settings, False, f"baseline {task}")
                baseline_predictors.append(predictor)
                baselines[task] = {
                    "name": version.name,
                    "version": str(version.version),
                    "metrics": {
                        key: value
                        for key, value in scored.overall.metrics.items()
                        if key.startswith(f"{task}.")
                    },
                }
            section, reason = references.delta_m_section(
                candidate.overall.metrics, tasks, baselines
            )
            sections["delta_m"], sections["delta_m_reason"] = section, reason

        champion, reason = references.complete_champion(client, model_name)
        sections["vs_champion"], sections["vs_champion_reason"] = None, reason
        if champion is not None:
            folder = references.fetch_version(
                model_name, champion.version, Path(staging) / "champion", tracking_uri
            )
            champion_predictor = _load_predictor(folder, settings["default_score"])
            scored = _Scored(champion_predictor, test, val, settings, False, "champion")
            comparison = compare_with_champion(
                candidate.per_line,
                scored.per_line,
                candidate.overall.metrics,
                scored.overall.metrics,
                candidate.threshold_values,
                scored.threshold_values,
                resamples,
            )
            sections["vs_champion"] = {
                "name": model_name,
                "version": str(champion.version),
                "model_id": getattr(champion, "model_id", None)
                or (champion.tags or {}).get(names.TAG_MODEL_ID),
                **comparison,
            }
    return sections, baseline_predictors


def run(
    model_dir: str,
    data_uri: str,
    out_dir: str,
    *,
    split: str = "test",
    model_name: str | None = None,
    model_id: str | None = None,
    batch_size: int = 8,
    lines_config: str | None = None,
    miou_rule: str = "nanmean_union",
    tracking_uri: str | None = None,
    inspection_config: str | None = None,
    bootstrap_n: int = 1000,
    bootstrap_seed: int = 0,
    latency_repeats: int = 5,
    boundary_px: int = 2,
    explain: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Evaluate ``model_dir`` on ``split`` of ``data_uri``; writes and returns evaluation.json.

    The registry (STL baselines for Delta_m, the champion) is consulted only when both
    ``tracking_uri`` and ``model_name`` are given; otherwise both are null with a reason.
    ``max_pixels`` caps the pixels kept per line (and overall) for pixel AUROC / AUPRO: over
    it those figures are null with a warning instead of exhausting memory.
    """
    import numpy as np

    from components.artifacts import write_json_atomic
    from components.evaluate.explain import not_explainable_reason, write_affinity_images
    from components.evaluate.inspection import bootstrap_replicates, resamples_of, stratified
    from components.evaluate.latency import measure_latency
    from components.evaluate.scoring import read_features
    from components.storage import opener_for
    from cta_model.data.dataset_ref import check_manifest, quarantined_ids, refuse_empty_split
    from cta_model.data.line_dataset import MANIFEST_NAME, LineDataset, sha256_hex
    from cta_model.inspection import (
        DEFAULT_INSPECTION_CONFIG,
        ScoreDefinition,
        load_inspection_config,
    )
    from cta_model.model_folder import folder_sha256

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    for name, value in (
        ("bootstrap_n", bootstrap_n),
        ("latency_repeats", latency_repeats),
        ("boundary_px", boundary_px),
        ("max_pixels", max_pixels),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    config = load_inspection_config(inspection_config or DEFAULT_INSPECTION_CONFIG)
    default_score = ScoreDefinition(tuple(config.reject_classes), config.score_window_px)
    # Checksums first: a tampered folder is refused before anything is read or computed.
    predictor = _load_predictor(model_dir, default_score)
    model_sha256 = folder_sha256(model_dir)
    tasks = tuple(predictor.tasks)

    uri, ref = resolve_data(data_uri)
    root = _dataset_root(uri)
    opener = opener_for(root)
    manifest_sha256 = sha256_hex(opener(MANIFEST_NAME))
    check_manifest(ref, manifest_sha256, root=root, ref_path=data_uri)
    quarantine = quarantined_ids(ref)
    # All splits in one dataset: thresholds are chosen on val (scoring val chooses on val too).
    dataset = LineDataset(root, lines_config, opener=opener, include_clean=True)
    dataset.require_tasks(tasks, f"{model_dir}: model tasks")
    test = _Split(dataset, split, quarantine)
    n_images = sum(len(indices) for indices in test.by_line.values())
    refuse_empty_split(n_images, root=root, split=split)
    val = _Split(dataset, "val", quarantine)
    score = predictor.score
    reject_classes = tuple(score.reject_classes) if score is not None else ()
    class_names = class_names_of(predictor.card, dataset, reject_classes)
    settings = {
        "batch_size": batch_size,
        "miou_rule": miou_rule,
        "boundary_px": boundary_px,
        "inspection": config,
        "reject_classes": reject_classes,
        "default_score": default_score,
        "max_pixels": max_pixels,
        "features": read_features(dataset),
    }
    candidate = _Scored(predictor, test, val, settings, True, "candidate")
    thresholds = candidate.thresholds or {}
    resamples = {
        line: resamples_of(scores, bootstrap_n, bootstrap_seed, line)
        for line, scores in candidate.per_line.items()
    }
    per_line = {
        line: _entry(scores, thresholds.get(line), config, class_names, resamples[line])
        for line, scores in candidate.per_line.items()
    }
    overall = _entry(
        candidate.overall,
        candidate.overall_threshold,
        config,
        class_names,
        stratified(resamples, candidate.per_line),
    )
    warnings = _dataset_warnings(dataset, reject_classes) + _warnings(
        per_line, overall, score is not None
    )
    for warning in warnings:
        log.warning("evaluation warning: %s", warning)

    replicates = {
        line: bootstrap_replicates(scores, thresholds[line].threshold, resamples[line].images)
        if candidate.thresholds is not None
        else {"recall": [None] * bootstrap_n, "frr": [None] * bootstrap_n}
        for line, scores in candidate.per_line.items()
    }

    registry: dict[str, Any] = {
        "delta_m": None,
        "delta_m_reason": DELTA_M_NO_BASELINES,
        "vs_champion": None,
        "vs_champion_reason": "no tracking URI and model name given: no champion looked up",
    }
    baseline_predictors: list[Any] = []
    if tracking_uri and model_name:
        registry, baseline_predictors = _registry_sections(
            candidate, test, val, settings, manifest_sha256, resamples, tracking_uri, model_name
        )

    first_line = test.by_line[sorted(test.by_line)[0]]
    latency_samples = [test.dataset[i] for i in first_line[:batch_size]]
    latency_images = np.stack(
        [
            s["image"]
            for s in latency_samples
            if s["image"].shape == latency_samples[0]["image"].shape
        ]
    )
    log.info("latency: %d repeat(s) of a batch of %d", latency_repeats, len(latency_images))
    latency = measure_latency(predictor, latency_images, latency_repeats, baseline_predictors)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    explain_section, explain_reason = None, None
    if not explain:
        explain_reason = "explain disabled"
    else:
        explain_reason = not_explainable_reason(predictor)
        if explain_reason is None:
            explain_indices = [i for line in sorted(test.by_line) for i in test.by_line[line]]
            explain_samples = [test.dataset[i] for i in explain_indices[:EXPLAIN_IMAGES]]
            explain_section = write_affinity_images(predictor, explain_samples, out)

    evaluation: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "name": model_name,
            "version": None,
            "model_id": model_id,
            "sha256": model_sha256,
            "tasks": list(tasks),
        },
        "data": {
            "uri": root,
            "manifest_sha256": manifest_sha256,
            "split": split,
            "dvc_rev": ref["dvc_rev"] if ref is not None else None,
            "quarantine_skipped": test.n_rows - n_images,
        },
        "metric_settings": {
            "reduction": "pooled",
            "miou_rule": miou_rule,
            "boundary_px": boundary_px,
            "reject_classes": list(reject_classes),
            "reject_class_names": [class_names[c] for c in reject_classes],
            "score_window_px": None if score is None else score.score_window_px,
            "score_definition": (
                None
                if score is None
                else ("model" if predictor.card.inspection is not None else "inspection config")
            ),
            "target_recall": config.target_recall,
            "min_score": config.min_score,
            "threshold_split": "val",
            "aupro_max_fpr": AUPRO_MAX_FPR,
            "max_pixels": max_pixels,
        },
        "per_line": per_line,
        "overall": overall,
        "warnings": warnings,
        **registry,
        "bootstrap": {
            "unit": "image",
            "n": bootstrap_n,
            "seed": bootstrap_seed,
            "replicates": replicates,
        },
        "latency": latency,
        "explain": explain_section,
        "explain_reason": explain_reason,
    }
    write_json_atomic(out / EVALUATION_NAME, evaluation, schema_name=SCHEMA_NAME)
    return evaluation


#: The inspection figures of ``overall.inspection`` among the headline metrics.
HEADLINE_INSPECTION = ("image_auroc", "image_ap", "pixel_auroc", "aupro", "recall", "frr")


def headline_metrics(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """The overall figures of an evaluation.json as ``{key: value}``, finite numbers only: every
    task metric (``semseg.miou``, ...) and the inspection figures (``inspection.image_auroc``,
    ...). The KFP Metrics artefact of the evaluate step and the LoggedModel's metrics (register
    step) are these."""
    overall = evaluation["overall"]
    inspection = overall.get("inspection") or {}
    figures = {
        **overall["metrics"],
        **{f"inspection.{k}": inspection.get(k) for k in HEADLINE_INSPECTION},
    }
    return {
        key: float(value)
        for key, value in sorted(figures.items())
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def operating_confusion(evaluation: Mapping[str, Any]) -> list[list[int]] | None:
    """The pooled test images at the operating threshold as a confusion matrix over
    (good, defective): rows are the truth, columns the verdict; None without a defect score
    (no inspection figures, or a rate missing for images that exist)."""
    inspection = evaluation["overall"].get("inspection") or {}
    n_defective, n_good = inspection.get("n_defective"), inspection.get("n_good")
    recall, frr = inspection.get("recall"), inspection.get("frr")
    if n_defective is None or n_good is None:
        return None
    if (n_defective and recall is None) or (n_good and frr is None):
        return None
    caught = round(recall * n_defective) if n_defective else 0
    rejected_good = round(frr * n_good) if n_good else 0
    return [[n_good - rejected_good, rejected_good], [n_defective - caught, caught]]


def _dataset_warnings(dataset: Any, reject_classes: tuple[int, ...]) -> list[str]:
    """A dataset that names other defect classes than the model scores."""
    named = dataset.reject_classes
    if not reject_classes or named is None or set(named) == set(reject_classes):
        return []
    return [
        f"dataset: it calls classes {sorted(named)} defects but the model scores "
        f"{sorted(reject_classes)}; every figure uses the model's (its own definition wins)"
    ]


def _warnings(
    per_line: Mapping[str, Mapping[str, Any]], overall: Mapping[str, Any], scores_defects: bool
) -> list[str]:
    """Every entry's inspection warnings, prefixed with where they apply (``overall`` only
    with several lines: with one it repeats the line's)."""
    scopes = [(f"line {line}", entry) for line, entry in sorted(per_line.items())]
    if len(per_line) > 1:
        scopes.append(("overall", overall))
    out = []
    for scope, entry in scopes:
        inspection = entry.get("inspection")
        if inspection is None:
            if scores_defects:
                out.append(
                    f"{scope}: no test image has a class label: no defect figures "
                    "(recall, FRR, AUROC) for it"
                )
            continue
        out += [f"{scope}: {warning}" for warning in inspection["warnings"]]
    return out


__all__ = [
    "AUPRO_MAX_FPR",
    "DEFAULT_MAX_PIXELS",
    "DELTA_M_NO_BASELINES",
    "EVALUATION_NAME",
    "class_names_of",
    "resolve_data",
    "run",
]
