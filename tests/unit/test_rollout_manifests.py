"""infra/k8s/lines: every line's overlay renders with `kubectl kustomize`, passes
`kubernetes-validate --strict`, keeps the pod security properties, pins the line's model, and
gives the roll-out exactly get + patch on Deployments of that line's namespace."""

from __future__ import annotations

import shutil
from pathlib import Path

import kubernetes_validate
import pytest
from k8s_render import render

from components.rollout.backends import ModelRef
from components.rollout.backends.kubernetes import overlay_files
from cta_model.data.lines import load_lines_config

pytestmark = pytest.mark.unit

LINES_DIR = Path(__file__).resolve().parents[2] / "infra" / "k8s" / "lines"
K8S_VERSION = "1.32.0"
LINE_IDS = load_lines_config().ids


def security_violations(objects: list[dict]) -> list[str]:
    found = []
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        where = f"Deployment/{obj['metadata']['name']}"
        pod = obj["spec"]["template"]["spec"]
        context = pod.get("securityContext", {})
        if context.get("runAsNonRoot") is not True:
            found.append(f"{where}: runAsNonRoot")
        if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            found.append(f"{where}: seccomp")
        if pod.get("automountServiceAccountToken") is not False:
            found.append(f"{where}: service account token mounted")
        for container in pod["containers"]:
            security = container.get("securityContext", {})
            if security.get("readOnlyRootFilesystem") is not True:
                found.append(f"{where}: readOnlyRootFilesystem")
            if security.get("allowPrivilegeEscalation") is not False:
                found.append(f"{where}: allowPrivilegeEscalation")
            if security.get("capabilities", {}).get("drop") != ["ALL"]:
                found.append(f"{where}: capabilities not dropped")
            limits = container.get("resources", {}).get("limits", {})
            if not {"cpu", "memory"} <= limits.keys():
                found.append(f"{where}: limits")
    return found


def validation_errors(objects: list[dict]) -> list[str]:
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    return errors


def env_of(deployment: dict) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value") for item in container["env"]}


def test_every_fleet_line_has_an_overlay() -> None:
    overlays = sorted(p.name for p in LINES_DIR.iterdir() if (p / "kustomization.yaml").is_file())
    assert overlays == sorted([*LINE_IDS, "base"])


@pytest.mark.parametrize("line_id", LINE_IDS)
def test_overlay_renders_validates_and_is_locked_down(line_id: str) -> None:
    objects = render(LINES_DIR / line_id)
    namespace = f"cta-line-{line_id}"
    assert validation_errors(objects) == []
    assert security_violations(objects) == []
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert ("Namespace", namespace) in kinds
    assert {
        ("Deployment", "cta-serve"),
        ("Deployment", "cta-serve-shadow"),
        ("Service", "cta-serve"),
        ("NetworkPolicy", "default-deny-all"),
        ("Role", "cta-rollout"),
        ("RoleBinding", "cta-rollout"),
    } <= set(kinds)
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    for deployment in deployments.values():
        assert env_of(deployment)["CTA_LINE_ID"] == line_id
        assert deployment["spec"]["replicas"] == 0  # nothing serves before a roll-out pins
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--model=$(CTA_MODEL_URI)" in args and "--sha256=$(CTA_MODEL_SHA256)" in args
    role = next(o for o in objects if o["kind"] == "Role")
    assert role["rules"] == [
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]}
    ]
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cta-pipeline-runner", "namespace": "cta"}
    ]


def test_a_pinned_overlay_renders_the_model_and_a_broken_one_is_caught(tmp_path: Path) -> None:
    shutil.copytree(LINES_DIR / "base", tmp_path / "base")
    model = ModelRef("cta", "7", "ab" * 32)
    for name, text in overlay_files("press-a", model, None, "promoted v7").items():
        (tmp_path / "press-a").mkdir(exist_ok=True)
        (tmp_path / "press-a" / name).write_text(text)
    objects = render(tmp_path / "press-a")
    live = next(
        o for o in objects if o["metadata"]["name"] == "cta-serve" and o["kind"] == "Deployment"
    )
    assert env_of(live)["CTA_MODEL_URI"] == "models:/cta/7"
    assert env_of(live)["CTA_MODEL_SHA256"] == "ab" * 32
    assert live["spec"]["replicas"] == 1
    assert live["metadata"]["annotations"]["cta.rollout/decision"] == "promoted v7"
    assert validation_errors(objects) == []

    serve = tmp_path / "base" / "serve.yaml"
    serve.write_text(
        serve.read_text().replace("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false")
    )
    assert security_violations(render(tmp_path / "press-a"))
    broken = [dict(live, spec={**live["spec"], "replicas": "one"})]
    assert validation_errors(broken)
