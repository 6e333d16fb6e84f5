"""Detection figures against scikit-learn on tied data and AUPRO against a hand-worked example."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from cta_model.detection_metrics import (
    PixelDetectionAccumulator,
    PixelLimitExceeded,
    average_precision,
    f1_max,
    per_class_image_figures,
    recall_at_frr,
    resampled_roc_auc,
    roc_auc,
)
from cta_model.inspection import bootstrap_indices

pytestmark = pytest.mark.unit

SEEDS = [0, 1, 2, 3]


def tied_data(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores rounded to one decimal: many ties, within and across the classes."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = np.round(rng.random(n) + 0.4 * labels, 1)
    return labels, scores


# --- image-level figures against scikit-learn ------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_roc_auc_matches_sklearn_with_ties(seed):
    labels, scores = tied_data(seed)
    assert np.unique(scores).size < scores.size / 10  # the data really is tied
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_average_precision_matches_sklearn_with_ties(seed):
    labels, scores = tied_data(seed)
    expected = average_precision_score(labels, scores)
    assert average_precision(labels, scores) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_f1_max_matches_the_best_f1_of_sklearns_precision_recall_curve(seed):
    labels, scores = tied_data(seed)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    with np.errstate(invalid="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best_f1 = f1.max()
    # Ties in F1 go to the highest threshold (fewest rejects).
    best_threshold = thresholds[np.isclose(f1, best_f1, rtol=0, atol=1e-12)].max()
    f1_value, threshold = f1_max(labels, scores)
    assert f1_value == pytest.approx(best_f1, abs=1e-12)
    assert threshold == best_threshold


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("max_frr", [0.0, 0.05, 0.1, 0.3, 1.0])
def test_recall_at_frr_is_the_best_sklearn_roc_point_within_the_bound(seed, max_frr):
    labels, scores = tied_data(seed)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    allowed = fpr <= max_frr
    best_recall = tpr[allowed].max()
    recall, threshold = recall_at_frr(labels, scores, max_frr)
    assert recall == pytest.approx(best_recall, abs=1e-12)
    if best_recall == 0:
        assert threshold > scores.max()
    else:  # the highest threshold reaching that recall
        assert threshold == thresholds[allowed & (tpr == best_recall)].max()
    rejected = scores >= threshold
    assert rejected[~labels].mean() <= max_frr


def test_recall_at_frr_rejects_nothing_when_the_top_score_is_a_good_part():
    recall, threshold = recall_at_frr([0, 1, 0], [0.9, 0.5, 0.1], max_frr=0.0)
    assert recall == 0.0
    assert threshold > 0.9


def test_figures_are_plain_python_floats_or_none():
    labels, scores = tied_data(0)
    values = [
        roc_auc(labels, scores),
        average_precision(labels, scores),
        *f1_max(labels, scores),
        *recall_at_frr(labels, scores, 0.05),
    ]
    assert all(type(value) is float for value in values)
    assert roc_auc([1, 1], [0.2, 0.3]) is None
    assert roc_auc([0, 0], [0.2, 0.3]) is None
    assert average_precision([0, 0], [0.2, 0.3]) is None
    assert average_precision([1, 1], [0.2, 0.3]) == 1.0
    assert f1_max([0, 0], [0.2, 0.3]) is None
    assert recall_at_frr([1, 1], [0.2, 0.3], 0.05) is None


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1], [0.1, float("nan")], "scores must be finite"),
        ([0, 1], [0.1, float("inf")], "scores must be finite"),
        ([0, 2], [0.1, 0.2], "labels must be bool or 0/1"),
        ([0, 1, 1], [0.1, 0.2], "same length"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_bad_inputs_name_the_argument(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        roc_auc(labels, scores)


def test_recall_at_frr_refuses_a_bound_outside_0_1():
    with pytest.raises(ValueError, match="max_frr"):
        recall_at_frr([0, 1], [0.1, 0.2], 1.5)


# --- image figures per class and bootstrap ---------------------------------------------------


def test_per_class_image_figures_leave_out_images_of_other_defect_classes():
    rng = np.random.default_rng(5)
    reject = (5, 6)
    classes = [rng.choice([{0}, {0, 1}, {0, 5}, {0, 6}, {0, 5, 6}]) for _ in range(60)]
    scores = np.round(rng.random(60), 1)
    figures = per_class_image_figures(scores, classes, reject)
    assert set(figures) == {5, 6}
    good = np.array([not (c & set(reject)) for c in classes])
    for class_id in reject:
        positive = np.array([class_id in c for c in classes])
        keep = positive | good
        assert figures[class_id]["n_positive"] == int(positive.sum())
        assert figures[class_id]["auroc"] == pytest.approx(
            roc_auc_score(positive[keep], scores[keep]), abs=1e-12
        )
        assert figures[class_id]["ap"] == pytest.approx(
            average_precision_score(positive[keep], scores[keep]), abs=1e-12
        )


def test_per_class_image_figures_without_a_positive_image_are_none():
    figures = per_class_image_figures([0.1, 0.9], [{0}, {5}], [5, 7])
    assert figures[5] == {"auroc": 1.0, "ap": 1.0, "n_positive": 1}
    assert figures[7] == {"auroc": None, "ap": None, "n_positive": 0}


def test_resampled_roc_auc_scores_each_resample_and_marks_single_class_ones_nan():
    labels = np.array([0, 0, 0, 1, 1, 0])
    scores = np.array([0.1, 0.4, 0.4, 0.4, 0.8, 0.3])
    indices = bootstrap_indices(labels.size, 300, np.random.default_rng(0))
    replicates = resampled_roc_auc(labels, scores, indices)
    assert replicates.shape == (300,)
    single_class = np.array([labels[row].all() or not labels[row].any() for row in indices])
    assert single_class.any() and not single_class.all()
    assert np.isnan(replicates[single_class]).all()
    for row, value in zip(indices[~single_class], replicates[~single_class], strict=True):
        assert value == pytest.approx(roc_auc_score(labels[row], scores[row]), abs=1e-12)


def test_resampled_roc_auc_refuses_indices_out_of_range():
    with pytest.raises(ValueError, match="indices"):
        resampled_roc_auc([0, 1], [0.1, 0.2], np.array([[0, 2]]))


# --- AUPRO: the worked example ---------------------------------------------------------------

# Two 4x4 images. Image A is good. Image B has two 8-connected defect regions:
#   r1 = {(0,0)} (1 pixel) and r2 = {(2,2), (2,3), (3,3)} (3 pixels; (2,2)-(3,3) touch at a
#   corner, (2,3) shares an edge with both), so R = 2 and each r2 pixel adds 1/(2*3) = 1/6 to
#   PRO, the r1 pixel 1/(2*1) = 1/2. Defect-free pixels: 16 + 12 = 28 = N.
# Scores (distinct values 0.9, 0.8, 0.6, 0.5, 0.1):
#   r1: 0.9.  r2: 0.8, 0.5, 0.5.
#   negatives at 0.8: 2 (A); at 0.6: 2 (A) + 2 (B); at 0.5: 2 (A) + 2 (B); the other 18 at 0.1.
# Curve, one point per distinct score (ties merged: the point after every pixel at that score):
#   start          FPR 0             PRO 0
#   t = 0.9        FPR 0             PRO 1/2
#   t = 0.8        FPR 2/28 = 1/14   PRO 1/2 + 1/6 = 2/3
#   t = 0.6        FPR 6/28 = 3/14   PRO 2/3
#   t = 0.5        FPR 10/28 = 5/14  PRO 2/3 + 2/6 = 1
#   t = 0.1        FPR 28/28 = 1     PRO 1
# FPR 0.3 falls between 3/14 and 5/14: slope (1 - 2/3) / (2/14) = 7/3, and
#   0.3 - 3/14 = 21/70 - 15/70 = 3/35, so PRO(0.3) = 2/3 + 7/3 * 3/35 = 2/3 + 1/5 = 13/15.
# Trapezoids up to 0.3:
#   (0,0)->(0,1/2)            width 0                         0
#   (0,1/2)->(1/14,2/3)       1/14 * (1/2 + 2/3) / 2        = 1/24
#   (1/14,2/3)->(3/14,2/3)    2/14 * 2/3                    = 2/21
#   (3/14,2/3)->(0.3,13/15)   3/35 * (2/3 + 13/15) / 2      = 3/35 * 23/30 = 23/350
#   sum = 175/4200 + 400/4200 + 276/4200 = 851/4200; divided by 0.3: 851/1260.
WORKED_AUPRO = 851 / 1260
WORKED_FPR = [0, 0, 1 / 14, 3 / 14, 5 / 14, 1]
WORKED_PRO = [0, 1 / 2, 2 / 3, 2 / 3, 1, 1]


def worked_example() -> list[tuple[np.ndarray, np.ndarray]]:
    good_scores = np.full((4, 4), 0.1)
    good_scores[0, :2] = 0.8
    good_scores[1, :2] = 0.6
    good_scores[2, :2] = 0.5
    defect = np.zeros((4, 4), dtype=bool)
    defect[0, 0] = defect[2, 2] = defect[2, 3] = defect[3, 3] = True
    scores = np.full((4, 4), 0.1)
    scores[0, 0] = 0.9
    scores[2, 2] = 0.8
    scores[2, 3] = scores[3, 3] = 0.5
    scores[1, :2] = 0.6
    scores[3, :2] = 0.5
    return [(good_scores, np.zeros((4, 4), dtype=bool)), (scores, defect)]


def accumulate(images, **kwargs) -> PixelDetectionAccumulator:
    accumulator = PixelDetectionAccumulator()
    for image in images:
        accumulator.add(*image, **kwargs)
    return accumulator


def test_aupro_of_the_worked_example():
    accumulator = accumulate(worked_example())
    fpr, pro = accumulator.pro_curve()
    np.testing.assert_allclose(fpr, WORKED_FPR, rtol=0, atol=1e-12)
    np.testing.assert_allclose(pro, WORKED_PRO, rtol=0, atol=1e-12)
    assert accumulator.aupro(max_fpr=0.3) == pytest.approx(WORKED_AUPRO, abs=1e-12)
    assert type(accumulator.aupro()) is float


def test_aupro_does_not_depend_on_the_order_of_images():
    images = worked_example()
    rng = np.random.default_rng(1)
    scores = np.round(rng.random((3, 8, 8)), 1)
    masks = rng.random((3, 8, 8)) < 0.2
    images += list(zip(scores, masks, strict=True))
    expected = accumulate(images).aupro()
    for permutation in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        shuffled = [images[i] for i in permutation]
        assert accumulate(shuffled).aupro() == pytest.approx(expected, abs=1e-12)


def test_a_perfect_map_scores_1_an_inverted_one_0():
    _, defect = worked_example()[1]
    good = np.zeros((4, 4), dtype=bool)
    perfect = accumulate([(defect.astype(float), defect), (np.zeros((4, 4)), good)])
    inverted = accumulate([((~defect).astype(float), defect), (np.ones((4, 4)), good)])
    assert perfect.aupro() == 1.0
    assert perfect.pixel_auroc() == 1.0
    assert inverted.aupro() == 0.0
    assert inverted.pixel_auroc() == 0.0


def test_ties_are_one_point_a_constant_map_gives_the_diagonal():
    # One point (1, 1) after (0, 0): PRO = FPR, area to 0.3 = 0.3**2 / 2 = 0.045, / 0.3 = 0.15
    # (the figure of a detector that knows nothing); pixel AUROC 0.5.
    images = [(np.full((4, 4), 0.5), mask) for _, mask in worked_example()]
    accumulator = accumulate(images)
    fpr, pro = accumulator.pro_curve()
    np.testing.assert_array_equal(fpr, [0.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 1.0], rtol=0, atol=1e-12)
    assert accumulator.aupro(max_fpr=0.3) == pytest.approx(0.045 / 0.3, abs=1e-12)
    assert accumulator.pixel_auroc() == 0.5


def test_regions_are_8_connected():
    # {(0,0), (1,1)} touch at a corner: ONE region, half caught at the top score, and {(3,3)}
    # a second one. PRO at t = 1 is (1/2 + 0) / 2 = 1/4 (with 4-connectivity it would be
    # (1 + 0 + 0) / 3 = 1/3); the negatives all score 0.5 and the rest of the defect 0.
    defect = np.zeros((4, 4), dtype=bool)
    defect[0, 0] = defect[1, 1] = defect[3, 3] = True
    scores = np.full((4, 4), 0.5)
    scores[0, 0] = 1.0
    scores[1, 1] = scores[3, 3] = 0.0
    accumulator = accumulate([(scores, defect)])
    fpr, pro = accumulator.pro_curve()
    np.testing.assert_allclose(fpr, [0, 0, 1, 1], atol=1e-12)
    np.testing.assert_allclose(pro, [0, 1 / 4, 1 / 4, 1], atol=1e-12)
    assert accumulator.aupro(max_fpr=1.0) == pytest.approx(1 / 4, abs=1e-12)


def test_the_fpr_counts_every_defect_free_pixel_of_good_images():
    # Adding a good image whose pixels all score above the defect moves the whole curve right.
    scores, defect = worked_example()[1]
    alone = accumulate([(scores, defect)]).aupro(max_fpr=1.0)
    with_good = accumulate([(scores, defect), (np.ones((4, 4)), np.zeros((4, 4), bool))])
    assert with_good.aupro(max_fpr=1.0) < alone


def threshold_by_threshold_aupro(images, max_fpr: float) -> float:
    """The definition read literally: regions, then FPR and PRO at every distinct score, then
    the area segment by segment, the segment crossing ``max_fpr`` cut there."""
    regions, negatives = [], []
    for scores, defect, valid in images:
        labelled, n_regions = ndimage.label(defect, structure=np.ones((3, 3)))
        for region_id in range(1, n_regions + 1):
            pixels = (labelled == region_id) & valid
            if pixels.any():
                regions.append(scores[pixels])
        negatives.append(scores[valid & ~defect])
    negatives = np.concatenate(negatives)
    thresholds = np.unique(np.concatenate([negatives, *regions]))[::-1]
    fpr = [0.0] + [float((negatives >= t).mean()) for t in thresholds]
    pro = [0.0] + [float(np.mean([(r >= t).mean() for r in regions])) for t in thresholds]
    area = 0.0
    for i in range(len(fpr) - 1):
        (x0, y0), (x1, y1) = (fpr[i], pro[i]), (fpr[i + 1], pro[i + 1])
        if x0 >= max_fpr or x1 == x0:
            continue
        x_end = min(x1, max_fpr)
        y_end = y0 + (y1 - y0) * (x_end - x0) / (x1 - x0)
        area += (x_end - x0) * (y0 + y_end) / 2
    return area / max_fpr


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_fpr", [0.05, 0.3, 1.0])
def test_aupro_equals_the_threshold_by_threshold_definition(seed, max_fpr):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(4):
        defect = ndimage.binary_dilation(rng.random((16, 16)) < 0.03, iterations=1)
        scores = np.round(rng.random((16, 16)) + 0.3 * defect, 1).astype(np.float32)
        valid = rng.random((16, 16)) < 0.9
        images.append((scores, defect, valid))
    good_scores = np.round(rng.random((16, 16)), 1).astype(np.float32)
    images.append((good_scores, np.zeros((16, 16), bool), np.ones((16, 16), bool)))
    expected = threshold_by_threshold_aupro(images, max_fpr)
    accumulator = accumulate(images)
    assert accumulator.aupro(max_fpr) == pytest.approx(expected, abs=1e-12)
    # both pooled figures from one pass give what the one-at-a-time calls give
    assert accumulator.pooled_figures(max_fpr) == {
        "pixel_auroc": accumulator.pixel_auroc(),
        "aupro": accumulator.aupro(max_fpr),
    }


def test_pixel_auroc_matches_sklearn_over_the_valid_pixels():
    rng = np.random.default_rng(3)
    accumulator = PixelDetectionAccumulator()
    all_scores, all_labels = [], []
    for _ in range(5):
        scores = np.round(rng.random((12, 10)), 2).astype(np.float32)
        defect = rng.random((12, 10)) < 0.15
        valid = rng.random((12, 10)) < 0.9
        scores[~valid] = np.nan  # invalid pixels may hold anything
        accumulator.add(scores, defect, valid)
        all_scores.append(scores[valid])
        all_labels.append(defect[valid])
    expected = roc_auc_score(np.concatenate(all_labels), np.concatenate(all_scores))
    assert accumulator.pixel_auroc() == pytest.approx(expected, abs=1e-12)
    assert accumulator.n_images == 5
    assert accumulator.n_pixels == sum(s.size for s in all_scores)


# --- per defect class ------------------------------------------------------------------------


def random_classified_images(seed: int, n_images: int = 6):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n_images):
        scores = np.round(rng.random((10, 10)), 1)
        class_map = rng.choice([0, 1, 5, 6], size=(10, 10), p=[0.6, 0.2, 0.1, 0.1])
        defect = np.isin(class_map, (5, 6))
        valid = rng.random((10, 10)) < 0.95
        images.append((scores, defect, valid, class_map))
    return images


@pytest.mark.parametrize("seed", [0, 1])
def test_per_class_figures_leave_out_pixels_of_other_defect_classes(seed):
    images = random_classified_images(seed)
    accumulator = PixelDetectionAccumulator()
    for scores, defect, valid, class_map in images:
        accumulator.add(scores, defect, valid, class_map)
    figures = accumulator.per_class()
    assert set(figures) == {5, 6}
    for class_id in (5, 6):
        # The same figure, pooled, over images where other defect classes are invalid.
        reference = PixelDetectionAccumulator()
        labels, values = [], []
        for scores, defect, valid, class_map in images:
            of_class = defect & (class_map == class_id)
            kept = valid & ~(defect & ~of_class)
            reference.add(scores, of_class, kept)
            labels.append(of_class[kept])
            values.append(scores[kept])
        expected_auroc = roc_auc_score(np.concatenate(labels), np.concatenate(values))
        assert figures[class_id]["pixel_auroc"] == pytest.approx(expected_auroc, abs=1e-12)
        assert figures[class_id]["aupro"] == pytest.approx(reference.aupro(), abs=1e-12)
        assert figures[class_id]["n_regions"] > 0


def test_per_class_regions_are_of_that_class_pooled_regions_of_the_whole_mask():
    # Class 5 at (0,0) touches class 6 at (0,1)-(0,3): pooled, one region of 4 pixels; per
    # class, two regions. Only the class-5 pixel scores above the negatives (0.5).
    class_map = np.zeros((4, 4), dtype=np.int64)
    class_map[0, 0] = 5
    class_map[0, 1:] = 6
    defect = class_map > 0
    scores = np.full((4, 4), 0.5)
    scores[0, 0] = 1.0
    scores[0, 1:] = 0.0
    accumulator = accumulate([(scores, defect)], class_map=class_map)
    # Pooled: PRO = 1/4 from FPR 0 to 1, then the jump to 1 at FPR 1.
    assert accumulator.aupro(max_fpr=1.0) == pytest.approx(1 / 4, abs=1e-12)
    figures = accumulator.per_class(max_fpr=1.0)
    assert figures[5] == {"pixel_auroc": 1.0, "aupro": 1.0, "n_regions": 1}
    assert figures[6] == {"pixel_auroc": 0.0, "aupro": 0.0, "n_regions": 1}


def test_per_class_needs_a_class_map_for_images_with_defects():
    accumulator = accumulate(worked_example())
    with pytest.raises(ValueError, match="class_map"):
        accumulator.per_class()
    # Good images need none.
    good_only = accumulate([(np.zeros((4, 4)), np.zeros((4, 4), bool))])
    assert good_only.per_class() == {}


# --- pixel input checks and the memory guard -------------------------------------------------


def test_without_defects_or_without_good_pixels_the_pixel_figures_are_none():
    good_only = accumulate([(np.zeros((4, 4)), np.zeros((4, 4), bool))])
    assert good_only.pixel_auroc() is None
    assert good_only.aupro() is None
    defect_only = accumulate([(np.zeros((4, 4)), np.ones((4, 4), bool))])
    assert defect_only.pixel_auroc() is None
    assert defect_only.aupro() is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"score_map": np.full((4, 4), np.nan)}, "score_map of image #0 has NaN"),
        ({"score_map": np.zeros(4)}, "score_map must be 2-D"),
        ({"defect_mask": np.zeros((4, 5), bool)}, "defect_mask must have the shape"),
        ({"valid": np.full((4, 4), 2)}, "valid must be bool or 0/1"),
        ({"class_map": np.zeros((4, 4))}, "class_map must be integer"),
        ({"class_map": np.full((4, 4), -1)}, "negative class ids"),
    ],
)
def test_pixel_inputs_are_checked(kwargs, message):
    arguments = {"score_map": np.zeros((4, 4)), "defect_mask": np.eye(4, dtype=bool)}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        PixelDetectionAccumulator().add(**arguments)


def test_max_pixels_stops_before_memory_runs_out():
    accumulator = PixelDetectionAccumulator(max_pixels=20)
    scores, defect = worked_example()[1]
    accumulator.add(scores, defect)
    with pytest.raises(PixelLimitExceeded, match=r"pixel AUROC / AUPRO.*max_pixels=20"):
        accumulator.add(scores, defect)
    assert accumulator.n_pixels == 16
    assert accumulator.n_images == 1


def test_aupro_refuses_a_max_fpr_outside_0_1():
    with pytest.raises(ValueError, match="max_fpr"):
        accumulate(worked_example()).aupro(max_fpr=0.0)
