"""MTAN-style preprocessed NYUv2 (read-only), DESIGN 4.3.

Layout (as written by the MTAN preprocessing; facts from the public loader
``im2im_pred/create_dataset.py`` of https://github.com/lorenmt/mtan, Liu, Johns & Davison,
"End-to-End Multi-Task Learning with Attention", CVPR 2019)::

    <root>/{train,val}/image/<i>.npy    (H, W, 3) float in [0, 1]        795 / 654 at 288 x 384
    <root>/{train,val}/label/<i>.npy    (H, W) 13-class ids, -1 = ignore (float or int)
    <root>/{train,val}/depth/<i>.npy    (H, W) or (H, W, 1) metres, 0 = invalid
    <root>/{train,val}/normal/<i>.npy   (H, W, 3) unit normals, (0, 0, 0) = invalid

``<i>`` is an integer index; samples are ordered by it (numerically, so 10 follows 9).
The 13 classes are the NYUv2 13-class grouping (Couprie et al. 2013; ankurhanda/nyuv2-meta-data).

Mapping onto the sample dict: ``image`` uint8 = round(x * 255) (the float image is quantised to
8 bits like every other image in the package; the error is at most 1/510); ``semseg`` int64;
``depth`` float32 metres; ``normals`` float32 exactly as stored (not re-oriented: channel 0 is
the horizontal component, which MTAN's own flip augmentation negates, as the registry does; the
signs of the y and z channels are the preprocessing's and are not checked against the
registry's +y down / +z towards the camera); ``height`` is absent (NaN,
``present["height"] = False``). ``pitch_mm_per_px`` is NaN (unknown).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cta_model.data.formats._common import (
    check_finite,
    check_floating,
    check_shape,
    check_split,
    class_ids,
    float_image_to_uint8,
    load_npy,
    make_sample,
    require_dir,
    squeeze_channel,
)
from cta_model.errors import DataError

NYUV2_CLASS_NAMES: tuple[str, ...] = (
    "bed",
    "books",
    "ceiling",
    "chair",
    "floor",
    "furniture",
    "objects",
    "picture",
    "sofa",
    "table",
    "tv",
    "wall",
    "window",
)


class MtanNpyDataset:
    """Base of the MTAN-style ``<split>/<modality>/<i>.npy`` layouts (NYUv2, Cityscapes).

    Subclasses set ``name``, ``tasks``, ``class_names`` and ``folders`` (task -> folder name;
    ``image`` included). The index set is taken from the image folder; every other folder must
    hold the same indices, checked when the dataset opens.
    """

    name = ""
    splits: tuple[str, ...] = ("train", "val")
    tasks: tuple[str, ...] = ()
    depth_is_disparity = False  # Cityscapes stores disparity in its "depth" folder
    class_names: tuple[str, ...] = ()
    folders: dict[str, str] = {}

    def __init__(self, root: str | Path, split: str) -> None:
        check_split(self.name, split, self.splits)
        self.root = Path(root)
        self.split = split
        split_dir = require_dir(self.root / split, "split")
        self._dirs = {
            field: require_dir(split_dir / folder, field) for field, folder in self.folders.items()
        }
        self.indices = self._list_indices(self._dirs["image"])
        if not self.indices:
            raise DataError(f"{self._dirs['image']}: image: no <i>.npy files")
        for field, folder in self._dirs.items():
            for index in self.indices:
                path = folder / f"{index}.npy"
                if not path.is_file():
                    raise DataError(f"{path}: {field}: file missing (the image folder has it)")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sample_ids(self) -> list[str]:
        return [f"{self.split}-{index}" for index in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        if not -len(self) <= position < len(self):
            raise IndexError(f"index {position} out of range for {len(self)} samples")
        index = self.indices[position]
        image_path = self._path("image", index)
        image = float_image_to_uint8(image_path, "image", load_npy(image_path, "image"))
        shape = image.shape[:2]
        labels = {task: self._read_label(task, index, shape) for task in self.tasks}
        return make_sample(
            sample_id=f"{self.split}-{index}", line_id=self.name, image=image, labels=labels
        )

    def _path(self, field: str, index: int) -> Path:
        return self._dirs[field] / f"{index}.npy"

    def _read_label(self, task: str, index: int, shape: tuple[int, int]) -> np.ndarray:
        path = self._path(task, index)
        array = load_npy(path, task)
        if task == "semseg":
            array = squeeze_channel(path, task, array)
            check_shape(path, task, array, shape)
            return class_ids(path, task, array, self.num_classes)
        check_floating(path, task, array)
        check_finite(path, task, array)
        if task == "normals":
            check_shape(path, task, array, (*shape, 3))
        else:
            array = squeeze_channel(path, task, array)
            check_shape(path, task, array, shape)
        return array.astype(np.float32)

    @staticmethod
    def _list_indices(folder: Path) -> list[int]:
        indices = []
        for path in folder.glob("*.npy"):
            if not path.stem.isdigit():
                raise DataError(f"{path}: image: file name is not <integer index>.npy")
            indices.append(int(path.stem))
        return sorted(indices)


class NYUv2(MtanNpyDataset):
    """MTAN-style NYUv2: semseg (13 classes), depth (metres) and normals."""

    name = "nyuv2"
    tasks = ("semseg", "depth", "normals")
    class_names = NYUV2_CLASS_NAMES
    folders = {"image": "image", "semseg": "label", "depth": "depth", "normals": "normal"}
