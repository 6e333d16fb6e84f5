"""The defects of the synthetic scenes (cta_model/data/synthetic.py): scratches, cracks, dents,
bumps and stains drawn onto a part's flat top faces.

Each defect edits the height field (or, for a stain, the albedo) of a `Canvas` in place and
returns the pixels it labels. Sizes are kept at least about a pixel wide so every labelled defect
is visible at the rendered size, and depths scale with widths so the slopes the lights see do
not depend on the resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cta_model.data.synthetic_parts import Part, distance_to_polyline, surface_clearance

_STAIN_COLOR = np.array([0.55, 0.42, 0.28])


@dataclass
class Canvas:
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


def defect_centre(part: Part, margin: float, rng: np.random.Generator) -> tuple[float, float]:
    """A point on a flat top surface at least ``margin`` from its edges (or the best of 64)."""
    half_u, half_v = part.half_extent
    cu = rng.uniform(-half_u, half_u, size=64)
    cv = rng.uniform(-half_v, half_v, size=64)
    clearance = surface_clearance(part, cu, cv)
    good = np.flatnonzero(clearance > margin)
    index = int(good[0]) if good.size else int(np.argmax(clearance))
    return float(cu[index]), float(cv[index])


# Each size is the defect's placement margin (mm): about its radius.
DEFECT_SIZE: dict[str, Callable[[float, float, np.random.Generator], float]] = {
    "scratch": lambda fov, pitch, rng: max(0.03 * fov, 3 * pitch),
    "dent": lambda fov, pitch, rng: max(rng.uniform(0.025, 0.05) * fov, 2.5 * pitch),
    "bump": lambda fov, pitch, rng: max(rng.uniform(0.015, 0.035) * fov, 2.0 * pitch),
    "crack": lambda fov, pitch, rng: max(0.03 * fov, 3 * pitch),
    "stain": lambda fov, pitch, rng: max(rng.uniform(0.03, 0.06) * fov, 2.5 * pitch),
}
Point = tuple[float, float]


def _apply_scratch(
    canvas: Canvas, centre: Point, size: float, rng: np.random.Generator
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
    distance = distance_to_polyline(canvas.u, canvas.v, points)
    profile = np.clip(1 - (distance / half_width) ** 2, 0, None)
    canvas.height -= depth * profile * canvas.surface
    return distance < half_width


def _apply_crack(
    canvas: Canvas, centre: Point, size: float, rng: np.random.Generator
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
    distance = np.minimum.reduce([distance_to_polyline(canvas.u, canvas.v, path) for path in paths])
    profile = np.clip(1 - distance / half_width, 0, None)
    canvas.height -= depth * profile * canvas.surface
    return distance < half_width


def _smooth_blob(
    canvas: Canvas,
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


def _apply_dent(canvas: Canvas, centre: Point, size: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth depression."""
    return _smooth_blob(canvas, centre, size, -1.0, (0.06, 0.12), rng)


def _apply_bump(canvas: Canvas, centre: Point, size: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth raise: a burr or weld spatter."""
    return _smooth_blob(canvas, centre, size, 1.0, (0.10, 0.20), rng)


def _apply_stain(
    canvas: Canvas, centre: Point, size: float, rng: np.random.Generator
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


DEFECT_APPLIERS: dict[str, Callable[[Canvas, Point, float, np.random.Generator], np.ndarray]] = {
    "scratch": _apply_scratch,
    "dent": _apply_dent,
    "bump": _apply_bump,
    "crack": _apply_crack,
    "stain": _apply_stain,
}
