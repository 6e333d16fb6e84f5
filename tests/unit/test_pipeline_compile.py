"""The training pipeline compiles to IR YAML that loads, with the project image everywhere."""

import pytest
import yaml
from click.testing import CliRunner
from kfp.components import load_component_from_file

from components.image import GPU_IMAGE, PROJECT_IMAGE
from cta_cli.commands.pipeline import pipeline
from pipelines.run import compile_pipeline

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_pipeline(tmp_path_factory.mktemp("compile") / "training.yaml")


def pipeline_spec(compiled) -> dict:
    """The pipeline spec: the first of the two YAML documents (the second holds the
    kfp-kubernetes platform settings)."""
    return next(iter(yaml.safe_load_all(compiled.read_text())))


def condition_holding(spec: dict, dag_tasks: dict, task: str) -> str:
    """The name of the condition task in ``dag_tasks`` whose branch holds ``task``."""
    for name, entry in dag_tasks.items():
        component = spec["components"][entry["componentRef"]["name"]]
        if task in component.get("dag", {}).get("tasks", {}):
            return name
    raise AssertionError(f"no condition holds {task}")


def tasks_below(spec: dict, component: str) -> set[str]:
    """Every task name in a component's DAG and in the DAGs nested below it."""
    found: set[str] = set()
    for name, entry in spec["components"][component].get("dag", {}).get("tasks", {}).items():
        found.add(name)
        found |= tasks_below(spec, entry["componentRef"]["name"])
    return found


def test_compiled_pipeline_loads(compiled):
    component = load_component_from_file(str(compiled))
    assert set(component.component_spec.inputs) == {
        "data_uri",
        "config_path",
        "tracking_uri",
        "experiment",
        "model_name",
        "gate_policy",
        "rollout_plan",
        "rollout_state",
        "rollout_backend",
        "roi_config",
        "lines_config",
        "approver",
        "bootstrap_n",
        "latency_repeats",
        "stl_baselines",
        "s3_secret",
        "mlflow_secret",
        "train_backend",
        "train_gpus",
        "train_nodes",
        "accelerator_type",
        "train_output_uri",
    }


def test_components_run_in_the_project_image_and_install_nothing(compiled):
    spec = pipeline_spec(compiled)
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {
        "exec-validate-data",
        "exec-data-fingerprint",
        "exec-train-baselines",
        "exec-train",
        "exec-train-trainjob",
        "exec-evaluate",
        "exec-roi-report",
        "exec-register-model",
        "exec-gate",
        "exec-rollout",
    }
    for name, executor in executors.items():
        container = executor["container"]
        # Training runs in the CUDA build of the same image (make image-gpu).
        assert container["image"] == (GPU_IMAGE if name == "exec-train" else PROJECT_IMAGE)
        command = " ".join(container["command"] + container.get("args", []))
        assert "pip install" not in command  # no packages_to_install, no kfp install


def test_train_is_gated_on_the_single_validate_output(compiled):
    spec = pipeline_spec(compiled)
    gate = spec["root"]["dag"]["tasks"]["condition-1"]
    assert gate["dependentTasks"] == ["validate-data"]
    condition = gate["triggerPolicy"]["condition"]
    assert "validate-data-Output" in condition and condition.endswith("true")
    assert {"train", "train-trainjob"} <= tasks_below(spec, "comp-condition-1")


def test_every_later_gate_sits_on_a_single_output(compiled):
    """evaluate waits for the baselines step and for whichever train branch ran; the roll-out
    starts only when the gate's one str output is "pass" (DESIGN 6.2)."""
    spec = pipeline_spec(compiled)
    components = spec["components"]
    after_data = components["comp-condition-1"]["dag"]["tasks"]
    training = next(
        name
        for name, entry in after_data.items()
        if "train" in tasks_below(spec, entry["componentRef"]["name"])
    )
    assert set(after_data["evaluate"]["dependentTasks"]) == {
        "train-baselines",
        training,
        "data-fingerprint",
    }
    rollout_gate = after_data[condition_holding(spec, after_data, "rollout")]
    assert "gate" in rollout_gate["dependentTasks"]
    condition = rollout_gate["triggerPolicy"]["condition"]
    assert "gate-Output" in condition and "'pass'" in condition
    rollout_component = rollout_gate["componentRef"]["name"]
    assert list(components[rollout_component]["dag"]["tasks"]) == ["rollout"]


def _artifact_source(task: dict, name: str) -> tuple[str, str]:
    """(producer task, output key) of a task's input artefact ``name``."""
    argument = task["inputs"]["artifacts"][name]
    if "taskOutputArtifact" in argument:
        output = argument["taskOutputArtifact"]
        return output["producerTask"], output["outputArtifactKey"]
    # Passed into a condition's DAG: "pipelinechannel--<task>-<key>".
    channel = argument["componentInputArtifact"].removeprefix("pipelinechannel--")
    producer, _, key = channel.rpartition("-")
    return producer, key


def test_steps_hand_each_other_artifacts_not_paths(compiled):
    """Issue 16 item 1: no step takes a path on a shared folder; the data, the evaluation and
    the ROI figures travel as KFP artefacts of the right types, and the reports are artefacts
    the KFP UI renders."""
    spec = pipeline_spec(compiled)
    tasks = {}
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    tasks.update(spec["root"]["dag"]["tasks"])
    for name in ("data-fingerprint", "train-baselines", "train", "train-trainjob", "evaluate"):
        assert _artifact_source(tasks[name], "dataset") == ("validate-data", "dataset"), name
    assert _artifact_source(tasks["register-model"], "dataset") == ("validate-data", "dataset")
    assert _artifact_source(tasks["roi-report"], "evaluation") == ("evaluate", "evaluation")
    assert _artifact_source(tasks["register-model"], "evaluation") == ("evaluate", "evaluation")
    assert _artifact_source(tasks["register-model"], "roi") == ("roi-report", "roi")

    def outputs(component: str) -> dict[str, str]:
        artifacts = spec["components"][component]["outputDefinitions"].get("artifacts", {})
        return {key: value["artifactType"]["schemaTitle"] for key, value in artifacts.items()}

    assert outputs("comp-validate-data") == {"dataset": "system.Dataset", "report": "system.HTML"}
    assert outputs("comp-train") == {"model": "system.Model"}
    assert outputs("comp-train-trainjob") == {"model": "system.Model"}
    assert outputs("comp-evaluate") == {
        "evaluation": "system.Artifact",
        "metrics": "system.Metrics",
        "confusion": "system.ClassificationMetrics",
    }
    assert outputs("comp-roi-report") == {
        "roi": "system.Artifact",
        "report": "system.HTML",
        "summary": "system.Markdown",
    }
    # No parameter of any step or of the pipeline is a shared run folder.
    for component in spec["components"].values():
        parameters = component.get("inputDefinitions", {}).get("parameters", {})
        assert not {"work_dir", "out_dir", "dataset_ref", "model_dir"} & set(parameters)


def test_cli_compile(tmp_path):
    out = tmp_path / "p.yaml"
    result = CliRunner().invoke(pipeline, ["compile", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_component_from_file(str(out)).name


def test_trainjob_pods_run_the_gpu_image(compiled):
    """Item 4: the TrainJob the train-trainjob step creates runs the CUDA build of the image."""
    spec = pipeline_spec(compiled)
    task = next(
        entry
        for component in spec["components"].values()
        for name, entry in component.get("dag", {}).get("tasks", {}).items()
        if name == "train-trainjob"
    )
    image = task["inputs"]["parameters"]["image"]["runtimeValue"]["constant"]
    assert image == GPU_IMAGE != PROJECT_IMAGE
