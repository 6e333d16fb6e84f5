"""The roi_report KFP component runs through kfp.local in a one-step pipeline."""

import json
import warnings
from pathlib import Path

import pytest
from kfp import dsl, local

from components.artifacts import validation_problems
from components.roi_report.component import roi_report
from components.roi_report.step import HTML_NAME, MARKDOWN_NAME, ROI_NAME

pytestmark = pytest.mark.e2e


def _inspection(recall: float, frr: float) -> dict:
    return {
        "threshold": 0.4,
        "target_recall": 0.95,
        "recall": recall,
        "frr": frr,
        "n_defective": 6,
        "n_good": 6,
        "pr_curve": {"threshold": [0.4], "recall": [recall], "precision": [0.9], "frr": [frr]},
        "warnings": [],
    }


def _write_evaluation(folder: Path) -> Path:
    """A minimal contract-shaped evaluation.json: defect figures for the pilot line only."""
    scored = {"n_images": 12, "metrics": {"semseg.miou": 0.5}, "inspection": _inspection(0.9, 0.05)}
    evaluation = {
        "schema_version": 2,
        "model": {
            "name": None,
            "version": None,
            "model_id": None,
            "sha256": "c" * 64,
            "tasks": ["semseg"],
        },
        "data": {"uri": "/data", "manifest_sha256": "d" * 64, "split": "test"},
        "per_line": {"press-a": scored},
        "overall": scored,
        "warnings": [],
        "delta_m": None,
        "delta_m_reason": "no STL baselines registered",
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "evaluation.json"
    path.write_text(json.dumps(evaluation))
    return path


@dsl.pipeline(name="roi-report-only")
def roi_report_only(evaluation: str, out_dir: str) -> str:
    return roi_report(evaluation=evaluation, out_dir=out_dir).outputs["Output"]


def test_roi_component_runs_through_kfp_local(tmp_path):
    evaluation = _write_evaluation(tmp_path / "evaluate")
    out_dir = tmp_path / "roi_report"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "kfp"),
        raise_on_error=True,
    )
    with warnings.catch_warnings():
        # The project image's name has no "python" in it, which kfp.local warns about.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        task = roi_report_only(evaluation=str(evaluation), out_dir=str(out_dir))

    assert task.output == str(out_dir / ROI_NAME)
    roi = json.loads((out_dir / ROI_NAME).read_text())
    assert validation_problems(roi, "roi") == []
    assert roi["pilot_line"] == "press-a" and roi["pilot"]["inputs"]["recall"] == 0.9
    assert (out_dir / HTML_NAME).stat().st_size > 0
    assert roi["pilot"]["payback_label"] in (out_dir / MARKDOWN_NAME).read_text()
