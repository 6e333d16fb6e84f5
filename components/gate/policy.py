"""The gate policy (DESIGN 5.3, 7): one strict YAML file, unknown keys refused.

Every check a policy switches on ends in the verdict with its value and threshold; a check whose
input is missing (no roi.json attached, Delta_m null, no comparison with the champion) FAILS with
the reason, it is never skipped. A check is off when its section is absent or null, except
data validation, which is on unless set to null or ``required: false``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from cta_model.config import StrictModel, load_config

POLICY_VERSION = 1
#: The strict policy shipped with the package (what a pipeline uses when given none).
DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "configs" / "gate.yaml"
#: evaluation.json vs_champion.inspection figures a policy may hold to a margin.
INSPECTION_FIGURES = ("recall", "frr", "image_auroc")


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}")
    return value


class DataValidation(StrictModel):
    #: dataset_ref.json must be attached and say passed: true.
    required: bool = True


class InspectionMargins(StrictModel):
    """Margins (absolute fractions, e.g. 0.02 = 2 points) for the inspection figures."""

    recall: float | None = Field(default=None, ge=0)
    frr: float | None = Field(default=None, ge=0)
    image_auroc: float | None = Field(default=None, ge=0)


class NonInferiority(StrictModel):
    """Pass when the bootstrap p05 of (candidate - champion, positive = better) > -margin."""

    #: task name -> margin in the unit of that task's primary metric.
    task_margins: dict[str, float] = Field(default_factory=dict)
    inspection: InspectionMargins = Field(default_factory=InspectionMargins)

    @field_validator("task_margins")
    @classmethod
    def _known_tasks(cls, margins: dict[str, float]) -> dict[str, float]:
        from cta_model.tasks import TASKS

        for task, margin in margins.items():
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
            _finite(margin, f"margin of {task!r}")
            if margin < 0:
                raise ValueError(f"margin of {task!r} must be >= 0, got {margin}")
        return margins


class DeltaM(StrictModel):
    #: Delta_m (percent, higher = better) must be >= this.
    min_pct: float
    #: which Delta_m of evaluation.json: over primary metrics, or averaged per task.
    variant: Literal["primary", "task_avg"] = "primary"

    @field_validator("min_pct")
    @classmethod
    def _finite_min(cls, value: float) -> float:
        return _finite(value, "min_pct")


class Roi(StrictModel):
    #: P(ROI > 0) from roi.json must be >= this.
    min_p_roi_positive: float = Field(ge=0, le=1)
    #: the pilot line's figures or the fleet's.
    scope: Literal["pilot", "fleet"] = "pilot"


class Approval(StrictModel):
    #: a named approver (--approver) is required for a pass.
    required: bool = False


class GatePolicy(StrictModel):
    schema_version: Literal[1] = POLICY_VERSION
    data_validation: DataValidation | None = Field(default_factory=DataValidation)
    #: "<task>.<metric>" -> the worst allowed overall value (a minimum for higher-is-better
    #: metrics, a maximum for lower-is-better ones; direction from cta_model.tasks).
    absolute_minimums: dict[str, float] = Field(default_factory=dict)
    non_inferiority: NonInferiority | None = None
    #: per task, Delta_m vs its STL baseline (percent, higher = better) must be >= -this.
    max_task_regression_pct: float | None = Field(default=None, ge=0)
    delta_m: DeltaM | None = None
    roi: Roi | None = None
    approval: Approval = Field(default_factory=Approval)
    #: with no champion yet: pass, or require a named approver.
    when_no_champion: Literal["pass", "require_approval"] = "require_approval"
    #: a switched-on check whose input is missing fails (stated here so a policy cannot be
    #: read as skipping it).
    on_missing_input: Literal["fail"] = "fail"

    @field_validator("absolute_minimums")
    @classmethod
    def _known_metrics(cls, minimums: dict[str, float]) -> dict[str, float]:
        from cta_model.tasks import TASKS, metric_directions

        known = metric_directions(TASKS)
        for key, value in minimums.items():
            if key not in known:
                raise ValueError(
                    f"unknown metric {key!r}; use '<task>.<metric>' from the task registry "
                    f"(e.g. {', '.join(sorted(known)[:4])}, ...)"
                )
            _finite(value, f"minimum of {key!r}")
        return minimums

    def sha256(self) -> str:
        """Digest of the validated policy (comments and key order do not change it)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_policy(path: str | Path) -> GatePolicy:
    """The validated policy of ``path``; ConfigError naming the file and the key otherwise."""
    return load_config(GatePolicy, path)


__all__ = ["GatePolicy", "INSPECTION_FIGURES", "load_policy"]
