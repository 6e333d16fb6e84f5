"""The click command ``cta serve`` (registered in components/cli.py; also ``python -m
components.serve``). It verifies the model folder's sha256, then starts the HTTP server, which
answers /healthz at once and /readyz once the model is loaded."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from cta_model.errors import CtaError

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
    "--threshold-px",
    type=click.IntRange(min=1),
    default=None,
    help="reject-area threshold (default: configs/inspection.yaml min_area_px)",
)
@click.option("--max-concurrency", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--tracking-uri", default=None, help="MLflow URI for models:/ (default: env)")
@click.option(
    "--max-pixels",
    default=16_000_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="largest image (H x W) accepted; a forward pass needs ~50 bytes per pixel",
)
@click.option("--max-body-mb", default=128, show_default=True, type=click.IntRange(min=1))
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
    # The chosen level applies to cta's own loggers; libraries stay at INFO (PIL and others
    # log every chunk at DEBUG).
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("cta").setLevel(options["log_level"].upper())
    # Before torch is imported: OpenMP reads these once, for every thread it starts.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(options["torch_threads"])
    try:
        _serve(**options)
    except CtaError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def _serve(
    *,
    model_uri: str,
    port: int,
    host: str,
    expected_sha256: str | None,
    line_id: str | None,
    threshold_px: int | None,
    max_concurrency: int,
    tracking_uri: str | None,
    max_pixels: int,
    max_body_mb: int,
    stats_window_s: float,
    stats_dir: Path | None,
    model_cache: Path | None,
    torch_threads: int,
    inference_threads: int,
    log_level: str,
    debug_delay_ms: int,
) -> None:
    import uvicorn

    from components.registry.models import CACHE_ENV, fetch_model
    from components.serve.app import ServeApp, ServeSettings
    from cta_model.inspection import load_inspection_config

    log = logging.getLogger("cta.serve")
    if model_cache is not None:
        os.environ[CACHE_ENV] = str(model_cache)
    inspection = load_inspection_config()
    # Verified before anything is loaded: SHA256SUMS and the folder digest.
    fetched = fetch_model(model_uri, tracking_uri=tracking_uri, expected_sha256=expected_sha256)
    folder = fetched.folder
    model = {
        "uri": model_uri,
        "name": fetched.name,
        "version": fetched.version,
        "sha256": fetched.sha256,
    }
    log.info(
        "serving model %s (name %s, version %s, sha256 %s, verified) on http://%s:%d",
        model_uri,
        model["name"],
        model["version"],
        model["sha256"],
        host,
        port,
    )

    def load():
        import torch

        from cta_model.inference import Predictor

        torch.set_num_threads(torch_threads)
        return Predictor.from_folder(folder)

    settings = ServeSettings(
        model=model,
        line=line_id,
        threshold_px=threshold_px or inspection.min_area_px,
        reject_classes=tuple(inspection.reject_classes),
        max_concurrency=max_concurrency,
        inference_threads=inference_threads,
        max_pixels=max_pixels,
        max_body_bytes=max_body_mb * 1024 * 1024,
        stats_window_s=stats_window_s or None,
        stats_dir=stats_dir,
        debug_delay_s=debug_delay_ms / 1000.0,
    )
    app = ServeApp(settings, load)
    config = uvicorn.Config(
        app.starlette,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    failures = []

    def stop_on_failure(exc: BaseException) -> None:
        failures.append(exc)
        server.should_exit = True

    app.on_load_failure = stop_on_failure
    server.run()
    if failures:
        click.echo(f"error: model {model_uri} failed to load: {failures[0]}", err=True)
        sys.exit(EXIT_LOAD_FAILED)
    if not server.started:
        click.echo(f"error: could not serve on {host}:{port} (see the log above)", err=True)
        sys.exit(EXIT_LOAD_FAILED)
