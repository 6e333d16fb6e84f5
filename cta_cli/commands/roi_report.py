"""`cta roi-report`: flag parsing only, calls components.roi_report.step.run()."""

from __future__ import annotations

from pathlib import Path

import click

from cta_cli.options import lines_config_option


@click.command("roi-report")
@click.option(
    "--evaluation",
    "evaluation",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="evaluation.json written by cta evaluate",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--roi-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="ROI inputs (default: configs/roi.yaml)",
)
@lines_config_option()
@click.option(
    "--model-version",
    default=None,
    help="registry version of the model, for the report's title (default: evaluation.json's; "
    "unregistered when it has none)",
)
def roi_report(evaluation, out_dir, roi_config, lines_config, model_version):
    """Price an evaluated model per line and for the fleet; write roi.json, report.html and
    report.md."""
    from components.roi_report.step import HTML_NAME, ROI_NAME, run

    roi = run(
        evaluation,
        out_dir,
        roi_config=roi_config,
        lines_config=lines_config,
        model_version=model_version,
    )
    pilot = roi["pilot"]
    click.echo(
        f"pilot {roi['pilot_line']}: payback {pilot['payback_label']}, "
        f"NPV {roi['currency']} {pilot['npv']:,.0f}; "
        f"wrote {out_dir / ROI_NAME} and {out_dir / HTML_NAME}"
    )
