"""`cta retrain`: run the training pipeline on the newest data unless it is the champion's.

The decision is components.retrain.step.decide(); starting the pipeline (kfp.local or a KFP
server) happens here, above pipelines/. Prints the decision as JSON; exit 0 whether it ran or
skipped (a skip is not an error).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click


@click.command("retrain")
@click.option("--data", "data_uri", required=True, help="newest line dataset (folder or s3://)")
@click.option("--model-name", default="cta-inspection", show_default=True)
@click.option("--tracking-uri", required=True, help="MLflow URI holding the registry")
@click.option(
    "--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), help="run folder")
@click.option("--local", "local", is_flag=True, help="run the pipeline here through kfp.local")
@click.option("--host", default=None, help="submit to this Kubeflow Pipelines endpoint instead")
@click.option("--force", is_flag=True, help="run even when the data is the champion's")
@click.option(
    "--drift-report",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="a `cta monitor` report: run only if it flagged drift",
)
@click.option(
    "--gate-policy",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="gate policy YAML [default: configs/gate.yaml]",
)
@click.option(
    "--rollout-plan",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="roll-out plan YAML [default: configs/rollout-plan.yaml]",
)
@click.option("--dry-run", is_flag=True, help="decide and print, run nothing")
def retrain(
    data_uri,
    model_name,
    tracking_uri,
    config_path,
    work_dir,
    local,
    host,
    force,
    drift_report,
    gate_policy,
    rollout_plan,
    dry_run,
):
    """Retrain on the newest data; skip (saying why) when its hash equals the champion's."""
    from components.notify import notify
    from components.retrain.step import decide

    decision = decide(data_uri, model_name, tracking_uri, force=force, drift_report=drift_report)
    click.echo(f"retrain: {decision['action']} ({decision['reason']})")
    if decision["action"] == "run" and not dry_run:
        if local == bool(host):
            raise click.UsageError("give exactly one of --local or --host")
        if config_path is None:
            raise click.UsageError("--config is required to run the pipeline")
        if work_dir is None and local:
            raise click.UsageError("--work-dir is required to run the pipeline locally")
        started = _start_pipeline(
            data_uri,
            model_name,
            tracking_uri,
            config_path,
            work_dir,
            host=None if local else host,
            gate_policy=gate_policy,
            rollout_plan=rollout_plan,
        )
        decision.update(started)
        notify("retrain", {"model_name": model_name, **decision})
    click.echo(json.dumps(decision, indent=2))


def _start_pipeline(
    data_uri, model_name, tracking_uri, config_path, work_dir, *, host, gate_policy, rollout_plan
) -> dict:
    """Run the training pipeline here through kfp.local (host None) or submit it to the KFP
    server at host; returns {"run_dir": ...} or {"run_id": ...} for the decision."""
    from pipelines.run import DEFAULT_GATE_POLICY, DEFAULT_ROLLOUT_PLAN

    policy = gate_policy or DEFAULT_GATE_POLICY
    plan = rollout_plan or DEFAULT_ROLLOUT_PLAN
    if host is None:
        from pipelines.run import run_local

        result = run_local(
            data_uri,
            work_dir,
            config_path,
            tracking_uri,
            model_name=model_name,
            gate_policy=policy,
            rollout_plan=plan,
        )
        return {"run_dir": result["run_dir"]}
    from pipelines.remote import submit_run

    # On a cluster every path is as the pipeline's pods see it (docs/cluster.md).
    params = {
        "data_uri": data_uri,
        "config_path": str(config_path),
        "tracking_uri": tracking_uri,
        "model_name": model_name,
        "gate_policy": str(policy),
        "rollout_plan": str(plan),
        "rollout_state": os.environ.get("CTA_ROLLOUT_STATE")
        or (f"{work_dir}/rollout" if work_dir else ""),
    }
    return {"run_id": submit_run(host, params)["run_id"]}
