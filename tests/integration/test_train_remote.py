"""Training on Kubeflow end to end: kmock plays the API server and the Trainer, moto plays S3.

The pods' work (train, upload the model folder) is stood in for by uploading a small model
folder to the output prefix before the run; the test then checks what run_on_kubeflow asked of
the API, which logs it relayed, and that it fetched and verified the model folder.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components.storage import make_s3_client, upload_tree, write_bytes_atomic
from components.train.remote import (
    POD_OUTPUT,
    check_fetch_to,
    check_output_uri,
    default_run_id,
    format_log_line,
    model_uri,
    relay_logs,
    remote_spec,
    remote_train_command,
    run_on_kubeflow,
    summary_uri,
)
from components.train.trainjob import (
    PodLogLine,
    TrainJobError,
    TrainJobFailed,
    TrainJobLauncher,
    TrainJobTimeout,
    build_trainjob_manifest,
    default_api_client,
    validate_trainjob,
)
from cta_model.errors import ConfigError, DataError

pytestmark = [pytest.mark.integration]

NAMESPACE = "cta"
TRAINJOBS = "trainer.kubeflow.org/v1alpha1/trainjobs"
PODS = "v1/pods"
CONFIG = "/data/runs/r7/train.yaml"
SPEC = {"namespace": NAMESPACE, "image": "registry.example.com/cta:0.1.0", "num_nodes": 2}


# ------------------------------------------------------------------------- pure functions
def test_remote_spec_trains_locally_in_the_pod_and_uploads_the_model():
    spec = remote_spec(CONFIG, "s3://bucket/runs/r7/", SPEC)
    manifest = build_trainjob_manifest(spec)
    validate_trainjob(manifest)

    command = manifest["spec"]["trainer"]["command"]
    assert command == remote_train_command(CONFIG, "s3://bucket/runs/r7")
    assert command == [
        "torchrun",
        "--no-python",
        "cta",
        "train",
        "--config",
        CONFIG,
        "--out",
        POD_OUTPUT,
        "--upload-to",
        "s3://bucket/runs/r7/model",
        "--summary-out",
        "s3://bucket/runs/r7/train_summary.json",
    ]
    # Name and run id are fixed by config and output: a resubmission finds the same TrainJob.
    assert spec.run_id == default_run_id(CONFIG, "s3://bucket/runs/r7")
    assert spec.name == f"cta-train-{spec.run_id}"
    assert remote_spec(CONFIG, "s3://bucket/runs/r7", SPEC).name == spec.name
    assert remote_spec(CONFIG, "s3://bucket/runs/r8", SPEC).name != spec.name
    assert remote_spec(CONFIG, "s3://b/o", SPEC | {"run_id": "r7", "name": "x1"}).name == "x1"


def test_remote_spec_refusals():
    with pytest.raises(ConfigError, match="must be an s3:// prefix"):
        remote_spec(CONFIG, "/tmp/out", SPEC)
    with pytest.raises(ConfigError, match="must be an s3:// prefix"):
        check_output_uri("s3://")
    with pytest.raises(ConfigError, match=r"\['command'\] are set by run_on_kubeflow"):
        remote_spec(CONFIG, "s3://b/o", SPEC | {"command": ["sh"]})
    with pytest.raises(ConfigError, match="image"):
        remote_spec(CONFIG, "s3://b/o", {"namespace": NAMESPACE})
    assert model_uri("s3://b/o/") == "s3://b/o/model"


def test_fetch_to_must_be_empty(tmp_path):
    check_fetch_to(None)
    check_fetch_to(tmp_path / "new")
    check_fetch_to(tmp_path)
    (tmp_path / "stale").write_text("x")
    with pytest.raises(ConfigError, match="not an empty folder"):
        check_fetch_to(tmp_path)


def test_relay_logs_prefixes_pods_and_survives_missing_logs():
    def lines():
        yield PodLogLine("pod-0", "epoch 1")
        raise TrainJobError("no pods match x")

    seen: list[str] = []
    assert relay_logs(lines(), seen.append) == 1
    assert seen == ["[pod-0] epoch 1", "(logs unavailable: no pods match x)"]
    assert format_log_line(PodLogLine("p", "")) == "[p] "


def test_no_kubernetes_credentials_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no Kubernetes credentials.*KUBECONFIG"):
        default_api_client()


# -------------------------------------------------------------------- kmock and moto S3
@pytest.fixture
def launcher(kmock) -> Iterator[TrainJobLauncher]:
    from kubernetes import client

    api_client = client.ApiClient(client.Configuration(host=str(kmock.url).rstrip("/")))
    try:
        yield TrainJobLauncher(api_client, namespace=NAMESPACE, request_timeout_s=5)
    finally:
        api_client.close()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from cta_model.model_folder import save_model_folder
    from cta_model.nn.models import ModelSpec, build_model

    spec = ModelSpec(
        arch="hps",
        tasks=("height",),
        input_size=(32, 32),
        backbone="resnet18",
        output_stride=8,
    )
    return save_model_folder(build_model(spec), tmp_path_factory.mktemp("trained") / "model")


@pytest.fixture
def output_uri(moto_s3, s3_bucket, monkeypatch) -> str:
    monkeypatch.setenv("CTA_S3_ENDPOINT_URL", moto_s3.endpoint_url)
    return f"s3://{s3_bucket}/runs/r7"


#: What rank 0 writes beside the model folder (`cta train --summary-out`).
SUMMARY = {"model_id": "m-7", "run_id": "run-7", "best_epoch": 3, "best_metrics": {}}


def pods_trained(model_folder: Path, output_uri: str) -> None:
    """Stand in for the pods' work: the model folder and the run's summary on S3."""
    upload_tree(model_folder, model_uri(output_uri))
    write_bytes_atomic(summary_uri(output_uri), json.dumps(SUMMARY).encode())


def condition(kind: str, reason: str, message: str = "") -> dict[str, str]:
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-03-01T00:00:00Z",
    }


def play_trainer(kmock, final: dict[str, Any] | None, pod_names: tuple[str, ...] = ()) -> None:
    """The controller: the 1st poll sees no status, the 2nd ``final``; pods log two lines."""
    polls = 0

    def fetch(request):
        nonlocal polls
        polls += 1
        trainjob = kmock.objects[TRAINJOBS, NAMESPACE, request.name]
        if polls >= 2 and final is not None:
            trainjob.patch({"status": final})
        return trainjob.raw

    def list_pods(request):
        jobset = request.params["labelSelector"].split(",")[0].split("=", 1)[1]
        items = [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": NAMESPACE,
                    "labels": {
                        "jobset.sigs.k8s.io/jobset-name": jobset,
                        "jobset.sigs.k8s.io/replicatedjob-name": "node",
                        "jobset.sigs.k8s.io/job-index": "0",
                        "batch.kubernetes.io/job-completion-index": str(index),
                    },
                },
            }
            for index, name in enumerate(pod_names)
        ]
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

    kmock[kmock.action.FETCH, kmock.resource(TRAINJOBS)] << fetch
    kmock[kmock.action.LIST, kmock.resource(PODS)] << list_pods
    kmock["get", kmock.resource(PODS), kmock.subresource("log")] << (
        lambda request: f"epoch 1 on {request.name}\nsaved model".encode()
    )


def calls(kmock) -> list[tuple[str, str | None, str | None]]:
    return [
        (
            request.method.value,
            request.resource.plural if request.resource is not None else None,
            request.subresource,
        )
        for request in kmock
    ]


def run(launcher, output_uri, fetch_to, lines, **kwargs):
    return asyncio.to_thread(
        run_on_kubeflow,
        CONFIG,
        output_uri,
        SPEC,
        launcher=launcher,
        deadline_s=kwargs.pop("deadline_s", 5.0),
        poll_s=0.01,
        fetch_to=fetch_to,
        log=lines.append,
        **kwargs,
    )


@pytest.mark.asyncio
async def test_complete_job_streams_logs_and_fetches_the_verified_model(
    kmock, launcher, output_uri, model_folder, tmp_path
):
    pods_trained(model_folder, output_uri)
    play_trainer(kmock, {"conditions": [condition("Complete", "JobsCompleted")]}, ("pod-a",))
    lines: list[str] = []

    result = await run(launcher, output_uri, tmp_path / "fetched", lines)

    name = remote_spec(CONFIG, output_uri, SPEC).name
    assert result == {
        "trainjob": name,
        "model_dir": str(tmp_path / "fetched"),
        "output_uri": output_uri,
        "summary": SUMMARY,
    }
    assert calls(kmock) == [
        ("POST", "trainjobs", None),
        ("GET", "trainjobs", None),
        ("GET", "trainjobs", None),
        ("GET", "pods", None),
        ("GET", "pods", "log"),
    ]
    sent = kmock.objects[TRAINJOBS, NAMESPACE, name]["spec"]["trainer"]["command"]
    assert sent[-4:] == [
        "--upload-to",
        f"{output_uri}/model",
        "--summary-out",
        f"{output_uri}/train_summary.json",
    ]
    assert lines == [
        f"submitted TrainJob {NAMESPACE}/{name}",
        f"TrainJob {NAMESPACE}/{name}: Pending",
        f"TrainJob {NAMESPACE}/{name}: Complete (JobsCompleted)",
        "[pod-a] epoch 1 on pod-a",
        "[pod-a] saved model",
        f"fetched {output_uri}/model to {tmp_path / 'fetched'}",
    ]
    fetched = sorted(p.name for p in (tmp_path / "fetched").iterdir())
    assert fetched == sorted(p.name for p in model_folder.iterdir())

    # Run again: the finished TrainJob is reused, not created twice.
    again: list[str] = []
    await run(launcher, output_uri, None, again)
    assert again[0] == f"reusing existing TrainJob {NAMESPACE}/{name}"
    assert len(kmock.objects) == 1


@pytest.mark.asyncio
async def test_failed_job_raises_its_reason_after_the_logs_and_fetches_nothing(
    kmock, launcher, output_uri, model_folder, tmp_path
):
    pods_trained(model_folder, output_uri)
    failed = {"conditions": [condition("Failed", "BackoffLimitExceeded", "node-0 exited 1")]}
    play_trainer(kmock, failed, ("pod-a",))
    lines: list[str] = []

    with pytest.raises(TrainJobFailed, match="BackoffLimitExceeded: node-0 exited 1") as caught:
        await run(launcher, output_uri, tmp_path / "fetched", lines)

    assert caught.value.reason == "BackoffLimitExceeded"
    name = remote_spec(CONFIG, output_uri, SPEC).name
    assert lines[1:] == [
        f"TrainJob {NAMESPACE}/{name}: Pending",
        f"TrainJob {NAMESPACE}/{name}: Failed (BackoffLimitExceeded: node-0 exited 1)",
        "[pod-a] epoch 1 on pod-a",
        "[pod-a] saved model",
    ]
    assert not (tmp_path / "fetched").exists()
    assert [call[0] for call in calls(kmock)] == ["POST", "GET", "GET", "GET", "GET"]


@pytest.mark.asyncio
async def test_timeout_without_pods_says_so_and_reraises(kmock, launcher, output_uri, tmp_path):
    play_trainer(kmock, None)
    lines: list[str] = []

    with pytest.raises(TrainJobTimeout, match="left running"):
        await run(launcher, output_uri, tmp_path / "fetched", lines, deadline_s=0.2)

    assert lines[-1].startswith("(logs unavailable: no pods match")
    assert not (tmp_path / "fetched").exists()


@pytest.mark.asyncio
async def test_a_tampered_model_folder_is_a_data_error(
    kmock, launcher, output_uri, model_folder, tmp_path
):
    pods_trained(model_folder, output_uri)
    bucket, key = output_uri.removeprefix("s3://").split("/", 1)
    make_s3_client().put_object(Bucket=bucket, Key=f"{key}/model/model.yaml", Body=b"tampered")
    play_trainer(kmock, {"conditions": [condition("Complete", "JobsCompleted")]}, ("pod-a",))

    with pytest.raises(DataError, match="model.yaml: sha256 differs"):
        await run(launcher, output_uri, tmp_path / "fetched", [])


# ------------------------------------------------------------------ step.run --upload-to
def test_step_run_uploads_the_model_folder_on_rank_0(
    moto_s3, s3_bucket, monkeypatch, tmp_path, model_folder
):
    import components.train.tracking
    import cta_model.training
    from components.train import step

    monkeypatch.setenv("CTA_S3_ENDPOINT_URL", moto_s3.endpoint_url)
    monkeypatch.delenv("RANK", raising=False)

    class FakeResult:
        model_dir = model_folder
        best_metrics = {"val/loss": 0.5}
        best_epoch = 1

    class FakeTracker:  # no MLflow: only the upload path is under test
        model_info = None
        run_id = "run-1"

        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(cta_model.training, "train", lambda *args, **kwargs: FakeResult())
    monkeypatch.setattr(components.train.tracking, "MlflowTracker", FakeTracker)
    config = tmp_path / "train.yaml"
    config.write_text(
        "model: {arch: hps, tasks: [height], backbone: resnet18}\n"
        f"data: {{path: {tmp_path / 'data'}}}\n"
        f"output: {tmp_path / 'out'}\n"
        "max_steps: 1\n"
    )
    uri = f"s3://{s3_bucket}/runs/r7/model"

    with pytest.raises(ConfigError, match="must be an s3:// prefix"):
        step.run(str(config), environ={}, upload_to=str(tmp_path / "elsewhere"))
    result = step.run(str(config), environ={}, upload_to=uri)

    assert result["uploaded_to"] == uri
    listed = moto_s3.client().list_objects_v2(Bucket=s3_bucket, Prefix="runs/r7/model/")
    keys = sorted(entry["Key"].rsplit("/", 1)[1] for entry in listed["Contents"])
    assert keys == sorted(p.name for p in model_folder.iterdir())

    # Other ranks upload nothing.
    monkeypatch.setenv("RANK", "1")
    other = step.run(str(config), environ={}, upload_to=f"s3://{s3_bucket}/other/model")
    assert "uploaded_to" not in other
    assert "Contents" not in moto_s3.client().list_objects_v2(Bucket=s3_bucket, Prefix="other/")


# ------------------------------------------------------------------------------- the CLI
def test_cli_kubeflow_backend_passes_the_spec_and_refuses_local_flags(monkeypatch, tmp_path):
    import json

    from click.testing import CliRunner

    import components.train.remote as remote
    from cta_cli.main import main

    seen: dict[str, Any] = {}

    def fake_run(config_uri, output_uri, spec_kwargs, **kwargs):
        seen.update(config_uri=config_uri, output_uri=output_uri, spec=spec_kwargs, **kwargs)
        return {"trainjob": "cta-train-x", "model_dir": None, "output_uri": output_uri}

    monkeypatch.setattr(remote, "run_on_kubeflow", fake_run)
    monkeypatch.setattr("components.train.trainjob.default_api_client", lambda: None)
    monkeypatch.setattr(
        "components.train.trainjob.TrainJobLauncher.__init__",
        lambda self, api_client, *, namespace: setattr(self, "namespace", namespace),
    )
    args = ["train", "--backend", "kubeflow", "--config", CONFIG, "--image", "cta:1"]
    runner = CliRunner()

    result = runner.invoke(
        main,
        [*args, "--output-uri", "s3://b/r7", "--nodes", "2", "--procs-per-node", "4"]
        + ["--namespace", NAMESPACE, "--s3-secret", "cta-s3", "--deadline", "60"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["trainjob"] == "cta-train-x"
    assert seen["config_uri"] == CONFIG and seen["deadline_s"] == 60
    assert seen["spec"] == {
        "namespace": NAMESPACE,
        "image": "cta:1",
        "num_nodes": 2,
        "num_proc_per_node": 4,
        "resources": {"gpus": 0},
        "secret_env": {"AWS_ACCESS_KEY_ID": "cta-s3", "AWS_SECRET_ACCESS_KEY": "cta-s3"},
    }

    # --nodes M --gpus N: N GPUs per node, one process each; MLflow as env and Secret refs.
    gpus = runner.invoke(
        main,
        [*args, "--output-uri", "s3://b/r7", "--nodes", "3", "--gpus", "8"]
        + ["--tracking-uri", "http://mlflow.mlflow:5000", "--mlflow-secret", "cta-mlflow"],
    )
    assert gpus.exit_code == 0, gpus.output
    assert seen["spec"]["num_nodes"] == 3 and seen["spec"]["num_proc_per_node"] == "auto"
    assert seen["spec"]["resources"] == {"gpus": 8}
    assert seen["spec"]["env"] == {"MLFLOW_TRACKING_URI": "http://mlflow.mlflow:5000"}
    assert seen["spec"]["secret_env"] == {
        key: {"secret": "cta-mlflow", "key": key, "optional": True}
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    }
    manifest = build_trainjob_manifest(remote_spec(CONFIG, "s3://b/r7", seen["spec"]))
    validate_trainjob(manifest)
    limits = manifest["spec"]["trainer"]["resourcesPerNode"]["limits"]
    assert limits["nvidia.com/gpu"] == "8" and manifest["spec"]["trainer"]["numNodes"] == 3
    no_backend = runner.invoke(main, ["train", "--gpus", "2"])
    assert no_backend.exit_code == 2 and "--gpus: only with --backend kubeflow" in no_backend.output

    missing = runner.invoke(main, args)
    assert missing.exit_code == 2 and "needs --output-uri" in missing.output
    local = runner.invoke(main, [*args, "--output-uri", "s3://b/r7", "--epochs", "3"])
    assert local.exit_code == 2 and "--epochs: not used with --backend kubeflow" in local.output
    bad = runner.invoke(main, [*args, "--output-uri", "s3://b/r7", "--procs-per-node", "x"])
    assert bad.exit_code == 2 and "positive integer or auto" in bad.output
    absent = runner.invoke(main, ["train", "--config", str(tmp_path / "none.yaml")])
    assert absent.exit_code == 2 and "no such file" in absent.output
