"""The ROI model of DESIGN 8 as plain functions: numbers in, numbers out, no I/O.

Per line and year (N parts, production prevalence p, recall r, false-reject rate f)::

    flagged = N (p r + (1 - p) f)
    cost    = N p (1 - r) C_escape + flagged C_handle
            + [flag_action == scrap] N (1 - p) f C_fr + fixed_annual

``fixed_annual`` is ``ops_annual + hw_annual`` for the model and ``N manual_cost_per_part`` for
the current process (with its own r0, f0). S = cost_current - cost_model, I = labelling +
integration + training compute + pilot, payback = 12 I / S months (None = never, S <= 0),
NPV = -I + sum_{y=1..H} S / (1 + d)^y, ROI % = (H S - I) / I * 100 (undiscounted).

The cost functions accept numpy arrays for r and f, so the Monte Carlo over the paired
bootstrap replicates is the same formula evaluated on arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

FLAG_ACTIONS = ("scrap", "rework", "manual_check")
SECONDS_PER_HOUR = 3600.0

#: The formulas as the report prints them (also written to roi.json).
FORMULAS = {
    "annual_volume": "N = parts_per_hour x hours_per_year",
    "flagged": "flagged = N (p r + (1 - p) f)",
    "cost_model": (
        "cost_model = N p (1 - r) C_escape + flagged C_handle"
        " + [flag_action == scrap] N (1 - p) f C_fr + ops_annual + hw_annual"
    ),
    "cost_current": (
        "cost_current = N p (1 - r0) C_escape + flagged0 C_handle"
        " + [flag_action == scrap] N (1 - p) f0 C_fr + N manual_cost_per_part,"
        " flagged0 = N (p r0 + (1 - p) f0)"
    ),
    "hw_annual": (
        "hw_annual = ceil(parts_per_hour x images_per_part / 3600 / images_per_s_per_device)"
        " x device_annual_cost"
    ),
    "saving": "S = cost_current - cost_model (per year)",
    "investment": "I = labelling + integration + training_compute + pilot",
    "fleet_investment": (
        "I_fleet = sum over lines (labelling + integration) + training_compute + pilot"
        " (one model, one pilot)"
    ),
    "payback_months": "payback = 12 I / S months; never when S <= 0",
    "npv": "NPV = -I + sum over y = 1..H of S / (1 + d)^y (year-end)",
    "roi_pct_undiscounted": "ROI % = (H S - I) / I x 100 (undiscounted)",
    "risk": (
        "P(ROI > 0), P10/P50/P90: ROI % recomputed for each paired bootstrap replicate"
        " (r_k, f_k) of the test images of each line"
    ),
    "multitask_vs_stl": (
        "T single-task models: hw_annual with images_per_s_per_device divided by the measured"
        " latency ratio (STL chain time / multitask time; T when not measured), ops_annual x T,"
        " training_compute x T"
    ),
}


@dataclass(frozen=True)
class LineEconomics:
    """Every input of one line's ROI at one scenario (base, or one input at low/high)."""

    parts_per_hour: float
    hours_per_year: float
    defect_prevalence: float
    recall: float
    frr: float
    flag_action: str
    C_escape: float
    C_handle: float
    C_fr: float
    ops_annual: float
    device_annual_cost: float
    images_per_s_per_device: float
    images_per_part: float
    r0: float
    f0: float
    manual_cost_per_part: float
    labelling: float
    integration: float
    training_compute: float
    pilot: float
    horizon_years: int
    discount_rate: float

    def __post_init__(self) -> None:
        if self.flag_action not in FLAG_ACTIONS:
            raise ValueError(f"flag_action {self.flag_action!r} is not one of {FLAG_ACTIONS}")
        if self.horizon_years < 1:
            raise ValueError(f"horizon_years must be >= 1, got {self.horizon_years}")


# --------------------------------------------------------------------------- the formulas


def annual_volume(parts_per_hour: float, hours_per_year: float) -> float:
    return parts_per_hour * hours_per_year


def flagged_parts(n_parts: float, prevalence: float, recall: Any, frr: Any) -> Any:
    return n_parts * (prevalence * recall + (1.0 - prevalence) * frr)


def inspection_cost(
    n_parts: float,
    prevalence: float,
    recall: Any,
    frr: Any,
    *,
    flag_action: str,
    C_escape: float,
    C_handle: float,
    C_fr: float,
    fixed_annual: float,
) -> Any:
    """Annual cost of one inspection process (DESIGN 8); ``recall``/``frr`` may be arrays."""
    cost = n_parts * prevalence * (1.0 - recall) * C_escape
    cost = cost + flagged_parts(n_parts, prevalence, recall, frr) * C_handle
    if flag_action == "scrap":
        cost = cost + n_parts * (1.0 - prevalence) * frr * C_fr
    return cost + fixed_annual


def devices_needed(
    parts_per_hour: float, images_per_part: float, images_per_s_per_device: float
) -> int:
    """Inference devices that keep up with the line (whole devices, at least one)."""
    load = parts_per_hour * images_per_part / SECONDS_PER_HOUR / images_per_s_per_device
    return max(1, math.ceil(load - 1e-12))


def hardware_annual(
    parts_per_hour: float,
    images_per_part: float,
    images_per_s_per_device: float,
    device_annual_cost: float,
) -> float:
    n_devices = devices_needed(parts_per_hour, images_per_part, images_per_s_per_device)
    return n_devices * device_annual_cost


def investment(labelling: float, integration: float, training_compute: float, pilot: float):
    return labelling + integration + training_compute + pilot


def payback_months(investment_total: float, annual_saving: float) -> float | None:
    """12 I / S; None ("never") when the saving is not positive."""
    if annual_saving <= 0:
        return None
    return 12.0 * investment_total / annual_saving


def npv(investment_total: float, annual_saving: float, discount_rate: float, horizon: int):
    """-I + sum_{y=1..H} S / (1 + d)^y: savings at each year end, investment at year 0."""
    return -investment_total + sum(
        annual_saving / (1.0 + discount_rate) ** year for year in range(1, horizon + 1)
    )


def roi_pct_undiscounted(investment_total: float, annual_saving: Any, horizon: int) -> Any:
    """(H S - I) / I x 100; None without an investment (the ratio is undefined)."""
    if investment_total <= 0:
        return None
    return (horizon * annual_saving - investment_total) / investment_total * 100.0


def cumulative_cash_flow(
    investment_total: float,
    annual_saving: float,
    discount_rate: float,
    horizon: int,
    discounted: bool = True,
) -> list[float]:
    """Cumulative cash position at year ends 0..H (year 0 = -I); the last discounted one = NPV."""
    position = -investment_total
    positions = [position]
    for year in range(1, horizon + 1):
        position += annual_saving / ((1.0 + discount_rate) ** year if discounted else 1.0)
        positions.append(position)
    return positions


# ------------------------------------------------------------------------ one line, one fleet


def model_cost(e: LineEconomics, recall: Any = None, frr: Any = None) -> Any:
    n_parts = annual_volume(e.parts_per_hour, e.hours_per_year)
    hw = hardware_annual(
        e.parts_per_hour, e.images_per_part, e.images_per_s_per_device, e.device_annual_cost
    )
    return inspection_cost(
        n_parts,
        e.defect_prevalence,
        e.recall if recall is None else recall,
        e.frr if frr is None else frr,
        flag_action=e.flag_action,
        C_escape=e.C_escape,
        C_handle=e.C_handle,
        C_fr=e.C_fr,
        fixed_annual=e.ops_annual + hw,
    )


def current_cost(e: LineEconomics) -> float:
    n_parts = annual_volume(e.parts_per_hour, e.hours_per_year)
    return inspection_cost(
        n_parts,
        e.defect_prevalence,
        e.r0,
        e.f0,
        flag_action=e.flag_action,
        C_escape=e.C_escape,
        C_handle=e.C_handle,
        C_fr=e.C_fr,
        fixed_annual=n_parts * e.manual_cost_per_part,
    )


def annual_saving(e: LineEconomics, recall: Any = None, frr: Any = None) -> Any:
    return current_cost(e) - model_cost(e, recall, frr)


def line_investment(e: LineEconomics) -> float:
    return investment(e.labelling, e.integration, e.training_compute, e.pilot)


def line_npv(e: LineEconomics) -> float:
    return npv(line_investment(e), annual_saving(e), e.discount_rate, e.horizon_years)


def payback_label(months: float | None) -> str:
    """The one text form of a payback period (roi.json's payback_label, the report)."""
    return "never" if months is None else f"{months:.1f} months"


def summarise(
    investment_total: float,
    saving: float,
    discount_rate: float,
    horizon: int,
    roi_samples: np.ndarray | None,
) -> dict[str, Any]:
    """The money figures every per-line / pilot / fleet entry shares."""
    months = payback_months(investment_total, saving)
    return {
        "annual_saving": float(saving),
        "investment": float(investment_total),
        "payback_months": months,
        "payback_label": payback_label(months),
        "npv": float(npv(investment_total, saving, discount_rate, horizon)),
        "roi_pct_undiscounted": roi_pct_undiscounted(investment_total, saving, horizon),
        **risk_summary(roi_samples),
    }


def line_result(e: LineEconomics, roi_samples: np.ndarray | None = None) -> dict[str, Any]:
    """Saving, investment, payback, NPV, ROI and costs of one line at its base inputs."""
    cost_model = float(model_cost(e))
    cost_current = float(current_cost(e))
    n_parts = annual_volume(e.parts_per_hour, e.hours_per_year)
    return {
        **summarise(
            line_investment(e),
            cost_current - cost_model,
            e.discount_rate,
            e.horizon_years,
            roi_samples,
        ),
        "cost_current": cost_current,
        "cost_model": cost_model,
        "annual_volume": n_parts,
        "flagged_model": float(flagged_parts(n_parts, e.defect_prevalence, e.recall, e.frr)),
        "flagged_current": float(flagged_parts(n_parts, e.defect_prevalence, e.r0, e.f0)),
        "n_devices": devices_needed(e.parts_per_hour, e.images_per_part, e.images_per_s_per_device),
        "hw_annual": hardware_annual(
            e.parts_per_hour, e.images_per_part, e.images_per_s_per_device, e.device_annual_cost
        ),
    }


def fleet_investment(lines: Sequence[LineEconomics]) -> float:
    """Per-line labelling and integration, plus training compute and the pilot once: one
    model is trained for the whole fleet and piloted on one line."""
    if not lines:
        raise ValueError("a fleet needs at least one line")
    shared = lines[0]
    return sum(e.labelling + e.integration for e in lines) + shared.training_compute + shared.pilot


# ----------------------------------------------------------------------------------- risk


def line_roi_samples(
    e: LineEconomics, recall_replicates: Sequence[Any], frr_replicates: Sequence[Any]
) -> np.ndarray:
    """ROI % of each paired bootstrap replicate (NaN where a replicate is null)."""
    recall = as_array(recall_replicates)
    frr = as_array(frr_replicates)
    if recall.shape != frr.shape:
        raise ValueError(f"{recall.size} recall replicates but {frr.size} frr replicates")
    saving = annual_saving(e, recall, frr)
    return (e.horizon_years * saving - line_investment(e)) / line_investment(e) * 100.0


def fleet_roi_samples(
    lines: Sequence[LineEconomics],
    recall_replicates: Sequence[Sequence[Any]],
    frr_replicates: Sequence[Sequence[Any]],
) -> np.ndarray:
    """Fleet ROI % per replicate index k: the lines were resampled independently, so
    replicate k of every line together is one draw of the fleet."""
    total = None
    for e, recall, frr in zip(lines, recall_replicates, frr_replicates, strict=True):
        saving = annual_saving(e, as_array(recall), as_array(frr))
        total = saving if total is None else total + saving
    invest = fleet_investment(lines)
    return (lines[0].horizon_years * total - invest) / invest * 100.0


def risk_summary(roi_samples: np.ndarray | None) -> dict[str, float | None]:
    """P(ROI > 0) and the 10/50/90th percentiles of ROI %; None without replicates."""
    empty = {"p_roi_positive": None, "roi_pct_p10": None, "roi_pct_p50": None, "roi_pct_p90": None}
    if roi_samples is None:
        return empty
    values = np.asarray(roi_samples, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return empty
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return {
        "p_roi_positive": float(np.mean(values > 0)),
        "roi_pct_p10": float(p10),
        "roi_pct_p50": float(p50),
        "roi_pct_p90": float(p90),
    }


def as_array(values: Sequence[Any]) -> np.ndarray:
    """Floats with NaN for None (null replicates)."""
    return np.asarray([np.nan if v is None else v for v in values], dtype=float)


# -------------------------------------------------------------------------------- tornado


def tornado(
    base: LineEconomics,
    ranges: Mapping[str, tuple[float, float]],
    objective: Callable[[LineEconomics], float] = line_npv,
) -> list[dict[str, Any]]:
    """Each input at its low and at its high value, the others at base; sorted by NPV swing
    (largest first). ``ranges`` maps a LineEconomics field to (low, high)."""
    rows = []
    for name, (low, high) in ranges.items():
        cast = int if name == "horizon_years" else float
        rows.append(
            {
                "input": name,
                "low": low,
                "high": high,
                "npv_low": float(objective(replace(base, **{name: cast(low)}))),
                "npv_high": float(objective(replace(base, **{name: cast(high)}))),
            }
        )
    rows.sort(key=lambda row: -abs(row["npv_high"] - row["npv_low"]))
    return rows


# ---------------------------------------------------------------- one model vs T STL models


def stl_economics(e: LineEconomics, n_tasks: int, latency_ratio: float) -> LineEconomics:
    """The same line served by T single-task models: each device serves ``latency_ratio``
    times fewer images per second, and retraining/monitoring and training run T times."""
    return replace(
        e,
        images_per_s_per_device=e.images_per_s_per_device / latency_ratio,
        ops_annual=e.ops_annual * n_tasks,
        training_compute=e.training_compute * n_tasks,
    )


def multitask_vs_stl_line(e: LineEconomics, n_tasks: int, latency_ratio: float) -> dict:
    """Annual cost and investment of one multitask model vs T single-task models on a line,
    at the same inspection quality (the STL models' defect figures are not measured)."""
    stl = stl_economics(e, n_tasks, latency_ratio)
    multitask_cost = float(model_cost(e))
    stl_cost = float(model_cost(stl))
    return {
        "cost_multitask": multitask_cost,
        "cost_stl": stl_cost,
        "hw_annual_multitask": hardware_annual(
            e.parts_per_hour, e.images_per_part, e.images_per_s_per_device, e.device_annual_cost
        ),
        "hw_annual_stl": hardware_annual(
            stl.parts_per_hour,
            stl.images_per_part,
            stl.images_per_s_per_device,
            stl.device_annual_cost,
        ),
        "ops_annual_multitask": e.ops_annual,
        "ops_annual_stl": stl.ops_annual,
        "investment_multitask": line_investment(e),
        "investment_stl": line_investment(stl),
        "annual_saving_of_multitask": stl_cost - multitask_cost,
    }
