"""Serving statistics (issue 10): per served image, the statistics `reference_stats.parquet`
holds (cta_model/training/reference_stats.py `reference_statistics`), aggregated per time window.

Per image (one row; the column names are those of reference_stats.parquet so monitoring
compares like with like): ``brightness``, ``contrast``, ``ratio_rg``, ``ratio_bg`` (the
data-validation definitions, `cta_model.data.statistics`), ``image_height``, ``image_width``,
``pred_frac_<class>`` (predicted class histogram), ``pred_height_mean_mm``,
``pred_height_std_mm``, ``pred_depth_mean``, ``pred_normals_z_mean``, ``pred_defect_score``;
plus serving columns ``time`` (ISO 8601 UTC), ``unix_time``, ``line_id``, ``model_name``,
``model_version``, ``model_sha256``, ``view`` (a part's view name, else null), ``reject`` (the
verdict, null without an operating threshold), ``threshold``, ``latency_ms``.

Windows: rows collect in the current window of ``window_s`` seconds; when it ends with at
least one image, its aggregates (count, mean, std, p05, p50, p95 per numeric statistic)
replace the previous window's on /metrics (an idle window changes nothing, so a scrape sees
the last window with traffic, stamped with its end time), and with a ``stats_dir`` its rows
are written atomically to ``<stats_dir>/stats-<window start, UTC %Y%m%dT%H%M%SZ>-<pid>.jsonl``
(one JSON object per line).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cta_model.atomic import write_bytes_atomic

# One definition with the trainer's reference_stats.parquet (and data validation's).
from cta_model.data.statistics import monitored_image_statistics as image_statistics
from cta_model.data.statistics import prediction_statistics

AGGREGATES = ("mean", "std", "p05", "p50", "p95")
_SERVING_TEXT_COLUMNS = ("time", "line_id", "model_name", "model_version", "model_sha256")


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    columns = sorted(
        {
            key
            for row in rows
            for key, value in row.items()
            if key not in _SERVING_TEXT_COLUMNS and isinstance(value, int | float)
        }
        - {"unix_time", "threshold"}
    )
    result: dict[str, dict[str, float]] = {}
    for column in columns:
        values = np.array([float(row[column]) for row in rows if column in row], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        p05, p50, p95 = np.percentile(values, [5, 50, 95])
        result[column] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "p05": float(p05),
            "p50": float(p50),
            "p95": float(p95),
        }
    return result


def _json_safe(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: (None if isinstance(value, float) and not math.isfinite(value) else value)
        for key, value in row.items()
    }


class WindowedStats:
    """Thread-safe collector of per-image rows with a time-window rotation.

    ``on_window(summary)`` is called with each completed window's summary (the /metrics
    gauges); ``rotate_if_due()`` is called by a background ticker.
    """

    def __init__(
        self,
        window_s: float,
        stats_dir: Path | None = None,
        on_window: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = float(window_s)
        self.stats_dir = stats_dir
        self._on_window = on_window
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self._rows: list[dict[str, Any]] = []
        self._last: dict[str, Any] | None = None

    def record(self, row: dict[str, Any]) -> None:
        # No rotation here: a window's file is written by the ticker, off the event loop.
        with self._lock:
            self._rows.append(row)

    def _summary(self, start: float, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "window_start": datetime.fromtimestamp(start, UTC).isoformat(),
            "window_end_unix": self._clock(),
            "window_s": self.window_s,
            "n_images": len(rows),
            "stats": _aggregate(rows) if rows else {},
        }

    def current(self) -> dict[str, Any]:
        """The open window's summary and the last completed one with images (or None)."""
        with self._lock:
            start, rows, last = self._start, list(self._rows), self._last
        return {"current": self._summary(start, rows), "previous": last}

    def rotate_if_due(self, force: bool = False) -> None:
        now = self._clock()
        with self._lock:
            if not force and now - self._start < self.window_s:
                return
            start, rows = self._start, self._rows
            self._start, self._rows = now, []
            if not rows:
                # An idle window changes nothing: /metrics keeps the last window with images.
                return
            summary = self._summary(start, rows)
            self._last = summary
        if self.stats_dir is not None:
            self._write(start, rows)
        if self._on_window is not None:
            self._on_window(summary)

    def _write(self, start: float, rows: list[dict[str, Any]]) -> Path:
        stamp = datetime.fromtimestamp(start, UTC).strftime("%Y%m%dT%H%M%SZ")
        path = Path(self.stats_dir) / f"stats-{stamp}-{os.getpid()}.jsonl"
        text = "".join(json.dumps(_json_safe(row), sort_keys=True) + "\n" for row in rows)
        return write_bytes_atomic(path, text.encode("utf-8"))


def now_fields() -> dict[str, Any]:
    now = time.time()
    return {"time": datetime.fromtimestamp(now, UTC).isoformat(), "unix_time": now}


__all__ = [
    "AGGREGATES",
    "WindowedStats",
    "image_statistics",
    "now_fields",
    "prediction_statistics",
]
