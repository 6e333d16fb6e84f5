"""Training for rare defects end to end on tiny data: tiles at the images' pitch, pasted
anomalies, the defect-aware loss, the model folder's defect score, the resolution rule and the
warning for a training split without defects."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from cta_model.data.line_dataset import LineDataset
from cta_model.data.synthetic_dataset import generate_dataset
from cta_model.errors import ConfigError
from cta_model.inference import Predictor
from cta_model.model_folder import read_model_card
from cta_model.train_config import validate_train_config
from cta_model.training import train

pytestmark = pytest.mark.integration
TASKS = ("semseg", "height", "normals")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Two lines at 96 px: press-a's 0.8 mm cracks span 0.8 / (102.4 / 96) = 0.75 px there, so
    only a lines config with a coarser width passes the 3-pixel rule (see lines_yaml)."""
    root = tmp_path_factory.mktemp("scenes") / "data"
    return generate_dataset(root, n_lines=2, samples_per_line=10, height=96, width=96, seed=1)


def lines_yaml(folder: Path, width_mm: float | None) -> Path:
    """configs/lines.yaml with every line's min_defect_width_mm replaced."""
    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/lines.yaml").read_text())
    for line in data["lines"]:
        line["min_defect_width_mm"] = width_mm
    path = folder / f"lines-{width_mm}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def config(data: Path, out: Path, lines: Path, **data_keys: Any) -> Any:
    return validate_train_config(
        {
            "model": {
                "arch": "ctal",
                "tasks": list(TASKS),
                "input_size": [32, 32],
                "decoder_channels": 16,
                "affinity_channels": 8,
            },
            "loss": {"defects": {"reject_weight": 5.0, "dice_weight": 0.5}},
            "data": {"path": str(data), "lines_config": str(lines), **data_keys},
            "max_steps": 3,
            "batch_size": 4,
            "progress": False,
            "output": str(out),
        }
    )


def test_tiled_run_with_anomalies_writes_a_model_that_scores_defects(scenes, tmp_path, caplog):
    lines = lines_yaml(tmp_path, 4.0)  # >= 3.1 px on both lines (1.07 and 1.28 mm/px)
    run = config(
        scenes,
        tmp_path / "run",
        lines,
        tiling={"defect_fraction": 0.5, "tiles_per_image": 2, "val_tiles_per_image": 2},
        anomalies={"probability": 1.0, "region_classes": [1, 3], "size_px": [4, 12]},
    )
    with caplog.at_level(logging.INFO, logger="cta_model"):
        result = train(run)
    text = caplog.text
    assert "labelled images show reject-class pixels" in text
    assert "synthetic anomalies pasted" in text
    card = read_model_card(result.model_dir)
    assert card.input.resize_policy == "tile"
    assert card.inspection.reject_classes == (5, 6, 7, 8)
    assert card.trained_pitch_mm_per_px == pytest.approx((102.4 / 96, 122.88 / 96))
    predictor = Predictor.from_folder(result.model_dir)
    images = np.stack([LineDataset(scenes, split="test")[i]["image"] for i in range(2)])
    inspected = predictor.inspect(images)
    assert inspected.defect_map.shape == (2, 96, 96)
    assert inspected.defect_score.shape == (2,)
    assert np.all((inspected.defect_score >= 0) & (inspected.defect_score <= 1))


def test_resized_images_that_hide_the_smallest_defect_are_refused(scenes, tmp_path):
    lines = lines_yaml(tmp_path, 4.0)
    # resized 96 -> 32: the model sees 3.2 mm/px at press-a: 1.25 px for 4 mm
    with pytest.raises(
        ConfigError,
        match=r"line press-a: .*4 mm, min_defect_width_mm in .*lines-4\.0\.yaml.*1\.25 px",
    ):
        train(config(scenes, tmp_path / "resized", lines))
    # a line that states no width is not checked
    train(config(scenes, tmp_path / "unchecked", lines_yaml(tmp_path, None)))


def test_a_defect_free_training_split_is_shouted_about(tmp_path, caplog):
    lines = lines_yaml(tmp_path, None)
    data = yaml.safe_load(lines.read_text())
    for line in data["lines"]:
        if line.get("synthetic"):
            line["synthetic"]["defect_prevalence"] = 0.0
    lines.write_text(yaml.safe_dump(data))
    root = generate_dataset(tmp_path / "clean", lines, n_lines=1, samples_per_line=8, height=32)
    with caplog.at_level(logging.WARNING, logger="cta_model"):
        train(config(root, tmp_path / "run", lines))
    assert "has no reject-class pixel" in caplog.text and "data.anomalies" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cta_model"):
        train(config(root, tmp_path / "run2", lines, anomalies={"probability": 0.5}))
    assert "has no reject-class pixel" not in caplog.text
