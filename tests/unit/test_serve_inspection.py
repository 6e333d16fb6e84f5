"""What a line server judges with (components/serve/inspection.py): the operating threshold's
precedence and the line's 3-pixel rule at start and per image."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from components.serve import inspection
from components.serve.app import DefectRule, part_verdict
from components.serve.inspection import (
    LineResolution,
    OperatingThreshold,
    operating_threshold,
    threshold_in_evaluation,
)
from cta_model.data.lines import DEFAULT_LINES_CONFIG, load_lines_config
from cta_model.errors import ConfigError
from cta_model.inspection import ScoreDefinition

pytestmark = pytest.mark.unit


def _evaluation(per_line: dict[str, float | None], overall: float | None) -> dict:
    def scored(threshold):
        return {"n_images": 3, "metrics": {}, "inspection": {"threshold": threshold}}

    return {
        "per_line": {line: scored(value) for line, value in per_line.items()},
        "overall": scored(overall),
    }


def test_the_lines_threshold_wins_over_the_overall_one():
    evaluation = _evaluation({"press-a": 0.31, "press-b": None}, 0.5)
    assert threshold_in_evaluation(evaluation, "press-a") == (
        0.31,
        "per_line.press-a.inspection.threshold",
    )
    # A line without its own threshold (or not evaluated at all), or no --line: overall's.
    for line in ("press-b", "mill-c", None):
        assert threshold_in_evaluation(evaluation, line) == (0.5, "overall.inspection.threshold")
    assert threshold_in_evaluation(_evaluation({}, None), "press-a") is None
    assert threshold_in_evaluation({"per_line": {}, "overall": {"inspection": None}}, None) is None


def test_the_flag_wins_and_a_folder_without_it_has_no_threshold(monkeypatch):
    def registry_must_not_be_read(*args):
        raise AssertionError("read the registry although --threshold was given")

    monkeypatch.setattr(inspection, "registered_threshold", registry_must_not_be_read)
    chosen = operating_threshold(0.2, "cta", "3", "press-a", None)
    assert chosen == OperatingThreshold(0.2, "--threshold")
    none = operating_threshold(None, None, None, "press-a", None)
    assert none.value is None and "not a registered version" in none.reason
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        OperatingThreshold(1.5, "models:/cta/3 evaluation.json overall.inspection.threshold")


def _card(size=(32, 32), policy="resize", trained=None):
    return SimpleNamespace(
        spec=SimpleNamespace(input_size=size),
        input=SimpleNamespace(resize_policy=policy),
        trained_pitch_mm_per_px=trained,
    )


def test_the_camera_check_uses_the_pitch_the_model_sees():
    # the shipped inventory (tests default to one without widths): 2048x2448 at 0.05 mm/px,
    # 0.8 mm defects
    press_a = load_lines_config(DEFAULT_LINES_CONFIG).get("press-a")
    # Resized to 32x32 the camera's pixels are 76.5x coarser: 0.8 mm is 0.21 px.
    with pytest.raises(ConfigError, match=r"line press-a: its smallest defect.*0\.21 px"):
        LineResolution(press_a, _card()).check_camera()
    # Tiles keep the camera's pitch: 16 px.
    LineResolution(press_a, _card(policy="tile")).check_camera()


def test_each_image_is_checked_at_its_own_pitch_and_a_far_pitch_warns_once(caplog):
    press_a = (
        load_lines_config(DEFAULT_LINES_CONFIG)
        .get("press-a")
        .model_copy(update={"min_defect_width_mm": 14.0})
    )
    rule = LineResolution(press_a, _card(policy="tile", trained=(3.2, 3.2)))
    assert rule.image_pitch(32, 40) == pytest.approx(102.4 / 32)
    rule.check_image(32, 32)  # 4.4 px
    with pytest.raises(ConfigError, match=r"8x8 image from line press-a.*1\.09 px"):
        rule.check_image(8, 8)
    with caplog.at_level(logging.WARNING, logger="cta.serve"):
        rule.check_image(30, 30)  # 3.41 mm/px: within 25 % of 3.2
        assert not caplog.records
        rule.check_image(24, 24)  # 4.27 mm/px
        rule.check_image(24, 24)
    assert len(caplog.records) == 1 and "trained pitch" in caplog.records[0].getMessage()


def test_a_part_is_a_reject_when_one_view_is_and_scores_its_largest_view():
    rule = DefectRule(OperatingThreshold(0.5, "--threshold"), (5,), ("scratch",), 3)
    views = [
        {"view": name, "defect": rule.judge(score)}
        for name, score in (("top", 0.2), ("side", 0.5), ("rim", 0.1))
    ]
    part = part_verdict(rule, views)
    assert part["score"] == 0.5 and part["reject"] is True  # score >= threshold rejects
    assert part["rejected_views"] == ["side"] and part["n_views"] == 3
    calm = part_verdict(rule, views[::2])
    assert calm["score"] == 0.2 and calm["reject"] is False and calm["rejected_views"] == []

    unjudged = DefectRule(OperatingThreshold(None, "none", "no evaluation"), (5,), ("s",), 3)
    judged = unjudged.judge(0.9)
    assert judged["reject"] is None and judged["reason"] == "no operating threshold: no evaluation"


def test_the_verdict_reads_the_models_reject_classes():
    predictor = SimpleNamespace(score=ScoreDefinition((1,), 5), class_task="semseg")
    rule = DefectRule.of(predictor, ["good", "defect"], OperatingThreshold(0.3, "--threshold"))
    assert rule.describe() == {
        "threshold": 0.3,
        "threshold_source": "--threshold",
        "reject_classes": ["defect"],
        "reject_class_ids": [1],
        "window_px": 5,
        "reason": None,
    }
    unscored = DefectRule.of(
        SimpleNamespace(score=None, class_task=None), [], OperatingThreshold(0.3, "--threshold")
    )
    assert unscored.judge(None)["reason"] == "the model has no class task to score defects on"


def test_an_evaluation_file_gives_the_threshold_only_for_the_model_it_scored(tmp_path):
    from components.serve.inspection import operating_threshold

    path = tmp_path / "evaluation.json"
    path.write_text(
        json.dumps(
            {
                "model": {"sha256": "a" * 64},
                "per_line": {"press-a": {"inspection": {"threshold": 0.42}}},
                "overall": {"inspection": {"threshold": 0.3}},
            }
        )
    )
    found = operating_threshold(
        None, None, None, "press-a", None, evaluation_file=path, served_sha256="a" * 64
    )
    assert found.value == 0.42 and "per_line.press-a" in found.source
    other_line = operating_threshold(
        None, None, None, "mill-c", None, evaluation_file=path, served_sha256="a" * 64
    )
    assert other_line.value == 0.3
    # the flag still wins; a file that scored another model is refused
    assert operating_threshold(0.9, None, None, "press-a", None, evaluation_file=path).value == 0.9
    with pytest.raises(ConfigError, match="not the served"):
        operating_threshold(
            None, None, None, "press-a", None, evaluation_file=path, served_sha256="b" * 64
        )
