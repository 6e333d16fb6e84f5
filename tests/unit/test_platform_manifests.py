"""infra/k8s/platform renders with `kubectl kustomize`, every object passes
`kubernetes-validate --strict`, and the security properties hold on the rendered objects.

The checks are functions returning the violations they find, so the negative tests can show
that each one fails on a deliberately broken overlay of the same manifests.
"""

import base64
import copy
import re
import shutil
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from k8s_render import render

pytestmark = pytest.mark.unit

PLATFORM_DIR = Path(__file__).resolve().parents[2] / "infra" / "k8s" / "platform"
#: The Kubernetes version the manifests are validated for (a schema kubernetes-validate ships).
K8S_VERSION = "1.32.0"
NAMESPACE = "cta"
RUNNER = "cta-pipeline-runner"
#: Exactly what the train step needs (components/train/trainjob.py), nothing more.
RUNNER_RULES = [
    {
        "apiGroups": ["trainer.kubeflow.org"],
        "resources": ["trainjobs"],
        "verbs": ["create", "get", "list", "watch", "delete"],
    },
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
]
ARGO_EXECUTOR_RULES = [
    {
        "apiGroups": ["argoproj.io"],
        "resources": ["workflowtaskresults"],
        "verbs": ["create", "patch"],
    }
]
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
SECRET_LIKE = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
DANGEROUS_VERBS = {"*", "escalate", "bind", "impersonate"}


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render(PLATFORM_DIR)


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


# ------------------------------------------------------------------------------------ checks
def validation_errors(objects: list[dict]) -> list[str]:
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    return errors


def pod_security_violations(objects: list[dict]) -> list[str]:
    """runAsNonRoot, read-only root, no privilege escalation, drop ALL, RuntimeDefault seccomp,
    requests+limits, a writable /tmp from an emptyDir: on every container of every pod."""
    found = []
    for obj in objects:
        if obj["kind"] not in POD_TEMPLATE_KINDS:
            continue
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        pod = obj["spec"]["template"]["spec"]
        pod_context = pod.get("securityContext", {})
        if pod_context.get("runAsNonRoot") is not True:
            found.append(f"{where}: pod runAsNonRoot is not true")
        if pod_context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            found.append(f"{where}: pod seccompProfile is not RuntimeDefault")
        if pod_context.get("runAsUser") == 0:
            found.append(f"{where}: pod runs as uid 0")
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for container in pod.get("initContainers", []) + pod["containers"]:
            name = f"{where}/{container['name']}"
            context = container.get("securityContext", {})
            if context.get("runAsNonRoot") is False or context.get("runAsUser") == 0:
                found.append(f"{name}: container may run as root")
            if context.get("readOnlyRootFilesystem") is not True:
                found.append(f"{name}: root filesystem is writable")
            if context.get("allowPrivilegeEscalation") is not False:
                found.append(f"{name}: privilege escalation allowed")
            if context.get("privileged"):
                found.append(f"{name}: privileged")
            capabilities = context.get("capabilities", {})
            if capabilities.get("drop") != ["ALL"] or capabilities.get("add"):
                found.append(f"{name}: capabilities are not exactly drop [ALL]")
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(bound, {}))
                if missing:
                    found.append(f"{name}: no {bound} for {sorted(missing)}")
            tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            if not tmp or tmp[0]["name"] not in empty_dirs:
                found.append(f"{name}: /tmp is not an emptyDir")
    return found


def rbac_violations(objects: list[dict]) -> list[str]:
    found = []
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind in ("ClusterRole", "ClusterRoleBinding"):
            found.append(f"{kind}/{name}: cluster-wide RBAC")
        if kind == "Role":
            for rule in obj.get("rules", []):
                for field in ("apiGroups", "resources", "verbs"):
                    if "*" in rule.get(field, []):
                        found.append(f"Role/{name}: wildcard in {field}")
                if DANGEROUS_VERBS & set(rule.get("verbs", [])):
                    found.append(f"Role/{name}: dangerous verb in {rule['verbs']}")
                if "secrets" in rule.get("resources", []):
                    found.append(f"Role/{name}: grants access to secrets")
    roles = by_kind(objects, "Role")
    expected = {RUNNER: RUNNER_RULES, f"{RUNNER}-argo-executor": ARGO_EXECUTOR_RULES}
    if {n: r.get("rules") for n, r in roles.items()} != expected:
        found.append(f"Roles differ from the least-privilege set: {sorted(roles)}")
    return found


def secret_handling_violations(objects: list[dict]) -> list[str]:
    """No credential as a literal env value; Secrets hold placeholders only."""
    found = []
    for obj in objects:
        if obj["kind"] in POD_TEMPLATE_KINDS:
            for container in obj["spec"]["template"]["spec"]["containers"]:
                for env in container.get("env", []):
                    if SECRET_LIKE.search(env["name"]) and "secretKeyRef" not in env.get(
                        "valueFrom", {}
                    ):
                        found.append(f"{container['name']}: {env['name']} not from a Secret")
        if obj["kind"] == "ConfigMap":
            leaked = [key for key in obj.get("data", {}) if SECRET_LIKE.search(key)]
            if leaked:
                found.append(f"ConfigMap/{obj['metadata']['name']}: credentials {leaked}")
        if obj["kind"] == "Secret":
            for key, value in obj.get("data", {}).items():
                plain = base64.b64decode(value).decode()
                if SECRET_LIKE.search(key) and plain != "REPLACE-ME":
                    found.append(f"Secret/{obj['metadata']['name']}: {key} is not a placeholder")
    return found


# ------------------------------------------------------------------------------------- tests
def test_renders_the_expected_objects(objects):
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {
        ("Namespace", NAMESPACE),
        ("Deployment", "cta-mlflow"),
        ("Service", "cta-mlflow"),
        ("StatefulSet", "cta-postgres"),
        ("Service", "cta-postgres"),
        ("Secret", "cta-mlflow-db"),
        ("Secret", "cta-s3"),
        ("ServiceAccount", RUNNER),
        ("Role", RUNNER),
        ("RoleBinding", RUNNER),
        ("NetworkPolicy", "default-deny-all"),
    } <= names
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]


def test_every_object_passes_strict_schema_validation(objects):
    assert validation_errors(objects) == []


def test_every_pod_is_locked_down(objects):
    assert {o["kind"] for o in objects} & POD_TEMPLATE_KINDS
    assert pod_security_violations(objects) == []


def test_namespace_enforces_the_restricted_pod_security_profile(objects):
    labels = by_kind(objects, "Namespace")[NAMESPACE]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_runner_rbac_is_least_privilege(objects):
    assert rbac_violations(objects) == []
    for binding in by_kind(objects, "RoleBinding").values():
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": RUNNER, "namespace": NAMESPACE}
        ]


def test_credentials_come_from_secrets_only(objects):
    assert secret_handling_violations(objects) == []
    mlflow = by_kind(objects, "Deployment")["cta-mlflow"]
    (container,) = mlflow["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "cta-s3", "key": name}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "cta-mlflow-db"
    # Built by the kubelet from the Secret's variables, which must be defined before it.
    uri = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert uri.startswith("postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@")
    order = [e["name"] for e in container["env"]]
    for var in re.findall(r"\$\((\w+)\)", uri):
        assert order.index(var) < order.index("MLFLOW_BACKEND_STORE_URI"), var
    config = by_kind(objects, "ConfigMap")["cta-mlflow-config"]["data"]
    assert config["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert container["envFrom"] == [{"configMapRef": {"name": "cta-mlflow-config"}}]
    assert container["command"] == ["mlflow"] and "server" in container["args"]
    assert "--serve-artifacts" in container["args"]


def test_network_policies_default_deny_and_open_only_the_service_ports(objects):
    policies = by_kind(objects, "NetworkPolicy")
    deny = policies["default-deny-all"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    postgres_in = policies["postgres-from-mlflow"]["spec"]["ingress"]
    assert postgres_in == [
        {
            "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "cta-mlflow"}}}],
            "ports": [{"protocol": "TCP", "port": 5432}],
        }
    ]
    mlflow_in = policies["mlflow"]["spec"]["ingress"]
    assert [p["port"] for rule in mlflow_in for p in rule["ports"]] == [5000]


# ---------------------------------------------------------------------------- negative tests
BROKEN_OVERLAY_PATCH = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: cta-mlflow
spec:
  replicas: "two"
  template:
    spec:
      securityContext:
        runAsNonRoot: false
      containers:
        - name: mlflow
          securityContext:
            readOnlyRootFilesystem: false
          livenessProbee: {}
"""
BROKEN_OVERLAY_ROLE = """
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: cta-pipeline-runner
rules:
  - apiGroups: ["trainer.kubeflow.org"]
    resources: ["trainjobs"]
    verbs: ["*"]
"""


@pytest.fixture(scope="module")
def broken_objects(tmp_path_factory) -> list[dict]:
    # kustomize takes bases by relative path only: copy the platform beside the overlay.
    root = tmp_path_factory.mktemp("broken")
    shutil.copytree(PLATFORM_DIR, root / "platform")
    overlay = root / "overlay"
    overlay.mkdir()
    (overlay / "deployment-patch.yaml").write_text(BROKEN_OVERLAY_PATCH)
    (overlay / "role-patch.yaml").write_text(BROKEN_OVERLAY_ROLE)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../platform"],
                "patches": [{"path": "deployment-patch.yaml"}, {"path": "role-patch.yaml"}],
            }
        )
    )
    return render(overlay)


def test_strict_validation_rejects_unknown_fields_and_wrong_types(broken_objects):
    errors = validation_errors(broken_objects)
    assert errors == ["Deployment/cta-mlflow: 'two' is not of type 'integer', 'null'"]
    # The validator stops at the first error: with the type fixed, the misspelt field is next.
    deployment = copy.deepcopy(by_kind(broken_objects, "Deployment")["cta-mlflow"])
    deployment["spec"]["replicas"] = 2
    (error,) = validation_errors([deployment])
    assert "livenessProbee" in error


def test_a_schema_invalid_object_raises():
    bad = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": RUNNER},
        "automountServiceAccountTokens": True,
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_security_checks_catch_root_and_writable_root_fs(broken_objects):
    violations = pod_security_violations(broken_objects)
    assert "Deployment/cta-mlflow: pod runAsNonRoot is not true" in violations
    assert "Deployment/cta-mlflow/mlflow: root filesystem is writable" in violations


def test_rbac_check_catches_a_wildcard_verb(broken_objects):
    violations = rbac_violations(broken_objects)
    assert "Role/cta-pipeline-runner: wildcard in verbs" in violations
