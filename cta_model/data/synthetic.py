"""Physically consistent synthetic inspection scenes (DESIGN 4.4), numpy only.

One sample is a machined part lying on a conveyor, seen from above by an RGB camera under three
coloured lights, with an optional height sensor. Everything is derived from one height field so
the tasks are genuinely related:

* ``height_clean`` (mm): conveyor at 0, the part (holes, bosses, slots, chamfers, machining
  texture) above it, defects carved into or raised from its top surface.
* ``normals``: from the height gradient with the pixel pitch (``normals_from_height``).
* ``image``: albedo x sum over three coloured lights of max(0, n.l) (colour photometric stereo:
  the RGB encodes the normals), a Blinn-Phong highlight, ambient, vignetting and noise.
* ``height``: ``height_clean`` with NaN where a real sensor drops out (steep walls, specular
  saturation, small random blobs), at the line's configured rate on average.
* ``semseg``: one class per pixel (``CLASS_NAMES``); defects labelled with their class.

Conventions (DESIGN 4.1): x = image right (columns), y = image down (rows), z towards the camera;
a pixel's centre is at ((col + 0.5) * pitch, (row + 0.5) * pitch) mm. Attached shadows only
(max(0, n.l)); no cast shadows or inter-reflections, so photometric stereo is exact up to
noise and quantisation on pixels that all three lights reach.

Determinism: each sample draws from ``np.random.SeedSequence([seed, line_key, sample_index])``
(``line_key`` from a hash of the line id, so adding a line to the inventory changes no other
line's data), hence the same seed gives the same arrays whatever the generation order.

Sizes: the scene covers a square field of view equal to the camera's short side
(``LineSpec.field_of_view_mm``) rendered at ``min(height, width)`` pixels, so the pitch of the
rendered image is ``field_of_view_mm / min(height, width)``. Part dimensions scale with the
field of view; defects are kept at least about a pixel wide so that every labelled defect is
visible at the rendered size, and their depth scales with their width so that their slopes (what
the lights see) do not depend on the resolution.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cta_model.data.lines import LineSpec, SyntheticLineSpec

CLASS_NAMES: tuple[str, ...] = (
    "conveyor",
    "part_surface",
    "hole",
    "boss_top",
    "slot",
    "scratch",
    "dent",
    "bump",
    "crack",
    "stain",
)
CLASS_IDS: dict[str, int] = {name: index for index, name in enumerate(CLASS_NAMES)}
DEFECT_CLASSES: tuple[str, ...] = ("scratch", "dent", "bump", "crack", "stain")
DEFECT_CLASS_IDS: tuple[int, ...] = tuple(CLASS_IDS[name] for name in DEFECT_CLASSES)
NUM_CLASSES = len(CLASS_NAMES)

FEATURE_TYPES: tuple[str, ...] = ("hole_diameter", "hole_depth", "boss_height", "slot_width")

# Brightness of a flat, white (albedo 1) surface in its brightest channel, before vignetting:
# leaves head-room for highlights so that only genuine specular peaks saturate.
_EXPOSURE = 0.8
# Share of the drop-out budget spent on random blobs; the rest goes to the steepest and most
# saturated pixels, the places where a triangulation sensor really loses the surface.
_BLOB_SHARE = 0.25
_OUT_OF_TOLERANCE_RATE = 0.05
_CONVEYOR_ALBEDO = np.array([0.30, 0.34, 0.32])
_METAL_ALBEDO = {
    "bracket": np.array([0.60, 0.62, 0.66]),
    "flange": np.array([0.72, 0.71, 0.69]),
    "plate": np.array([0.56, 0.60, 0.62]),
}
_STAIN_COLOR = np.array([0.55, 0.42, 0.28])


@dataclass(frozen=True)
class Lighting:
    """The three lights as the renderer uses them (exposure already folded into the colours).

    Diffuse radiance of a pixel in channel c is
    ``albedo_c * (ambient_rgb_c + sum_k colors[k, c] * max(0, n . directions[k]))``.
    """

    directions: np.ndarray  # (3, 3): row k = unit vector towards light k
    colors: np.ndarray  # (3, 3): row k = RGB radiance of light k
    ambient_rgb: np.ndarray  # (3,)
    half_vectors: np.ndarray  # (3, 3): Blinn-Phong half vectors with the view (0, 0, 1)


@dataclass(frozen=True)
class Feature:
    """A measurable feature for dimension checks; ``box`` is (x0, y0, x1, y1) px, end-exclusive."""

    feature_id: str
    type: str
    box: tuple[int, int, int, int]
    nominal_mm: float
    actual_mm: float
    tolerance_mm: float

    @property
    def in_tolerance(self) -> bool:
        return abs(self.actual_mm - self.nominal_mm) <= self.tolerance_mm


@dataclass
class SyntheticSample:
    line_id: str
    sample_index: int
    image: np.ndarray  # uint8 (H, W, 3)
    semseg: np.ndarray  # int64 (H, W), ids into CLASS_NAMES
    height: np.ndarray  # float32 (H, W) mm, NaN where the sensor dropped out
    height_clean: np.ndarray  # float32 (H, W) mm
    normals: np.ndarray  # float32 (H, W, 3), from height_clean
    albedo: np.ndarray  # float32 (H, W, 3)
    vignette: np.ndarray  # float32 (H, W): multiplies the whole radiance
    specular: np.ndarray  # float32 (H, W, 3): the highlight term before vignetting
    dropout_mask: np.ndarray  # bool (H, W): True where ``height`` is NaN
    features: list[Feature]
    defects: list[str]  # class names of the defects placed, in placement order
    has_defect: bool  # at least one pixel labelled with a defect class
    lighting: Lighting
    pitch_mm_per_px: float
    noise_std: float

    @property
    def light_directions(self) -> np.ndarray:
        return self.lighting.directions

    @property
    def light_colors(self) -> np.ndarray:
        return self.lighting.colors


def line_key(line_id: str) -> int:
    """Stable 32-bit key of a line id for seeding (independent of the line's position)."""
    return int.from_bytes(hashlib.sha256(line_id.encode()).digest()[:4], "little")


def sample_seed_sequence(seed: int, line_id: str, sample_index: int) -> np.random.SeedSequence:
    if seed < 0 or sample_index < 0:
        raise ValueError(f"seed and sample_index must be >= 0, got {seed}, {sample_index}")
    return np.random.SeedSequence([seed, line_key(line_id), sample_index])


def lighting_for(spec: SyntheticLineSpec) -> Lighting:
    azimuths = np.radians(np.asarray(spec.light_azimuths_deg, dtype=float))
    elevation = math.radians(spec.light_elevation_deg)
    # Azimuth is measured from image right (+x) towards image down (+y).
    directions = np.stack(
        [
            math.cos(elevation) * np.cos(azimuths),
            math.cos(elevation) * np.sin(azimuths),
            np.full(3, math.sin(elevation)),
        ],
        axis=1,
    )
    raw_colors = np.asarray(spec.light_colors, dtype=float)
    flat_white = spec.ambient + raw_colors.sum(axis=0) * math.sin(elevation)
    gain = _EXPOSURE / float(flat_white.max())
    half = directions + np.array([0.0, 0.0, 1.0])
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    return Lighting(
        directions=directions,
        colors=raw_colors * gain,
        ambient_rgb=np.full(3, spec.ambient * gain),
        half_vectors=half,
    )


def normals_from_height(height_mm: np.ndarray, pitch_mm_per_px: float) -> np.ndarray:
    """Unit normals n = normalize(-dh/dx, -dh/dy, 1) of a height field, float32 (H, W, 3).

    Gradients are in mm/mm: ``np.gradient`` with spacing = pitch, i.e. central differences
    (h[i+1] - h[i-1]) / (2 pitch) inside and one-sided differences on the border rows/columns.
    x = columns (image right), y = rows (image down), z towards the camera.
    """
    d_dy, d_dx = np.gradient(np.asarray(height_mm, dtype=np.float64), pitch_mm_per_px)
    normals = np.stack([-d_dx, -d_dy, np.ones_like(d_dx)], axis=-1)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    return normals.astype(np.float32)


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


def _distance_to_polyline(u: np.ndarray, v: np.ndarray, points: list[tuple[float, float]]):
    return np.minimum.reduce(
        [_distance_to_segment(u, v, points[i], points[i + 1]) for i in range(len(points) - 1)]
    )


# --- part designs ---


@dataclass
class _Boss:
    sdf: Sdf
    height_mm: float
    chamfer_mm: float


@dataclass
class _Cut:
    kind: str  # "hole" | "slot"
    sdf: Sdf
    top_mm: float  # surface height the cut starts from
    depth_mm: float | None  # None: through to the conveyor
    countersink_mm: float


@dataclass
class _FeatureGeometry:
    feature_id: str
    type: str
    extent: list[tuple[float, float, float]]  # (u, v, radius) discs whose union bounds it
    nominal_mm: float
    actual_mm: float
    tolerance_mm: float


@dataclass
class _Part:
    footprint: Sdf
    half_extent: tuple[float, float]  # local bounding box half sizes, for defect placement
    thickness_mm: float
    chamfer_mm: float
    bosses: list[_Boss]
    cuts: list[_Cut]
    features: list[_FeatureGeometry]
    texture: str  # "linear" | "turned"
    texture_angle: float
    metal_albedo: np.ndarray


class _Dimensions:
    """Draws actual dimensions around nominal ones and records them as features."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.features: list[_FeatureGeometry] = []

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
            _FeatureGeometry(feature_id, feature_type, extent, nominal, actual, tolerance)
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
    ) -> _Cut:
        actual_diameter = self.actual(diameter, 0.2)
        extent = [(cu, cv, actual_diameter / 2)]
        self.record(
            f"hole-{index}-diameter", "hole_diameter", extent, diameter, actual_diameter, 0.2
        )
        actual_depth = None
        if depth is not None:
            actual_depth = self.actual(depth, 0.2)
            self.record(f"hole-{index}-depth", "hole_depth", extent, depth, actual_depth, 0.2)
        return _Cut("hole", _circle(cu, cv, actual_diameter / 2), top, actual_depth, countersink)

    def slot(
        self,
        index: int,
        a: tuple[float, float],
        b: tuple[float, float],
        width: float,
        top: float,
        depth: float | None,
    ) -> _Cut:
        actual_width = self.actual(width, 0.2)
        extent = [(a[0], a[1], actual_width / 2), (b[0], b[1], actual_width / 2)]
        self.record(f"slot-{index}-width", "slot_width", extent, width, actual_width, 0.2)
        return _Cut("slot", _capsule(a, b, actual_width / 2), top, depth, 0.3)

    def boss(self, index: int, cu: float, cv: float, radius: float, height: float) -> _Boss:
        actual_height = self.actual(height, 0.15)
        self.record(
            f"boss-{index}-height", "boss_height", [(cu, cv, radius)], height, actual_height, 0.15
        )
        return _Boss(_circle(cu, cv, radius), actual_height, 0.5)


def _mm(fraction: float, fov: float) -> float:
    """A nominal drawing dimension: a fraction of the field of view, rounded to 0.1 mm."""
    return round(fraction * fov, 1)


def _plate(fov: float, dims: _Dimensions) -> _Part:
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
    return _Part(
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


def _bracket(fov: float, dims: _Dimensions) -> _Part:
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
    return _Part(
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


def _flange(fov: float, dims: _Dimensions) -> _Part:
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
    return _Part(
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


_PART_BUILDERS: dict[str, Callable[[float, _Dimensions], _Part]] = {
    "bracket": _bracket,
    "flange": _flange,
    "plate": _plate,
}
_MAX_ROTATION = {"bracket": math.radians(10), "plate": math.radians(8), "flange": math.pi}


@dataclass
class _Pose:
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


# --- rendering ---


def render_sample(
    line: LineSpec,
    sample_index: int,
    seed: int,
    height: int = 128,
    width: int = 128,
    *,
    noise_std: float | None = None,
    specular: float | None = None,
) -> SyntheticSample:
    """Render sample ``sample_index`` of ``line``; ``noise_std``/``specular`` override the line's
    values (tests render noise- and highlight-free images for exact photometric stereo)."""
    spec = line.synthetic
    if spec is None:
        raise ValueError(f"line {line.id!r} has no 'synthetic' block; it cannot be generated")
    if height < 8 or width < 8:
        raise ValueError(f"image size must be at least 8 x 8, got {height} x {width}")
    scene_rng, defect_rng, noise_rng, dropout_rng = (
        np.random.default_rng(child)
        for child in sample_seed_sequence(seed, line.id, sample_index).spawn(4)
    )
    fov = line.field_of_view_mm
    pitch = fov / min(height, width)
    x = (np.arange(width, dtype=np.float64) + 0.5) * pitch
    y = (np.arange(height, dtype=np.float64) + 0.5) * pitch
    x, y = np.meshgrid(x, y)

    dims = _Dimensions(scene_rng)
    part = _PART_BUILDERS[spec.part_type](fov, dims)
    pose = _Pose(
        centre=(
            width * pitch / 2 + scene_rng.uniform(-0.04, 0.04) * fov,
            height * pitch / 2 + scene_rng.uniform(-0.04, 0.04) * fov,
        ),
        angle=scene_rng.uniform(-1, 1) * _MAX_ROTATION[spec.part_type],
        mirror=1.0 if spec.part_type == "flange" or scene_rng.random() < 0.5 else -1.0,
    )
    metal = part.metal_albedo * scene_rng.uniform(0.95, 1.05)
    texture_phase = scene_rng.uniform(0, 2 * math.pi, size=2)
    u, v = pose.to_local(x, y)
    height_mm, classes, albedo, plateau = _rasterise_part(part, u, v, x, y, pitch, metal)
    height_mm += _machining_texture(part, u, v, pitch, texture_phase) * plateau

    # Defects damage the top faces only; holes and slots keep their labels.
    surface = (classes == CLASS_IDS["part_surface"]) | (classes == CLASS_IDS["boss_top"])
    canvas = _Canvas(u, v, fov, pitch, height_mm, albedo, surface)
    defects = _place_defects(spec, part, canvas, classes, defect_rng)
    normals = normals_from_height(height_mm, pitch)

    lighting = lighting_for(spec)
    specular_strength = spec.specular if specular is None else specular
    noise = spec.noise_std if noise_std is None else noise_std
    vignette = _vignette(height, width, spec.vignetting)
    radiance, specular_term = _shade(
        normals, albedo, lighting, specular_strength, spec.shininess, vignette
    )
    saturated = (radiance >= 1.0).any(axis=-1)
    if noise > 0:
        radiance = radiance + noise_rng.normal(0.0, noise, size=radiance.shape)
    image = np.round(np.clip(radiance, 0.0, 1.0) * 255.0).astype(np.uint8)

    dropout = _dropout_mask(normals, saturated, spec.dropout_rate, dropout_rng)
    height_clean = height_mm.astype(np.float32)
    height_with_dropout = height_clean.copy()
    height_with_dropout[dropout] = np.nan

    semseg = classes.astype(np.int64)
    return SyntheticSample(
        line_id=line.id,
        sample_index=sample_index,
        image=image,
        semseg=semseg,
        height=height_with_dropout,
        height_clean=height_clean,
        normals=normals,
        albedo=albedo.astype(np.float32),
        vignette=vignette.astype(np.float32),
        specular=specular_term.astype(np.float32),
        dropout_mask=dropout,
        features=_features_in_pixels(part.features, pose, pitch, height, width),
        defects=defects,
        has_defect=bool(np.isin(semseg, DEFECT_CLASS_IDS).any()),
        lighting=lighting,
        pitch_mm_per_px=pitch,
        noise_std=noise,
    )


def _rasterise_part(
    part: _Part,
    u: np.ndarray,
    v: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    pitch: float,
    metal: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Height (mm), class ids, albedo and the flat-top mask (where machining texture goes)."""
    depth_inside = -part.footprint(u, v)
    inside = depth_inside > 0
    # 45-degree chamfer on the top edge, then a vertical wall down to the conveyor.
    height = np.where(
        inside, part.thickness_mm - np.maximum(0.0, part.chamfer_mm - depth_inside), 0.0
    )
    classes = np.where(inside, CLASS_IDS["part_surface"], CLASS_IDS["conveyor"])
    plateau = inside & (depth_inside >= part.chamfer_mm)

    weave = 1.0 + 0.06 * np.sin(2 * math.pi * x / max(3.0, 4 * pitch)) * np.sin(
        2 * math.pi * y / max(5.0, 6 * pitch)
    )
    albedo = np.where(inside[..., None], metal, _CONVEYOR_ALBEDO * weave[..., None])

    for boss in part.bosses:
        boss_depth = -boss.sdf(u, v)
        on_boss = inside & (boss_depth > 0)
        boss_height = (
            part.thickness_mm + boss.height_mm - np.maximum(0.0, boss.chamfer_mm - boss_depth)
        )
        height = np.where(on_boss, np.maximum(height, boss_height), height)
        classes = np.where(on_boss, CLASS_IDS["boss_top"], classes)
        plateau &= ~(on_boss & (boss_depth < boss.chamfer_mm))
        albedo = np.where(on_boss[..., None], np.clip(metal * 1.04, 0, 1), albedo)

    for cut in part.cuts:
        distance = cut.sdf(u, v)
        rim = inside & (distance >= 0) & (distance < cut.countersink_mm)
        height = np.where(rim, height - (cut.countersink_mm - distance), height)
        plateau &= ~rim
        in_cut = inside & (distance < 0)
        if cut.depth_mm is None:  # through: the conveyor shows at the bottom
            floor, floor_albedo = 0.0, _CONVEYOR_ALBEDO
        else:
            floor, floor_albedo = cut.top_mm - cut.depth_mm, metal * 0.55
        height = np.where(in_cut, floor, height)
        classes = np.where(in_cut, CLASS_IDS[cut.kind], classes)
        plateau &= ~in_cut
        albedo = np.where(in_cut[..., None], floor_albedo, albedo)
    return height, classes, albedo, plateau


def _machining_texture(
    part: _Part, u: np.ndarray, v: np.ndarray, pitch: float, phase: np.ndarray
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


def _surface_clearance(part: _Part, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Distance (mm) from each point to the nearest edge of a flat top surface (<= 0: none)."""
    clearance = -part.footprint(u, v) - part.chamfer_mm
    for boss in part.bosses:
        clearance = np.minimum(clearance, np.abs(boss.sdf(u, v)) - boss.chamfer_mm)
    for cut in part.cuts:
        clearance = np.minimum(clearance, cut.sdf(u, v) - cut.countersink_mm)
    return clearance


@dataclass
class _Canvas:
    """What a defect draws on: part-local pixel coordinates and the arrays it edits in place."""

    u: np.ndarray
    v: np.ndarray
    fov: float
    pitch: float
    height: np.ndarray
    albedo: np.ndarray
    surface: np.ndarray  # bool: top faces, the only pixels a defect may change

    def distance_to(self, centre: tuple[float, float]) -> np.ndarray:
        return np.hypot(self.u - centre[0], self.v - centre[1])


def _place_defects(
    spec: SyntheticLineSpec,
    part: _Part,
    canvas: _Canvas,
    classes: np.ndarray,
    rng: np.random.Generator,
) -> list[str]:
    """Draw the sample's defects and apply them in place; returns their class names."""
    if rng.random() >= spec.defect_prevalence:
        return []
    weights = np.array([spec.defect_mix.get(name, 0.0) for name in DEFECT_CLASSES], dtype=float)
    weights /= weights.sum()
    count = 1 + min(int(rng.poisson(0.6)), 3)
    names = [DEFECT_CLASSES[int(rng.choice(len(DEFECT_CLASSES), p=weights))] for _ in range(count)]
    for name in names:
        size = _DEFECT_SIZE[name](canvas.fov, canvas.pitch, rng)
        centre = _defect_centre(part, size, rng)
        mask = _DEFECT_APPLIERS[name](canvas, centre, size, rng)
        classes[mask & canvas.surface] = CLASS_IDS[name]
    return names


def _defect_centre(part: _Part, margin: float, rng: np.random.Generator) -> tuple[float, float]:
    """A point on a flat top surface at least ``margin`` from its edges (or the best of 64)."""
    half_u, half_v = part.half_extent
    cu = rng.uniform(-half_u, half_u, size=64)
    cv = rng.uniform(-half_v, half_v, size=64)
    clearance = _surface_clearance(part, cu, cv)
    good = np.flatnonzero(clearance > margin)
    index = int(good[0]) if good.size else int(np.argmax(clearance))
    return float(cu[index]), float(cv[index])


# Each size is the defect's placement margin (mm): about its radius.
_DEFECT_SIZE: dict[str, Callable[[float, float, np.random.Generator], float]] = {
    "scratch": lambda fov, pitch, rng: max(0.03 * fov, 3 * pitch),
    "dent": lambda fov, pitch, rng: max(rng.uniform(0.025, 0.05) * fov, 2.5 * pitch),
    "bump": lambda fov, pitch, rng: max(rng.uniform(0.015, 0.035) * fov, 2.0 * pitch),
    "crack": lambda fov, pitch, rng: max(0.03 * fov, 3 * pitch),
    "stain": lambda fov, pitch, rng: max(rng.uniform(0.03, 0.06) * fov, 2.5 * pitch),
}
Point = tuple[float, float]


def _apply_scratch(
    canvas: _Canvas, centre: Point, size: float, rng: np.random.Generator
) -> np.ndarray:
    """A narrow groove with a parabolic profile along a slightly bent line."""
    half_width = max(0.006 * canvas.fov, 0.8 * canvas.pitch)
    depth = half_width * rng.uniform(0.15, 0.35)
    length = rng.uniform(0.1, 0.25) * canvas.fov
    angle = rng.uniform(0, math.pi)
    bend = rng.uniform(-0.15, 0.15)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    start = np.asarray(centre)
    points = [
        tuple(start + t * length / 2 * direction + bend * length * (1 - t * t) * normal)
        for t in (-1.0, 0.0, 1.0)
    ]
    distance = _distance_to_polyline(canvas.u, canvas.v, points)
    profile = np.clip(1 - (distance / half_width) ** 2, 0, None)
    canvas.height -= depth * profile * canvas.surface
    return distance < half_width


def _apply_crack(
    canvas: _Canvas, centre: Point, size: float, rng: np.random.Generator
) -> np.ndarray:
    """A thin, deep V-groove along a random walk with one or two branches."""
    half_width = max(0.004 * canvas.fov, 0.6 * canvas.pitch)
    depth = half_width * rng.uniform(0.8, 1.5)
    step = max(0.018 * canvas.fov, 1.5 * canvas.pitch)
    angle = rng.uniform(0, 2 * math.pi)
    main = [centre]
    for _ in range(int(rng.integers(5, 9))):
        angle += rng.uniform(-0.45, 0.45)
        main.append((main[-1][0] + step * math.cos(angle), main[-1][1] + step * math.sin(angle)))
    paths = [main]
    for _ in range(int(rng.integers(1, 3))):
        branch = [main[int(rng.integers(1, len(main) - 1))]]
        branch_angle = angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
        for _ in range(int(rng.integers(2, 5))):
            branch_angle += rng.uniform(-0.4, 0.4)
            branch.append(
                (
                    branch[-1][0] + 0.8 * step * math.cos(branch_angle),
                    branch[-1][1] + 0.8 * step * math.sin(branch_angle),
                )
            )
        paths.append(branch)
    distance = np.minimum.reduce(
        [_distance_to_polyline(canvas.u, canvas.v, path) for path in paths]
    )
    profile = np.clip(1 - distance / half_width, 0, None)
    canvas.height -= depth * profile * canvas.surface
    return distance < half_width


def _smooth_blob(
    canvas: _Canvas,
    centre: Point,
    radius: float,
    sign: float,
    aspect_range: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """Raised-cosine change of height; its depth scales with its radius (resolution-free slope)."""
    amount = radius * rng.uniform(*aspect_range)
    r = canvas.distance_to(centre) / radius
    profile = np.where(r < 1, 0.5 * (1 + np.cos(math.pi * np.minimum(r, 1))), 0.0)
    canvas.height += sign * amount * profile * canvas.surface
    return r < 0.75  # where the change exceeds ~15 % of its peak


def _apply_dent(
    canvas: _Canvas, centre: Point, size: float, rng: np.random.Generator
) -> np.ndarray:
    """A smooth depression."""
    return _smooth_blob(canvas, centre, size, -1.0, (0.06, 0.12), rng)


def _apply_bump(
    canvas: _Canvas, centre: Point, size: float, rng: np.random.Generator
) -> np.ndarray:
    """A smooth raise: a burr or weld spatter."""
    return _smooth_blob(canvas, centre, size, 1.0, (0.10, 0.20), rng)


def _apply_stain(
    canvas: _Canvas, centre: Point, size: float, rng: np.random.Generator
) -> np.ndarray:
    """Albedo only (oil, rust): no height change."""
    field = np.zeros_like(canvas.u)
    for _ in range(int(rng.integers(3, 6))):
        offset = rng.uniform(-0.5, 0.5, size=2) * size
        sigma = size * rng.uniform(0.4, 0.7)
        shifted = (centre[0] + offset[0], centre[1] + offset[1])
        field += np.exp(-(canvas.distance_to(shifted) ** 2) / (2 * sigma * sigma))
    darkening = rng.uniform(0.35, 0.6) * np.clip(field, 0, 1) * canvas.surface
    canvas.albedo *= 1 - darkening[..., None] * (1 - _STAIN_COLOR)
    return field > 0.5


_DEFECT_APPLIERS: dict[str, Callable[[_Canvas, Point, float, np.random.Generator], np.ndarray]] = {
    "scratch": _apply_scratch,
    "dent": _apply_dent,
    "bump": _apply_bump,
    "crack": _apply_crack,
    "stain": _apply_stain,
}


def _vignette(height: int, width: int, strength: float) -> np.ndarray:
    rows = (np.arange(height) + 0.5) / height - 0.5
    cols = (np.arange(width) + 0.5) / width - 0.5
    radius_sq = rows[:, None] ** 2 + cols[None, :] ** 2
    return 1.0 - strength * radius_sq / 0.5  # 0.5 = squared distance to a corner


def _shade(
    normals: np.ndarray,
    albedo: np.ndarray,
    lighting: Lighting,
    specular: float,
    shininess: float,
    vignette: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Radiance in [0, inf) before noise (H, W, 3) and the specular term alone."""
    n = normals.astype(np.float64)
    n_dot_l = n @ lighting.directions.T  # (H, W, 3): one column per light
    diffuse = albedo * (lighting.ambient_rgb + np.maximum(n_dot_l, 0.0) @ lighting.colors)
    n_dot_h = np.maximum(n @ lighting.half_vectors.T, 0.0)
    highlight = np.where(n_dot_l > 0, n_dot_h**shininess, 0.0)
    specular_term = specular * (highlight @ lighting.colors)
    return vignette[..., None] * (diffuse + specular_term), specular_term


def _dropout_mask(
    normals: np.ndarray, saturated: np.ndarray, rate: float, rng: np.random.Generator
) -> np.ndarray:
    """Pixels a triangulation sensor loses: random blobs plus the steepest / saturated pixels.

    The count is Binomial(pixels, rate), so the dropped fraction equals ``rate`` on average.
    """
    height, width = saturated.shape
    target = int(rng.binomial(height * width, rate))
    dropped = np.zeros((height, width), dtype=bool)
    blob_target = round(target * _BLOB_SHARE)
    blob_count = 0
    while blob_count < blob_target:
        row, col = int(rng.integers(height)), int(rng.integers(width))
        radius = int(rng.integers(1, 3))
        r0, r1 = max(row - radius, 0), min(row + radius + 1, height)
        c0, c1 = max(col - radius, 0), min(col + radius + 1, width)
        rr, cc = np.mgrid[r0:r1, c0:c1]
        disc = (rr - row) ** 2 + (cc - col) ** 2 <= radius * radius + 0.5
        new = np.flatnonzero(disc & ~dropped[r0:r1, c0:c1])
        new = new[: blob_target - blob_count]
        dropped[rr.ravel()[new], cc.ravel()[new]] = True
        blob_count += new.size
    remaining = target - blob_count
    if remaining > 0:
        tilt = np.degrees(np.arccos(np.clip(normals[..., 2], -1.0, 1.0))) / 90.0
        score = tilt + saturated + rng.uniform(0, 1e-3, size=tilt.shape)  # jitter breaks ties
        score[dropped] = -np.inf
        chosen = np.argpartition(score.ravel(), -remaining)[-remaining:]
        dropped.ravel()[chosen] = True
    return dropped


def _features_in_pixels(
    features: list[_FeatureGeometry], pose: _Pose, pitch: float, height: int, width: int
) -> list[Feature]:
    result = []
    for feature in features:
        x0 = y0 = math.inf
        x1 = y1 = -math.inf
        for u, v, radius in feature.extent:
            x, y = pose.to_image(u, v)
            x0, x1 = min(x0, x - radius), max(x1, x + radius)
            y0, y1 = min(y0, y - radius), max(y1, y + radius)
        box = (
            max(0, math.floor(x0 / pitch)),
            max(0, math.floor(y0 / pitch)),
            min(width, math.ceil(x1 / pitch)),
            min(height, math.ceil(y1 / pitch)),
        )
        if box[2] <= box[0] or box[3] <= box[1]:
            continue  # out of view
        result.append(
            Feature(
                feature_id=feature.feature_id,
                type=feature.type,
                box=box,
                nominal_mm=round(feature.nominal_mm, 4),
                actual_mm=round(feature.actual_mm, 4),
                tolerance_mm=feature.tolerance_mm,
            )
        )
    return result
