"""The reference statistics a model folder carries (`reference_stats.parquet`): the baseline
that monitoring compares served images and predictions with.

Kept cheap: at most ``max_per_line`` images per line (default 64, the first ones in the
dataset's order), enough for the PSI / KS comparison of a few tens of served images, so a large
validation split does not make saving a model slow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from cta_model.data.statistics import monitored_image_statistics, prediction_statistics

REFERENCE_STATS_FILE = "reference_stats.parquet"
#: Images per line in reference_stats.parquet.
MAX_REFERENCE_IMAGES_PER_LINE = 64


def _line_ids(dataset: Any) -> list[str] | None:
    """Each sample's line id from the manifest rows behind a line dataset (or a Subset of one),
    without loading any image; None for other datasets."""
    base = getattr(dataset, "base", None)
    if base is not None and hasattr(dataset, "indices"):
        rows = getattr(base, "rows", None)
        return None if rows is None else [str(rows[i]["line_id"]) for i in dataset.indices]
    rows = getattr(dataset, "rows", None)
    return None if rows is None else [str(row["line_id"]) for row in rows]


def _chosen_indices(dataset: Any, max_per_line: int) -> list[int] | None:
    """The first ``max_per_line`` sample indices of each line; None when the line ids are not
    known before loading (then samples are capped as they load)."""
    line_ids = _line_ids(dataset)
    if line_ids is None:
        return None
    taken: dict[str, int] = {}
    chosen = []
    for index, line_id in enumerate(line_ids):
        if taken.get(line_id, 0) < max_per_line:
            taken[line_id] = taken.get(line_id, 0) + 1
            chosen.append(index)
    return chosen


def reference_statistics(
    predictor: Any,
    dataset: Any,
    class_names: Sequence[str],
    batch_size: int = 8,
    max_per_line: int = MAX_REFERENCE_IMAGES_PER_LINE,
) -> pa.Table:
    """Per image of `dataset` (at most ``max_per_line`` per line): identity, image statistics
    and the Predictor's prediction statistics (`pred_frac_<class>`, `pred_height_mean_mm` /
    `_std_mm`, `pred_depth_mean`, `pred_normals_z_mean`, and `pred_defect_score` from
    `Predictor.inspect`, the score the served verdict compares with its threshold)."""
    rows: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        if not pending:
            return
        inspection = predictor.inspect(np.stack([sample["image"] for sample in pending]))
        scores = inspection.defect_score
        for i, sample in enumerate(pending):
            rows.append(
                {
                    "sample_id": str(sample.get("sample_id", "")),
                    "line_id": str(sample.get("line_id", "")),
                    **monitored_image_statistics(sample["image"]),
                    **prediction_statistics(
                        {task: values[i] for task, values in inspection.outputs.items()},
                        class_names,
                        None if scores is None else float(scores[i]),
                    ),
                }
            )
        pending.clear()

    chosen = _chosen_indices(dataset, max_per_line)
    taken: dict[str, int] = {}
    for index in chosen if chosen is not None else range(len(dataset)):
        sample = dataset[index]
        line_id = str(sample.get("line_id", ""))
        if chosen is None:
            if taken.get(line_id, 0) >= max_per_line:
                continue
            taken[line_id] = taken.get(line_id, 0) + 1
        if pending and (
            len(pending) >= batch_size or pending[0]["image"].shape != sample["image"].shape
        ):
            flush()
        pending.append(sample)
    flush()
    return pa.Table.from_pylist(rows)
