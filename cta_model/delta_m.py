"""Multi-task Delta_m: how much a multitask model gains over single-task baselines (DESIGN 5.1).

Inputs are flat "<task>.<metric>" -> value dicts (what the meters of ``cta_model.metrics``
report, flattened by the task registry). Metric directions (higher / lower is better) belong to
the task registry, which is why the functions take them as an argument and why this module
imports nothing from ``cta_model``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Literal, get_args

Direction = Literal["higher", "lower"]
DIRECTIONS: tuple[str, ...] = get_args(Direction)

DELTA_PRIMARY_KEY = "delta_m_primary_pct_higher_better"
DELTA_TASK_AVG_KEY = "delta_m_task_avg_pct_higher_better"
DELTA_ALL_METRICS_KEY = "delta_m_all_metrics_pct_lower_better"

__all__ = [
    "DELTA_ALL_METRICS_KEY",
    "DELTA_PRIMARY_KEY",
    "DELTA_TASK_AVG_KEY",
    "delta_m",
    "relative_improvements",
]


def _task_of(key: str) -> str:
    task, dot, metric = key.partition(".")
    if not dot or not task or not metric:
        raise ValueError(f"metric key {key!r} is not of the form '<task>.<metric>'")
    return task


def _direction_sign(key: str, direction: str) -> float:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction of {key!r} is {direction!r}; choose one of {list(DIRECTIONS)}")
    return 1.0 if direction == "higher" else -1.0


def relative_improvements(
    candidate: Mapping[str, float],
    baseline: Mapping[str, float],
    directions: Mapping[str, str],
) -> dict[str, float]:
    """Signed relative improvement in percent per "<task>.<metric>" key, positive = better.

    (-1)^{l} (M - B) / B * 100 with l = 1 when lower is better, for every key that has a
    direction and is in both dicts. Keys whose baseline is 0 or not finite are left out; a
    non-finite candidate value gives a non-finite improvement (so the caller sees it).
    """
    improvements: dict[str, float] = {}
    for key, direction in directions.items():
        sign = _direction_sign(key, direction)
        if key not in candidate or key not in baseline:
            continue
        base = float(baseline[key])
        if base == 0.0 or not math.isfinite(base):
            continue
        improvements[key] = sign * (float(candidate[key]) - base) / base * 100.0
    return improvements


def delta_m(
    candidate: Mapping[str, float],
    baseline: Mapping[str, float],
    primary: Mapping[str, str],
    directions: Mapping[str, str],
) -> dict[str, float | str | None]:
    """Multi-task Delta_m (percent) of ``candidate`` against single-task ``baseline`` metrics.

    ``candidate`` and ``baseline`` are flat "<task>.<metric>" -> value dicts, ``primary`` maps
    each task to its primary metric name and ``directions`` maps "<task>.<metric>" to "higher"
    or "lower". With r_k = (-1)^{l_k} (M_k - B_k) / B_k * 100 (l_k = 1 when lower is better;
    see :func:`relative_improvements`) and T = the tasks of ``primary`` that have at least one
    metric in the baseline (a task missing from the baseline is skipped):

    * ``delta_m_primary_pct_higher_better`` = mean over t in T of r_{primary(t)}
      (positive = better; the DESIGN.md 5.1 figure);
    * ``delta_m_task_avg_pct_higher_better`` = mean over t in T of (mean of r_k over t's
      metrics in both dicts) (LibMTL; positive = better);
    * ``delta_m_all_metrics_pct_lower_better`` = -(mean of r_k over all those metrics)
      (lower = better, as papers that report it that way).

    A metric whose baseline is 0 or not finite is skipped. A variant is None when it cannot be
    computed honestly: the primary one when a task's primary metric is missing from either
    dict or has an unusable baseline; any one that would use a non-finite candidate value; all
    of them when no metric is comparable. Then, and only then, a ``reason`` string is added.
    """
    for key in primary.values():
        if not isinstance(key, str):
            raise TypeError(f"primary metric names must be strings, got {key!r}")
    improvements = relative_improvements(candidate, baseline, directions)
    # run-level entries without a "<task>." prefix (epoch, loss, ...) say nothing about tasks
    baseline_tasks = {key.partition(".")[0] for key in baseline if "." in key}
    tasks = [task for task in primary if task in baseline_tasks]
    reasons: list[str] = []

    primary_values: list[float] = []
    for task in tasks:
        key = f"{task}.{primary[task]}"
        if key not in directions:
            raise ValueError(f"no direction given for primary metric {key!r}")
        if key not in candidate:
            reasons.append(f"primary metric {key!r} missing from the candidate")
        elif key not in baseline:
            reasons.append(f"primary metric {key!r} missing from the baseline")
        elif key not in improvements:
            reasons.append(f"baseline {key} = {baseline[key]!r} is 0 or not finite")
        elif not math.isfinite(improvements[key]):
            reasons.append(f"candidate {key} = {candidate[key]!r} is not finite")
        else:
            primary_values.append(improvements[key])
    primary_delta: float | None = None
    if not tasks:
        reasons.append("no task of `primary` has metrics in the baseline")
    elif len(primary_values) == len(tasks):
        primary_delta = statistics.fmean(primary_values)

    used = {key: value for key, value in improvements.items() if _task_of(key) in tasks}
    nonfinite = sorted(key for key, value in used.items() if not math.isfinite(value))
    task_avg: float | None = None
    all_metrics: float | None = None
    if nonfinite:
        reasons.append(f"candidate metrics not finite: {', '.join(nonfinite)}")
    elif used:
        per_task = [
            statistics.fmean(value for key, value in used.items() if _task_of(key) == task)
            for task in tasks
            if any(_task_of(key) == task for key in used)
        ]
        task_avg = statistics.fmean(per_task)
        all_metrics = -statistics.fmean(used.values())
    elif tasks:
        reasons.append("no metric is comparable between candidate and baseline")

    result: dict[str, float | str | None] = {
        DELTA_PRIMARY_KEY: primary_delta,
        DELTA_TASK_AVG_KEY: task_avg,
        DELTA_ALL_METRICS_KEY: all_metrics,
    }
    if None in (primary_delta, task_avg, all_metrics):
        result["reason"] = "; ".join(dict.fromkeys(reasons))
    return result
