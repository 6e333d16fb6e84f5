"""`validate-data` against leaky or broken datasets (issue 18, finding 4): the same image in two
splits fails naming both samples; broken manifests and features tables are one error line with
exit 2, never a traceback; an image beyond the line's camera is named, not decoded."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from png_bombs import black_png

from components.validate_data.step import RESULT_NAME, STATISTICS_NAME, ValidationFailed, run
from cta_cli.main import main
from cta_model.data.line_dataset import FEATURES_NAME, MANIFEST_NAME, sha256_hex
from cta_model.data.synthetic_dataset import generate_dataset

pytestmark = pytest.mark.unit

MODALITIES = ("image", "semseg", "height", "height_clean", "normals")


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("leaks") / "ds"
    return generate_dataset(
        root, n_lines=2, samples_per_line=8, height=32, width=32, progress=False
    )


@pytest.fixture
def root(dataset_root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ds"
    shutil.copytree(dataset_root, target)
    return target


def rows_of(root: Path) -> list[dict]:
    return pq.read_table(root / MANIFEST_NAME).to_pylist()


def write_rows(root: Path, rows: list[dict]) -> None:
    table = pq.read_table(root / MANIFEST_NAME)
    schema = pa.schema([field.with_nullable(True) for field in table.schema])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / MANIFEST_NAME)


def pair(rows: list[dict], split: str) -> tuple[dict, dict]:
    """A press-a train sample and a press-a sample of ``split`` (both with semseg)."""
    press_a = [row for row in rows if row["line_id"] == "press-a" and row["has_semseg"]]
    train = next(row for row in press_a if row["split"] == "train")
    other = next(row for row in press_a if row["split"] == split)
    return train, other


def invoke(root: Path, out: Path):
    return CliRunner().invoke(main, ["validate-data", str(root), "--out", str(out)])


@pytest.mark.parametrize("split", ["val", "test", "qa"])
def test_a_row_pointing_at_a_train_file_is_a_leak_naming_both_samples(root, tmp_path, split):
    rows = rows_of(root)
    train, other = pair(rows, split)
    for modality in MODALITIES:  # the other row names the train sample's files
        other[f"{modality}_path"] = train[f"{modality}_path"]
        other[f"sha256_{modality}"] = train[f"sha256_{modality}"]
    write_rows(root, rows)
    with pytest.raises(ValidationFailed) as caught:
        run(str(root), str(tmp_path), progress=False)
    message = str(caught.value)
    assert sorted(caught.value.bad_samples) == sorted([train["sample_id"], other["sample_id"]])
    assert "image in one split only (no leak)" in caught.value.failed_expectations
    assert (
        f"{other['sample_id']}: image in one split only (no leak): same image file (sha256) as "
        f"{train['sample_id']} (train)"
    ) in message
    assert f"as {other['sample_id']} ({split})" in message


def test_a_copied_image_is_a_leak_and_identical_label_files_are_not(root, tmp_path):
    rows = rows_of(root)
    train, val = pair(rows, "val")
    # The same label bytes in two splits (e.g. two empty masks) are normal.
    semseg = (root / train["semseg_path"]).read_bytes()
    (root / val["semseg_path"]).write_bytes(semseg)
    val["sha256_semseg"] = sha256_hex(semseg)
    write_rows(root, rows)
    assert run(str(root), str(tmp_path / "labels"), progress=False)["passed"] is True
    image = (root / train["image_path"]).read_bytes()
    (root / val["image_path"]).write_bytes(image)  # another file, the same bytes
    val["sha256_image"] = sha256_hex(image)
    write_rows(root, rows)
    with pytest.raises(ValidationFailed) as caught:
        run(str(root), str(tmp_path / "copy"), progress=False)
    assert sorted(caught.value.bad_samples) == sorted([train["sample_id"], val["sample_id"]])
    # Quarantining one of the two ends the leak.
    quarantine = tmp_path / "quarantine.txt"
    quarantine.write_text(f"{train['sample_id']}\n")
    out = tmp_path / "quarantined"
    assert run(str(root), str(out), quarantine=str(quarantine), progress=False)["passed"] is True
    result = json.loads((out / RESULT_NAME).read_text())
    assert result["n_quarantined"] == 1
    statistics = pq.read_table(out / STATISTICS_NAME).to_pandas()
    assert statistics["split_leak"].isna().all()


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("pitch_mm_per_px", None, "pitch_mm_per_px: None, expected a finite number > 0"),
        ("pitch_mm_per_px", math.nan, "pitch_mm_per_px: nan, expected a finite number > 0"),
        ("image_height", None, "image_height: None, expected a whole number >= 1"),
        ("has_semseg", False, "semseg_path: "),
    ],
)
def test_broken_manifests_exit_2_naming_the_sample(root, tmp_path, column, value, expected):
    rows = rows_of(root)
    train, _ = pair(rows, "val")
    train[column] = value
    write_rows(root, rows)
    result = invoke(root, tmp_path)
    assert result.exit_code == 2, result.output
    assert f"row {rows.index(train)} ({train['sample_id']}): {expected}" in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_junk_features_exit_2_naming_the_file(root, tmp_path):
    (root / FEATURES_NAME).write_bytes(b"\x00junk" * 64)
    result = invoke(root, tmp_path)
    assert result.exit_code == 2, result.output
    assert f"error: {root}/{FEATURES_NAME}: not a readable parquet file" in result.stderr


def test_an_image_beyond_the_camera_fails_naming_the_file(root, tmp_path):
    rows = rows_of(root)
    train, _ = pair(rows, "val")
    bomb = black_png(3000, 3000)  # press-a's camera has 2048 x 2448 pixels
    (root / train["image_path"]).write_bytes(bomb)
    train["sha256_image"] = sha256_hex(bomb)
    write_rows(root, rows)
    result = invoke(root, tmp_path)
    assert result.exit_code == 1, result.output
    assert f"{root}/{train['image_path']}: image: 3000x3000 pixels (PNG header)" in result.stderr
    assert "exceed the limit of line press-a" in result.stderr
