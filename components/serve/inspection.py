"""What a line server judges parts with (issue 15): the operating threshold and the line's
resolution rule.

**Operating threshold** (a defect score in [0, 1]; reject when ``score >= threshold``), first
found of:

1. ``--threshold``;
2. ``--evaluation FILE``: the threshold that evaluation.json (of this very model: its sha256 must
   match the served folder's) records for ``--line``, else overall;
3. when serving a registered version (``models:/NAME/<version>`` or an alias), the threshold its
   attached ``evaluation.json`` records for ``--line`` (``per_line.<line>.inspection.threshold``),
   else for all lines (``overall.inspection.threshold``): chosen on ``val`` for the target
   recall by `cta evaluate`, read through ``components.registry.attachments``;
4. none: ``/predict`` still gives the defect score, but its verdict is null with the reason.

**Resolution** (`cta_model.inspection.MIN_DEFECT_PX`): with ``--line`` naming a line of the
fleet inventory, the line's ``min_defect_width_mm`` must span at least 3 pixels at the pitch the
model sees, both for the line's camera at its native resolution (checked at start: the server
refuses to start) and for every received image (pitch = the line's field of view / the image's
short side; refused with 422).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cta_model.errors import ConfigError, DataError
from cta_model.inspection import check_defect_resolution, pitch_seen

log = logging.getLogger("cta.serve")

#: A request pitch this far outside the model's trained pitch range gets a warning.
PITCH_TOLERANCE = 0.25
FLAG = "--threshold"


@dataclass(frozen=True)
class OperatingThreshold:
    """The threshold a server applies, where it came from, or why there is none."""

    value: float | None
    source: str  # "--threshold", "models:/NAME/V evaluation.json <key>", or "none"
    reason: str | None = None  # why there is none

    def __post_init__(self) -> None:
        if self.value is not None and not (0.0 <= self.value <= 1.0 and math.isfinite(self.value)):
            raise ConfigError(
                f"threshold {self.value!r} from {self.source}: a defect score threshold is a "
                "number in [0, 1]"
            )


def threshold_in_evaluation(
    evaluation: Mapping[str, Any], line_id: str | None
) -> tuple[float, str] | None:
    """(threshold, its key) from an evaluation.json: the line's, else the overall one."""
    candidates = []
    if line_id:
        candidates.append(((evaluation.get("per_line") or {}).get(line_id), f"per_line.{line_id}"))
    candidates.append((evaluation.get("overall"), "overall"))
    for scored, key in candidates:
        inspection = (scored or {}).get("inspection") or {}
        if inspection.get("threshold") is not None:
            return float(inspection["threshold"]), f"{key}.inspection.threshold"
    return None


def registered_threshold(
    name: str, version: str, line_id: str | None, tracking_uri: str | None
) -> OperatingThreshold:
    """The threshold recorded in the evaluation.json attached to ``name`` ``version``."""
    from components.registry.attachments import read_registration
    from components.registry.client import mlflow_client
    from components.registry.names import version_uri

    uri = version_uri(name, version)
    try:
        registration = read_registration(mlflow_client(tracking_uri), name, version)
    except DataError as exc:  # e.g. an evaluation.json of an older schema
        return OperatingThreshold(None, "none", f"{uri}: its attachments are unreadable: {exc}")
    if registration.evaluation is None:
        return OperatingThreshold(None, "none", f"{uri} has no evaluation.json attached")
    found = threshold_in_evaluation(registration.evaluation, line_id)
    if found is None:
        where = f"line {line_id} or overall" if line_id else "overall"
        return OperatingThreshold(
            None, "none", f"{uri}: its evaluation.json records no inspection threshold ({where})"
        )
    value, key = found
    return OperatingThreshold(value, f"{uri} evaluation.json {key}")


def file_threshold(path: Any, line_id: str | None, served_sha256: str | None) -> OperatingThreshold:
    """The threshold an evaluation.json file records for this model (ConfigError when the file
    scored another model or records none)."""
    import json
    from pathlib import Path

    try:
        evaluation = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--evaluation {path}: unreadable: {exc}") from None
    scored = (evaluation.get("model") or {}).get("sha256")
    if served_sha256 and scored != served_sha256:
        raise ConfigError(
            f"--evaluation {path}: it scored the model with sha256 {scored}, not the served "
            f"{served_sha256}"
        )
    found = threshold_in_evaluation(evaluation, line_id)
    if found is None:
        raise ConfigError(f"--evaluation {path}: records no inspection threshold")
    value, key = found
    return OperatingThreshold(value, f"--evaluation {path} {key}")


def operating_threshold(
    flag: float | None,
    name: str | None,
    version: str | None,
    line_id: str | None,
    tracking_uri: str | None,
    *,
    evaluation_file: Any = None,
    served_sha256: str | None = None,
) -> OperatingThreshold:
    """``--threshold`` > ``--evaluation`` > the registered version's evaluation (for the line)
    > none."""
    if flag is not None:
        return OperatingThreshold(float(flag), FLAG)
    if evaluation_file is not None:
        return file_threshold(evaluation_file, line_id, served_sha256)
    if name and version:
        return registered_threshold(name, version, line_id, tracking_uri)
    return OperatingThreshold(
        None, "none", "no --threshold given and the model is a folder, not a registered version"
    )


class LineResolution:
    """The 3-pixel rule of one line for one model (``card``: its ModelCard)."""

    def __init__(self, line: Any, card: Any, inventory: str = "configs/lines.yaml") -> None:
        self.line = line
        self.inventory = inventory  # the file the line's min_defect_width_mm comes from
        self.input_size = tuple(card.spec.input_size)
        self.resize_policy = card.input.resize_policy
        self.trained_pitch = card.trained_pitch_mm_per_px
        self._warned = threading.Event()

    def check_camera(self) -> None:
        """ConfigError naming the line when its camera's images (native resolution and pitch)
        would show its smallest defect over fewer than 3 pixels to this model."""
        line = self.line
        seen = pitch_seen(
            line.pitch_mm_per_px, line.resolution, self.input_size, self.resize_policy
        )
        where = (
            f"cta serve --line {line.id}: images of {line.resolution[0]}x{line.resolution[1]} px "
            f"at {line.pitch_mm_per_px:g} mm/px (model input {self.input_size[0]}x"
            f"{self.input_size[1]}, {self.resize_policy})"
        )
        check_defect_resolution(line.id, line.min_defect_width_mm, seen, where, self.inventory)

    def image_pitch(self, height: int, width: int) -> float:
        return self.line.field_of_view_mm / min(height, width)

    def check_image(self, height: int, width: int) -> None:
        """ConfigError naming the line when this image's smallest defect spans < 3 px where the
        model sees it; a warning (once) when its pitch is far outside the trained range."""
        pitch = self.image_pitch(height, width)
        seen = pitch_seen(pitch, (height, width), self.input_size, self.resize_policy)
        where = f"/predict: a {height}x{width} image from line {self.line.id} ({pitch:.3g} mm/px)"
        check_defect_resolution(
            self.line.id, self.line.min_defect_width_mm, seen, where, self.inventory
        )
        if self.trained_pitch is None or self._warned.is_set():
            return
        low, high = self.trained_pitch
        if pitch < low * (1 - PITCH_TOLERANCE) or pitch > high * (1 + PITCH_TOLERANCE):
            self._warned.set()
            log.warning(
                "line %s: a %dx%d image has pitch %.3g mm/px, more than %d %% outside the "
                "model's trained pitch %.3g-%.3g mm/px; its scores may not mean what they did "
                "on val (warned once)",
                self.line.id,
                height,
                width,
                pitch,
                round(PITCH_TOLERANCE * 100),
                low,
                high,
            )


__all__ = [
    "LineResolution",
    "OperatingThreshold",
    "operating_threshold",
    "registered_threshold",
    "threshold_in_evaluation",
]
