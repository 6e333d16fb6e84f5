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
    }


def test_components_run_in_the_project_image_and_install_nothing(compiled):
    spec = yaml.safe_load(compiled.read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {
        "exec-validate-data",
        "exec-baselines-needed",
        "exec-train-baselines",
        "exec-train",
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
    spec = yaml.safe_load(compiled.read_text())
    gate = spec["root"]["dag"]["tasks"]["condition-1"]
    assert gate["dependentTasks"] == ["validate-data"]
    condition = gate["triggerPolicy"]["condition"]
    assert "validate-data-Output" in condition and condition.endswith("true")
    assert "train" in spec["components"]["comp-condition-1"]["dag"]["tasks"]


def test_every_later_gate_sits_on_a_single_output(compiled):
    """Baselines train only when needed; evaluate waits for that branch; the roll-out starts
    only when the gate's one str output is "pass" (DESIGN 6.2)."""
    spec = yaml.safe_load(compiled.read_text())
    components = spec["components"]
    branch = components["comp-stl-baselines"]["dag"]["tasks"]
    needed = branch["condition-1"]["triggerPolicy"]["condition"]
    assert "baselines-needed-Output" in needed and needed.endswith("true")
    assert "train-baselines" in components["comp-condition-1-2"]["dag"]["tasks"]
    after_data = components["comp-condition-1"]["dag"]["tasks"]
    assert set(after_data["evaluate"]["dependentTasks"]) == {"stl-baselines", "train"}
    rollout_gate = after_data["condition-2"]
    assert "gate" in rollout_gate["dependentTasks"]
    condition = rollout_gate["triggerPolicy"]["condition"]
    assert "gate-Output" in condition and "'pass'" in condition
    assert list(components["comp-condition-2"]["dag"]["tasks"]) == ["rollout"]


def test_cli_compile(tmp_path):
    out = tmp_path / "p.yaml"
    result = CliRunner().invoke(pipeline, ["compile", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_component_from_file(str(out)).name
