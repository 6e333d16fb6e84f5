"""`cta data import`: MVTec AD / 3D-AD folders (tests/mvtec_layouts.py) -> one line dataset:
lines and their inventory, stratified seeded splits, the dataset's own classes, masks ->
class ids, presence flags, 3D-AD height and normals, and `cta validate-data` with no flag."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from mvtec_layouts import (
    BUMP_MM,
    INVALID_POINTS,
    PITCH_MM,
    SIZE,
    write_mvtec_3d_layout,
    write_mvtec_ad_layout,
)
from PIL import Image
from scipy import ndimage

from cta_cli.main import main
from cta_model.data.importers import (
    category_line_id,
    import_mvtec,
    stratified_val,
    val_count,
)
from cta_model.data.line_dataset import DATASET_LINES_NAME, MANIFEST_NAME, LineDataset
from cta_model.data.lines import load_lines_config
from cta_model.errors import ConfigError, DataError

pytestmark = pytest.mark.unit

N_TEST = 6  # test images per type: 2 of them go to val at the default fraction 0.3
AD_TYPES = {"metal_nut": ("crack", "hole"), "wood": ("crack", "hole", "scratch")}


@pytest.fixture(scope="module")
def ad_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvtec_ad") / "src"
    return write_mvtec_ad_layout(root, tuple(AD_TYPES), AD_TYPES, n_test=N_TEST)


@pytest.fixture(scope="module")
def ad_root(ad_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mvtec_ad_out") / "ds"
    import_mvtec("mvtec-ad", ad_source, out, progress=False)
    return out


@pytest.fixture(scope="module")
def d3_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mvtec_3d_layout(tmp_path_factory.mktemp("mvtec_3d") / "src")


@pytest.fixture(scope="module")
def d3_root(d3_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mvtec_3d_out") / "ds"
    import_mvtec("mvtec-3d-ad", d3_source, out, progress=False)
    return out


def rows(root: Path) -> list[dict]:
    return pq.read_table(root / MANIFEST_NAME).to_pylist()


def source_key(row: dict) -> tuple[str, str, str, str]:
    """(line, source split, type, stem) from a sample id <line>-<split>-<type>-<stem>."""
    rest = row["sample_id"].removeprefix(row["line_id"] + "-")
    split, remainder = rest.split("-", 1)
    kind, stem = remainder.rsplit("-", 1)
    return row["line_id"], split, kind, stem


# --- splits ---


def test_val_count_keeps_every_type_in_test_and_val_where_possible():
    assert [val_count(n, 0.3) for n in (1, 2, 3, 6, 10)] == [0, 1, 1, 2, 3]
    assert val_count(10, 0.95) == 9 and val_count(10, 0.01) == 1


def test_stratified_val_is_seeded_and_per_type():
    kinds = ["good"] * 10 + ["crack"] * 6 + ["hole"] * 1
    first = stratified_val(kinds, 0.3, seed=0, line_id="wood")
    assert first == stratified_val(kinds, 0.3, seed=0, line_id="wood")
    assert Counter(k for k, chosen in zip(kinds, first, strict=True) if chosen) == {
        "good": 3,
        "crack": 2,
    }
    other_seeds = [stratified_val(kinds, 0.3, seed=s, line_id="wood") for s in range(1, 6)]
    assert any(choice != first for choice in other_seeds)


def test_splits_are_stratified_and_no_image_is_in_two(ad_root: Path, ad_source: Path):
    manifest = rows(ad_root)
    keys = [source_key(row) for row in manifest]
    assert len(set(keys)) == len(keys)  # every source image once, so in one split only
    sources = {
        (category.replace("_", "-"), split, kind, path.stem)
        for category in AD_TYPES
        for split in ("train", "test")
        for kind_dir in sorted((ad_source / category / split).iterdir())
        for kind in [kind_dir.name]
        for path in kind_dir.glob("*.png")
    }
    assert set(keys) == sources
    for row, (_, split, kind, _) in zip(manifest, keys, strict=True):
        assert (row["split"] == "train") == (split == "train")
        assert kind == "good" or split == "test"
    val = Counter(
        (row["line_id"], key[2])
        for row, key in zip(manifest, keys, strict=True)
        if row["split"] == "val"
    )
    test = Counter(
        (row["line_id"], key[2])
        for row, key in zip(manifest, keys, strict=True)
        if row["split"] == "test"
    )
    for category, types in AD_TYPES.items():
        for kind in ("good", *types):
            assert val[(category.replace("_", "-"), kind)] == 2
            assert test[(category.replace("_", "-"), kind)] == N_TEST - 2


def test_same_seed_same_bytes_other_seed_other_val(ad_source: Path, ad_root: Path, tmp_path):
    again = import_mvtec("mvtec-ad", ad_source, tmp_path / "again", progress=False).root
    assert (again / MANIFEST_NAME).read_bytes() == (ad_root / MANIFEST_NAME).read_bytes()
    assert (again / DATASET_LINES_NAME).read_bytes() == (ad_root / DATASET_LINES_NAME).read_bytes()
    other = import_mvtec("mvtec-ad", ad_source, tmp_path / "other", seed=1, progress=False).root

    def val_ids(root: Path) -> set[str]:
        return {row["sample_id"] for row in rows(root) if row["split"] == "val"}

    assert val_ids(other) != val_ids(ad_root)
    assert len(val_ids(other)) == len(val_ids(ad_root))


# --- classes, labels, presence ---


def test_class_names_are_good_then_the_pooled_defect_types(ad_root: Path):
    dataset = LineDataset(ad_root)
    assert dataset.class_names == ("good", "crack", "hole", "scratch")
    assert dataset.reject_classes == (1, 2, 3)
    assert dataset.line_ids == ["metal-nut", "wood"]
    generator = dataset.generator
    assert generator["categories"] == {"metal_nut": "metal-nut", "wood": "wood"}
    assert generator["format"] == "mvtec-ad" and generator["seed"] == 0


def test_masks_become_the_types_class_ids(ad_root: Path, ad_source: Path):
    dataset = LineDataset(ad_root)
    checked = Counter()
    for index, row in enumerate(dataset.rows):
        line, split, kind, stem = source_key(row)
        sample = dataset[index]
        if kind == "good":
            assert not row["has_defect"] and (sample["semseg"] == 0).all()
            continue
        category = "metal_nut" if line == "metal-nut" else "wood"
        mask_path = ad_source / category / "ground_truth" / kind / f"{stem}_mask.png"
        mask = np.asarray(Image.open(mask_path)) > 0
        class_id = dataset.class_names.index(kind)
        assert np.array_equal(sample["semseg"], np.where(mask, class_id, 0))
        assert row["has_defect"] and row["n_defects"] == 1
        checked[kind] += 1
    assert checked == {"crack": 2 * N_TEST, "hole": 2 * N_TEST, "scratch": N_TEST}


def test_mvtec_ad_is_semseg_only_without_pitch(ad_root: Path):
    dataset = LineDataset(ad_root)
    assert dataset.tasks == ("semseg", "height", "normals")
    sample = dataset[0]
    assert sample["present"] == {"semseg": True, "height": False, "normals": False}
    assert sample["image"].shape == (*SIZE, 3)
    assert all(math.isnan(row["pitch_mm_per_px"]) for row in dataset.rows)
    assert not any(row["has_height"] or row["has_normals"] for row in dataset.rows)


def test_lines_inventory_lists_the_categories(ad_root: Path, d3_root: Path):
    ad = load_lines_config(ad_root / DATASET_LINES_NAME)
    assert ad.ids == ["metal-nut", "wood"] and ad.pilot.id == "metal-nut"
    for line in ad.lines:
        assert line.resolution == SIZE and line.sensors == ("rgb",)
        assert line.min_defect_width_mm is None
    text = (ad_root / DATASET_LINES_NAME).read_text()
    assert "PLACEHOLDERS" in text and "MVTec AD states no pitch" in text
    d3 = load_lines_config(d3_root / DATASET_LINES_NAME)
    assert d3.ids == ["cable-gland", "foam"]
    for line in d3.lines:
        assert line.sensors == ("rgb", "height")
        assert line.pitch_mm_per_px == pytest.approx(PITCH_MM)


# --- MVTec 3D-AD ---


def test_mvtec_3d_height_and_normals_from_the_point_maps(d3_root: Path):
    dataset = LineDataset(d3_root)
    assert dataset.class_names == ("good", "crack", "hole")
    counts = Counter((row["line_id"], row["split"]) for row in dataset.rows)
    for line in ("cable-gland", "foam"):
        assert counts[(line, "train")] == 4 and counts[(line, "qa")] == 2
        assert counts[(line, "val")] == 3 and counts[(line, "test")] == 6
    assert dataset.generator["height_datum_mm"] == {"cable-gland": 400.0, "foam": 400.0}
    hole = next(i for i, row in enumerate(dataset.rows) if "-test-hole-" in row["sample_id"])
    sample = dataset[hole]
    assert all(sample["present"][task] for task in ("semseg", "height", "normals"))
    assert sample["pitch_mm_per_px"] == pytest.approx(PITCH_MM)
    defect = sample["semseg"] == dataset.class_names.index("hole")
    assert defect.sum() == 48 and set(np.unique(sample["semseg"])) == {0, 2}
    height = sample["height"]
    invalid = np.zeros(SIZE, dtype=bool)
    for row, col in INVALID_POINTS:
        invalid[row, col] = True
    assert np.isnan(height[invalid]).all()
    assert np.allclose(height[defect], BUMP_MM) and np.allclose(height[~defect & ~invalid], 0.0)
    normals = sample["normals"]
    # Flat: inside the border, with no defect or invalid point in the 3 x 3 neighbourhood.
    flat = ~ndimage.binary_dilation(defect | invalid, structure=np.ones((3, 3), dtype=bool))
    flat[[0, -1], :] = flat[:, [0, -1]] = False
    assert flat.sum() > 500 and np.allclose(normals[flat], (0.0, 0.0, 1.0), atol=1e-6)
    assert (normals[0] == 0).all() and (normals[:, -1] == 0).all()  # the 1-pixel border
    assert (normals[1, 1] == 0).all()  # next to an invalid point


def test_defect_normals_tilt_away_from_the_bump(d3_root: Path):
    dataset = LineDataset(d3_root)
    index = next(i for i, row in enumerate(dataset.rows) if "-test-crack-" in row["sample_id"])
    sample = dataset[index]
    rows_, cols = np.nonzero(sample["semseg"] > 0)
    top, left, right = rows_.min(), cols.min(), cols.max()
    middle = (top + rows_.max()) // 2
    # Left edge of the bump: the surface rises to the right, so the normal leans left (-x).
    assert sample["normals"][middle, left][0] < -0.1
    assert sample["normals"][middle, right][0] > 0.1
    assert sample["normals"][top, (left + right) // 2][1] < -0.1  # top edge leans up (-y)


# --- errors ---


def test_category_names_that_cannot_be_line_ids_are_refused(tmp_path: Path):
    assert category_line_id("Metal_Nut") == "metal-nut"
    with pytest.raises(ConfigError, match=r"category '9lives'.*rename the folder"):
        category_line_id("9lives")
    with pytest.raises(ConfigError, match="cannot be a line id"):
        category_line_id("a" * 40)
    src = write_mvtec_ad_layout(tmp_path / "src", ("metal_nut", "Metal-Nut"), n_train=1, n_test=1)
    with pytest.raises(ConfigError, match="both become line id 'metal-nut'"):
        import_mvtec("mvtec-ad", src, tmp_path / "out", progress=False)


def test_arguments_and_existing_output(ad_source: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="val-fraction"):
        import_mvtec("mvtec-ad", ad_source, tmp_path / "a", val_fraction=1.0, progress=False)
    with pytest.raises(ConfigError, match="unknown import format"):
        import_mvtec("nyuv2", ad_source, tmp_path / "a", progress=False)
    with pytest.raises(DataError, match="category: folder missing; categories in"):
        import_mvtec("mvtec-ad", ad_source, tmp_path / "a", categories=["x"], progress=False)
    with pytest.raises(DataError, match="no mvtec-ad category"):
        import_mvtec("mvtec-ad", tmp_path, tmp_path / "a", progress=False)
    out = tmp_path / "out"
    import_mvtec("mvtec-ad", ad_source, out, categories=["wood"], progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        import_mvtec("mvtec-ad", ad_source, out, progress=False)
    summary = import_mvtec("mvtec-ad", ad_source, out, overwrite=True, progress=False)
    assert LineDataset(out).line_ids == ["metal-nut", "wood"] and summary.n_samples == len(
        rows(out)
    )


# --- the dataset's own inventory, and validate-data with no flag ---


def test_the_dataset_inventory_is_the_default_and_an_explicit_one_wins(ad_root: Path):
    assert LineDataset(ad_root).lines_config.source.endswith(f"/{DATASET_LINES_NAME}")
    with pytest.raises(DataError, match="unknown line 'metal-nut'"):
        LineDataset(ad_root, lines_config=load_lines_config())


@pytest.mark.parametrize("fixture", ["ad_root", "d3_root"])
def test_cli_import_then_validate_data_passes_with_no_flag(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
):
    source = request.getfixturevalue("ad_source" if fixture == "ad_root" else "d3_source")
    fmt = "mvtec-ad" if fixture == "ad_root" else "mvtec-3d-ad"
    runner = CliRunner()
    out = tmp_path / "ds"
    result = runner.invoke(main, ["data", "import", fmt, str(source), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"lines inventory: {out / DATASET_LINES_NAME}" in result.output
    assert (out / MANIFEST_NAME).read_bytes() == (
        request.getfixturevalue(fixture) / MANIFEST_NAME
    ).read_bytes()

    report = tmp_path / "report"
    result = runner.invoke(main, ["validate-data", str(out), "--out", str(report)])
    assert result.exit_code == 0, result.output
    assert "data validation passed" in result.stdout
    warning = "has no reject-class pixel"
    assert warning in result.stderr and "training needs data.anomalies or labelled defects" in (
        result.stderr
    )
    validation = json.loads((report / "validation_result.json").read_text())
    assert validation["passed"] and validation["class_names"][0] == "good"
    assert any(warning in text for text in validation["warnings"])
    assert warning in (report / "validation_report.html").read_text()


def test_an_empty_defect_mask_is_reported_and_counts_as_good(tmp_path: Path):
    src = write_mvtec_ad_layout(tmp_path / "src", ("wood",), n_train=1, n_test=2)
    mask_path = src / "wood" / "ground_truth" / "hole" / "001_mask.png"
    Image.fromarray(np.zeros(SIZE, dtype=np.uint8)).save(mask_path)
    summary = import_mvtec("mvtec-ad", src, tmp_path / "out", progress=False)
    assert summary.empty_defect_masks == ["wood-test-hole-001"]
    row = next(row for row in rows(tmp_path / "out") if row["sample_id"] == "wood-test-hole-001")
    assert not row["has_defect"] and row["n_defects"] == 0


def test_a_benchmark_without_defect_types_is_refused(tmp_path: Path):
    src = write_mvtec_ad_layout(tmp_path / "src", ("wood",), (), n_train=1, n_test=1)
    with pytest.raises(DataError, match="no defect type"):
        import_mvtec("mvtec-ad", src, tmp_path / "out", progress=False)
