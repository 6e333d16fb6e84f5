"""MVTec AD and MVTec 3D-AD end to end through the CLI, with no glue code: `cta data import`
-> `cta validate-data` -> `cta train` (tiles, synthetic anomalies: the train split is good-only)
-> `cta evaluate` -> `cta serve` (a real server process) answering for one test image. No
command is given a lines config: the imported dataset carries its own inventory."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
import yaml
from click.testing import CliRunner
from mvtec_layouts import write_mvtec_3d_layout, write_mvtec_ad_layout

from components.serve.process import start_server
from cta_cli.main import main
from cta_model.data.line_dataset import MANIFEST_NAME

pytestmark = pytest.mark.integration

LAYOUTS = {
    "mvtec-ad": (write_mvtec_ad_layout, "hps", ["semseg"]),
    "mvtec-3d-ad": (write_mvtec_3d_layout, "ctal", ["semseg", "height", "normals"]),
}


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, f"cta {' '.join(args)}:\n{result.output}"
    return result.output


def train_config(tmp_path: Path, arch: str, tasks: list[str]) -> Path:
    config = {
        "model": {
            "arch": arch,
            "backbone": "resnet18",
            "output_stride": 8,
            "tasks": tasks,
            "input_size": [32, 32],  # the images are 32 x 40: two overlapping tiles
            "decoder_channels": 16,
            "affinity_channels": 8,
        },
        "data": {
            "tiling": {"tiles_per_image": 1, "val_tiles_per_image": 1, "overlap_px": 8},
            "anomalies": {"probability": 0.8, "size_px": [4.0, 10.0]},
            "num_workers": 0,
        },
        "max_steps": 3,
        "batch_size": 4,
        "progress": False,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_import_validate_train_evaluate_serve(layout: str, tmp_path: Path) -> None:
    write_layout, arch, tasks = LAYOUTS[layout]
    source = write_layout(tmp_path / "src")
    data = tmp_path / "data"
    cli("data", "import", layout, str(source), "--out", str(data))

    checked = tmp_path / "validated"
    cli("validate-data", str(data), "--out", str(checked))
    dataset_ref = checked / "dataset_ref.json"
    assert json.loads(dataset_ref.read_text())["passed"] is True

    run = tmp_path / "run"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cli(
        "train",
        "--config",
        str(train_config(tmp_path, arch, tasks)),
        "--data",
        str(dataset_ref),
        "--out",
        str(run),
        "--tracking-uri",
        tracking,
    )
    model = run / "model"
    card = yaml.safe_load((model / "model.yaml").read_text())
    assert card["class_names"] == ["good", "crack", "hole"]
    assert card["inspection"]["reject_classes"] == [1, 2]

    evaluated = tmp_path / "eval"
    cli(
        "evaluate",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(evaluated),
        "--bootstrap-n",
        "5",
        "--latency-repeats",
        "1",
        "--no-explain",
    )
    evaluation = json.loads((evaluated / "evaluation.json").read_text())
    lines = {"mvtec-ad": {"metal-nut", "wood"}, "mvtec-3d-ad": {"cable-gland", "foam"}}[layout]
    assert set(evaluation["per_line"]) == lines
    assert evaluation["metric_settings"]["reject_classes"] == [1, 2]  # the model's, not global

    rows = pq.read_table(data / MANIFEST_NAME).to_pylist()
    defective = next(row for row in rows if row["split"] == "test" and row["has_defect"])
    http = requests.Session()
    http.trust_env = False  # no proxy for loopback
    # the line's operating threshold comes from the model's own evaluation
    line = defective["line_id"]
    with start_server(
        str(model),
        line=line,
        evaluation=evaluated / "evaluation.json",
        log_path=tmp_path / "serve.log",
    ) as server:
        answer = http.post(
            f"{server.url}/predict",
            data=(data / defective["image_path"]).read_bytes(),
            headers={"Content-Type": "image/png"},
            timeout=60,
        )
    assert answer.status_code == 200, answer.text
    defect = answer.json()["defect"]
    assert 0.0 <= defect["score"] <= 1.0
    assert isinstance(defect["reject"], bool)
    expected = evaluation["per_line"][line]["inspection"]["threshold"]
    assert defect["threshold"] == pytest.approx(expected)
    assert defect["reject"] == (defect["score"] >= expected)
