"""Per-sample statistics: one row per sample, bad files recorded not raised, label-quality
figures that separate consistent labels from broken ones."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cta_model.data import statistics
from cta_model.data.line_dataset import MANIFEST_NAME, LineDataset, sha256_hex
from cta_model.data.statistics import (
    ANOMALY_SLOPE,
    SEMSEG_FRACTION_COLUMNS,
    STATISTICS_COLUMNS,
    compute_statistics,
    defect_height_anomaly,
    normals_vs_height,
)
from cta_model.data.synthetic import CLASS_IDS, normals_from_height
from cta_model.data.synthetic_dataset import generate_dataset

pytestmark = pytest.mark.unit

SIZE = 32
PER_LINE = 8


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # press-a, press-b (60 % semseg labels), mill-c (no height sensor): every presence case.
    root = tmp_path_factory.mktemp("statistics") / "ds"
    return generate_dataset(
        root, n_lines=3, samples_per_line=PER_LINE, height=SIZE, width=SIZE, progress=False
    )


@pytest.fixture(scope="module")
def clean_table(dataset_root: Path) -> pd.DataFrame:
    return compute_statistics(LineDataset(dataset_root), progress=False)


@pytest.fixture
def copy_root(dataset_root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(dataset_root, target)
    return target


def _manifest_row(root: Path, sample_id: str) -> dict:
    rows = pq.read_table(root / MANIFEST_NAME).to_pylist()
    return next(row for row in rows if row["sample_id"] == sample_id)


def _replace_file(root: Path, sample_id: str, modality: str, data: bytes, update_sha: bool):
    """Overwrite one file; with ``update_sha`` the manifest checksum follows it."""
    table = pq.read_table(root / MANIFEST_NAME)
    rows = table.to_pylist()
    row = next(row for row in rows if row["sample_id"] == sample_id)
    (root / row[f"{modality}_path"]).write_bytes(data)
    if update_sha:
        row[f"sha256_{modality}"] = sha256_hex(data)
        updated = type(table).from_pylist(rows, schema=table.schema)
        pq.write_table(updated, root / MANIFEST_NAME)
    return row


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_one_row_per_sample_with_the_declared_columns_and_dtypes(clean_table, dataset_root):
    dataset = LineDataset(dataset_root)
    assert list(clean_table["sample_id"]) == dataset.sample_ids
    assert list(clean_table.columns) == list(STATISTICS_COLUMNS)
    for column, dtype in STATISTICS_COLUMNS.items():
        assert str(clean_table[column].dtype) == str(pd.Series([], dtype=dtype).dtype), column


def test_clean_synthetic_data_has_consistent_statistics(clean_table):
    assert clean_table["read_error"].isna().all()
    assert clean_table["shape_mismatch"].isna().all()
    assert (clean_table["image_height"] == SIZE).all()
    assert (clean_table["image_channels"] == 3).all()
    assert set(clean_table["image_dtype"]) == {"uint8"}
    assert clean_table["brightness"].between(20, 200).all()
    labelled = clean_table[clean_table["has_semseg"]]
    fractions = labelled[list(SEMSEG_FRACTION_COLUMNS)].sum(axis=1)
    np.testing.assert_allclose(fractions, 1.0)
    assert (labelled["semseg_max_class"] < len(SEMSEG_FRACTION_COLUMNS)).all()
    with_height = clean_table[clean_table["has_height"]]
    assert set(with_height["height_dtype"]) == {"float32"}
    assert (with_height["height_inf_count"] == 0).all()
    assert with_height["height_valid_frac"].between(0.5, 1.0).all()
    # Normals were computed from the height: they agree up to float32 rounding.
    assert (with_height["normals_vs_height_deg"] < 0.01).all()
    assert (with_height["normals_vs_height_tilted_deg"].dropna() < 0.01).all()
    assert (with_height["normals_length_err"] < 1e-5).all()
    anomaly = clean_table["defect_height_anomaly"].dropna()
    assert len(anomaly) > 0
    assert (anomaly >= 0.5).all()


def test_absent_tasks_give_nulls_not_zeros(clean_table):
    no_height = clean_table[~clean_table["has_height"]]
    assert set(no_height["line_id"]) == {"mill-c"}
    for column in ("height_valid_frac", "normals_valid_frac", "normals_vs_height_deg"):
        assert no_height[column].isna().all(), column
    assert no_height["height_dtype"].isna().all()
    no_labels = clean_table[~clean_table["has_semseg"]]
    assert len(no_labels) > 0  # press-b labels 60 % of its samples
    assert no_labels["semseg_valid_frac"].isna().all()
    assert no_labels["semseg_max_class"].isna().all()


def test_a_truncated_file_gets_a_row_with_read_error_naming_it(copy_root):
    dataset = LineDataset(copy_root)
    sample_id = dataset.sample_ids[3]
    path = copy_root / _manifest_row(copy_root, sample_id)["image_path"]
    data = path.read_bytes()
    _replace_file(copy_root, sample_id, "image", data[: len(data) // 2], update_sha=True)
    table = compute_statistics(LineDataset(copy_root), progress=False)
    assert len(table) == len(dataset)
    bad = table.set_index("sample_id").loc[sample_id]
    assert str(path.relative_to(copy_root)) in bad["read_error"]
    assert "corrupt PNG" in bad["read_error"]
    assert pd.isna(bad["brightness"])
    assert table["read_error"].notna().sum() == 1


def test_checksum_mismatch_and_missing_file_are_read_errors(copy_root):
    dataset = LineDataset(copy_root)
    changed, missing = dataset.sample_ids[0], dataset.sample_ids[1]
    height = np.zeros((SIZE, SIZE), dtype=np.float32)
    _replace_file(copy_root, changed, "height", _npy_bytes(height), update_sha=False)
    (copy_root / _manifest_row(copy_root, missing)["normals_path"]).unlink()
    table = compute_statistics(LineDataset(copy_root), progress=False).set_index("sample_id")
    assert "height: sha256 mismatch" in table.at[changed, "read_error"]
    assert "normals: file missing" in table.at[missing, "read_error"]
    # The other files of those samples still have their statistics.
    assert not pd.isna(table.at[missing, "height_valid_frac"])


def test_wrong_dtype_and_shape_are_recorded_for_the_expectations(copy_root):
    dataset = LineDataset(copy_root)
    wide, small = dataset.sample_ids[0], dataset.sample_ids[1]
    height = np.ones((SIZE, SIZE), dtype=np.float64)
    _replace_file(copy_root, wide, "height", _npy_bytes(height), update_sha=True)
    normals = np.zeros((SIZE // 2, SIZE // 2, 3), dtype=np.float32)
    _replace_file(copy_root, small, "normals", _npy_bytes(normals), update_sha=True)
    table = compute_statistics(LineDataset(copy_root), progress=False).set_index("sample_id")
    assert table.at[wide, "height_dtype"] == "float64"
    assert pd.isna(table.at[wide, "read_error"])
    assert table.at[small, "shape_mismatch"] == f"normals 16x16x3, image {SIZE}x{SIZE}x3"


def test_normals_vs_height_sees_negated_and_mirrored_conventions():
    rows, cols = np.mgrid[0:48, 0:48]
    # A dome: slopes in every direction, flat outside.
    height = np.clip(30 - np.hypot(rows - 24, cols - 24), 0, None) * 0.2
    pitch = 0.5
    normals = normals_from_height(height, pitch).astype(np.float64)
    clean = normals_vs_height(normals, height, pitch)
    assert clean["normals_vs_height_deg"] < 1e-3
    assert clean["normals_vs_height_tilted_deg"] < 1e-3
    assert normals_vs_height(-normals, height, pitch)["normals_vs_height_deg"] > 170
    y_up = normals * np.array([1.0, -1.0, 1.0])  # +y up instead of down
    flipped = normals_vs_height(y_up, height, pitch)
    assert flipped["normals_vs_height_tilted_deg"] > 10
    # NaN height (sensor drop-out) excludes the pixel and its neighbours, nothing else.
    holed = height.copy()
    holed[10:14, 10:14] = np.nan
    assert normals_vs_height(normals, holed, pitch)["normals_vs_height_deg"] < 1e-3


def test_defect_height_anomaly_separates_grooves_from_flat_masks():
    pitch = 0.5
    height = np.full((40, 40), 5.0)
    labels = np.full((40, 40), CLASS_IDS["part_surface"])
    height[20, 5:35] -= 0.2  # a scratch: a groove one pixel wide
    labels[20, 5:35] = CLASS_IDS["scratch"]
    assert defect_height_anomaly(labels, height, pitch)["defect_height_anomaly"] == 1.0
    misplaced = np.full((40, 40), CLASS_IDS["part_surface"])
    misplaced[30, 5:35] = CLASS_IDS["scratch"]  # the label sits on flat surface
    assert defect_height_anomaly(misplaced, height, pitch)["defect_height_anomaly"] == 0.0
    # Stains change the albedo only: they are not judged against the height.
    stain = np.full((40, 40), CLASS_IDS["part_surface"])
    stain[30, 5:35] = CLASS_IDS["stain"]
    assert defect_height_anomaly(stain, height, pitch) == {"defect_pixels": 0}
    # Texture below the threshold is not an anomaly.
    textured = height + 0.5 * ANOMALY_SLOPE * pitch * np.sin(np.arange(40) / 2)[None, :]
    result = defect_height_anomaly(misplaced, textured, pitch)
    assert result["defect_height_anomaly"] == 0.0


@pytest.mark.slow  # spawning two workers that import numpy/pandas/pyarrow takes 4-8 s
def test_workers_give_the_same_table(dataset_root, clean_table, monkeypatch):
    monkeypatch.setattr(statistics, "_CHUNK_SIZE", 4)  # several chunks: the pool is used
    table = compute_statistics(LineDataset(dataset_root), progress=False, workers=2)
    pd.testing.assert_frame_equal(table, clean_table)
