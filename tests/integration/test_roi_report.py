"""cta roi-report on contract-shaped evaluation.json files: roi.json validates, report.html is
self-contained and shows the pilot payback on the first screen (headless Chromium)."""

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_gate import inspection_entry  # the contract-shaped inspection entry (same folder)

from components.artifacts import validation_problems
from components.roi_report.report import OWN_QUALITY_SOURCE, format_money, format_payback
from components.roi_report.step import (
    HTML_NAME,
    MARKDOWN_NAME,
    QUALITY_OWN,
    QUALITY_POOLED,
    QUALITY_WORST_CASE,
    ROI_NAME,
    run,
)
from cta_cli.commands.roi_report import roi_report
from cta_model.errors import DataError

pytestmark = pytest.mark.integration

N_REPLICATES = 200
VIEWPORT = {"width": 1280, "height": 800}
SCRIPT = '<script>alert("roi")</script>'
# The per-line table fits the page: no column hidden behind a scroll bar.
PER_LINE_TABLE_FITS = (
    "(s => s.scrollWidth <= s.clientWidth)(document.querySelector('#per-line').parentElement)"
)


def _inspection(recall: float, frr: float) -> dict:
    return inspection_entry(10, 8, recall, frr)


def _scored(recall: float | None, frr: float | None) -> dict:
    return {
        "n_images": 18,
        "n_defective": 10 if recall is not None else None,
        "metrics": {"semseg.miou": 0.61, "height.abs_err_mm": 0.08, "normals.mean_deg": 9.5},
        "inspection": None if recall is None else _inspection(recall, frr),
        "dimensions": {"n_features": 12, "mae_mm": 0.05, "p95_mm": 0.12, "in_tol_acc": 0.92},
        "robustness": {
            "boundary": {"semseg.miou": 0.4},
            "dropout": {"height.abs_err_mm": 0.2},
        },
    }


def write_evaluation(folder: Path, *, complete: bool = True) -> Path:
    """An evaluation.json as the contract describes it, for press-a (pilot) and press-b.

    complete=False: no champion, no baselines, no bootstrap, no STL latency, no maps.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_line = {"press-a": _scored(0.92, 0.04), "press-b": _scored(0.85, 0.06)}
    replicates = {
        line_id: {
            "recall": np.clip(rng.normal(entry["inspection"]["recall"], 0.05, N_REPLICATES), 0, 1)
            .round(4)
            .tolist(),
            "frr": np.clip(rng.normal(entry["inspection"]["frr"], 0.02, N_REPLICATES), 0, 1)
            .round(4)
            .tolist(),
        }
        for line_id, entry in per_line.items()
    }
    maps = []
    if complete:
        (folder / "explain").mkdir(exist_ok=True)
        for name in ("affinity_semseg.png", "affinity_fused.png"):
            image = (rng.random((32, 32, 3)) * 255).astype("uint8")
            Image.fromarray(image).save(folder / "explain" / name)
            maps.append(f"explain/{name}")
    quantiles = {"p05": -0.01, "p50": 0.02, "p95": 0.05}
    evaluation = {
        "schema_version": 2,
        "model": {
            "name": "cta-inspection",
            "version": None,
            "model_id": "m-0123",
            "sha256": "a" * 64,
            "tasks": ["semseg", "height", "normals"],
        },
        "data": {
            "uri": "/data/lines",
            "manifest_sha256": "b" * 64,
            "split": "test",
            "dvc_rev": None,
            "quarantine_skipped": 0,
        },
        "metric_settings": {"reduction": "pooled", "miou_rule": "nanmean_union"},
        "per_line": per_line,
        "overall": _scored(0.9, 0.05),
        "warnings": [],
        "delta_m": {
            "delta_m_primary_pct_higher_better": 3.1,
            "delta_m_task_avg_pct_higher_better": 2.4,
            "delta_m_all_metrics_pct_lower_better": -2.0,
            "per_task_pct": {"semseg": 4.0, "height": -1.2, "normals": 6.5},
            "baselines": {
                task: {"name": f"cta-inspection-stl-{task}", "version": "1", "metrics": {}}
                for task in ("semseg", "height", "normals")
            },
        }
        if complete
        else None,
        "delta_m_reason": None if complete else "no STL baselines registered",
        "vs_champion": {
            "name": "cta-inspection",
            "version": "3",
            "model_id": "m-champ",
            "metrics": {
                "semseg": {
                    "metric": "miou",
                    "candidate": 0.61,
                    "champion": 0.59,
                    "diff_higher_better": 0.02,
                    **quantiles,
                },
                "height": {
                    "metric": "abs_err_mm",
                    "candidate": 0.08,
                    "champion": 0.09,
                    "diff_higher_better": 0.01,
                    **quantiles,
                },
            },
            "inspection": {"recall": quantiles, "frr": quantiles, "image_auroc": quantiles},
        }
        if complete
        else None,
        "vs_champion_reason": None if complete else "no champion registered",
        "bootstrap": {"unit": "image", "n": N_REPLICATES, "seed": 0, "replicates": replicates}
        if complete
        else None,
        "latency": {
            "device": "cpu",
            "batch": 1,
            "image_size": [32, 32],
            "p50_ms": 5.0,
            "p95_ms": 7.0,
            "images_per_s": 200.0,
            "stl": {"n_models": 3, "p50_ms": 12.5, "images_per_s": 80.0} if complete else None,
        },
        "explain": {"affinity_maps": maps, "pixels": [[4, 5], [20, 9]]},
    }
    path = folder / "evaluation.json"
    path.write_text(json.dumps(evaluation, indent=1))
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("roi")
    evaluation = write_evaluation(folder / "evaluate")
    out = folder / "report"
    result = CliRunner().invoke(roi_report, ["--evaluation", str(evaluation), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "pilot press-a: payback" in result.output
    return out, json.loads((out / ROI_NAME).read_text())


def test_roi_json_validates_and_prices_every_line(report):
    out, roi = report
    assert validation_problems(roi, "roi") == []
    assert roi["pilot_line"] == "press-a"
    assert roi["pilot"] == roi["per_line"]["press-a"]
    # Every line of configs/lines.yaml; the two not evaluated use the pooled figures.
    assert list(roi["per_line"]) == ["press-a", "press-b", "mill-c", "mill-d"]
    assert roi["per_line"]["press-a"]["inputs"]["recall"] == 0.92
    assert roi["per_line"]["mill-d"]["inputs"]["quality_source"] == QUALITY_POOLED
    assert roi["per_line"]["mill-d"]["inputs"]["recall"] == 0.9
    fleet = roi["fleet"]
    assert fleet["annual_saving"] == pytest.approx(
        sum(entry["annual_saving"] for entry in roi["per_line"].values())
    )
    assert 0 <= roi["pilot"]["p_roi_positive"] <= 1
    assert roi["pilot"]["roi_pct_p10"] <= roi["pilot"]["roi_pct_p50"] <= roi["pilot"]["roi_pct_p90"]
    comparison = roi["multitask_vs_stl"]
    assert comparison["latency_ratio_source"] == "measured"
    assert comparison["latency_ratio"] == pytest.approx(200.0 / 80.0)
    assert comparison["n_tasks"] == 3
    assert (out / MARKDOWN_NAME).read_text().startswith("# Return on investment")
    # The per-line table notes only the lines priced without their own figures.
    assert OWN_QUALITY_SOURCE == QUALITY_OWN
    assert roi["per_line"]["press-a"]["inputs"]["quality_source"] == QUALITY_OWN
    markdown_rows = (out / MARKDOWN_NAME).read_text().splitlines()
    assert [row for row in markdown_rows if row.startswith("| mill-d ")][0].endswith("(pooled) |")
    assert [row for row in markdown_rows if row.startswith("| press-b ")][0].endswith("% |")


def test_report_is_self_contained(report):
    out, _ = report
    text = (out / HTML_NAME).read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text and "<script" not in text
    # Charts (cash flow, ROI distribution, tornado, quality) and both affinity maps embedded.
    assert text.count('src="data:image/png;base64,') == 6
    assert "explain/affinity_fused.png" in text
    assert "no-champion" not in text and "no-baselines" not in text


def test_report_in_headless_chromium(report):
    from playwright.sync_api import sync_playwright

    out, roi = report
    html_path = out / HTML_NAME
    requests, errors = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.on("request", lambda request: requests.append(request.url))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(html_path.as_uri(), wait_until="load")
            screenshot = page.screenshot()
            payback = page.locator("#pilot-payback-months")
            payback_text = payback.inner_text()
            npv_text = page.locator("#pilot-npv").inner_text()
            box = payback.bounding_box()
            images_loaded = page.evaluate(
                "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
            )
            heading = page.locator("h1").inner_text()
            identity = page.locator("#model-identity").inner_text()
            table_fits = page.evaluate(PER_LINE_TABLE_FITS)
        finally:
            browser.close()

    assert errors == []
    assert [url for url in requests if not url.startswith("data:")] == [html_path.as_uri()]
    pixels = np.asarray(Image.open(io.BytesIO(screenshot)).convert("L"), dtype=float)
    assert pixels.var() > 100.0
    assert payback_text == format_payback(roi["pilot"]["payback_months"])
    assert payback_text == roi["pilot"]["payback_label"]
    assert npv_text == format_money(roi["pilot"]["npv"], roi["currency"])
    assert box is not None and box["y"] + box["height"] < VIEWPORT["height"]
    assert images_loaded
    # Named by the model's name; roi-report runs before registration, so no version yet.
    assert heading == "Return on investment: cta-inspection"
    assert identity.startswith("unregistered (model id m-0123)")
    assert table_fits


def test_losing_model_report_fits_the_page(tmp_path):
    # Wide negative figures (ROI P10 / P50 / P90 of -20,000 %) wrap instead of pushing
    # columns off the page.
    evaluation = write_evaluation(tmp_path / "evaluate")
    data = json.loads(evaluation.read_text())
    data["per_line"]["press-a"]["inspection"] |= {"recall": 0.1, "frr": 0.6}
    replicates = data["bootstrap"]["replicates"]["press-a"]
    replicates["recall"] = [0.1 + (r - 0.92) / 2 for r in replicates["recall"]]
    replicates["frr"] = [min(1.0, f + 0.56) for f in replicates["frr"]]
    evaluation.write_text(json.dumps(data))
    roi = run(evaluation, tmp_path / "report")
    assert roi["recommendation"]["verdict"] == "hold" and roi["pilot"]["roi_pct_p90"] < -10_000

    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto((tmp_path / "report" / HTML_NAME).as_uri(), wait_until="load")
            table_fits = page.evaluate(PER_LINE_TABLE_FITS)
            pilot_row = page.locator("#per-line tr").nth(1).inner_text()
        finally:
            browser.close()
    assert table_fits
    assert pilot_row.startswith("press-a (pilot)") and "never" in pilot_row


def test_cli_model_version_names_the_registered_model(tmp_path):
    evaluation = write_evaluation(tmp_path / "evaluate", complete=False)
    out = tmp_path / "report"
    result = CliRunner().invoke(
        roi_report,
        ["--evaluation", str(evaluation), "--out", str(out), "--model-version", "3"],
    )
    assert result.exit_code == 0, result.output
    roi = json.loads((out / ROI_NAME).read_text())
    assert roi["model"]["version"] == "3" and roi["model"]["model_id"] == "m-0123"
    assert validation_problems(roi, "roi") == []
    text = (out / HTML_NAME).read_text(encoding="utf-8")
    assert "<title>ROI: cta-inspection v3</title>" in text
    assert "<h1>Return on investment: cta-inspection v3</h1>" in text
    assert "registered version 3, model id m-0123" in text
    assert (out / MARKDOWN_NAME).read_text().startswith("# Return on investment: cta-inspection v3")


def test_a_model_version_other_than_the_evaluated_one_is_refused(tmp_path):
    evaluation = write_evaluation(tmp_path / "evaluate", complete=False)
    data = json.loads(evaluation.read_text())
    data["model"]["version"] = "2"
    evaluation.write_text(json.dumps(data))
    with pytest.raises(DataError, match="model.version is '2'.*'3'"):
        run(evaluation, tmp_path / "report", model_version="3")
    assert run(evaluation, tmp_path / "report", model_version="2")["model"]["version"] == "2"


def test_missing_sections_are_said_not_hidden(tmp_path):
    evaluation = write_evaluation(tmp_path / "evaluate", complete=False)
    roi = run(evaluation, tmp_path / "report")
    assert roi["pilot"]["p_roi_positive"] is None and roi["pilot"]["roi_pct_p50"] is None
    assert roi["multitask_vs_stl"]["latency_ratio_source"] == "assumed"
    assert roi["multitask_vs_stl"]["latency_ratio"] == 3.0
    text = (tmp_path / "report" / HTML_NAME).read_text(encoding="utf-8")
    assert "No champion yet: no champion registered" in text
    assert "No baselines: no STL baselines registered" in text
    assert "No affinity maps in evaluation.json" in text
    assert "No bootstrap replicates" in text


def test_money_figures_match_formulas_in_the_markdown(report):
    out, roi = report
    markdown = (out / MARKDOWN_NAME).read_text()
    assert format_payback(roi["pilot"]["payback_months"]) in markdown
    assert format_money(roi["pilot"]["npv"], roi["currency"]) in markdown
    for formula in roi["formulas"].values():
        assert formula in markdown


def test_evaluation_of_a_line_outside_the_fleet_is_refused(tmp_path):
    evaluation = write_evaluation(tmp_path / "evaluate", complete=False)
    data = json.loads(evaluation.read_text())
    data["per_line"]["press-zz"] = data["per_line"].pop("press-b")
    evaluation.write_text(json.dumps(data))
    with pytest.raises(DataError, match="press-zz"):
        run(evaluation, tmp_path / "report")
    assert not (tmp_path / "report" / ROI_NAME).exists()


def test_unmeasurable_quality_is_priced_at_the_worst_case(tmp_path):
    # A test split without defective images has no recall: r = 0, and f = 1 where no good
    # image either, so the report can only say "never" and "hold".
    evaluation = write_evaluation(tmp_path / "evaluate", complete=False)
    data = json.loads(evaluation.read_text())
    for entry in [*data["per_line"].values(), data["overall"]]:
        entry["inspection"] = None
    data["per_line"]["press-b"]["inspection"] = _inspection(0.85, 0.06) | {"recall": None}
    evaluation.write_text(json.dumps(data))
    roi = run(evaluation, tmp_path / "report")
    pilot_inputs = roi["pilot"]["inputs"]
    assert (pilot_inputs["recall"], pilot_inputs["frr"]) == (0.0, 1.0)
    assert pilot_inputs["quality_source"] == QUALITY_WORST_CASE
    press_b = roi["per_line"]["press-b"]["inputs"]
    assert (press_b["recall"], press_b["frr"]) == (0.0, 0.06)
    assert press_b["quality_source"] == f"recall {QUALITY_WORST_CASE}, frr line"
    assert roi["pilot"]["payback_label"] == "never"
    assert roi["recommendation"]["verdict"] == "hold"


def test_cli_names_a_bad_config(tmp_path):
    evaluation = write_evaluation(tmp_path / "evaluate", complete=False)
    bad = tmp_path / "roi.yaml"
    bad.write_text("currency: EUR\n")
    result = CliRunner().invoke(
        roi_report, ["--evaluation", str(evaluation), "--out", str(tmp_path), "--roi-config", bad]
    )
    assert result.exit_code != 0
    assert f"{bad}: horizon_years: Field required" in str(result.exception)


def test_embedded_maps_are_the_files(report, tmp_path):
    out, _ = report
    text = (out / HTML_NAME).read_text(encoding="utf-8")
    start = text.index('alt="explain/affinity_fused.png" src="data:image/png;base64,')
    encoded = text[start:].split("base64,", 1)[1].split('"', 1)[0]
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert image.size == (32, 32)


@pytest.mark.parametrize("complete", [True, False])
def test_text_from_the_evaluation_is_escaped(tmp_path, complete):
    evaluation = write_evaluation(tmp_path / "evaluate", complete=complete)
    data = json.loads(evaluation.read_text())
    data["model"]["name"] = SCRIPT  # the page title and heading
    if complete:
        data["vs_champion"]["name"] = SCRIPT
        data["vs_champion"]["metrics"]["semseg"]["metric"] = SCRIPT
        data["explain"]["affinity_maps"].append(f"explain/{SCRIPT}.png")  # listed as missing
        shown = 5
    else:
        data["vs_champion_reason"] = data["delta_m_reason"] = SCRIPT
        shown = 4
    evaluation.write_text(json.dumps(data))
    run(evaluation, tmp_path / "report")
    text = (tmp_path / "report" / HTML_NAME).read_text(encoding="utf-8")
    assert "<script" not in text
    assert html.unescape(text).count(SCRIPT) == shown


def test_evaluation_warnings_lead_the_report(tmp_path):
    evaluation = write_evaluation(tmp_path / "evaluate", complete=False)
    data = json.loads(evaluation.read_text())
    warning = "line press-a: val cannot reach the target recall 0.95 (recall 0.700 at 0.05)"
    data["warnings"] = [warning]
    evaluation.write_text(json.dumps(data))
    roi = run(evaluation, tmp_path / "report")
    assert roi["evaluation_warnings"] == [warning]
    html = (tmp_path / "report" / HTML_NAME).read_text(encoding="utf-8")
    assert html.index('id="evaluation-warnings"') < html.index('id="executive-summary"')
    assert warning in html
    assert f"- {warning}" in (tmp_path / "report" / MARKDOWN_NAME).read_text()
    # without warnings there is no box
    data["warnings"] = []
    evaluation.write_text(json.dumps(data))
    run(evaluation, tmp_path / "plain")
    assert 'id="evaluation-warnings"' not in (tmp_path / "plain" / HTML_NAME).read_text()
