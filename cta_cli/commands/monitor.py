"""`cta monitor`: drift report for one line (components.monitor.step.run()), optionally with
QA agreement replayed through the line's server; notifies and can fail on drift."""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.command("monitor")
@click.option("--line", "line_id", required=True, help="line id from configs/lines.yaml")
@click.option(
    "--stats-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="the line servers' --stats-dir",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", "model_uri", help="model folder or models:/ URI (default: what it runs)")
@click.option("--tracking-uri", default=None, help="MLflow URI for models:/ (default $MLFLOW_...)")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--lines-config", type=click.Path(exists=True, dir_okay=False))
@click.option("--since-minutes", type=click.FloatRange(min=0), help="only this recent window")
@click.option("--qa-server", help="URL of the line's server: replay its qa split for agreement")
@click.option("--qa-data", help="line dataset holding the qa split (with --qa-server)")
@click.option("--fail-on-drift", is_flag=True, help="exit 5 when the line drifted")
def monitor(
    line_id,
    stats_dir,
    out_dir,
    model_uri,
    tracking_uri,
    config_path,
    lines_config,
    since_minutes,
    qa_server,
    qa_data,
    fail_on_drift,
):
    """Has LINE drifted from the images its model was trained on? Writes monitor.json/.html."""
    from components.monitor.step import MONITOR_HTML, run
    from components.notify import notify

    if bool(qa_server) != bool(qa_data):
        raise click.UsageError("--qa-server and --qa-data go together")
    qa = None
    if qa_server:
        from components.monitor.replay import replay_qa

        qa = replay_qa(qa_server, qa_data, line_id)
    since = time.time() - since_minutes * 60 if since_minutes is not None else None
    report = run(
        line_id,
        stats_dir,
        out_dir,
        model_uri=model_uri,
        tracking_uri=tracking_uri,
        config_path=config_path,
        lines_config=lines_config,
        since_unix=since,
        qa=qa,
    )
    click.echo(report["summary"])
    click.echo(f"report: {Path(out_dir).resolve() / MONITOR_HTML}")
    if report["drifted"]:
        notify(
            "drift", {"line_id": line_id, "moved": report["moved"], "summary": report["summary"]}
        )
        if fail_on_drift:
            raise SystemExit(5)
