"""Tiny MVTec AD and MVTec 3D-AD folders in their exact on-disk layouts, for tests.

Importable from any test (tests/ is on sys.path through its conftest.py)::

    from mvtec_layouts import write_mvtec_ad_layout, write_mvtec_3d_layout

Images are a smooth texture with mild noise; a defect image gets a dark rectangle (and, in
MVTec 3D-AD, a bump of BUMP_MM towards the camera in its point map) exactly where its mask is,
so the mask, the image and the geometry agree. Everything is seeded: the same call gives the
same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

AD_CATEGORIES: tuple[str, ...] = ("metal_nut", "wood")
D3_CATEGORIES: tuple[str, ...] = ("cable_gland", "foam")
DEFECT_TYPES: tuple[str, ...] = ("crack", "hole")
SIZE: tuple[int, int] = (32, 40)  # (height, width)
PITCH_MM = 0.2  # MVTec 3D-AD point maps: orthographic grid step
Z0_MM = 400.0  # distance of the support plane from the sensor
BUMP_MM = 0.5  # a defect rises this much towards the sensor
INVALID_POINTS = ((0, 0), (0, 1))  # pixels without a measurement in every point map


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def defect_box(type_index: int, number: int, size: tuple[int, int] = SIZE) -> tuple[slice, slice]:
    """Where defect ``number`` of the ``type_index``-th type sits (rows, cols), inside the image
    and away from its border."""
    height, width = size
    top = 3 + (5 * type_index + 3 * number) % max(1, height - 12)
    left = 3 + (7 * type_index + 5 * number) % max(1, width - 14)
    return slice(top, top + 6), slice(left, left + 8)


def defect_mask(type_index: int, number: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    mask = np.zeros(size, dtype=np.uint8)
    mask[defect_box(type_index, number, size)] = 255
    return mask


def texture(rng: np.random.Generator, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A mid-grey RGB texture: smooth stripes plus noise (passes the brightness checks)."""
    height, width = size
    rows, cols = np.mgrid[0:height, 0:width]
    base = 120 + 30 * np.sin(cols / 3.0) + 15 * np.cos(rows / 5.0)
    image = base[..., None] + np.array([0.0, 5.0, -5.0]) + rng.normal(0, 6, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def with_defect(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[mask > 0] = (out[mask > 0] * 0.25).astype(np.uint8)
    return out


def _test_types(
    defect_types: Sequence[str] | Mapping[str, Sequence[str]], category: str
) -> tuple[str, ...]:
    chosen = defect_types[category] if isinstance(defect_types, Mapping) else defect_types
    return tuple(chosen)


def write_mvtec_ad_layout(
    root: Path,
    categories: Sequence[str] = AD_CATEGORIES,
    defect_types: Sequence[str] | Mapping[str, Sequence[str]] = DEFECT_TYPES,
    *,
    n_train: int = 4,
    n_test: int = 3,
    size: tuple[int, int] = SIZE,
    seed: int = 0,
) -> Path:
    """``<root>/<category>/{train/good, test/{good,<types>}, ground_truth/<type>/<n>_mask.png}``
    with ``n_train`` training images and ``n_test`` test images per type (``good`` included).
    ``defect_types``: the same for every category, or per category. Returns ``root``."""
    rng = np.random.default_rng(seed)
    for category in categories:
        folder = root / category
        for number in range(n_train):
            save_png(folder / "train" / "good" / f"{number:03d}.png", texture(rng, size))
        for number in range(n_test):
            save_png(folder / "test" / "good" / f"{number:03d}.png", texture(rng, size))
        for type_index, kind in enumerate(_test_types(defect_types, category)):
            for number in range(n_test):
                mask = defect_mask(type_index, number, size)
                save_png(
                    folder / "test" / kind / f"{number:03d}.png",
                    with_defect(texture(rng, size), mask),
                )
                save_png(folder / "ground_truth" / kind / f"{number:03d}_mask.png", mask)
    return root


def point_map(mask: np.ndarray | None = None, z0: float = Z0_MM) -> np.ndarray:
    """(H, W, 3) float32 points of the support plane at ``z0`` mm, a bump of BUMP_MM towards
    the sensor under ``mask``, INVALID_POINTS without a measurement (all 0)."""
    height, width = mask.shape if mask is not None else SIZE
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    z = np.full((height, width), z0)
    if mask is not None:
        z[mask > 0] -= BUMP_MM
    xyz = np.stack([(cols - width / 2) * PITCH_MM, (rows - height / 2) * PITCH_MM, z], axis=-1)
    for row, col in INVALID_POINTS:
        xyz[row, col] = 0.0
    return xyz.astype(np.float32)


def write_mvtec_3d_layout(
    root: Path,
    categories: Sequence[str] = D3_CATEGORIES,
    defect_types: Sequence[str] | Mapping[str, Sequence[str]] = DEFECT_TYPES,
    *,
    n_train: int = 4,
    n_validation: int = 2,
    n_test: int = 3,
    size: tuple[int, int] = SIZE,
    seed: int = 0,
) -> Path:
    """``<root>/<category>/{train,validation,test}/<type>/{rgb,xyz,gt}/`` with float32 TIFF
    point maps (support plane at Z0_MM, so the height datum is Z0_MM and a defect's height is
    +BUMP_MM) and a gt mask for every test image (all 0 for ``good``, as in the benchmark).
    Returns ``root``."""
    rng = np.random.default_rng(seed)

    def part(folder: Path, stem: str, mask: np.ndarray | None, gt: bool) -> None:
        image = texture(rng, size)
        if mask is not None:
            image = with_defect(image, mask)
        save_png(folder / "rgb" / f"{stem}.png", image)
        (folder / "xyz").mkdir(parents=True, exist_ok=True)
        xyz = point_map(mask if mask is not None else np.zeros(size, dtype=np.uint8))
        tifffile.imwrite(folder / "xyz" / f"{stem}.tiff", xyz, photometric="rgb")
        if gt:
            empty = np.zeros(size, dtype=np.uint8)
            save_png(folder / "gt" / f"{stem}.png", mask if mask is not None else empty)

    for category in categories:
        folder = root / category
        for number in range(n_train):
            part(folder / "train" / "good", f"{number:03d}", None, gt=False)
        for number in range(n_validation):
            part(folder / "validation" / "good", f"{number:03d}", None, gt=False)
        for number in range(n_test):
            part(folder / "test" / "good", f"{number:03d}", None, gt=True)
        for type_index, kind in enumerate(_test_types(defect_types, category)):
            for number in range(n_test):
                mask = defect_mask(type_index, number, size)
                part(folder / "test" / kind, f"{number:03d}", mask, gt=True)
    return root
