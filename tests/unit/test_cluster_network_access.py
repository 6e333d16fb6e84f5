"""Who may reach MLflow, read from the rendered NetworkPolicies (issue 16: line servers in
cta-line-* load models:/... from it), and the line namespaces' Pod Security labels.

``ingress_allowed`` evaluates the ingress side of NetworkPolicy as the Kubernetes docs define it
(concepts/services-networking/network-policies): a pod selected by no ingress policy admits
everything; once selected, a connection is admitted when any rule of any selecting policy admits
it; a rule's ``from`` peers are ORed, and within one peer ``namespaceSelector`` and
``podSelector`` are ANDed; a peer with only ``podSelector`` means the policy's own namespace; an
empty selector matches all; an absent ``ports`` means every port. The evaluator is checked
against those cases first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from k8s_render import render

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PLATFORM = REPO / "infra" / "k8s" / "platform"
LINES = REPO / "infra" / "k8s" / "lines"
MLFLOW_PORT = 5000


@dataclass(frozen=True)
class Pod:
    namespace: str
    namespace_labels: dict[str, str]
    labels: dict[str, str]


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def peer_matches(peer: dict[str, Any], policy_namespace: str, source: Pod) -> bool:
    if "ipBlock" in peer:
        return False  # pod-to-pod traffic is judged by selectors only
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], source.namespace_labels):
            return False
    elif source.namespace != policy_namespace:
        return False
    return selector_matches(peer.get("podSelector", {}), source.labels)


def ingress_allowed(policies: list[dict], target: Pod, source: Pod, port: int) -> bool:
    selecting = [
        policy
        for policy in policies
        if policy["metadata"]["namespace"] == target.namespace
        and "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
        and selector_matches(policy["spec"]["podSelector"], target.labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports is not None and all(entry.get("port") != port for entry in ports):
                continue
            peers = rule.get("from")
            if peers is None or any(peer_matches(peer, target.namespace, source) for peer in peers):
                return True
    return False


# --------------------------------------------------- the evaluator against the docs' cases
def policy(namespace: str, spec: dict) -> dict:
    metadata = {"name": "p", "namespace": namespace}
    return {"kind": "NetworkPolicy", "metadata": metadata, "spec": spec}


def db_policy(ingress: list) -> list[dict]:
    """The docs' example: one policy in `default` selecting the `role: db` pods."""
    return [policy("default", {"podSelector": {"matchLabels": {"role": "db"}}, "ingress": ingress})]


DB = Pod("default", {"kubernetes.io/metadata.name": "default"}, {"role": "db"})
FRONTEND = Pod("default", {"kubernetes.io/metadata.name": "default"}, {"role": "frontend"})
CLIENT_IN_MYPROJECT = Pod("other", {"project": "myproject"}, {"role": "client"})
FRONTEND_IN_MYPROJECT = Pod("other", {"project": "myproject"}, {"role": "frontend"})
STRANGER = Pod("elsewhere", {}, {"role": "x"})
# The docs' "and" (one element) vs "or" (two elements) peers.
AND_PEER = [
    {
        "namespaceSelector": {"matchLabels": {"project": "myproject"}},
        "podSelector": {"matchLabels": {"role": "frontend"}},
    }
]
OR_PEERS = [
    {"namespaceSelector": {"matchLabels": {"project": "myproject"}}},
    {"podSelector": {"matchLabels": {"role": "frontend"}}},
]


@pytest.mark.parametrize(
    ("policies", "source", "port", "allowed"),
    [
        ([], STRANGER, 6379, True),  # not selected: everything is admitted
        (
            [policy("default", {"podSelector": {}, "policyTypes": ["Ingress"]})],
            FRONTEND,
            6379,
            False,
        ),  # default deny
        ([policy("default", {"podSelector": {}, "ingress": [{}]})], STRANGER, 1, True),  # allow all
        (
            db_policy([{"from": AND_PEER}]),
            FRONTEND_IN_MYPROJECT,
            6379,
            True,
        ),
        (
            db_policy([{"from": AND_PEER}]),
            CLIENT_IN_MYPROJECT,
            6379,
            False,
        ),
        (
            db_policy([{"from": AND_PEER}]),
            FRONTEND,
            6379,
            False,
        ),
        (
            db_policy([{"from": OR_PEERS}]),
            CLIENT_IN_MYPROJECT,
            6379,
            True,
        ),
        (
            db_policy([{"from": OR_PEERS}]),
            FRONTEND,
            6379,
            True,
        ),
        (
            db_policy([{"from": OR_PEERS, "ports": [{"protocol": "TCP", "port": 6379}]}]),
            FRONTEND,
            80,
            False,
        ),
        (
            db_policy([{"from": OR_PEERS}]),
            STRANGER,
            6379,
            False,
        ),
    ],
)
def test_the_evaluator_follows_the_kubernetes_docs(policies, source, port, allowed):
    assert ingress_allowed(policies, DB, source, port) is allowed


# ----------------------------------------------------------------- the rendered manifests
@pytest.fixture(scope="module")
def platform_policies() -> list[dict]:
    return [obj for obj in render(PLATFORM) if obj["kind"] == "NetworkPolicy"]


@pytest.fixture(scope="module")
def line_namespaces() -> dict[str, dict]:
    namespaces = {}
    for overlay in sorted(path for path in LINES.iterdir() if path.name != "base"):
        if (overlay / "kustomization.yaml").is_file():
            for obj in render(overlay):
                if obj["kind"] == "Namespace":
                    namespaces[obj["metadata"]["name"]] = obj
    return namespaces


PLATFORM_NAMESPACE = {"kubernetes.io/metadata.name": "cta"}
MLFLOW = Pod("cta", PLATFORM_NAMESPACE, {"app.kubernetes.io/name": "cta-mlflow"})


def line_pod(namespace: dict, labels: dict[str, str]) -> Pod:
    name = namespace["metadata"]["name"]
    namespace_labels = {**namespace["metadata"]["labels"], "kubernetes.io/metadata.name": name}
    return Pod(name, namespace_labels, labels)


def test_line_servers_reach_mlflow_and_other_line_pods_do_not(platform_policies, line_namespaces):
    assert set(line_namespaces) == {
        "cta-line-mill-c",
        "cta-line-mill-d",
        "cta-line-press-a",
        "cta-line-press-b",
    }
    for namespace in line_namespaces.values():
        server = line_pod(namespace, {"app.kubernetes.io/name": "cta-serve"})
        assert ingress_allowed(platform_policies, MLFLOW, server, MLFLOW_PORT)
        assert not ingress_allowed(platform_policies, MLFLOW, server, 5432)
        other = line_pod(namespace, {"app.kubernetes.io/name": "debug-shell"})
        assert not ingress_allowed(platform_policies, MLFLOW, other, MLFLOW_PORT)


@pytest.mark.parametrize(
    ("source", "allowed"),
    [
        # Pipeline steps and TrainJob pods run in the platform namespace.
        (
            Pod(
                "cta",
                {"kubernetes.io/metadata.name": "cta"},
                {"pipelines.kubeflow.org/v2_component": "true"},
            ),
            True,
        ),
        (
            Pod(
                "cta",
                {"kubernetes.io/metadata.name": "cta"},
                {"app.kubernetes.io/component": "train"},
            ),
            True,
        ),
        # A server-looking pod in a namespace that is not a line's.
        (
            Pod(
                "team-x",
                {"kubernetes.io/metadata.name": "team-x"},
                {"app.kubernetes.io/name": "cta-serve"},
            ),
            False,
        ),
        (
            Pod("kubeflow", {"kubernetes.io/metadata.name": "kubeflow"}, {"app": "ml-pipeline"}),
            False,
        ),
    ],
)
def test_mlflow_admits_only_the_platform_and_line_servers(platform_policies, source, allowed):
    assert ingress_allowed(platform_policies, MLFLOW, source, MLFLOW_PORT) is allowed


def test_postgres_admits_only_mlflow(platform_policies, line_namespaces):
    postgres = Pod("cta", MLFLOW.namespace_labels, {"app.kubernetes.io/name": "cta-postgres"})
    assert ingress_allowed(platform_policies, postgres, MLFLOW, 5432)
    server = line_pod(line_namespaces["cta-line-press-a"], {"app.kubernetes.io/name": "cta-serve"})
    assert not ingress_allowed(platform_policies, postgres, server, 5432)


def test_line_namespaces_enforce_the_restricted_pod_security_profile(line_namespaces):
    for namespace in line_namespaces.values():
        labels = namespace["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
        assert labels["pod-security.kubernetes.io/enforce-version"] == "latest"
        assert labels["cta.line"]  # what the MLflow policy selects line namespaces by
