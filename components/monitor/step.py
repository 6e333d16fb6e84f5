"""`cta monitor --line ID`: has a line drifted from what its model was trained on?

Recent rows come from the line servers' statistics snapshots (``cta serve --stats-dir``,
components/serve/stats.py: ``stats-*.jsonl``, one row per served image); the reference is the
``reference_stats.parquet`` in the folder of the model the line runs (DESIGN 6.1), restricted
to that line's rows when it has any. Each configured statistic gets a PSI and a KS test; it
MOVED when PSI > threshold, the KS p-value < alpha / (number of statistics) and its mean moved
by at least the statistic's ``min_shift`` (none when unconfigured). The line
DRIFTED when any statistic moved; the defect score (``pred_defect_score``, the model's own
score of each image) is one of the statistics. The line's reject rate (overall and per time
window) is tracked against its production prevalence and against the rate the reference images
would have at the served threshold; with a QA replay (``qa``: the line's `qa` split sent
through its server), agreement of the server's verdict with the QA labels is reported too.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from cta_model.errors import DataError

MONITOR_JSON = "monitor.json"
MONITOR_HTML = "monitor.html"
SCHEMA_VERSION = 1


def read_serving_rows(stats_dir: str | os.PathLike[str], line_id: str, since_unix: float | None):
    """The line's served-image rows from every ``stats-*.jsonl`` below ``stats_dir``."""
    import pandas as pd

    root = Path(stats_dir)
    if not root.is_dir():
        raise DataError(f"{root}: statistics folder missing (start `cta serve --stats-dir` there)")
    frames = []
    for path in sorted(root.rglob("stats-*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            frames.append(pd.DataFrame(rows))
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True)
    table = table[table["line_id"] == line_id]
    if since_unix is not None:
        table = table[table["unix_time"] >= since_unix]
    return table.sort_values("unix_time").reset_index(drop=True)


def _compared_columns(patterns: tuple[str, ...], reference, recent) -> list[str]:
    columns = [c for c in reference.columns if c in recent.columns]
    return [c for c in columns if any(fnmatch.fnmatchcase(c, p) for p in patterns)]


def compare(reference, recent, config) -> dict[str, dict[str, Any]]:
    from components.monitor.drift import ks_test, psi

    columns = _compared_columns(config.statistics, reference, recent)
    alpha = config.ks_alpha / max(1, len(columns))
    result = {}
    for column in columns:
        ref = reference[column].to_numpy(dtype=float)
        new = recent[column].to_numpy(dtype=float)
        value = psi(ref, new, config.psi_bins)
        statistic, p_value = ks_test(ref, new)
        ref_mean = _finite(np.nanmean(ref)) if ref.size else None
        new_mean = _finite(np.nanmean(new)) if new.size else None
        floor = config.shift_floor(column)
        # With a few dozen images PSI saturates and KS rejects on any clean separation, so a
        # shift too small to matter (min_shift, in the statistic's unit) never counts.
        material = floor == 0 or (
            ref_mean is not None and new_mean is not None and abs(new_mean - ref_mean) >= floor
        )
        result[column] = {
            "psi": _finite(value),
            "ks_statistic": statistic,
            "ks_p_value": p_value,
            "reference_mean": ref_mean,
            "recent_mean": new_mean,
            "min_shift": floor,
            "moved": bool(
                math.isfinite(value)
                and value > config.psi_threshold
                and p_value < alpha
                and material
            ),
        }
    return result


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def windows(recent, window_s: float, columns: list[str]) -> list[dict[str, Any]]:
    """Per time window: start, count, reject rate and the mean of each compared statistic."""
    if recent.empty:
        return []
    start = float(recent["unix_time"].min())
    index = ((recent["unix_time"] - start) // window_s).astype(int)
    out = []
    for key, group in recent.groupby(index):
        row = {"start_unix": start + key * window_s, "n": int(len(group))}
        row["reject_rate"] = reject_rate(group)
        row["means"] = {c: _finite(group[c].mean()) for c in columns}
        out.append(row)
    return out


def reject_rate(rows) -> float | None:
    """Share of served images judged reject, over those with a verdict (a server without an
    operating threshold records null); None when none has one."""
    if "reject" not in rows:
        return None
    verdicts = rows["reject"].dropna()
    return float(verdicts.astype(bool).mean()) if len(verdicts) else None


def defect_rates(reference, recent, prevalence: float, factor: float, enough: bool) -> dict:
    """The line's reject rate now, the rate its model's reference images would have at the
    served threshold (same score, same threshold: a gap means the scores moved), and a flag
    when the recent rate is far above the line's production prevalence."""
    from cta_model.inspection import is_reject

    recent_rate = reject_rate(recent) if len(recent) else None
    threshold = None
    if "threshold" in recent and recent["threshold"].notna().any():
        threshold = float(recent["threshold"].dropna().iloc[-1])
    reference_rate = None
    if threshold is not None and "pred_defect_score" in reference:
        scores = reference["pred_defect_score"].dropna().to_numpy(dtype=float)
        if scores.size:
            reference_rate = float(is_reject(scores, threshold).mean())
    defect = {
        "recent_reject_rate": recent_rate,
        "reference_reject_rate": reference_rate,
        "threshold": threshold,
        "production_prevalence": prevalence,
    }
    if enough and recent_rate is not None and prevalence > 0:
        ratio = recent_rate / prevalence
        if ratio > factor:
            defect["flag"] = (
                f"The reject rate {recent_rate:.1%} is {ratio:.1f}x the production prevalence "
                f"{prevalence:.1%}: check the line or the model."
            )
    return defect


def _plain_summary(line_id: str, enough: bool, n: int, moved: dict, defect: dict) -> str:
    if not enough:
        return f"Line {line_id}: not enough recent images ({n}) to judge drift."
    parts = []
    if moved:
        names = ", ".join(
            f"{name} (mean {s['reference_mean']:.3g} -> {s['recent_mean']:.3g}, PSI {s['psi']:.2f})"
            for name, s in moved.items()
        )
        parts.append(
            f"Line {line_id} has DRIFTED from the images its model was trained on: {names} moved."
        )
    else:
        parts.append(f"Line {line_id} has not drifted: no statistic moved over {n} images.")
    if defect.get("flag"):
        parts.append(defect["flag"])
    return " ".join(parts)


def run(
    line_id: str,
    stats_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model_uri: str | None = None,
    tracking_uri: str | None = None,
    config_path: str | os.PathLike[str] | None = None,
    lines_config: str | os.PathLike[str] | None = None,
    since_unix: float | None = None,
    qa: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``monitor.json`` and ``monitor.html`` under ``out_dir``; returns the report."""

    from components.artifacts import write_json_atomic
    from components.monitor.config import DEFAULT_MONITOR_CONFIG, load_monitor_config
    from components.monitor.report import write_html
    from components.registry.models import fetch_model_folder
    from cta_model.data.line_dataset import read_parquet_bytes
    from cta_model.data.lines import load_lines_config
    from cta_model.training import REFERENCE_STATS_FILE

    config = load_monitor_config(config_path or DEFAULT_MONITOR_CONFIG)
    lines = load_lines_config(lines_config) if lines_config else load_lines_config()
    line = lines.get(line_id)  # raises naming the file for an unknown line
    recent = read_serving_rows(stats_dir, line_id, since_unix)
    if model_uri is None:
        if recent.empty:
            raise DataError(f"{stats_dir}: no served images of line {line_id!r}; give --model")
        last = recent.iloc[-1]
        model_uri = f"models:/{last['model_name']}/{last['model_version']}"
    folder = fetch_model_folder(model_uri, tracking_uri=tracking_uri)
    reference_path = Path(folder) / REFERENCE_STATS_FILE
    if not reference_path.is_file():
        raise DataError(f"{model_uri}: model folder has no {REFERENCE_STATS_FILE}")
    # On the calling thread: pd.read_parquet starts Arrow's pools, which can abort a process
    # that exits right after (exit 134; cta_model.data.line_dataset.read_parquet_bytes).
    reference = read_parquet_bytes(reference_path.read_bytes()).to_pandas(use_threads=False)
    if (reference["line_id"] == line_id).any():
        reference = reference[reference["line_id"] == line_id]

    enough = len(recent) >= config.min_samples
    statistics = compare(reference, recent, config) if enough else {}
    moved = {name: s for name, s in statistics.items() if s["moved"]}
    columns = _compared_columns(config.statistics, reference, recent) if len(recent) else []
    defect = defect_rates(
        reference, recent, line.defect_prevalence, config.defect_rate_factor, enough
    )
    report = {
        "schema_version": SCHEMA_VERSION,
        "line_id": line_id,
        "model": {"uri": model_uri, "folder": str(folder)},
        "recent": {
            "n_images": int(len(recent)),
            "since_unix": since_unix,
            "first_unix": _finite(recent["unix_time"].min()) if len(recent) else None,
            "last_unix": _finite(recent["unix_time"].max()) if len(recent) else None,
        },
        "reference": {"n_images": int(len(reference)), "path": str(reference_path)},
        "thresholds": config.model_dump(mode="json"),
        "enough_data": enough,
        "drifted": bool(enough and moved),
        "moved": sorted(moved),
        "statistics": statistics,
        "defect_rate": defect,
        "qa": qa,
        "windows": windows(recent, config.window_s, columns),
    }
    report["summary"] = _plain_summary(line_id, enough, len(recent), moved, defect)
    out = Path(out_dir)
    write_json_atomic(out / MONITOR_JSON, report)
    write_html(report, reference, recent, out / MONITOR_HTML)
    return report
