"""`cta validate-data`: flag parsing only; calls components.validate_data.step.run()."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cta_cli.options import lines_config_option


@click.command("validate-data")
@click.argument("data")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@lines_config_option()
@click.option(
    "--quarantine",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="sample ids to exclude knowingly: one per line (# comments) or a JSON list",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="processes that read samples",
)
def validate_data(data, out_dir, lines_config, quarantine, workers):
    """Validate the line dataset DATA (folder or s3:// prefix); write report and dataset_ref.

    Exit 0 when every expectation holds, 1 when validation fails (bad samples and failed
    expectations on stderr), 2 for unusable input (no manifest, unknown quarantined id, ...).
    """
    from components.validate_data.step import REPORT_NAME, ValidationFailed, run

    try:
        dataset_ref = run(
            data,
            str(out_dir),
            lines_config=str(lines_config) if lines_config else None,
            quarantine=str(quarantine) if quarantine else None,
            workers=workers,
        )
    except ValidationFailed as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    quarantined = len(dataset_ref["quarantine"])
    note = f" ({quarantined} sample(s) quarantined)" if quarantined else ""
    click.echo(f"data validation passed{note}: {dataset_ref['uri']}")
    click.echo(f"report: {out_dir / REPORT_NAME}")
