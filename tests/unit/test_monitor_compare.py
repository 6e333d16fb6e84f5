"""Drift decision per statistic: PSI and KS must agree, and the mean must move by at least the
statistic's configured minimum shift (`min_shift`); the defect score is one of the statistics;
reject rates from the servers' verdicts."""

import pandas as pd
import pytest

from components.monitor.config import MonitorConfig, load_monitor_config
from components.monitor.step import compare, defect_rates, reject_rate, windows

pytestmark = pytest.mark.unit


def _samples():
    # Nine reference and six recent images whose values separate cleanly by a tiny margin:
    # the demo's press-a case (pred_frac_part_surface 0.220 -> 0.226 on its qa split).
    reference = pd.DataFrame(
        {
            "pred_frac_part_surface": [
                0.214,
                0.218,
                0.218,
                0.218,
                0.2195,
                0.2214,
                0.2224,
                0.2229,
                0.2231,
            ]
        }
    )
    recent = pd.DataFrame(
        {"pred_frac_part_surface": [0.2234, 0.2247, 0.2248, 0.2268, 0.2289, 0.2296]}
    )
    return reference, recent


def test_clean_but_immaterial_separation_moves_only_without_a_floor():
    reference, recent = _samples()
    config = MonitorConfig(statistics=("pred_frac_*",), min_samples=6)
    bare = compare(reference, recent, config)["pred_frac_part_surface"]
    assert bare["moved"] and bare["min_shift"] == 0.0  # PSI and KS both say "moved"

    floored = MonitorConfig(
        statistics=("pred_frac_*",), min_samples=6, min_shift={"pred_frac_*": 0.02}
    )
    result = compare(reference, recent, floored)["pred_frac_part_surface"]
    assert result["psi"] == bare["psi"] and result["ks_p_value"] == bare["ks_p_value"]
    assert result["min_shift"] == 0.02 and not result["moved"]


def test_a_material_shift_still_moves_with_the_shipped_floors():
    reference, recent = _samples()
    shifted = recent + 0.05  # five area-percent points more part surface
    config = load_monitor_config()
    assert config.shift_floor("pred_frac_part_surface") == 0.02
    assert config.shift_floor("brightness") == 5.0
    assert config.shift_floor("unlisted_statistic") == 0.0
    assert compare(reference, shifted, config.model_copy(update={"min_samples": 6}))[
        "pred_frac_part_surface"
    ]["moved"]


def test_negative_floor_is_rejected_naming_the_key():
    with pytest.raises(ValueError, match="min_shift"):
        MonitorConfig(statistics=("brightness",), min_shift={"brightness": -1.0})


def test_a_drifting_defect_score_moves_with_the_shipped_floor():
    config = load_monitor_config().model_copy(update={"min_samples": 6})
    assert "pred_defect_score" in config.statistics
    assert config.shift_floor("pred_defect_score") == 0.05
    reference = pd.DataFrame({"pred_defect_score": [0.02, 0.03, 0.04, 0.05, 0.03, 0.02, 0.04]})
    same = pd.DataFrame({"pred_defect_score": [0.03, 0.04, 0.02, 0.05, 0.03, 0.04]})
    assert not compare(reference, same, config)["pred_defect_score"]["moved"]
    risen = same + 0.3
    assert compare(reference, risen, config)["pred_defect_score"]["moved"]


def test_reject_rates_count_only_served_verdicts_and_compare_with_the_reference():
    reference = pd.DataFrame({"pred_defect_score": [0.1, 0.2, 0.6, 0.9]})
    recent = pd.DataFrame(
        {
            "unix_time": [0.0, 1.0, 2.0, 61.0, 62.0],
            "reject": [True, None, False, True, True],
            "threshold": [None, 0.5, 0.5, 0.5, 0.5],
            "pred_defect_score": [0.7, 0.4, 0.3, 0.8, 0.9],
        }
    )
    assert reject_rate(recent) == 0.75  # the row without a verdict counts for neither
    assert reject_rate(pd.DataFrame({"reject": [None, None]})) is None
    rates = defect_rates(reference, recent, prevalence=0.05, factor=3.0, enough=True)
    assert rates["threshold"] == 0.5
    assert rates["reference_reject_rate"] == 0.5  # 0.6 and 0.9 reach 0.5
    assert rates["recent_reject_rate"] == 0.75 and "15.0x" in rates["flag"]
    per_window = windows(recent, 60.0, ["pred_defect_score"])
    assert [w["reject_rate"] for w in per_window] == [0.5, 1.0]
    # A server without a threshold: scores still compared, no rate, no flag.
    unjudged = recent.assign(reject=None, threshold=None)
    rates = defect_rates(reference, unjudged, prevalence=0.05, factor=3.0, enough=True)
    assert rates["recent_reject_rate"] is None and rates["reference_reject_rate"] is None
    assert "flag" not in rates
