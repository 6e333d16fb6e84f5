"""The reference statistics a model folder carries (`reference_stats.parquet`): the baseline
that monitoring compares served images and predictions with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from cta_model.data.statistics import monitored_image_statistics, prediction_statistics

REFERENCE_STATS_FILE = "reference_stats.parquet"


def reference_statistics(
    predictor: Any, dataset: Any, class_names: Sequence[str], batch_size: int = 8
) -> pa.Table:
    """Per image of `dataset`: identity, image statistics and the Predictor's prediction
    statistics (`pred_frac_<class>`, `pred_height_mean_mm`/`_std_mm`, `pred_depth_mean`,
    `pred_normals_z_mean`)."""
    rows: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        if not pending:
            return
        images = np.stack([sample["image"] for sample in pending])
        predictions = predictor.predict(images)
        for i, sample in enumerate(pending):
            rows.append(
                {
                    "sample_id": str(sample.get("sample_id", "")),
                    "line_id": str(sample.get("line_id", "")),
                    **monitored_image_statistics(sample["image"]),
                    **prediction_statistics(
                        {task: values[i] for task, values in predictions.items()}, class_names
                    ),
                }
            )
        pending.clear()

    for index in range(len(dataset)):
        sample = dataset[index]
        if pending and (
            len(pending) >= batch_size or pending[0]["image"].shape != sample["image"].shape
        ):
            flush()
        pending.append(sample)
    flush()
    return pa.Table.from_pylist(rows)
