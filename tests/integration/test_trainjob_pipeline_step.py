"""The pipeline's train step on the TrainJob backend (issue 16 item 3b), against kmock (the API
server; the test plays the Trainer) and moto (S3; the test plays the pods' uploads).

Call sequences: create -> watch (each state into the step's log) -> success (model fetched,
summary returned), failure, time-out on an injected clock, and cancel (SIGTERM -> DELETE). The
manifest carries an ownerReference to the step's pod and is checked against the vendored CRD.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components.storage import read_bytes, upload_tree, write_bytes_atomic
from components.train import trainjob
from components.train.remote import (
    cancelled_by_sigterm,
    model_uri,
    pipeline_spec_kwargs,
    pod_identity,
    remote_spec,
    summary_uri,
    train_in_trainjob,
)
from components.train.trainjob import (
    TrainJobCancelled,
    TrainJobFailed,
    TrainJobLauncher,
    TrainJobTimeout,
    build_trainjob_manifest,
    load_trainjob_spec,
    trainjob_problems,
    validate_trainjob,
)
from cta_model.errors import ConfigError

pytestmark = [pytest.mark.integration]

NAMESPACE = "cta-pipelines"
POD = {"POD_NAME": "cta-training-abc12-train-trainjob-77", "POD_UID": "5f0c-11aa"}
ENV = {**POD, "POD_NAMESPACE": NAMESPACE}
TRAINJOBS = "trainer.kubeflow.org/v1alpha1/trainjobs"
PODS = "v1/pods"
CONFIG = "/app/configs/demo.yaml"
IMAGE = "registry.example.com/cta:0.1.0"
SUMMARY = {"model_id": "m-42", "run_id": "run-42", "best_epoch": 2, "best_metrics": {}}


def step_kwargs(**overrides: Any) -> dict[str, Any]:
    return {
        "namespace": NAMESPACE,
        "owner": {"name": POD["POD_NAME"], "uid": POD["POD_UID"]},
        "run_key": "kfp-run-1",
        "image": IMAGE,
        "nodes": 2,
        "gpus": 4,
        "tracking_uri": "http://mlflow.mlflow:5000",
        "s3_secret": "cta-s3",
        "mlflow_secret": "cta-mlflow",
        "environ": {"CTA_S3_ENDPOINT_URL": "http://minio:9000", "AWS_ACCESS_KEY_ID": "leak"},
    } | overrides


# ------------------------------------------------------------------------------ manifest
def test_the_pipeline_trainjob_is_valid_against_the_vendored_crd():
    spec = remote_spec(CONFIG, "s3://b/runs/r1", pipeline_spec_kwargs(**step_kwargs()))
    manifest = build_trainjob_manifest(spec)
    validate_trainjob(manifest)

    assert manifest["metadata"]["namespace"] == NAMESPACE
    assert manifest["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": POD["POD_NAME"],
            "uid": POD["POD_UID"],
            "controller": False,
            "blockOwnerDeletion": False,
        }
    ]
    trainer = manifest["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    env = {entry["name"]: entry for entry in trainer["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.mlflow:5000"
    assert env["CTA_S3_ENDPOINT_URL"]["value"] == "http://minio:9000"
    # Credentials only by reference: the step's own AWS key never enters the manifest.
    assert "leak" not in json.dumps(manifest)
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "cta-s3",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "cta-mlflow",
        "key": "MLFLOW_TRACKING_PASSWORD",
        "optional": True,
    }


def test_one_trainjob_per_pipeline_run_and_cpu_when_no_gpu():
    first = pipeline_spec_kwargs(**step_kwargs())
    assert pipeline_spec_kwargs(**step_kwargs())["name"] == first["name"]  # a retried step
    assert pipeline_spec_kwargs(**step_kwargs(run_key="kfp-run-2"))["name"] != first["name"]
    cpu = pipeline_spec_kwargs(**step_kwargs(gpus=0))
    assert cpu["num_proc_per_node"] == "auto" and cpu["resources"] == {"gpus": 0}
    manifest = build_trainjob_manifest(remote_spec(CONFIG, "s3://b/r", cpu))
    assert "nvidia.com/gpu" not in manifest["spec"]["trainer"]["resourcesPerNode"]["limits"]


def test_an_invalid_owner_or_field_is_rejected():
    with pytest.raises(ConfigError, match="owner pod name"):
        load_trainjob_spec(
            pipeline_spec_kwargs(**step_kwargs(owner={"name": "Bad_Pod", "uid": "u"}))
            | {"config_path": CONFIG}
        )
    manifest = build_trainjob_manifest(
        remote_spec(CONFIG, "s3://b/r", pipeline_spec_kwargs(**step_kwargs()))
    )
    manifest["spec"]["trainer"]["env"][0]["valueFrom"] = {"secretKeyRef": {"nme": "x"}}
    paths = [path for path, _ in trainjob_problems(manifest)]
    assert "spec.trainer.env[0].valueFrom.secretKeyRef.nme" in paths


def test_the_step_needs_its_pod_identity():
    assert pod_identity(ENV) == (NAMESPACE, {"name": POD["POD_NAME"], "uid": POD["POD_UID"]})
    with pytest.raises(ConfigError, match="POD_UID not set: the TrainJob backend runs only"):
        pod_identity({"POD_NAME": "p", "POD_NAMESPACE": "n"})


def test_sigterm_becomes_a_cancellation_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainJobCancelled, match="run was cancelled"), cancelled_by_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 1)  # let the handler run
    assert signal.getsignal(signal.SIGTERM) == before


# ------------------------------------------------------------------- kmock + moto: the step
class FakeClock:
    """``time`` of components.train.trainjob: monotonic() is the time slept; ``interrupt_at``
    makes the n-th sleep raise TrainJobCancelled (what SIGTERM raises in the step's pod)."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.interrupt_at = interrupt_at

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.interrupt_at is not None and len(self.sleeps) == self.interrupt_at:
            raise TrainJobCancelled("the step was terminated (SIGTERM): the run was cancelled")
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(trainjob, "time", fake)
    return fake


@pytest.fixture
def launcher(kmock) -> Iterator[TrainJobLauncher]:
    from kubernetes import client

    api_client = client.ApiClient(client.Configuration(host=str(kmock.url).rstrip("/")))
    try:
        yield TrainJobLauncher(api_client, namespace=NAMESPACE, request_timeout_s=5)
    finally:
        api_client.close()


@pytest.fixture
def output_uri(moto_s3, s3_bucket, monkeypatch) -> str:
    monkeypatch.setenv("CTA_S3_ENDPOINT_URL", moto_s3.endpoint_url)
    return f"s3://{s3_bucket}/trainjobs"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from cta_model.model_folder import save_model_folder
    from cta_model.nn.models import ModelSpec, build_model

    spec = ModelSpec(
        arch="hps", tasks=("height",), input_size=(32, 32), backbone="resnet18", output_stride=8
    )
    return save_model_folder(build_model(spec), tmp_path_factory.mktemp("trained") / "model")


@pytest.fixture
def dataset_ref(tmp_path) -> Path:
    path = tmp_path / "validate_data" / "dataset_ref.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"uri": "s3://data/press-a", "manifest_sha256": "ab" * 32}))
    return path


def condition(kind: str, reason: str, message: str = "") -> dict[str, str]:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


def play_trainer(kmock, statuses: list[dict[str, Any] | None], on_poll=None) -> None:
    """Before answering the i-th GET of the TrainJob, write statuses[i] (the last one repeats)
    and call ``on_poll(i)``; one pod that logs an epoch line."""
    polls = 0

    def fetch(request):
        nonlocal polls
        status = statuses[min(polls, len(statuses) - 1)]
        if on_poll is not None:
            on_poll(polls)
        polls += 1
        trainjob_object = kmock.objects[TRAINJOBS, NAMESPACE, request.name]
        if status is not None:
            trainjob_object.patch({"status": status})
        return trainjob_object.raw

    def list_pods(request):
        jobset = request.params["labelSelector"].split(",")[0].split("=", 1)[1]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{jobset}-node-0-0", "namespace": NAMESPACE, "labels": {}},
        }
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod]}

    kmock[kmock.action.FETCH, kmock.resource(TRAINJOBS)] << fetch
    kmock[kmock.action.LIST, kmock.resource(PODS)] << list_pods
    kmock["get", kmock.resource(PODS), kmock.subresource("log")] << (
        lambda request: b"epoch 1/2 step 10: train loss 0.5000, val_loss 0.6000\n"
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


def run_step(launcher, dataset_ref, output_uri, out_dir, lines, **kwargs):
    return asyncio.to_thread(
        train_in_trainjob,
        dataset_ref=str(dataset_ref),
        config_path=CONFIG,
        out_dir=str(out_dir),
        output_uri=output_uri,
        run_key="kfp-run-1",
        image=IMAGE,
        nodes=2,
        gpus=4,
        tracking_uri="http://mlflow.mlflow:5000",
        s3_secret="cta-s3",
        mlflow_secret="cta-mlflow",
        deadline_s=kwargs.pop("deadline_s", 5.0),
        poll_s=kwargs.pop("poll_s", 0.5),
        launcher=launcher,
        environ=ENV,
        log=lines.append,
    )


def expected_run(output_uri: str) -> tuple[str, str]:
    kwargs = pipeline_spec_kwargs(**step_kwargs(environ={}))
    return kwargs["name"], f"{output_uri}/{kwargs['run_id']}"


@pytest.mark.asyncio
async def test_create_watch_and_succeed(
    kmock, launcher, clock, output_uri, dataset_ref, model_folder, tmp_path
):
    name, run_uri = expected_run(output_uri)

    def pods_finish(poll: int) -> None:
        if poll == 2:  # rank 0 uploads the model folder and the summary, then exits
            upload_tree(model_folder, model_uri(run_uri))
            write_bytes_atomic(summary_uri(run_uri), json.dumps(SUMMARY).encode())

    running = {"jobsStatus": [{"name": "node", "active": 2}]}
    complete = {"conditions": [condition("Complete", "JobsCompleted", "jobs completed")]}
    play_trainer(kmock, [None, running, complete], on_poll=pods_finish)
    lines: list[str] = []

    summary = await run_step(launcher, dataset_ref, output_uri, tmp_path / "train", lines)

    assert summary == {
        **SUMMARY,
        "model_dir": str(tmp_path / "train" / "model"),
        "trainjob": name,
    }
    assert sorted(p.name for p in (tmp_path / "train" / "model").iterdir()) == sorted(
        p.name for p in model_folder.iterdir()
    )
    assert calls(kmock) == [
        ("POST", "trainjobs", None),
        ("GET", "trainjobs", None),
        ("GET", "trainjobs", None),
        ("GET", "trainjobs", None),
        ("GET", "pods", None),
        ("GET", "pods", "log"),
    ]
    assert clock.sleeps == [0.5, 0.5]
    assert lines == [
        f"submitted TrainJob {NAMESPACE}/{name}",
        f"TrainJob {NAMESPACE}/{name}: Pending",
        f"TrainJob {NAMESPACE}/{name}: Running",
        f"TrainJob {NAMESPACE}/{name}: Complete (JobsCompleted: jobs completed)",
        f"[{name}-node-0-0] epoch 1/2 step 10: train loss 0.5000, val_loss 0.6000",
        f"fetched {run_uri}/model to {tmp_path / 'train' / 'model'}",
    ]
    created = kmock.objects[TRAINJOBS, NAMESPACE, name]
    assert created["metadata"]["ownerReferences"][0]["uid"] == POD["POD_UID"]
    command = created["spec"]["trainer"]["command"]
    ref_uri = f"{run_uri}/dataset_ref.json"
    assert command[-4:] == ["--data", ref_uri, "--experiment", "cta"]
    # The pods read the very dataset_ref the step validated.
    assert read_bytes(ref_uri) == dataset_ref.read_bytes()


@pytest.mark.asyncio
async def test_a_failed_trainjob_fails_the_step(
    kmock, launcher, clock, output_uri, dataset_ref, tmp_path
):
    failed = {"conditions": [condition("Failed", "BackoffLimitExceeded", "node-1 exited 1")]}
    play_trainer(kmock, [None, failed])
    lines: list[str] = []

    with pytest.raises(TrainJobFailed, match="BackoffLimitExceeded: node-1 exited 1"):
        await run_step(launcher, dataset_ref, output_uri, tmp_path / "train", lines)

    assert [call[0] for call in calls(kmock)] == ["POST", "GET", "GET", "GET", "GET"]
    assert any("Failed (BackoffLimitExceeded" in line for line in lines)
    assert not (tmp_path / "train" / "model").exists()
    name, _ = expected_run(output_uri)
    assert not kmock.objects[TRAINJOBS, NAMESPACE, name].deleted  # kept for inspection


@pytest.mark.asyncio
async def test_the_deadline_on_the_injected_clock(
    kmock, launcher, clock, output_uri, dataset_ref, tmp_path
):
    play_trainer(kmock, [None])
    lines: list[str] = []

    with pytest.raises(TrainJobTimeout, match=r"did not finish within 1\.25 s"):
        await run_step(
            launcher, dataset_ref, output_uri, tmp_path / "train", lines, deadline_s=1.25
        )

    assert clock.sleeps == [0.5, 0.5, 0.25] and clock.now == 1.25
    polls = [call for call in calls(kmock) if call == ("GET", "trainjobs", None)]
    assert len(polls) == 4
    assert "DELETE" not in [call[0] for call in calls(kmock)]


@pytest.mark.asyncio
async def test_cancel_deletes_the_trainjob(
    kmock, launcher, monkeypatch, output_uri, dataset_ref, tmp_path
):
    monkeypatch.setattr(trainjob, "time", FakeClock(interrupt_at=2))
    play_trainer(kmock, [None, {"jobsStatus": [{"name": "node", "active": 2}]}])
    lines: list[str] = []

    with pytest.raises(TrainJobCancelled):
        await run_step(launcher, dataset_ref, output_uri, tmp_path / "train", lines)

    assert calls(kmock) == [
        ("POST", "trainjobs", None),
        ("GET", "trainjobs", None),
        ("GET", "trainjobs", None),
        ("DELETE", "trainjobs", None),
    ]
    name, _ = expected_run(output_uri)
    assert lines[-1] == f"cancelled: TrainJob {NAMESPACE}/{name} deleted"
    deletes = [request for request in kmock if request.method.value == "DELETE"]
    assert deletes[0].params["propagationPolicy"] == "Background"
