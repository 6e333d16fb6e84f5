"""`cta serve` (also ``python -m cta_cli serve``, what start_server launches): flag parsing
only; calls components.serve.server.run(), which verifies the model folder's sha256, checks the
line's defect resolution, finds the operating threshold, then serves it over HTTP until
stopped."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from cta_cli.options import lines_config_option

LOG_LEVELS = ("debug", "info", "warning", "error")
# Exit status when the model fails to load after the server started (2: refused before).
EXIT_LOAD_FAILED = 3


@click.command("serve")
@click.option("--model", "model_uri", required=True, help="model folder, models:/NAME/V or @alias")
@click.option("--port", required=True, type=click.IntRange(0, 65535))
@click.option("--host", default="127.0.0.1", show_default=True, help="bind address")
@click.option("--sha256", "expected_sha256", default=None, help="expected folder sha256")
@click.option("--line", "line_id", default=None, help="production line this server is for")
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="operating threshold on the defect score: reject when score >= it [default: for a "
    "registered version, the one its evaluation.json records for --line, else overall; none: "
    "scores without a verdict]",
)
@click.option(
    "--evaluation",
    "evaluation",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="evaluation.json of THIS model (`cta evaluate`): its threshold for --line, else its "
    "overall one (for a model folder; a registered version carries its own)",
)
@lines_config_option(
    help="fleet inventory whose --line entry sets the resolution rule [default: "
    "$CTA_LINES_CONFIG, else configs/lines.yaml]"
)
@click.option("--max-concurrency", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--tracking-uri", default=None, help="MLflow URI for models:/ (default: env)")
@click.option(
    "--max-pixels",
    default=None,
    type=click.IntRange(min=1),
    help="largest image (H x W; a part's views in all) accepted, checked from its header "
    "[default: 1.25 x the larger of the --line camera's pixels (else the inventory's largest "
    "camera) and the model input's]",
)
@click.option("--max-body-mb", default=128, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--header-timeout-s",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="a request's headers must be complete this long after its connection or first byte "
    "(else 408, connection closed)",
)
@click.option(
    "--body-timeout-s",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="a /predict body must be complete this long after its headers (else 408, closed)",
)
@click.option(
    "--max-reading-mb",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="bytes of all /predict bodies being read at once (503 above it); >= --max-body-mb",
)
@click.option(
    "--max-decoded-mb",
    default=2048,
    show_default=True,
    type=click.IntRange(min=1),
    help="decoded images and their forward passes in flight, at ~160 bytes per pixel (a "
    "request waits for room; 413 for an image that could never fit)",
)
@click.option(
    "--stats-window-s",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="serving-statistics window, seconds (0: statistics off)",
)
@click.option(
    "--stats-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="write each window's per-image statistics here (JSON lines)",
)
@click.option("--model-cache", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option(
    "--torch-threads",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="intra-op threads per forward pass",
)
@click.option(
    "--inference-threads",
    default=min(4, os.cpu_count() or 1),
    show_default="min(4, cores)",
    type=click.IntRange(min=1),
    help="forward passes run at once",
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
@click.option("--debug-delay-ms", default=0, type=click.IntRange(min=0), hidden=True)
def serve(**options):
    """Serve one model over HTTP: /healthz, /readyz, /predict, /metrics, /stats."""
    from components.serve.server import ServerFailed, run

    try:
        run(**options)
    except ServerFailed as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_LOAD_FAILED)
