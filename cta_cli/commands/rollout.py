"""``cta rollout``: start, status, pause, resume, rollback, stop-all (DESIGN 7).

Every subcommand takes ``--state URI`` (default ``$CTA_ROLLOUT_STATE``, else
``.cta/demo/rollout``). Commands parse flags and call components.rollout.engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from components.rollout.backends import BACKENDS

state_option = click.option(
    "--state",
    "state_uri",
    default=None,
    help="state store: a folder or s3://bucket/prefix [default: $CTA_ROLLOUT_STATE, else "
    ".cta/demo/rollout]",
)
rollout_option = click.option(
    "--rollout", "rollout_id", default=None, help="roll-out id [default: the newest one]"
)
tracking_option = click.option(
    "--tracking-uri", default=None, help="MLflow tracking/registry URI [default: environment]"
)
backend_options = [
    click.option(
        "--backend",
        type=click.Choice(BACKENDS),
        default="local",
        show_default=True,
        help="where line models run",
    ),
    click.option(
        "--namespace-prefix",
        default="cta-line-",
        show_default=True,
        help="kubernetes: namespace of line ID is PREFIX+ID",
    ),
    click.option(
        "--gitops-repo",
        default=None,
        type=click.Path(file_okay=False),
        help="gitops: working copy of the deployment repository",
    ),
]


def _with_backend_options(function):
    for option in reversed(backend_options):
        function = option(function)
    return function


def _engine(
    state_uri,
    tracking_uri,
    data_uri,
    backend,
    namespace_prefix,
    gitops_repo,
    record=None,
    lines_config=None,
):
    from components.rollout.backends import make_backend
    from components.rollout.engine import Engine
    from components.rollout.state import LocalStateStore, open_store

    store = open_store(state_uri)
    if record is not None:
        backend = backend or record["backend"]
        tracking_uri = tracking_uri or record.get("tracking_uri")
        data_uri = data_uri or record.get("data_uri")
        lines_config = lines_config or record.get("lines_config")
    options: dict = {}
    if backend == "local":
        options["tracking_uri"] = tracking_uri
        options["lines_config"] = lines_config
        if isinstance(store, LocalStateStore):
            options["log_dir"] = store.root / "logs"
    elif backend == "kubernetes":
        options["namespace_prefix"] = namespace_prefix
    elif backend == "gitops":
        options["repo"] = gitops_repo
    return Engine(
        store,
        make_backend(backend, **options),
        tracking_uri=tracking_uri,
        data_uri=data_uri,
        lines_config=str(Path(lines_config).absolute()) if lines_config else None,
    )


def _echo_status(store, rollout_id, as_json: bool) -> None:
    from components.rollout.engine import format_status, status

    report = status(store, rollout_id)
    click.echo(json.dumps(report, indent=2) if as_json else format_status(report))


@click.group()
def rollout() -> None:
    """Staged roll-out of a registered version to production lines."""


@rollout.command("start")
@click.option("--model-name", required=True)
@click.option("--version", "version", required=True)
@click.option("--plan", "plan_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "data_uri", required=True, help="line dataset whose qa split is replayed")
@click.option("--all-waves", is_flag=True, help="run every wave, not only wave 1")
@click.option(
    "--lines-config",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="fleet inventory the plan's lines are checked against (and, on the local backend, "
    "the line servers' resolution rule)",
)
@state_option
@tracking_option
@_with_backend_options
def start(
    model_name,
    version,
    plan_path,
    data_uri,
    all_waves,
    lines_config,
    state_uri,
    tracking_uri,
    backend,
    namespace_prefix,
    gitops_repo,
):
    """Roll VERSION of MODEL-NAME out along PLAN (wave 1 unless --all-waves)."""
    from components.rollout.plan import load_plan
    from components.rollout.registry import pin_version
    from cta_model.data.lines import load_lines_config

    plan = load_plan(plan_path, load_lines_config(lines_config) if lines_config else None)
    engine = _engine(
        state_uri,
        tracking_uri,
        data_uri,
        backend,
        namespace_prefix,
        gitops_repo,
        lines_config=lines_config,
    )
    model = pin_version(model_name, version, tracking_uri)
    record = engine.start(plan, model, plan_source=str(plan_path), all_waves=all_waves)
    _echo_status(engine.store, record["rollout_id"], as_json=False)


@rollout.command("status")
@state_option
@rollout_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status_command(state_uri, rollout_id, as_json):
    """Per line: what runs, since when, and which decision put it there."""
    from components.rollout.state import open_store

    _echo_status(open_store(state_uri), rollout_id, as_json)


@rollout.command("pause")
@state_option
@rollout_option
def pause(state_uri, rollout_id):
    """Stop the roll-out at its next safe point (between replayed samples)."""
    from components.rollout.engine import Engine, current_rollout_id
    from components.rollout.state import open_store

    store = open_store(state_uri)
    rollout_id = rollout_id or current_rollout_id(store)
    record = Engine(store, backend=None).pause(rollout_id)  # type: ignore[arg-type]
    click.echo(f"{rollout_id}: {record['status']} (paused)")


@rollout.command("resume")
@state_option
@rollout_option
@click.option("--all-waves", is_flag=True, help="run every remaining wave")
@click.option("--data", "data_uri", default=None, help="qa data [default: as recorded]")
@tracking_option
@_with_backend_options
def resume(
    state_uri, rollout_id, all_waves, data_uri, tracking_uri, backend, namespace_prefix, gitops_repo
):
    """Finish an interrupted wave, else run the next wave."""
    from components.rollout.engine import current_rollout_id
    from components.rollout.state import open_store

    store = open_store(state_uri)
    rollout_id = rollout_id or current_rollout_id(store)
    record = _record(store, rollout_id)
    engine = _engine(
        state_uri, tracking_uri, data_uri, None, namespace_prefix, gitops_repo, record=record
    )
    engine.resume(rollout_id, all_waves=all_waves)
    _echo_status(store, rollout_id, as_json=False)


@rollout.command("rollback")
@state_option
@rollout_option
@click.option("--line", "line_id", default=None, help="one line [default: every line]")
@tracking_option
@_with_backend_options
def rollback(state_uri, rollout_id, line_id, tracking_uri, backend, namespace_prefix, gitops_repo):
    """Put the previous version back on a line (or every line of the roll-out)."""
    from components.rollout.engine import current_rollout_id
    from components.rollout.state import open_store

    store = open_store(state_uri)
    rollout_id = rollout_id or current_rollout_id(store)
    record = _record(store, rollout_id)
    engine = _engine(
        state_uri, tracking_uri, None, None, namespace_prefix, gitops_repo, record=record
    )
    engine.rollback(rollout_id, line_id)
    _echo_status(store, rollout_id, as_json=False)


@rollout.command("stop-all")
@state_option
def stop_all_command(state_uri):
    """Stop every local line server recorded in the state (make demo-clean)."""
    from components.rollout.engine import stop_all
    from components.rollout.state import open_store

    stopped = stop_all(open_store(state_uri))
    click.echo(f"stopped {len(stopped)} line server(s): {' '.join(map(str, stopped)) or '-'}")


def _record(store, rollout_id: str) -> dict:
    from cta_model.errors import ConfigError

    current = store.read(f"rollouts/{rollout_id}.json")
    if current is None:
        raise ConfigError(f"--rollout {rollout_id!r}: no such roll-out in {store.uri}")
    return current.data
