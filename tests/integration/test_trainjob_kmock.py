"""TrainJobLauncher against kmock's emulated Kubernetes API server on loopback.

The launcher uses the real (synchronous) ``kubernetes`` client; each call runs in a worker thread
so that the emulator, which serves from this test's event loop, can answer. The emulator stores
objects and records every request; the test plays the Trainer controller by writing the
TrainJob's status, and serves pod logs, which kmock does not emulate.

The launcher's waits run on a fake clock (``clock``): its deadline counts the time it slept, so
the tests assert when it polls and when it gives up, however slow the machine is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from kmock import KubernetesError

from components.train import trainjob
from components.train.trainjob import (
    TrainJobConflict,
    TrainJobError,
    TrainJobFailed,
    TrainJobLauncher,
    TrainJobTimeout,
    build_trainjob_manifest,
    load_trainjob_spec,
    trainer_pod_selector,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

NAMESPACE = "cta"
NAME = "cta-train-r7"
TRAINJOBS = "trainer.kubeflow.org/v1alpha1/trainjobs"
PODS = "v1/pods"


def trainjob_manifest(**overrides: Any) -> dict[str, Any]:
    spec = {
        "name": NAME,
        "namespace": NAMESPACE,
        "run_id": "r7",
        "image": "registry.example.com/cta:0.1.0",
        "config_path": "/data/runs/r7/train.yaml",
        "num_nodes": 2,
        "resources": {"cpu": 2, "memory": "4Gi"},
        "secret_env": {"AWS_ACCESS_KEY_ID": "cta-s3", "AWS_SECRET_ACCESS_KEY": "cta-s3"},
        "volumes": [{"claim_name": "cta-runs", "mount_path": "/data/runs"}],
    } | overrides
    return build_trainjob_manifest(load_trainjob_spec(spec))


def condition(kind: str, reason: str, message: str = "") -> dict[str, str]:
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-03-01T00:00:00Z",
    }


class FakeClock:
    """Stands in for the ``time`` module of components.train.trainjob: ``monotonic()`` is the
    time slept so far, ``sleep`` returns at once, adding to it, and records the interval."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture(autouse=True)
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(trainjob, "time", fake)
    return fake


@pytest.fixture
def launcher(kmock) -> Iterator[TrainJobLauncher]:
    from kubernetes import client

    configuration = client.Configuration(host=str(kmock.url).rstrip("/"))
    api_client = client.ApiClient(configuration)
    try:
        yield TrainJobLauncher(api_client, namespace=NAMESPACE, request_timeout_s=5)
    finally:
        api_client.close()


def calls(kmock) -> list[tuple[str, str | None, str | None, str | None]]:
    """(HTTP method, resource plural, object name, subresource) of every recorded request."""
    return [
        (
            request.method.value,
            request.resource.plural if request.resource is not None else None,
            request.name,
            request.subresource,
        )
        for request in kmock
    ]


def play_controller(kmock, statuses: list[dict[str, Any] | Exception | None]) -> None:
    """Serve GETs of the TrainJob, writing statuses[i] (if any) before answering the i-th one.

    An exception in ``statuses`` is raised instead: kmock answers a KubernetesError with its
    status code and a Kubernetes Status body.
    """
    polls = 0

    def fetch(request):
        nonlocal polls
        status = statuses[min(polls, len(statuses) - 1)]
        polls += 1
        if isinstance(status, Exception):
            raise status
        trainjob = kmock.objects[TRAINJOBS, NAMESPACE, request.name]
        if status is not None:
            trainjob.patch({"status": status})
        return trainjob.raw

    kmock[kmock.action.FETCH, kmock.resource(TRAINJOBS), kmock.name(NAME)] << fetch


def serve_pods_by_label_selector(kmock) -> None:
    """kmock lists every pod of a namespace; the API server filters by equality selectors."""

    def list_pods(request):
        terms = [term for term in request.params.get("labelSelector", "").split(",") if term]
        wanted = dict(term.split("=", 1) for term in terms)
        items = [
            pod.raw
            for (resource, namespace, _), pod in kmock.objects.items()
            if resource == PODS and namespace == request.namespace and not pod.deleted
            if wanted.items() <= (pod.get("metadata", {}).get("labels") or {}).items()
        ]
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

    kmock[kmock.action.LIST, kmock.resource(PODS)] << list_pods


def add_pod(kmock, jobset: str, completion_index: int) -> str:
    name = f"{jobset}-node-0-{completion_index}-x{completion_index}z"
    kmock.objects[PODS, NAMESPACE, name] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {
                "jobset.sigs.k8s.io/jobset-name": jobset,
                "jobset.sigs.k8s.io/replicatedjob-name": "node",
                "jobset.sigs.k8s.io/job-index": "0",
                "batch.kubernetes.io/job-completion-index": str(completion_index),
            },
        },
    }
    return name


async def test_submit_wait_and_read_logs_in_order(kmock, launcher, clock):
    play_controller(
        kmock,
        [
            None,
            {
                "jobsStatus": [
                    {
                        "name": "node",
                        "active": 1,
                        "ready": 1,
                        "succeeded": 0,
                        "failed": 0,
                        "suspended": 0,
                    }
                ]
            },
            {"conditions": [condition("Complete", "JobsCompleted", "jobs completed")]},
        ],
    )
    serve_pods_by_label_selector(kmock)
    # Created out of rank order, plus a pod of another TrainJob that must not be read.
    rank1 = add_pod(kmock, NAME, 1)
    rank0 = add_pod(kmock, NAME, 0)
    add_pod(kmock, "cta-train-other", 0)
    # A log line that looks like JSON must come back verbatim, not decoded by the client.
    kmock["get", kmock.resource(PODS), kmock.subresource("log")] << (
        lambda request: f'start {request.name}\n{{"loss": 0.5}}\ndone'.encode()
    )
    manifest = trainjob_manifest()

    submitted = await asyncio.to_thread(launcher.submit, manifest)
    finished = await asyncio.to_thread(launcher.wait, NAME, 5.0, 0.01)
    lines = await asyncio.to_thread(lambda: list(launcher.stream_logs(NAME)))

    assert submitted.created and submitted.name == NAME
    assert finished["status"]["conditions"][0]["type"] == "Complete"
    assert clock.sleeps == [0.01, 0.01]  # one poll interval between the three polls
    assert kmock.objects[TRAINJOBS, NAMESPACE, NAME] >= manifest
    assert [(line.pod, line.line) for line in lines] == [
        (rank0, f"start {rank0}"),
        (rank0, '{"loss": 0.5}'),
        (rank0, "done"),
        (rank1, f"start {rank1}"),
        (rank1, '{"loss": 0.5}'),
        (rank1, "done"),
    ]
    assert calls(kmock) == [
        ("POST", "trainjobs", None, None),
        ("GET", "trainjobs", NAME, None),
        ("GET", "trainjobs", NAME, None),
        ("GET", "trainjobs", NAME, None),
        ("GET", "pods", None, None),
        ("GET", "pods", rank0, "log"),
        ("GET", "pods", rank1, "log"),
    ]
    requests = list(kmock)
    assert (
        requests[0].url.path
        == f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NAMESPACE}/trainjobs"
    )
    assert requests[4].params["labelSelector"] == trainer_pod_selector(NAME)
    assert requests[5].params["container"] == "node"
    # The emulator stored exactly what was sent: credentials only as Secret references.
    env = kmock.objects[TRAINJOBS, NAMESPACE, NAME]["spec"]["trainer"]["env"]
    assert all("value" not in entry and "secretKeyRef" in entry["valueFrom"] for entry in env)


async def test_failed_status_surfaces_the_reason_and_deletes_nothing(kmock, launcher, clock):
    play_controller(
        kmock,
        [None, {"conditions": [condition("Failed", "DeadlineExceeded", "ran past 3600 s")]}],
    )
    await asyncio.to_thread(launcher.submit, trainjob_manifest())

    with pytest.raises(TrainJobFailed) as caught:
        await asyncio.to_thread(launcher.wait, NAME, 5.0, 0.01)

    assert caught.value.reason == "DeadlineExceeded"
    assert caught.value.detail == "ran past 3600 s"
    assert f"TrainJob {NAMESPACE}/{NAME} failed: DeadlineExceeded: ran past 3600 s" in str(
        caught.value
    )
    assert [call[0] for call in calls(kmock)] == ["POST", "GET", "GET"]
    assert clock.sleeps == [0.01]
    assert not kmock.objects[TRAINJOBS, NAMESPACE, NAME].deleted


async def test_the_deadline_is_respected_and_the_job_left_running(kmock, launcher, clock):
    play_controller(kmock, [None])  # never finishes
    await asyncio.to_thread(launcher.submit, trainjob_manifest())

    with pytest.raises(TrainJobTimeout, match=r"did not finish within 0\.3125 s .*left running"):
        await asyncio.to_thread(launcher.wait, NAME, 0.3125, 0.125)

    # Polls at 0, 0.125, 0.25 and 0.3125: the last interval is cut to the deadline, and the
    # wait gives up at the deadline, after one last poll (values exact in binary).
    assert clock.sleeps == [0.125, 0.125, 0.0625]
    assert clock.now == 0.3125
    polls = [call for call in calls(kmock) if call == ("GET", "trainjobs", NAME, None)]
    assert len(polls) == 4
    assert "DELETE" not in [call[0] for call in calls(kmock)]
    assert not kmock.objects[TRAINJOBS, NAMESPACE, NAME].deleted


async def test_waiting_polls_through_a_transient_api_error(kmock, launcher, clock):
    unavailable = KubernetesError(status=503, reason="ServiceUnavailable", message="restarting")
    play_controller(kmock, [unavailable, {"conditions": [condition("Complete", "JobsCompleted")]}])
    await asyncio.to_thread(launcher.submit, trainjob_manifest())

    finished = await asyncio.to_thread(launcher.wait, NAME, 5.0, 0.01)

    assert finished["status"]["conditions"][0]["type"] == "Complete"
    assert [call[0] for call in calls(kmock)] == ["POST", "GET", "GET"]
    assert clock.sleeps == [0.01]  # the 503 is waited out like a pending job


async def test_a_refused_poll_ends_the_wait_at_once(kmock, launcher, clock):
    forbidden = KubernetesError(status=403, reason="Forbidden", message="trainjobs is forbidden")
    play_controller(kmock, [forbidden])
    await asyncio.to_thread(launcher.submit, trainjob_manifest())

    with pytest.raises(TrainJobError, match="HTTP 403 Forbidden: trainjobs is forbidden"):
        await asyncio.to_thread(launcher.wait, NAME, 5.0, 0.01)
    assert [call[0] for call in calls(kmock)] == ["POST", "GET"]
    assert clock.sleeps == []


async def test_submitting_twice_creates_once(kmock, launcher):
    manifest = trainjob_manifest()
    first = await asyncio.to_thread(launcher.submit, manifest)
    # What a real API server adds on create; a resubmission must still count as the same job.
    kmock.objects[TRAINJOBS, NAMESPACE, NAME].patch(
        {
            "metadata": {"uid": "0c5e", "resourceVersion": "41"},
            "spec": {"suspend": False, "managedBy": "trainer.kubeflow.org/trainjob-controller"},
        }
    )
    second = await asyncio.to_thread(launcher.submit, manifest)

    assert (first.created, second.created) == (True, False)
    assert second.trainjob["metadata"]["uid"] == "0c5e"
    assert len(kmock.objects) == 1
    history = kmock.objects[TRAINJOBS, NAMESPACE, NAME].history
    assert len(history) == 2  # the creation and the test's own patch: no second creation
    assert calls(kmock) == [
        ("POST", "trainjobs", None, None),
        ("POST", "trainjobs", None, None),  # answered 409 Conflict
        ("GET", "trainjobs", NAME, None),
    ]


async def test_a_different_spec_under_the_same_name_is_a_conflict(kmock, launcher):
    await asyncio.to_thread(launcher.submit, trainjob_manifest())
    with pytest.raises(TrainJobConflict, match=r"spec\.trainer\.numNodes: wanted 4, cluster has 2"):
        await asyncio.to_thread(launcher.submit, trainjob_manifest(num_nodes=4))
    assert kmock.objects[TRAINJOBS, NAMESPACE, NAME]["spec"]["trainer"]["numNodes"] == 2


async def test_delete_and_missing_jobs(kmock, launcher, clock):
    await asyncio.to_thread(launcher.submit, trainjob_manifest())

    assert await asyncio.to_thread(launcher.delete, NAME) is True
    assert await asyncio.to_thread(launcher.delete, NAME) is False
    with pytest.raises(TrainJobError, match=f"TrainJob {NAMESPACE}/{NAME} not found"):
        await asyncio.to_thread(launcher.wait, NAME, 1.0, 0.01)
    assert clock.sleeps == []  # a missing TrainJob ends the wait at once
    deletes = [request for request in kmock if request.method.value == "DELETE"]
    assert len(deletes) == 2
    assert deletes[0].params["propagationPolicy"] == "Background"


async def test_no_pods_is_an_error_naming_the_selector(kmock, launcher):
    kmock.resources[PODS] = {}
    with pytest.raises(TrainJobError, match="no pods match jobset.sigs.k8s.io/jobset-name=" + NAME):
        await asyncio.to_thread(lambda: list(launcher.stream_logs(NAME)))
