"""Drift decision per statistic: PSI and KS must agree, and the mean must move by at least the
statistic's configured minimum shift (`min_shift`)."""

import pandas as pd
import pytest

from components.monitor.config import MonitorConfig, load_monitor_config
from components.monitor.step import compare

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
