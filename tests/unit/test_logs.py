"""components/logs.py: the one logging set-up of the CLI and the pipeline steps (issue 16
item 6), checked in fresh interpreters, as a pod or a terminal starts them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

# Logs one INFO line, one WARNING with an exception, as a step's loggers do.
SCRIPT = """
import logging, sys
from components.logs import configure_logging
configure_logging(sys.argv[1] if len(sys.argv) > 1 else None)
log = logging.getLogger("cta_model.training.trainer")
log.info("epoch 1/2 train_loss=0.5 ünïcode")
try:
    raise ValueError("boom")
except ValueError:
    log.warning("step failed", exc_info=True)
logging.getLogger("cta").debug("not shown at INFO")
"""


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "CTA_LOG_FORMAT"}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        capture_output=True,
        text=True,
        env={**environment, **(env or {})},
        timeout=60,
    )


def test_text_lines_reach_stderr_with_level_and_logger():
    result = _run()
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert " INFO cta_model.training.trainer: epoch 1/2 train_loss=0.5 ünïcode" in lines[0]
    assert " WARNING cta_model.training.trainer: step failed" in lines[1]
    assert "ValueError: boom" in result.stderr
    assert "not shown" not in result.stderr


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_json_lines_are_one_object_each(how):
    result = _run("json") if how == "argument" else _run(env={"CTA_LOG_FORMAT": "json"})
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert [r["level"] for r in records] == ["INFO", "WARNING"]
    assert records[0]["logger"] == "cta_model.training.trainer"
    assert records[0]["message"] == "epoch 1/2 train_loss=0.5 ünïcode"
    assert records[0]["time"].endswith("+00:00")
    assert "ValueError: boom" in records[1]["exception"]


def test_an_unknown_format_is_refused_naming_its_source():
    result = _run(env={"CTA_LOG_FORMAT": "xml"})
    assert result.returncode != 0
    assert "CTA_LOG_FORMAT='xml': expected one of text, json" in result.stderr


def test_the_cli_flag_sets_the_format_for_every_command(tmp_path):
    """`cta --log-format json <command>`: the group configures logging before the command."""
    from cta_model.data.synthetic_dataset import generate_dataset

    data = generate_dataset(
        tmp_path / "data", n_lines=1, samples_per_line=6, height=32, width=32, seed=0,
        progress=False,
    )  # fmt: skip
    environment = {k: v for k, v in os.environ.items() if k != "CTA_LOG_FORMAT"}
    result = subprocess.run(
        [sys.executable, "-m", "cta_cli", "--log-format", "json", "validate-data", str(data)]
        + ["--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    logged = [line for line in result.stderr.splitlines() if line.startswith("{")]
    assert logged, result.stderr
    for line in logged:
        assert set(json.loads(line)) >= {"time", "level", "logger", "message"}
