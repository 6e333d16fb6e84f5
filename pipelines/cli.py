"""`cta pipeline ...`: compile the training pipeline, or run it here through kfp.local.

Registered by components/cli.py (``main.add_command(pipeline)``); imports stay inside the
commands so that ``cta --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("pipeline")
def pipeline() -> None:
    """The training pipeline (validate-data -> train): compile or run."""


@pipeline.command("compile")
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="IR YAML file to write",
)
def compile_command(out_path: Path) -> None:
    """Compile the training pipeline to a KFP IR YAML file."""
    from pipelines.run import compile_pipeline

    click.echo(str(compile_pipeline(out_path)))


@pipeline.command("run")
@click.option("--local", "local", is_flag=True, required=True, help="run here with kfp.local")
@click.option("--data", "data_uri", required=True, help="line dataset folder or s3:// prefix")
@click.option(
    "--work-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="run folder: every step's outputs and kfp.local's",
)
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="train config (YAML)",
)
@click.option("--tracking-uri", required=True, help="MLflow tracking URI shared by every step")
@click.option("--experiment", default="cta", show_default=True)
def run_command(
    local: bool,
    data_uri: str,
    work_dir: Path,
    config_path: Path,
    tracking_uri: str,
    experiment: str,
) -> None:
    """Run the training pipeline locally; prints which tasks ran or were skipped (JSON)."""
    from pipelines.run import run_local

    result = run_local(data_uri, work_dir, config_path, tracking_uri, experiment=experiment)
    click.echo(json.dumps(result, indent=2))
