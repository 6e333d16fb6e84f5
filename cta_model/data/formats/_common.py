"""Shared helpers of the read-only format loaders: checked file reads and the sample dict.

Every loader returns the line dataset's in-memory sample dict (``LineDataset.__getitem__``) plus
a ``depth`` key, and fills *every* registry task: a task the format lacks gets the registry's
invalid ``fill_value`` and ``present[task] = False``, so samples of one format always collate.
Errors are ``DataError("<file>: <field>: <problem>")``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cta_model.errors import ConfigError, DataError
from cta_model.tasks import TASKS

# Tasks every format sample carries (present or filled with the invalid value).
ALL_TASKS: tuple[str, ...] = tuple(TASKS)


def check_split(format_name: str, split: str, splits: tuple[str, ...]) -> None:
    if split not in splits:
        raise ConfigError(f"{format_name}: unknown split {split!r}; one of {', '.join(splits)}")


def require_dir(path: Path, field: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {field}: folder missing")
    return path


def require_file(path: Path, field: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: {field}: file missing")
    return path


def subfolders(path: Path) -> list[str]:
    """Names of the sub-folders of ``path``, sorted (hidden ones skipped)."""
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_npy(path: Path, field: str) -> np.ndarray:
    require_file(path, field)
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise DataError(f"{path}: {field}: truncated or corrupt .npy: {exc}") from None


def load_png(path: Path, field: str, mode: str) -> np.ndarray:
    """A PNG converted to Pillow ``mode`` ("RGB" for images, "L" for masks)."""
    require_file(path, field)
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise DataError(f"{path}: {field}: expected a PNG, got {image.format}")
            image.load()
            return np.asarray(image.convert(mode))
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: {field}: corrupt or unreadable PNG: {exc}") from None


def check_floating(path: Path, field: str, array: np.ndarray) -> None:
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{path}: {field}: dtype {array.dtype}, expected a float array")


def check_finite(path: Path, field: str, array: np.ndarray) -> None:
    if not np.isfinite(array).all():
        raise DataError(f"{path}: {field}: contains NaN or infinite values")


def check_shape(path: Path, field: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
    if array.shape != tuple(expected):
        raise DataError(
            f"{path}: {field}: shape {array.shape}, expected {tuple(expected)} (from the image)"
        )


def float_image_to_uint8(path: Path, field: str, array: np.ndarray) -> np.ndarray:
    """HWC float in [0, 1] -> uint8 by round(x * 255); uint8 input is passed through."""
    if array.ndim != 3 or array.shape[-1] != 3:
        raise DataError(f"{path}: {field}: shape {array.shape}, expected (H, W, 3)")
    if array.dtype == np.uint8:
        return array
    check_floating(path, field, array)
    check_finite(path, field, array)
    # A small tolerance for float round-off; 0-255 floats are a different encoding, refused.
    if array.size and (array.min() < -1e-3 or array.max() > 1 + 1e-3):
        raise DataError(
            f"{path}: {field}: values in [{array.min():.4g}, {array.max():.4g}], expected [0, 1]"
        )
    return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)


def class_ids(path: Path, field: str, array: np.ndarray, num_classes: int) -> np.ndarray:
    """Integer-valued class ids in [-1, num_classes) (-1 = ignore) -> int64."""
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{path}: {field}: dtype {array.dtype}, expected integer or float ids")
    if np.issubdtype(array.dtype, np.floating):
        check_finite(path, field, array)
        if not np.array_equal(array, np.round(array)):
            raise DataError(f"{path}: {field}: class ids must be whole numbers")
    ids = array.astype(np.int64)
    if ids.size and (ids.min() < -1 or ids.max() >= num_classes):
        raise DataError(
            f"{path}: {field}: class ids in [{ids.min()}, {ids.max()}], expected -1 (ignore) "
            f"or 0..{num_classes - 1}"
        )
    return ids


def squeeze_channel(path: Path, field: str, array: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1) -> (H, W) (MTAN's depth files carry a trailing channel axis)."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise DataError(f"{path}: {field}: shape {array.shape}, expected (H, W) or (H, W, 1)")
    return array


def make_sample(
    *,
    sample_id: str,
    line_id: str,
    image: np.ndarray,
    labels: Mapping[str, np.ndarray],
    pitch_mm_per_px: float = float("nan"),
) -> dict[str, Any]:
    """The in-memory sample dict; tasks missing from ``labels`` are filled invalid, absent."""
    height, width = image.shape[:2]
    sample: dict[str, Any] = {"sample_id": sample_id, "line_id": line_id, "image": image}
    present: dict[str, bool] = {}
    for task in ALL_TASKS:
        if task in labels:
            sample[task] = labels[task]
            present[task] = True
        else:
            sample[task] = _invalid_label(task, height, width)
            present[task] = False
    sample["present"] = present
    sample["pitch_mm_per_px"] = float(pitch_mm_per_px)
    return sample


def _invalid_label(task: str, height: int, width: int) -> np.ndarray:
    spec = TASKS[task]
    shape = (height, width) if spec.label_channels <= 1 else (height, width, spec.label_channels)
    dtype = np.int64 if spec.label_channels == 0 else np.float32
    return np.full(shape, spec.fill_value, dtype=dtype)


def line_id_for(*parts: str) -> str:
    """A valid line id from format and category names (underscores -> hyphens, lower case)."""
    return "-".join(part.lower().replace("_", "-") for part in parts if part)
