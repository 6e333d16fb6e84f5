"""The deep evaluation: inspection figures, bootstrap, robustness, dimensions, latency, explain,
and (against the session's `mlflow server`) Delta_m vs STL baselines and vs the champion."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from components.artifacts import read_json, validation_problems
from components.evaluate.inspection import (
    Resamples,
    ThresholdOnVal,
    bootstrap_replicates,
    choose_line_threshold,
    compare_with_champion,
    inspection_figures,
    line_resamples,
    resamples_of,
)
from components.evaluate.scoring import LineScores, boundary_mask, dimension_errors
from components.evaluate.step import DELTA_M_NO_BASELINES, EVALUATION_NAME, run
from components.register_model.step import run as register
from components.train.logged_model import log_model_folder
from cta_model.data.line_dataset import MANIFEST_NAME, sha256_hex
from cta_model.data.synthetic_dataset import generate_dataset
from cta_model.inspection import InspectionConfig, ThresholdChoice, pr_curve, recall_and_frr
from cta_model.model_folder import save_model_folder
from cta_model.nn.models import ModelSpec, build_model
from cta_model.tasks import get_task

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_mlflow_globals")]

B = 50
CONFIG = InspectionConfig(reject_classes=(5, 6, 7, 8), target_recall=0.75, min_score=0.2)


def _scores(scores: list[float], defective: list[bool], labelled: list[bool] | None = None):
    return LineScores(
        sample_ids=[f"s{i}" for i in range(len(scores))],
        part_ids=[None] * len(scores),
        score=scores,
        defective=defective,
        labelled=labelled if labelled is not None else [True] * len(scores),
        defect_classes=[(5,) if bad else () for bad in defective],
    )


def _figures(test: LineScores, threshold: float) -> dict | None:
    """inspection_figures at a given operating threshold (as if chosen on val)."""
    on_val = ThresholdOnVal(ThresholdChoice(threshold, True, 1.0), 1, 1, 0)
    return inspection_figures(
        test, on_val, CONFIG, {5: "scratch"}, resamples_of(test, B, 0, "press-a")
    )


# --- hand-made cases ---------------------------------------------------------------------------


def test_recall_frr_and_pr_curve_on_a_hand_made_case() -> None:
    # 4 defective parts with scores 0, 0.3, 0.5, 0.9; 4 good ones with 0, 0, 0.2, 0.6.
    test = _scores([0, 0.3, 0.5, 0.9, 0, 0, 0.2, 0.6], [True] * 4 + [False] * 4)
    figures = _figures(test, 0.3)
    assert figures["threshold"] == 0.3
    assert figures["recall"] == 0.75  # 0.3, 0.5, 0.9 >= 0.3
    assert figures["frr"] == 0.25  # only the good part with 0.6
    assert (figures["n_defective"], figures["n_good"]) == (4, 4)
    curve = figures["pr_curve"]
    assert curve["threshold"] == [0.0, 0.2, 0.3, 0.5, 0.6, 0.9]
    assert curve["recall"] == [1.0, 0.75, 0.75, 0.5, 0.25, 0.25]
    assert curve["frr"] == [1.0, 0.5, 0.25, 0.25, 0.25, 0.0]
    assert curve["precision"] == [0.5, 0.6, 0.75, 2 / 3, 0.5, 1.0]
    # Unlabelled parts count in neither rate; nothing labelled: no figures at all.
    assert _figures(_scores([0.9, 0.9], [True, False], [False, False]), 0.3) is None
    nothing_predicted = pr_curve(np.array([0, 0]), np.array([True, False]), np.array([5]))
    assert nothing_predicted["precision"] == [None] and nothing_predicted["recall"] == [0.0]


@pytest.mark.parametrize("seed", range(5))
def test_threshold_chosen_on_val_reaches_the_target_recall_on_val(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 40, size=30) / 40
    defective = rng.random(30) < 0.5
    val = _scores(scores.tolist(), defective.tolist())
    threshold = choose_line_threshold(val, CONFIG).threshold
    recall, _ = recall_and_frr(scores >= threshold, defective)
    assert threshold >= CONFIG.min_score
    assert recall >= CONFIG.target_recall or threshold == CONFIG.min_score
    # The largest such threshold: the next higher score misses the target.
    higher, _ = recall_and_frr(scores > threshold, defective)
    assert higher < CONFIG.target_recall
    assert choose_line_threshold(None, CONFIG).threshold == CONFIG.min_score


def test_bootstrap_replicates_are_paired_and_reproducible() -> None:
    test = _scores([0, 0.3, 0.5, 0.9, 0, 0, 0.2, 0.6], [True] * 4 + [False] * 4)
    resamples = line_resamples(test.n_images, B, seed=0, line_id="press-a")
    assert resamples.shape == (B, 8)
    assert np.array_equal(resamples, line_resamples(8, B, seed=0, line_id="press-a"))
    assert not np.array_equal(resamples, line_resamples(8, B, seed=1, line_id="press-a"))
    assert not np.array_equal(resamples, line_resamples(8, B, seed=0, line_id="press-b"))
    replicates = bootstrap_replicates(test, 0.3, resamples)
    assert len(replicates["recall"]) == len(replicates["frr"]) == B
    # Pairing: replicate k of both is the resample k, recomputed by hand.
    score, defective, good = test.arrays()
    for k in (0, 17, B - 1):
        rows = resamples[k]
        rejects = score[rows] >= 0.3
        bad, ok = defective[rows], good[rows]
        expected_recall = (rejects & bad).sum() / bad.sum() if bad.any() else None
        expected_frr = (rejects & ok).sum() / ok.sum() if ok.any() else None
        assert replicates["recall"][k] == pytest.approx(expected_recall)
        assert replicates["frr"][k] == pytest.approx(expected_frr)


def test_champion_comparison_by_hand_and_where_it_has_no_number() -> None:
    nan = float("nan")

    def line(ids, score, labelled, miou):
        # No image has a height label (NaN per image) and no labelled part is defective.
        return LineScores(
            sample_ids=ids,
            score=score,
            defective=[False] * len(ids),
            labelled=labelled,
            per_image={"semseg": miou, "height": [nan] * len(ids)},
        )

    candidate = {
        "a": line(["a0", "a1", "a2"], [0, 0.5, 0], [True, True, False], [0.5, 0.7, nan]),
        "b": line(["b0", "b1"], [0, 0.4], [True, True], [0.4, 0.6]),
    }
    champion = {
        "a": line(["a0", "a1", "a2"], [0.5, 0.5, 0.5], [True, True, False], [0.4, 0.7, nan]),
        "b": line(["b0", "b1"], [0, 0], [True, True], [0.5, 0.2]),
    }
    # Replicate 0: every image once; replicate 1: a0 three times, b1 twice. The image AUROC
    # resamples the labelled images (a0, a1; b0, b1).
    resamples = {
        "a": Resamples(np.array([[0, 1, 2], [0, 0, 0]]), np.array([[0, 1], [0, 0]])),
        "b": Resamples(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [1, 1]])),
    }
    comparison = compare_with_champion(
        candidate,
        champion,
        {"semseg.miou": 0.55, "height.abs_err_mm": None},
        {"semseg.miou": 0.45, "height.abs_err_mm": None},
        {"a": 0.3, "b": 0.3},
        {"a": 0.3, "b": 0.3},
        resamples,
    )
    semseg = comparison["metrics"]["semseg"]
    assert semseg["metric"] == "miou" and (semseg["candidate"], semseg["champion"]) == (0.55, 0.45)
    assert semseg["diff_higher_better"] == pytest.approx(0.1)
    # Per-image differences a: 0.1, 0, unscored; b: -0.1, 0.4. Replicate means: 0.1, 0.22.
    assert [semseg["p05"], semseg["p50"], semseg["p95"]] == pytest.approx([0.106, 0.16, 0.214])
    # No image has a height label: no overall value to subtract, no replicate to average.
    assert comparison["metrics"]["height"] == {
        "metric": "abs_err_mm",
        "candidate": None,
        "champion": None,
        "diff_higher_better": None,
        "p05": None,
        "p50": None,
        "p95": None,
    }
    # No defective part: recall is undefined in every replicate. False-reject rates (good
    # parts a0, a1, b0, b1; a2 is unlabelled): replicate 0 both 2/4; replicate 1 candidate
    # 2/5 (b1 twice), champion 3/5 (a0 three times): champion - candidate = 0, 0.2.
    assert comparison["inspection"]["recall"] == {"p05": None, "p50": None, "p95": None}
    # No defective part: no AUROC either.
    assert comparison["inspection"]["image_auroc"] == {"p05": None, "p50": None, "p95": None}
    frr = comparison["inspection"]["frr"]
    assert [frr["p05"], frr["p50"], frr["p95"]] == pytest.approx([0.01, 0.1, 0.19])


def test_boundary_mask_and_dimension_errors_by_hand() -> None:
    import torch

    labels = torch.zeros((1, 6, 6), dtype=torch.int64)
    labels[0, :, 3:] = 1
    mask = boundary_mask(labels, 1)[0]
    assert mask[:, 2:4].all() and not mask[:, :2].any() and not mask[:, 4:].any()

    reference = np.zeros((4, 4), dtype=np.float32)
    predicted = np.full((4, 4), 0.1, dtype=np.float32)
    feature = {"x0": 0, "y0": 0, "x1": 2, "y1": 2, "actual_mm": 3.0, "nominal_mm": 3.0}
    errors = dimension_errors(
        predicted,
        reference,
        [
            {**feature, "tolerance_mm": 0.2, "in_tolerance": True},  # 3.1: still in tolerance
            {**feature, "tolerance_mm": 0.05, "in_tolerance": True},  # 3.1: now out
        ],
    )
    assert [e for e, _ in errors] == pytest.approx([0.1, 0.1])
    assert [same for _, same in errors] == [True, False]


# --- full runs on a tiny generated dataset -------------------------------------------------------


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(
        tmp_path_factory.mktemp("deep") / "lines",
        n_lines=2,
        samples_per_line=12,
        height=32,
        width=32,
        seed=0,
        progress=False,
    )


@pytest.fixture(scope="module")
def evaluation(tiny_model_dir: Path, dataset_root: Path, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("deep-eval")
    result = run(
        str(tiny_model_dir),
        str(dataset_root),
        str(out),
        bootstrap_n=B,
        latency_repeats=2,
        batch_size=4,
    )
    return result, out


def test_deep_evaluation_validates_and_has_every_section(evaluation, dataset_root: Path) -> None:
    result, out = evaluation
    on_disk = read_json(out / EVALUATION_NAME, schema_name="evaluation")
    assert on_disk == json.loads(json.dumps(result))
    assert validation_problems(on_disk, "evaluation") == []
    rows = pq.read_table(dataset_root / MANIFEST_NAME).to_pylist()
    for line, entry in on_disk["per_line"].items():
        labelled = sum(
            1 for r in rows if r["line_id"] == line and r["split"] == "test" and r["has_semseg"]
        )
        inspection = entry["inspection"]
        if labelled == 0:
            assert inspection is None and entry["n_defective"] is None
            continue
        assert inspection["n_defective"] == entry["n_defective"]
        assert inspection["n_defective"] + inspection["n_good"] == labelled
        assert inspection["threshold"] in inspection["pr_curve"]["threshold"]
        assert set(entry["robustness"]["boundary"]) == set(entry["metrics"])
        replicates = on_disk["bootstrap"]["replicates"][line]
        assert len(replicates["recall"]) == len(replicates["frr"]) == B
    assert on_disk["bootstrap"] | {"replicates": None} == {
        "unit": "image",
        "n": B,
        "seed": 0,
        "replicates": None,
    }
    assert on_disk["delta_m"] is None and on_disk["delta_m_reason"] == DELTA_M_NO_BASELINES
    assert on_disk["vs_champion"] is None and on_disk["vs_champion_reason"]
    latency = on_disk["latency"]
    assert latency["batch"] >= 1 and latency["image_size"] == [32, 32]
    assert 0 < latency["p50_ms"] <= latency["p95_ms"] and latency["images_per_s"] > 0
    assert latency["stl"] is None


def test_dimensions_and_dropout_are_finite_on_synthetic_data(evaluation) -> None:
    result, _ = evaluation
    dimensions = result["overall"]["dimensions"]
    assert dimensions["n_features"] > 0
    assert np.isfinite([dimensions["mae_mm"], dimensions["p95_mm"]]).all()
    assert dimensions["mae_mm"] <= dimensions["p95_mm"] + 1e-9 or dimensions["n_features"] < 3
    assert 0.0 <= dimensions["in_tol_acc"] <= 1.0
    dropout = result["overall"]["robustness"]["dropout"]["height.abs_err_mm"]
    assert dropout is not None and np.isfinite(dropout) and dropout >= 0


def test_affinity_maps_are_written_per_task_and_fused(evaluation) -> None:
    result, out = evaluation
    explain = result["explain"]
    kinds = {"semseg", "height", "normals", "fused"}
    assert len(explain["affinity_maps"]) == 2 * len(kinds)
    for relative in explain["affinity_maps"]:
        png = (out / relative).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert {p.rsplit("_", 1)[1][:-4] for p in explain["affinity_maps"]} == kinds
    assert explain["pixels"] and all(len(p) == 2 for p in explain["pixels"])


def test_affinity_maps_of_a_bf16_model(tiny_model_dir: Path, dataset_root: Path, tmp_path) -> None:
    """A model scored under bf16 hands the block bf16 features; the maps are still drawn."""
    from components.evaluate.explain import write_affinity_images
    from cta_model.data.line_dataset import LineDataset
    from cta_model.inference import Predictor
    from cta_model.model_folder import load_model_folder, save_model_folder

    model, card = load_model_folder(tiny_model_dir)
    folder = save_model_folder(model, tmp_path / "bf16", precision="bf16")
    predictor = Predictor.from_folder(folder)
    assert predictor.bf16
    sample = LineDataset(dataset_root)[0]
    explain = write_affinity_images(predictor, [sample], tmp_path / "out")
    assert len(explain["affinity_maps"]) == 4  # semseg, height, normals, fused
    assert all(
        (tmp_path / "out" / p).read_bytes().startswith(b"\x89PNG") for p in explain["affinity_maps"]
    )


def test_threshold_chosen_on_val_scores_val_at_the_target(
    tiny_model_dir: Path, dataset_root: Path, tmp_path: Path
) -> None:
    result = run(
        str(tiny_model_dir),
        str(dataset_root),
        str(tmp_path),
        split="val",
        bootstrap_n=5,
        latency_repeats=1,
        explain=False,
    )
    config = result["metric_settings"]
    for entry in result["per_line"].values():
        inspection = entry["inspection"]
        if inspection and inspection["n_defective"]:
            assert (
                inspection["recall"] >= config["target_recall"]
                or inspection["threshold"] == config["min_score"]
            )
    assert result["explain"] is None and result["explain_reason"] == "explain disabled"


# --- against the registry ---------------------------------------------------------------------


def _register(model_dir: Path, name: str, ref: Path, uri: str, alias: str) -> str:
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("cta-evaluate-deep")
    with mlflow.start_run():
        model_id = log_model_folder(model_dir).model_id
    return register(model_id, name, dataset_ref=str(ref), tracking_uri=uri, alias=alias)["version"]


@pytest.fixture(scope="module")
def dataset_ref(dataset_root: Path, tmp_path_factory) -> Path:
    ref = {
        "uri": str(dataset_root),
        "manifest_sha256": sha256_hex((dataset_root / MANIFEST_NAME).read_bytes()),
        "dvc_rev": None,
        "passed": True,
        "quarantine": [],
    }
    path = tmp_path_factory.mktemp("ref") / "dataset_ref.json"
    path.write_text(json.dumps(ref))
    return path


def test_delta_m_and_champion_from_the_registry(
    tiny_model_dir: Path, dataset_root: Path, dataset_ref: Path, mlflow_server: str, tmp_path: Path
) -> None:
    name = f"cta-deep-{uuid.uuid4().hex[:8]}"
    kwargs = {"bootstrap_n": B, "latency_repeats": 1, "explain": False, "batch_size": 4}
    before = run(
        str(tiny_model_dir),
        str(dataset_ref),
        str(tmp_path / "before"),
        model_name=name,
        tracking_uri=mlflow_server,
        **kwargs,
    )
    assert before["delta_m"] is None and f"{name}-stl-semseg" in before["delta_m_reason"]
    assert before["vs_champion"] is None and "champion" in before["vs_champion_reason"]

    for task in ("semseg", "height", "normals"):
        spec = ModelSpec(
            arch="stl",
            tasks=(task,),
            input_size=(32, 32),
            backbone="resnet18",
            output_stride=8,
            num_classes=10,
        )
        folder = save_model_folder(build_model(spec), tmp_path / f"stl-{task}")
        _register(folder, f"{name}-stl-{task}", dataset_ref, mlflow_server, "baseline")
    champion_version = _register(tiny_model_dir, name, dataset_ref, mlflow_server, "challenger")
    MlflowClient(mlflow_server).set_registered_model_alias(name, "champion", champion_version)

    after = run(
        str(tiny_model_dir),
        str(dataset_ref),
        str(tmp_path / "after"),
        model_name=name,
        tracking_uri=mlflow_server,
        **kwargs,
    )
    assert validation_problems(json.loads(json.dumps(after)), "evaluation") == []
    delta = after["delta_m"]
    assert set(delta["baselines"]) == {"semseg", "height", "normals"}
    assert delta["baselines"]["height"]["name"] == f"{name}-stl-height"
    assert set(delta["baselines"]["height"]["metrics"]) == {"height.abs_err_mm", "height.rmse_mm"}
    per_task = delta["per_task_pct"]
    assert set(per_task) == {"semseg", "height", "normals"}
    assert None not in per_task.values() and after["delta_m_reason"] is None
    # DESIGN 5.1: the primary Delta_m is the mean of the per-task primary improvements.
    assert delta["delta_m_primary_pct_higher_better"] == pytest.approx(
        np.mean(list(per_task.values()))
    )
    height = delta["baselines"]["height"]["metrics"]["height.abs_err_mm"]
    ours = after["overall"]["metrics"]["height.abs_err_mm"]
    assert per_task["height"] == pytest.approx(-(ours - height) / height * 100)
    assert after["latency"]["stl"]["n_models"] == 3

    # The champion is the candidate itself. The test split labels every task and holds
    # defective and good parts, so every comparison exists and every difference is exactly 0
    # (where one legitimately has no number: the hand-made champion comparison above).
    manifest = pq.read_table(dataset_root / MANIFEST_NAME).to_pylist()
    test_rows = [row for row in manifest if row["split"] == "test"]
    inspection = after["overall"]["inspection"]
    assert inspection["n_defective"] > 0 and inspection["n_good"] > 0
    versus = after["vs_champion"]
    assert versus["version"] == champion_version and versus["name"] == name
    assert set(versus["metrics"]) == {"semseg", "height", "normals"}
    for task, entry in versus["metrics"].items():
        assert any(row[f"has_{task}"] for row in test_rows), task
        assert entry["metric"] == get_task(task).primary_metric.name
        overall = after["overall"]["metrics"][f"{task}.{entry['metric']}"]
        assert isinstance(overall, float) and np.isfinite(overall), task
        assert entry["candidate"] == entry["champion"] == overall, task
        assert entry["diff_higher_better"] == 0.0, task
        assert [entry["p05"], entry["p50"], entry["p95"]] == [0.0, 0.0, 0.0], task
    for figure in ("recall", "frr", "image_auroc"):
        assert versus["inspection"][figure] == {"p05": 0.0, "p50": 0.0, "p95": 0.0}, figure


def test_cli_passes_the_new_flags(tiny_model_dir: Path, dataset_root: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cta_cli.commands.evaluate import evaluate as evaluate_command

    config = tmp_path / "inspection.yaml"
    config.write_text("reject_classes: [6, 8]\ntarget_recall: 0.9\nmin_score: 0.1\n")
    out = tmp_path / "out"
    arguments = ["--model", str(tiny_model_dir), "--data", str(dataset_root), "--out", str(out)]
    arguments += ["--bootstrap-n", "7", "--bootstrap-seed", "3", "--latency-repeats", "1"]
    arguments += ["--boundary-px", "1", "--no-explain", "--inspection-config", str(config)]
    result = CliRunner(env={"MLFLOW_TRACKING_URI": None}).invoke(evaluate_command, arguments)
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout.partition("\n")[2])
    assert evaluation["bootstrap"]["n"] == 7 and evaluation["bootstrap"]["seed"] == 3
    assert evaluation["latency"]["repeats"] == 1
    assert evaluation["explain"] is None
    settings = evaluation["metric_settings"]
    assert settings["boundary_px"] == 1 and settings["reject_classes"] == [6, 8]
    assert settings["min_score"] == 0.1
