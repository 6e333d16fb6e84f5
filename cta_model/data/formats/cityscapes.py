"""MTAN-style preprocessed Cityscapes (read-only), DESIGN 4.3.

Layout (the MTAN preprocessing, https://github.com/lorenmt/mtan README and
``im2im_pred/create_dataset.py``; Cordts et al., "The Cityscapes Dataset for Semantic Urban
Scene Understanding", CVPR 2016)::

    <root>/{train,val}/image/<i>.npy      (H, W, 3) float in [0, 1]      2975 / 500 at 128 x 256
    <root>/{train,val}/label_7/<i>.npy    (H, W) 7 category ids, -1 = ignore
    <root>/{train,val}/label_19/<i>.npy   (H, W) 19 train ids, -1 = ignore
    <root>/{train,val}/depth/<i>.npy      (H, W) or (H, W, 1) scaled disparity, 0 = invalid

Option ``classes=7`` (default) or ``19`` picks the label folder. Class names follow
cityscapesScripts ``helpers/labels.py``: the 7 non-void categories and the 19 train ids.

The ``depth`` task carries the file's **disparity** (inverse depth, scaled), not metres: larger
is nearer, and a scale-crop by s should *multiply* it by s, not divide. The registry's depth rule
divides, so ``depth_is_disparity`` is True here and ``transforms.RandomScaleCrop`` takes a
``depth_is_disparity`` flag; depth metrics on this format are disparity errors. ``height`` and
``normals`` are absent (invalid fill, ``present=False``); ``pitch_mm_per_px`` is NaN.
"""

from __future__ import annotations

from pathlib import Path

from cta_model.data.formats.nyuv2 import MtanNpyDataset
from cta_model.errors import ConfigError

CITYSCAPES_7_CLASS_NAMES: tuple[str, ...] = (
    "flat",
    "construction",
    "object",
    "nature",
    "sky",
    "human",
    "vehicle",
)
CITYSCAPES_19_CLASS_NAMES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
_CLASS_NAMES = {7: CITYSCAPES_7_CLASS_NAMES, 19: CITYSCAPES_19_CLASS_NAMES}


class Cityscapes(MtanNpyDataset):
    """MTAN-style Cityscapes: semseg (7 or 19 classes) and depth (= scaled disparity)."""

    name = "cityscapes"
    tasks = ("semseg", "depth")
    depth_is_disparity = True

    def __init__(self, root: str | Path, split: str, classes: int = 7) -> None:
        if classes not in _CLASS_NAMES:
            raise ConfigError(f"cityscapes: option classes must be 7 or 19, got {classes!r}")
        self.classes = classes
        self.class_names = _CLASS_NAMES[classes]
        self.folders = {"image": "image", "semseg": f"label_{classes}", "depth": "depth"}
        super().__init__(root, split)
