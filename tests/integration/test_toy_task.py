"""Adding a task is one TaskSpec: a toy fifth task, registered as a plugin, goes through
train -> evaluate -> serve (a real `cta serve` process) with no other module edited."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from components.artifacts import read_json
from components.evaluate.step import EVALUATION_NAME
from components.evaluate.step import run as evaluate
from components.serve.process import start_server
from cta_model.data.line_dataset import LineDataset
from cta_model.data.line_writer import WrittenSample, prepare_root, write_manifest, write_sample
from cta_model.data.lines import load_lines_config
from cta_model.data.synthetic import CLASS_NAMES
from cta_model.data.synthetic_dataset import SYNTHETIC_TASKS, synthetic_record
from cta_model.tasks import TASK_PLUGINS_ENV, TASKS, TaskSpec, load_task_plugins
from cta_model.train_config import validate_train_config
from cta_model.training import MODEL_DIR, train

pytestmark = pytest.mark.integration

PLUGIN = "toy_task"  # tests/integration/toy_task.py
PLUGIN_DIR = Path(__file__).resolve().parent
SIZE = 32
PER_LINE = 8
SPLIT_CYCLE = ("train", "train", "val", "test")


@pytest.fixture
def toy_task(monkeypatch: pytest.MonkeyPatch) -> Iterator[TaskSpec]:
    """Registers "brightness" here and, through the environment, in every child process (the
    server); removed again afterwards."""
    path = os.pathsep.join(filter(None, [str(PLUGIN_DIR), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv(TASK_PLUGINS_ENV, PLUGIN)
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    names = load_task_plugins(PLUGIN)  # this process imported the registry before the env var
    assert names == ("brightness",)
    yield TASKS["brightness"]
    for name in names:
        del TASKS[name]


def brightness(image: np.ndarray) -> np.ndarray:
    label = image.astype(np.float32).mean(axis=-1) / 255.0
    label[0, :] = np.nan  # an invalid row: the loss and the meter must skip it
    return label


def write_toy_dataset(root: Path) -> Path:
    """Synthetic scenes plus the toy label, through the line-dataset writer's public API."""
    tasks = (*SYNTHETIC_TASKS, "brightness")
    prepare_root(root, tasks)
    written: list[WrittenSample] = []
    for line in load_lines_config().first(2):
        for index in range(PER_LINE):
            record = synthetic_record(line, index, 0, SIZE, SIZE)
            record.labels["brightness"] = brightness(record.image)
            record.split = SPLIT_CYCLE[index % len(SPLIT_CYCLE)]
            written.append(write_sample(root, record, tasks))
    return write_manifest(root, written, tasks, {"class_names": list(CLASS_NAMES)})


def test_toy_task_trains_evaluates_and_serves(toy_task: TaskSpec, tmp_path: Path) -> None:
    data = write_toy_dataset(tmp_path / "data")
    dataset = LineDataset(data, split="test")
    assert dataset.tasks == ("semseg", "height", "normals", "brightness")
    assert dataset[0]["present"]["brightness"] and dataset[0]["brightness"].shape == (SIZE, SIZE)

    config = validate_train_config(
        {
            "model": {
                "arch": "ctal",
                "backbone": "resnet18",
                "output_stride": 8,
                "tasks": ["semseg", "brightness"],
                "input_size": [SIZE, SIZE],
                "decoder_channels": 32,
                "affinity_channels": 16,
            },
            "data": {"path": str(data), "num_workers": 0},
            "max_steps": 2,
            "batch_size": 4,
            "early_stopping": {"metric": "brightness.abs_err"},
            "progress": False,
            "output": str(tmp_path / "run"),
        },
        "toy",
    )
    result = train(config)
    assert "brightness.abs_err" in result.best_metrics
    model_dir = tmp_path / "run" / MODEL_DIR

    evaluate(
        str(model_dir),
        str(data),
        str(tmp_path / "eval"),
        bootstrap_n=5,
        latency_repeats=1,
        explain=False,
    )
    evaluation = read_json(tmp_path / "eval" / EVALUATION_NAME, schema_name="evaluation")
    assert evaluation["model"]["tasks"] == ["semseg", "brightness"]
    abs_err = evaluation["overall"]["metrics"]["brightness.abs_err"]
    assert abs_err is not None and 0.0 <= abs_err < 10.0
    assert set(evaluation["overall"]["metrics"]) == {
        "semseg.miou",
        "semseg.pixel_acc",
        "brightness.abs_err",
    }

    image = dataset[0]["image"]
    png = io.BytesIO()
    Image.fromarray(image).save(png, "PNG")
    http = requests.Session()
    http.trust_env = False  # no proxy for loopback
    with start_server(str(model_dir), threshold=0.5) as server:
        answer = http.post(
            f"{server.url}/predict",
            data=png.getvalue(),
            headers={"Content-Type": "image/png"},
            timeout=60,
        )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body["tasks"]) == {"semseg", "brightness"}
    assert set(body["tasks"]["brightness"]) == {"mean"}
    assert np.isfinite(body["tasks"]["brightness"]["mean"])
    assert body["defect"]["reject"] is not None  # the verdict still reads the classes task
