"""The defect score, the threshold choice and the resolution rule (cta_model.inspection)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cta_model.errors import ConfigError
from cta_model.inspection import (
    InspectionConfig,
    check_defect_resolution,
    choose_threshold,
    defect_map,
    image_scores,
    pitch_seen,
)

pytestmark = pytest.mark.unit


def test_defect_map_is_the_probability_mass_of_the_reject_classes():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 4, 1, 1).expand(2, 4, 3, 3)
    mass = defect_map(probs, (1, 3))
    assert mass.shape == (2, 3, 3)
    assert torch.allclose(mass, torch.full((2, 3, 3), 0.6))
    # ids beyond the model's classes are ignored; none left is an error naming them
    assert torch.allclose(defect_map(probs, (3, 9)), torch.full((2, 3, 3), 0.4))
    with pytest.raises(ConfigError, match=r"\[7, 9\]"):
        defect_map(probs, (7, 9))


def test_image_score_is_the_max_of_the_window_mean():
    maps = torch.zeros(2, 9, 9)
    maps[0, 4, 4] = 0.9  # one hot pixel: diluted by a 3x3 window
    maps[1, 2:5, 2:5] = 0.6  # a 3x3 defect keeps its value at the window's centre
    plain = image_scores(maps, 1)
    windowed = image_scores(maps, 3)
    assert plain.tolist() == pytest.approx([0.9, 0.6])
    assert windowed.tolist() == pytest.approx([0.1, 0.6])
    # at the border the window averages only the pixels inside the image
    corner = torch.zeros(1, 5, 5)
    corner[0, 0:2, 0:2] = 1.0
    assert image_scores(corner, 3).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="odd"):
        image_scores(maps, 4)


def test_threshold_is_the_largest_that_reaches_the_target_recall():
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.05])
    defective = np.array([1, 1, 1, 1, 0, 0, 0], dtype=bool)
    choice = choose_threshold(scores, defective, target_recall=0.75, min_score=0.01)
    # 3 of 4 defective at >= 0.7; 0.7 is the largest threshold with recall 0.75
    assert choice.threshold == pytest.approx(0.7)
    assert choice.reached and choice.recall == pytest.approx(0.75)
    full = choose_threshold(scores, defective, target_recall=1.0, min_score=0.01)
    assert full.threshold == pytest.approx(0.2) and full.reached


def test_threshold_below_min_score_is_not_considered():
    scores = np.array([0.9, 0.02, 0.01, 0.0])
    defective = np.array([1, 1, 0, 0], dtype=bool)
    choice = choose_threshold(scores, defective, target_recall=1.0, min_score=0.05)
    assert choice.threshold == 0.05
    assert not choice.reached
    assert choice.recall == pytest.approx(0.5)
    assert "recall 0.500 < target 1" in choice.reason
    none = choose_threshold(np.array([0.3, 0.1]), np.array([0, 0], bool), 0.9, 0.05)
    assert (none.threshold, none.reached, none.recall) == (0.05, False, None)
    assert "no defective image" in none.reason


def test_config_window_must_be_odd():
    with pytest.raises(ValueError, match="odd"):
        InspectionConfig(reject_classes=(5,), score_window_px=2)


def test_resolution_rule_refuses_defects_under_three_pixels_naming_the_line():
    check_defect_resolution("press-a", 0.8, 102.4 / 384, "cta train")  # 3.0 px: fine
    check_defect_resolution("press-a", None, 5.0, "cta train")  # no width stated: no check
    with pytest.raises(ConfigError, match=r"cta serve: line press-a: .*0\.8 mm.*2\.00 px"):
        check_defect_resolution("press-a", 0.8, 0.4, "cta serve")


def test_pitch_seen_depends_on_the_resize_policy():
    # resized 384 -> 64: the network sees a 6x coarser pitch; tiled: the image's own
    assert pitch_seen(0.25, (384, 384), (64, 64), "resize") == pytest.approx(1.5)
    assert pitch_seen(0.25, (384, 384), (64, 64), "tile") == pytest.approx(0.25)
