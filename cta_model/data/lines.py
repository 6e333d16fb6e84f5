"""The fleet inventory, ``configs/lines.yaml``: one pydantic model per entry, unknown keys rejected.

Every error raised while loading names the file and the key path, e.g.
``configs/lines.yaml: lines[2].id: ...``, and the entry's line id (``... (line mill-c)``), so
that a person editing the file can find the line. No float may be NaN or infinite.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from cta_model.config import format_validation_error, read_yaml
from cta_model.data.synthetic import DEFECT_CLASSES
from cta_model.errors import ConfigError

# Valid as an MLflow alias suffix (`line-<id>`) and as a Kubernetes name; never a bare number.
LINE_ID_PATTERN = r"^[a-z]([a-z0-9-]{0,29}[a-z0-9])?$"
_LINE_ID_RE = re.compile(LINE_ID_PATTERN)

DEFAULT_LINES_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "lines.yaml"
#: Names the fleet inventory used wherever none is given (flag > this > configs/lines.yaml).
LINES_CONFIG_ENV = "CTA_LINES_CONFIG"


def default_lines_config() -> Path:
    """The inventory used when a caller names none: $CTA_LINES_CONFIG, else configs/lines.yaml."""
    value = os.environ.get(LINES_CONFIG_ENV)
    return Path(value) if value else DEFAULT_LINES_CONFIG


SensorName = Literal["rgb", "height"]
ServingTarget = Literal["local", "kubernetes", "gitops"]
PartType = Literal["bracket", "flange", "plate"]


def validate_line_id(value: Any) -> str:
    """Return ``value`` if it is a well-formed line id, else raise ValueError saying why."""
    if isinstance(value, bool | int | float):
        raise ValueError(
            f"line id {value!r} is a number (YAML reads unquoted digits as a number); "
            f"use a name such as 'line-{value}' matching {LINE_ID_PATTERN}"
        )
    if not isinstance(value, str):
        raise ValueError(f"line id must be a string, got {type(value).__name__}")
    if not _LINE_ID_RE.fullmatch(value):
        raise ValueError(
            f"line id {value!r} is malformed: it must match {LINE_ID_PATTERN} "
            "(lower-case letters, digits and hyphens, starting with a letter, at most 31 chars)"
        )
    return value


#: Bounds of a camera side (pixels): the largest sensors are ~30000 px wide; above this a value
#: is a typo (or 1e9), and image size limits derive from the resolution.
MAX_RESOLUTION_PX = 65536
#: Light colour components are relative intensities (1 = one unit light); above this the
#: synthetic images saturate to white.
MAX_LIGHT_COLOR = 10.0


class _Strict(BaseModel):
    # No NaN or infinity in any float: a NaN light azimuth renders all-black images, an infinite
    # parts_per_hour makes every ROI figure infinite.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SyntheticLineSpec(_Strict):
    """Knobs of the synthetic scene generator for one line (see cta_model.data.synthetic)."""

    part_type: PartType
    light_azimuths_deg: tuple[float, float, float]
    light_elevation_deg: float = Field(gt=5, lt=85)
    light_colors: tuple[
        tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]
    ]
    ambient: float = Field(ge=0, le=1)
    specular: float = Field(ge=0, le=2)
    shininess: float = Field(default=40.0, gt=1, le=1000)
    noise_std: float = Field(ge=0, le=0.2)
    vignetting: float = Field(ge=0, lt=1)
    defect_prevalence: float = Field(ge=0, le=1)
    defect_mix: dict[str, float]
    dropout_rate: float = Field(ge=0, le=0.5)
    segmentation_label_fraction: float = Field(default=1.0, ge=0, le=1)

    @field_validator("light_colors")
    @classmethod
    def _colors_distinct(cls, colors: tuple[tuple[float, float, float], ...]) -> Any:
        for color in colors:
            if min(color) < 0 or max(color) <= 0 or max(color) > MAX_LIGHT_COLOR:
                raise ValueError(
                    f"each light colour needs components in [0, {MAX_LIGHT_COLOR:g}], not all 0: "
                    f"{color}"
                )
        # Colour photometric stereo inverts the 3x3 colour matrix: it must be well conditioned.
        if _condition_number(colors) > 50:
            raise ValueError(
                "the three light colours are too similar for colour photometric stereo "
                f"(condition number {_condition_number(colors):.0f} > 50); make them distinct"
            )
        return colors

    @field_validator("light_azimuths_deg")
    @classmethod
    def _azimuths_spread(cls, azimuths: tuple[float, float, float]) -> Any:
        for i in range(3):
            for j in range(i + 1, 3):
                gap = abs((azimuths[i] - azimuths[j] + 180) % 360 - 180)
                if gap < 30:
                    raise ValueError(
                        f"light azimuths {azimuths[i]} and {azimuths[j]} are {gap:.0f} deg apart; "
                        "photometric stereo needs at least 30 deg between lights"
                    )
        return azimuths

    @field_validator("defect_mix")
    @classmethod
    def _mix_names_defects(cls, mix: dict[str, float]) -> dict[str, float]:
        for name, weight in mix.items():
            if name not in DEFECT_CLASSES:
                raise ValueError(
                    f"unknown defect class {name!r}; known: {', '.join(DEFECT_CLASSES)}"
                )
            if not (weight >= 0 and math.isfinite(weight)):
                raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {weight}")
        if sum(mix.values()) <= 0:
            raise ValueError("at least one defect class needs a weight > 0")
        return mix


class LineSpec(_Strict):
    """One production line of the fleet."""

    id: str
    site: str = Field(min_length=1)
    camera: str = Field(min_length=1)
    resolution: tuple[int, int]
    pitch_mm_per_px: float = Field(gt=0, le=10)
    sensors: tuple[SensorName, ...]
    parts_per_hour: float = Field(gt=0)
    hours_per_year: float = Field(gt=0, le=8784)
    defect_prevalence: float = Field(ge=0, le=1)
    pilot: bool
    serving_target: ServingTarget
    # The narrowest reject defect the line must catch (mm); the model must see it over at least
    # cta_model.inspection.MIN_DEFECT_PX pixels. None: the line states none (nothing checked).
    min_defect_width_mm: float | None = Field(default=None, gt=0, le=1000)
    # None for a real line that has no synthetic twin; `cta data generate` refuses such a line.
    synthetic: SyntheticLineSpec | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _valid_id(cls, value: Any) -> str:
        return validate_line_id(value)

    @field_validator("resolution")
    @classmethod
    def _positive_resolution(cls, resolution: tuple[int, int]) -> tuple[int, int]:
        if min(resolution) < 1 or max(resolution) > MAX_RESOLUTION_PX:
            raise ValueError(
                f"resolution is [height, width] in pixels, each in [1, {MAX_RESOLUTION_PX}], "
                f"got {list(resolution)}"
            )
        return resolution

    @field_validator("sensors")
    @classmethod
    def _sensors_include_rgb(cls, sensors: tuple[str, ...]) -> tuple[str, ...]:
        if "rgb" not in sensors:
            raise ValueError("every line has an 'rgb' camera; list it in sensors")
        if len(set(sensors)) != len(sensors):
            raise ValueError(f"sensors listed twice: {list(sensors)}")
        return sensors

    @property
    def has_height_sensor(self) -> bool:
        return "height" in self.sensors

    @property
    def field_of_view_mm(self) -> float:
        """Side of the square field of view the synthetic scenes cover (the camera's short side)."""
        return min(self.resolution) * self.pitch_mm_per_px


class LinesConfig(_Strict):
    """The whole inventory. ``source`` (the file it came from) is used in error messages."""

    lines: tuple[LineSpec, ...] = Field(min_length=1)
    _source: str = PrivateAttr(default="<lines config>")

    @field_validator("lines")
    @classmethod
    def _ids_unique(cls, lines: tuple[LineSpec, ...]) -> tuple[LineSpec, ...]:
        first_index: dict[str, int] = {}
        for index, line in enumerate(lines):
            if line.id in first_index:
                raise ValueError(
                    f"line id {line.id!r} appears twice (lines[{first_index[line.id]}] "
                    f"and lines[{index}])"
                )
            first_index[line.id] = index
        return lines

    @model_validator(mode="after")
    def _one_pilot(self) -> LinesConfig:
        pilots = [line.id for line in self.lines if line.pilot]
        if len(pilots) != 1:
            raise ValueError(
                f"exactly one line must have pilot: true (roll-outs start there), found "
                f"{len(pilots)}: {pilots}"
            )
        return self

    @property
    def source(self) -> str:
        return self._source

    @property
    def ids(self) -> list[str]:
        return [line.id for line in self.lines]

    @property
    def pilot(self) -> LineSpec:
        return next(line for line in self.lines if line.pilot)

    def get(self, line_id: str) -> LineSpec:
        """The line with this id; ConfigError naming the id, the file and the known ids."""
        for line in self.lines:
            if line.id == line_id:
                return line
        raise ConfigError(
            f"{self._source}: unknown line id {line_id!r}; known: {', '.join(self.ids)}"
        )

    def first(self, n_lines: int) -> list[LineSpec]:
        """The first ``n_lines`` lines in file order (``--lines N``)."""
        if not 1 <= n_lines <= len(self.lines):
            raise ConfigError(
                f"{self._source}: asked for {n_lines} lines but the file lists "
                f"{len(self.lines)} ({', '.join(self.ids)})"
            )
        return list(self.lines[:n_lines])

    @classmethod
    def from_dict(cls, data: Any, source: str = "<lines config>") -> LinesConfig:
        """Validate ``data`` (parsed YAML); ConfigError messages start with ``source``."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: expected a mapping with a 'lines' list at the top, "
                f"got {type(data).__name__}"
            )
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            message = format_validation_error(source, exc)
            raise ConfigError(_named_by_line_id(message, data)) from None
        config._source = source
        return config


def load_lines_config(path: str | Path | None = None) -> LinesConfig:
    """Read and validate a lines file (default: `default_lines_config()`); every problem is a
    ConfigError naming file and key."""
    path = default_lines_config() if path is None else path
    return LinesConfig.from_dict(read_yaml(path), source=str(path))


def _named_by_line_id(message: str, data: dict[str, Any]) -> str:
    """Each problem under ``lines[i]`` ends with ``(line <id>)``: the id finds the entry in the
    file (not for the id's own problems, whose message shows the value)."""
    entries = data.get("lines")
    if not isinstance(entries, list):
        return message
    named = []
    for problem in message.splitlines():
        match = re.search(r": lines\[(\d+)\](\.id)?", problem)
        if match and not match.group(2) and int(match.group(1)) < len(entries):
            entry = entries[int(match.group(1))]
            line_id = entry.get("id") if isinstance(entry, dict) else None
            if isinstance(line_id, str):
                problem += f" (line {line_id})"
        named.append(problem)
    return "\n".join(named)


def _condition_number(rows: Sequence[Sequence[float]]) -> float:
    import numpy as np

    singular_values = np.linalg.svd(np.asarray(rows, dtype=float), compute_uv=False)
    return float(singular_values[0] / max(singular_values[-1], 1e-12))
