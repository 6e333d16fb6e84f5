"""``configs/roi.yaml``: the ROI inputs (DESIGN 8), each with a base value and low/high.

Unknown keys are refused and every error names the file and the key, e.g.
``configs/roi.yaml: C_escape.low: must be >= 0``. Per-line overrides are keyed by line ids that
must exist in ``configs/lines.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from cta_model.config import StrictModel, format_validation_error, read_yaml
from cta_model.data.lines import LinesConfig, LineSpec
from cta_model.errors import ConfigError

from .roi import LineEconomics

DEFAULT_ROI_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "roi.yaml"

FlagAction = Literal["scrap", "rework", "manual_check"]


class Ranged(StrictModel):
    """A base value with the low and high values the tornado chart tries."""

    base: float
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Ranged:
        if not self.low <= self.base <= self.high:
            raise ValueError(
                f"needs low <= base <= high, got low={self.low}, base={self.base}, high={self.high}"
            )
        return self

    def values(self) -> tuple[float, float, float]:
        return self.base, self.low, self.high


class Money(Ranged):
    """An amount of the report's currency; never negative."""

    base: float = Field(ge=0)
    low: float = Field(ge=0)
    high: float = Field(ge=0)


class Fraction(Ranged):
    """A probability or rate in [0, 1]."""

    base: float = Field(ge=0, le=1)
    low: float = Field(ge=0, le=1)
    high: float = Field(ge=0, le=1)


class Positive(Ranged):
    base: float = Field(gt=0)
    low: float = Field(gt=0)
    high: float = Field(gt=0)


class Years(Ranged):
    base: int = Field(ge=1, le=30)
    low: int = Field(ge=1, le=30)
    high: int = Field(ge=1, le=30)


class Rate(Ranged):
    """A yearly discount rate (0.08 = 8 %)."""

    base: float = Field(ge=0, lt=1)
    low: float = Field(ge=0, lt=1)
    high: float = Field(ge=0, lt=1)


class LineInputs(StrictModel):
    """Inputs a line may override (every field optional here; None = the global value)."""

    flag_action: FlagAction | None = None
    C_escape: Money | None = None
    C_handle: Money | None = None
    C_fr: Money | None = None
    ops_annual: Money | None = None
    device_annual_cost: Money | None = None
    images_per_s_per_device: Positive | None = None
    images_per_part: Positive | None = None
    r0: Fraction | None = None
    f0: Fraction | None = None
    manual_cost_per_part: Money | None = None
    labelling: Money | None = None
    integration: Money | None = None
    #: Production prevalence; when absent, configs/lines.yaml's value x defect_prevalence_factor.
    defect_prevalence: Fraction | None = None


class InferenceDevice(StrictModel):
    name: str = Field(min_length=1)
    device_annual_cost: Money
    images_per_s_per_device: Positive


class CurrentProcess(StrictModel):
    description: str = Field(min_length=1)
    r0: Fraction
    f0: Fraction
    manual_cost_per_part: Money


class Investment(StrictModel):
    labelling: Money
    integration: Money
    training_compute: Money
    pilot: Money


class RoiConfig(StrictModel):
    currency: str = Field(min_length=1, max_length=8)
    horizon_years: Years
    discount_rate: Rate
    flag_action: FlagAction
    C_escape: Money
    C_handle: Money
    C_fr: Money
    ops_annual: Money
    inference_device: InferenceDevice
    images_per_part: Positive
    current_process: CurrentProcess
    investment: Investment
    defect_prevalence_factor: Positive
    line_overrides: dict[str, LineInputs] = Field(default_factory=dict)


#: The ranged inputs of a line, as LineEconomics field names (the tornado's rows).
RANGED_INPUTS = (
    "defect_prevalence",
    "C_escape",
    "C_handle",
    "C_fr",
    "ops_annual",
    "device_annual_cost",
    "images_per_s_per_device",
    "images_per_part",
    "r0",
    "f0",
    "manual_cost_per_part",
    "labelling",
    "integration",
    "training_compute",
    "pilot",
    "horizon_years",
    "discount_rate",
)

#: Unit and meaning of every input (the report's input table).
INPUT_DOCS: dict[str, tuple[str, str]] = {
    "parts_per_hour": ("parts/h", "line throughput (configs/lines.yaml)"),
    "hours_per_year": ("h/year", "production hours per year (configs/lines.yaml)"),
    "defect_prevalence": ("fraction", "production defect prevalence p"),
    "recall": ("fraction", "model defect recall r on the test split (evaluation.json)"),
    "frr": ("fraction", "model false-reject rate f on the test split (evaluation.json)"),
    "flag_action": ("-", "what happens to a flagged part: scrap | rework | manual_check"),
    "C_escape": ("{cur}/part", "cost of a defective part that escapes to the customer"),
    "C_handle": ("{cur}/part", "cost of handling one flagged part"),
    "C_fr": ("{cur}/part", "value lost per good part scrapped (only when flag_action = scrap)"),
    "ops_annual": ("{cur}/year", "retraining, monitoring and relabelling per line"),
    "device_annual_cost": ("{cur}/year", "one inference device per year (amortised + power)"),
    "images_per_s_per_device": ("images/s", "throughput of one inference device"),
    "images_per_part": ("images", "images taken of each part"),
    "r0": ("fraction", "recall of the current process"),
    "f0": ("fraction", "false-reject rate of the current process"),
    "manual_cost_per_part": ("{cur}/part", "manual inspection cost of the current process"),
    "labelling": ("{cur}", "labelling the line's data (per line)"),
    "integration": ("{cur}", "integrating the model on the line (per line)"),
    "training_compute": ("{cur}", "training compute (once for the fleet)"),
    "pilot": ("{cur}", "the pilot on the pilot line (once for the fleet)"),
    "horizon_years": ("years", "horizon H of NPV and ROI"),
    "discount_rate": ("1/year", "discount rate d of the NPV"),
}


def load_roi_config(path: str | Path, lines: LinesConfig) -> RoiConfig:
    """Read and validate ``path``; every problem is a ConfigError naming the file and key."""
    source = str(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        config = RoiConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None
    check_against_lines(config, lines, source)
    return config


def check_against_lines(config: RoiConfig, lines: LinesConfig, source: str) -> None:
    """Override ids must be lines of the fleet; scaled prevalences must stay in [0, 1]."""
    for line_id in config.line_overrides:
        if line_id not in lines.ids:
            raise ConfigError(
                f"{source}: line_overrides.{line_id}: unknown line id {line_id!r}; "
                f"known in {lines.source}: {', '.join(lines.ids)}"
            )
    for line in lines.lines:
        override = config.line_overrides.get(line.id)
        if override is not None and override.defect_prevalence is not None:
            continue
        for which, factor in zip(
            ("base", "low", "high"), config.defect_prevalence_factor.values(), strict=True
        ):
            scaled = line.defect_prevalence * factor
            if scaled > 1:
                raise ConfigError(
                    f"{source}: defect_prevalence_factor.{which}: {factor} x the "
                    f"defect_prevalence {line.defect_prevalence} of line {line.id!r} "
                    f"({lines.source}) is {scaled:.3g}, outside [0, 1]"
                )


def line_ranges(config: RoiConfig, line: LineSpec) -> dict[str, tuple[float, float, float]]:
    """(base, low, high) of every ranged input of ``line``, overrides applied."""
    override = config.line_overrides.get(line.id, LineInputs())
    device = config.inference_device
    process = config.current_process

    def pick(name: str, default: Ranged) -> tuple[float, float, float]:
        value = getattr(override, name)
        return (value or default).values()

    if override.defect_prevalence is not None:
        prevalence = override.defect_prevalence.values()
    else:
        prevalence = tuple(
            line.defect_prevalence * factor for factor in config.defect_prevalence_factor.values()
        )
    return {
        "defect_prevalence": prevalence,
        "C_escape": pick("C_escape", config.C_escape),
        "C_handle": pick("C_handle", config.C_handle),
        "C_fr": pick("C_fr", config.C_fr),
        "ops_annual": pick("ops_annual", config.ops_annual),
        "device_annual_cost": pick("device_annual_cost", device.device_annual_cost),
        "images_per_s_per_device": pick("images_per_s_per_device", device.images_per_s_per_device),
        "images_per_part": pick("images_per_part", config.images_per_part),
        "r0": pick("r0", process.r0),
        "f0": pick("f0", process.f0),
        "manual_cost_per_part": pick("manual_cost_per_part", process.manual_cost_per_part),
        "labelling": pick("labelling", config.investment.labelling),
        "integration": pick("integration", config.investment.integration),
        "training_compute": config.investment.training_compute.values(),
        "pilot": config.investment.pilot.values(),
        "horizon_years": config.horizon_years.values(),
        "discount_rate": config.discount_rate.values(),
    }


def line_economics(
    config: RoiConfig, line: LineSpec, recall: float, frr: float
) -> tuple[LineEconomics, dict[str, tuple[float, float]]]:
    """The line's base-case inputs and the (low, high) of each ranged input."""
    ranges = line_ranges(config, line)
    override = config.line_overrides.get(line.id, LineInputs())
    base: dict[str, Any] = {name: values[0] for name, values in ranges.items()}
    base["horizon_years"] = int(base["horizon_years"])
    economics = LineEconomics(
        parts_per_hour=line.parts_per_hour,
        hours_per_year=line.hours_per_year,
        recall=recall,
        frr=frr,
        flag_action=override.flag_action or config.flag_action,
        **base,
    )
    return economics, {name: (values[1], values[2]) for name, values in ranges.items()}
