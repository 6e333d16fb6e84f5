"""`cta data ...`: datasets (generate the synthetic line dataset, import a benchmark)."""

from __future__ import annotations

from pathlib import Path

import click

from cta_cli.options import lines_config_option


@click.group("data")
def data() -> None:
    """Datasets: generate the synthetic line dataset, import a benchmark."""


@data.command("generate")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--lines", "n_lines", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--samples-per-line", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--size", default=128, show_default=True, type=click.IntRange(min=16))
@click.option("--seed", default=0, show_default=True, type=int)
@lines_config_option()
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


@data.command("import")
@click.argument("format_name", metavar="FORMAT", type=click.Choice(["mvtec-ad", "mvtec-3d-ad"]))
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option(
    "--category",
    "categories",
    multiple=True,
    help="category folder to import (repeat for several; default: every category in SRC)",
)
@click.option(
    "--val-fraction",
    default=0.3,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="share of each defect type's test images (and of test/good) that becomes val",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--overwrite", is_flag=True, help="replace an existing dataset in --out")
def data_import(format_name, src, out_dir, categories, val_fraction, seed, overwrite):
    """Write the benchmark folder SRC in FORMAT (mvtec-ad or mvtec-3d-ad) as one line dataset
    in --out: one line per category, val carved from test/ stratified by defect type, the
    dataset's own class names, and lines.yaml listing the categories as lines."""
    from cta_model.data.importers import import_mvtec
    from cta_model.data.line_dataset import SPLITS

    summary = import_mvtec(
        format_name,
        src,
        out_dir,
        categories=categories or None,
        val_fraction=val_fraction,
        seed=seed,
        overwrite=overwrite,
    )
    splits = ", ".join(
        f"{split} {summary.split_counts[split]}"
        for split in SPLITS
        if split in summary.split_counts
    )
    click.echo(
        f"wrote {summary.n_samples} samples ({splits}) of {len(summary.lines)} line(s) "
        f"({', '.join(summary.lines.values())}) to {summary.root}"
    )
    click.echo(f"classes: {', '.join(summary.class_names)} (reject: every class but good)")
    click.echo(f"lines inventory: {summary.lines_path}")
    if summary.empty_defect_masks:
        click.echo(
            f"warning: {len(summary.empty_defect_masks)} defect image(s) with an empty mask count "
            f"as good: {', '.join(summary.empty_defect_masks[:10])}",
            err=True,
        )
    click.echo(
        "the train split is good-only: train with data.anomalies (synthetic defects) on; "
        f"next: cta validate-data {summary.root} --out <dir>"
    )
