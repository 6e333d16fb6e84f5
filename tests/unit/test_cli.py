"""`cta` commands through click's runner and as the installed console script."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cta_cli.commands.model import AFFINITY_MODE_CHOICES, ARCH_CHOICES, BACKBONE_CHOICES
from cta_cli.main import main
from cta_model.nn.backbones import BACKBONES
from cta_model.nn.ctal import AFFINITY_MODES
from cta_model.nn.models import ARCHITECTURES

pytestmark = pytest.mark.unit


def test_cli_choices_equal_the_registries():
    assert list(ARCHITECTURES) == ARCH_CHOICES
    assert list(BACKBONES) == BACKBONE_CHOICES
    assert list(AFFINITY_MODES) == AFFINITY_MODE_CHOICES


@pytest.mark.parametrize("arch", ["stl", "hps", "hps-light", "ctal"])
def test_model_summary_json_for_every_architecture(arch):
    args = ["model", "summary", "--arch", arch, "--backbone", "resnet18", "--output-stride", "8"]
    args += ["--tasks", "semseg,height,normals", "--height", "32", "--width", "32", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["params"]["total"] == sum(summary["params"]["per_module"].values())
    assert summary["flops"]["total"] > 0
    assert summary["flops"]["total"] == sum(summary["flops"]["per_module"].values())


def test_stl_summary_is_the_sum_of_the_single_task_networks():
    def params(arch, tasks):
        args = ["model", "summary", "--arch", arch, "--tasks", tasks, "--backbone", "resnet18"]
        args += ["--height", "32", "--width", "32", "--json"]
        return json.loads(CliRunner().invoke(main, args).output)

    stl = params("stl", "semseg,height")
    singles = [params("hps", "semseg"), params("hps", "height")]
    assert stl["params"]["total"] == sum(s["params"]["total"] for s in singles)
    assert stl["flops"]["total"] == sum(s["flops"]["total"] for s in singles)


def test_ctal_block_flops_dominate_at_paper_resolution():
    # DESIGN 3.2: at 288x384 (N = 6912) dense CTAL costs ~133 GFLOPs, the block most of it.
    args = ["model", "summary", "--arch", "ctal", "--height", "288", "--width", "384", "--json"]
    summary = json.loads(CliRunner().invoke(main, [*args, "--affinity-mode", "dense"]).output)
    assert summary["affinity_mode"] == "dense"
    assert 120e9 < summary["flops"]["total"] < 145e9
    assert summary["flops"]["per_module"]["refinement"] > 0.5 * summary["flops"]["total"]
    assert summary["params"]["per_module"]["refinement"] == 193_536 + 3 * (128 * 128 * 9 + 128)
    # `auto` runs (and counts) the linear form there: 4 k^2 T^2 C^2 N for the block's products.
    auto = json.loads(CliRunner().invoke(main, args).output)
    assert auto["affinity_mode"] == "linear"
    products = 4 * 9 * (3 * 128) ** 2 * 6912
    value_convs = 3 * 2 * 128 * 128 * 9 * 6912
    assert auto["flops"]["per_module"]["refinement"] == pytest.approx(
        products + value_convs, rel=0.01
    )
    assert auto["params"] == summary["params"]


def test_bad_input_is_one_clear_line_and_exit_code_2():
    result = CliRunner().invoke(main, ["model", "summary", "--arch", "ctal", "--tasks", "height"])
    assert result.exit_code == 2
    assert "needs at least 2 tasks" in result.output
    assert "Traceback" not in result.output


def test_installed_console_script_runs():
    cta = f"{sys.prefix}/bin/cta"
    result = subprocess.run([cta, "--help"], capture_output=True, text=True, check=True)
    assert "model" in result.stdout and "data" in result.stdout


def test_data_import_refuses_a_category_that_cannot_be_a_line_id(tmp_path):
    for folder in ("train/good", "test/good"):
        (tmp_path / "src" / "9lives" / folder).mkdir(parents=True)
    args = ["data", "import", "mvtec-ad", str(tmp_path / "src"), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "error: category '9lives': cannot be a line id" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
