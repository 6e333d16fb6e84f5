"""`configs/monitor.yaml` as a pydantic model (unknown keys refused, errors name the key)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from pydantic import Field, NonNegativeFloat

from cta_model.config import StrictModel, load_config

DEFAULT_MONITOR_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "monitor.yaml"


class MonitorConfig(StrictModel):
    statistics: tuple[str, ...] = Field(min_length=1)
    psi_threshold: float = Field(default=0.25, gt=0)
    ks_alpha: float = Field(default=0.01, gt=0, lt=1)
    psi_bins: int = Field(default=10, ge=2, le=100)
    min_samples: int = Field(default=20, ge=2)
    window_s: float = Field(default=60.0, gt=0)
    defect_rate_factor: float = Field(default=3.0, gt=1)
    #: glob pattern over statistic names -> smallest |mean shift| that counts, in the
    #: statistic's own unit (first matching pattern wins; unmatched statistics have no floor)
    min_shift: dict[str, NonNegativeFloat] = Field(default_factory=dict)

    def shift_floor(self, statistic: str) -> float:
        for pattern, floor in self.min_shift.items():
            if fnmatch.fnmatchcase(statistic, pattern):
                return floor
        return 0.0


def load_monitor_config(path: str | Path = DEFAULT_MONITOR_CONFIG) -> MonitorConfig:
    return load_config(MonitorConfig, path)
