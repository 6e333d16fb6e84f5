"""The kubernetes backend's calls against kmock's emulated API server, and the gitops backend
against a real git repository (`git init` in tmp)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.rollout.backends import ModelRef
from components.rollout.backends.gitops import GitOpsBackend
from components.rollout.backends.kubernetes import (
    KubernetesBackend,
    RolloutWaitError,
    rollout_complete,
)

pytestmark = pytest.mark.integration

LINE = "press-b"
NAMESPACE = f"cta-line-{LINE}"
DEPLOYMENTS = "apps/v1/deployments"
OLD = ModelRef("cta", "3", "0a" * 32)
NEW = ModelRef("cta", "4", "1b" * 32)


def deployment(name: str, model: ModelRef | None, replicas: int) -> dict[str, Any]:
    uri, sha = (model.uri, model.sha256) if model else ("unset", "unset")
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "generation": 1,
            "annotations": {"cta.rollout/model-uri": uri, "cta.rollout/sha256": sha},
        },
        "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "serve"}]}}},
        "status": {
            "observedGeneration": 1,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "availableReplicas": replicas,
        },
    }


def play_deployment_controller(kmock, polls_until_ready: int = 1) -> list[str]:
    """Serve GETs of Deployments: after a PATCH, report the rollout in progress for
    ``polls_until_ready`` polls, then complete (as the Deployment controller would)."""
    seen: dict[str, int] = {}

    def fetch(request):
        stored = kmock.objects[DEPLOYMENTS, request.namespace, request.name]
        generation = int(stored.get("metadata", {}).get("generation") or 1)
        patches = sum(1 for r in kmock if r.method.value == "PATCH" and r.name == request.name)
        key = f"{request.name}:{patches}"
        seen[key] = seen.get(key, 0) + 1
        replicas = int(stored["spec"].get("replicas") or 0)
        ready = seen[key] > polls_until_ready
        status = {
            "observedGeneration": generation + patches if ready else generation + patches - 1,
            "replicas": replicas,
            "updatedReplicas": replicas if ready else 0,
            "availableReplicas": replicas if ready else 0,
        }
        body = dict(stored.raw)
        body["metadata"] = {**body["metadata"], "generation": generation + patches}
        body["status"] = status
        return body

    kmock[kmock.action.FETCH, kmock.resource(DEPLOYMENTS)] << fetch
    return list(seen)


@pytest.fixture
def backend(kmock) -> Iterator[KubernetesBackend]:
    from kubernetes import client

    configuration = client.Configuration(host=str(kmock.url).rstrip("/"))
    api_client = client.ApiClient(configuration)
    try:
        yield KubernetesBackend(api_client, timeout_s=5, poll_s=0.01, request_timeout_s=5)
    finally:
        api_client.close()


def calls(kmock) -> list[tuple[str, str | None]]:
    return [(request.method.value, request.name) for request in kmock]


def patches(kmock) -> list[dict[str, Any]]:
    return [request.data for request in kmock if request.method.value == "PATCH"]


def env(patch: dict[str, Any]) -> dict[str, str]:
    container = patch["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item["value"] for item in container["env"]}


def test_rollout_complete_follows_kubectl_rollout_status() -> None:
    done = deployment("cta-serve", NEW, 1)
    assert rollout_complete(done)
    stale = {**done, "metadata": {**done["metadata"], "generation": 2}}
    assert not rollout_complete(stale)
    surging = {**done, "status": {**done["status"], "replicas": 2}}
    assert not rollout_complete(surging)


@pytest.mark.asyncio
async def test_live_deploy_waits_and_rollback_patches_the_previous_pin_back(kmock, backend):
    kmock.objects[DEPLOYMENTS, NAMESPACE, "cta-serve"] = deployment("cta-serve", OLD, 1)
    play_deployment_controller(kmock, polls_until_ready=2)
    previous = {
        "role": "live",
        "name": "cta",
        "version": "3",
        "sha256": OLD.sha256,
        "model_uri": OLD.uri,
        "namespace": NAMESPACE,
        "deployment": "cta-serve",
    }

    candidate = await asyncio.to_thread(backend.deploy_live, LINE, NEW, previous)
    restored = await asyncio.to_thread(backend.roll_back, LINE, candidate, previous)

    assert candidate["url"] == f"http://cta-serve.{NAMESPACE}.svc:8080"
    assert restored["version"] == "3"
    assert calls(kmock) == [
        ("PATCH", "cta-serve"),
        ("GET", "cta-serve"),
        ("GET", "cta-serve"),
        ("GET", "cta-serve"),
        ("PATCH", "cta-serve"),
        ("GET", "cta-serve"),
        ("GET", "cta-serve"),
        ("GET", "cta-serve"),
    ]
    first, second = patches(kmock)
    assert env(first) == {
        "CTA_MODEL_URI": NEW.uri,
        "CTA_MODEL_SHA256": NEW.sha256,
        "CTA_LINE_ID": LINE,
    }
    assert first["spec"]["replicas"] == 1
    assert first["metadata"]["annotations"]["cta.rollout/sha256"] == NEW.sha256
    assert env(second)["CTA_MODEL_URI"] == OLD.uri
    patch_request = next(r for r in kmock if r.method.value == "PATCH")
    headers = {key.lower(): value for key, value in patch_request.headers.items()}
    assert headers["content-type"] == "application/strategic-merge-patch+json"
    assert patch_request.url.path == (f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/cta-serve")


@pytest.mark.asyncio
async def test_shadow_promotion_pins_live_and_scales_the_shadow_down(kmock, backend):
    kmock.objects[DEPLOYMENTS, NAMESPACE, "cta-serve"] = deployment("cta-serve", OLD, 1)
    kmock.objects[DEPLOYMENTS, NAMESPACE, "cta-serve-shadow"] = deployment(
        "cta-serve-shadow", None, 0
    )
    play_deployment_controller(kmock, polls_until_ready=0)

    shadow = await asyncio.to_thread(backend.deploy_shadow, LINE, NEW)
    live = await asyncio.to_thread(backend.finish_promotion, LINE, shadow, None)

    assert shadow["url"] == f"http://cta-serve-shadow.{NAMESPACE}.svc:8080"
    assert live["deployment"] == "cta-serve" and live["version"] == "4"
    assert [c for c in calls(kmock) if c[0] == "PATCH"] == [
        ("PATCH", "cta-serve-shadow"),
        ("PATCH", "cta-serve"),
        ("PATCH", "cta-serve-shadow"),
    ]
    scale_down = patches(kmock)[-1]
    assert scale_down["spec"]["replicas"] == 0 and env(scale_down)["CTA_MODEL_URI"] == "unset"


@pytest.mark.asyncio
async def test_a_rollout_that_never_completes_and_a_refused_patch_are_errors(kmock, backend):
    from kmock import KubernetesError

    kmock.objects[DEPLOYMENTS, NAMESPACE, "cta-serve"] = deployment("cta-serve", OLD, 1)
    play_deployment_controller(kmock, polls_until_ready=10**6)
    backend.timeout_s = 0.2
    with pytest.raises(RolloutWaitError, match="did not finish its rollout within 0 s"):
        await asyncio.to_thread(backend.deploy_live, LINE, NEW, None)

    kmock[kmock.action.UPDATE, kmock.resource(DEPLOYMENTS)] << KubernetesError(
        status=403, reason="Forbidden", message="deployments.apps is forbidden"
    )
    with pytest.raises(RolloutWaitError, match="HTTP 403 Forbidden: deployments.apps is forbidden"):
        await asyncio.to_thread(backend.deploy_live, LINE, NEW, None)


# -------------------------------------------------------------------------------- gitops
def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "deploy-repo"
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    (path / "README.md").write_text("deployments\n")
    git(path, "add", "README.md")
    git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    return path


def test_gitops_commits_each_move_and_rolls_back_with_a_commit(repo: Path) -> None:
    backend = GitOpsBackend(repo)
    first = backend.deploy_live(LINE, OLD, None)
    promoted = backend.finish_promotion(LINE, first, None)
    shadow = backend.deploy_shadow(LINE, NEW)
    assert backend.pinned(LINE) == OLD and backend.pinned(LINE, "shadow") == NEW
    assert backend.is_running(shadow) and backend.is_running(promoted)
    restored = backend.roll_back(LINE, shadow, promoted)

    assert restored["version"] == "3" and not backend.is_running(shadow)
    log = git(repo, "log", "--format=%s").splitlines()
    assert log == [
        f"rollout {LINE}: roll back v4 to v3",
        f"rollout {LINE}: shadow cta v4",
        f"rollout {LINE}: promote cta v3 (health passed)"
        if len(log) == 5
        else f"rollout {LINE}: live bake cta v3",
        *log[3:],
    ]
    assert log[-1] == "init"
    assert git(repo, "status", "--porcelain") == ""
    model = yaml.safe_load((repo / "lines" / LINE / "model.yaml").read_text())
    assert model["metadata"]["annotations"]["cta.rollout/sha256"] == OLD.sha256
    shadow_pin = yaml.safe_load((repo / "lines" / LINE / "shadow.yaml").read_text())
    assert shadow_pin["spec"]["replicas"] == 0
    # The committed tree renders as a complete overlay.
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(repo / "lines" / LINE)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"value: {OLD.uri}" in rendered


def test_gitops_refuses_a_folder_that_is_not_a_repository(tmp_path: Path) -> None:
    from cta_model.errors import ConfigError

    with pytest.raises(ConfigError, match="not a git working copy"):
        GitOpsBackend(tmp_path)
