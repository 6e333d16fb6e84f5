"""DVC versions the data stages: an S3 remote on moto, and the repo's dvc.yaml / params.yaml."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cta_model.data.synthetic_dataset import generate_dataset

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.prefix) / "bin"
DVC = str(VENV_BIN / "dvc")


def _isolated_env(home: Path) -> dict[str, str]:
    """The test environment (moto credentials included) with DVC and git kept off the user's
    config, caches and analytics."""
    env = dict(os.environ)
    env.update(
        DVC_NO_ANALYTICS="1",
        DVC_GLOBAL_CONFIG_DIR=str(home / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(home / "dvc-system"),
        DVC_SITE_CACHE_DIR=str(home / "dvc-site-cache"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,
        HOME=str(home),
        # `cta` for stage commands comes from the same environment as the tests.
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result.stdout


def _git_dvc_repo(path: Path, env: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    _run(["git", "init", "-q"], path, env)
    _run(["git", "config", "user.name", "cta tests"], path, env)
    _run(["git", "config", "user.email", "tests@cta.invalid"], path, env)
    _run([DVC, "init", "-q"], path, env)
    return path


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_push_and_pull_through_an_s3_remote(tmp_path: Path, moto_s3, s3_bucket: str):
    env = _isolated_env(tmp_path / "home")
    repo = _git_dvc_repo(tmp_path / "repo", env)
    # Exactly the commands docs/data-versioning.md gives; credentials stay in the environment.
    _run([DVC, "remote", "add", "-d", "storage", f"s3://{s3_bucket}/dvc"], repo, env)
    _run([DVC, "remote", "modify", "storage", "endpointurl", moto_s3.endpoint_url], repo, env)
    config = (repo / ".dvc" / "config").read_text()
    assert "testing" not in config  # no credentials in a file git tracks

    data = generate_dataset(
        repo / "data" / "synthetic",
        n_lines=2,
        samples_per_line=4,
        height=32,
        width=32,
        seed=0,
        progress=False,
    )
    expected = _tree_digest(data)
    _run([DVC, "add", "data/synthetic"], repo, env)
    assert (repo / "data" / "synthetic.dvc").is_file()
    _run([DVC, "push"], repo, env)
    pushed = moto_s3.client().list_objects_v2(Bucket=s3_bucket, Prefix="dvc/")
    assert pushed["KeyCount"] >= len(expected)  # one object per file, plus the .dir listing

    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")
    _run([DVC, "pull"], repo, env)
    assert _tree_digest(data) == expected


def test_repo_pipeline_declares_the_data_stages():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert list(stages) == ["generate", "validate"]
    assert params["generate"] == {"lines": 3, "samples_per_line": 200, "size": 128, "seed": 0}
    generate, validate = stages["generate"], stages["validate"]
    for name in params["generate"]:
        assert f"${{generate.{name}}}" in generate["cmd"]
        assert f"generate.{name}" in generate["params"]
    for dependency in [*generate["deps"], *validate["deps"]]:
        assert dependency == "data/synthetic" or (REPO_ROOT / dependency).is_file(), dependency
    assert generate["outs"] == ["data/synthetic"]
    assert validate["cmd"].startswith("cta validate-data data/synthetic --out data/validation")
    assert "data/synthetic" in validate["deps"]
    assert "data/validation/dataset_ref.json" in validate["outs"]
    assert all(out.startswith("data/validation/") for out in validate["outs"])


def test_repo_pipeline_runs_the_generate_stage(tmp_path: Path):
    """dvc.yaml renders and its generate command runs, on a copy of the repo with tiny params."""
    env = _isolated_env(tmp_path / "home")
    repo = _git_dvc_repo(tmp_path / "repo", env)
    shutil.copy(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for dependency in stages["generate"]["deps"]:
        (repo / dependency).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / dependency, repo / dependency)
    tiny = {"generate": {"lines": 1, "samples_per_line": 3, "size": 32, "seed": 0}}
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny))

    # repro checks the whole dvc.yaml against DVC's schema, the validate stage included.
    _run([DVC, "repro", "generate"], repo, env)
    assert (repo / "data" / "synthetic" / "manifest.parquet").is_file()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["generate"]
    expected_params = {f"generate.{name}": value for name, value in tiny["generate"].items()}
    assert lock["params"]["params.yaml"] == expected_params
    assert "--samples-per-line 3 --size 32" in lock["cmd"]
    # Nothing changed: a second repro runs nothing.
    assert "didn't change" in _run([DVC, "repro", "generate"], repo, env)
