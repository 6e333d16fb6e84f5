"""`cta pipeline ...`: compile the training pipeline, run it here through kfp.local, submit it
to a Kubeflow Pipelines server, or schedule it there as a recurring run.

Registered by components/cli.py (``main.add_command(pipeline)``); imports stay inside the
commands so that ``cta --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("pipeline")
def pipeline() -> None:
    """The training pipeline (validate-data -> train -> evaluate -> register-model)."""


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


# ------------------------------------------------------------------ remote (KFP server) commands
def _checked(parse):
    """A click callback that turns the parser's ConfigError into a usage error on the flag."""

    def callback(ctx: click.Context, param: click.Parameter, value):
        from cta_model.errors import ConfigError

        try:
            return parse(value)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback


def _parse_params(value):
    from pipelines.remote import parse_params

    return parse_params(value)


def _parse_cron(value):
    from pipelines.remote import normalise_cron

    return normalise_cron(value)


def _remote_options(command):
    """Flags shared by submit and schedule (applied bottom-up, so listed in reverse)."""
    options = [
        click.option("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080"),
        click.option(
            "--namespace",
            default=None,
            help="Kubeflow profile namespace (multi-user KFP); omit for single-user",
        ),
        click.option(
            "--experiment",
            default="cta",
            show_default=True,
            help="KFP experiment (the MLflow one is --param experiment=...)",
        ),
        click.option(
            "--param",
            "params",
            multiple=True,
            callback=_checked(_parse_params),
            metavar="KEY=VALUE",
            help="pipeline parameter (repeatable): data_uri, work_dir, config_path, "
            "tracking_uri (default $MLFLOW_TRACKING_URI), experiment, model_name",
        ),
        click.option(
            "--service-account",
            default=None,
            help="Kubernetes service account the run's pods use (e.g. cta-pipeline-runner)",
        ),
        click.option(
            "--token",
            envvar="KFP_TOKEN",
            default=None,
            help="bearer token for the KFP API [env: KFP_TOKEN]; never printed",
        ),
        click.option("--json", "as_json", is_flag=True, help="print the result as JSON"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _print_result(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        click.echo(f"{key + ':':<21}{value}")


@pipeline.command("submit")
@_remote_options
@click.option("--run-name", default=None, help="run display name [default: cta-training-<UTC>]")
def submit_command(
    host, namespace, experiment, params, service_account, token, as_json, run_name
) -> None:
    """Compile the training pipeline and start one run on a KFP server."""
    from pipelines.remote import submit_run

    result = submit_run(
        host,
        params,
        namespace=namespace,
        experiment=experiment,
        run_name=run_name,
        service_account=service_account,
        token=token,
    )
    _print_result(result, as_json)


@pipeline.command("schedule")
@_remote_options
@click.option(
    "--cron",
    required=True,
    callback=_checked(_parse_cron),
    help="schedule: 5 fields (minute hour dom month dow; '0 ' is prefixed for KFP) or 6 "
    "with seconds first, e.g. '0 */6 * * *'",
)
@click.option(
    "--name", default=None, help="recurring run display name [default: cta-training-retrain]"
)
@click.option(
    "--max-concurrency",
    default=1,
    show_default=True,
    type=click.IntRange(1, 10),
    help="runs of this schedule allowed at once (KFP allows 1-10)",
)
@click.option(
    "--catchup/--no-catchup",
    default=False,
    show_default=True,
    help="after a pause, start every missed run (catch-up) or only the latest",
)
def schedule_command(
    host,
    namespace,
    experiment,
    params,
    service_account,
    token,
    as_json,
    cron,
    name,
    max_concurrency,
    catchup,
) -> None:
    """Upload the training pipeline as a new version and schedule it as a recurring run."""
    from pipelines.remote import schedule_run

    result = schedule_run(
        host,
        cron,
        params,
        name=name,
        max_concurrency=max_concurrency,
        catchup=catchup,
        namespace=namespace,
        experiment=experiment,
        service_account=service_account,
        token=token,
    )
    _print_result(result, as_json)
