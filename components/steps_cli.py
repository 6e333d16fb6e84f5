"""`cta evaluate` and `cta register-model`: flag parsing only, each calls its step's run().

Added to the `cta` group by components/cli.py (``main.add_command(evaluate)`` and
``main.add_command(register_model)``). Each prints a one-line summary, then the result as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


def _echo_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


@click.command("evaluate")
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="model folder (its SHA256SUMS is verified)",
)
@click.option(
    "--data", "data_uri", required=True, help="dataset folder, s3:// prefix or dataset_ref.json"
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--split",
    default="test",
    show_default=True,
    type=click.Choice(["train", "val", "test", "qa"]),
)
@click.option("--model-id", default=None, help="MLflow LoggedModel id (m-...) of the folder")
@click.option("--model-name", default=None, help="registered model name, if known")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--lines-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="fleet inventory (default: configs/lines.yaml)",
)
@click.option(
    "--miou-rule",
    default="nanmean_union",
    show_default=True,
    type=click.Choice(["nanmean_union", "strict", "zero_union_as_0"]),
)
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    help="MLflow URI for the STL baselines and the champion (default $MLFLOW_TRACKING_URI; "
    "looked up only with --model-name)",
)
@click.option(
    "--inspection-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="reject classes and target recall (default: configs/inspection.yaml)",
)
@click.option("--bootstrap-n", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--bootstrap-seed", default=0, show_default=True, type=int)
@click.option("--latency-repeats", default=5, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--boundary-px",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="pixels this close to a label boundary count as 'near a boundary'",
)
@click.option(
    "--explain/--no-explain",
    default=True,
    show_default=True,
    help="write affinity-map images (CTAL models)",
)
def evaluate(
    model_dir,
    data_uri,
    out_dir,
    split,
    model_id,
    model_name,
    batch_size,
    lines_config,
    miou_rule,
    tracking_uri,
    inspection_config,
    bootstrap_n,
    bootstrap_seed,
    latency_repeats,
    boundary_px,
    explain,
):
    """Score a model folder on one split per line and overall; write evaluation.json."""
    from components.evaluate.step import EVALUATION_NAME, run

    result = run(
        str(model_dir),
        data_uri,
        str(out_dir),
        split=split,
        model_name=model_name,
        model_id=model_id,
        batch_size=batch_size,
        lines_config=str(lines_config) if lines_config else None,
        miou_rule=miou_rule,
        tracking_uri=tracking_uri,
        inspection_config=str(inspection_config) if inspection_config else None,
        bootstrap_n=bootstrap_n,
        bootstrap_seed=bootstrap_seed,
        latency_repeats=latency_repeats,
        boundary_px=boundary_px,
        explain=explain,
    )
    overall = result["overall"]
    click.echo(
        f"evaluated {overall['n_images']} {split} image(s) on {len(result['per_line'])} line(s): "
        f"{out_dir / EVALUATION_NAME}"
    )
    _echo_json(result)


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
    _echo_json(result)


__all__ = ["evaluate", "register_model"]
