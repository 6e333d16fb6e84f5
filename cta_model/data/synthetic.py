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

This module lays out and shades a scene; the parts (geometry, dimensions, pose, machining
marks) are in ``synthetic_parts.py`` and the defects in ``synthetic_defects.py``.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cta_model.data.synthetic_defects import DEFECT_APPLIERS, DEFECT_SIZE, Canvas, defect_centre
from cta_model.data.synthetic_parts import (
    MAX_ROTATION,
    PART_BUILDERS,
    Dimensions,
    FeatureGeometry,
    Part,
    Pose,
    machining_texture,
)

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
_CONVEYOR_ALBEDO = np.array([0.30, 0.34, 0.32])


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

    dims = Dimensions(scene_rng)
    part = PART_BUILDERS[spec.part_type](fov, dims)
    pose = Pose(
        centre=(
            width * pitch / 2 + scene_rng.uniform(-0.04, 0.04) * fov,
            height * pitch / 2 + scene_rng.uniform(-0.04, 0.04) * fov,
        ),
        angle=scene_rng.uniform(-1, 1) * MAX_ROTATION[spec.part_type],
        mirror=1.0 if spec.part_type == "flange" or scene_rng.random() < 0.5 else -1.0,
    )
    metal = part.metal_albedo * scene_rng.uniform(0.95, 1.05)
    texture_phase = scene_rng.uniform(0, 2 * math.pi, size=2)
    u, v = pose.to_local(x, y)
    height_mm, classes, albedo, plateau = _rasterise_part(part, u, v, x, y, pitch, metal)
    height_mm += machining_texture(part, u, v, pitch, texture_phase) * plateau

    # Defects damage the top faces only; holes and slots keep their labels.
    surface = (classes == CLASS_IDS["part_surface"]) | (classes == CLASS_IDS["boss_top"])
    canvas = Canvas(u, v, fov, pitch, height_mm, albedo, surface)
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
    part: Part,
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


def _place_defects(
    spec: SyntheticLineSpec,
    part: Part,
    canvas: Canvas,
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
        size = DEFECT_SIZE[name](canvas.fov, canvas.pitch, rng)
        centre = defect_centre(part, size, rng)
        mask = DEFECT_APPLIERS[name](canvas, centre, size, rng)
        classes[mask & canvas.surface] = CLASS_IDS[name]
    return names


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
    features: list[FeatureGeometry], pose: Pose, pitch: float, height: int, width: int
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
