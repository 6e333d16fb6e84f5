"""Drift of one statistic between the reference (training-time `val`) and recent serving.

PSI = sum over bins (p_recent - p_ref) * ln(p_recent / p_ref) with bins at the reference's
quantiles (values beyond the reference range fall in the outer bins; empty bins get a small
floor so the logarithm stays finite), plus the two-sample Kolmogorov-Smirnov test (scipy).
"""

from __future__ import annotations

import math

import numpy as np

_FLOOR = 1e-4


def _bin_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """Reference quantiles; with few distinct values, one bin per value plus one bin below and
    one above the reference's range (so a constant reference still sees a shift)."""
    distinct = np.unique(reference)
    if distinct.size > bins:
        return np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    margin = 1e-9 * max(1.0, float(np.abs(distinct).max()))
    midpoints = (distinct[:-1] + distinct[1:]) / 2
    return np.concatenate([[distinct[0] - margin], midpoints, [distinct[-1] + margin]])


def psi(reference: np.ndarray, recent: np.ndarray, bins: int = 10) -> float:
    reference = np.asarray(reference, dtype=float)
    recent = np.asarray(recent, dtype=float)
    reference, recent = reference[np.isfinite(reference)], recent[np.isfinite(recent)]
    if reference.size == 0 or recent.size == 0:
        return math.nan
    edges = _bin_edges(reference, bins)
    ref_counts = np.bincount(
        np.searchsorted(edges, reference, side="right"), minlength=edges.size + 1
    )
    new_counts = np.bincount(np.searchsorted(edges, recent, side="right"), minlength=edges.size + 1)
    p_ref = np.maximum(ref_counts / ref_counts.sum(), _FLOOR)
    p_new = np.maximum(new_counts / new_counts.sum(), _FLOOR)
    return float(np.sum((p_new - p_ref) * np.log(p_new / p_ref)))


def ks_test(reference: np.ndarray, recent: np.ndarray) -> tuple[float, float]:
    """(statistic, p-value); (0, 1) when either side has no finite value or both are constant
    and equal."""
    from scipy.stats import ks_2samp

    reference = np.asarray(reference, dtype=float)
    recent = np.asarray(recent, dtype=float)
    reference, recent = reference[np.isfinite(reference)], recent[np.isfinite(recent)]
    if reference.size == 0 or recent.size == 0:
        return 0.0, 1.0
    result = ks_2samp(reference, recent)
    return float(result.statistic), float(result.pvalue)
