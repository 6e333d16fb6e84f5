"""The line-dataset reader refuses broken manifests and features tables naming file, row, sample
and column (issue 18, finding 4), and never decodes a PNG larger than the line's camera; its
parquet reads start no Arrow thread (the exit-134 abort)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from png_bombs import black_png

from components.evaluate.scoring import read_features
from cta_model.data.line_dataset import (
    FEATURES_NAME,
    MANIFEST_NAME,
    LineDataset,
    sha256_hex,
)
from cta_model.data.statistics import compute_statistics
from cta_model.data.synthetic_dataset import generate_dataset
from cta_model.errors import DataError

pytestmark = pytest.mark.unit

SIZE = 32


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("manifest") / "ds"
    return generate_dataset(
        root, n_lines=2, samples_per_line=6, height=SIZE, width=SIZE, progress=False
    )


@pytest.fixture
def root(dataset_root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ds"
    shutil.copytree(dataset_root, target)
    return target


def edit_manifest(root: Path, number: int, **values) -> dict:
    """Set ``values`` in row ``number``; every column nullable, so that nulls can be written."""
    table = pq.read_table(root / MANIFEST_NAME)
    rows = table.to_pylist()
    rows[number].update(values)
    schema = pa.schema([field.with_nullable(True) for field in table.schema])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / MANIFEST_NAME)
    return rows[number]


def error(root: Path, index: int | None = None) -> str:
    with pytest.raises(DataError) as caught:
        dataset = LineDataset(root)
        if index is not None:
            dataset[index]
    return str(caught.value)


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("pitch_mm_per_px", math.nan, "pitch_mm_per_px: nan, expected a finite number > 0"),
        ("pitch_mm_per_px", None, "pitch_mm_per_px: None, expected a finite number > 0"),
        ("pitch_mm_per_px", math.inf, "pitch_mm_per_px: inf, expected a finite number > 0"),
        ("pitch_mm_per_px", -0.05, "pitch_mm_per_px: -0.05, expected a finite number > 0"),
        ("image_height", None, "image_height: None, expected a whole number >= 1"),
        ("image_width", 0, "image_width: 0, expected a whole number >= 1"),
        ("n_defects", None, "n_defects: None, expected a whole number >= 0"),
        ("has_defect", None, "has_defect: None, expected true or false"),
        ("has_semseg", None, "has_semseg: None, expected true or false"),
        ("camera", None, "camera: None, expected a non-empty string"),
    ],
)
def test_null_and_non_finite_fields_name_the_sample(root, column, value, expected):
    row = edit_manifest(root, 3, **{column: value})
    message = error(root)
    assert f"{root}/{MANIFEST_NAME}: row 3 ({row['sample_id']}): {expected}" in message


def test_nan_pitch_is_the_mark_of_a_benchmark_without_one_only_without_sensor_labels(root):
    # MVTec AD states no pitch (the importer writes NaN): fine while no label needs it.
    no_sensor = {
        "has_height": False,
        "has_normals": False,
        **{f"{m}_path": None for m in ("height", "height_clean", "normals")},
        **{f"sha256_{m}": None for m in ("height", "height_clean", "normals")},
    }
    edit_manifest(root, 2, pitch_mm_per_px=math.nan, **no_sensor)
    assert math.isnan(LineDataset(root)[2]["pitch_mm_per_px"])
    edit_manifest(root, 3, pitch_mm_per_px=math.nan)
    assert "row 3 (press-a-000003): pitch_mm_per_px: nan" in error(root)
    assert "(the sample has sensor labels: height, normals)" in error(root)


@pytest.mark.parametrize(
    ("column", "array", "expected"),
    [
        ("pitch_mm_per_px", pa.array(["0.05"] * 12), "type string, expected number"),
        ("has_semseg", pa.array([1] * 12, pa.int8()), "type int8, expected a boolean"),
        ("image_height", pa.array([32.0] * 12), "type double, expected an integer"),
        ("sample_id", pa.array(range(12)), "type int64, expected a string"),
    ],
)
def test_every_manifest_column_has_its_type(root, column, array, expected):
    table = pq.read_table(root / MANIFEST_NAME)
    index = table.column_names.index(column)
    pq.write_table(table.set_column(index, column, array), root / MANIFEST_NAME)
    assert f"{MANIFEST_NAME}: column {column}: {expected}" in error(root)


def test_capture_columns_are_required(root):
    table = pq.read_table(root / MANIFEST_NAME)
    pq.write_table(table.drop_columns(["image_height", "camera"]), root / MANIFEST_NAME)
    assert "missing column(s) camera, image_height" in error(root)


@pytest.mark.parametrize("modality", ["semseg", "height_clean"])
def test_a_file_without_its_presence_flag_is_refused(root, dataset_root, modality):
    task = "height" if modality == "height_clean" else modality
    number, row = next(
        (number, row)
        for number, row in enumerate(LineDataset(dataset_root).rows)
        if row[f"{modality}_path"]
    )
    values = {f"has_{task}": False}
    if task == "height":  # the label itself gone, its companion still named
        values |= {"height_path": None, "sha256_height": None}
    edit_manifest(root, number, **values)
    message = error(root)
    assert f"row {number} ({row['sample_id']}): {modality}_path: " in message
    assert f"although has_{task} is false" in message


# --- features.parquet ---


def test_junk_features_are_refused_naming_the_file(root):
    dataset = LineDataset(root)
    assert dataset.check_features() == pq.read_metadata(root / FEATURES_NAME).num_rows > 0
    (root / FEATURES_NAME).write_bytes(b"junk" * 100)
    with pytest.raises(DataError, match=rf"{FEATURES_NAME}: not a readable parquet file"):
        dataset.check_features()
    pq.write_table(pa.table({"a": [1, 2]}), root / FEATURES_NAME)
    with pytest.raises(DataError, match=rf"{FEATURES_NAME}: missing column\(s\) feature_id"):
        dataset.check_features()
    with pytest.raises(DataError, match=rf"{FEATURES_NAME}: missing column\(s\) feature_id"):
        dataset.read_features()
    # evaluate's reader too: junk is an error, not "no features"
    with pytest.raises(DataError, match=rf"{FEATURES_NAME}: missing column\(s\) feature_id"):
        read_features(dataset)
    (root / FEATURES_NAME).unlink()
    assert dataset.check_features() is None  # no features: nothing to measure
    assert read_features(dataset) == {}


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("actual_mm", math.nan, "actual_mm: nan, expected a finite mm"),
        ("nominal_mm", None, "nominal_mm: missing"),
        ("tolerance_mm", -0.1, "tolerance_mm: -0.1 is negative"),
        ("x1", SIZE + 1, "is empty or outside the 32x32 image"),
        ("sample_id", "press-a-999999", "sample_id: not in"),
        ("split", "qa-or-not", "split: 'qa-or-not', the manifest says"),
    ],
)
def test_bad_feature_rows_name_the_row_and_sample(root, column, value, expected):
    table = pq.read_table(root / FEATURES_NAME)
    rows = table.to_pylist()
    rows[4][column] = value
    schema = pa.schema([field.with_nullable(True) for field in table.schema])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / FEATURES_NAME)
    with pytest.raises(DataError) as caught:
        LineDataset(root).check_features()
    assert f"{FEATURES_NAME}: row 4 ({rows[4]['sample_id']}): " in str(caught.value)
    assert expected in str(caught.value)


# --- images beyond the line's camera ---


def test_an_image_larger_than_the_camera_is_refused_before_decoding(root):
    # press-a's camera: 2048 x 2448 pixels; 3000 x 3000 has more (27 MB decoded, 30 KB here).
    dataset = LineDataset(root)
    row = dataset.rows[0]
    bomb = black_png(3000, 3000)
    (root / row["image_path"]).write_bytes(bomb)
    edit_manifest(root, 0, sha256_image=sha256_hex(bomb))
    message = error(root, 0)
    assert f"{root}/{row['image_path']}: image: 3000x3000 pixels (PNG header)" in message
    assert "exceed the limit of line press-a" in message and "not decoded" in message
    (statistics,) = compute_statistics(
        LineDataset(root), progress=False, sample_ids=[row["sample_id"]]
    ).to_dict("records")
    assert row["image_path"] in statistics["read_error"]
    assert "exceed the limit of line press-a: at most 5013504 pixels" in statistics["read_error"]
    assert statistics["image_sha256"] == sha256_hex(bomb)


# --- the exit-134 abort ---

_THREADS = """
import os, sys
from cta_model.data.line_dataset import read_parquet_bytes
def threads():
    return len(os.listdir("/proc/self/task"))
data = open(sys.argv[1], "rb").read()
before = threads()
for _ in range(5):
    read_parquet_bytes(data)
print(before, threads())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_parquet_reads_start_no_arrow_thread(dataset_root):
    """Arrow's thread pools, started by a read and torn down at exit, abort the process now and
    then (exit 134) when it exits right after the read: reads stay on the calling thread."""
    manifest = str(dataset_root / MANIFEST_NAME)
    result = subprocess.run(
        [sys.executable, "-c", _THREADS, manifest], capture_output=True, text=True, check=True
    )
    before, after = result.stdout.split()
    assert before == after
