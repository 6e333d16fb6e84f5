"""The training pipeline compiles to IR YAML that loads, with the project image everywhere."""

import pytest
import yaml
from click.testing import CliRunner
from kfp.components import load_component_from_file

from components.image import PROJECT_IMAGE
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
        "work_dir",
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
        "exec-baselines-needed",
        "exec-train-baselines",
        "exec-train",
        "exec-train-trainjob",
        "exec-evaluate",
        "exec-roi-report",
        "exec-register-model",
        "exec-gate",
        "exec-rollout",
    }
    for executor in executors.values():
        container = executor["container"]
        assert container["image"] == PROJECT_IMAGE
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
    """Baselines train only when needed; evaluate waits for that branch; the roll-out starts
    only when the gate's one str output is "pass" (DESIGN 6.2)."""
    spec = pipeline_spec(compiled)
    components = spec["components"]
    branch = components["comp-stl-baselines"]["dag"]["tasks"]
    needed = branch["condition-1"]["triggerPolicy"]["condition"]
    assert "baselines-needed-Output" in needed and needed.endswith("true")
    assert "train-baselines" in components["comp-condition-1-2"]["dag"]["tasks"]
    after_data = components["comp-condition-1"]["dag"]["tasks"]
    # evaluate waits for the baselines and for whichever train branch ran (dsl.OneOf).
    training = next(
        name
        for name, entry in after_data.items()
        if "train" in tasks_below(spec, entry["componentRef"]["name"])
    )
    assert set(after_data["evaluate"]["dependentTasks"]) == {
        "stl-baselines",
        training,
        "data-fingerprint",
    }
    rollout_gate = after_data[condition_holding(spec, after_data, "rollout")]
    assert "gate" in rollout_gate["dependentTasks"]
    condition = rollout_gate["triggerPolicy"]["condition"]
    assert "gate-Output" in condition and "'pass'" in condition
    rollout_component = rollout_gate["componentRef"]["name"]
    assert list(components[rollout_component]["dag"]["tasks"]) == ["rollout"]


def test_cli_compile(tmp_path):
    out = tmp_path / "p.yaml"
    result = CliRunner().invoke(pipeline, ["compile", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_component_from_file(str(out)).name


def test_reports_and_metrics_are_kfp_artifacts_the_ui_renders(compiled):
    """Issue 16 item 1 (part): the evaluate step's headline figures as a Metrics artefact, the
    ROI report as HTML and Markdown artefacts; the register step still takes the JSON paths."""
    spec = pipeline_spec(compiled)
    outputs = {
        name: {
            artifact: definition["artifactType"]["schemaTitle"]
            for artifact, definition in spec["components"][name]["outputDefinitions"][
                "artifacts"
            ].items()
        }
        for name in ("comp-evaluate", "comp-roi-report")
    }
    assert outputs == {
        "comp-evaluate": {"metrics": "system.Metrics"},
        "comp-roi-report": {"report": "system.HTML", "summary": "system.Markdown"},
    }
    register = next(
        task
        for component in spec["components"].values()
        for name, task in component.get("dag", {}).get("tasks", {}).items()
        if name == "register-model"
    )
    inputs = register["inputs"]["parameters"]
    assert inputs["evaluation"]["taskOutputParameter"] == {
        "outputParameterKey": "Output",
        "producerTask": "evaluate",
    }
    assert inputs["roi"]["taskOutputParameter"]["producerTask"] == "roi-report"
