"""Issue 18, finding 7: a training killed mid-run and resumed leaves no MLflow run RUNNING.

The resumed training starts a new run linked to the interrupted one (``cta.resumed_from`` /
``cta.resumed_by``) and ends the interrupted one KILLED; the run id is recorded in the output
folder (``mlflow_run.json``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from test_train_nonfinite import config_dict, data  # noqa: F401 - `data` is a fixture
from test_training import REPO, run, subprocess_env, write_config

from components.train.tracking import RUN_RECORD, MlflowTracker, get_or_create_experiment

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_mlflow_globals")]


def _runs(client: MlflowClient, experiment: str) -> dict[str, object]:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return {r.info.run_id: r for r in client.search_runs([experiment_id])}


def test_a_run_left_running_in_the_folder_is_killed_and_linked(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = f"resume-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(uri)
    folder = tmp_path / "run"
    experiment_id = get_or_create_experiment(experiment, uri)
    stale_id = client.create_run(experiment_id).info.run_id  # RUNNING, as kill -9 leaves it
    folder.mkdir()
    (folder / RUN_RECORD).write_text(json.dumps({"run_id": stale_id}))

    second = MlflowTracker(
        uri, experiment, "second", {}, {}, log_system_metrics=False, run_folder=folder
    )
    with second:
        second.on_train_start(SimpleNamespace(state=SimpleNamespace(global_step=7)))
    runs = _runs(client, experiment)
    stale, resumed = runs[stale_id], runs[second.run_id]
    assert stale.info.status == "KILLED"
    assert stale.data.tags["cta.superseded_by"] == second.run_id
    assert stale.data.tags["cta.resumed_by"] == second.run_id
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["cta.resumed_from"] == stale_id
    assert resumed.data.tags["cta.resumed_at_step"] == "7"
    assert json.loads((folder / RUN_RECORD).read_text()) == {"run_id": second.run_id}


def test_killed_and_resumed_cta_train_leaves_nothing_running(data, mlflow_server, tmp_path):  # noqa: F811
    experiment = f"resume-{uuid.uuid4().hex[:8]}"
    output = tmp_path / "run"
    config = config_dict(
        data, output, epochs=3, max_steps=12, checkpoint={"every_steps": 1, "keep_last": 2}
    )
    command = [
        sys.executable,
        "-m",
        "cta_cli",
        "train",
        "--config",
        str(write_config(tmp_path / "train.yaml", config)),
        "--no-env",
        "--tracking-uri",
        mlflow_server,
        "--experiment",
        experiment,
    ]
    log = tmp_path / "killed.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=stderr
        )
        try:
            target = output / "checkpoints" / "step-00000001.pt"
            deadline = time.monotonic() + 300
            while not target.exists():
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait(timeout=30)
    client = MlflowClient(mlflow_server)
    [stale_id] = _runs(client, experiment)
    assert client.get_run(stale_id).info.status == "RUNNING"  # what kill -9 leaves behind

    run(command, timeout=600)
    runs = _runs(client, experiment)
    assert len(runs) == 2
    [new_id] = set(runs) - {stale_id}
    assert runs[stale_id].info.status == "KILLED"
    assert runs[stale_id].data.tags["cta.resumed_by"] == new_id
    assert runs[new_id].info.status == "FINISHED"
    assert runs[new_id].data.tags["cta.resumed_from"] == stale_id
    assert int(runs[new_id].data.tags["cta.resumed_at_step"]) >= 1
    assert "cta.model_id" in runs[new_id].data.tags
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
