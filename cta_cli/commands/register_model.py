"""`cta register-model`: flag parsing only; calls components.register_model.step.run() and
prints a one-line summary, then the result as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("register-model")
@click.option("--model-id", required=True, help="MLflow LoggedModel id (m-...)")
@click.option("--name", "model_name", required=True, help="registered model name")
@click.option(
    "--evaluation",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="evaluation.json to attach",
)
@click.option(
    "--dataset-ref",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="dataset_ref.json to attach",
)
@click.option(
    "--roi",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="roi.json to attach",
)
@click.option("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI)")
def register_model(model_id, model_name, evaluation, dataset_ref, roi, tracking_uri):
    """Register a LoggedModel, set alias challenger, tag cta.registration=complete last."""
    from components.register_model.step import run

    result = run(
        model_id,
        model_name,
        evaluation=str(evaluation) if evaluation else None,
        dataset_ref=str(dataset_ref) if dataset_ref else None,
        tracking_uri=tracking_uri,
        roi=str(roi) if roi else None,
    )
    verb = "registered" if result["created"] else "completed existing"
    click.echo(
        f"{verb} {result['name']} version {result['version']} ({model_id}), alias {result['alias']}"
    )
    click.echo(json.dumps(result, indent=2))
