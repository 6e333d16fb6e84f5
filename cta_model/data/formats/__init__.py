"""Read-only loaders of standard research formats (DESIGN 4.3), one module per format.

Every loader is a map-style dataset (``__len__``, ``__getitem__``) returning the line dataset's
in-memory sample dict: ``sample_id``, ``line_id``, ``image`` (uint8 H x W x 3), one entry per
registry task (``semseg`` int64 H x W with -1 invalid, ``height`` float32 H x W NaN invalid,
``depth`` float32 H x W 0 invalid, ``normals`` float32 H x W x 3 with (0, 0, 0) invalid),
``present`` ({task: bool}, one key per registry task) and ``pitch_mm_per_px`` (NaN when the
format has no metric scale). Tasks a format lacks are filled with the registry's invalid value
and flagged ``present=False``, so its samples always collate. Each loader also exposes
``tasks`` (the tasks it provides), ``num_classes``, ``class_names``, ``sample_ids`` and
``depth_is_disparity``.

    dataset = open_format("mvtec-ad", "/data/mvtec_ad", "test", category="bottle")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cta_model.data.formats.cityscapes import Cityscapes
from cta_model.data.formats.mvtec_3d_ad import Mvtec3dAD
from cta_model.data.formats.mvtec_ad import MvtecAD
from cta_model.data.formats.nyuv2 import NYUv2
from cta_model.errors import ConfigError

FORMATS: dict[str, type] = {
    "nyuv2": NYUv2,
    "cityscapes": Cityscapes,
    "mvtec-ad": MvtecAD,
    "mvtec-3d-ad": Mvtec3dAD,
}


def open_format(name: str, root: str | Path, split: str, **options: Any) -> Any:
    """Open split ``split`` of the dataset at ``root`` in format ``name`` with its options."""
    try:
        dataset_class = FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None
    try:
        return dataset_class(root, split, **options)
    except TypeError as exc:
        # Unknown keyword options surface as a TypeError from the constructor.
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ConfigError(f"format {name!r}: {exc}") from None


__all__ = ["FORMATS", "Cityscapes", "Mvtec3dAD", "MvtecAD", "NYUv2", "open_format"]
