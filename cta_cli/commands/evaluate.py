"""`cta evaluate`: flag parsing only; calls components.evaluate.step.run() and prints a
one-line summary, then the result as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cta_cli.options import lines_config_option


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
@lines_config_option()
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
    help="target recall and min_score of the operating threshold; reject classes and score "
    "window for model folders that do not record their own (default: configs/inspection.yaml)",
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
    "--max-pixels",
    default=1 << 25,
    show_default=True,
    type=click.IntRange(min=1),
    help="pixels kept per line for pixel AUROC / AUPRO (4 bytes each, ~60 while computing); "
    "over it those figures are null with a warning",
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
    max_pixels,
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
        max_pixels=max_pixels,
    )
    overall = result["overall"]
    click.echo(
        f"evaluated {overall['n_images']} {split} image(s) on {len(result['per_line'])} line(s): "
        f"{out_dir / EVALUATION_NAME}"
    )
    click.echo(json.dumps(result, indent=2))
