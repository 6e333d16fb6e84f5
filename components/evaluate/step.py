"""The evaluate step: score a model folder on one split of a line dataset -> evaluation.json.

``run()`` is the one home of the step: ``cta evaluate`` and the KFP component both call it.

- The model is loaded only through ``Predictor.from_folder`` (SHA256SUMS verified first), so
  preprocessing and output decoding are the ones serving uses (DESIGN 6.1).
- ``data_uri`` is a dataset root (folder, ``file://`` or ``s3://``) or a ``dataset_ref.json``:
  then its ``uri`` is read, its ``quarantine`` skipped and its ``manifest_sha256`` must still
  match the manifest.
- Predictions (at the image resolution) go into the task registry's meters (pooled, DESIGN 5.1)
  per line and over the whole split; absent labels are skipped through the presence flags and
  invalid pixels by each task's invalid marker.
- ``evaluation.json`` is checked against ``schemas/evaluation.schema.json`` before it is
  written (atomically); NaN metrics (nothing valid seen) are written as null. ``delta_m`` is
  null with a ``delta_m_reason`` until STL baselines are looked up.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cta_model.errors import ConfigError, DataError

EVALUATION_NAME = "evaluation.json"
SCHEMA_NAME = "evaluation"
SCHEMA_VERSION = 1
# The tasks a line dataset has labels for (and their presence flags).
LINE_DATASET_TASKS = ("semseg", "height", "normals")
DELTA_M_NO_BASELINES = "no STL baselines registered"


def _json_number(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


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


def _batches(dataset: Any, indices: list[int], batch_size: int):
    """Samples of ``indices`` in batches of at most ``batch_size`` images of one size."""
    batch: list[dict[str, Any]] = []
    for index in indices:
        sample = dataset[index]
        if batch and (len(batch) >= batch_size or sample["image"].shape != batch[0]["image"].shape):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


def meter_inputs(
    task: str, prediction: Any, samples: list[Mapping[str, Any]], num_classes: int | None
) -> tuple[Any, Any, Any]:
    """(pred, target, present) tensors in the layouts the task's meter expects.

    The Predictor returns class ids for semseg; the SegmentationMeter takes logits and takes
    their argmax, so the ids become a one-hot (uint8) score map whose argmax is the id itself.
    """
    import numpy as np
    import torch

    present = torch.tensor([bool(s["present"][task]) for s in samples], dtype=torch.bool)
    if task == "semseg":
        if not num_classes:
            raise ConfigError("the model card has no num_classes for semseg")
        ids = torch.from_numpy(np.ascontiguousarray(prediction)).to(torch.int64)
        pred = torch.zeros((ids.shape[0], num_classes, *ids.shape[1:]), dtype=torch.uint8)
        pred.scatter_(1, ids.unsqueeze(1), 1)
        target = torch.from_numpy(np.stack([s["semseg"] for s in samples])).to(torch.int64)
    elif task == "height":
        pred = torch.from_numpy(np.ascontiguousarray(prediction)).unsqueeze(1)
        target = torch.from_numpy(np.stack([s["height"] for s in samples])).unsqueeze(1)
    elif task == "normals":
        pred = torch.from_numpy(np.ascontiguousarray(prediction)).permute(0, 3, 1, 2)
        target = torch.from_numpy(np.stack([s["normals"] for s in samples])).permute(0, 3, 1, 2)
    else:
        raise ConfigError(f"a line dataset has no labels for task {task!r}")
    return pred, target, present


def _metrics_of(meters: Mapping[str, Any]) -> dict[str, float | None]:
    from cta_model.tasks import flatten_metrics

    flat = flatten_metrics({task: meter.compute() for task, meter in meters.items()})
    return {key: _json_number(value) for key, value in flat.items()}


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
) -> dict[str, Any]:
    """Evaluate ``model_dir`` on ``split`` of ``data_uri``; writes and returns evaluation.json."""
    from components.artifacts import write_json_atomic
    from components.storage import opener_for
    from cta_model.data.line_dataset import MANIFEST_NAME, LineDataset, sha256_hex
    from cta_model.inference import Predictor
    from cta_model.model_folder import folder_sha256
    from cta_model.tasks import make_meters

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    # Checksums first: a tampered folder is refused before anything is read or computed.
    predictor = Predictor.from_folder(model_dir, verify=True)
    model_sha256 = folder_sha256(model_dir)
    tasks = tuple(predictor.tasks)
    unsupported = [task for task in tasks if task not in LINE_DATASET_TASKS]
    if unsupported:
        raise ConfigError(
            f"{model_dir}: model task(s) {', '.join(unsupported)} have no labels in a line dataset"
        )
    num_classes = predictor.card.spec.num_classes

    uri, ref = resolve_data(data_uri)
    root = _dataset_root(uri)
    opener = opener_for(root)
    manifest_sha256 = sha256_hex(opener(MANIFEST_NAME))
    if ref is not None and ref["manifest_sha256"] != manifest_sha256:
        raise DataError(
            f"{root}/{MANIFEST_NAME}: sha256 {manifest_sha256} differs from the validated "
            f"manifest_sha256 {ref['manifest_sha256']} in {data_uri}; validate the data again"
        )
    dataset = LineDataset(root, lines_config, split=split, opener=opener)
    quarantine = set(ref["quarantine"]) if ref is not None else set()
    by_line: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(dataset.rows):
        if row["sample_id"] not in quarantine:
            by_line[row["line_id"]].append(index)
    n_images = sum(len(indices) for indices in by_line.values())
    if n_images == 0:
        raise DataError(f"{root}: split {split!r} has no samples outside the quarantine")

    def new_meters() -> dict[str, Any]:
        return make_meters(tasks, num_classes=num_classes, miou_rule=miou_rule)

    overall = new_meters()
    per_line: dict[str, Any] = {}
    for line_id in sorted(by_line):
        meters = new_meters()
        for samples in _batches(dataset, by_line[line_id], batch_size):
            images = [sample["image"] for sample in samples]
            predictions = predictor.predict(images)
            for task in tasks:
                pred, target, present = meter_inputs(task, predictions[task], samples, num_classes)
                meters[task].update(pred, target, present)
                overall[task].update(pred, target, present)
        per_line[line_id] = {"n_images": len(by_line[line_id]), "metrics": _metrics_of(meters)}

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
            "quarantine_skipped": len(dataset) - n_images,
        },
        "metric_settings": {"reduction": "pooled", "miou_rule": miou_rule},
        "per_line": per_line,
        "overall": {"n_images": n_images, "metrics": _metrics_of(overall)},
        "delta_m": None,
        "delta_m_reason": DELTA_M_NO_BASELINES,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / EVALUATION_NAME, evaluation, schema_name=SCHEMA_NAME)
    return evaluation


__all__ = ["DELTA_M_NO_BASELINES", "EVALUATION_NAME", "meter_inputs", "resolve_data", "run"]
