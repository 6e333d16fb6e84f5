"""Serve one model over HTTP in this process until it is stopped: what `cta serve` runs.

Before the port is bound: the model folder is verified (SHA256SUMS and the folder digest against
``--sha256`` or the registered version's ``cta.model_sha256``; a bare folder without
``--sha256`` is served "unverified", logged and on /metrics), its model.yaml read, the line's
resolution rule checked (components/serve/inspection.py), the largest image derived from the
line's camera and the model's input, and the operating threshold found. The server then answers
/healthz at once and /readyz once the model is loaded in the background. A refused model or
set-up raises the CtaError of the check (exit 2); a load failure after the start, or a port that
could not be bound, raises :class:`ServerFailed`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from components.logs import configure_logging

#: The largest image a server takes, over the larger of the line camera's pixels and the
#: model's input pixels: a quarter of headroom for a camera mounted with a slightly larger
#: sensor or frame, and no more, since a pixel costs ~160 bytes in flight (limits.py).
IMAGE_PIXELS_FACTOR = 1.25
#: Without a fleet inventory to read cameras from (and no --max-pixels).
FALLBACK_MAX_PIXELS = 16_000_000


class ServerFailed(RuntimeError):
    """The server started but the model did not load, or it could not bind its port."""


def run(
    *,
    model_uri: str,
    port: int,
    host: str,
    expected_sha256: str | None,
    line_id: str | None,
    threshold: float | None,
    evaluation: Path | None,
    lines_config: Path | None,
    max_concurrency: int,
    tracking_uri: str | None,
    max_pixels: int | None,
    max_body_mb: int,
    header_timeout_s: float,
    body_timeout_s: float,
    max_reading_mb: int,
    max_decoded_mb: int,
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
    configure_logging()
    logging.getLogger("cta").setLevel(log_level.upper())
    # Before torch is imported: OpenMP reads these once, for every thread it starts.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(torch_threads)
    import uvicorn

    from components.registry.models import CACHE_ENV, fetch_model, is_registry_uri
    from components.serve.app import ServeApp, ServeSettings
    from components.serve.inspection import operating_threshold
    from components.serve.limits import header_deadline_protocol
    from cta_model.errors import ConfigError
    from cta_model.model_folder import read_model_card

    log = logging.getLogger("cta.serve")
    if model_cache is not None:
        os.environ[CACHE_ENV] = str(model_cache)
    if max_reading_mb < max_body_mb:
        raise ConfigError(
            f"--max-reading-mb {max_reading_mb} is below --max-body-mb {max_body_mb}: the "
            "largest body could never be read"
        )
    # Verified before anything is loaded: SHA256SUMS and the folder digest.
    fetched = fetch_model(model_uri, tracking_uri=tracking_uri, expected_sha256=expected_sha256)
    if expected_sha256:
        verification = "--sha256"
    elif is_registry_uri(model_uri):
        verification = "registration"  # fetch_model checked the version's cta.model_sha256
    else:
        verification = "unverified"
    folder = fetched.folder
    model = {
        "uri": model_uri,
        "name": fetched.name,
        "version": fetched.version,
        "sha256": fetched.sha256,
    }
    log.info(
        "serving model %s (name %s, version %s, sha256 %s, %s) on http://%s:%d",
        model_uri,
        model["name"],
        model["version"],
        model["sha256"],
        "unverified" if verification == "unverified" else f"verified against {verification}",
        host,
        port,
    )
    if verification == "unverified":
        log.warning(
            "model %s is unverified: only the folder's own SHA256SUMS was checked, which "
            "whoever changed the weights can recompute; pass --sha256 or serve a registered "
            "version",
            model_uri,
        )
    card = read_model_card(folder)
    resolution = _line_resolution(line_id, lines_config, card, log)
    if max_pixels is None:
        max_pixels = _image_pixel_limit(line_id, lines_config, card, log)
    operating = operating_threshold(
        threshold,
        fetched.name,
        fetched.version,
        line_id,
        tracking_uri,
        evaluation_file=evaluation,
        served_sha256=fetched.sha256,
    )
    if operating.value is None:
        log.warning(
            "no operating threshold (%s): /predict gives defect scores but no verdict "
            "(reject null); pass --threshold, or serve a registered version whose "
            "evaluation.json records one",
            operating.reason,
        )
    else:
        log.info(
            "operating threshold %g on the defect score (%s)", operating.value, operating.source
        )
    default_score = _default_score(card, log)

    def load():
        import torch

        from cta_model.inference import Predictor

        torch.set_num_threads(torch_threads)
        return Predictor.from_folder(folder, default_score=default_score)

    settings = ServeSettings(
        model=model,
        line=line_id,
        threshold=operating,
        resolution=resolution,
        max_concurrency=max_concurrency,
        inference_threads=inference_threads,
        max_pixels=max_pixels,
        max_body_bytes=max_body_mb * 1024 * 1024,
        body_timeout_s=body_timeout_s,
        max_reading_bytes=max_reading_mb * 1024 * 1024,
        max_decoded_bytes=max_decoded_mb * 1024 * 1024,
        verification=verification,
        stats_window_s=stats_window_s or None,
        stats_dir=stats_dir,
        debug_delay_s=debug_delay_ms / 1000.0,
    )
    app = ServeApp(settings, load)
    protocol = header_deadline_protocol(
        header_timeout_s, app.metrics.timeouts.labels(stage="headers").inc
    )
    config = uvicorn.Config(
        app.starlette,
        host=host,
        port=port,
        http=protocol,
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


def _line_resolution(line_id: str | None, lines_config: Path | None, card: Any, log: Any):
    """The line's 3-pixel rule, checked for its camera now (ConfigError naming the line); None
    without --line or for a line the fleet inventory does not list (nothing to check)."""
    from components.serve.inspection import LineResolution
    from cta_model.data.lines import load_lines_config

    if not line_id:
        return None
    lines = load_lines_config(lines_config)
    if line_id not in lines.ids:
        log.warning(
            "line %s is not in %s: its defect resolution is not checked",
            line_id,
            lines.source,
        )
        return None
    resolution = LineResolution(lines.get(line_id), card, str(lines.source))
    resolution.check_camera()
    return resolution


def _image_pixel_limit(line_id: str | None, lines_config: Path | None, card: Any, log: Any) -> int:
    """IMAGE_PIXELS_FACTOR x the larger of the camera's and the model input's pixels: the
    camera of ``line_id``, else the largest camera of the fleet inventory."""
    from cta_model.data.lines import load_lines_config
    from cta_model.errors import CtaError

    try:
        lines = load_lines_config(lines_config)
    except (CtaError, OSError) as exc:
        log.warning(
            "no fleet inventory to size images by (%s): largest image %d pixels",
            exc,
            FALLBACK_MAX_PIXELS,
        )
        return FALLBACK_MAX_PIXELS
    if line_id in lines.ids:
        cameras = [lines.get(line_id)]
        whose = f"line {line_id}'s camera"
    else:
        cameras = list(lines.lines)
        whose = f"the largest camera of {lines.source}"
    camera = max(cameras, key=lambda line: line.resolution[0] * line.resolution[1])
    height, width = card.spec.input_size
    base = max(camera.resolution[0] * camera.resolution[1], height * width)
    limit = math.ceil(IMAGE_PIXELS_FACTOR * base)
    log.info(
        "largest image: %d pixels (%g x the larger of %s, %dx%d, and the model input, %dx%d; "
        "--max-pixels to change)",
        limit,
        IMAGE_PIXELS_FACTOR,
        whose,
        camera.resolution[0],
        camera.resolution[1],
        height,
        width,
    )
    return limit


def _default_score(card: Any, log: Any):
    """configs/inspection.yaml's score definition, for a folder whose model.yaml names no
    reject classes of its own; None when those ids are not classes of this model."""
    from cta_model.inspection import ScoreDefinition, load_inspection_config
    from cta_model.tasks import task_of_kind

    if card.inspection is not None or task_of_kind("classes", card.spec.tasks) is None:
        return None
    config = load_inspection_config()
    classes = card.spec.num_classes or 0
    if not all(c < classes for c in config.reject_classes):
        log.warning(
            "the model folder names no reject classes and configs/inspection.yaml's %s are "
            "not classes of this %d-class model: no defect score",
            list(config.reject_classes),
            classes,
        )
        return None
    log.info(
        "the model folder names no reject classes: configs/inspection.yaml's %s apply",
        list(config.reject_classes),
    )
    return ScoreDefinition(tuple(config.reject_classes), config.score_window_px)
