"""The line-dataset format: deterministic writer, checked reader, every bad input named."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cta_model.data.line_dataset import (
    DATASET_LINES_NAME,
    MANIFEST_NAME,
    PART_ID,
    SPLITS,
    LineDataset,
    check_relative_path,
    manifest_schema,
)
from cta_model.data.line_writer import write_manifest, write_sample
from cta_model.data.lines import LinesConfig, default_lines_config, load_lines_config
from cta_model.data.synthetic import render_sample
from cta_model.data.synthetic_dataset import (
    SYNTHETIC_TASKS,
    assign_splits,
    generate_dataset,
    split_counts,
    synthetic_record,
)
from cta_model.errors import ConfigError, DataError

pytestmark = pytest.mark.unit

SIZE = 24
PER_LINE = 10


@pytest.fixture(scope="module")
def config() -> LinesConfig:
    return load_lines_config()


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory, config: LinesConfig) -> Path:
    root = tmp_path_factory.mktemp("lines") / "ds"
    return generate_dataset(
        root,
        config,
        n_lines=3,
        samples_per_line=PER_LINE,
        height=SIZE,
        width=SIZE,
        seed=3,
        progress=False,
    )


@pytest.fixture
def copy_root(dataset_root: Path, tmp_path: Path) -> Path:
    """A private copy for tests that damage files."""
    target = tmp_path / "copy"
    shutil.copytree(dataset_root, target)
    return target


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def rewrite_manifest(root: Path, column: str, row: int, value) -> None:
    table = pq.read_table(root / MANIFEST_NAME)
    values = table[column].to_pylist()
    values[row] = value
    index = table.column_names.index(column)
    field = table.schema.field(index)
    table = table.set_column(index, field, pa.array(values, type=field.type))
    pq.write_table(table, root / MANIFEST_NAME)


def manifest_rows(root: Path) -> list[dict]:
    return pq.read_table(root / MANIFEST_NAME).to_pylist()


def first_row(root: Path, **conditions) -> tuple[int, dict]:
    for number, row in enumerate(manifest_rows(root)):
        if all(row[key] == value for key, value in conditions.items()):
            return number, row
    raise AssertionError(f"no row with {conditions}")


def dataset_error(root: Path, config: LinesConfig, index: int = 0, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        dataset = LineDataset(root, config, **kwargs)
        dataset[index]
    return str(info.value)


# --- writer ---


def test_layout_and_manifest(dataset_root: Path, config: LinesConfig) -> None:
    rows = manifest_rows(dataset_root)
    assert len(rows) == 3 * PER_LINE
    assert [row["sample_id"] for row in rows[:2]] == ["press-a-000000", "press-a-000001"]
    assert {row["line_id"] for row in rows} == {"press-a", "press-b", "mill-c"}
    for row in rows:
        line = config.get(row["line_id"])
        assert row["image_path"] == f"images/{line.id}/{row['sample_id']}.png"
        assert row["has_height"] == row["has_normals"] == line.has_height_sensor
        assert (row["height_path"] is not None) == row["has_height"]
        assert (row["height_clean_path"] is not None) == row["has_height"]
        assert (row["semseg_path"] is not None) == row["has_semseg"]
        assert row["camera"] == line.camera and row["split"] in SPLITS
        for modality in ("image", "semseg", "height", "height_clean", "normals"):
            path = row[f"{modality}_path"]
            if path is None:
                assert row[f"sha256_{modality}"] is None
                continue
            data = (dataset_root / path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row[f"sha256_{modality}"]
    press_b = [row for row in rows if row["line_id"] == "press-b"]
    assert 0 < sum(row["has_semseg"] for row in press_b) < PER_LINE  # 60 % labelled
    features = pq.read_table(dataset_root / "features.parquet").to_pylist()
    assert {f["sample_id"] for f in features} == {row["sample_id"] for row in rows}
    assert {f["type"] for f in features} == {
        "hole_diameter",
        "hole_depth",
        "boss_height",
        "slot_width",
    }
    assert not list(dataset_root.rglob(".*.tmp-*")), "temporary files left behind"


def test_same_seed_gives_byte_identical_tree(tmp_path: Path, config: LinesConfig) -> None:
    kwargs = dict(n_lines=3, samples_per_line=4, height=16, width=16, progress=False)
    first = tree_digest(generate_dataset(tmp_path / "a", config, seed=11, **kwargs))
    # Two worker processes write the same bytes as one: samples depend on (seed, line, index).
    second = tree_digest(generate_dataset(tmp_path / "b", config, seed=11, workers=2, **kwargs))
    assert first == second and len(first) > 30
    other = tree_digest(generate_dataset(tmp_path / "c", config, seed=12, **kwargs))
    assert other.keys() != first.keys() or other != first
    assert other[MANIFEST_NAME] != first[MANIFEST_NAME]
    assert other["images/press-a/press-a-000000.png"] != first["images/press-a/press-a-000000.png"]


def test_existing_dataset_needs_overwrite(dataset_root: Path, tmp_path: Path, config) -> None:
    kwargs = dict(n_lines=1, samples_per_line=2, height=16, width=16, seed=0, progress=False)
    root = generate_dataset(tmp_path / "ds", config, **kwargs)
    with pytest.raises(DataError, match="overwrite"):
        generate_dataset(root, config, **kwargs)
    (root / "notes.txt").write_text("kept")
    generate_dataset(root, config, **{**kwargs, "samples_per_line": 1}, overwrite=True)
    assert len(manifest_rows(root)) == 1 and (root / "notes.txt").exists()
    assert len(list((root / "images" / "press-a").iterdir())) == 1


def test_a_dataset_inventory_belongs_to_the_dataset(tmp_path: Path, config) -> None:
    kwargs = dict(n_lines=1, samples_per_line=1, height=16, width=16, seed=0, progress=False)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / DATASET_LINES_NAME).write_text("lines: []\n")  # e.g. an old import
    with pytest.raises(DataError, match=f"already holds a line dataset \\({DATASET_LINES_NAME}\\)"):
        generate_dataset(tmp_path / "ds", config, **kwargs)
    root = generate_dataset(tmp_path / "ds", config, **kwargs, overwrite=True)
    assert not (root / DATASET_LINES_NAME).exists() and LineDataset(root).line_ids == ["press-a"]


def test_generation_arguments_are_checked(tmp_path: Path, config: LinesConfig) -> None:
    with pytest.raises(ConfigError, match="asked for 9 lines"):
        generate_dataset(tmp_path / "x", config, n_lines=9, samples_per_line=1, progress=False)
    with pytest.raises(ConfigError, match="at least 8 x 8"):
        generate_dataset(tmp_path / "x", config, n_lines=1, samples_per_line=1, height=4)
    with pytest.raises(ConfigError, match="workers"):
        generate_dataset(tmp_path / "x", config, n_lines=1, samples_per_line=1, workers=0)
    assert not (tmp_path / "x").exists(), "arguments are checked before anything is written"
    with pytest.raises(ConfigError, match="splits"):
        generate_dataset(
            tmp_path / "x", config, n_lines=1, samples_per_line=1, splits=(0.5, 0.5), progress=False
        )


def test_splits_are_exact_and_stratified() -> None:
    assert split_counts(200, (0.6, 0.15, 0.15, 0.1)) == [120, 30, 30, 20]
    assert sum(split_counts(7, (0.6, 0.15, 0.15, 0.1))) == 7
    has_defect = [i % 2 == 0 for i in range(200)]
    labels = assign_splits(has_defect, (0.6, 0.15, 0.15, 0.1), np.random.default_rng(0))
    for split, count in zip(SPLITS, (120, 30, 30, 20), strict=True):
        members = [i for i, label in enumerate(labels) if label == split]
        assert len(members) == count
        assert abs(np.mean([has_defect[i] for i in members]) - 0.5) <= 0.05


# --- reader ---


def test_items_hold_the_generated_arrays(dataset_root: Path, config: LinesConfig) -> None:
    dataset = LineDataset(dataset_root, config, include_clean=True)
    assert len(dataset) == 3 * PER_LINE and dataset.line_ids == ["mill-c", "press-a", "press-b"]
    for index, row in enumerate(dataset.rows):
        item = dataset[index]
        line = config.get(row["line_id"])
        sample = render_sample(line, int(row["sample_id"][-6:]), 3, SIZE, SIZE)
        assert item["sample_id"] == row["sample_id"] and item["line_id"] == line.id
        assert item["image"].dtype == np.uint8 and item["image"].shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(item["image"], sample.image)
        assert item["semseg"].dtype == np.int64 and item["height"].dtype == np.float32
        assert item["normals"].shape == (SIZE, SIZE, 3) and item["normals"].dtype == np.float32
        assert item["pitch_mm_per_px"] == pytest.approx(sample.pitch_mm_per_px)
        if item["present"]["semseg"]:
            np.testing.assert_array_equal(item["semseg"], sample.semseg)
        else:
            assert (item["semseg"] == -1).all()
        if item["present"]["height"]:
            np.testing.assert_array_equal(item["height"], sample.height)
            np.testing.assert_array_equal(item["height_clean"], sample.height_clean)
            np.testing.assert_array_equal(item["normals"], sample.normals)
        else:
            assert np.isnan(item["height"]).all() and np.isnan(item["height_clean"]).all()
            assert (item["normals"] == 0).all() and not item["present"]["normals"]


def test_dataset_pickles_for_dataloader_workers(dataset_root: Path, config) -> None:
    import pickle

    dataset = LineDataset(dataset_root, config, split="val")
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.sample_ids == dataset.sample_ids
    np.testing.assert_array_equal(clone[0]["image"], dataset[0]["image"])
    assert clone.lines_config.source == config.source


def test_split_filter_and_empty_split(dataset_root: Path, tmp_path: Path, config) -> None:
    train = LineDataset(dataset_root, config, split="train")
    assert len(train) == 3 * 6 and {row["split"] for row in train.rows} == {"train"}
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        LineDataset(dataset_root, config, split="dev")
    root = generate_dataset(
        tmp_path / "all-train",
        config,
        n_lines=1,
        samples_per_line=3,
        height=16,
        width=16,
        splits=(1.0, 0.0, 0.0, 0.0),
        progress=False,
    )
    with pytest.raises(DataError) as info:
        LineDataset(root, config, split="qa")
    assert f"{root}/{MANIFEST_NAME}" in str(info.value) and "split 'qa' is empty" in str(info.value)


def test_features_of_the_split(dataset_root: Path, config: LinesConfig) -> None:
    dataset = LineDataset(dataset_root, config, split="val")
    features = dataset.read_features()
    assert set(features["sample_id"].to_pylist()) == set(dataset.sample_ids)


def test_semseg_255_reads_as_invalid(copy_root: Path, config: LinesConfig) -> None:
    from PIL import Image

    number, row = first_row(copy_root, has_semseg=True)
    path = copy_root / row["semseg_path"]
    labels = np.asarray(Image.open(path)).copy()
    labels[:3] = 255
    Image.fromarray(labels).save(path)
    item = LineDataset(copy_root, config, verify_checksums=False)[number]
    assert (item["semseg"][:3] == -1).all() and (item["semseg"][3:] >= 0).all()


def test_missing_file(copy_root: Path, config: LinesConfig) -> None:
    number, row = first_row(copy_root, line_id="press-a")
    (copy_root / row["normals_path"]).unlink()
    message = dataset_error(copy_root, config, number)
    assert row["normals_path"] in message and "normals" in message and "missing" in message


def test_missing_manifest(tmp_path: Path, config: LinesConfig) -> None:
    message = dataset_error(tmp_path, config)
    assert f"{tmp_path}/{MANIFEST_NAME}" in message and "missing" in message


def test_checksum_mismatch(copy_root: Path, config: LinesConfig) -> None:
    number, row = first_row(copy_root, line_id="press-b")
    path = copy_root / row["height_path"]
    array = np.load(path)
    array[0, 0] += 1.0
    np.save(path, array)
    message = dataset_error(copy_root, config, number)
    assert row["height_path"] in message and "sha256 mismatch" in message
    LineDataset(copy_root, config, verify_checksums=False)[number]  # readable when not verified


def test_corrupt_png(copy_root: Path, config: LinesConfig) -> None:
    number, row = first_row(copy_root)
    path = copy_root / row["image_path"]
    path.write_bytes(path.read_bytes()[:40])
    message = dataset_error(copy_root, config, number, verify_checksums=False)
    assert row["image_path"] in message and "corrupt PNG" in message


def test_wrong_png_mode(copy_root: Path, config: LinesConfig) -> None:
    from PIL import Image

    number, row = first_row(copy_root)
    Image.new("L", (SIZE, SIZE)).save(copy_root / row["image_path"])
    message = dataset_error(copy_root, config, number, verify_checksums=False)
    assert row["image_path"] in message and "mode L" in message


def test_truncated_npy(copy_root: Path, config: LinesConfig) -> None:
    number, row = first_row(copy_root, line_id="press-a")
    path = copy_root / row["height_path"]
    path.write_bytes(path.read_bytes()[:-100])
    message = dataset_error(copy_root, config, number, verify_checksums=False)
    assert row["height_path"] in message and "truncated or corrupt .npy" in message


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.zeros((SIZE, SIZE, 3), dtype=np.float64), "dtype float64, expected float32"),
        (np.zeros((SIZE, SIZE + 1, 3), dtype=np.float32), "shape (24, 25, 3), expected"),
        (np.zeros((SIZE, SIZE), dtype=np.float32), "shape (24, 24), expected (24, 24, 3)"),
    ],
)
def test_wrong_dtype_or_shape(copy_root: Path, config, array: np.ndarray, expected: str) -> None:
    number, row = first_row(copy_root, line_id="press-a")
    buffer = io.BytesIO()
    np.save(buffer, array)
    (copy_root / row["normals_path"]).write_bytes(buffer.getvalue())
    message = dataset_error(copy_root, config, number, verify_checksums=False)
    assert row["normals_path"] in message and expected in message


@pytest.mark.parametrize(
    "bad_path", ["../outside.png", "images/../../outside.png", "/etc/passwd", "s3://b/x.png"]
)
def test_path_escaping_the_root(copy_root: Path, config: LinesConfig, bad_path: str) -> None:
    rewrite_manifest(copy_root, "image_path", 4, bad_path)
    message = dataset_error(copy_root, config, verify_checksums=False)
    assert f"{copy_root}/{MANIFEST_NAME}: row 4" in message and "image_path" in message


def test_symlink_out_of_the_root_is_refused(copy_root: Path, tmp_path: Path, config) -> None:
    number, row = first_row(copy_root)
    outside = tmp_path / "outside.png"
    shutil.copy(copy_root / row["image_path"], outside)
    (copy_root / row["image_path"]).unlink()
    (copy_root / row["image_path"]).symlink_to(outside)
    message = dataset_error(copy_root, config, number)
    assert row["image_path"] in message and "outside the dataset root" in message


def test_unknown_line_id(dataset_root: Path, config: LinesConfig) -> None:
    two_lines = LinesConfig.from_dict(
        {"lines": [line.model_dump(mode="json") for line in config.lines if line.id != "mill-c"]},
        source="fleet.yaml",
    )
    message = dataset_error(dataset_root, two_lines)
    assert f"{dataset_root}/{MANIFEST_NAME}" in message and "line_id" in message
    assert "unknown line 'mill-c'" in message and "fleet.yaml" in message


@pytest.mark.parametrize("bad_id", ["Press-A", "7", "press_a"])
def test_malformed_line_id(copy_root: Path, config: LinesConfig, bad_id: str) -> None:
    rewrite_manifest(copy_root, "line_id", 2, bad_id)
    message = dataset_error(copy_root, config)
    assert f"{MANIFEST_NAME}: row 2" in message and f"line_id: {bad_id!r}" in message


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("sample_id", "press-a-000000", "row 5 (press-a-000000): sample_id duplicates row 0"),
        ("split", "holdout", "row 5 (press-a-000005): split: 'holdout' is not one of"),
        ("image_path", None, "row 5 (press-a-000005): image_path: missing"),
    ],
)
def test_bad_manifest_rows(copy_root: Path, config, column: str, value, expected: str) -> None:
    rewrite_manifest(copy_root, column, 5, value)
    assert f"{copy_root}/{MANIFEST_NAME}: {expected}" in dataset_error(copy_root, config)


def test_manifest_without_a_column_or_rows(copy_root: Path, config: LinesConfig) -> None:
    table = pq.read_table(copy_root / MANIFEST_NAME)
    pq.write_table(table.drop_columns(["has_height"]), copy_root / MANIFEST_NAME)
    assert "missing column(s) has_height" in dataset_error(copy_root, config)
    pq.write_table(table.slice(0, 0), copy_root / MANIFEST_NAME)
    assert "the manifest has no rows" in dataset_error(copy_root, config)
    (copy_root / MANIFEST_NAME).write_bytes(b"not parquet")
    assert "not a readable parquet file" in dataset_error(copy_root, config)


def test_presence_without_path(copy_root: Path, config: LinesConfig) -> None:
    number, _ = first_row(copy_root, line_id="press-a")
    rewrite_manifest(copy_root, "height_path", number, None)
    message = dataset_error(copy_root, config)
    assert "height_path: missing although has_height is true" in message


def test_custom_opener_sees_relative_paths(dataset_root: Path, config: LinesConfig) -> None:
    requested: list[str] = []

    def opener(relative: str) -> bytes:
        requested.append(relative)
        return (dataset_root / relative).read_bytes()

    dataset = LineDataset("s3://bucket/datasets/v1", config, opener=opener)
    dataset[0]
    assert requested[0] == MANIFEST_NAME and all(not p.startswith("/") for p in requested)

    def failing(relative: str) -> bytes:
        raise FileNotFoundError(relative)

    with pytest.raises(DataError, match="s3://bucket/datasets/v1/manifest.parquet"):
        LineDataset("s3://bucket/datasets/v1", config, opener=failing)


def test_the_dataset_inventory_is_used_when_no_lines_config_is_given(
    copy_root: Path, config: LinesConfig
) -> None:
    without_mill_c = [line.model_dump(mode="json") for line in config.lines if line.id != "mill-c"]
    (copy_root / DATASET_LINES_NAME).write_text(yaml.safe_dump({"lines": without_mill_c}))
    with pytest.raises(DataError) as info:
        LineDataset(copy_root)
    assert "unknown line 'mill-c'" in str(info.value)
    assert f"{copy_root}/{DATASET_LINES_NAME}" in str(info.value)
    assert LineDataset(copy_root, config).line_ids == ["mill-c", "press-a", "press-b"]
    (copy_root / DATASET_LINES_NAME).write_text("lines: []\n")
    with pytest.raises(ConfigError, match=f"{copy_root}/{DATASET_LINES_NAME}: lines"):
        LineDataset(copy_root)
    (copy_root / DATASET_LINES_NAME).write_text("lines: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        LineDataset(copy_root)


def test_without_a_dataset_inventory_the_fleet_inventory_applies(dataset_root: Path) -> None:
    assert LineDataset(dataset_root).lines_config.source == str(default_lines_config())

    def s3_like(relative: str) -> bytes:  # the S3 opener: a missing object is a DataError
        if relative == DATASET_LINES_NAME:
            raise DataError(f"s3://bucket/v1/{relative}: object missing (NoSuchKey)")
        return (dataset_root / relative).read_bytes()

    dataset = LineDataset("s3://bucket/v1", opener=s3_like)
    assert dataset.lines_config.source == str(default_lines_config())


def test_check_relative_path() -> None:
    assert check_relative_path("images/a/b.png") == "images/a/b.png"
    for bad in ["", "/abs", "../x", "a/../../x", "C:\\x", "a\\b", "s3://x"]:
        with pytest.raises(ValueError):
            check_relative_path(bad)


# --- the schema derives from the task registry ---


def test_manifest_schema_of_the_synthetic_tasks_is_the_format_version_1_layout(
    dataset_root: Path,
) -> None:
    on_disk = pq.read_schema(dataset_root / MANIFEST_NAME).remove_metadata()
    assert on_disk.equals(manifest_schema(SYNTHETIC_TASKS))
    files = ("image", "semseg", "height", "height_clean", "normals")
    assert on_disk.names == [
        "sample_id",
        "line_id",
        "split",
        *[f"{name}_path" for name in files],
        "has_semseg",
        "has_height",
        "has_normals",
        *[f"sha256_{name}" for name in files],
        "camera",
        "pitch_mm_per_px",
        "image_height",
        "image_width",
        "has_defect",
        "n_defects",
    ]


def test_a_task_without_columns_is_absent_everywhere(copy_root: Path, config) -> None:
    table = pq.read_table(copy_root / MANIFEST_NAME)
    dropped = ["normals_path", "has_normals", "sha256_normals"]
    pq.write_table(table.drop_columns(dropped), copy_root / MANIFEST_NAME)
    dataset = LineDataset(copy_root, config)
    assert dataset.tasks == ("semseg", "height")
    item = dataset[0]
    assert not item["present"]["normals"] and (item["normals"] == 0).all()
    dataset.require_tasks(["semseg", "height"])
    with pytest.raises(ConfigError, match="has no normals labels"):
        dataset.require_tasks(["semseg", "normals"], "model.tasks")


def test_writer_checks_what_it_is_given(tmp_path: Path, config: LinesConfig) -> None:
    record = synthetic_record(config.lines[0], 0, 3, SIZE, SIZE)
    with pytest.raises(ConfigError, match="normals not among the files"):
        write_sample(tmp_path, record, ("semseg", "height"))
    record.labels["height"] = np.zeros((SIZE, SIZE, 1), np.float32)
    with pytest.raises(DataError, match=r"height: shape \(24, 24, 1\), expected \(24, 24\)"):
        write_sample(tmp_path, record, SYNTHETIC_TASKS)
    with pytest.raises(ConfigError, match="'depth' has no line-dataset encoding"):
        manifest_schema(("semseg", "depth"))


# --- optional part ids ---


def _with_part_ids(root: Path, part_ids: list[str | None]) -> None:
    table = pq.read_table(root / MANIFEST_NAME)
    column = pa.array(part_ids, type=pa.string())
    table = table.append_column(pa.field(PART_ID, pa.string(), nullable=True), column)
    pq.write_table(table, root / MANIFEST_NAME)


def test_part_ids_are_an_optional_nullable_column(
    dataset_root: Path, copy_root: Path, config: LinesConfig, tmp_path: Path
) -> None:
    # Without parts the schema and the writer's bytes stay the format's (no column at all).
    assert PART_ID not in pq.read_schema(dataset_root / MANIFEST_NAME).names
    assert manifest_schema(SYNTHETIC_TASKS, part_ids=True).names[-1] == PART_ID
    assert manifest_schema(SYNTHETIC_TASKS, part_ids=True).field(PART_ID).nullable
    # A manifest with the column: ids shared within one line and split, or null.
    rows = manifest_rows(copy_root)
    part_ids = [f"{row['line_id']}-{row['split']}-p{n // 2}" for n, row in enumerate(rows)]
    part_ids[0] = None
    _with_part_ids(copy_root, part_ids)
    dataset = LineDataset(copy_root, config)
    assert [row[PART_ID] for row in dataset.rows] == part_ids
    # The writer adds the column only when a sample has a part id.
    records = [synthetic_record(config.lines[0], index, 3, SIZE, SIZE) for index in range(2)]
    records[1].part_id = "bracket-7"
    written = [write_sample(tmp_path / "parts", record, SYNTHETIC_TASKS) for record in records]
    for sample in written:
        sample.set_split("test")
    write_manifest(tmp_path / "parts", written, SYNTHETIC_TASKS, {})
    assert [row[PART_ID] for row in manifest_rows(tmp_path / "parts")] == [None, "bracket-7"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("split", r"part 'p0' is on line press-a, split (val|train|test|qa), but row 0 puts it"),
        ("empty", r"part_id: '' is not a non-empty string"),
    ],
)
def test_a_part_spans_one_line_and_split(
    copy_root: Path, config: LinesConfig, change: str, expected: str
) -> None:
    rows = manifest_rows(copy_root)
    first_split = rows[0]["split"]
    other = next(n for n, row in enumerate(rows) if row["split"] != first_split)
    part_ids: list[str | None] = [None] * len(rows)
    if change == "split":
        part_ids[0] = part_ids[other] = "p0"
    else:
        part_ids[other] = ""
    _with_part_ids(copy_root, part_ids)
    assert re.search(expected, dataset_error(copy_root, config))
