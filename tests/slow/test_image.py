"""The project image builds (infra/images/build.sh, as `make image` runs it) and a component runs
inside it with podman, offline, as a non-root user: `cta validate-data` on a tiny dataset made
on the host and mounted in.

Skipped, with the reason, where buildah (or a working docker) or podman is missing.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from components.image import PROJECT_IMAGE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
#: DESIGN 6.2: limits the default runtime cannot set here, and no network inside.
PODMAN_RUN = [
    "podman",
    "run",
    "--rm",
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
    "--network",
    "none",
]


def _docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def built_image() -> str:
    if shutil.which("buildah") is None and not _docker_works():
        pytest.skip("no image builder: neither buildah nor a working docker (make setup-system)")
    if shutil.which("podman") is None:
        pytest.skip("podman not found (make setup-system)")
    if shutil.which("buildah") is None:
        pytest.skip("the image would be built by docker, which podman cannot see; use buildah")
    env = {k: v for k, v in os.environ.items() if k != "CTA_IMAGE"}
    env["CTA_IMAGE"] = PROJECT_IMAGE
    result = subprocess.run(["bash", str(ROOT / "infra/images/build.sh")], cwd=ROOT, env=env)
    assert result.returncode == 0, "image build failed (its log is above)"
    return PROJECT_IMAGE


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*PODMAN_RUN, *args], capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_image_runs_as_non_root_with_cta_as_entrypoint(built_image):
    identity = podman("--entrypoint", "id", built_image)
    assert "uid=10001(cta)" in identity.stdout
    version = podman(built_image, "--version")
    assert "cta" in version.stdout.lower()


def test_validate_data_runs_inside_the_image_offline(built_image, tmp_path):
    data = tmp_path / "data"
    subprocess.run(
        [str(ROOT / ".venv/bin/cta"), "data", "generate", "--out", str(data), "--lines", "1"]
        + ["--samples-per-line", "6", "--size", "32", "--seed", "0"],
        check=True,
    )
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # written by the image's user (uid 10001)
    podman(
        "--read-only",
        "--tmpfs",
        "/tmp",
        "-v",
        f"{data}:/data:ro",
        "-v",
        f"{out}:/out",
        built_image,
        "validate-data",
        "/data",
        "--out",
        "/out",
    )
    dataset_ref = json.loads((out / "dataset_ref.json").read_text())
    assert dataset_ref["passed"] is True
    assert dataset_ref["uri"].endswith("/data") or dataset_ref["uri"].startswith("/data")


def test_psycopg2_is_importable_for_the_mlflow_server(built_image):
    result = podman(
        "--entrypoint", "python", built_image, "-c", "import psycopg2, mlflow, boto3; print('ok')"
    )
    assert result.stdout.strip() == "ok"
