"""Line monitoring end to end: two real line servers write serving statistics; a relit replay
of one line's qa split is flagged as drift, an unshifted replay of the other is not."""

from __future__ import annotations

import html
import io
import json
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cta_cli.commands.monitor import monitor

pytestmark = pytest.mark.integration

LINES = ("press-a", "press-b")
THRESHOLD = 0.4
WINDOWS_DEADLINE_S = 30.0


def wait_for_closed_windows(stats: Path, sent: dict[str, int]) -> None:
    """Until the servers' closed statistics windows (the stats-*.jsonl files, written atomically
    when a window ends) hold every image sent to each line; fails past the deadline."""
    deadline = time.monotonic() + WINDOWS_DEADLINE_S
    while True:
        written = Counter(
            json.loads(row)["line_id"]
            for path in stats.glob("stats-*.jsonl")
            for row in path.read_text().splitlines()
        )
        if all(written[line] >= n for line, n in sent.items()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"after {WINDOWS_DEADLINE_S} s the closed windows hold {dict(written)} of {sent}"
            )
        time.sleep(0.05)


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    """A dataset with enough qa images per line and a model folder whose
    reference_stats.parquet comes from the val split, as the trainer writes it."""
    import pyarrow.parquet as pq

    from cta_model.data.line_dataset import LineDataset
    from cta_model.data.synthetic import CLASS_NAMES
    from cta_model.data.synthetic_dataset import generate_dataset
    from cta_model.inference import Predictor
    from cta_model.inspection import ScoreDefinition
    from cta_model.model_folder import save_model_folder
    from cta_model.nn.models import ModelSpec, build_model
    from cta_model.training.reference_stats import REFERENCE_STATS_FILE, reference_statistics

    root = tmp_path_factory.mktemp("monitor")
    data = generate_dataset(
        root / "data",
        n_lines=2,
        samples_per_line=60,
        height=32,
        width=32,
        seed=3,
        splits=(0.3, 0.35, 0.05, 0.3),
        progress=False,
    )
    spec = ModelSpec(
        arch="hps",
        tasks=("semseg", "height", "normals"),
        input_size=(32, 32),
        backbone="resnet18",
        output_stride=8,
        num_classes=len(CLASS_NAMES),
    )
    model = build_model(spec)
    # The model names its own reject classes, as the trainer writes them.
    score = ScoreDefinition((5, 6, 7, 8), 3)
    draft = save_model_folder(model, root / "draft", class_names=CLASS_NAMES, inspection=score)
    table = reference_statistics(
        Predictor.from_folder(draft), LineDataset(data, split="val"), CLASS_NAMES
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    folder = save_model_folder(
        model,
        root / "model",
        class_names=CLASS_NAMES,
        inspection=score,
        extra_files={REFERENCE_STATS_FILE: buffer.getvalue()},
    )
    # The 32 px scenes cannot show the real lines' smallest defects: no resolution rule here.
    lines = yaml.safe_load(Path("configs/lines.yaml").read_text())
    for line in lines["lines"]:
        line.pop("min_defect_width_mm", None)
    lines_config = root / "lines.yaml"
    lines_config.write_text(yaml.safe_dump(lines))
    return {"data": data, "model": folder, "root": root, "lines_config": lines_config}


def test_relit_line_drifts_and_the_unshifted_line_does_not(monitored, tmp_path, monkeypatch):
    from components.monitor.replay import replay_qa
    from components.serve.process import start_server

    monkeypatch.delenv("CTA_WEBHOOK_URL", raising=False)
    stats = tmp_path / "stats"
    config = tmp_path / "monitor.yaml"
    settings = yaml.safe_load(Path("configs/monitor.yaml").read_text())
    config.write_text(yaml.safe_dump({**settings, "min_samples": 15}))
    servers = {
        line: start_server(
            str(monitored["model"]),
            line=line,
            threshold=THRESHOLD,
            lines_config=str(monitored["lines_config"]),
            stats_dir=str(stats),
            stats_window_s=1,
        )
        for line in LINES
    }
    try:
        shifted = replay_qa(
            servers["press-a"].url, str(monitored["data"]), "press-a", brightness=1.6
        )
        plain = replay_qa(servers["press-b"].url, str(monitored["data"]), "press-b")
        assert shifted["n_errors"] == plain["n_errors"] == 0
        # The servers' own window rotation, not their final flush on stop, writes the rows.
        wait_for_closed_windows(stats, {"press-a": shifted["n_sent"], "press-b": plain["n_sent"]})
    finally:
        for server in servers.values():
            server.stop()
    reports = {}
    for line in LINES:
        out = tmp_path / line
        result = CliRunner().invoke(
            monitor,
            [
                "--line",
                line,
                "--stats-dir",
                str(stats),
                "--out",
                str(out),
                "--model",
                str(monitored["model"]),
                "--config",
                str(config),
            ],
        )
        assert result.exit_code == 0, result.output
        reports[line] = json.loads((out / "monitor.json").read_text())
        html = (out / "monitor.html").read_text()
        assert "data:image/png;base64," in html and "http" not in html.split("<body>")[1]
    drifted, calm = reports["press-a"], reports["press-b"]
    assert drifted["recent"]["n_images"] == shifted["n_sent"] >= 15
    assert drifted["drifted"] and "brightness" in drifted["moved"]
    assert "has DRIFTED" in drifted["summary"] and "brightness" in drifted["summary"]
    assert drifted["statistics"]["brightness"]["recent_mean"] > (
        drifted["statistics"]["brightness"]["reference_mean"] * 1.3
    )
    assert not calm["drifted"] and calm["moved"] == [], calm["statistics"]
    assert "has not drifted" in calm["summary"]
    # The defect score is monitored like any statistic; the reject rate is the servers' own
    # verdict, set beside the reference images' rate at the same threshold.
    for report in reports.values():
        assert "pred_defect_score" in report["statistics"]
        rates = report["defect_rate"]
        assert rates["threshold"] == THRESHOLD
        assert 0.0 <= rates["recent_reject_rate"] <= 1.0
        assert 0.0 <= rates["reference_reject_rate"] <= 1.0
        assert all(0.0 <= w["reject_rate"] <= 1.0 for w in report["windows"])
    assert plain["threshold"] == THRESHOLD and 0 < plain["n_labelled"] <= plain["n_sent"]


def test_too_few_images_is_never_called_drift(monitored, tmp_path):
    from components.monitor.step import run

    stats = tmp_path / "stats"
    stats.mkdir()
    row = {"line_id": "press-a", "unix_time": time.time(), "brightness": 250.0, "reject": False}
    (stats / "stats-x-1.jsonl").write_text(json.dumps(row) + "\n")
    report = run("press-a", stats, tmp_path / "out", model_uri=str(monitored["model"]))
    assert report["enough_data"] is False and report["drifted"] is False
    assert "not enough recent images (1)" in report["summary"]


def test_text_from_the_report_is_escaped(tmp_path):
    import pandas as pd

    from components.monitor.report import write_html

    script = '<script>alert("monitor")</script>'
    statistic = {"reference_mean": 1.0, "recent_mean": 2.0, "psi": 0.5, "ks_statistic": 0.4}
    report = {
        "line_id": script,
        "summary": script,
        "model": {"uri": script},
        "recent": {"n_images": 30},
        "reference": {"n_images": 60},
        "enough_data": True,
        "drifted": True,
        "moved": [script],
        "statistics": {script: statistic | {"ks_p_value": 1e-6, "moved": True}},
        "windows": [],
        "defect_rate": {"production_prevalence": 0.05},
        "qa": {script: 0.5},
        "thresholds": {"psi_threshold": 0.25, "ks_alpha": 0.01, "min_shift": {script: 1.0}},
    }
    text = write_html(report, pd.DataFrame(), pd.DataFrame(), tmp_path / "m.html").read_text()
    assert "<script" not in text
    # line (title, heading), summary, model, statistic row, QA sample, minimum shift.
    assert html.unescape(text).count(script) == 7
    assert '<tr class="moved">' in text  # the markup the template adds is not escaped
