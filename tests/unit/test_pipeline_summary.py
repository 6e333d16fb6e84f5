"""The printed summary of a local run reads the steps' artefacts (pipelines/summary.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.summary import summary_lines

pytestmark = pytest.mark.unit


def _baselines(tmp_path: Path, summary: dict) -> dict:
    folder = tmp_path / "train-baselines" / "baselines"
    folder.mkdir(parents=True)
    (folder / "train_baselines.json").write_text(json.dumps(summary))
    return {
        "train-baselines": {"state": "ran", "outputs": {"Output": ""}, "artifacts": {
            "baselines": str(folder)}},
        "validate-data": {"state": "ran", "outputs": {"Output": True}, "artifacts": {
            "dataset": str(tmp_path / "validate-data" / "dataset")}},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("summary", "expected"),
    [
        ({"disabled": True}, "STL baselines: none registered for this data and none trained"),
        (
            {"trained": {"height": {}}, "reused": ["semseg"]},
            "STL baselines: trained and registered (height)",
        ),
        (
            {"trained": {}, "reused": ["semseg", "height"]},
            "STL baselines: reused from the registry (semseg, height)",
        ),
    ],
)
def test_the_baselines_line_says_what_the_step_did(tmp_path, summary, expected):
    lines = summary_lines({"tasks": _baselines(tmp_path, summary)}, "sqlite:///x.db")
    (line,) = [line for line in lines if line.startswith("STL baselines:")]
    assert line.startswith(expected), line


def test_paths_point_into_the_artefacts_and_skipped_steps_print_none(tmp_path):
    lines = summary_lines({"tasks": _baselines(tmp_path, {"disabled": True})}, "sqlite:///x.db")
    report = tmp_path / "validate-data" / "dataset" / "validation_report.html"
    assert f"validation report: {report}" in lines
    assert not [line for line in lines if line.startswith(("evaluation:", "ROI report:"))]
