"""The ROI model (DESIGN 8) against cases worked out by hand, its config errors, and properties."""

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from components.roi_report import roi
from components.roi_report.config import (
    DEFAULT_ROI_CONFIG,
    line_economics,
    load_roi_config,
)
from cta_model.data.lines import load_lines_config
from cta_model.errors import ConfigError

pytestmark = pytest.mark.unit

# N = 1000 parts/h x 1000 h = 1e6 parts a year; one device (1000/3600 images/s < 1) at 2000.
BASE = roi.LineEconomics(
    parts_per_hour=1000.0,
    hours_per_year=1000.0,
    defect_prevalence=0.0,
    recall=0.9,
    frr=0.01,
    flag_action="manual_check",
    C_escape=40.0,
    C_handle=0.5,
    C_fr=4.0,
    ops_annual=1000.0,
    device_annual_cost=2000.0,
    images_per_s_per_device=1.0,
    images_per_part=1.0,
    r0=0.8,
    f0=0.02,
    manual_cost_per_part=0.01,
    labelling=10.0,
    integration=20.0,
    training_compute=5.0,
    pilot=7.0,
    horizon_years=3,
    discount_rate=0.1,
)


# ------------------------------------------------------------------ worked out by hand


def test_no_defects_prices_only_false_rejects_and_fixed_costs():
    # p = 0: flagged = N f = 10 000 -> 5 000 handling + 1 000 ops + 2 000 hardware.
    assert roi.model_cost(BASE) == pytest.approx(8000.0)
    # Current: flagged0 = N f0 = 20 000 -> 10 000 handling + 1e6 x 0.01 manual = 20 000.
    assert roi.current_cost(BASE) == pytest.approx(20000.0)
    assert roi.annual_saving(BASE) == pytest.approx(12000.0)
    # Without defects, recall cannot matter.
    assert roi.model_cost(replace(BASE, recall=0.1)) == pytest.approx(8000.0)


def test_full_recall_lets_no_defect_escape():
    e = replace(BASE, defect_prevalence=0.1, recall=1.0, frr=0.0)
    # Every defective part flagged: N p C_handle = 1e5 x 0.5, no escapes, + ops + hardware.
    assert roi.model_cost(e) == pytest.approx(50000.0 + 1000.0 + 2000.0)
    # Current at r0 = 0.8: 2e4 escapes x 40 + (8e4 + 0.9e6 x 0.02) x 0.5 + 1e4 manual.
    expected_current = 20000 * 40.0 + (80000 + 18000) * 0.5 + 10000.0
    assert roi.current_cost(e) == pytest.approx(expected_current)


def test_scrap_adds_the_value_of_falsely_rejected_good_parts():
    e = replace(BASE, defect_prevalence=0.1, frr=0.02)
    scrap = replace(e, flag_action="scrap", C_fr=5.0)
    # N (1 - p) f C_fr = 1e6 x 0.9 x 0.02 x 5 = 90 000; rework/manual_check do not pay it.
    assert roi.model_cost(scrap) - roi.model_cost(e) == pytest.approx(90000.0)
    assert roi.model_cost(replace(e, flag_action="rework")) == pytest.approx(roi.model_cost(e))


def test_break_even_is_never_paid_back():
    # Equal flagging (p = 0, f = f0) and manual cost N x 0.25 = ops 248 000 + hardware 2 000.
    e = replace(BASE, frr=0.02, manual_cost_per_part=0.25, ops_annual=248000.0)
    assert roi.annual_saving(e) == 0.0
    result = roi.line_result(e)
    assert result["payback_months"] is None
    assert result["payback_label"] == "never"
    assert result["npv"] == pytest.approx(-result["investment"])
    assert result["roi_pct_undiscounted"] == pytest.approx(-100.0)


def test_a_loss_is_never_paid_back():
    e = replace(BASE, ops_annual=500000.0)
    assert roi.annual_saving(e) < 0
    assert roi.payback_months(42.0, roi.annual_saving(e)) is None
    assert roi.line_result(e)["payback_label"] == "never"
    assert roi.npv(42.0, -10.0, 0.1, 3) < -42.0


def test_npv_payback_and_roi_by_hand_for_three_years():
    # -1000 + 500/1.1 + 500/1.21 + 500/1.331
    assert roi.npv(1000.0, 500.0, 0.1, 3) == pytest.approx(
        -1000 + 454.5454545 + 413.2231405 + 375.6574005
    )
    assert roi.payback_months(1000.0, 500.0) == pytest.approx(24.0)
    assert roi.roi_pct_undiscounted(1000.0, 500.0, 3) == pytest.approx(50.0)
    flows = roi.cumulative_cash_flow(1000.0, 500.0, 0.1, 3)
    assert flows[0] == -1000.0 and flows[-1] == pytest.approx(roi.npv(1000.0, 500.0, 0.1, 3))
    assert roi.cumulative_cash_flow(1000.0, 500.0, 0.1, 3, discounted=False) == [
        -1000.0,
        -500.0,
        0.0,
        500.0,
    ]
    assert roi.payback_label(24.0) == "24.0 months"


def test_hardware_scales_with_parts_per_hour_in_whole_devices():
    assert roi.devices_needed(3600.0, 1.0, 1.0) == 1  # exactly one device's throughput
    assert roi.devices_needed(3601.0, 1.0, 1.0) == 2
    assert roi.devices_needed(3600.0, 2.0, 1.0) == 2  # two images per part
    assert roi.hardware_annual(36000.0, 1.0, 4.0, 1500.0) == 3 * 1500.0


def test_fleet_counts_training_and_pilot_once():
    # Per line labelling 10 + integration 20, twice; training 5 and pilot 7 once.
    assert roi.fleet_investment([BASE, BASE]) == 2 * 30.0 + 12.0
    assert roi.line_investment(BASE) == 42.0
    assert roi.fleet_investment([BASE]) == roi.line_investment(BASE)


def test_risk_from_replicates():
    summary = roi.risk_summary(np.array([-10.0, 10.0, 20.0, 30.0, np.nan]))
    assert summary["p_roi_positive"] == 0.75
    assert summary["roi_pct_p50"] == pytest.approx(15.0)
    assert roi.risk_summary(None)["p_roi_positive"] is None
    # Replicates equal to the point estimate reproduce its ROI; null replicates are NaN.
    samples = roi.line_roi_samples(BASE, [0.9, None], [0.01, 0.01])
    expected = roi.roi_pct_undiscounted(42.0, roi.annual_saving(BASE), 3)
    assert samples[0] == pytest.approx(expected) and math.isnan(samples[1])


def test_fleet_replicates_pair_replicate_k_of_every_line():
    e = replace(BASE, defect_prevalence=0.1)
    samples = roi.fleet_roi_samples([e, e], [[0.5, 0.9], [0.5, 0.9]], [[0.01, 0.01]] * 2)
    saving = roi.annual_saving(e, np.array([0.5, 0.9]), np.array([0.01, 0.01]))
    expected = (3 * 2 * saving - 72.0) / 72.0 * 100
    np.testing.assert_allclose(samples, expected)


def test_tornado_moves_one_input_and_sorts_by_swing():
    e = replace(BASE, defect_prevalence=0.05)
    rows = roi.tornado(e, {"discount_rate": (0.05, 0.2), "C_escape": (10.0, 100.0)})
    assert [row["input"] for row in rows] == ["C_escape", "discount_rate"]
    by_input = {row["input"]: row for row in rows}
    assert by_input["discount_rate"]["npv_low"] > by_input["discount_rate"]["npv_high"]
    assert by_input["C_escape"]["npv_low"] == pytest.approx(roi.line_npv(replace(e, C_escape=10.0)))


def test_single_task_models_cost_more_hardware_and_operations():
    e = replace(BASE, parts_per_hour=3600.0)  # exactly one device for the multitask model
    result = roi.multitask_vs_stl_line(e, n_tasks=3, latency_ratio=3.0)
    assert result["hw_annual_multitask"] == 2000.0
    assert result["hw_annual_stl"] == 3 * 2000.0
    assert result["ops_annual_stl"] == 3 * 1000.0
    assert result["investment_stl"] - result["investment_multitask"] == 2 * 5.0
    assert result["annual_saving_of_multitask"] == pytest.approx(2 * 2000.0 + 2 * 1000.0)


# ---------------------------------------------------------------------------- properties

fraction = st.floats(0.0, 1.0)
money = st.floats(0.0, 1000.0)


@settings(max_examples=60, deadline=None)
@given(p=fraction, r1=fraction, r2=fraction, f=fraction, escape=money, handle=money)
def test_saving_never_falls_as_recall_rises_when_escapes_cost_more(p, r1, r2, f, escape, handle):
    e = replace(BASE, defect_prevalence=p, frr=f, C_escape=max(escape, handle), C_handle=handle)
    low, high = sorted((r1, r2))
    assert roi.annual_saving(e, high, f) >= roi.annual_saving(e, low, f) - 1e-6


@settings(max_examples=60, deadline=None)
@given(p=fraction, r=fraction, f1=fraction, f2=fraction, scrap=st.booleans())
def test_saving_never_rises_with_the_false_reject_rate(p, r, f1, f2, scrap):
    e = replace(BASE, defect_prevalence=p, flag_action="scrap" if scrap else "manual_check")
    low, high = sorted((f1, f2))
    assert roi.annual_saving(e, r, high) <= roi.annual_saving(e, r, low) + 1e-6


@settings(max_examples=60, deadline=None)
@given(
    saving=st.floats(1.0, 1e7),
    invest=st.floats(0.0, 1e7),
    d1=st.floats(0.0, 0.9),
    d2=st.floats(0.0, 0.9),
    horizon=st.integers(1, 10),
)
def test_npv_falls_with_the_discount_rate_when_saving_is_positive(saving, invest, d1, d2, horizon):
    low, high = sorted((d1, d2))
    assert roi.npv(invest, saving, high, horizon) <= roi.npv(invest, saving, low, horizon) + 1e-6
    # Payback is the months of saving that repay the investment.
    assert roi.payback_months(invest, saving) * saving / 12 == pytest.approx(invest, abs=1e-6)


# ------------------------------------------------------------------------------- config


@pytest.fixture(scope="module")
def lines():
    return load_lines_config()


def _write_config(tmp_path: Path, change) -> Path:
    data = yaml.safe_load(DEFAULT_ROI_CONFIG.read_text())
    change(data)
    path = tmp_path / "roi.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_config_prices_the_pilot_line(lines):
    config = load_roi_config(DEFAULT_ROI_CONFIG, lines)
    e, ranges = line_economics(config, lines.pilot, recall=0.9, frr=0.05)
    assert e.parts_per_hour == lines.pilot.parts_per_hour
    assert e.defect_prevalence == pytest.approx(lines.pilot.defect_prevalence)
    assert set(ranges) >= {"C_escape", "discount_rate", "horizon_years", "defect_prevalence"}
    for name, (low, high) in ranges.items():
        assert low <= getattr(e, name) <= high, name


def test_line_override_replaces_the_global_value(lines):
    config = load_roi_config(DEFAULT_ROI_CONFIG, lines)
    overridden = config.line_overrides["mill-c"].images_per_s_per_device.base
    e, _ = line_economics(config, lines.get("mill-c"), recall=0.9, frr=0.05)
    assert e.images_per_s_per_device == overridden
    assert overridden != config.inference_device.images_per_s_per_device.base


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["C_escape"].update(low=-1.0), "C_escape.low: Input should be greater than"),
        (
            lambda d: d["investment"]["pilot"].update(base=-5.0, low=-10.0),
            "investment.pilot.base: Input should be greater than",
        ),
        (
            lambda d: d["line_overrides"].update(
                {"press-a": {"defect_prevalence": {"base": 1.5, "low": 0.1, "high": 2.0}}}
            ),
            "line_overrides.press-a.defect_prevalence.base: Input should be less than or equal",
        ),
        (
            lambda d: d["defect_prevalence_factor"].update(high=60.0),
            "defect_prevalence_factor.high: 60.0 x the defect_prevalence",
        ),
        (
            lambda d: d["C_handle"].update(base=1.0, low=2.0, high=3.0),
            "C_handle: needs low <= base <= high, got low=2.0, base=1.0",
        ),
        (
            lambda d: d["discount_rate"].update(base=0.2, low=0.05, high=0.1),
            "discount_rate: needs low <= base <= high",
        ),
        (
            lambda d: d["line_overrides"].update({"press-z": {"C_escape": d["C_escape"]}}),
            "line_overrides.press-z: unknown line id 'press-z'",
        ),
        (lambda d: d.update(C_escpae=d["C_escape"]), "C_escpae: unknown key"),
        (lambda d: d.update(flag_action="burn"), "flag_action: Input should be"),
    ],
    ids=[
        "negative-cost",
        "negative-investment",
        "prevalence-above-1",
        "scaled-prevalence-above-1",
        "low-above-base",
        "base-above-high",
        "unknown-line",
        "unknown-key",
        "bad-flag-action",
    ],
)
def test_config_errors_name_file_and_key(tmp_path, lines, change, expected):
    path = _write_config(tmp_path, change)
    with pytest.raises(ConfigError) as error:
        load_roi_config(path, lines)
    message = str(error.value)
    assert f"{path}: " in message
    assert expected in message


def test_null_replicates_borrow_from_the_other_lines_then_the_point_value():
    from components.roi_report.step import paired_replicates

    evaluation = {
        "bootstrap": {
            "replicates": {
                "press-a": {"recall": [None, 0.8, None], "frr": [0.1, 0.2, 0.3]},
                "press-b": {"recall": [0.6, 0.4, None], "frr": [0.3, None, 0.1]},
            }
        }
    }
    points = {"press-a": (0.9, 0.1), "press-b": (0.5, 0.2), "mill-c": (0.7, 0.05)}
    replicates = paired_replicates(evaluation, points)
    assert replicates["press-a"] == ([0.6, 0.8, 0.9], [0.1, 0.2, 0.3])
    assert replicates["press-b"] == ([0.6, 0.4, 0.5], [0.3, 0.2, 0.1])
    # A line without replicates takes the mean of the others at each k.
    assert replicates["mill-c"][0] == pytest.approx([0.6, 0.6, 0.7])
    assert replicates["mill-c"][1] == pytest.approx([0.2, 0.2, 0.2])
    assert paired_replicates({"bootstrap": None}, points) == dict.fromkeys(points)
