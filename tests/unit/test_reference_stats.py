"""reference_stats.parquet: the defect score beside the prediction statistics, at most
``max_per_line`` images per line, chosen without loading the others."""

from __future__ import annotations

import numpy as np
import pytest

from cta_model.inference import Inspection
from cta_model.training.reference_stats import reference_statistics

pytestmark = pytest.mark.unit


class FakePredictor:
    """Scores each image by its mean grey level / 255; predicts class 1 everywhere."""

    def inspect(self, images: np.ndarray) -> Inspection:
        scores = images.reshape(len(images), -1).mean(axis=1) / 255.0
        classes = np.ones(images.shape[:3], dtype=np.int64)
        return Inspection({"semseg": classes}, None, scores.astype(np.float32))


class FakeLineDataset:
    """Manifest rows and samples, counting which samples were loaded."""

    def __init__(self, lines: list[str]) -> None:
        self.rows = [{"line_id": line, "sample_id": f"s{i}"} for i, line in enumerate(lines)]
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        self.loaded.append(index)
        row = self.rows[index]
        image = np.full((4, 4, 3), index, dtype=np.uint8)
        return {"image": image, "line_id": row["line_id"], "sample_id": row["sample_id"]}


def test_at_most_max_per_line_images_with_their_defect_score():
    dataset = FakeLineDataset(["a", "b", "a", "a", "b", "a"])
    table = reference_statistics(
        FakePredictor(), dataset, ["good", "defect"], batch_size=2, max_per_line=2
    ).to_pylist()
    assert [row["sample_id"] for row in table] == ["s0", "s1", "s2", "s4"]
    assert dataset.loaded == [0, 1, 2, 4]  # the rest is never read
    for row in table:
        index = int(row["sample_id"][1:])
        assert row["pred_defect_score"] == pytest.approx(index / 255.0)
        assert row["pred_frac_defect"] == 1.0 and row["pred_frac_good"] == 0.0
