"""Latency and throughput of a Predictor on one batch of test images (DESIGN 6.1).

Each measurement is one ``Predictor.predict`` call (preprocessing, forward, decoding at the
image resolution) on the same batch; ``warmup`` calls are discarded first. ``p50_ms`` is the
median over ``repeats`` calls and ``images_per_s = batch / p50``. ``stl`` times the T
single-task baselines run one after another on the same batch (what serving T models costs).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np


def _timed_ms(call: Any, repeats: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    return np.asarray(times)


def measure_latency(
    predictor: Any,
    images: np.ndarray,
    repeats: int,
    baselines: Sequence[Any] = (),
    warmup: int = 1,
) -> dict[str, Any]:
    """The evaluation.json ``latency`` object for ``images`` (B, H, W, 3) as one batch."""
    if repeats < 1:
        raise ValueError(f"latency repeats must be >= 1, got {repeats}")
    batch = int(images.shape[0])
    times = _timed_ms(lambda: predictor.predict(images), repeats, warmup)
    p50, p95 = np.percentile(times, [50, 95])
    stl = None
    if baselines:

        def run_all() -> None:
            for baseline in baselines:
                baseline.predict(images)

        stl_p50 = float(np.percentile(_timed_ms(run_all, repeats, warmup), 50))
        stl = {
            "n_models": len(baselines),
            "p50_ms": stl_p50,
            "images_per_s": batch / (stl_p50 / 1000.0),
        }
    return {
        "device": str(predictor.device),
        "batch": batch,
        "image_size": [int(images.shape[1]), int(images.shape[2])],
        "repeats": repeats,
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "images_per_s": batch / (float(p50) / 1000.0),
        "stl": stl,
    }


__all__ = ["measure_latency"]
