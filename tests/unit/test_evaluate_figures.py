"""The pure helpers of evaluate's inspection figures and their readers: part verdicts, the
warnings about the operating threshold, stacked resamples, class names, the run summary."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from components.evaluate.inspection import (
    Resamples,
    ThresholdOnVal,
    choose_line_threshold,
    part_figures,
    resamples_of,
    stratified,
)
from components.evaluate.scoring import LineScores
from components.evaluate.step import _dataset_warnings, class_names_of
from cta_model.inspection import InspectionConfig, ThresholdChoice
from pipelines.summary import inspection_lines

pytestmark = pytest.mark.unit

CONFIG = InspectionConfig(reject_classes=(5,), target_recall=0.9, min_score=0.05)


def _scores(score, defective, labelled=None, parts=None) -> LineScores:
    n = len(score)
    return LineScores(
        sample_ids=[f"s{i}" for i in range(n)],
        part_ids=parts if parts is not None else [None] * n,
        score=score,
        defective=defective,
        labelled=labelled if labelled is not None else [True] * n,
        defect_classes=[(5,) if bad else () for bad in defective],
    )


def test_part_verdicts_by_hand() -> None:
    # Part p: images 0 (good, 0.1) and 1 (defective, 0.7) -> defective, score 0.7.
    # Part q: images 2 (good, 0.6) and 3 (unlabelled, 0.9) -> neither (not all labelled).
    # Part r: images 4 and 5 good (0.2, 0.3) -> good, score 0.3.
    # Image 6 has no part id: a part of its own (good, 0.8).
    test = _scores(
        [0.1, 0.7, 0.6, 0.9, 0.2, 0.3, 0.8],
        [False, True, False, False, False, False, False],
        labelled=[True, True, True, False, True, True, True],
        parts=["p", "p", "q", "q", "r", "r", None],
    )
    assert part_figures(test, threshold=0.5) == {
        "n_parts": 4,
        "n_defective": 1,
        "n_good": 2,
        "recall": 1.0,
        "frr": 0.5,  # image 6 rejected, part r kept
    }
    assert part_figures(test, threshold=0.75)["recall"] == 0.0
    assert part_figures(_scores([0.1], [False]), threshold=0.5) is None  # no part ids


def test_threshold_warnings_say_what_val_reached_and_why() -> None:
    reached = choose_line_threshold(_scores([0.9, 0.8, 0.1], [True, True, False]), CONFIG)
    assert reached.choice.reached and reached.warnings(CONFIG) == []

    # 2 of 3 defective val images score below min_score: recall 1/3 at min_score.
    missed = choose_line_threshold(_scores([0.9, 0.01, 0.02, 0.3], [1, 1, 1, 0]), CONFIG)
    assert not missed.choice.reached and missed.threshold == 0.05
    assert missed.n_below_min_score == 2
    assert missed.warnings(CONFIG) == [
        "val cannot reach the target recall 0.9: it reaches 0.333 at the smallest threshold "
        "considered, because 2 of its 3 defective image(s) score below min_score 0.05 (the "
        "model gives them almost no defect probability); the operating threshold falls back "
        "to min_score 0.05"
    ]
    no_bad = choose_line_threshold(_scores([0.3, 0.2], [False, False]), CONFIG)
    assert no_bad.warnings(CONFIG)[0].startswith("val has no defective image (2 good): ")
    unlabelled = choose_line_threshold(_scores([0.3], [True], labelled=[False]), CONFIG)
    assert unlabelled.warnings(CONFIG)[0].startswith("val has no image with a class label: ")
    nothing = choose_line_threshold(None, CONFIG)
    assert nothing.threshold == 0.05 and nothing.section()["reached"] is False
    assert nothing.warnings(CONFIG)[0].startswith("val has no image of this line: ")


def test_stratified_resamples_index_the_lines_concatenated() -> None:
    a = _scores([0.1, 0.2, 0.3], [True, False, False], labelled=[True, False, True])
    b = _scores([0.4, 0.5], [False, True])
    resamples = {"a": resamples_of(a, 6, 0, "a"), "b": resamples_of(b, 6, 0, "b")}
    assert resamples["a"].labelled.shape == (6, 2)
    # Every image labelled: the AUROC resamples are the line's resamples themselves.
    assert np.array_equal(resamples["b"].labelled, resamples["b"].images)
    stacked = stratified(resamples, {"a": a, "b": b})
    assert np.array_equal(stacked.images[:, :3], resamples["a"].images)
    assert np.array_equal(stacked.images[:, 3:], resamples["b"].images + 3)
    assert np.array_equal(stacked.labelled[:, 2:], resamples["b"].labelled + 2)
    none = _scores([0.1], [False], labelled=[False])
    alone = stratified({"c": resamples_of(none, 4, 0, "c")}, {"c": none})
    assert alone.labelled is None and alone.images.shape == (4, 1)
    assert isinstance(alone, Resamples)


def test_class_names_come_from_the_card_then_the_dataset() -> None:
    card = SimpleNamespace(class_names=("good", "hole", "scratch", "scratch"))
    dataset = SimpleNamespace(class_names=("a", "b", "c", "d", "e", "f"))
    assert class_names_of(card, dataset, (2, 3)) == {2: "scratch", 3: "scratch_3"}
    assert class_names_of(SimpleNamespace(class_names=()), dataset, (5,)) == {5: "f"}
    nameless = SimpleNamespace(class_names=())
    assert class_names_of(nameless, nameless, (7,)) == {7: "class_7"}


def test_summary_prints_the_pilot_figures_with_intervals_and_the_warnings() -> None:
    inspection = {
        "threshold": 0.31,
        "target_recall": 0.95,
        "recall": 0.85,
        "frr": 0.05,
        "image_auroc": 0.97,
        "n_defective": 40,
        "n_good": 40,
        "intervals": {
            "recall": {"p05": 0.75, "p50": 0.85, "p95": 0.93},
            "frr": {"p05": 0.0, "p50": 0.05, "p95": 0.1},
            "image_auroc": {"p05": 0.94, "p50": 0.97, "p95": 0.99},
        },
    }
    evaluation = {
        "per_line": {"press-a": {"inspection": inspection}, "press-b": {"inspection": None}},
        "overall": {"inspection": {**inspection, "intervals": {}}},
        "warnings": ["line press-b: no test image has a class label"],
    }
    lines = inspection_lines(evaluation, "press-a")
    assert lines[1] == (
        "  pilot line press-a: image AUROC 0.97 [0.94, 0.99], recall 0.85 [0.75, 0.93], "
        "false-reject rate 0.05 [0, 0.1] at threshold 0.31 chosen on val for recall 0.95 "
        "(40 defective, 40 good test images)"
    )
    assert lines[2].startswith("  all lines: image AUROC 0.97, recall 0.85,")
    assert lines[3:] == [
        "evaluation warnings (1):",
        "  line press-b: no test image has a class label",
    ]
    # No pilot figures: the pooled ones.
    only_pooled = inspection_lines({**evaluation, "warnings": []}, None)
    assert [line.split(":")[0] for line in only_pooled[1:]] == ["  all lines"]


def test_threshold_on_val_section_is_what_evaluation_json_records() -> None:
    on_val = ThresholdOnVal(ThresholdChoice(0.4, True, 0.95), 20, 30, 0)
    assert on_val.section() == {
        "split": "val",
        "reached": True,
        "recall": 0.95,
        "n_defective": 20,
        "n_good": 30,
        "reason": None,
    }


def test_a_dataset_naming_other_defects_than_the_model_is_warned_about() -> None:
    imported = SimpleNamespace(reject_classes=(1,))
    assert _dataset_warnings(imported, (1,)) == []
    assert _dataset_warnings(SimpleNamespace(reject_classes=None), (5, 6)) == []
    assert _dataset_warnings(imported, ()) == []  # the model scores no defects
    assert _dataset_warnings(imported, (5, 6)) == [
        "dataset: it calls classes [1] defects but the model scores [5, 6]; every figure uses "
        "the model's (its own definition wins)"
    ]


def test_operating_confusion_counts_the_verdicts_at_the_threshold():
    from components.evaluate.step import operating_confusion

    inspection = {"recall": 0.75, "frr": 0.1, "n_defective": 8, "n_good": 30}
    evaluation = {"overall": {"inspection": inspection}}
    # good: 27 passed, 3 rejected; defective: 2 missed, 6 caught.
    assert operating_confusion(evaluation) == [[27, 3], [2, 6]]
    assert operating_confusion({"overall": {"inspection": None}}) is None
    no_recall = {**inspection, "recall": None}
    assert operating_confusion({"overall": {"inspection": no_recall}}) is None
    # No good images: their rate is null, the matrix still counts the defective ones.
    only_defective = {"recall": 1.0, "frr": None, "n_defective": 2, "n_good": 0}
    assert operating_confusion({"overall": {"inspection": only_defective}}) == [[0, 0], [0, 2]]
