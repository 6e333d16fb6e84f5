"""The roll-out plan (YAML): ordered waves of lines, each with a mode, a bake and health gates.

Every line id must be in the fleet inventory (``configs/lines.yaml``); errors name the plan file
and the key (``waves[1].lines[0]: unknown line id ...``). A line may appear in one wave only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from cta_model.config import StrictModel, format_validation_error, read_yaml
from cta_model.data.lines import LinesConfig, load_lines_config, validate_line_id
from cta_model.errors import ConfigError

Mode = Literal["shadow", "live"]


class Bake(StrictModel):
    """How long a candidate is exercised before its health is judged: both minimums hold."""

    min_samples: int = Field(default=8, ge=1)
    min_seconds: float = Field(default=0.0, ge=0)


class HealthGates(StrictModel):
    """Thresholds; a gate left out (null) is measured and reported but not enforced."""

    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    max_p95_latency_ms: float | None = Field(default=None, gt=0)
    min_agreement: float | None = Field(default=None, ge=0, le=1)
    min_recall: float | None = Field(default=None, ge=0, le=1)


class Wave(StrictModel):
    name: str = Field(default="", max_length=63)
    lines: tuple[str, ...] = Field(min_length=1)
    mode: Mode
    bake: Bake = Bake()
    health: HealthGates = HealthGates()
    failure_policy: Literal["halt_and_rollback"] = "halt_and_rollback"

    @field_validator("lines", mode="before")
    @classmethod
    def _line_ids(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return tuple(validate_line_id(item) for item in value)
        return value

    @model_validator(mode="after")
    def _gates_fit_the_mode(self) -> Wave:
        # Shadow traffic never decides a part, so recall is a live-only gate; agreement needs
        # the line's current model beside the candidate, which only shadow mode runs.
        if self.mode == "shadow" and self.health.min_recall is not None:
            raise ValueError("health.min_recall applies to live waves only")
        if self.mode == "live" and self.health.min_agreement is not None:
            raise ValueError("health.min_agreement applies to shadow waves only")
        return self


class RolloutPlan(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")
    waves: tuple[Wave, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _each_line_once(self) -> RolloutPlan:
        seen: dict[str, int] = {}
        for index, wave in enumerate(self.waves):
            for line_id in wave.lines:
                if line_id in seen:
                    raise ValueError(
                        f"line {line_id!r} is in waves[{seen[line_id]}] and waves[{index}]; "
                        "a line belongs to one wave"
                    )
                seen[line_id] = index
        return self

    @property
    def line_ids(self) -> list[str]:
        return [line_id for wave in self.waves for line_id in wave.lines]

    def wave_of(self, line_id: str) -> int:
        return next(i for i, wave in enumerate(self.waves) if line_id in wave.lines)

    def digest(self) -> str:
        """sha256 of the plan's canonical JSON: a resumed roll-out must run the same plan."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()


def plan_from_dict(
    data: object, source: str, lines_config: LinesConfig | None = None
) -> RolloutPlan:
    """Validate ``data``; every line id is checked against the fleet inventory."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'name' and 'waves' at the top")
    try:
        plan = RolloutPlan.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None
    inventory = lines_config or load_lines_config()
    known = set(inventory.ids)
    for wave_index, wave in enumerate(plan.waves):
        for line_index, line_id in enumerate(wave.lines):
            if line_id not in known:
                raise ConfigError(
                    f"{source}: waves[{wave_index}].lines[{line_index}]: unknown line id "
                    f"{line_id!r} (not in {inventory.source}; known: {', '.join(inventory.ids)})"
                )
    return plan


#: The plan shipped with the package (what a pipeline uses when given none).
DEFAULT_PLAN = Path(__file__).resolve().parents[2] / "configs" / "rollout-plan.yaml"


def load_plan(path: str | Path, lines_config: LinesConfig | None = None) -> RolloutPlan:
    return plan_from_dict(read_yaml(path), str(path), lines_config)
