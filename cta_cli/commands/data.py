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
    help="fleet inventory (default: configs/lines.yaml)",
)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--overwrite", is_flag=True, help="replace an existing dataset in --out")
def data_generate(out_dir, n_lines, samples_per_line, size, seed, lines_config, workers, overwrite):
    """Write the synthetic line dataset (train/val/test/qa) for the first N lines."""
    from cta_model.data.synthetic_dataset import generate_dataset

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
    )
    click.echo(f"wrote {n_lines * samples_per_line} samples to {root}")
