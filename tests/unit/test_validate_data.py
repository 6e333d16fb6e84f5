"""The validate_data step: clean data passes; every kind of bad sample fails, named; quarantine;
self-contained report; dataset_ref.json against its schema; the `cta validate-data` exit codes."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from mvtec_layouts import write_mvtec_ad_layout
from PIL import Image

from components.artifacts import read_json, write_json_atomic
from components.validate_data.expectations import ExpectationOutcome, SuiteOutcome
from components.validate_data.report import (
    ReportInputs,
    class_frequency_columns,
    render_report,
)
from components.validate_data.step import (
    DATASET_REF_NAME,
    REPORT_NAME,
    RESULT_NAME,
    STATISTICS_NAME,
    ValidationFailed,
    data_warnings,
    run,
)
from cta_cli.main import main
from cta_model.data.importers import import_mvtec
from cta_model.data.line_dataset import MANIFEST_NAME, LineDataset, LocalOpener, sha256_hex
from cta_model.data.statistics import SEMSEG_FRACTION_COLUMNS
from cta_model.data.synthetic import CLASS_NAMES
from cta_model.data.synthetic_dataset import generate_dataset
from cta_model.errors import ConfigError, DataError

pytestmark = pytest.mark.unit

SIZE = 32
PER_LINE = 20
NORMALS_CHECKS = {
    "normals agree with the height gradient",
    "normals agree with the height gradient on slopes",
}


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("validate") / "ds"
    return generate_dataset(
        root, n_lines=2, samples_per_line=PER_LINE, height=SIZE, width=SIZE, progress=False
    )


@pytest.fixture(scope="module")
def sample_ids(dataset_root: Path) -> list[str]:
    return LineDataset(dataset_root).sample_ids


@pytest.fixture
def copy_root(dataset_root: Path, tmp_path: Path) -> Path:
    """A private copy for tests that damage files."""
    target = tmp_path / "ds"
    shutil.copytree(dataset_root, target)
    return target


def _row(root: Path, sample_id: str) -> dict:
    rows = pq.read_table(root / MANIFEST_NAME).to_pylist()
    return next(row for row in rows if row["sample_id"] == sample_id)


def _replace(root: Path, sample_id: str, modality: str, data: bytes, update_sha: bool = True):
    """Overwrite one file; with ``update_sha`` the manifest checksum follows, so that only the
    content checks can notice."""
    table = pq.read_table(root / MANIFEST_NAME)
    rows = table.to_pylist()
    row = next(row for row in rows if row["sample_id"] == sample_id)
    (root / row[f"{modality}_path"]).write_bytes(data)
    if update_sha:
        row[f"sha256_{modality}"] = sha256_hex(data)
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), root / MANIFEST_NAME)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _load_npy(root: Path, sample_id: str, modality: str) -> np.ndarray:
    return np.load(root / _row(root, sample_id)[f"{modality}_path"])


def _failure(root: Path, out: Path, **kwargs) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as caught:
        run(str(root), str(out), progress=False, **kwargs)
    return caught.value


def _failed_expectations(out: Path) -> dict[str, dict]:
    result = json.loads((out / RESULT_NAME).read_text())
    return {item["name"]: item for item in result["expectations"] if not item["success"]}


def _first_with(root: Path, sample_ids: list[str], column: str) -> str:
    """The first sample whose manifest row has ``column`` true (e.g. has_semseg)."""
    return next(sample_id for sample_id in sample_ids if _row(root, sample_id)[column])


# --- clean data ---


@pytest.fixture(scope="module")
def clean_run(dataset_root: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("clean_out")
    opened: list[str] = []
    local = LocalOpener(dataset_root)

    def recording_opener(relative: str) -> bytes:
        opened.append(relative)
        return local(relative)

    dataset_ref = run(str(dataset_root), str(out), opener=recording_opener, progress=False)
    return dataset_ref, out, opened


def test_clean_data_passes_with_a_schema_valid_dataset_ref(clean_run, dataset_root):
    dataset_ref, out, opened = clean_run
    assert dataset_ref == read_json(out / DATASET_REF_NAME, "dataset_ref")
    assert dataset_ref["passed"] is True
    assert dataset_ref["quarantine"] == []
    assert dataset_ref["uri"] == str(dataset_root.resolve())
    assert dataset_ref["manifest_sha256"] == sha256_hex((dataset_root / MANIFEST_NAME).read_bytes())
    assert MANIFEST_NAME in opened and any(path.startswith("images/") for path in opened)
    result = json.loads((out / RESULT_NAME).read_text())
    assert result["passed"] is True and result["n_samples"] == 2 * PER_LINE
    assert all(item["success"] for item in result["expectations"])
    assert {item["table"] for item in result["expectations"]} == {"samples", "lines"}
    statistics = pd.read_parquet(out / STATISTICS_NAME)
    assert len(statistics) == 2 * PER_LINE and not statistics["quarantined"].any()


def test_report_is_self_contained(clean_run):
    _, out, _ = clean_run
    report = (out / REPORT_NAME).read_text(encoding="utf-8")
    assert "http://" not in report and "https://" not in report
    assert re.search(r"<link|<script|@import|url\(", report) is None
    assert re.search(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', report)
    assert "PASSED" in report


def test_text_from_the_data_is_escaped():
    script = '<script>alert("validate")</script>'

    def expectation(name: str, **result) -> ExpectationOutcome:
        fields = {"table": "samples", "type": "t", "column": "c", "success": False}
        fields |= {"unexpected_count": 0, "unexpected_ids": []}
        return ExpectationOutcome(name=name, **(fields | result))

    report = render_report(
        ReportInputs(
            uri=f"/data/{script}",
            manifest_sha256="0" * 64,
            passed=False,
            # Every sample quarantined: no figures, the rest of the page in full.
            statistics=pd.DataFrame(
                {"sample_id": [script, "s2"], "line_id": ["press-a"] * 2, "quarantined": True}
            ),
            lines=pd.DataFrame({"line_id": ["press-a", script], "n_samples": [1, 1]}),
            outcome=SuiteOutcome(
                [
                    expectation(script, unexpected_count=1, unexpected_ids=[script]),
                    expectation("row count", table="lines", column=None, observed=script),
                    expectation("schema", error=script),
                ]
            ),
            quarantine=[script, "s2"],
            bad_samples={script: [script, "unreadable"]},
            bad_lines={script: [script]},
        )
    )
    assert "<script" not in report
    # uri (title, summary), lines (summary, table), expectation names (failed, all), its id,
    # observed, error, bad sample and its reason, bad line and its reason, quarantine.
    assert html.unescape(report).count(script) == 14
    assert "<br>unreadable" in report  # the markup the template adds is not escaped


def test_dvc_rev_comes_from_the_environment(dataset_root, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_REV", "abc123")
    assert run(str(dataset_root), str(tmp_path), progress=False)["dvc_rev"] == "abc123"


# --- bad samples ---


def test_truncated_png_fails_naming_sample_and_file(copy_root, sample_ids, tmp_path):
    sample_id = sample_ids[4]
    relative = _row(copy_root, sample_id)["image_path"]
    data = (copy_root / relative).read_bytes()
    _replace(copy_root, sample_id, "image", data[: len(data) // 2])
    failure = _failure(copy_root, tmp_path)
    assert sample_id in str(failure) and relative in str(failure)
    assert "corrupt PNG" in str(failure)
    assert failure.bad_samples == [sample_id]
    assert "files readable, checksums match" in failure.failed_expectations
    # Every output is still there, passed=false.
    dataset_ref = read_json(tmp_path / DATASET_REF_NAME, "dataset_ref")
    assert dataset_ref["passed"] is False
    assert sample_id in (tmp_path / REPORT_NAME).read_text()
    assert (tmp_path / STATISTICS_NAME).exists()


def test_checksum_mismatch_fails(copy_root, sample_ids, tmp_path):
    sample_id = sample_ids[1]
    height = _load_npy(copy_root, sample_id, "height")
    height[0, 0] += 1.0  # a valid file, but not the one the manifest describes
    _replace(copy_root, sample_id, "height", _npy(height), update_sha=False)
    failure = _failure(copy_root, tmp_path)
    assert "sha256 mismatch" in str(failure)
    assert failure.bad_samples == [sample_id]


def test_negated_normals_fail_only_the_consistency_check(copy_root, sample_ids, tmp_path):
    sample_id = sample_ids[2]
    normals = _load_npy(copy_root, sample_id, "normals")
    _replace(copy_root, sample_id, "normals", _npy(-normals))  # checksum updated: files "fine"
    failure = _failure(copy_root, tmp_path)
    failed = _failed_expectations(tmp_path)
    assert set(failed) == NORMALS_CHECKS
    assert all(item["unexpected_ids"] == [sample_id] for item in failed.values())
    assert failure.bad_samples == [sample_id]
    assert "normals agree with the height gradient" in str(failure)


def test_y_up_normals_fail_the_slope_check(copy_root, sample_ids, tmp_path):
    # A +y-up convention leaves flat pixels right: only the tilted pixels show it.
    sample_id = sample_ids[3]
    normals = _load_npy(copy_root, sample_id, "normals")
    normals[..., 1] *= -1
    _replace(copy_root, sample_id, "normals", _npy(normals))
    failure = _failure(copy_root, tmp_path)
    failed = _failed_expectations(tmp_path)
    assert set(failed) == {"normals agree with the height gradient on slopes"}
    assert failure.bad_samples == [sample_id]


def test_out_of_range_class_id_fails_naming_the_sample(copy_root, sample_ids, tmp_path):
    sample_id = _first_with(copy_root, sample_ids, "has_semseg")
    labels = np.asarray(Image.open(copy_root / _row(copy_root, sample_id)["semseg_path"]))
    labels = labels.copy()
    labels[0, 0] = 12
    _replace(copy_root, sample_id, "semseg", _png(labels))
    failure = _failure(copy_root, tmp_path)
    failed = _failed_expectations(tmp_path)
    assert failed["semseg class ids in [0, NUM_CLASSES)"]["unexpected_ids"] == [sample_id]
    assert f"{sample_id}: semseg class ids in [0, NUM_CLASSES): semseg_max_class=12" in str(failure)


def test_infinite_height_fails(copy_root, sample_ids, tmp_path):
    sample_id = sample_ids[PER_LINE + 1]  # a press-b sample
    height = _load_npy(copy_root, sample_id, "height")
    height[5, 5] = np.inf
    _replace(copy_root, sample_id, "height", _npy(height))
    failure = _failure(copy_root, tmp_path)
    failed = _failed_expectations(tmp_path)
    assert failed["height has no infinities"]["unexpected_ids"] == [sample_id]
    assert sample_id in str(failure)


# --- quarantine ---


def test_quarantining_the_bad_sample_passes_and_is_listed(copy_root, sample_ids, tmp_path):
    bad = sample_ids[0]
    height = _load_npy(copy_root, bad, "height")
    height[1, 1] = np.inf
    _replace(copy_root, bad, "height", _npy(height))
    quarantine = tmp_path / "quarantine.txt"
    quarantine.write_text(f"# known sensor glitch\n{bad}\n\n{bad}\n")
    out = tmp_path / "out"
    dataset_ref = run(str(copy_root), str(out), quarantine=str(quarantine), progress=False)
    assert dataset_ref["passed"] is True
    assert dataset_ref["quarantine"] == [bad]
    assert read_json(out / DATASET_REF_NAME, "dataset_ref") == dataset_ref
    result = json.loads((out / RESULT_NAME).read_text())
    assert result["n_quarantined"] == 1 and result["n_validated"] == 2 * PER_LINE - 1
    statistics = pd.read_parquet(out / STATISTICS_NAME)
    assert statistics.loc[statistics["quarantined"], "sample_id"].tolist() == [bad]
    assert "Quarantined samples (1)" in (out / REPORT_NAME).read_text()


def test_quarantine_as_json_list(dataset_root, sample_ids, tmp_path):
    quarantine = tmp_path / "quarantine.json"
    quarantine.write_text(json.dumps(sample_ids[:2]))
    dataset_ref = run(str(dataset_root), str(tmp_path), quarantine=str(quarantine), progress=False)
    assert dataset_ref["quarantine"] == sample_ids[:2]


def test_unknown_quarantine_id_is_an_error_naming_the_file(dataset_root, sample_ids, tmp_path):
    quarantine = tmp_path / "quarantine.txt"
    quarantine.write_text(f"{sample_ids[0]}\npress-a-999999\n")
    with pytest.raises(ConfigError, match=r"quarantine\.txt: 1 unknown sample id.*press-a-999999"):
        run(str(dataset_root), str(tmp_path / "out"), quarantine=str(quarantine), progress=False)
    assert not (tmp_path / "out" / DATASET_REF_NAME).exists()


# --- artefact helpers ---


def test_dataset_ref_schema_rejects_unknown_and_malformed_fields(tmp_path):
    good = {
        "uri": "/data",
        "manifest_sha256": "0" * 64,
        "dvc_rev": None,
        "passed": True,
        "quarantine": ["a"],
    }
    write_json_atomic(tmp_path / "ok.json", good, "dataset_ref")
    with pytest.raises(DataError, match=r"bad\.json: extra: unknown field"):
        write_json_atomic(tmp_path / "bad.json", {**good, "extra": 1}, "dataset_ref")
    assert not (tmp_path / "bad.json").exists()
    (tmp_path / "read.json").write_text(json.dumps({**good, "quarantine": ["a", 7]}))
    with pytest.raises(DataError, match=r"read\.json: quarantine\[1\]: 7 is not of type"):
        read_json(tmp_path / "read.json", "dataset_ref")
    missing = {key: value for key, value in good.items() if key != "passed"}
    with pytest.raises(DataError, match=r"x\.json: passed: required field missing"):
        write_json_atomic(tmp_path / "x.json", missing, "dataset_ref")


# --- CLI ---


def test_cli_exit_codes(dataset_root, copy_root, sample_ids, tmp_path):
    runner = CliRunner()
    passed = runner.invoke(main, ["validate-data", str(dataset_root), "--out", str(tmp_path)])
    assert passed.exit_code == 0, passed.output
    assert f"report: {tmp_path / REPORT_NAME}" in passed.output

    sample_id = sample_ids[5]
    relative = _row(copy_root, sample_id)["image_path"]
    (copy_root / relative).write_bytes(b"not a png")
    failed = runner.invoke(main, ["validate-data", str(copy_root), "--out", str(tmp_path)])
    assert failed.exit_code == 1
    assert sample_id in failed.stderr and "files readable, checksums match" in failed.stderr
    assert "report:" in failed.stderr


def test_nan_normals_where_the_label_is_present_fail(copy_root, sample_ids, tmp_path):
    # Height may be NaN (sensor drop-out); normals are complete labels, so NaN there is corrupt.
    sample_id = _first_with(copy_root, sample_ids, "has_normals")
    normals = _load_npy(copy_root, sample_id, "normals")
    normals[3, 3] = np.nan
    _replace(copy_root, sample_id, "normals", _npy(normals))
    failure = _failure(copy_root, tmp_path)
    assert sample_id in str(failure)


# --- the dataset's own classes, and the warning about defect-free training data ---


def test_synthetic_data_with_defects_in_train_gives_no_warning(clean_run):
    _, out, _ = clean_run
    result = json.loads((out / RESULT_NAME).read_text())
    assert result["warnings"] == []
    assert result["class_names"] == list(CLASS_NAMES)
    assert 'class="warning"' not in (out / REPORT_NAME).read_text()


def test_class_frequency_bars_use_the_dataset_names():
    assert class_frequency_columns(("good", "defect")) == [
        ("good", "semseg_frac_conveyor"),
        ("defect", "semseg_frac_part_surface"),
    ]
    many = tuple(f"type{i}" for i in range(13))
    bars = class_frequency_columns(many)
    assert [label for label, _ in bars][:10] == list(many[:10])
    assert bars[-1] == ("ids 10-12 (3 classes)", "semseg_frac_unknown")


def _statistics(split_shares: dict[str, float], column: str = "semseg_frac_scratch"):
    """One train sample per line with ``column`` = the given share."""
    frame = pd.DataFrame(
        {
            "line_id": list(split_shares),
            "split": "train",
            **{name: 0.0 for name in SEMSEG_FRACTION_COLUMNS},
            "semseg_frac_unknown": 0.0,
        }
    )
    frame[column] = list(split_shares.values())
    return frame


def test_warning_names_the_lines_whose_train_split_has_no_reject_pixel():
    # configs/inspection.yaml: 5 scratch, 6 dent, 7 bump, 8 crack; stain (9) is no reject.
    assert data_warnings(_statistics({"press-a": 0.01, "press-b": 0.02}), None) == []
    (warning,) = data_warnings(_statistics({"press-a": 0.01, "press-b": 0.0}), None)
    assert "train split of line(s) press-b has no reject-class pixel" in warning
    assert "configs/inspection.yaml" in warning and "press-a" not in warning
    assert "training needs data.anomalies or labelled defects" in warning
    stains = _statistics({"press-a": 0.3}, "semseg_frac_stain")
    assert len(data_warnings(stains, None)) == 1
    # The dataset's own reject classes win; ids past the synthetic ones are pooled.
    assert data_warnings(stains, (9,)) == []
    assert len(data_warnings(_statistics({"a": 0.0}), (12,))) == 1
    assert data_warnings(_statistics({"a": 0.1}, "semseg_frac_unknown"), (12,)) == []
    no_train = _statistics({"a": 0.0}).assign(split="val")
    assert data_warnings(no_train, None) == []  # the split-size expectation says it


@pytest.fixture(scope="module")
def imported_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MVTec AD layout imported: classes good, crack, hole; good-only train split."""
    base = tmp_path_factory.mktemp("imported")
    source = write_mvtec_ad_layout(base / "src", ("wood",), n_train=2, n_test=2)
    return import_mvtec("mvtec-ad", source, base / "ds", progress=False).root


def test_class_ids_are_checked_against_the_dataset_class_count(imported_root, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(imported_root, root)
    sample_id = next(
        row["sample_id"] for row in LineDataset(root).rows if "-test-crack-" in row["sample_id"]
    )
    labels = np.asarray(Image.open(root / _row(root, sample_id)["semseg_path"])).copy()
    labels[labels > 0] = 4  # a synthetic id, but this dataset has 3 classes
    _replace(root, sample_id, "semseg", _png(labels))
    failure = _failure(root, tmp_path / "out")
    failed = _failed_expectations(tmp_path / "out")
    assert failed["semseg class ids in [0, NUM_CLASSES)"]["unexpected_ids"] == [sample_id]
    assert "semseg_max_class=4" in str(failure)


def test_imported_dataset_warns_and_leaves_the_synthetic_mask_check_out(imported_root, tmp_path):
    dataset_ref = run(str(imported_root), str(tmp_path), progress=False)
    assert dataset_ref["passed"] is True
    result = json.loads((tmp_path / RESULT_NAME).read_text())
    assert result["class_names"] == ["good", "crack", "hole"]
    (warning,) = result["warnings"]
    assert "line(s) wood has no reject-class pixel" in warning
    assert "the dataset's reject_classes" in warning
    statistics = pd.read_parquet(tmp_path / STATISTICS_NAME)
    assert statistics["defect_height_anomaly"].isna().all()
    assert statistics["defect_pixels"].isna().all()
    report = html.unescape((tmp_path / REPORT_NAME).read_text())
    assert warning in report
