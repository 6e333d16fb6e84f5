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
@click.option("--json", "as_json", is_flag=True, help="print the task states as JSON")
def run_command(
    local: bool,
    data_uri: str,
    work_dir: Path,
    config_path: Path,
    tracking_uri: str,
    experiment: str,
    as_json: bool,
) -> None:
    """Run the training pipeline locally; prints which tasks ran and what they made."""
    from pipelines.run import run_local

    result = run_local(data_uri, work_dir, config_path, tracking_uri, experiment=experiment)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for line in summary_lines(result, work_dir.resolve(), tracking_uri):
        click.echo(line)


def summary_lines(result: dict, work_dir: Path, tracking_uri: str) -> list[str]:
    """A short human summary: task states, test metrics, the registered version, where to look."""
    from pipelines.training import REGISTER_TASK

    lines = [
        "pipeline tasks: " + ", ".join(f"{t} {i['state']}" for t, i in result["tasks"].items())
    ]
    evaluation_path = work_dir / "evaluate" / "evaluation.json"
    if evaluation_path.is_file():
        evaluation = json.loads(evaluation_path.read_text())
        overall = evaluation["overall"]
        lines.append(f"test metrics ({overall['n_images']} images):")
        for name, value in overall["metrics"].items():
            shown = "n/a" if value is None else f"{value:.4g}"
            lines.append(f"  {name:<24} {shown}")
    version = result["tasks"].get(REGISTER_TASK, {}).get("outputs", {}).get("Output")
    if version:
        lines.append(f"registered: cta-inspection version {version} (alias challenger)")
    lines += [
        f"validation report: {work_dir / 'validate_data' / 'validation_report.html'}",
        f"evaluation:        {evaluation_path}",
        f"model folder:      {work_dir / 'train' / 'model'}",
        f"MLflow store:      {tracking_uri}",
        f"open the MLflow UI: mlflow ui --backend-store-uri {tracking_uri}",
    ]
    return lines
