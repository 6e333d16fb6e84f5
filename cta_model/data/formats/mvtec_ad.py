"""MVTec AD (read-only), DESIGN 4.3: segmentation of defects, one category at a time.

Layout (Bergmann et al., "MVTec AD - A Comprehensive Real-World Dataset for Unsupervised
Anomaly Detection", CVPR 2019; the dataset's public download page)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect>/*.png                    <defect> includes "good"
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png  0 = defect-free, non-zero = defect

Images are RGB or grayscale PNGs (grayscale is converted to RGB). ``good`` images have no
mask: their semseg is all 0.

Classes: ``["good"] + sorted(defect folders of test/ other than "good")``, so a class id is the
defect folder's position in that list (``good`` = 0) and is the same for the train and test
splits. ``binary=True`` gives ``["good", "defect"]`` (0 / 1). Splits: ``train`` = train/good,
``test`` = every test/<defect> folder (sorted), files sorted by name within a folder.

Sample dict: ``semseg`` present; ``height``, ``depth``, ``normals`` invalid and
``present=False``; ``pitch_mm_per_px`` NaN; ``sample_id`` = ``<split>/<defect>/<stem>``;
``line_id`` = ``mvtec-ad-<category>`` (underscores become hyphens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cta_model.data.formats._common import (
    check_shape,
    check_split,
    line_id_for,
    load_png,
    make_sample,
    require_dir,
    subfolders,
)
from cta_model.errors import ConfigError, DataError

GOOD = "good"


def category_dir(format_name: str, root: Path, category: str | None) -> Path:
    """``<root>/<category>``; a missing or unknown category names the ones that exist."""
    require_dir(root, "root")
    if not category:
        raise ConfigError(
            f"{format_name}: option category is required; categories in {root}: "
            f"{', '.join(subfolders(root)) or '(none)'}"
        )
    path = root / category
    if not path.is_dir():
        raise DataError(
            f"{path}: category: folder missing; categories in {root}: "
            f"{', '.join(subfolders(root)) or '(none)'}"
        )
    return path


def list_pngs(folder: Path, field: str) -> list[Path]:
    return sorted(p for p in require_dir(folder, field).glob("*.png") if p.is_file())


class MvtecAD:
    """One MVTec AD category as semseg samples (class per defect type, or binary)."""

    name = "mvtec-ad"
    splits: tuple[str, ...] = ("train", "test")
    tasks: tuple[str, ...] = ("semseg",)
    depth_is_disparity = False

    def __init__(
        self, root: str | Path, split: str, category: str | None = None, binary: bool = False
    ) -> None:
        check_split(self.name, split, self.splits)
        self.root = Path(root)
        self.split = split
        self.category = category
        self.binary = binary
        self.category_dir = category_dir(self.name, self.root, category)
        test_dir = require_dir(self.category_dir / "test", "test")
        defects = [name for name in subfolders(test_dir) if name != GOOD]
        self.class_names: tuple[str, ...] = (GOOD, "defect") if binary else (GOOD, *defects)
        self.line_id = line_id_for(self.name, category or "")
        # (defect folder, image path) per sample
        self.items: list[tuple[str, Path]] = []
        if split == "train":
            folder = self.category_dir / "train" / GOOD
            self.items = [(GOOD, path) for path in list_pngs(folder, "image")]
        else:
            for defect in subfolders(test_dir):
                self.items += [(defect, path) for path in list_pngs(test_dir / defect, "image")]
        if not self.items:
            raise DataError(f"{self.category_dir / split}: image: no PNG images in this split")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sample_ids(self) -> list[str]:
        return [self._sample_id(defect, path) for defect, path in self.items]

    def class_id(self, defect: str) -> int:
        if defect == GOOD:
            return 0
        return 1 if self.binary else self.class_names.index(defect)

    def mask_path(self, defect: str, image_path: Path) -> Path:
        return self.category_dir / "ground_truth" / defect / f"{image_path.stem}_mask.png"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        defect, image_path = self.items[index]
        image = load_png(image_path, "image", "RGB")
        shape = image.shape[:2]
        semseg = np.zeros(shape, dtype=np.int64)
        if defect != GOOD:
            mask_path = self.mask_path(defect, image_path)
            mask = load_png(mask_path, "semseg", "L")
            check_shape(mask_path, "semseg", mask, shape)
            semseg[mask != 0] = self.class_id(defect)
        return make_sample(
            sample_id=self._sample_id(defect, image_path),
            line_id=self.line_id,
            image=image,
            labels={"semseg": semseg},
        )

    def _sample_id(self, defect: str, path: Path) -> str:
        return f"{self.split}/{defect}/{path.stem}"
