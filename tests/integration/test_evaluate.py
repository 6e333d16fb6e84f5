"""The evaluate step on a tiny generated line dataset with an untrained tiny CTAL model."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from components.artifacts import read_json, validation_problems
from components.evaluate.scoring import meter_inputs
from components.evaluate.step import DELTA_M_NO_BASELINES, EVALUATION_NAME, run
from cta_cli.commands.evaluate import evaluate as evaluate_command
from cta_model.data.line_dataset import MANIFEST_NAME, sha256_hex
from cta_model.data.synthetic_dataset import generate_dataset
from cta_model.errors import DataError
from cta_model.model_folder import WEIGHTS, folder_sha256
from cta_model.tasks import metric_directions

pytestmark = pytest.mark.integration

TASKS = ("semseg", "height", "normals")
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(
        tmp_path_factory.mktemp("data") / "lines",
        n_lines=2,
        samples_per_line=8,
        height=32,
        width=32,
        seed=0,
        progress=False,
    )


@pytest.fixture
def model_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir  # shared, read-only (tests/integration/conftest.py)


def _manifest_rows(root: Path) -> list[dict]:
    return pq.read_table(io.BytesIO((root / MANIFEST_NAME).read_bytes())).to_pylist()


def test_evaluation_json_matches_schema_counts_and_registry_keys(
    dataset_root: Path, model_dir: Path, tmp_path: Path
) -> None:
    result = run(str(model_dir), str(dataset_root), str(tmp_path), model_id="m-abc", batch_size=3)
    on_disk = read_json(tmp_path / EVALUATION_NAME, schema_name="evaluation")
    assert on_disk == json.loads(json.dumps(result))

    expected_counts = Counter(
        r["line_id"] for r in _manifest_rows(dataset_root) if r["split"] == "test"
    )
    assert {line: entry["n_images"] for line, entry in on_disk["per_line"].items()} == dict(
        expected_counts
    )
    assert on_disk["overall"]["n_images"] == sum(expected_counts.values())

    registry_keys = set(metric_directions(TASKS))
    assert set(on_disk["overall"]["metrics"]) == registry_keys
    for entry in on_disk["per_line"].values():
        assert set(entry["metrics"]) == registry_keys
    # Height and normals are labelled on every synthetic line: never null overall.
    assert on_disk["overall"]["metrics"]["height.abs_err_mm"] is not None
    assert on_disk["overall"]["metrics"]["normals.mean"] is not None

    assert on_disk["model"] == {
        "name": None,
        "version": None,
        "model_id": "m-abc",
        "sha256": folder_sha256(model_dir),
        "tasks": list(TASKS),
    }
    assert on_disk["data"]["uri"] == str(dataset_root.resolve())
    assert on_disk["data"]["manifest_sha256"] == sha256_hex(
        (dataset_root / MANIFEST_NAME).read_bytes()
    )
    assert on_disk["data"]["split"] == "test"
    assert on_disk["delta_m"] is None
    assert on_disk["delta_m_reason"] == DELTA_M_NO_BASELINES


def test_schema_fixes_the_top_level_and_allows_per_line_extras(
    dataset_root: Path, model_dir: Path, tmp_path: Path
) -> None:
    result = json.loads(json.dumps(run(str(model_dir), str(dataset_root), str(tmp_path))))
    line = next(iter(result["per_line"]))
    result["per_line"][line]["inspection"] = {"recall": 0.9}
    assert validation_problems(result, "evaluation") == []
    missing = {k: v for k, v in result.items() if k != "delta_m"}
    assert validation_problems(missing, "evaluation") == ["delta_m: required field missing"]
    assert validation_problems({**result, "typo": 1}, "evaluation") == [
        "typo: unknown field (not in the schema)"
    ]
    result["overall"]["metrics"]["semseg.miou"] = "high"
    assert validation_problems(result, "evaluation")


def test_dataset_ref_uri_is_used_and_its_quarantine_skipped(
    dataset_root: Path, model_dir: Path, tmp_path: Path
) -> None:
    test_ids = [r["sample_id"] for r in _manifest_rows(dataset_root) if r["split"] == "test"]
    ref = {
        "uri": str(dataset_root),
        "manifest_sha256": sha256_hex((dataset_root / MANIFEST_NAME).read_bytes()),
        "dvc_rev": "abc123",
        "passed": True,
        "quarantine": [test_ids[0]],
    }
    ref_path = tmp_path / "dataset_ref.json"
    ref_path.write_text(json.dumps(ref))
    result = run(str(model_dir), str(ref_path), str(tmp_path / "out"))
    assert result["overall"]["n_images"] == len(test_ids) - 1
    assert result["data"]["quarantine_skipped"] == 1
    assert result["data"]["dvc_rev"] == "abc123"

    stale = tmp_path / "stale_ref.json"
    stale.write_text(json.dumps({**ref, "manifest_sha256": "0" * 64}))
    with pytest.raises(DataError, match="validate the data again"):
        run(str(model_dir), str(stale), str(tmp_path / "stale"))


def test_tampered_model_folder_is_refused(
    dataset_root: Path, model_dir: Path, tmp_path: Path
) -> None:
    tampered = tmp_path / "model"
    shutil.copytree(model_dir, tampered)
    weights = tampered / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256 differs"):
        run(str(tampered), str(dataset_root), str(tmp_path / "out"))
    assert not (tmp_path / "out" / EVALUATION_NAME).exists()


def test_meter_inputs_layouts_and_presence() -> None:
    ids = np.array([[[0, 3], [9, 1]], [[2, 2], [2, 2]]], dtype=np.int64)
    samples = [
        {
            "present": {"semseg": True, "height": True, "normals": False},
            "semseg": np.array([[0, -1], [9, 1]], dtype=np.int64),
            "height": np.full((2, 2), np.nan, dtype=np.float32),
            "normals": np.zeros((2, 2, 3), dtype=np.float32),
        },
        {
            "present": {"semseg": False, "height": True, "normals": True},
            "semseg": np.full((2, 2), -1, dtype=np.int64),
            "height": np.ones((2, 2), dtype=np.float32),
            "normals": np.tile(np.array([0, 0, 1], dtype=np.float32), (2, 2, 1)),
        },
    ]
    pred, target, present = meter_inputs("semseg", ids, samples, NUM_CLASSES)
    assert pred.shape == (2, NUM_CLASSES, 2, 2)
    assert torch.equal(pred.argmax(dim=1), torch.from_numpy(ids))
    assert target.shape == (2, 2, 2) and present.tolist() == [True, False]
    pred, target, present = meter_inputs("height", np.zeros((2, 2, 2), np.float32), samples, None)
    assert pred.shape == target.shape == (2, 1, 2, 2)
    normals = np.zeros((2, 2, 2, 3), np.float32)
    pred, target, present = meter_inputs("normals", normals, samples, None)
    assert pred.shape == target.shape == (2, 3, 2, 2) and present.tolist() == [False, True]
    assert torch.equal(target[1, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]))


def test_cli_prints_summary_and_json(dataset_root: Path, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        evaluate_command,
        [
            "--model",
            str(model_dir),
            "--data",
            str(dataset_root),
            "--out",
            str(out),
            "--split",
            "val",
        ],
    )
    assert result.exit_code == 0, result.output
    summary, _, payload = result.stdout.partition("\n")
    assert summary.startswith("evaluated ") and "val image(s)" in summary
    assert json.loads(payload)["data"]["split"] == "val"
    assert (out / EVALUATION_NAME).is_file()
