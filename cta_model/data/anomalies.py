"""Synthetic anomaly augmentation: procedural defects pasted into good training images.

Training splits with few or no defect pixels teach a segmentation head to say "good" everywhere.
Pasting synthetic defects (with their masks) into good images gives the defect classes
something to learn from; the idea is that of DRAEM (Zavrtanik et al., ICCV 2021: Perlin-noise
masks filled with a foreign texture) and CutPaste (Li et al., CVPR 2021: patches and thin
scars from elsewhere pasted in). The code here is this project's own, numpy only (no torch).

``paste_anomalies(image, rng, config, region=..., texture_source=...)`` pastes 1 to
``config.max_per_image`` anomalies with probability ``config.probability`` and returns the new
image, the mask of the pixels it changed and the kinds it pasted. The kinds (``ANOMALY_KINDS``):

* ``perlin_texture``: a thresholded fractal Perlin-noise shape inside a round window, filled
  with a crop of ``texture_source`` (another training image, rotated, flipped and colour
  jittered) or, without one, a procedural two-colour texture (noise or stripes).
* ``scratch``: a thin, slightly curved, antialiased line (``scratch_width_px`` wide, tapered at
  its ends, ``scratch_length`` of the region's extent long), tinted, and darker than the
  pixels under it on a bright surface, brighter on a dark one.
* ``stain``: a smooth blob with a noisy outline that multiplies the pixels by a tinted factor.
* ``dent_shading``: a smooth elliptical bump or dent whose slopes shift R, G and B as a tilted
  surface does under three coloured lights from three azimuths (the synthetic scenes' colour
  photometric stereo, where dents appear as faint colour changes).

Sizes are in pixels of the image pasted into (``size_px`` is the diameter of a blob kind).

Mask and image: each anomaly computes a blend weight ``w`` in [0, 1] per pixel (its shape times
its opacity, zero outside ``region``). Only pixels with ``w > mask_threshold`` change, to
``pixel + w * (target - pixel)``, and exactly those are in the mask: every pixel outside the
mask is byte-identical to the input. An anomaly always covers its centre, a pixel of ``region``
drawn at random, with its full opacity, so a pasted anomaly never leaves an empty mask; an empty
``region`` pastes nothing. ``invalidate_geometry`` and ``label_semseg`` carry the mask to the
other tasks: a pasted defect has unknown height and normals, and its own semseg class.

Determinism: all randomness comes from the ``rng`` passed in, so the same generator state gives
byte-identical results. Draws, in order: ``rng.random()`` (paste or not, always drawn); if
pasting into a non-empty region, ``rng.integers`` (how many); then per anomaly
``rng.integers`` (kind, uniform over ``config.kinds``), ``rng.integers`` (centre pixel, uniform
over the region), ``rng.uniform`` (opacity), then the kind's own draws (its docstring). Any
change to these draws changes what a given seed produces.

Speed (``python -m cta_model.data.anomalies``: 384 x 384 image, ``probability=1``, default
sizes, one core of the shared 2-core dev machine): per pasted anomaly about 1.0 ms for
perlin_texture, 1.6 ms for scratch, 0.8 ms for stain and 0.6 ms for dent_shading; 1.3 ms per
call with the default config (1 or 2 anomalies).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from pydantic import Field, field_validator, model_validator

from cta_model.config import StrictModel

Range = tuple[float, float]

# --- configuration ---


class AnomalyConfig(StrictModel):
    """How often, which and how large the pasted anomalies are (sizes in pixels)."""

    probability: float = Field(default=0.5, ge=0, le=1)
    kinds: tuple[str, ...] = ("perlin_texture", "scratch", "stain", "dent_shading")
    max_per_image: int = Field(default=2, ge=1)
    size_px: Range = (8.0, 40.0)  # blob diameter (perlin_texture, stain, dent_shading)
    scratch_length: Range = (0.1, 0.4)  # fraction of the region's extent (longer bbox side)
    scratch_width_px: Range = (1.0, 3.0)
    opacity: Range = (0.6, 1.0)
    mask_threshold: float = Field(default=0.2, gt=0, lt=1)

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(f"must name at least one kind of: {', '.join(ANOMALY_KINDS)}")
        unknown = [kind for kind in value if kind not in ANOMALY_KINDS]
        if unknown:
            raise ValueError(
                f"unknown kind(s) {', '.join(map(repr, unknown))}; "
                f"known kinds: {', '.join(ANOMALY_KINDS)}"
            )
        if len(set(value)) != len(value):
            raise ValueError(f"lists a kind twice: {list(value)}")
        return value

    @field_validator("size_px", "scratch_length", "scratch_width_px", "opacity")
    @classmethod
    def _ordered_positive_range(cls, value: Range) -> Range:
        low, high = value
        if not 0 < low <= high:
            raise ValueError(f"must be [low, high] with 0 < low <= high, got {list(value)}")
        return value

    @field_validator("scratch_length", "opacity")
    @classmethod
    def _fraction_range(cls, value: Range) -> Range:
        if value[1] > 1:
            raise ValueError(f"is a fraction; high must be at most 1, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _opacity_above_threshold(self) -> AnomalyConfig:
        if self.opacity[0] <= self.mask_threshold:
            raise ValueError(
                f"opacity low {self.opacity[0]} must exceed mask_threshold "
                f"{self.mask_threshold}, or a faint anomaly would change no pixel"
            )
        return self


class PastedAnomalies(NamedTuple):
    image: np.ndarray  # uint8 (H, W, 3)
    mask: np.ndarray  # bool (H, W): exactly the pixels that may differ from the input
    kinds: list[str]  # one entry per pasted anomaly, in paste order


# --- gradient noise ---

_FADE = np.polynomial.Polynomial([0, 0, 0, 10, -15, 6])  # Perlin's 6t^5 - 15t^4 + 10t^3


def perlin_noise(
    shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """2-D Perlin gradient noise on a ``cells`` lattice over ``shape`` pixels, about [-1, 1].

    Draws one ``rng.uniform`` array: the gradient angles at the (cells + 1) lattice corners.
    """
    height, width = shape
    cells_y, cells_x = cells
    angles = rng.uniform(0.0, 2 * math.pi, size=(cells_y + 1, cells_x + 1))
    grad_y, grad_x = np.sin(angles), np.cos(angles)
    y = (np.arange(height) + 0.5) * (cells_y / height)
    x = (np.arange(width) + 0.5) * (cells_x / width)
    y0 = np.minimum(y.astype(np.int64), cells_y - 1)[:, None]
    x0 = np.minimum(x.astype(np.int64), cells_x - 1)[None, :]
    fy = (y[:, None] - y0).astype(np.float32)
    fx = (x[None, :] - x0).astype(np.float32)

    def corner(dy: int, dx: int) -> np.ndarray:
        gy, gx = grad_y[y0 + dy, x0 + dx], grad_x[y0 + dy, x0 + dx]
        return gy * (fy - dy) + gx * (fx - dx)

    sy, sx = _FADE(fy), _FADE(fx)
    top = corner(0, 0) + sx * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + sx * (corner(1, 1) - corner(1, 0))
    return (math.sqrt(2) * (top + sy * (bottom - top))).astype(np.float32)


def fractal_noise(
    shape: tuple[int, int], cells: tuple[int, int], octaves: int, rng: np.random.Generator
) -> np.ndarray:
    """Perlin octaves at doubling frequency and halving amplitude, normalised to about [-1, 1].

    Draws ``octaves`` times as ``perlin_noise`` does, coarsest first.
    """
    total = np.zeros(shape, dtype=np.float32)
    amplitude_sum = 0.0
    for octave in range(octaves):
        scale = 2**octave
        total += perlin_noise(shape, (cells[0] * scale, cells[1] * scale), rng) / scale
        amplitude_sum += 1 / scale
    return total / amplitude_sum


# --- the kinds ---


@dataclass(frozen=True)
class _Patch:
    """The bounding box of one anomaly and its pixels' offsets (px) from the anomaly's centre."""

    rows: slice
    cols: slice
    dy: np.ndarray  # (h, 1)
    dx: np.ndarray  # (1, w)

    @property
    def shape(self) -> tuple[int, int]:
        return self.dy.shape[0], self.dx.shape[1]

    @property
    def centre_index(self) -> tuple[int, int]:
        return int(-self.dy[0, 0]), int(-self.dx[0, 0])

    @staticmethod
    def around(image_shape: tuple[int, ...], centre: tuple[int, int], radius: float) -> _Patch:
        return _Patch.spanning(image_shape, centre, (-radius, radius), (-radius, radius))

    @staticmethod
    def spanning(
        image_shape: tuple[int, ...], centre: tuple[int, int], y_range: Range, x_range: Range
    ) -> _Patch:
        """The pixels whose offsets from ``centre`` lie in the ranges (plus a pixel), clipped."""
        row, col = centre
        top = max(row + math.floor(y_range[0]) - 1, 0)
        bottom = min(row + math.ceil(y_range[1]) + 2, image_shape[0])
        left = max(col + math.floor(x_range[0]) - 1, 0)
        right = min(col + math.ceil(x_range[1]) + 2, image_shape[1])
        dy = np.arange(top - row, bottom - row, dtype=np.float32)[:, None]
        dx = np.arange(left - col, right - col, dtype=np.float32)[None, :]
        return _Patch(slice(top, bottom), slice(left, right), dy, dx)

    def elliptical_radius(self, radius: float, aspect: float, angle: float) -> np.ndarray:
        """Distance from the centre normalised to 1 on the ellipse (radius, aspect * radius)."""
        cos, sin = math.cos(angle), math.sin(angle)
        along = self.dx * cos + self.dy * sin
        across = -self.dx * sin + self.dy * cos
        return np.sqrt((along / radius) ** 2 + (across / (aspect * radius)) ** 2)


@dataclass(frozen=True)
class _Canvas:
    """What a kind draws on: the working image (float; kinds read it, the paste loop updates
    it after each anomaly so that overlapping anomalies compose) and the call's settings."""

    pixels: np.ndarray  # float32 (H, W, 3), 0-255
    config: AnomalyConfig
    region_extent: int  # longer side of the region's bounding box (px)
    texture_source: np.ndarray | None


class _Stroke(NamedTuple):
    patch: _Patch
    shape: np.ndarray  # float (h, w) in [0, 1], 1 at the centre pixel
    target: np.ndarray  # float (h, w, 3): what a pixel of full weight becomes


AnomalyKind = Callable[[_Canvas, tuple[int, int], np.random.Generator], _Stroke]


def _perlin_texture(canvas: _Canvas, centre: tuple[int, int], rng: np.random.Generator) -> _Stroke:
    """A thresholded Perlin shape filled with foreign texture.

    Draws: size (uniform), lattice cells (integers, 2), octaves (integers), the noise, the
    threshold (uniform), then ``_foreign_texture``'s draws.
    """
    radius = rng.uniform(*canvas.config.size_px) / 2
    patch = _Patch.around(canvas.pixels.shape, centre, radius)
    cells = rng.integers(2, 5, size=2)
    octaves = int(rng.integers(1, 4))
    noise = fractal_noise(patch.shape, (int(cells[0]), int(cells[1])), octaves, rng)
    # Raising the noise to at least 0.2 at the centre (window 1 there) puts the centre's value
    # at 0.6 or more, above any threshold plus softness: the centre pixel is fully covered.
    noise += max(0.0, 0.2 - float(noise[patch.centre_index]))
    window = np.clip(1 - (patch.dx**2 + patch.dy**2) / radius**2, 0, None)
    value = window * (0.5 + 0.5 * noise)
    softness = 0.05
    threshold = rng.uniform(0.2, 0.4)
    shape = np.clip((value - threshold) / softness, 0, 1)
    return _Stroke(patch, shape, _foreign_texture(canvas, patch.shape, rng))


def _foreign_texture(
    canvas: _Canvas, shape: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """A crop of ``texture_source`` (rotated, flipped, colour jittered) or a procedural texture.

    Draws with a source: offset (integers, 2), quarter turns (integers), flip (random), channel
    gains (uniform, 3). Without: two colours (uniform, 3 each), the pattern (integers), then
    stripes: angle, period (uniform); noise: cells (integers), the noise.
    """
    height, width = shape
    source = canvas.texture_source
    if source is not None:
        side = max(height, width)  # square, so a quarter turn keeps the shape
        reps = (math.ceil(side / source.shape[0]) + 1, math.ceil(side / source.shape[1]) + 1, 1)
        tiled = np.tile(source, reps) if min(source.shape[:2]) < side else source
        top = int(rng.integers(tiled.shape[0] - side + 1))
        left = int(rng.integers(tiled.shape[1] - side + 1))
        crop = np.rot90(tiled[top : top + side, left : left + side], k=int(rng.integers(4)))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        gains = rng.uniform(0.6, 1.4, size=3).astype(np.float32)
        return np.clip(crop[:height, :width].astype(np.float32) * gains, 0, 255)
    colours = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    if rng.integers(2) == 0:
        angle, period = rng.uniform(0, math.pi), rng.uniform(3, 12)
        rows = np.arange(height, dtype=np.float32)[:, None]
        cols = np.arange(width, dtype=np.float32)[None, :]
        phase = (cols * math.cos(angle) + rows * math.sin(angle)) * (2 * math.pi / period)
        pattern = 0.5 + 0.5 * np.sin(phase)
    else:
        cells = max(1, min(height, width) // 4)
        pattern = 0.5 + 0.5 * perlin_noise(shape, (cells, cells), rng)
    pattern = np.clip(pattern, 0, 1)[..., None]
    return colours[0] + pattern * (colours[1] - colours[0])


def _scratch(canvas: _Canvas, centre: tuple[int, int], rng: np.random.Generator) -> _Stroke:
    """A thin curved line through the centre, tapered at its ends, darker or brighter.

    Draws: length fraction, width, angle, bend (uniform each), dark or bright (random, dark
    more likely the brighter the pixels under it), its grey level relative to theirs (uniform),
    tint (uniform, 3), strength (uniform).
    """
    config = canvas.config
    length = max(rng.uniform(*config.scratch_length) * canvas.region_extent, 3.0)
    half_width = rng.uniform(*config.scratch_width_px) / 2
    angle = rng.uniform(0, math.pi)
    bend = rng.uniform(-0.15, 0.15)
    t = np.linspace(-1.0, 1.0, 17, dtype=np.float32)
    along = t * length / 2
    across = bend * length * t * t  # a parabola through the centre
    points_x = along * math.cos(angle) - across * math.sin(angle)
    points_y = along * math.sin(angle) + across * math.cos(angle)
    reach = half_width + 1
    patch = _Patch.spanning(
        canvas.pixels.shape,
        centre,
        (points_y.min() - reach, points_y.max() + reach),
        (points_x.min() - reach, points_x.max() + reach),
    )
    distance, position = _distance_to_polyline(patch, points_x, points_y)
    taper = np.clip(np.minimum(position, 1 - position) / 0.15, 0.3, 1.0)
    coverage = np.clip(half_width * taper + 0.5 - distance, 0, 1)  # box-filtered line
    # Half-width is at least 0.5 px and the centre is mid-line, so it has coverage 1.
    pixels = canvas.pixels[patch.rows, patch.cols]
    # Dark on bright surfaces, bright on dark ones, either on grey: it always stands out.
    under = float(pixels[coverage > 0].mean())
    dark = rng.random() < np.clip((under - 64) / 128, 0, 1)
    level = under * rng.uniform(0, 0.5) if dark else under + (255 - under) * rng.uniform(0.5, 1)
    tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    colour = level * tint / tint.max()
    strength = rng.uniform(0.5, 0.9)
    return _Stroke(patch, coverage, pixels + strength * (colour - pixels))


def _distance_to_polyline(
    patch: _Patch, points_x: np.ndarray, points_y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's distance (px) to the polyline and the arc-length position (0-1) nearest it."""
    ax, ay = points_x[:-1], points_y[:-1]
    bx, by = points_x[1:], points_y[1:]
    seg_x, seg_y = bx - ax, by - ay
    seg_len = np.hypot(seg_x, seg_y)
    px, py = patch.dx[..., None], patch.dy[..., None]  # (h, w, 1) against (segments,)
    t = np.clip(((px - ax) * seg_x + (py - ay) * seg_y) / np.maximum(seg_len**2, 1e-12), 0, 1)
    squared = (px - (ax + t * seg_x)) ** 2 + (py - (ay + t * seg_y)) ** 2
    nearest = np.argmin(squared, axis=-1)[..., None]
    start = np.concatenate([[0.0], np.cumsum(seg_len)[:-1]]).astype(np.float32)
    arc = np.take_along_axis(start + t * seg_len, nearest, axis=-1)[..., 0]
    distance = np.sqrt(np.take_along_axis(squared, nearest, axis=-1)[..., 0])
    return distance, arc / max(float(seg_len.sum()), 1e-12)


def _stain(canvas: _Canvas, centre: tuple[int, int], rng: np.random.Generator) -> _Stroke:
    """A smooth blob with a noisy outline that multiplies the pixels by a tinted factor.

    Draws: size, aspect, angle (uniform each), the outline noise (``perlin_noise``), darkness
    (uniform), tint (uniform, 3).
    """
    radius = rng.uniform(*canvas.config.size_px) / 2
    aspect = rng.uniform(0.5, 1.0)
    angle = rng.uniform(0, math.pi)
    patch = _Patch.around(canvas.pixels.shape, centre, radius / 0.75)  # noise may stretch it by 4/3
    rho = patch.elliptical_radius(radius, aspect, angle)
    rho = rho * (1 + 0.25 * perlin_noise(patch.shape, (3, 3), rng))  # 0 at the centre still
    shape = np.clip((1 - rho) / 0.3, 0, 1)
    darkness = rng.uniform(0.3, 0.75)
    tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    factor = darkness * tint / tint.max()
    return _Stroke(patch, shape, canvas.pixels[patch.rows, patch.cols] * factor)


def _dent_shading(canvas: _Canvas, centre: tuple[int, int], rng: np.random.Generator) -> _Stroke:
    """A smooth dent or bump seen only through its shading under three coloured lights.

    The footprint is an ellipse with height (1 - rho^2)^2; each colour channel shifts by the
    slope along its light's azimuth (lights 120 degrees apart), as in colour photometric stereo.
    Draws: size, aspect, angle (uniform each), dent or bump (random), amplitude (uniform),
    light azimuth (uniform).
    """
    radius = rng.uniform(*canvas.config.size_px) / 2
    aspect = rng.uniform(0.6, 1.0)
    angle = rng.uniform(0, math.pi)
    sign = -1.0 if rng.random() < 0.5 else 1.0
    amplitude = rng.uniform(25, 60)  # grey levels at the steepest slope
    azimuth = rng.uniform(0, 2 * math.pi)
    patch = _Patch.around(canvas.pixels.shape, centre, radius)
    rho = patch.elliptical_radius(radius, aspect, angle)
    bump = np.clip(1 - rho**2, 0, None) ** 2
    if min(patch.shape) >= 2:
        slope_y, slope_x = np.gradient(bump)
    else:
        slope_y = slope_x = np.zeros_like(bump)
    steepest = max(float(np.hypot(slope_x, slope_y).max()), 1e-6)
    azimuths = azimuth + np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=np.float32)
    shading = slope_x[..., None] * np.cos(azimuths) + slope_y[..., None] * np.sin(azimuths)
    shift = (sign * amplitude / steepest) * shading
    shape = np.clip((1 - rho) / 0.1, 0, 1)
    return _Stroke(patch, shape, canvas.pixels[patch.rows, patch.cols] + shift)


ANOMALY_KINDS: dict[str, AnomalyKind] = {
    "perlin_texture": _perlin_texture,
    "scratch": _scratch,
    "stain": _stain,
    "dent_shading": _dent_shading,
}


# --- pasting ---


def paste_anomalies(
    image: np.ndarray,
    rng: np.random.Generator,
    config: AnomalyConfig,
    *,
    region: np.ndarray | None = None,
    texture_source: np.ndarray | None = None,
) -> PastedAnomalies:
    """Paste 0 to ``config.max_per_image`` anomalies into ``image`` (uint8 (H, W, 3)).

    ``region`` (bool (H, W)): where anomalies may go (e.g. the part's surface); each anomaly is
    centred on one of its pixels and clipped to it. ``texture_source`` (uint8 (h, w, 3), any
    size): where ``perlin_texture`` takes its foreign texture from (e.g. another training
    image). The input arrays are not modified.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: {image.dtype} {image.shape}, expected uint8 (H, W, 3)")
    height, width = image.shape[:2]
    if region is not None:
        region = np.asarray(region)
        if region.dtype != np.bool_ or region.shape != (height, width):
            raise ValueError(
                f"region: {region.dtype} {region.shape}, expected bool {(height, width)}"
            )
    if texture_source is not None:
        texture_source = np.asarray(texture_source)
        if (
            texture_source.dtype != np.uint8
            or texture_source.ndim != 3
            or texture_source.shape[-1] != 3
            or texture_source.size == 0
        ):
            raise ValueError(
                f"texture_source: {texture_source.dtype} {texture_source.shape}, "
                "expected uint8 (h, w, 3)"
            )

    mask = np.zeros((height, width), dtype=bool)
    if rng.random() >= config.probability:
        return PastedAnomalies(image.copy(), mask, [])
    candidates = np.flatnonzero(region) if region is not None else None
    if candidates is not None and candidates.size == 0:
        return PastedAnomalies(image.copy(), mask, [])

    canvas = _Canvas(
        pixels=image.astype(np.float32),
        config=config,
        region_extent=_extent(region) if region is not None else max(height, width),
        texture_source=texture_source,
    )
    kinds: list[str] = []
    for _ in range(int(rng.integers(1, config.max_per_image + 1))):
        kind = config.kinds[int(rng.integers(len(config.kinds)))]
        index = int(rng.integers(candidates.size if candidates is not None else height * width))
        flat = int(candidates[index]) if candidates is not None else index
        centre = divmod(flat, width)
        opacity = rng.uniform(*config.opacity)
        stroke = ANOMALY_KINDS[kind](canvas, centre, rng)
        rows, cols = stroke.patch.rows, stroke.patch.cols
        weight = stroke.shape * opacity
        if region is not None:
            weight = weight * region[rows, cols]
        changed = weight > config.mask_threshold
        pixels = canvas.pixels[rows, cols]  # a view: writing to it edits the working image
        blended = pixels + weight[..., None] * (stroke.target - pixels)
        pixels[changed] = blended[changed]
        mask[rows, cols] |= changed
        kinds.append(kind)

    out = image.copy()
    out[mask] = np.clip(np.rint(canvas.pixels[mask]), 0, 255).astype(np.uint8)
    return PastedAnomalies(out, mask, kinds)


def _extent(region: np.ndarray) -> int:
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    return int(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1)


# --- the other tasks under a pasted defect ---


def invalidate_geometry(
    height: np.ndarray | None, normals: np.ndarray | None, mask: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Copies of ``height`` (H, W) with NaN and ``normals`` (H, W, 3) with (0, 0, 0) under
    ``mask``, the tasks' invalid values: a pasted defect's geometry is unknown. None stays None
    (a line without a height sensor)."""
    mask = np.asarray(mask, dtype=bool)
    new_height = new_normals = None
    if height is not None:
        if height.shape != mask.shape or not np.issubdtype(height.dtype, np.floating):
            raise ValueError(f"height: {height.dtype} {height.shape}, expected float {mask.shape}")
        new_height = height.copy()
        new_height[mask] = np.nan
    if normals is not None:
        if normals.shape != (*mask.shape, 3):
            raise ValueError(f"normals: {normals.shape}, expected {(*mask.shape, 3)}")
        new_normals = normals.copy()
        new_normals[mask] = 0
    return new_height, new_normals


def label_semseg(semseg: np.ndarray, mask: np.ndarray, class_id: int) -> np.ndarray:
    """A copy of ``semseg`` (H, W) with ``class_id`` under ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    if semseg.shape != mask.shape:
        raise ValueError(f"semseg: {semseg.shape}, mask: {mask.shape}; expected the same shape")
    if np.issubdtype(semseg.dtype, np.integer):
        info = np.iinfo(semseg.dtype)
        if not info.min <= class_id <= info.max:
            raise ValueError(f"class_id {class_id} does not fit semseg's dtype {semseg.dtype}")
    labelled = semseg.copy()
    labelled[mask] = class_id
    return labelled


def _benchmark(repeats: int = 200) -> None:
    """Print the pasting time on a 384 x 384 image per kind and for the default config."""
    import time

    image = np.random.default_rng(0).integers(60, 200, size=(384, 384, 3), dtype=np.uint8)
    configs = {
        kind: AnomalyConfig(probability=1, kinds=(kind,), max_per_image=1) for kind in ANOMALY_KINDS
    }
    configs["default (max_per_image=2)"] = AnomalyConfig(probability=1)
    for name, config in configs.items():
        rng = np.random.default_rng(1)
        start = time.perf_counter()
        for _ in range(repeats):
            paste_anomalies(image, rng, config)
        print(f"{name}: {(time.perf_counter() - start) / repeats * 1e3:.2f} ms per call")


if __name__ == "__main__":
    _benchmark()
