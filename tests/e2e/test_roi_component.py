"""The roi_report KFP component runs through kfp.local in a one-step pipeline."""

import json
import warnings
from pathlib import Path

import pytest
from kfp import dsl, local

from components.artifacts import validation_problems
from components.roi_report.component import roi_report
from components.roi_report.step import HTML_NAME, MARKDOWN_NAME, ROI_NAME
from pipelines.run import task_result

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


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def evaluation_artifact(text: str, evaluation: dsl.Output[dsl.Artifact]):
    """What the evaluate step hands roi_report: a folder holding evaluation.json."""
    from pathlib import Path

    Path(evaluation.path).mkdir(parents=True)
    (Path(evaluation.path) / "evaluation.json").write_text(text)


@dsl.pipeline(name="roi-report-only")
def roi_report_only(text: str):
    made = evaluation_artifact(text=text)
    roi_report(evaluation=made.outputs["evaluation"])


def test_roi_component_runs_through_kfp_local(tmp_path):
    evaluation = _write_evaluation(tmp_path / "evaluate")
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "kfp"),
        raise_on_error=True,
    )
    with warnings.catch_warnings():
        # The project image's name has no "python" in it, which kfp.local warns about.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        roi_report_only(text=evaluation.read_text())

    (run_dir,) = (tmp_path / "kfp").iterdir()
    result = task_result(run_dir, "roi-report")
    assert result["state"] == "ran"
    out_dir = Path(result["artifacts"]["roi"])
    roi = json.loads((out_dir / ROI_NAME).read_text())
    assert validation_problems(roi, "roi") == []
    assert roi["pilot_line"] == "press-a" and roi["pilot"]["inputs"]["recall"] == 0.9
    assert (out_dir / HTML_NAME).stat().st_size > 0
    assert roi["pilot"]["payback_label"] in (out_dir / MARKDOWN_NAME).read_text()
    # The UI's copies: the report as HTML, the summary as Markdown.
    report = Path(result["artifacts"]["report"]).read_bytes()
    assert report == (out_dir / HTML_NAME).read_bytes()
    assert Path(result["artifacts"]["summary"]).read_text() == (out_dir / MARKDOWN_NAME).read_text()
