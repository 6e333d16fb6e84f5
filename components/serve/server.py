"""Serve one model over HTTP in this process until it is stopped: what `cta serve` runs.

The model folder is verified (SHA256SUMS and the folder digest) before anything loads; the
server answers /healthz at once and /readyz once the model is loaded in the background. A
refused model raises the CtaError of the check; a load failure after the start, or a port that
could not be bound, raises :class:`ServerFailed`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path


class ServerFailed(RuntimeError):
    """The server started but the model did not load, or it could not bind its port."""


def run(
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
    """Serve until SIGTERM or SIGINT (uvicorn drains requests in flight); the arguments are
    `cta serve`'s flags (cta_cli/commands/serve.py holds their defaults and help)."""
    # The chosen level applies to cta's own loggers; libraries stay at INFO (PIL and others
    # log every chunk at DEBUG).
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("cta").setLevel(log_level.upper())
    # Before torch is imported: OpenMP reads these once, for every thread it starts.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(torch_threads)
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
        raise ServerFailed(f"model {model_uri} failed to load: {failures[0]}")
    if not server.started:
        raise ServerFailed(f"could not serve on {host}:{port} (see the log above)")
