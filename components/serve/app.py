"""The `cta serve` HTTP application (Starlette on uvicorn): /healthz, /readyz, /predict,
/metrics, /stats. See README.md for the API; the contract is in the helpers' contracts.

Concurrency: the event loop reads each /predict body within ``body_timeout_s``, the bodies
being read holding at most ``max_reading_bytes`` together (components/serve/limits.py); only
then does the request count as in flight: above ``max_concurrency`` it is answered 503 with
Retry-After at once (no queue builds up), so clients still sending their bodies never take a
slot. Decoding and inference run in worker threads: each image's decoded bytes are reserved
from ``max_decoded_bytes`` (its size read from its header) before it is decoded; at most
``inference_threads`` forward passes run at once, each with the CLI's ``--torch-threads``
intra-op threads (default 1: measured on a loaded 2-core machine, two intra-op threads made
one 32x32 pass 12x slower than one; passes in parallel threads use the
cores instead, since torch releases the GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from components.serve.decode import BadInput, decode_views, header_pixels
from components.serve.inspection import LineResolution, OperatingThreshold
from components.serve.limits import BodyReading, DecodedBudget
from components.serve.stats import (
    AGGREGATES,
    WindowedStats,
    image_statistics,
    now_fields,
    prediction_statistics,
)
from cta_model.errors import ConfigError, DataError
from cta_model.inspection import is_reject
from cta_model.tasks import TASKS, task_of_kind

log = logging.getLogger("cta.serve")

NPZ = "application/x-npz"
RETRY_AFTER_S = "1"
# No *_created series: they double every counter's lines and no consumer reads them.
disable_created_metrics()
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Defect scores are in [0, 1]; finer near 0, where most good parts score.
SCORE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


@dataclass
class ServeSettings:
    model: dict[str, str | None]  # {uri, name, version, sha256}
    line: str | None
    threshold: OperatingThreshold
    # The line's 3-pixel rule; None without --line or for a line outside the fleet inventory.
    resolution: LineResolution | None = None
    max_concurrency: int = 8
    inference_threads: int = 1
    # Largest image (and part) in pixels: server.py derives it from the line's camera.
    max_pixels: int = 16_000_000
    max_body_bytes: int = 128 * 1024 * 1024
    # Slow clients: a body must be complete this long after its headers; the bodies being
    # read at once hold at most max_reading_bytes (components/serve/limits.py).
    body_timeout_s: float = 30.0
    max_reading_bytes: int = 256 * 1024 * 1024
    # Decoded images and their forward passes in flight, bytes (limits.BYTES_PER_PIXEL each).
    max_decoded_bytes: int = 2048 * 1024 * 1024
    # What the weights were verified against: "registration" (the registered version's
    # cta.model_sha256), "--sha256", or "unverified" (a folder's own SHA256SUMS only).
    verification: str = "unverified"
    # Serving statistics: window length (None: off) and where window snapshots go.
    stats_window_s: float | None = 60.0
    stats_dir: Path | None = None
    # Test aid (hidden CLI flag): hold each /predict this long so saturation is reproducible.
    debug_delay_s: float = 0.0


@dataclass
class _Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "cta_requests", "/predict responses by HTTP status", ["code"], registry=r
        )
        self.latency = Histogram(
            "cta_request_latency_seconds",
            "/predict latency (body read to response), seconds",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "cta_inflight_requests", "/predict requests in flight (body complete)", registry=r
        )
        self.reading = Gauge(
            "cta_reading_requests", "/predict requests whose body is being read", registry=r
        )
        self.reading_bytes = Gauge(
            "cta_reading_bytes", "bytes held by /predict bodies being read", registry=r
        )
        self.decoded_bytes = Gauge(
            "cta_decoded_bytes",
            "bytes reserved by decoded images and their forward passes in flight",
            registry=r,
        )
        self.timeouts = Counter(
            "cta_request_timeouts",
            "connections answered 408 because the headers or the body came too slowly",
            ["stage"],
            registry=r,
        )
        self.verified = Gauge(
            "cta_model_verified",
            "1 when the weights were verified against a recorded sha256 (against: "
            "registration or --sha256); 0 with against=unverified",
            ["against"],
            registry=r,
        )
        self.rejects = Counter("cta_rejects", "images judged defective (reject)", registry=r)
        self.scores = Histogram(
            "cta_defect_score",
            "defect score of each served image (cta_model.inspection)",
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.threshold = Gauge(
            "cta_defect_threshold",
            "operating threshold on the defect score (NaN: none, no verdict) and its source",
            ["source"],
            registry=r,
        )
        self.info = Gauge(
            "cta_model_info", "the served model", ["name", "version", "sha256", "line"], registry=r
        )
        self.window_images = Gauge(
            "cta_stats_window_images", "images in the last completed stats window", registry=r
        )
        self.window_end = Gauge(
            "cta_stats_window_end_timestamp_seconds",
            "when the last completed stats window ended (unix time)",
            registry=r,
        )
        self.window_stat = Gauge(
            "cta_stats_window",
            "per-image statistic aggregated over the last completed stats window",
            ["stat", "agg"],
            registry=r,
        )

    def publish_window(self, summary: dict[str, Any]) -> None:
        self.window_images.set(summary["n_images"])
        self.window_end.set(summary["window_end_unix"])
        self.window_stat.clear()
        for stat, values in summary["stats"].items():
            for agg in AGGREGATES:
                self.window_stat.labels(stat=stat, agg=agg).set(values[agg])


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


def _class_names(predictor: Any) -> list[str]:
    names = list(predictor.card.class_names)
    count = predictor.card.spec.num_classes or 0
    return names if len(names) == count else [f"class_{i}" for i in range(count)]


@dataclass(frozen=True)
class DefectRule:
    """How the served model judges an image: its own score definition (reject classes and
    window: the model's, the inspection config's only for older folders) and the operating
    threshold. ``no_score`` says why there is no score (no class task), else None."""

    threshold: OperatingThreshold
    reject_class_ids: tuple[int, ...]
    reject_classes: tuple[str, ...]
    window_px: int | None
    no_score: str | None = None

    @classmethod
    def of(cls, predictor: Any, class_names: list[str], threshold: OperatingThreshold):
        score = predictor.score
        if score is None:
            reason = (
                "the model has no class task to score defects on"
                if predictor.class_task is None
                else "the model names no reject classes (model.yaml inspection) and the "
                "defaults of configs/inspection.yaml are not classes of it"
            )
            return cls(threshold, (), (), None, reason)
        names = tuple(
            class_names[c] if c < len(class_names) else f"class_{c}" for c in score.reject_classes
        )
        return cls(threshold, tuple(score.reject_classes), names, score.score_window_px)

    def describe(self) -> dict[str, Any]:
        """The verdict's definition (/readyz, and part of every ``defect``)."""
        reason = self.no_score
        if reason is None and self.threshold.value is None:
            reason = f"no operating threshold: {self.threshold.reason}"
        return {
            "threshold": self.threshold.value,
            "threshold_source": self.threshold.source,
            "reject_classes": list(self.reject_classes),
            "reject_class_ids": list(self.reject_class_ids),
            "window_px": self.window_px,
            "reason": reason,
        }

    def judge(self, score: float | None) -> dict[str, Any]:
        """The JSON ``defect`` of one image (or of a part, with its largest view score)."""
        reject = None
        if score is not None and self.threshold.value is not None:
            reject = bool(is_reject(score, self.threshold.value))
        return {"score": score, "reject": reject, **self.describe()}


def summarise(
    prediction: Mapping[str, np.ndarray], class_names: list[str], defect: dict[str, Any]
) -> dict[str, Any]:
    """The JSON body's defect verdict (``DefectRule.judge``), per-task summaries
    (``TaskSpec.summarize``, in registry order) and region dimensions of one image; the
    dimensions read the ``classes`` task's regions and their ``surface_height``."""
    tasks = {
        name: spec.summarize(prediction[name], class_names)
        for name, spec in TASKS.items()
        if name in prediction
    }
    class_ids = prediction.get(task_of_kind("classes", prediction))
    heights = prediction.get(task_of_kind("surface_height", prediction))
    dimensions = []
    if class_ids is not None and heights is not None:
        # Measured from the prediction alone: each predicted region's area and height.
        for class_id in np.flatnonzero(np.bincount(class_ids.ravel())):
            region = heights[class_ids == class_id]
            dimensions.append(
                {
                    "class_id": int(class_id),
                    "class": class_names[class_id] if class_id < len(class_names) else None,
                    "area_px": int(region.size),
                    "height_median_mm": float(np.median(region)),
                    "height_p95_mm": float(np.percentile(region, 95)),
                }
            )
    return {"defect": defect, "tasks": tasks, "dimensions": dimensions}


def part_verdict(rule: DefectRule, views: list[dict[str, Any]]) -> dict[str, Any]:
    """A part's verdict from its views': score = the largest view score, so the part is a
    reject exactly when one of its views is."""
    scores = [view["defect"]["score"] for view in views]
    part = rule.judge(None if None in scores else max(scores))
    part["n_views"] = len(views)
    part["rejected_views"] = [view["view"] for view in views if view["defect"]["reject"]]
    return part


class ServeApp:
    """Holds the model, the limits and the metrics; ``starlette`` is the ASGI app."""

    def __init__(self, settings: ServeSettings, loader: Callable[[], Any]):
        self.settings = settings
        self._loader = loader
        self.predictor: Any = None
        self.class_names: list[str] = []
        self.load_error: BaseException | None = None
        self.metrics = _Metrics()
        model = settings.model
        self.metrics.info.labels(
            name=model.get("name") or "",
            version=model.get("version") or "",
            sha256=model.get("sha256") or "",
            line=settings.line or "",
        ).set(1)
        threshold = settings.threshold
        self.metrics.threshold.labels(source=threshold.source).set(
            math.nan if threshold.value is None else threshold.value
        )
        self.metrics.verified.labels(against=settings.verification).set(
            0 if settings.verification == "unverified" else 1
        )
        self.rule: DefectRule | None = None
        self._inflight = 0
        self.reading = BodyReading(
            settings.max_reading_bytes, settings.body_timeout_s, settings.max_body_bytes
        )
        self.decoded = DecodedBudget(settings.max_decoded_bytes)
        self.metrics.reading.set_function(lambda: self.reading.count)
        self.metrics.reading_bytes.set_function(lambda: self.reading.bytes)
        self.metrics.decoded_bytes.set_function(lambda: self.decoded.used)
        self._inference_slots = threading.BoundedSemaphore(settings.inference_threads)
        self.stats = (
            WindowedStats(settings.stats_window_s, settings.stats_dir, self.metrics.publish_window)
            if settings.stats_window_s
            else None
        )
        # Called with the exception when loading fails, so the process can exit.
        self.on_load_failure: Callable[[BaseException], None] | None = None
        self._stopping = threading.Event()
        self.starlette = Starlette(
            lifespan=self._lifespan,
            routes=[
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/readyz", self.readyz, methods=["GET"]),
                Route("/predict", self.predict, methods=["POST"]),
                Route("/metrics", self.metrics_endpoint, methods=["GET"]),
                Route("/stats", self.stats_endpoint, methods=["GET"]),
            ],
        )

    # ---------------------------------------------------------------- lifecycle
    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=self.load, name="cta-serve-load", daemon=True).start()
        ticker = None
        if self.stats is not None:
            ticker = threading.Thread(target=self._tick, name="cta-serve-stats", daemon=True)
            ticker.start()
        yield
        self._stopping.set()
        if ticker is not None:
            ticker.join(timeout=5)
            # The open window is written too, so a stopped server loses no rows.
            self.stats.rotate_if_due(force=True)

    def _tick(self) -> None:
        interval = min(1.0, self.stats.window_s / 4)
        while not self._stopping.wait(interval):
            self.stats.rotate_if_due()

    def load(self) -> None:
        """Load the model (in a background thread, while /healthz already answers)."""
        try:
            predictor = self._loader()
        except BaseException as exc:
            self.load_error = exc
            log.error("model %s failed to load: %s", self.settings.model.get("uri"), exc)
            if self.on_load_failure is not None:
                self.on_load_failure(exc)
            return
        self.class_names = _class_names(predictor)
        self.rule = DefectRule.of(predictor, self.class_names, self.settings.threshold)
        self.predictor = predictor
        model = self.settings.model
        log.info(
            "ready: model %s (name %s, version %s, sha256 %s) line %s; defect score over "
            "reject classes %s (window %s px), threshold %s (%s)",
            model.get("uri"),
            model.get("name"),
            model.get("version"),
            model.get("sha256"),
            self.settings.line,
            list(self.rule.reject_classes),
            self.rule.window_px,
            self.settings.threshold.value,
            self.settings.threshold.source,
        )
        if self.rule.no_score:
            log.warning("no defect verdict: %s", self.rule.no_score)

    # ---------------------------------------------------------------- endpoints
    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def _ready_body(self) -> dict[str, Any]:
        return {
            "model": dict(self.settings.model),
            "line": self.settings.line,
            "defect": self.rule.describe(),
        }

    async def readyz(self, request: Request) -> Response:
        if self.predictor is None:
            reason = "model failed to load" if self.load_error else "model loading"
            return _error(503, reason, {"Retry-After": RETRY_AFTER_S})
        return JSONResponse(self._ready_body())

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def stats_endpoint(self, request: Request) -> Response:
        if self.stats is None:
            return _error(404, "serving statistics are off")
        return JSONResponse(self.stats.current())

    def _inspect(self, images: list[np.ndarray]) -> list[tuple[dict[str, Any], float | None]]:
        """Per image its decoded outputs and defect score (`Predictor.inspect`); the views of a
        part that share a size share a forward pass."""
        results: list[Any] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(image.shape, []).append(index)
        with self._inference_slots:
            for indices in by_size.values():
                inspection = self.predictor.inspect(np.stack([images[i] for i in indices]))
                scores = inspection.defect_score
                for k, index in enumerate(indices):
                    outputs = {task: array[k] for task, array in inspection.outputs.items()}
                    results[index] = (outputs, None if scores is None else float(scores[k]))
        return results

    def _check_resolution(self, views: list[tuple[str | None, np.ndarray]]) -> None:
        resolution = self.settings.resolution
        if resolution is None:
            return
        for name, image in views:
            try:
                resolution.check_image(image.shape[0], image.shape[1])
            except ConfigError as exc:
                raise BadInput(422, str(exc) if name is None else f"view {name!r}: {exc}") from None

    def _handle(self, body: bytes, content_type: str | None, as_npz: bool) -> dict[str, Any]:
        """Decode, check, inspect, summarise (in a worker thread: all of it is CPU work); the
        decoded bytes are reserved from the image headers before any pixel is decoded."""
        pixels = header_pixels(body, content_type, self.settings.max_pixels)
        with self.decoded.hold(pixels):
            return self._decode_and_inspect(body, content_type, as_npz)

    def _decode_and_inspect(
        self, body: bytes, content_type: str | None, as_npz: bool
    ) -> dict[str, Any]:
        views, is_part = decode_views(body, content_type, self.settings.max_pixels)
        self._check_resolution(views)
        try:
            inspected = self._inspect([image for _, image in views])
        except DataError as exc:  # e.g. a size the model's resize policy refuses
            raise BadInput(422, str(exc)) from None
        summaries, rows, arrays = [], [], {}
        for (name, image), (outputs, score) in zip(views, inspected, strict=True):
            summary = summarise(outputs, self.class_names, self.rule.judge(score))
            summaries.append(summary if name is None else {"view": name, **summary})
            if self.stats is not None:
                rows.append(
                    {
                        **image_statistics(image),
                        **prediction_statistics(outputs, self.class_names, score),
                        "view": name,
                        "reject": summary["defect"]["reject"],
                    }
                )
            if as_npz:
                arrays.update(
                    outputs if name is None else {f"{name}/{t}": a for t, a in outputs.items()}
                )
        if is_part:
            answer = {"part": part_verdict(self.rule, summaries), "views": summaries}
        else:
            answer = summaries[0]
        result: dict[str, Any] = {
            "answer": answer,
            "defects": [summary["defect"] for summary in summaries],
            "rows": rows,
        }
        if as_npz:
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            result["npz"] = buffer.getvalue()
        return result

    async def predict(self, request: Request) -> Response:
        start = time.perf_counter()
        if self.predictor is None:
            response = _error(503, "model not loaded yet", {"Retry-After": RETRY_AFTER_S})
        else:
            response = await self._read_then_predict(request, start)
        self.metrics.requests.labels(code=str(response.status_code)).inc()
        log.debug(
            "POST /predict %s %.1f ms %s",
            response.status_code,
            (time.perf_counter() - start) * 1000,
            request.headers.get("content-type", "-"),
        )
        return response

    async def _read_then_predict(self, request: Request, start: float) -> Response:
        """Read the body (no slot taken yet), then take a slot or answer 503 at once."""
        try:
            body = await self.reading.read(request.headers.get("content-length"), request.stream())
        except BadInput as exc:
            if exc.status == 408:
                self.metrics.timeouts.labels(stage="body").inc()
            headers = {"Connection": "close"} if exc.close else {}
            if exc.status == 503:
                headers["Retry-After"] = RETRY_AFTER_S
            return _error(exc.status, exc.message, headers)
        except ClientDisconnect:
            return _error(400, "client disconnected before the body was complete")
        if self._inflight >= self.settings.max_concurrency:
            return _error(
                503,
                f"saturated: {self._inflight} requests in flight "
                f"(--max-concurrency {self.settings.max_concurrency})",
                {"Retry-After": RETRY_AFTER_S},
            )
        self._inflight += 1
        self.metrics.inflight.inc()
        try:
            return await self._predict(request, body, start)
        finally:
            self._inflight -= 1
            self.metrics.inflight.dec()

    async def _predict(self, request: Request, body: bytes, start: float) -> Response:
        as_npz = request.query_params.get("outputs") == "npz"
        try:
            if self.settings.debug_delay_s:
                await asyncio.sleep(self.settings.debug_delay_s)
            content_type = request.headers.get("content-type")
            result = await run_in_threadpool(self._handle, body, content_type, as_npz)
        except BadInput as exc:
            headers = {"Retry-After": RETRY_AFTER_S} if exc.status == 503 else {}
            return _error(exc.status, exc.message, headers)
        latency_s = time.perf_counter() - start
        self.metrics.latency.observe(latency_s)
        for defect in result["defects"]:
            if defect["score"] is not None:
                self.metrics.scores.observe(defect["score"])
            if defect["reject"]:
                self.metrics.rejects.inc()
        model = self.settings.model
        if self.stats is not None:
            identity = {
                **now_fields(),
                "line_id": self.settings.line,
                "model_name": model.get("name"),
                "model_version": model.get("version"),
                "model_sha256": model.get("sha256"),
                "threshold": self.settings.threshold.value,
            }
            for row in result["rows"]:
                self.stats.record({**identity, **row, "latency_ms": latency_s * 1000})
        if as_npz:
            return Response(result["npz"], media_type=NPZ)
        return JSONResponse(
            {"model": dict(model), "latency_ms": latency_s * 1000, **result["answer"]}
        )


__all__ = ["DefectRule", "ServeApp", "ServeSettings", "part_verdict", "summarise"]
