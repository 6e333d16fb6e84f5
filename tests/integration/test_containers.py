"""Issue 16 item 5: the compiled training pipeline runs with every step inside the project image.

``make test-containers`` (slow tier) runs this: it builds the image (``make image``), then the YAML
that ``cta pipeline compile`` writes for a cluster is loaded and run by kfp.local's DockerRunner
against podman's Docker-compatible API, so each step is a container of the image, as a pod would
be. Nothing of the host reaches a step but what a cluster would give it too:

- data on S3 (a moto server on loopback), tracking and models on an MLflow server over HTTP,
  roll-out state on S3; the containers share the host's network only to reach those two;
- credentials and endpoints as environment variables (on a cluster: from Secrets);
- the steps' hand-overs as KFP artefacts under the pipeline root, which kfp.local mounts at the
  same path in every container (on a cluster: the S3 pipeline root);
- this test's tiny train config, line inventory, gate policy and roll-out plan are files under
  that pipeline root too (on a cluster they would be files in the image, or the shipped ones).

Known traps (DESIGN 6.2 and docs/cluster.md): podman names the image ``localhost/cta:...`` and
kfp.local pulls whatever name it cannot find (an offline pull), so the pipeline is compiled with
``CTA_IMAGE=localhost/...``; the image's ENTRYPOINT (``cta``) would prefix KFP's command, so the
runner sets ``/usr/bin/env`` as the entrypoint (a pod's ``command`` replaces it anyway); the
runtime is runc with explicit ulimits; steps run as the image's uid 10001, so the pipeline root
is owned by it. DockerRunner reports success for a container it could not wait on (auto-removed),
so every step's outputs are checked, and every task folder must be owned by uid 10001: written
inside a container, not by the host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml
from pipeline_inputs import PERMISSIVE_GATE, pilot_shadow_plan, write_tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("CTA_TEST_IMAGE", "localhost/cta:0.1.0")
IMAGE_UID = 10001
MODEL_NAME = "cta-containers"


def _build_image() -> None:
    """`make image` (layers cached: only what changed is rebuilt), tagged as the pipeline
    names it."""
    for tool in ("podman", "buildah"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: run `make setup-system` (make test-containers does)")
    env = {**os.environ, "CTA_IMAGE": IMAGE, "BUILDER": "buildah"}
    result = subprocess.run(["bash", str(ROOT / "infra/images/build.sh")], cwd=ROOT, env=env)
    assert result.returncode == 0, "image build failed (its log is above)"


@pytest.fixture(scope="module")
def podman_socket(tmp_path_factory) -> str:
    """The image built, and podman's Docker-compatible API on a private unix socket."""
    _build_image()
    socket = tmp_path_factory.mktemp("podman") / "podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while not socket.exists():
        if service.poll() is not None or time.monotonic() > deadline:
            service.kill()
            pytest.fail("podman system service did not open its socket within 30 s")
        time.sleep(0.1)
    try:
        yield f"unix://{socket}"
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()


def _compile(out: Path) -> Path:
    """`cta pipeline compile` as a platform engineer runs it, naming the local image."""
    # No GPU here: the train step's GPU image is the CPU one.
    env = {**os.environ, "CTA_IMAGE": IMAGE, "CTA_GPU_IMAGE": IMAGE}
    subprocess.run(
        [sys.executable, "-m", "cta_cli", "pipeline", "compile", "--out", str(out)],
        cwd=ROOT,
        env=env,
        check=True,
    )
    return out


def _chown_tree(path: Path, uid: int) -> None:
    for folder, dirs, files in os.walk(path):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.chown(name, uid, uid)


def test_the_compiled_pipeline_runs_with_every_step_in_the_image(
    podman_socket, moto_s3, s3_bucket, mlflow_server, tmp_path, monkeypatch
):
    import docker
    from kfp import local
    from kfp.components import load_component_from_file
    from mlflow import MlflowClient

    from components.rollout.engine import status
    from components.rollout.state import open_store
    from components.storage import upload_tree
    from cta_model.data.synthetic_dataset import generate_dataset
    from pipelines.run import TASKS, task_result
    from pipelines.training import TRAIN_TRAINJOB_TASK

    started = time.monotonic()
    data = generate_dataset(
        tmp_path / "data", n_lines=2, samples_per_line=10, height=32, width=32, seed=0,
        progress=False,
    )  # fmt: skip
    data_uri = f"s3://{s3_bucket}/lines/latest"
    upload_tree(data, data_uri, endpoint_url=moto_s3.endpoint_url)
    compiled = _compile(tmp_path / "training.yaml")

    pipeline_root = tmp_path / "kfp"
    inputs = pipeline_root / "inputs"
    inputs.mkdir(parents=True)
    config = write_tiny_config(inputs / "train.yaml")
    lines = inputs / "lines.yaml"
    shutil.copyfile(os.environ["CTA_LINES_CONFIG"], lines)
    policy = inputs / "gate.yaml"
    policy.write_text(yaml.safe_dump(PERMISSIVE_GATE))
    plan = inputs / "plan.yaml"
    plan.write_text(yaml.safe_dump(pilot_shadow_plan("containers")))
    _chown_tree(pipeline_root, IMAGE_UID)

    # What a cluster gives each pod from Secrets and its config; nothing else of the host.
    environment = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "CTA_S3_ENDPOINT_URL": moto_s3.endpoint_url,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    monkeypatch.setenv("DOCKER_HOST", podman_socket)
    local.init(
        runner=local.DockerRunner(
            network_mode="host",
            entrypoint=["/usr/bin/env"],
            runtime="runc",
            ulimits=[
                docker.types.Ulimit(name="nofile", soft=1024, hard=1024),
                docker.types.Ulimit(name="nproc", soft=1024, hard=1024),
            ],
            environment=environment,
        ),
        pipeline_root=str(pipeline_root),
        raise_on_error=True,
    )
    pipeline = load_component_from_file(str(compiled))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        pipeline(
            data_uri=data_uri,
            config_path=str(config),
            tracking_uri=mlflow_server,
            model_name=MODEL_NAME,
            gate_policy=str(policy),
            rollout_plan=str(plan),
            rollout_state=f"s3://{s3_bucket}/rollout",
            lines_config=str(lines),
            bootstrap_n=50,
            latency_repeats=1,
        )
    elapsed = time.monotonic() - started
    print(f"whole pipeline in containers: {elapsed:.0f} s", file=sys.stderr)

    (run_dir,) = [p for p in pipeline_root.iterdir() if p.name.startswith("cta-training-")]
    tasks = {task: task_result(run_dir, task) for task in TASKS if task != TRAIN_TRAINJOB_TASK}
    for task, result in tasks.items():
        assert result["state"] == "ran", task
        # Written by the image's user inside a container, not by the host.
        assert (run_dir / task).stat().st_uid == IMAGE_UID, task
    assert task_result(run_dir, TRAIN_TRAINJOB_TASK)["state"] == "skipped"

    dataset = Path(tasks["validate-data"]["artifacts"]["dataset"])
    ref = json.loads((dataset / "dataset_ref.json").read_text())
    assert ref["uri"] == data_uri and ref["passed"] is True
    model_id = tasks["train"]["outputs"]["Output"]
    model = Path(tasks["train"]["artifacts"]["model"])
    assert (model / "model" / "SHA256SUMS").is_file()
    evaluation = json.loads(
        (Path(tasks["evaluate"]["artifacts"]["evaluation"]) / "evaluation.json").read_text()
    )
    assert evaluation["model"]["model_id"] == model_id
    assert evaluation["data"]["manifest_sha256"] == ref["manifest_sha256"]
    assert evaluation["delta_m"] is not None  # the baselines trained in their container
    roi = json.loads((Path(tasks["roi-report"]["artifacts"]["roi"]) / "roi.json").read_text())
    assert roi["pilot_line"] == "press-a"
    assert Path(tasks["roi-report"]["artifacts"]["report"]).stat().st_size > 0

    client = MlflowClient(mlflow_server)
    version = tasks["register-model"]["outputs"]["Output"]
    registered = client.get_model_version(MODEL_NAME, version)
    assert registered.tags["cta.registration"] == "complete"
    assert registered.tags["cta.model_id"] == model_id
    assert tasks["gate"]["outputs"]["Output"] == "pass"
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == version
    # Wave 1 was recorded where every line's controller reads it: on S3.
    assert "press-a" in tasks["rollout"]["outputs"]["Output"]
    monkeypatch.setenv("CTA_S3_ENDPOINT_URL", moto_s3.endpoint_url)
    pilot = status(open_store(f"s3://{s3_bucket}/rollout"))["lines"]["press-a"]
    assert str(pilot["running"]["version"]) == version
