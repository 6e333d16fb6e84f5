"""`cta data ...`: datasets (generate the synthetic line dataset)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("data")
def data() -> None:
    """Datasets: generate the synthetic line dataset."""


@data.command("generate")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--lines", "n_lines", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--samples-per-line", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--size", default=128, show_default=True, type=click.IntRange(min=16))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--lines-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="fleet inventory (default: $CTA_LINES_CONFIG, else configs/lines.yaml)",
)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--overwrite", is_flag=True, help="replace an existing dataset in --out")
@click.option(
    "--line-samples",
    "line_samples",
    multiple=True,
    metavar="LINE=N",
    help="samples of one line instead of --samples-per-line (repeatable)",
)
@click.option(
    "--splits",
    default="0.6,0.15,0.15,0.1",
    show_default=True,
    help="fractions of train,val,test,qa (each line's defective samples spread alike)",
)
def data_generate(
    out_dir,
    n_lines,
    samples_per_line,
    size,
    seed,
    lines_config,
    workers,
    overwrite,
    line_samples,
    splits,
):
    """Write the synthetic line dataset (train/val/test/qa) for the first N lines."""
    from cta_model.data.synthetic_dataset import generate_dataset

    per_line = {}
    for item in line_samples:
        line_id, sep, count = item.partition("=")
        if not sep or not count.isdigit():
            raise click.BadParameter(f"{item!r}: expected LINE=N", param_hint="--line-samples")
        per_line[line_id] = int(count)
    try:
        fractions = tuple(float(v) for v in splits.split(","))
    except ValueError:
        raise click.BadParameter(f"{splits!r}: four numbers", param_hint="--splits") from None
    root = generate_dataset(
        out_dir,
        lines_config,
        n_lines=n_lines,
        samples_per_line=samples_per_line,
        height=size,
        width=size,
        seed=seed,
        workers=workers,
        overwrite=overwrite,
        line_samples=per_line,
        splits=fractions,
    )
    click.echo(f"wrote the synthetic dataset of {n_lines} line(s) to {root}")
