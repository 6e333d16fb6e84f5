"""`make test` on a machine without Chromium (issue 16 item 10): infra/images/test-system.sh
installs it when it can, else stops at once, before the suite, with the command to run."""

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "images" / "test-system.sh"


def _bin(tmp_path: Path, **tools: str) -> Path:
    """A PATH folder holding only the named tools, each a script with the given body."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, body in tools.items():
        tool = folder / name
        tool.write_text(f"#!/bin/bash\n{body}\n")
        tool.chmod(0o755)
    return folder


def _run(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/bin/bash", str(SCRIPT)], env={"PATH": str(path)}, capture_output=True, text=True
    )


def test_present_chromium_is_left_alone(tmp_path):
    done = _run(_bin(tmp_path, chromium="exit 0", id="echo 1000"))
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""


def test_without_root_or_sudo_it_stops_with_the_command_to_run(tmp_path):
    done = _run(_bin(tmp_path, id="echo 1000"))
    assert done.returncode == 2
    assert "sudo apt-get install -y --no-install-recommends chromium" in done.stderr


def test_a_sudo_that_asks_for_a_password_is_not_waited_on(tmp_path):
    done = _run(_bin(tmp_path, id="echo 1000", sudo="exit 1"))
    assert done.returncode == 2 and "missing" in done.stderr


def test_root_installs_it_from_debian(tmp_path):
    log = tmp_path / "apt.log"
    done = _run(_bin(tmp_path, id="echo 0", **{"apt-get": f'echo "$@" >> {log}'}))
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines() == [
        "update -qq",
        "install -y -qq --no-install-recommends chromium",
    ]
