"""TrainJob manifests and the launcher's decisions, offline against the Trainer v2.3.0 CRD."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.train.trainjob import (
    CRD_PATH,
    TRAINER_NODE,
    NodeResources,
    TrainJobSpec,
    TrainJobState,
    api_error_message,
    build_trainjob_manifest,
    failure_message,
    is_credential_name,
    load_trainjob_spec,
    order_pods,
    resources_per_node,
    spec_differences,
    split_log_lines,
    submission_identity,
    timeout_message,
    trainer_pod_selector,
    trainjob_problems,
    trainjob_state,
    validate_trainjob,
)
from cta_model.errors import ConfigError

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
VENDORED_CRD = REPO_ROOT.parent / "shared" / "vendor" / "kubeflow-trainer"


def full_spec(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "cta-train-r42",
        "namespace": "cta",
        "run_id": "r42",
        "image": "registry.example.com/cta:0.1.0",
        "config_path": "/data/runs/r42/train.yaml",
        "num_nodes": 2,
        "num_proc_per_node": 4,
        "resources": {"cpu": 8, "memory": "64Gi", "gpus": 4},
        "env": {"CTA_RUN_DIR": "/data/runs/r42"},
        "secret_env": {
            "AWS_ACCESS_KEY_ID": "cta-s3",
            "AWS_SECRET_ACCESS_KEY": "cta-s3",
            "MLFLOW_TRACKING_TOKEN": {"secret": "cta-mlflow", "key": "token"},
        },
        "volumes": [{"claim_name": "cta-runs", "mount_path": "/data/runs", "name": "runs"}],
        "labels": {"team": "vision"},
        "active_deadline_seconds": 86400,
    }
    data.update(overrides)
    return data


def manifest(**overrides: Any) -> dict[str, Any]:
    return build_trainjob_manifest(load_trainjob_spec(full_spec(**overrides)))


def pod_template(trainjob: dict[str, Any]) -> dict[str, Any]:
    (patch,) = trainjob["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == TRAINER_NODE
    return job["template"]["spec"]["template"]


# ------------------------------------------------------------------------ valid manifests
def test_built_manifest_validates_against_the_crd():
    trainjob = manifest()
    assert validate_trainjob(trainjob) is None
    assert trainjob_problems(trainjob) == []
    assert trainjob["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert trainjob["kind"] == "TrainJob"
    trainer = trainjob["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    assert trainjob["spec"]["activeDeadlineSeconds"] == 86400


def test_minimal_spec_uses_the_documented_defaults():
    spec = load_trainjob_spec(
        {"name": "t", "namespace": "cta", "run_id": "r1", "image": "i", "config_path": "/c.yaml"}
    )
    trainjob = build_trainjob_manifest(spec)
    validate_trainjob(trainjob)
    assert trainjob["spec"]["runtimeRef"] == {
        "name": "torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    trainer = trainjob["spec"]["trainer"]
    # torchrun reads the PET_* variables the torch runtime injects and starts `cta train` per rank.
    assert trainer["command"] == ["torchrun", "--no-python", "cta", "train", "--config", "/c.yaml"]
    assert trainer["numNodes"] == 1
    # "auto" is not a value of the v2.3.0 schema (int32): it is expressed by leaving it out.
    assert "numProcPerNode" not in trainer
    assert "env" not in trainer and "args" not in trainer
    # Limits on every pod (request = limit): the hardening rule of the platform manifests.
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "4", "memory": "16Gi"},
        "limits": {"cpu": "4", "memory": "16Gi"},
    }
    assert "activeDeadlineSeconds" not in trainjob["spec"]
    assert trainjob["metadata"]["labels"] == {
        "app.kubernetes.io/part-of": "cta",
        "app.kubernetes.io/component": "train",
        "cta.run-id": "r1",
    }
    hardened = pod_template(trainjob)["spec"]  # without volumes: only /tmp as scratch
    assert hardened["securityContext"]["runAsNonRoot"] is True
    assert hardened["volumes"] == [{"name": "tmp", "emptyDir": {}}]


def test_command_and_args_override():
    trainjob = manifest(command=["python", "-m", "cta_cli"], args=["train", "--fast"])
    validate_trainjob(trainjob)
    assert trainjob["spec"]["trainer"]["command"] == ["python", "-m", "cta_cli"]
    assert trainjob["spec"]["trainer"]["args"] == ["train", "--fast"]


def test_resources_per_node():
    assert resources_per_node(NodeResources(cpu="500m", memory="8Gi", gpus=2)) == {
        "requests": {"cpu": "500m", "memory": "8Gi"},
        "limits": {"cpu": "500m", "memory": "8Gi", "nvidia.com/gpu": "2"},
    }
    assert resources_per_node(NodeResources(cpu=2)) == {
        "requests": {"cpu": "2", "memory": "16Gi"},
        "limits": {"cpu": "2", "memory": "16Gi"},
    }


def test_labels_are_on_the_trainjob_and_on_the_trainer_pods():
    trainjob = manifest()
    expected = {
        "team": "vision",
        "app.kubernetes.io/part-of": "cta",
        "app.kubernetes.io/component": "train",
        "cta.run-id": "r42",
    }
    assert trainjob["metadata"]["labels"] == expected
    assert pod_template(trainjob)["metadata"]["labels"] == expected


def test_build_is_deterministic():
    assert json.dumps(manifest()) == json.dumps(manifest())


# ------------------------------------------------------- env from secrets, volumes, secrets
def test_secret_env_lands_in_trainer_env_as_secret_key_refs():
    env = manifest()["spec"]["trainer"]["env"]
    assert [entry["name"] for entry in env] == sorted(entry["name"] for entry in env)
    by_name = {entry["name"]: entry for entry in env}
    assert by_name["CTA_RUN_DIR"] == {"name": "CTA_RUN_DIR", "value": "/data/runs/r42"}
    assert by_name["AWS_SECRET_ACCESS_KEY"] == {
        "name": "AWS_SECRET_ACCESS_KEY",
        "valueFrom": {"secretKeyRef": {"name": "cta-s3", "key": "AWS_SECRET_ACCESS_KEY"}},
    }
    assert by_name["MLFLOW_TRACKING_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "cta-mlflow", "key": "token"}
    }


def test_volumes_land_in_the_runtime_patch_of_the_trainer_node():
    trainjob = manifest(
        volumes=[
            {"claim_name": "cta-runs", "mount_path": "/data/runs", "name": "runs"},
            {
                "claim_name": "cta-datasets",
                "mount_path": "/datasets",
                "name": "data",
                "read_only": True,
            },
        ]
    )
    validate_trainjob(trainjob)
    (patch,) = trainjob["spec"]["runtimePatches"]
    assert patch["manager"] == "cta.train"
    pod_spec = pod_template(trainjob)["spec"]
    assert pod_spec["volumes"] == [
        {"name": "tmp", "emptyDir": {}},
        {"name": "runs", "persistentVolumeClaim": {"claimName": "cta-runs"}},
        {"name": "data", "persistentVolumeClaim": {"claimName": "cta-datasets", "readOnly": True}},
    ]
    (container,) = pod_spec["containers"]
    assert container["name"] == "node"
    assert container["volumeMounts"] == [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "runs", "mountPath": "/data/runs"},
        {"name": "data", "mountPath": "/datasets", "readOnly": True},
    ]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_secret_values_never_appear_in_the_manifest(monkeypatch):
    sentinels = {
        "AWS_ACCESS_KEY_ID": "AKIA-SENTINEL-ID-1234",
        "AWS_SECRET_ACCESS_KEY": "sentinel/secret+value==",
        "MLFLOW_TRACKING_TOKEN": "sentinel-mlflow-token",
    }
    for env_name, value in sentinels.items():
        monkeypatch.setenv(env_name, value)
    text = json.dumps(manifest()) + yaml.safe_dump(manifest())
    for value in sentinels.values():
        assert value not in text
    # A credential passed as a plain value is refused, naming the variable.
    with pytest.raises(ConfigError, match=r"env: .*AWS_SECRET_ACCESS_KEY looks like a credential"):
        load_trainjob_spec(full_spec(env={"AWS_SECRET_ACCESS_KEY": "sentinel/secret+value=="}))


@pytest.mark.parametrize(
    ("env_name", "credential"),
    [
        ("AWS_SECRET_ACCESS_KEY", True),
        ("AWS_ACCESS_KEY_ID", True),
        ("MLFLOW_TRACKING_TOKEN", True),
        ("MLFLOW_TRACKING_PASSWORD", True),
        ("OPENAI_API_KEY", True),
        ("TOKENIZERS_PARALLELISM", False),
        ("CTA_RUN_DIR", False),
        ("NCCL_DEBUG", False),
    ],
)
def test_is_credential_name(env_name, credential):
    assert is_credential_name(env_name) is credential


# ------------------------------------------------------------------ invalid manifests
def _set(path: str, value: Any):
    def mutate(trainjob: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = trainjob
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


_DELETE = object()
# The trainer pod template inside the runtime patch, as errors name it and as _set() walks it.
PATCHED_POD_PATH = (
    "spec.runtimePatches[0].trainingRuntimeSpec.template.spec.replicatedJobs[0].template.spec"
    ".template"
)
PATCHED_POD = PATCHED_POD_PATH.replace("[0]", ".0")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            _set("spec.trainer.numNodes", "two"),
            r"spec\.trainer\.numNodes: 'two' is not of type 'integer'",
        ),
        (_set("spec.trainer.gpus", 4), r"spec\.trainer\.gpus: unknown field"),
        (
            _set("spec.trainer.numProcPerNode", "auto"),
            r"spec\.trainer\.numProcPerNode: 'auto' is not of type",
        ),
        (_set("spec.trainer.numNodes", 2**31), r"spec\.trainer\.numNodes: .* is not a 'int32'"),
        (_set("metadata.name", "Cta_Train"), r"metadata\.name: .*RFC 1035"),
        (_set("metadata.name", "7-train"), r"metadata\.name: .*RFC 1035"),
        (_set("metadata.name", "t" * 64), r"metadata\.name: .*at most 63"),
        (
            _set("metadata.labels", {"cta.run-id": "bad value!"}),
            r"metadata\.labels\.cta\.run-id: label value",
        ),
        (
            _set("apiVersion", "kubeflow.org/v1"),
            r"apiVersion: must be 'trainer\.kubeflow\.org/v1alpha1'",
        ),
        (_set("kind", "PyTorchJob"), r"kind: must be 'TrainJob'"),
        (_set("spec.runtimeRef", _DELETE), r"spec\.runtimeRef: required field is missing"),
        (
            _set("spec.activeDeadlineSeconds", 0),
            r"spec\.activeDeadlineSeconds: 0 is less than the minimum",
        ),
        (
            _set("spec.trainer.resourcesPerNode.limits.memory", "lots"),
            r"spec\.trainer\.resourcesPerNode\.limits\.memory: 'lots' does not match",
        ),
        (
            _set("spec.trainer.env.1.name", "AWS_ACCESS_KEY_ID"),
            r"spec\.trainer\.env\[1\]: duplicate entry name='AWS_ACCESS_KEY_ID'",
        ),
        # The Trainer v2.0 field; v2.3.0 replaced it by runtimePatches.
        (_set("spec.podSpecOverrides", []), r"spec\.podSpecOverrides: unknown field"),
        # v2.3.0 container patches have env, volumeMounts, securityContext only: no envFrom.
        (
            _set(f"{PATCHED_POD}.spec.containers.0.envFrom", [{"secretRef": {"name": "cta-s3"}}]),
            re.escape(f"{PATCHED_POD_PATH}.spec.containers[0].envFrom: unknown field"),
        ),
    ],
    ids=lambda item: item if isinstance(item, str) else None,
)
def test_invalid_manifests_are_rejected_naming_the_field(mutate, expected):
    trainjob = manifest()
    mutate(trainjob)
    with pytest.raises(ConfigError, match=expected):
        validate_trainjob(trainjob)


def test_every_problem_is_reported_with_its_path():
    trainjob = manifest()
    trainjob["spec"]["trainer"]["numNodes"] = "two"
    trainjob["spec"]["trainer"]["gpus"] = 4
    trainjob["spec"]["ttlSecondsAfterFinished"] = 600
    paths = [path for path, _ in trainjob_problems(trainjob)]
    assert paths == ["spec.trainer.gpus", "spec.trainer.numNodes", "spec.ttlSecondsAfterFinished"]
    with pytest.raises(ConfigError) as caught:
        validate_trainjob(trainjob)
    assert str(caught.value).splitlines()[0].startswith("TrainJob cta-train-r42: spec.trainer.gpus")


def test_non_mapping_is_rejected():
    with pytest.raises(ConfigError, match="must be a mapping"):
        validate_trainjob(["not", "a", "trainjob"])


def test_missing_crd_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CTA_TRAINJOB_CRD", str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match="TrainJob CRD not found .*CTA_TRAINJOB_CRD"):
        validate_trainjob(manifest())


# ------------------------------------------------------------------ invalid specs
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"name": "Cta_Train"}, r"name: .*RFC 1035"),
        ({"name": "1-train"}, r"name: .*RFC 1035"),
        ({"namespace": "CTA"}, r"namespace: .*DNS-1123 label"),
        ({"num_nodes": "two"}, r"num_nodes: "),
        ({"num_nodes": 0}, r"num_nodes: "),
        ({"num_proc_per_node": "many"}, r"num_proc_per_node"),
        ({"gpu_count": 2}, r"gpu_count: unknown key"),
        ({"resources": {"cpu": "eight"}}, r"resources\.cpu: .*not a Kubernetes quantity"),
        ({"resources": {"gpus": -1}}, r"resources\.gpus"),
        ({"run_id": "run id with spaces"}, r"run_id: .*cta\.run-id label"),
        ({"ttl_seconds_after_finished": 600}, r"ttl_seconds_after_finished: .*no TTL field"),
        ({"env": {"PET_NNODES": "4"}}, r"env: .*PET_\* variables are set by the Trainer"),
        ({"env": {"1BAD": "x"}}, r"env: .*environment variable name '1BAD'"),
        ({"secret_env": {"CTA_RUN_DIR": "cta-s3"}}, r"both env and secret_env: \['CTA_RUN_DIR'\]"),
        (
            {"secret_env": {"AWS_ACCESS_KEY_ID": "Bad_Secret"}},
            r"secret_env\.AWS_ACCESS_KEY_ID\.secret: ",
        ),
        ({"labels": {"cta.run-id": "x"}}, r"labels: .*set by the launcher"),
        ({"labels": {"bad key!": "x"}}, r"labels: .*label key"),
        (
            {
                "volumes": [
                    {"claim_name": "a", "mount_path": "/o"},
                    {"claim_name": "b", "mount_path": "/p"},
                ]
            },
            r"volumes: .*name given twice: \['output'\]",
        ),
        ({"volumes": [{"claim_name": "a", "mount_path": "relative"}]}, r"volumes\[0\]\.mount_path"),
        ({"command": []}, r"command: .*must not be empty"),
        ({"active_deadline_seconds": 0}, r"active_deadline_seconds"),
    ],
)
def test_invalid_specs_are_rejected_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_trainjob_spec(full_spec(**overrides), source="trainjob")


def test_spec_is_immutable():
    spec = load_trainjob_spec(full_spec())
    with pytest.raises(Exception, match="frozen"):
        spec.num_nodes = 3  # type: ignore[misc]
    assert isinstance(spec, TrainJobSpec)


# --------------------------------------------------------------- launcher decisions
def condition(kind: str, reason: str = "", message: str = "", status: str = "True") -> dict:
    return {
        "type": kind,
        "status": status,
        "reason": reason or kind,
        "message": message,
        "lastTransitionTime": "2026-03-01T00:00:00Z",
    }


@pytest.mark.parametrize(
    ("status", "phase", "reason"),
    [
        (None, "Pending", ""),
        ({}, "Pending", ""),
        ({"jobsStatus": [{"name": "node", "active": 1}]}, "Running", ""),
        ({"conditions": [condition("Suspended", "Suspended")]}, "Suspended", "Suspended"),
        ({"conditions": [condition("Suspended", "Resumed", status="False")]}, "Pending", ""),
        ({"conditions": [condition("Complete", "JobsCompleted")]}, "Complete", "JobsCompleted"),
        (
            {"conditions": [condition("Failed", "DeadlineExceeded", "too slow")]},
            "Failed",
            "DeadlineExceeded",
        ),
        (
            {
                "conditions": [
                    condition("Complete", status="False"),
                    condition("Failed", "FailedJobs"),
                ]
            },
            "Failed",
            "FailedJobs",
        ),
        (
            {"conditions": [condition("Complete"), condition("Failed", "FailedJobs")]},
            "Failed",
            "FailedJobs",
        ),
    ],
)
def test_trainjob_state_reads_conditions(status, phase, reason):
    trainjob = {"metadata": {"name": "t"}} | ({"status": status} if status is not None else {})
    state = trainjob_state(trainjob)
    assert (state.phase, state.reason) == (phase, reason)
    assert state.finished is (phase in ("Complete", "Failed"))


def test_failure_and_timeout_messages_name_the_reason_and_keep_the_job():
    failed = failure_message("cta", "t1", TrainJobState("Failed", "DeadlineExceeded", "ran 3600 s"))
    assert "TrainJob cta/t1 failed: DeadlineExceeded: ran 3600 s" in failed
    assert (
        "kept for inspection" in failed
        and "kubectl delete trainjobs.trainer.kubeflow.org -n cta t1" in failed
    )
    late = timeout_message("cta", "t1", 2.5, TrainJobState("Suspended", "Suspended", "queued"))
    assert "did not finish within 2.5 s (last state: Suspended (Suspended: queued))" in late
    assert "left running" in late
    broken = timeout_message("cta", "t1", 60, TrainJobState("Running"), "HTTP 503 Unavailable")
    assert "(last state: Running; the last poll failed: HTTP 503 Unavailable)" in broken


def test_spec_differences_ignore_server_defaults_but_not_changes():
    desired = submission_identity(manifest())
    live = copy.deepcopy(manifest())
    live["metadata"] |= {
        "uid": "1234",
        "resourceVersion": "7",
        "creationTimestamp": "2026-03-01T00:00:00Z",
    }
    live["spec"] |= {"suspend": False, "managedBy": "trainer.kubeflow.org/trainjob-controller"}
    live["spec"]["runtimePatches"][0]["time"] = "2026-03-01T00:00:00Z"
    live["status"] = {"conditions": [condition("Complete")]}
    assert spec_differences(desired, submission_identity(live)) == []

    live["spec"]["trainer"]["numNodes"] = 4
    live["metadata"]["labels"]["cta.run-id"] = "r43"
    del live["spec"]["trainer"]["env"][0]
    assert spec_differences(desired, submission_identity(live)) == [
        "metadata.labels.cta.run-id: wanted 'r42', cluster has 'r43'",
        "spec.trainer.numNodes: wanted 2, cluster has 4",
        "spec.trainer.env: 4 entries wanted, cluster has 3",
    ]


def test_pod_selector_and_rank_order():
    assert trainer_pod_selector("t1") == (
        "jobset.sigs.k8s.io/jobset-name=t1,jobset.sigs.k8s.io/replicatedjob-name=node"
    )

    def pod(name: str, completion: str | None) -> dict:
        labels = {"jobset.sigs.k8s.io/job-index": "0"}
        if completion is not None:
            labels["batch.kubernetes.io/job-completion-index"] = completion
        return {"metadata": {"name": name, "labels": labels}}

    pods = [
        pod("t1-node-0-10-a", "10"),
        pod("t1-node-0-2-b", "2"),
        pod("t1-x", None),
        pod("t1-node-0-0-c", "0"),
    ]
    assert order_pods(pods) == ["t1-node-0-0-c", "t1-x", "t1-node-0-2-b", "t1-node-0-10-a"]


def test_split_log_lines_handles_chunk_boundaries_and_bad_bytes():
    chunks = [b"epoch 1 lo", b"ss 0.5\nepoch 2", b' loss 0.4\n{"json": ', b"1}\n\xffend"]
    assert list(split_log_lines(chunks)) == [
        "epoch 1 loss 0.5",
        "epoch 2 loss 0.4",
        '{"json": 1}',
        "\ufffdend",
    ]
    assert list(split_log_lines([])) == []


def test_api_error_message_uses_the_status_body():
    class FakeApiException(Exception):
        status = 403
        reason = "Forbidden"
        body = json.dumps({"kind": "Status", "message": 'trainjobs is forbidden: User "x"'})

    text = api_error_message("creating TrainJob cta/t1", FakeApiException())
    assert text == (
        'creating TrainJob cta/t1 failed: HTTP 403 Forbidden: trainjobs is forbidden: User "x"'
    )


# ------------------------------------------------------------------ docs and the CRD copy
def test_readme_example_validates_against_the_crd():
    readme = (REPO_ROOT / "infra" / "k8s" / "training" / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)
    examples = [yaml.safe_load(block) for block in blocks]
    trainjobs = [example for example in examples if example.get("kind") == "TrainJob"]
    assert trainjobs, "the README shows an example TrainJob"
    for trainjob in trainjobs:
        validate_trainjob(trainjob)


def test_crd_copy_is_the_vendored_kubeflow_trainer_v2_3_0_crd():
    assert CRD_PATH.is_file()
    assert (CRD_PATH.parent / "LICENSE.kubeflow-trainer").is_file()
    vendored = VENDORED_CRD / CRD_PATH.name
    if not vendored.is_file():
        pytest.skip(f"{VENDORED_CRD} not present (only the repository's copy is checked)")
    assert CRD_PATH.read_bytes() == vendored.read_bytes()
    assert (CRD_PATH.parent / "LICENSE.kubeflow-trainer").read_bytes() == (
        VENDORED_CRD / "LICENSE"
    ).read_bytes()
