"""`cta pipeline ...`: compile the training pipeline, run it here through kfp.local, submit it
to a Kubeflow Pipelines server, or schedule it there as a recurring run.

Imports stay inside the commands so that ``cta --help`` stays fast and loads no kfp.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from cta_cli.options import lines_config_option


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
    help="run folder: kfp.local's pipeline root (every step's artefacts) and the roll-out state",
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
@click.option("--model-name", default="cta-inspection", show_default=True)
@click.option(
    "--gate-policy",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="gate policy YAML [default: configs/gate.yaml, strict]",
)
@click.option(
    "--rollout-plan",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="roll-out plan YAML [default: configs/rollout-plan.yaml]",
)
@click.option(
    "--rollout-state", help="roll-out state URI [default: $CTA_ROLLOUT_STATE or WORK/rollout]"
)
@click.option("--roi-config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@lines_config_option()
@click.option("--approver", default="", help="recorded human approval for the gate")
@click.option("--bootstrap-n", default=1000, show_default=True, type=click.IntRange(min=10))
@click.option(
    "--stl-baselines/--no-stl-baselines",
    default=True,
    show_default=True,
    help="train the STL baselines Delta_m needs when none matches the data",
)
@click.option("--json", "as_json", is_flag=True, help="print the task states as JSON")
def run_command(
    local: bool,
    data_uri: str,
    work_dir: Path,
    config_path: Path,
    tracking_uri: str,
    experiment: str,
    model_name: str,
    gate_policy: Path | None,
    rollout_plan: Path | None,
    rollout_state: str | None,
    roi_config: Path | None,
    lines_config: Path | None,
    approver: str,
    bootstrap_n: int,
    stl_baselines: bool,
    as_json: bool,
) -> None:
    """Run the training pipeline locally; prints which tasks ran and what they made."""
    import os

    from pipelines.run import DEFAULT_GATE_POLICY, DEFAULT_ROLLOUT_PLAN, run_local
    from pipelines.summary import summary_lines

    state = rollout_state or os.environ.get("CTA_ROLLOUT_STATE") or str(work_dir / "rollout")
    result = run_local(
        data_uri,
        work_dir,
        config_path,
        tracking_uri,
        experiment=experiment,
        model_name=model_name,
        gate_policy=gate_policy or DEFAULT_GATE_POLICY,
        rollout_plan=rollout_plan or DEFAULT_ROLLOUT_PLAN,
        rollout_state=state,
        roi_config=roi_config,
        lines_config=lines_config,
        approver=approver,
        bootstrap_n=bootstrap_n,
        stl_baselines=stl_baselines,
    )
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for line in summary_lines(result, tracking_uri, model_name, state):
        click.echo(line)
    from pipelines.training import VALIDATE_TASK

    if result["tasks"][VALIDATE_TASK]["outputs"].get("Output") is False:
        raise click.ClickException(
            "the data did not pass validation; nothing was trained (see the validation report)"
        )


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
            help="pipeline parameter (repeatable): data_uri, config_path, "
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
