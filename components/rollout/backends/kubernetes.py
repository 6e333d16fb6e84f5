"""Kubernetes backend: per-line Deployments from infra/k8s/lines (kustomize base + overlays).

Each line has a namespace ``cta-line-<id>`` with two Deployments: ``cta-serve`` (live, Service
``cta-serve``) and ``cta-serve-shadow`` (replicas 0 outside shadow waves). A move patches the
Deployment's pinned model (env ``CTA_MODEL_URI`` / ``CTA_MODEL_SHA256``, the ``cta.rollout/*``
annotations, replicas) with a strategic-merge patch, then polls GET until the rollout is
complete (observedGeneration caught up, all replicas updated and available). Rollback patches
the previous pin back. The Role in infra/k8s/lines/base/rbac.yaml allows exactly get + patch.

``overlay_files`` renders the same pin as a kustomize overlay; the committed overlays in
infra/k8s/lines/<id>/ and the gitops backend's commits are its output.
"""

from __future__ import annotations

import time
from typing import Any

import yaml

from components.rollout.backends import ModelRef, deployment_record, model_of
from cta_model.errors import CtaError

NAMESPACE_PREFIX = "cta-line-"
POD_SECURITY_LABELS = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
LIVE_DEPLOYMENT = "cta-serve"
SHADOW_DEPLOYMENT = "cta-serve-shadow"
PORT = 8080
UNSET = "unset"
ANNOTATION_URI = "cta.rollout/model-uri"
ANNOTATION_SHA = "cta.rollout/sha256"
ANNOTATION_DECISION = "cta.rollout/decision"


class RolloutWaitError(CtaError):
    """A Deployment did not finish its rollout in time, or the API refused a call."""


def namespace_for(line_id: str, prefix: str = NAMESPACE_PREFIX) -> str:
    return f"{prefix}{line_id}"


def deployment_patch(
    line_id: str, model: ModelRef | None, replicas: int, decision: str = ""
) -> dict[str, Any]:
    """Strategic-merge patch pinning ``model`` (None: unpinned, 0 replicas) on a Deployment."""
    uri, sha = (model.uri, model.sha256) if model else (UNSET, UNSET)
    return {
        "metadata": {
            "annotations": {
                ANNOTATION_URI: uri,
                ANNOTATION_SHA: sha,
                ANNOTATION_DECISION: decision[:250] or "none",
            }
        },
        "spec": {
            "replicas": replicas if model else 0,
            "template": {
                "metadata": {"annotations": {ANNOTATION_SHA: sha}},
                "spec": {
                    "containers": [
                        {
                            "name": "serve",
                            "env": [
                                {"name": "CTA_MODEL_URI", "value": uri},
                                {"name": "CTA_MODEL_SHA256", "value": sha},
                                {"name": "CTA_LINE_ID", "value": line_id},
                            ],
                        }
                    ]
                },
            },
        },
    }


def overlay_files(
    line_id: str,
    live: ModelRef | None,
    shadow: ModelRef | None = None,
    decision: str = "",
    base: str = "../base",
    prefix: str = NAMESPACE_PREFIX,
) -> dict[str, str]:
    """The kustomize overlay of one line: {file name: YAML text}."""
    namespace = namespace_for(line_id, prefix)
    header = (
        f"# Line {line_id}: written by components/rollout/backends/kubernetes.py overlay_files; "
        "the roll-out rewrites it.\n"
    )
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        "labels": [{"pairs": {"cta.line": line_id}, "includeSelectors": False}],
        "resources": [base, "namespace.yaml"],
        "patches": [
            {"path": "model.yaml", "target": {"kind": "Deployment", "name": LIVE_DEPLOYMENT}},
            {"path": "shadow.yaml", "target": {"kind": "Deployment", "name": SHADOW_DEPLOYMENT}},
        ],
    }
    namespace_doc = {
        "apiVersion": "v1",
        "kind": "Namespace",
        # cta.line admits the line's servers to MLflow (infra/k8s/platform/networkpolicy.yaml);
        # the line's pods meet Pod Security "restricted", so the namespace enforces it.
        "metadata": {"name": namespace, "labels": {"cta.line": line_id, **POD_SECURITY_LABELS}},
    }

    def patch(name: str, model: ModelRef | None) -> dict[str, Any]:
        body = deployment_patch(line_id, model, 1, decision)
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, **body["metadata"]},
            "spec": body["spec"],
        }

    def dump(data: dict[str, Any]) -> str:
        return header + yaml.safe_dump(data, sort_keys=False)

    return {
        "kustomization.yaml": dump(kustomization),
        "namespace.yaml": dump(namespace_doc),
        "model.yaml": dump(patch(LIVE_DEPLOYMENT, live)),
        "shadow.yaml": dump(patch(SHADOW_DEPLOYMENT, shadow)),
    }


def rollout_complete(deployment: dict[str, Any]) -> bool:
    """What `kubectl rollout status` checks: the controller saw the latest spec and every
    desired replica is updated and available."""
    metadata, spec, status = (
        deployment.get("metadata", {}),
        deployment.get("spec", {}),
        deployment.get("status") or {},
    )
    if int(status.get("observedGeneration") or 0) < int(metadata.get("generation") or 0):
        return False
    wanted = int(spec.get("replicas") or 0)
    return (
        int(status.get("updatedReplicas") or 0) >= wanted
        and int(status.get("availableReplicas") or 0) >= wanted
        and int(status.get("replicas") or 0) <= wanted  # old pods are gone
    )


class KubernetesBackend:
    name = "kubernetes"

    def __init__(
        self,
        api_client: Any = None,
        namespace_prefix: str = NAMESPACE_PREFIX,
        timeout_s: float = 600.0,
        poll_s: float = 2.0,
        request_timeout_s: float = 30.0,
    ) -> None:
        from kubernetes import client

        if api_client is None:
            from components.train.trainjob import default_api_client

            api_client = default_api_client()
        self.apps = client.AppsV1Api(api_client)
        self.prefix = namespace_prefix
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.request_timeout_s = request_timeout_s

    # ------------------------------------------------------------------ API calls
    def _get(self, namespace: str, name: str) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        from components.train.trainjob import api_error_message

        # Raw JSON (response_type "object"): what the server sent, without the client's
        # model classes dropping or refusing fields.
        try:
            return self.apps.api_client.call_api(
                "/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
                "GET",
                path_params={"namespace": namespace, "name": name},
                header_params={"Accept": "application/json"},
                response_type="object",
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _request_timeout=self.request_timeout_s,
            )
        except ApiException as exc:
            raise RolloutWaitError(api_error_message(f"get {namespace}/{name}", exc)) from None

    def _patch(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        from components.train.trainjob import api_error_message

        # The generated patch_namespaced_deployment picks application/json-patch+json for
        # any body (kubernetes-client/python#1735); a strategic-merge patch needs its own type.
        try:
            self.apps.api_client.call_api(
                "/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
                "PATCH",
                path_params={"namespace": namespace, "name": name},
                header_params={
                    "Accept": "application/json",
                    "Content-Type": "application/strategic-merge-patch+json",
                },
                body=body,
                response_type="object",
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _request_timeout=self.request_timeout_s,
            )
        except ApiException as exc:
            raise RolloutWaitError(api_error_message(f"patch {namespace}/{name}", exc)) from None

    def wait(self, namespace: str, name: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            deployment = self._get(namespace, name)
            if rollout_complete(deployment):
                return deployment
            if time.monotonic() >= deadline:
                raise RolloutWaitError(
                    f"Deployment {namespace}/{name} did not finish its rollout within "
                    f"{self.timeout_s:.0f} s (status {deployment.get('status')})"
                )
            time.sleep(self.poll_s)

    def _pin(
        self, line_id: str, name: str, model: ModelRef | None, replicas: int, decision: str
    ) -> None:
        namespace = namespace_for(line_id, self.prefix)
        print(f"[rollout] {namespace}/{name}: pin {model.uri if model else 'nothing'}", flush=True)
        self._patch(namespace, name, deployment_patch(line_id, model, replicas, decision))
        self.wait(namespace, name)

    def _record(self, line_id: str, name: str, role: str, model: ModelRef) -> dict[str, Any]:
        namespace = namespace_for(line_id, self.prefix)
        return deployment_record(
            role,
            model,
            f"http://{name}.{namespace}.svc:{PORT}",
            namespace=namespace,
            deployment=name,
            backend=self.name,
        )

    # ------------------------------------------------------------------ backend moves
    def deploy_shadow(self, line_id: str, model: ModelRef) -> dict[str, Any]:
        self._pin(line_id, SHADOW_DEPLOYMENT, model, 1, f"shadow v{model.version}")
        return self._record(line_id, SHADOW_DEPLOYMENT, "shadow", model)

    def deploy_live(
        self, line_id: str, model: ModelRef, previous: dict[str, Any] | None
    ) -> dict[str, Any]:
        self._pin(line_id, LIVE_DEPLOYMENT, model, 1, f"live bake v{model.version}")
        return self._record(line_id, LIVE_DEPLOYMENT, "live", model)

    def finish_promotion(
        self, line_id: str, candidate: dict[str, Any], previous: dict[str, Any] | None
    ) -> dict[str, Any]:
        model = model_of(candidate)
        if candidate["role"] == "shadow":
            self._pin(line_id, LIVE_DEPLOYMENT, model, 1, f"promoted v{model.version}")
            self._pin(line_id, SHADOW_DEPLOYMENT, None, 0, "shadow done")
        return self._record(line_id, LIVE_DEPLOYMENT, "live", model)

    def roll_back(
        self, line_id: str, candidate: dict[str, Any] | None, previous: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        if candidate is not None and candidate["role"] == "shadow":
            self._pin(line_id, SHADOW_DEPLOYMENT, None, 0, "shadow rolled back")
            live = self._get(namespace_for(line_id, self.prefix), LIVE_DEPLOYMENT)
            pinned = live["metadata"].get("annotations", {}).get(ANNOTATION_SHA)
            if previous is None or pinned == previous["sha256"]:
                return previous
        restored = model_of(previous) if previous else None
        self._pin(line_id, LIVE_DEPLOYMENT, restored, 1, "rolled back")
        return self._record(line_id, LIVE_DEPLOYMENT, "live", restored) if restored else None

    def is_running(self, deployment: dict[str, Any]) -> bool:
        live = self._get(deployment["namespace"], deployment["deployment"])
        pinned = live["metadata"].get("annotations", {}).get(ANNOTATION_SHA)
        return (
            pinned == deployment["sha256"]
            and rollout_complete(live)
            and bool((live.get("spec") or {}).get("replicas"))
        )
