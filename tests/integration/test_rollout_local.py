"""Local roll-outs across three line servers (`cta serve` processes) against the session's
real MLflow server: shadow pass, live failure with automatic rollback, kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import requests
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from registered_thresholds import register_with_thresholds

from components.register_model.step import run as register
from components.registry.names import TAG_ROLLOUT_HISTORY
from components.rollout.engine import line_key, rollout_key
from components.rollout.state import LocalStateStore, lock_holder
from components.train.logged_model import log_model_folder
from cta_cli.commands.rollout import rollout
from cta_model.data.line_dataset import LineDataset
from cta_model.data.synthetic_dataset import generate_dataset
from cta_model.model_folder import load_model_folder, read_model_card, save_model_folder

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
    pytest.mark.usefixtures("restore_mlflow_globals"),
]

LINES = ("press-a", "press-b", "mill-c")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 8 samples per line with half of them in qa: every line replays 4 images, some defective.
    root = generate_dataset(
        tmp_path_factory.mktemp("rollout-data") / "data",
        n_lines=3,
        samples_per_line=8,
        height=32,
        width=32,
        seed=0,
        splits=(0.25, 0.125, 0.125, 0.5),
        progress=False,
    )
    qa = LineDataset(root, split="qa")
    for line_id in LINES:
        assert sum(row["line_id"] == line_id for row in qa.rows) >= 3
    return root


@pytest.fixture(scope="module")
def lines_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/lines.yaml without the smallest defect widths: the 32 px test images (and the
    32x32 models) cannot show the real lines' 0.8 mm defects, and this test is about roll-outs,
    not resolution (tests/integration/test_serve.py covers that)."""
    data = yaml.safe_load(Path("configs/lines.yaml").read_text())
    for line in data["lines"]:
        line.pop("min_defect_width_mm", None)
    path = tmp_path_factory.mktemp("lines") / "lines.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def zeroed_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its segmentation head's final conv zeroed but for a large
    background bias: every pixel is class 0 with certainty, so its defect score is ~0, it never
    rejects a part and its defect recall is 0."""
    model, card = load_model_folder(tiny_model_dir)
    final_conv = model.heads["semseg"][-1]
    final_conv.weight.data.zero_()
    final_conv.bias.data.zero_()
    final_conv.bias.data[0] = 20.0
    return save_model_folder(
        model,
        tmp_path_factory.mktemp("zeroed") / "model",
        class_names=card.class_names,
        input_contract=read_model_card(tiny_model_dir).input,
    )


def register_folder(folder: Path, name: str, tracking_uri: str) -> str:
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(f"cta-rollout-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run():
        info = log_model_folder(folder)
    return str(register(info.model_id, name, tracking_uri=tracking_uri)["version"])


def write_plan(path: Path, name: str, waves: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"name": name, "waves": waves}))
    return path


def readyz(url: str) -> dict:
    session = requests.Session()
    session.trust_env = False
    answer = session.get(f"{url}/readyz", timeout=10)
    answer.raise_for_status()
    return answer.json()


def invoke(*args: str) -> str:
    result = CliRunner().invoke(rollout, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def state(tmp_path: Path, monkeypatch) -> LocalStateStore:
    """A state folder; every line server recorded in it is stopped after the test."""
    monkeypatch.setenv("CTA_MODEL_CACHE", str(tmp_path / "model-cache"))
    store = LocalStateStore(tmp_path / "state")
    yield store
    CliRunner().invoke(rollout, ["stop-all", "--state", store.uri])


def running(store: LocalStateStore, line_id: str) -> dict:
    return store.read(line_key(line_id)).data["running"]


def alias(client: MlflowClient, name: str, line_id: str) -> str:
    return str(client.get_model_version_by_alias(name, f"line-{line_id}").version)


def test_shadow_passes_live_recall_fails_and_the_wave_rolls_back(
    dataset: Path,
    tiny_model_dir: Path,
    zeroed_model_dir: Path,
    lines_config: Path,
    mlflow_server: str,
    state: LocalStateStore,
    tmp_path: Path,
) -> None:
    name = f"cta-rollout-{uuid.uuid4().hex[:8]}"
    # Each version carries per-line operating thresholds in its evaluation.json, as `cta
    # evaluate` chooses them on val: the line servers judge with those.
    thresholds = dict.fromkeys(LINES, 0.3)
    base_version = register_with_thresholds(
        tiny_model_dir, name, mlflow_server, tmp_path, thresholds
    )
    zeroed_version = register_with_thresholds(
        zeroed_model_dir, name, mlflow_server, tmp_path, thresholds
    )
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    common = ["--data", str(dataset), "--state", state.uri, "--tracking-uri", mlflow_server]

    # Every line first runs the base version (one ungated live wave): three line servers.
    base_plan = write_plan(
        tmp_path / "base.yaml",
        "base",
        [{"lines": list(LINES), "mode": "live", "bake": {"min_samples": 2}}],
    )
    invoke(
        "start",
        "--model-name",
        name,
        "--version",
        base_version,
        "--plan",
        str(base_plan),
        "--all-waves",
        "--lines-config",
        str(lines_config),
        *common,
    )
    base_servers = {line_id: running(state, line_id) for line_id in LINES}
    for line_id, server in base_servers.items():
        assert readyz(server["url"])["model"]["version"] == base_version
        assert alias(client, name, line_id) == base_version

    # The zeroed candidate: wave 1 shadow on the pilot, gated on error rate and latency only.
    # The latency bound is loose: the line servers share 2 cores with the rest of the suite.
    plan = write_plan(
        tmp_path / "plan.yaml",
        "candidate",
        [
            {
                "lines": ["press-a"],
                "mode": "shadow",
                "bake": {"min_samples": 4},
                "health": {"max_error_rate": 0.0, "max_p95_latency_ms": 60000},
            },
            {
                "lines": ["press-b", "mill-c"],
                "mode": "live",
                "bake": {"min_samples": 4},
                "health": {"max_error_rate": 0.0, "max_p95_latency_ms": 60000, "min_recall": 0.5},
            },
        ],
    )
    output = invoke(
        "start",
        "--model-name",
        name,
        "--version",
        zeroed_version,
        "--plan",
        str(plan),
        "--lines-config",
        str(lines_config),
        *common,
    )
    rollout_id = f"candidate--{name}--v{zeroed_version}"
    record = state.read(rollout_key(rollout_id)).data
    assert record["status"] == "waiting"  # wave 2 waits for resume
    assert record["lines"]["press-a"]["state"] == "promoted"
    shadow_health = record["lines"]["press-a"]["health"]
    assert shadow_health["samples"] == 4 and shadow_health["error_rate"] == 0.0
    assert shadow_health["agreement"] is not None  # measured against the base server
    assert shadow_health["server_requests"] == 4  # the server's own /metrics saw the replay
    assert alias(client, name, "press-a") == zeroed_version
    pilot = running(state, "press-a")
    served = readyz(pilot["url"])
    assert (served["model"]["version"], served["model"]["sha256"], served["line"]) == (
        zeroed_version,
        pilot["sha256"],
        "press-a",
    )
    assert not _alive(base_servers["press-a"]["pid"])  # the replaced server was stopped
    assert f"press-a: runs v{zeroed_version}" in output

    # Wave 2 live with a recall gate: the zeroed head finds no defect, so it fails.
    invoke("resume", "--state", state.uri)
    record = state.read(rollout_key(rollout_id)).data
    assert record["status"] == "halted"
    failed = record["lines"]["press-b"]
    assert failed["state"] == "rolled_back"
    assert failed["health"]["recall"] == 0.0 and failed["health"]["n_defective"] > 0
    # The candidate's server judged with the threshold its version records for press-b.
    verdict = failed["health"]["verdict"]
    assert verdict["threshold"] == 0.3 and verdict["reason"] is None
    assert verdict["threshold_source"] == (
        f"models:/{name}/{zeroed_version} evaluation.json per_line.press-b.inspection.threshold"
    )
    assert "recall 0 >= 0.5 FAIL" in failed["decision"]
    assert [h["state"] for h in failed["history"]] == [
        "deploying",
        "baking",
        "failed",
        "rolled_back",
    ]
    assert record["lines"]["mill-c"]["state"] == "pending"  # halted before it
    for line_id in ("press-b", "mill-c"):
        assert alias(client, name, line_id) == base_version
        server = running(state, line_id)
        assert server["pid"] == base_servers[line_id]["pid"] and _alive(server["pid"])
        assert readyz(server["url"])["model"]["version"] == base_version
    assert failed["candidate"] is None and not _alive(failed["retired_candidate"]["pid"])
    assert alias(client, name, "press-a") == zeroed_version  # wave 1 stays promoted
    history = json.loads(client.get_model_version(name, zeroed_version).tags[TAG_ROLLOUT_HISTORY])
    assert [(h["line"], h["action"]) for h in history] == [
        ("press-a", "promoted"),
        ("press-b", "rolled_back"),
    ]
    assert all(lock_holder(state, line_id) is None for line_id in LINES)

    status = invoke("status", "--state", state.uri)
    assert f"press-b: runs v{base_version}" in status and "rolled_back" in status
    _report_timings(state, f"base--{name}--v{base_version}", rollout_id)

    # A manual rollback of the pilot: alias back, the base version serving again.
    invoke("rollback", "--state", state.uri, "--line", "press-a")
    record = state.read(rollout_key(rollout_id)).data
    assert record["lines"]["press-a"]["state"] == "rolled_back"
    assert "manual rollback" in record["lines"]["press-a"]["decision"]
    assert alias(client, name, "press-a") == base_version
    restored = running(state, "press-a")
    assert readyz(restored["url"])["model"]["version"] == base_version
    assert not _alive(pilot["pid"])
    history = json.loads(client.get_model_version(name, zeroed_version).tags[TAG_ROLLOUT_HISTORY])
    assert (history[-1]["line"], history[-1]["action"]) == ("press-a", "rollback")


def _alive(pid: int) -> bool:
    from components.rollout.backends.local import is_serve_process

    return is_serve_process(pid)


def _report_timings(store: LocalStateStore, *rollout_ids: str) -> None:
    """Time per wave and serving latency, printed for the record (run with -s)."""
    for rid in rollout_ids:
        record = store.read(rollout_key(rid)).data
        for wave in record["waves"]:
            if "seconds" in wave:
                print(
                    f"[timing] {rid} wave {wave['index'] + 1} ({wave['mode']}, "
                    f"{len(wave['lines'])} lines): {wave['seconds']:.1f} s"
                )
        for line_id, entry in record["lines"].items():
            health = entry.get("health")
            if health:
                print(
                    f"[latency] {rid} {line_id}: p50 {health['p50_latency_ms']:.1f} ms, "
                    f"p95 {health['p95_latency_ms']:.1f} ms over {health['samples']}"
                )


def test_a_killed_start_is_completed_by_resume_without_a_stale_lock(
    dataset: Path,
    tiny_model_dir: Path,
    lines_config: Path,
    mlflow_server: str,
    state: LocalStateStore,
    tmp_path: Path,
) -> None:
    name = f"cta-resume-{uuid.uuid4().hex[:8]}"
    version = register_folder(tiny_model_dir, name, mlflow_server)
    plan = write_plan(
        tmp_path / "plan.yaml",
        "resume",
        [
            {
                "lines": ["press-a", "mill-c"],
                "mode": "live",
                "bake": {"min_samples": 2, "min_seconds": 5},
            }
        ],
    )
    rollout_id = f"resume--{name}--v{version}"
    log = tmp_path / "start.log"
    with open(log, "wb") as out:
        start = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from cta_cli.commands.rollout import rollout; rollout()",
                "start",
                "--model-name",
                name,
                "--version",
                version,
                "--plan",
                str(plan),
                "--data",
                str(dataset),
                "--state",
                state.uri,
                "--tracking-uri",
                mlflow_server,
                "--lines-config",
                str(lines_config),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and start.poll() is None:
            current = state.read(rollout_key(rollout_id))
            if current and current.data["lines"]["press-a"]["state"] == "baking":
                break
            time.sleep(0.2)
        assert start.poll() is None, log.read_text()[-3000:]
        os.kill(start.pid, signal.SIGKILL)  # mid-wave: press-a's candidate is baking
    finally:
        start.wait(timeout=30)
    killed = state.read(rollout_key(rollout_id)).data
    assert killed["status"] == "running"
    assert killed["lines"]["press-a"]["state"] == "baking"
    assert killed["lines"]["mill-c"]["state"] == "pending"
    candidate_pid = killed["lines"]["press-a"]["candidate"]["pid"]
    assert _alive(candidate_pid)  # the line server outlives the killed command
    assert lock_holder(state, "press-a") is not None  # left behind by the killed start

    invoke("resume", "--state", state.uri)

    record = state.read(rollout_key(rollout_id)).data
    assert record["status"] == "completed"
    assert [record["lines"][line]["state"] for line in ("press-a", "mill-c")] == ["promoted"] * 2
    assert running(state, "press-a")["pid"] == candidate_pid  # the recorded server was reused
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    for line_id in ("press-a", "mill-c"):
        assert alias(client, name, line_id) == version
        assert readyz(running(state, line_id)["url"])["model"]["version"] == version
        assert lock_holder(state, line_id) is None
    _report_timings(state, rollout_id)
