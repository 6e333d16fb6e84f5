"""The Kubernetes settings of the training pipeline, read from the compiled IR (issue 16 items 2
and 3a): credentials from Secrets, requests and limits, GPUs for training from parameters,
retries only on idempotent steps, timeouts, caching off for steps with side effects, and the
data's sha256 in every cached step's inputs."""

from __future__ import annotations

import pytest
import yaml

from pipelines import k8s_settings
from pipelines.run import compile_pipeline
from pipelines.training import (
    EVALUATE_TASK,
    FINGERPRINT_TASK,
    GATE_TASK,
    REGISTER_TASK,
    ROI_TASK,
    ROLLOUT_TASK,
    TRAIN_BASELINES_TASK,
    TRAIN_TASK,
    TRAIN_TRAINJOB_TASK,
    VALIDATE_TASK,
)

pytestmark = pytest.mark.unit

SETTINGS = {
    VALIDATE_TASK: k8s_settings.VALIDATE,
    FINGERPRINT_TASK: k8s_settings.DATA_FINGERPRINT,
    TRAIN_BASELINES_TASK: k8s_settings.TRAIN_BASELINES,
    TRAIN_TASK: k8s_settings.TRAIN,
    TRAIN_TRAINJOB_TASK: k8s_settings.TRAIN_TRAINJOB,
    EVALUATE_TASK: k8s_settings.EVALUATE,
    ROI_TASK: k8s_settings.ROI_REPORT,
    REGISTER_TASK: k8s_settings.REGISTER_MODEL,
    GATE_TASK: k8s_settings.GATE,
    ROLLOUT_TASK: k8s_settings.ROLLOUT,
}
IDEMPOTENT = {VALIDATE_TASK, FINGERPRINT_TASK, EVALUATE_TASK, ROI_TASK}
CACHED = {TRAIN_TASK, EVALUATE_TASK, ROI_TASK}
WITH_SIDE_EFFECTS = {
    VALIDATE_TASK,
    TRAIN_BASELINES_TASK,
    TRAIN_TRAINJOB_TASK,
    REGISTER_TASK,
    GATE_TASK,
    ROLLOUT_TASK,
}


@pytest.fixture(scope="module")
def ir(tmp_path_factory) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes platform spec) of the compiled pipeline."""
    path = compile_pipeline(tmp_path_factory.mktemp("ir") / "training.yaml")
    pipeline, platform = yaml.safe_load_all(path.read_text())
    return pipeline, platform["platforms"]["kubernetes"]


def all_tasks(pipeline: dict) -> dict[str, dict]:
    """Every task of the pipeline by name, however deep its condition or sub-pipeline."""
    dags = [pipeline["root"]["dag"]]
    dags += [part["dag"] for part in pipeline["components"].values() if "dag" in part]
    return {name: task for dag in dags for name, task in dag["tasks"].items()}


def executor(pipeline: dict, task: str) -> dict:
    component = pipeline["components"][all_tasks(pipeline)[task]["componentRef"]["name"]]
    return pipeline["deploymentSpec"]["executors"][component["executorLabel"]]


def k8s_executor(pipeline: dict, platform: dict, task: str) -> dict:
    component = pipeline["components"][all_tasks(pipeline)[task]["componentRef"]["name"]]
    return platform["deploymentSpec"]["executors"][component["executorLabel"]]


def test_the_settings_cover_every_step(ir):
    pipeline, _ = ir
    executors = {
        name
        for name, task in all_tasks(pipeline).items()
        if "executorLabel" in pipeline["components"][task["componentRef"]["name"]]
    }
    assert executors == set(SETTINGS)


@pytest.mark.parametrize("task", sorted(SETTINGS))
def test_requests_and_limits(ir, task):
    pipeline, _ = ir
    resources = executor(pipeline, task)["container"]["resources"]
    settings = SETTINGS[task]
    assert (resources["resourceCpuRequest"], resources["resourceCpuLimit"]) == settings.cpu
    assert (resources["resourceMemoryRequest"], resources["resourceMemoryLimit"]) == (
        settings.memory
    )


@pytest.mark.parametrize("task", sorted(SETTINGS))
def test_credentials_come_from_the_named_secrets(ir, task):
    pipeline, platform = ir
    secrets = k8s_executor(pipeline, platform, task)["secretAsEnv"]
    by_env = {
        mapping["envVar"]: (entry, mapping["secretKey"])
        for entry in secrets
        for mapping in entry["keyToEnv"]
    }
    for env_name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        entry, key = by_env[env_name]
        assert key == env_name and entry["optional"] is False
        assert entry["secretNameParameter"]["componentInputParameter"].endswith("s3_secret")
    for env_name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        entry, key = by_env[env_name]
        # Optional: an MLflow server without authentication needs no Secret.
        assert key == env_name and entry["optional"] is True
        assert entry["secretNameParameter"]["componentInputParameter"].endswith("mlflow_secret")
    assert "secretName" not in str(secrets).replace("secretNameParameter", "")


def test_secret_names_are_parameters_with_documented_defaults(ir):
    pipeline, _ = ir
    parameters = pipeline["root"]["inputDefinitions"]["parameters"]
    assert parameters["s3_secret"]["defaultValue"] == "cta-s3"
    assert parameters["mlflow_secret"]["defaultValue"] == "cta-mlflow"
    assert parameters["accelerator_type"]["defaultValue"] == "nvidia.com/gpu"
    assert parameters["train_gpus"]["defaultValue"] == 0
    assert parameters["train_backend"]["defaultValue"] == "pod"


@pytest.mark.parametrize("task", sorted(SETTINGS))
def test_every_step_has_a_timeout(ir, task):
    pipeline, platform = ir
    deadline = k8s_executor(pipeline, platform, task)["activeDeadlineSeconds"]
    assert int(deadline) == SETTINGS[task].timeout_s > 0


@pytest.mark.parametrize("task", sorted(SETTINGS))
def test_retries_with_back_off_only_on_idempotent_steps(ir, task):
    pipeline, _ = ir
    policy = all_tasks(pipeline)[task].get("retryPolicy")
    if task in IDEMPOTENT:
        assert policy["maxRetryCount"] == 2
        assert policy["backoffDuration"] == "30s"
        assert policy["backoffFactor"] == 2.0
        assert policy["backoffMaxDuration"] == "3600s"
    else:
        assert policy is None


@pytest.mark.parametrize("task", sorted(SETTINGS))
def test_caching_only_for_steps_without_side_effects(ir, task):
    pipeline, _ = ir
    enabled = all_tasks(pipeline)[task]["cachingOptions"].get("enableCache", False)
    assert enabled is (task in CACHED)
    if task in WITH_SIDE_EFFECTS or task not in CACHED:
        assert enabled is False


@pytest.mark.parametrize("task", sorted(CACHED))
def test_every_cached_step_takes_the_data_sha256(ir, task):
    """data_uri=.../latest with new data behind it gives a new sha256: the cache misses."""
    pipeline, _ = ir
    tasks = all_tasks(pipeline)
    assert tasks[FINGERPRINT_TASK]["cachingOptions"].get("enableCache", False) is False
    argument = tasks[task]["inputs"]["parameters"]["data_sha256"]
    if "taskOutputParameter" in argument:
        assert argument["taskOutputParameter"] == {
            "outputParameterKey": "Output",
            "producerTask": FINGERPRINT_TASK,
        }
    else:  # inside a train backend's branch: passed down as the condition's input
        assert argument == {"componentInputParameter": "pipelinechannel--data-fingerprint-Output"}
    # ...and the fingerprint reads what validate-data accepted (its dataset artefact).
    dataset = tasks[FINGERPRINT_TASK]["inputs"]["artifacts"]["dataset"]
    assert "validate-data" in str(dataset) and "dataset" in str(dataset)


def test_train_in_a_pod_gets_gpus_and_processes_from_the_same_parameter(ir):
    """Item 3a: one pod with N GPUs (accelerator count N) running torchrun --nproc-per-node N
    (the component starts max(1, gpus) processes)."""
    pipeline, _ = ir
    accelerator = executor(pipeline, TRAIN_TASK)["container"]["resources"]["accelerator"]
    assert accelerator == {
        "resourceCount": "{{$.inputs.parameters['pipelinechannel--train_gpus']}}",
        "resourceType": "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}",
    }
    inputs = all_tasks(pipeline)[TRAIN_TASK]["inputs"]["parameters"]
    assert inputs["gpus"] == {"componentInputParameter": "pipelinechannel--train_gpus"}
    assert inputs["gpu_type"] == {"componentInputParameter": "pipelinechannel--accelerator_type"}
    # The launcher's pod only waits: it asks for no GPU.
    assert "accelerator" not in executor(pipeline, TRAIN_TRAINJOB_TASK)["container"]["resources"]


def test_the_backend_parameter_picks_one_train_task(ir):
    pipeline, _ = ir
    tasks = all_tasks(pipeline)
    conditions = {
        task: next(
            entry["triggerPolicy"]["condition"]
            for entry in tasks.values()
            if task
            in pipeline["components"][entry["componentRef"]["name"]].get("dag", {}).get("tasks", {})
        )
        for task in (TRAIN_TASK, TRAIN_TRAINJOB_TASK)
    }
    assert "train_backend" in conditions[TRAIN_TRAINJOB_TASK]
    assert "'trainjob'" in conditions[TRAIN_TRAINJOB_TASK]
    assert conditions[TRAIN_TASK].startswith("!(")  # the dsl.Else of the same test
    evaluate_inputs = tasks[EVALUATE_TASK]["inputs"]["parameters"]["model_id"]
    assert "oneof" in evaluate_inputs["taskOutputParameter"]["outputParameterKey"]


def test_the_trainjob_step_knows_its_pod_and_run(ir):
    pipeline, platform = ir
    fields = {
        entry["name"]: entry["fieldPath"]
        for entry in k8s_executor(pipeline, platform, TRAIN_TRAINJOB_TASK)["fieldPathAsEnv"]
    }
    assert fields == {
        "POD_NAME": "metadata.name",
        "POD_UID": "metadata.uid",
        "POD_NAMESPACE": "metadata.namespace",
    }
    inputs = all_tasks(pipeline)[TRAIN_TRAINJOB_TASK]["inputs"]["parameters"]
    assert inputs["run_key"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    for name, parameter in (("nodes", "train_nodes"), ("gpus", "train_gpus")):
        assert inputs[name] == {"componentInputParameter": f"pipelinechannel--{parameter}"}
