"""Inspection figures of `cta evaluate` from the model's own defect scores, checked against
cta_model.detection_metrics computed by hand on the same predictions; per-class figures by
class name; part verdicts; the warning when val cannot reach the target recall."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch

from components.artifacts import read_json, validation_problems
from components.evaluate.inspection import F1_ORACLE_NOTE
from components.evaluate.step import EVALUATION_NAME, run
from cta_model.data.line_dataset import LineDataset
from cta_model.data.line_writer import SampleRecord, prepare_root, write_manifest, write_sample
from cta_model.data.lines import load_lines_config
from cta_model.detection_metrics import (
    PixelDetectionAccumulator,
    average_precision,
    f1_max,
    per_class_image_figures,
    roc_auc,
)
from cta_model.inference import Predictor
from cta_model.inspection import (
    ScoreDefinition,
    choose_threshold,
    load_inspection_config,
    recall_and_frr,
)
from cta_model.model_folder import save_model_folder
from cta_model.nn.models import ModelSpec, build_model

pytestmark = pytest.mark.integration

CLASS_NAMES = ("background", "part", "scratch", "dent")
REJECT = (2, 3)
SIZE = 32
BATCH = 16  # >= the images of one line in one split: evaluate scores each in one batch
B = 40
TASKS = ("semseg",)

# (line, split, defect class or None, part id, labelled) per sample. press-a images its parts
# twice (one part defective on one image only); press-b has no part ids, a val split without
# defective images and one unlabelled test image.
SAMPLES = [
    *[("press-a", "val", c, None, True) for c in (2, 3, None, None, None)],
    *[
        ("press-a", "test", c, f"pa-{n // 2}", True)
        for n, c in enumerate((2, None, 3, 3, None, None, None, None, 2, None))
    ],
    *[("press-b", "val", None, None, True) for _ in range(3)],
    *[("press-b", "test", c, None, True) for c in (2, 3, 2, None, None, None)],
    ("press-b", "test", 3, None, False),
    *[("press-a", "train", c, None, True) for c in (2, None)],
]


def _label(rng: np.random.Generator, defect: int | None) -> np.ndarray:
    label = np.zeros((SIZE, SIZE), np.int64)
    label[6:26, 6:26] = 1
    if defect is not None:
        y, x = rng.integers(6, 20, size=2)
        label[y : y + 4, x : x + 3] = defect
        label[y + 5, x + 5] = defect  # a second, one-pixel region
    label[0, :4] = -1  # a few unlabelled pixels
    return label


def write_dataset(root: Path) -> Path:
    """A semseg-only line dataset with the samples above (seeded)."""
    lines = {line.id: line for line in load_lines_config().lines}
    rng = np.random.default_rng(7)
    prepare_root(root, TASKS)
    written = []
    for index, (line_id, split, defect, part_id, labelled) in enumerate(SAMPLES):
        label = _label(rng, defect)
        image = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
        image[label >= 2] = 255  # the defect is visible
        record = SampleRecord(
            sample_id=f"{line_id}-{index:04d}",
            line_id=line_id,
            image=image,
            camera=lines[line_id].camera,
            pitch_mm_per_px=lines[line_id].pitch_mm_per_px,
            labels={"semseg": label} if labelled else {},
            split=split,
            has_defect=defect is not None,
            n_defects=int(defect is not None),
            part_id=part_id,
        )
        written.append(write_sample(root, record, TASKS))
        written[-1].set_split(split)
    write_manifest(
        root, written, TASKS, {"class_names": list(CLASS_NAMES), "reject_classes": list(REJECT)}
    )
    return root


def save_semseg_model(folder: Path, *, blind: bool = False) -> Path:
    """An untrained STL semseg model naming its classes and reject classes; ``blind``: its
    logits ignore the image and give the reject classes ~e^-40 of the probability (score 0)."""
    torch.manual_seed(3)
    spec = ModelSpec(
        arch="stl",
        tasks=TASKS,
        input_size=(SIZE, SIZE),
        backbone="resnet18",
        output_stride=8,
        num_classes=len(CLASS_NAMES),
    )
    model = build_model(spec)
    if blind:
        head = dict(model.named_modules())["networks.semseg.heads.semseg.2"]
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([20.0, 0.0, -20.0, -20.0]))
    return save_model_folder(
        model,
        folder,
        class_names=CLASS_NAMES,
        inspection=ScoreDefinition(REJECT, 3),
    )


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("inspection") / "lines")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_semseg_model(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def evaluation(model_dir: Path, dataset_root: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("eval")
    run(
        str(model_dir),
        str(dataset_root),
        str(out),
        batch_size=BATCH,
        bootstrap_n=B,
        latency_repeats=1,
        explain=False,
    )
    return read_json(out / EVALUATION_NAME, schema_name="evaluation")


# --- the figures by hand ------------------------------------------------------------------------


class Scored:
    """One group's images scored by hand: scores, truth, reject classes shown, parts, maps."""

    def __init__(self) -> None:
        self.scores: list[float] = []
        self.defective: list[bool] = []
        self.labelled: list[bool] = []
        self.classes: list[tuple[int, ...]] = []
        self.parts: list[str | None] = []
        self.pixels = PixelDetectionAccumulator()

    def extend(self, other: Scored) -> None:
        self.scores += other.scores
        self.defective += other.defective
        self.labelled += other.labelled
        self.classes += other.classes
        self.parts += other.parts

    def labelled_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        keep = np.asarray(self.labelled)
        return np.asarray(self.scores)[keep], np.asarray(self.defective)[keep]


def score_by_hand(
    predictor: Predictor, dataset: LineDataset, line: str, split: str, into: Iterable[Scored]
) -> Scored:
    indices = [
        i for i, row in enumerate(dataset.rows) if row["line_id"] == line and row["split"] == split
    ]
    samples = [dataset[i] for i in indices]
    inspection = predictor.inspect(np.stack([s["image"] for s in samples]))
    scored = Scored()
    for i, (index, sample) in enumerate(zip(indices, samples, strict=True)):
        target = sample["semseg"]
        labelled = bool(sample["present"]["semseg"])
        shown = tuple(int(c) for c in np.intersect1d(target, REJECT))
        scored.scores.append(float(inspection.defect_score[i]))
        scored.defective.append(labelled and bool(shown))
        scored.labelled.append(labelled)
        scored.classes.append(shown)
        scored.parts.append(dataset.rows[index]["part_id"])
        if labelled:
            for accumulator in (scored.pixels, *(group.pixels for group in into)):
                accumulator.add(
                    inspection.defect_map[i],
                    np.isin(target, REJECT),
                    valid=target >= 0,
                    class_map=target,
                )
    for group in into:
        group.extend(scored)
    return scored


def check_entry(entry: dict, val: Scored, test: Scored) -> None:
    config = load_inspection_config()
    inspection = entry["inspection"]
    val_scores, val_truth = val.labelled_arrays()
    choice = choose_threshold(val_scores, val_truth, config.target_recall, config.min_score)
    assert inspection["threshold"] == pytest.approx(choice.threshold)
    assert inspection["threshold_choice"]["reached"] == choice.reached
    assert inspection["threshold_choice"]["recall"] == choice.recall

    scores, truth = test.labelled_arrays()
    recall, frr = recall_and_frr(scores >= choice.threshold, truth)
    assert (inspection["recall"], inspection["frr"]) == (recall, frr)
    assert (inspection["n_defective"], inspection["n_good"]) == (truth.sum(), (~truth).sum())
    assert inspection["image_auroc"] == pytest.approx(roc_auc(truth, scores))
    assert inspection["image_ap"] == pytest.approx(average_precision(truth, scores))
    f1, f1_threshold = f1_max(truth, scores)
    assert inspection["f1_max_oracle"] == {
        "f1": pytest.approx(f1),
        "threshold": pytest.approx(f1_threshold),
        "note": F1_ORACLE_NOTE,
    }
    assert inspection["pixel_auroc"] == pytest.approx(test.pixels.pixel_auroc())
    assert inspection["aupro"] == pytest.approx(test.pixels.aupro(0.3))
    for figure in ("recall", "frr", "image_auroc"):
        interval = inspection["intervals"][figure]
        if interval["p05"] is not None:
            assert interval["p05"] <= interval["p50"] <= interval["p95"], figure

    # Per defect class, keyed by the model card's class names.
    assert set(inspection["per_class"]) == {"scratch", "dent"}
    labelled = np.asarray(test.labelled)
    classes = [c for c, keep in zip(test.classes, labelled, strict=True) if keep]
    image = per_class_image_figures(scores, classes, REJECT)
    pixel = test.pixels.per_class(0.3)
    for class_id, name in ((2, "scratch"), (3, "dent")):
        figures = inspection["per_class"][name]
        positive = np.array([class_id in c for c in classes])
        assert figures["class_id"] == class_id
        assert figures["n_images"] == positive.sum()
        assert figures["recall"] == pytest.approx((scores[positive] >= choice.threshold).mean())
        assert figures["image_auroc"] == pytest.approx(image[class_id]["auroc"])
        assert figures["image_ap"] == pytest.approx(image[class_id]["ap"])
        assert figures["pixel_auroc"] == pytest.approx(pixel[class_id]["pixel_auroc"])
        assert figures["aupro"] == pytest.approx(pixel[class_id]["aupro"])
        assert figures["n_regions"] == pixel[class_id]["n_regions"]


def test_figures_equal_detection_metrics_on_the_same_predictions(
    evaluation: dict, model_dir: Path, dataset_root: Path
) -> None:
    assert validation_problems(evaluation, "evaluation") == []
    assert evaluation["schema_version"] == 2
    settings = evaluation["metric_settings"]
    assert settings["reject_classes"] == list(REJECT)
    assert settings["reject_class_names"] == ["scratch", "dent"]
    assert settings["score_definition"] == "model" and settings["score_window_px"] == 3
    assert settings["aupro_max_fpr"] == 0.3

    predictor = Predictor.from_folder(model_dir)
    dataset = LineDataset(dataset_root)
    pooled = {"val": Scored(), "test": Scored()}
    by_line = {}
    for line in ("press-a", "press-b"):
        by_line[line] = {
            split: score_by_hand(predictor, dataset, line, split, [pooled[split]])
            for split in ("val", "test")
        }
        check_entry(evaluation["per_line"][line], by_line[line]["val"], by_line[line]["test"])
    check_entry(evaluation["overall"], pooled["val"], pooled["test"])

    # The bootstrap pairs of the ROI step are the line's decisions at its threshold.
    replicates = evaluation["bootstrap"]["replicates"]["press-a"]
    assert len(replicates["recall"]) == len(replicates["frr"]) == B
    intervals = evaluation["per_line"]["press-a"]["inspection"]["intervals"]
    finite = [r for r in replicates["recall"] if r is not None]
    assert intervals["recall"]["p05"] == pytest.approx(np.percentile(finite, 5))


def test_part_verdicts_where_the_images_carry_part_ids(evaluation: dict) -> None:
    # press-a test: parts pa-0 .. pa-4 of two images each; defective images 0, 2, 3, 8, so
    # parts pa-0, pa-1, pa-4 are defective and pa-2, pa-3 good. press-b has no part ids.
    parts = evaluation["per_line"]["press-a"]["inspection"]["parts"]
    assert (parts["n_parts"], parts["n_defective"], parts["n_good"]) == (5, 3, 2)
    assert evaluation["per_line"]["press-b"]["inspection"]["parts"] is None
    # Overall: press-a's 5 parts plus press-b's 7 images as parts of their own; the unlabelled
    # one counts in neither rate.
    overall = evaluation["overall"]["inspection"]["parts"]
    assert (overall["n_parts"], overall["n_defective"], overall["n_good"]) == (12, 6, 5)


def test_part_recall_and_frr_use_the_max_score_of_the_part(
    evaluation: dict, model_dir: Path, dataset_root: Path
) -> None:
    predictor = Predictor.from_folder(model_dir)
    test = score_by_hand(predictor, LineDataset(dataset_root), "press-a", "test", [])
    inspection = evaluation["per_line"]["press-a"]["inspection"]
    threshold = inspection["threshold"]
    parts: dict[str, list[int]] = {}
    for index, part in enumerate(test.parts):
        parts.setdefault(part, []).append(index)
    scores = np.asarray(test.scores)
    defective = np.asarray(test.defective)
    rejected = np.array([scores[m].max() >= threshold for m in parts.values()])
    truth = np.array([defective[m].any() for m in parts.values()])
    recall, frr = recall_and_frr(rejected, truth)
    assert (inspection["parts"]["recall"], inspection["parts"]["frr"]) == (recall, frr)


def test_warnings_when_val_has_no_defective_image(evaluation: dict) -> None:
    press_b = evaluation["per_line"]["press-b"]["inspection"]
    assert not press_b["threshold_choice"]["reached"]
    assert press_b["threshold_choice"]["n_defective"] == 0
    assert press_b["threshold"] == load_inspection_config().min_score
    expected = (
        "line press-b: val has no defective image (3 good): no threshold can be chosen for "
        "the target recall 0.95; the operating threshold falls back to min_score 0.05"
    )
    assert expected in evaluation["warnings"]
    assert all(
        w.startswith(("line press-a: ", "line press-b: ", "overall: "))
        for w in evaluation["warnings"]
    )


def test_a_model_that_scores_nothing_is_warned_about(dataset_root: Path, tmp_path: Path) -> None:
    blind = save_semseg_model(tmp_path / "blind", blind=True)
    result = run(
        str(blind),
        str(dataset_root),
        str(tmp_path / "out"),
        batch_size=BATCH,
        bootstrap_n=5,
        latency_repeats=1,
        explain=False,
    )
    assert validation_problems(json.loads(json.dumps(result)), "evaluation") == []
    press_a = result["per_line"]["press-a"]["inspection"]
    assert press_a["threshold_choice"] == {
        "split": "val",
        "reached": False,
        "recall": 0.0,
        "n_defective": 2,
        "n_good": 3,
        "reason": press_a["threshold_choice"]["reason"],
    }
    assert press_a["threshold"] == 0.05 and press_a["recall"] == 0.0
    warning = (
        "line press-a: val cannot reach the target recall 0.95: it reaches 0.000 at the "
        "smallest threshold considered, because 2 of its 2 defective image(s) score below "
        "min_score 0.05"
    )
    assert any(w.startswith(warning) for w in result["warnings"]), result["warnings"]
    # The pooled val of both lines misses it too.
    assert any(
        w.startswith("overall: val cannot reach the target recall 0.95") for w in result["warnings"]
    )
    assert press_a["warnings"][0].startswith(warning.removeprefix("line press-a: "))


def test_pixel_figures_over_the_limit_are_null_with_a_warning(
    model_dir: Path, dataset_root: Path, tmp_path: Path
) -> None:
    result = run(
        str(model_dir),
        str(dataset_root),
        str(tmp_path / "out"),
        batch_size=BATCH,
        bootstrap_n=5,
        latency_repeats=1,
        explain=False,
        max_pixels=3 * SIZE * SIZE,
    )
    press_a = result["per_line"]["press-a"]["inspection"]
    assert press_a["pixel_auroc"] is None and press_a["aupro"] is None
    assert press_a["per_class"]["scratch"]["n_regions"] is None
    assert press_a["image_auroc"] is not None  # image figures are unaffected
    assert any(
        w.startswith("line press-a: pixel AUROC / AUPRO not computed") and "max_pixels=" in w
        for w in result["warnings"]
    )
