"""The machined parts of the synthetic scenes (cta_model/data/synthetic.py): plates, brackets
and flanges drawn as signed distance functions in part-local millimetres, with holes, slots and
bosses whose actual dimensions scatter around the nominal ones (the measurable features), the
pose that places a part in the image and the machining marks on its flat tops.

Coordinates: u, v in mm on the part (its local frame); a signed distance is negative inside.
Dimensions scale with the field of view so that a part fills the same share of any image size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_OUT_OF_TOLERANCE_RATE = 0.05
_METAL_ALBEDO = {
    "bracket": np.array([0.60, 0.62, 0.66]),
    "flange": np.array([0.72, 0.71, 0.69]),
    "plate": np.array([0.56, 0.60, 0.62]),
}


# --- signed distance functions (mm, negative inside) in part-local coordinates u, v ---

Sdf = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _circle(cu: float, cv: float, radius: float) -> Sdf:
    return lambda u, v: np.hypot(u - cu, v - cv) - radius


def _capsule(a: tuple[float, float], b: tuple[float, float], radius: float) -> Sdf:
    def sdf(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return _distance_to_segment(u, v, a, b) - radius

    return sdf


def _rounded_box(cu: float, cv: float, half_u: float, half_v: float, radius: float) -> Sdf:
    def sdf(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        qu = np.abs(u - cu) - (half_u - radius)
        qv = np.abs(v - cv) - (half_v - radius)
        outside = np.hypot(np.maximum(qu, 0), np.maximum(qv, 0))
        return outside + np.minimum(np.maximum(qu, qv), 0) - radius

    return sdf


def _union(*parts: Sdf) -> Sdf:
    return lambda u, v: np.minimum.reduce([part(u, v) for part in parts])


def _distance_to_segment(
    u: np.ndarray, v: np.ndarray, a: tuple[float, float], b: tuple[float, float]
) -> np.ndarray:
    du, dv = b[0] - a[0], b[1] - a[1]
    length_sq = du * du + dv * dv
    t = ((u - a[0]) * du + (v - a[1]) * dv) / max(length_sq, 1e-12)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(u - (a[0] + t * du), v - (a[1] + t * dv))


def distance_to_polyline(u: np.ndarray, v: np.ndarray, points: list[tuple[float, float]]):
    return np.minimum.reduce(
        [_distance_to_segment(u, v, points[i], points[i + 1]) for i in range(len(points) - 1)]
    )


# --- part designs ---


@dataclass
class Boss:
    sdf: Sdf
    height_mm: float
    chamfer_mm: float


@dataclass
class Cut:
    kind: str  # "hole" | "slot"
    sdf: Sdf
    top_mm: float  # surface height the cut starts from
    depth_mm: float | None  # None: through to the conveyor
    countersink_mm: float


@dataclass
class FeatureGeometry:
    feature_id: str
    type: str
    extent: list[tuple[float, float, float]]  # (u, v, radius) discs whose union bounds it
    nominal_mm: float
    actual_mm: float
    tolerance_mm: float


@dataclass
class Part:
    footprint: Sdf
    half_extent: tuple[float, float]  # local bounding box half sizes, for defect placement
    thickness_mm: float
    chamfer_mm: float
    bosses: list[Boss]
    cuts: list[Cut]
    features: list[FeatureGeometry]
    texture: str  # "linear" | "turned"
    texture_angle: float
    metal_albedo: np.ndarray


class Dimensions:
    """Draws actual dimensions around nominal ones and records them as features."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.features: list[FeatureGeometry] = []

    def actual(self, nominal: float, tolerance: float) -> float:
        if self.rng.random() < _OUT_OF_TOLERANCE_RATE:
            deviation = self.rng.choice([-1.0, 1.0]) * self.rng.uniform(1.2, 2.5) * tolerance
        else:
            deviation = float(np.clip(self.rng.normal(0, tolerance / 2.5), -tolerance, tolerance))
        return nominal + deviation

    def record(
        self,
        feature_id: str,
        feature_type: str,
        extent: list[tuple[float, float, float]],
        nominal: float,
        actual: float,
        tolerance: float,
    ) -> None:
        self.features.append(
            FeatureGeometry(feature_id, feature_type, extent, nominal, actual, tolerance)
        )

    def hole(
        self,
        index: int,
        cu: float,
        cv: float,
        diameter: float,
        top: float,
        depth: float | None,
        countersink: float,
    ) -> Cut:
        actual_diameter = self.actual(diameter, 0.2)
        extent = [(cu, cv, actual_diameter / 2)]
        self.record(
            f"hole-{index}-diameter", "hole_diameter", extent, diameter, actual_diameter, 0.2
        )
        actual_depth = None
        if depth is not None:
            actual_depth = self.actual(depth, 0.2)
            self.record(f"hole-{index}-depth", "hole_depth", extent, depth, actual_depth, 0.2)
        return Cut("hole", _circle(cu, cv, actual_diameter / 2), top, actual_depth, countersink)

    def slot(
        self,
        index: int,
        a: tuple[float, float],
        b: tuple[float, float],
        width: float,
        top: float,
        depth: float | None,
    ) -> Cut:
        actual_width = self.actual(width, 0.2)
        extent = [(a[0], a[1], actual_width / 2), (b[0], b[1], actual_width / 2)]
        self.record(f"slot-{index}-width", "slot_width", extent, width, actual_width, 0.2)
        return Cut("slot", _capsule(a, b, actual_width / 2), top, depth, 0.3)

    def boss(self, index: int, cu: float, cv: float, radius: float, height: float) -> Boss:
        actual_height = self.actual(height, 0.15)
        self.record(
            f"boss-{index}-height", "boss_height", [(cu, cv, radius)], height, actual_height, 0.15
        )
        return Boss(_circle(cu, cv, radius), actual_height, 0.5)


def _mm(fraction: float, fov: float) -> float:
    """A nominal drawing dimension: a fraction of the field of view, rounded to 0.1 mm."""
    return round(fraction * fov, 1)


def _plate(fov: float, dims: Dimensions) -> Part:
    thickness = dims.actual(6.0, 0.2)
    half_u, half_v = _mm(0.34, fov), _mm(0.24, fov)
    cuts = []
    for index, (su, sv) in enumerate([(-1, -1), (1, -1), (1, 1), (-1, 1)], start=1):
        cu, cv = su * _mm(0.26, fov), sv * _mm(0.16, fov)
        cuts.append(dims.hole(index, cu, cv, _mm(0.07, fov), thickness, None, 0.4))
    cuts.append(dims.hole(5, -_mm(0.12, fov), 0.0, _mm(0.09, fov), thickness, 3.0, 0.4))
    cuts.append(
        dims.slot(1, (_mm(0.04, fov), 0.0), (_mm(0.2, fov), 0.0), _mm(0.06, fov), thickness, 2.5)
    )
    return Part(
        footprint=_rounded_box(0, 0, half_u, half_v, _mm(0.05, fov)),
        half_extent=(half_u, half_v),
        thickness_mm=thickness,
        chamfer_mm=0.8,
        bosses=[],
        cuts=cuts,
        features=dims.features,
        texture="linear",
        texture_angle=0.0,
        metal_albedo=_METAL_ALBEDO["plate"],
    )


def _bracket(fov: float, dims: Dimensions) -> Part:
    thickness = dims.actual(10.0, 0.2)
    corner = _mm(0.03, fov)
    # An L: a long arm along u and a short arm along v, centred on the local origin.
    long_arm = _rounded_box(0.0, _mm(0.16, fov), _mm(0.36, fov), _mm(0.12, fov), corner)
    short_arm = _rounded_box(-_mm(0.24, fov), 0.0, _mm(0.12, fov), _mm(0.28, fov), corner)
    bosses, cuts = [], []
    boss_centres = [(_mm(0.22, fov), _mm(0.16, fov)), (-_mm(0.24, fov), -_mm(0.14, fov))]
    for index, (cu, cv) in enumerate(boss_centres, start=1):
        boss = dims.boss(index, cu, cv, _mm(0.075, fov), 4.0)
        bosses.append(boss)
        top = thickness + boss.height_mm
        cuts.append(dims.hole(index, cu, cv, _mm(0.06, fov), top, None, 0.3))
    slot_v = _mm(0.16, fov)
    cuts.append(
        dims.slot(
            1, (-_mm(0.04, fov), slot_v), (_mm(0.08, fov), slot_v), _mm(0.06, fov), thickness, None
        )
    )
    return Part(
        footprint=_union(long_arm, short_arm),
        half_extent=(_mm(0.36, fov), _mm(0.28, fov)),
        thickness_mm=thickness,
        chamfer_mm=1.2,
        bosses=bosses,
        cuts=cuts,
        features=dims.features,
        texture="linear",
        texture_angle=math.pi / 2,
        metal_albedo=_METAL_ALBEDO["bracket"],
    )


def _flange(fov: float, dims: Dimensions) -> Part:
    thickness = dims.actual(8.0, 0.2)
    hub = dims.boss(1, 0.0, 0.0, _mm(0.19, fov), 3.0)
    hub_top = thickness + hub.height_mm
    cuts = [dims.hole(1, 0.0, 0.0, _mm(0.2, fov), hub_top, None, 0.5)]
    bolt_radius = _mm(0.29, fov)
    for index in range(6):
        angle = index * math.pi / 3
        cu, cv = bolt_radius * math.cos(angle), bolt_radius * math.sin(angle)
        cuts.append(dims.hole(index + 2, cu, cv, _mm(0.055, fov), thickness, None, 0.3))
    # Keyway: a notch in the bore.
    cuts.append(
        dims.slot(1, (_mm(0.09, fov), 0.0), (_mm(0.125, fov), 0.0), _mm(0.035, fov), hub_top, None)
    )
    radius = _mm(0.38, fov)
    return Part(
        footprint=_circle(0.0, 0.0, radius),
        half_extent=(radius, radius),
        thickness_mm=thickness,
        chamfer_mm=1.0,
        bosses=[hub],
        cuts=cuts,
        features=dims.features,
        texture="turned",
        texture_angle=0.0,
        metal_albedo=_METAL_ALBEDO["flange"],
    )


PART_BUILDERS: dict[str, Callable[[float, Dimensions], Part]] = {
    "bracket": _bracket,
    "flange": _flange,
    "plate": _plate,
}
MAX_ROTATION = {"bracket": math.radians(10), "plate": math.radians(8), "flange": math.pi}


@dataclass
class Pose:
    centre: tuple[float, float]  # mm, image coordinates
    angle: float  # radians, local u axis measured from +x towards +y
    mirror: float  # +1 or -1 on the local u axis

    def to_local(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = x - self.centre[0], y - self.centre[1]
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        return self.mirror * (cos * dx + sin * dy), -sin * dx + cos * dy

    def to_image(self, u: float, v: float) -> tuple[float, float]:
        u = self.mirror * u
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        return self.centre[0] + cos * u - sin * v, self.centre[1] + sin * u + cos * v


def machining_texture(
    part: Part, u: np.ndarray, v: np.ndarray, pitch: float, phase: np.ndarray
) -> np.ndarray:
    """Milling or turning marks: sinusoids whose slope (about 1 degree) is resolution-free."""
    wavelength = max(1.5, 4 * pitch)  # never finer than 4 px, so it does not alias
    amplitude = 0.018 * wavelength / (2 * math.pi)
    if part.texture == "turned":
        along = np.hypot(u, v)
        across = np.arctan2(v, u) * 20 * wavelength / (2 * math.pi)
    else:
        cos, sin = math.cos(part.texture_angle), math.sin(part.texture_angle)
        along, across = cos * u + sin * v, -sin * u + cos * v
    return amplitude * np.sin(2 * math.pi * along / wavelength + phase[0]) + (
        amplitude / 3
    ) * np.sin(2 * math.pi * across / (2.7 * wavelength) + phase[1])


def surface_clearance(part: Part, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Distance (mm) from each point to the nearest edge of a flat top surface (<= 0: none)."""
    clearance = -part.footprint(u, v) - part.chamfer_mm
    for boss in part.bosses:
        clearance = np.minimum(clearance, np.abs(boss.sdf(u, v)) - boss.chamfer_mm)
    for cut in part.cuts:
        clearance = np.minimum(clearance, cut.sdf(u, v) - cut.countersink_mm)
    return clearance
