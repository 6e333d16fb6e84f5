"""`cta model-card`: render a registered version's card (components.model_card.card.run()),
attach it, optionally save a copy."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("model-card")
@click.option("--model-name", required=True, help="registered model name")
@click.option("--version", required=True, help="registered version")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="also write the Markdown here (default: print it)",
)
@click.option("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI)")
def model_card(model_name, version, out, tracking_uri):
    """Render the model card of a version from the registry and attach it as model_card.md."""
    from components.model_card.card import run

    result = run(model_name, version, tracking_uri=tracking_uri, out=out)
    if out is None:
        click.echo(result["text"])
    click.echo(f"model card attached: {result['uri']}" + (f", written to {out}" if out else ""))
