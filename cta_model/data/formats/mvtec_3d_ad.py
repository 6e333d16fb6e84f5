"""MVTec 3D-AD (read-only), DESIGN 4.3: defect masks, height and normals from the point maps.

Layout (Bergmann, Jin, Sattlegger & Steger, "The MVTec 3D-AD Dataset for Unsupervised 3D
Anomaly Detection and Localization", VISAPP 2022, arXiv:2112.09045; the dataset's readme)::

    <root>/<category>/{train,validation,test}/<type>/rgb/<stem>.png   RGB image
    <root>/<category>/{train,validation,test}/<type>/xyz/<stem>.tiff  (H, W, 3) float32 point map
    <root>/<category>/test/<type>/gt/<stem>.png                       0 = good, non-zero = defect

``<type>`` is ``good`` in train and validation; test adds one folder per defect type. The point
map holds the 3-D coordinates (x, y, z) in mm of the point seen by each pixel, pixel-aligned
with the RGB image; a pixel without a measurement has z = 0 (the whole point is 0). TIFF is
read with tifffile (Pillow cannot read 3-channel float32 TIFFs).

Tasks and conventions (registry: +x image right, +y image down, +z towards the camera):

* ``height`` (mm) = ``datum_mm - z``: the surface's distance *towards the camera* from the datum,
  NaN where z = 0 (or not finite). Datum rule (unless ``datum_mm`` is passed): the median of all
  valid z values pooled over up to ``datum_max_parts`` (default 16) point maps of train/good,
  evenly spaced in file-name order (all of them when there are fewer). It depends only on the
  training parts, so every split of a category shares it. Because the median pixel of a scan
  may lie on the part or on the support, the datum is a robust reference level, not necessarily
  the support plane; pass ``datum_mm`` for a measured one.
* ``normals`` from the point map (``normals_from_point_map``): the points are expressed in the
  registry axes, ``Q = (sx * x, sy * y, -z)``, where sx / sy = the sign of the median x step
  along a row / y step down a column (so +x is image right and +y image down whatever the
  sensor's axis signs; -z because z grows away from the camera). With central differences
  ``du = Q[r, c+1] - Q[r, c-1]`` and ``dv = Q[r+1, c] - Q[r-1, c]``, ``n = du x dv``, negated
  where n_z < 0 (facing the sensor), normalised. For a height field this is exactly
  ``normalize(-dh/dx, -dh/dy, 1)``, the synthetic generator's rule. (0, 0, 0) where the pixel or
  any of its 4 neighbours is invalid, and on the 1-pixel image border.
* ``semseg``: binary, 0 good / 1 defect, from ``gt`` (non-zero = defect). Types other than
  ``good`` must have a gt mask; ``good`` without one (train, validation) is all 0.
* ``pitch_mm_per_px`` = median |x step| between horizontally adjacent valid points.
* ``depth`` is absent (0, ``present=False``). ``line_id`` = ``mvtec-3d-ad-<category>``,
  ``sample_id`` = ``<split>/<type>/<stem>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from cta_model.data.formats._common import (
    check_shape,
    check_split,
    line_id_for,
    load_png,
    make_sample,
    require_dir,
    require_file,
    subfolders,
)
from cta_model.data.formats.mvtec_ad import GOOD, category_dir, list_pngs
from cta_model.errors import ConfigError, DataError

DEFAULT_DATUM_MAX_PARTS = 16


def read_point_map(path: Path, field: str = "xyz") -> np.ndarray:
    """A (H, W, 3) float32 point map from a TIFF, checked."""
    require_file(path, field)
    try:
        with tifffile.TiffFile(path) as tiff:
            if len(tiff.pages) == 0:  # a broken header reads as an empty array, not an error
                raise DataError(f"{path}: {field}: unreadable TIFF: no image in the file")
            array = tiff.asarray()
    except DataError:
        raise
    except Exception as exc:  # tifffile raises many exception types on corrupt input
        raise DataError(f"{path}: {field}: unreadable TIFF: {type(exc).__name__}: {exc}") from None
    if array.dtype != np.float32:
        raise DataError(f"{path}: {field}: dtype {array.dtype}, expected float32")
    if array.ndim != 3 or array.shape[-1] != 3:
        raise DataError(f"{path}: {field}: shape {array.shape}, expected (H, W, 3) x, y, z")
    return array


def valid_points(xyz: np.ndarray) -> np.ndarray:
    """Pixels with a measurement: z != 0 and all coordinates finite."""
    return (xyz[..., 2] != 0) & np.isfinite(xyz).all(axis=-1)


def _median_step(values: np.ndarray, valid: np.ndarray, axis: int) -> float:
    """Median difference between neighbours along ``axis`` where both are valid; NaN if none."""
    steps = np.diff(values, axis=axis)
    both = valid[:-1, :] & valid[1:, :] if axis == 0 else valid[:, :-1] & valid[:, 1:]
    return float(np.median(steps[both])) if both.any() else float("nan")


def pitch_from_point_map(xyz: np.ndarray) -> float:
    """Median |x step| (mm) between horizontally adjacent valid points; NaN if there are none."""
    valid = valid_points(xyz)
    steps = np.abs(np.diff(xyz[..., 0].astype(np.float64), axis=1))
    both = valid[:, :-1] & valid[:, 1:]
    return float(np.median(steps[both])) if both.any() else float("nan")


def normals_from_point_map(xyz: np.ndarray) -> np.ndarray:
    """Unit normals (H, W, 3) float32 in the registry axes; (0, 0, 0) where undefined.

    See the module docstring for the exact rule and sign conventions.
    """
    points = xyz.astype(np.float64)
    valid = valid_points(xyz)
    x_sign = np.sign(_median_step(points[..., 0], valid, axis=1))
    y_sign = np.sign(_median_step(points[..., 1], valid, axis=0))
    x_sign = 1.0 if not np.isfinite(x_sign) or x_sign == 0 else x_sign
    y_sign = 1.0 if not np.isfinite(y_sign) or y_sign == 0 else y_sign
    q = np.stack([x_sign * points[..., 0], y_sign * points[..., 1], -points[..., 2]], axis=-1)
    normals = np.zeros_like(q)
    if min(xyz.shape[:2]) < 3:
        return normals.astype(np.float32)
    du = q[1:-1, 2:] - q[1:-1, :-2]
    dv = q[2:, 1:-1] - q[:-2, 1:-1]
    n = np.cross(du, dv)
    n = np.where(n[..., 2:3] < 0, -n, n)  # face the sensor: +z towards the camera
    length = np.linalg.norm(n, axis=-1, keepdims=True)
    ok = (
        valid[1:-1, 1:-1]
        & valid[1:-1, 2:]
        & valid[1:-1, :-2]
        & valid[2:, 1:-1]
        & valid[:-2, 1:-1]
        & (length[..., 0] > 0)
    )
    normals[1:-1, 1:-1] = np.where(ok[..., None], n / np.where(length > 0, length, 1.0), 0.0)
    return normals.astype(np.float32)


def height_from_point_map(xyz: np.ndarray, datum_mm: float) -> np.ndarray:
    """Height (H, W) float32 mm = datum - z, NaN where the point is invalid."""
    valid = valid_points(xyz)
    z = xyz[..., 2].astype(np.float64)
    return np.where(valid, datum_mm - z, np.nan).astype(np.float32)


class Mvtec3dAD:
    """One MVTec 3D-AD category: binary semseg, height (mm) and normals from the point maps."""

    name = "mvtec-3d-ad"
    splits: tuple[str, ...] = ("train", "validation", "test")
    tasks: tuple[str, ...] = ("semseg", "height", "normals")
    class_names: tuple[str, ...] = (GOOD, "defect")
    depth_is_disparity = False

    def __init__(
        self,
        root: str | Path,
        split: str,
        category: str | None = None,
        datum_mm: float | None = None,
        datum_max_parts: int = DEFAULT_DATUM_MAX_PARTS,
    ) -> None:
        check_split(self.name, split, self.splits)
        if datum_max_parts < 1:
            raise ConfigError(f"{self.name}: datum_max_parts must be >= 1, got {datum_max_parts}")
        if datum_mm is not None and not np.isfinite(datum_mm):
            raise ConfigError(f"{self.name}: datum_mm must be a finite number, got {datum_mm}")
        self.root = Path(root)
        self.split = split
        self.category = category
        self.category_dir = category_dir(self.name, self.root, category)
        self.line_id = line_id_for(self.name, category or "")
        split_dir = require_dir(self.category_dir / split, "split")
        # (type, stem) per sample; rgb, xyz and (for defects) gt are checked to exist now
        self.items: list[tuple[str, str]] = []
        for kind in subfolders(split_dir):
            for rgb_path in list_pngs(split_dir / kind / "rgb", "rgb"):
                stem = rgb_path.stem
                require_file(self._path(kind, "xyz", stem), "xyz")
                if kind != GOOD:
                    require_file(self._path(kind, "gt", stem), "gt")
                self.items.append((kind, stem))
        if not self.items:
            raise DataError(f"{split_dir}: rgb: no PNG images in this split")
        self.datum_mm = (
            float(datum_mm) if datum_mm is not None else self._training_datum(datum_max_parts)
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sample_ids(self) -> list[str]:
        return [f"{self.split}/{kind}/{stem}" for kind, stem in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        kind, stem = self.items[index]
        image = load_png(self._path(kind, "rgb", stem), "rgb", "RGB")
        shape = image.shape[:2]
        xyz_path = self._path(kind, "xyz", stem)
        xyz = read_point_map(xyz_path)
        check_shape(xyz_path, "xyz", xyz, (*shape, 3))
        pitch = pitch_from_point_map(xyz)
        if not np.isfinite(pitch):
            raise DataError(
                f"{xyz_path}: xyz: no two horizontally adjacent valid points; "
                "cannot derive pitch_mm_per_px"
            )
        semseg = np.zeros(shape, dtype=np.int64)
        gt_path = self._path(kind, "gt", stem)
        if kind != GOOD or gt_path.is_file():
            mask = load_png(gt_path, "gt", "L")
            check_shape(gt_path, "gt", mask, shape)
            semseg[mask != 0] = 1
        labels = {
            "semseg": semseg,
            "height": height_from_point_map(xyz, self.datum_mm),
            "normals": normals_from_point_map(xyz),
        }
        return make_sample(
            sample_id=f"{self.split}/{kind}/{stem}",
            line_id=self.line_id,
            image=image,
            labels=labels,
            pitch_mm_per_px=pitch,
        )

    def _path(self, kind: str, modality: str, stem: str) -> Path:
        suffix = ".tiff" if modality == "xyz" else ".png"
        return self.category_dir / self.split / kind / modality / f"{stem}{suffix}"

    def _training_datum(self, max_parts: int) -> float:
        """Median valid z (mm) over up to ``max_parts`` evenly spaced train/good point maps."""
        folder = self.category_dir / "train" / GOOD / "xyz"
        if not folder.is_dir():
            raise DataError(
                f"{folder}: xyz: folder missing; the height datum comes from the good training "
                "parts (or pass datum_mm)"
            )
        paths = sorted(p for p in folder.glob("*.tiff") if p.is_file())
        if not paths:
            raise DataError(f"{folder}: xyz: no .tiff point maps to compute the height datum")
        picks = np.unique(np.linspace(0, len(paths) - 1, min(max_parts, len(paths))).round())
        values = []
        for pick in picks.astype(int):
            xyz = read_point_map(paths[pick])
            values.append(xyz[..., 2][valid_points(xyz)])
        pooled = np.concatenate(values)
        if pooled.size == 0:
            raise DataError(f"{folder}: xyz: no valid points (z != 0) to compute the datum")
        return float(np.median(pooled.astype(np.float64)))
