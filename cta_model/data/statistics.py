"""Per-sample statistics of a line dataset (DESIGN 4.5): one row per sample, numpy only.

Data validation checks this table, not pixels. Files are read leniently: a PNG in the wrong
mode or an ``.npy`` of the wrong dtype or shape still gets its statistics, with the actual
dtype and shape recorded so that the expectations name the problem. Anything that stops a
file being used at all (missing, checksum mismatch, corrupt bytes, a PNG header beyond the
line camera's ``ImageSizeLimit``: never decoded) goes into ``read_error`` and the sample still
gets a row: one bad file never aborts the table.

Columns (``STATISTICS_COLUMNS`` gives the dtypes; NaN / null where a task is absent):

- identity: ``sample_id``, ``line_id``, ``split``; presence ``has_semseg``, ``has_height``,
  ``has_normals``; ``read_error`` (every file problem of the sample, each naming its path);
  ``shape_mismatch`` (a label whose shape differs from the image, or an image whose size
  differs from the manifest's ``image_height``/``image_width``); ``image_sha256`` (of the image
  file as read: the same image in two splits is a leak).
- image: ``image_height``, ``image_width``, ``image_channels``, ``image_dtype``; ``brightness``
  (mean Rec. 601 luma, 0-255), ``contrast`` (luma std), ``ratio_rg`` / ``ratio_bg`` (mean R / mean
  G, mean B / mean G: colour balance).
- semseg: ``semseg_dtype``, ``semseg_valid_frac``, ``semseg_min_class``, ``semseg_max_class``
  (over valid pixels), ``semseg_frac_<class>`` (share of the valid pixels per class of
  ``CLASS_NAMES``), ``semseg_frac_unknown`` (share with an id >= NUM_CLASSES).
- height: ``height_dtype``, ``height_valid_frac`` (finite), ``height_min_mm``, ``height_max_mm``,
  ``height_mean_mm`` (finite pixels), ``height_inf_count``.
- normals: ``normals_dtype``, ``normals_valid_frac`` (not (0, 0, 0)), ``normals_length_err``
  (mean |length - 1| over valid pixels).
- cross-task label quality: ``normals_vs_height_deg`` (median angle between the stored normals
  and normals recomputed from the height gradient), ``normals_vs_height_tilted_deg`` (the same
  over pixels tilted by at least TILTED_DEG, where orientation conventions show: flat pixels
  look right whatever the sign of n_x and n_y), ``defect_pixels`` (geometric defect pixels with
  a valid height) and ``defect_height_anomaly`` (the share of them whose height leaves the
  surrounding surface by more than ANOMALY_SLOPE x pitch).
"""

from __future__ import annotations

import io
import multiprocessing
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from tqdm import tqdm

from cta_model.data.line_dataset import ImageSizeLimit, LineDataset, Opener, sha256_hex
from cta_model.data.synthetic import CLASS_IDS, CLASS_NAMES, NUM_CLASSES
from cta_model.tasks import SEMSEG_INVALID_UINT8, SEMSEG_INVALID_UINT16

# Defects that change the surface geometry; a stain changes the albedo only.
GEOMETRIC_DEFECT_CLASSES: tuple[str, ...] = ("scratch", "dent", "bump", "crack")
# Top faces a defect sits on: the reference surface for the height anomaly.
_REFERENCE_SURFACE_CLASSES: tuple[str, ...] = ("part_surface", "boss_top")
# Window (pixels) of the local surface median. Defects at least a pixel wide stay visible at
# any resolution, so a pixel window suits all sizes: 9 x 9 holds enough surface around the
# widest labelled dent (radius ~5 px at 128 px) for its centre to have reference pixels.
ANOMALY_WINDOW_PX = 9
# A height step of this many mm per mm of pitch (about 1.1 degrees of slope over one pixel):
# above the machining texture (~0.7 degrees), below every real scratch, dent, bump or crack.
ANOMALY_SLOPE = 0.02
# Fewer evaluable defect pixels than this give no anomaly figure (NaN): too few to judge.
MIN_DEFECT_PIXELS = 3
# Pixels whose height-derived normal is tilted at least this much carry orientation.
TILTED_DEG = 5.0
MIN_TILTED_PIXELS = 10
# Samples per task: a progress update per chunk, and little pickling overhead with workers.
_CHUNK_SIZE = 32

_GEOMETRIC_IDS = np.array([CLASS_IDS[name] for name in GEOMETRIC_DEFECT_CLASSES])
_REFERENCE_IDS = np.array([CLASS_IDS[name] for name in _REFERENCE_SURFACE_CLASSES])
_LUMA = np.array([0.299, 0.587, 0.114])

SEMSEG_FRACTION_COLUMNS: tuple[str, ...] = tuple(f"semseg_frac_{name}" for name in CLASS_NAMES)

# Column -> pandas dtype. Integers that may be missing use the nullable Int64.
STATISTICS_COLUMNS: dict[str, str] = {
    "sample_id": "string",
    "line_id": "string",
    "split": "string",
    "has_semseg": "bool",
    "has_height": "bool",
    "has_normals": "bool",
    "read_error": "string",
    "shape_mismatch": "string",
    "image_sha256": "string",
    "image_height": "Int64",
    "image_width": "Int64",
    "image_channels": "Int64",
    "image_dtype": "string",
    "brightness": "float64",
    "contrast": "float64",
    "ratio_rg": "float64",
    "ratio_bg": "float64",
    "semseg_dtype": "string",
    "semseg_valid_frac": "float64",
    "semseg_min_class": "Int64",
    "semseg_max_class": "Int64",
    **dict.fromkeys(SEMSEG_FRACTION_COLUMNS, "float64"),
    "semseg_frac_unknown": "float64",
    "height_dtype": "string",
    "height_valid_frac": "float64",
    "height_min_mm": "float64",
    "height_max_mm": "float64",
    "height_mean_mm": "float64",
    "height_inf_count": "Int64",
    "normals_dtype": "string",
    "normals_valid_frac": "float64",
    "normals_length_err": "float64",
    "normals_vs_height_deg": "float64",
    "normals_vs_height_tilted_deg": "float64",
    "defect_pixels": "Int64",
    "defect_height_anomaly": "float64",
}


class _FileProblem(Exception):
    """A file cannot be used at all; the message names it."""


def compute_statistics(
    dataset: LineDataset,
    *,
    progress: bool = True,
    sample_ids: Iterable[str] | None = None,
    workers: int = 1,
) -> pd.DataFrame:
    """The statistics table of ``dataset`` (all its rows, or only ``sample_ids``), in order.

    ``workers`` > 1 reads and measures in that many processes (the opener must pickle, as
    LocalOpener and the S3 opener do); the table does not depend on it.
    """
    rows = dataset.rows
    if sample_ids is not None:
        wanted = set(sample_ids)
        rows = [row for row in rows if row["sample_id"] in wanted]
    measure = partial(
        _chunk_statistics,
        opener=dataset.opener,
        verify_checksums=dataset.verify_checksums,
        location=dataset.location,
        limits={line.id: ImageSizeLimit.of_line(line) for line in dataset.lines_config.lines},
    )
    chunks = [rows[start : start + _CHUNK_SIZE] for start in range(0, len(rows), _CHUNK_SIZE)]
    records: list[dict[str, Any]] = []
    with tqdm(total=len(rows), desc="statistics", unit="sample", disable=not progress) as bar:
        if workers <= 1 or len(chunks) < 2:
            results: Iterable[list[dict[str, Any]]] = map(measure, chunks)
            for chunk_records in results:
                records.extend(chunk_records)
                bar.update(len(chunk_records))
        else:
            # spawn, not fork: the parent may hold threads (torch, tqdm) that fork would copy.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                for chunk_records in pool.map(measure, chunks):
                    records.extend(chunk_records)
                    bar.update(len(chunk_records))
    return statistics_frame(records)


def _chunk_statistics(
    rows: list[dict[str, Any]],
    *,
    opener: Opener,
    verify_checksums: bool,
    location: str,
    limits: Mapping[str, ImageSizeLimit],
) -> list[dict[str, Any]]:
    return [
        sample_statistics(
            row,
            opener,
            verify_checksums=verify_checksums,
            location=location,
            limit=limits.get(row["line_id"]),
        )
        for row in rows
    ]


def statistics_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """A DataFrame with exactly STATISTICS_COLUMNS (in order, with their dtypes)."""
    frame = pd.DataFrame.from_records(records, columns=list(STATISTICS_COLUMNS))
    for column, dtype in STATISTICS_COLUMNS.items():
        if dtype == "float64":
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
        else:
            frame[column] = frame[column].astype(dtype)
    return frame


def sample_statistics(
    row: dict[str, Any],
    opener: Opener,
    *,
    verify_checksums: bool = True,
    location: str = "",
    limit: ImageSizeLimit | None = None,
) -> dict[str, Any]:
    """One statistics row for one manifest row; never raises for a bad file. A PNG whose
    header exceeds ``limit`` (the line's camera) is a read error, never decoded."""
    stats: dict[str, Any] = {
        "sample_id": row["sample_id"],
        "line_id": row["line_id"],
        "split": row["split"],
        "has_semseg": bool(row["has_semseg"]),
        "has_height": bool(row["has_height"]),
        "has_normals": bool(row["has_normals"]),
    }
    problems: list[str] = []
    mismatches: list[str] = []

    def load(modality: str, decode: Any) -> Any:
        relative = row.get(f"{modality}_path")
        try:
            data, digest = _read_verified(row, modality, opener, verify_checksums, location)
            if modality == "image":
                stats["image_sha256"] = digest
            return decode(data)
        except _FileProblem as exc:
            problems.append(f"{_where(location, relative)}: {modality}: {exc}")
            return None

    decode_png = partial(_decode_png, limit=limit)
    image = load("image", decode_png)
    if image is not None:
        stats.update(_image_statistics(image))
        expected = (row.get("image_height"), row.get("image_width"))
        if None not in expected and tuple(image.shape[:2]) != tuple(expected):
            mismatches.append(
                f"image {_shape_text(image.shape[:2])}, manifest says {_shape_text(expected)}"
            )
    shape = None if image is None else image.shape[:2]

    semseg = load("semseg", decode_png) if row["has_semseg"] else None
    labels = None
    if semseg is not None:
        stats["semseg_dtype"] = str(semseg.dtype)
        if _shape_agrees("semseg", semseg.shape, shape, mismatches):
            stats.update(_semseg_statistics(semseg))
            labels = _class_ids(semseg)

    height = load("height", _decode_npy) if row["has_height"] else None
    if height is not None:
        stats["height_dtype"] = str(height.dtype)
        if _shape_agrees("height", height.shape, shape, mismatches):
            height = height.astype(np.float64)
            stats.update(_height_statistics(height))
        else:
            height = None

    normals = load("normals", _decode_npy) if row["has_normals"] else None
    if normals is not None:
        stats["normals_dtype"] = str(normals.dtype)
        expected_shape = None if shape is None else (*shape, 3)
        if _shape_agrees("normals", normals.shape, expected_shape, mismatches):
            normals = normals.astype(np.float64)
            stats.update(_normals_statistics(normals))
        else:
            normals = None

    # height_clean is not statistics material, but its checksum is part of the dataset's.
    if row.get("height_clean_path"):
        load("height_clean", lambda data: None)

    pitch = float(row["pitch_mm_per_px"])
    if height is not None and normals is not None:
        stats.update(normals_vs_height(normals, height, pitch))
    if height is not None and labels is not None:
        stats.update(defect_height_anomaly(labels, height, pitch))

    stats["read_error"] = "; ".join(problems) or None
    stats["shape_mismatch"] = "; ".join(mismatches) or None
    return stats


# --- reading ---


def _where(location: str, relative: str | None) -> str:
    return f"{location}/{relative}" if location else str(relative)


def _read_verified(
    row: dict[str, Any], modality: str, opener: Opener, verify: bool, location: str
) -> tuple[bytes, str]:
    """The file's bytes and their sha256."""
    relative = row.get(f"{modality}_path")
    if not relative:
        raise _FileProblem("no path in the manifest")
    try:
        data = opener(relative)
    except FileNotFoundError:
        raise _FileProblem("file missing") from None
    except (OSError, ValueError) as exc:  # DataError is a ValueError (e.g. a missing S3 key)
        raise _FileProblem(f"cannot read: {exc}") from None
    actual = sha256_hex(data)
    if verify:
        expected = row.get(f"sha256_{modality}")
        if actual != expected:
            raise _FileProblem(
                f"sha256 mismatch (manifest sha256_{modality}={expected}, file {actual})"
            )
    return data, actual


def _decode_png(data: bytes, limit: ImageSizeLimit | None = None) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            if image.format != "PNG":
                raise _FileProblem(f"expected a PNG, got {image.format}")
            too_large = limit.problem(*image.size) if limit is not None else None
            if too_large:
                raise _FileProblem(too_large)
            image.load()
            return np.asarray(image)
    except _FileProblem:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _FileProblem(f"corrupt PNG: {exc}") from None


def _decode_npy(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise _FileProblem(f"truncated or corrupt .npy: {exc}") from None


def _shape_text(shape: Iterable[Any]) -> str:
    return "x".join(str(size) for size in shape)


def _shape_agrees(
    modality: str,
    actual: tuple[int, ...],
    expected: tuple[int, ...] | None,
    mismatches: list[str],
) -> bool:
    """True when ``actual`` is ``expected``; otherwise records why (no statistics then)."""
    if expected is None:  # the image is unreadable: nothing to compare with
        return False
    if tuple(actual) != tuple(expected):
        mismatches.append(f"{modality} {_shape_text(actual)}, image {_shape_text(expected)}")
        return False
    return True


# --- per-modality statistics ---


def _image_statistics(image: np.ndarray) -> dict[str, Any]:
    channels = 1 if image.ndim == 2 else image.shape[2]
    pixels = image.reshape(image.shape[0], image.shape[1], -1).astype(np.float64)
    if channels >= 3:
        rgb = pixels[..., :3]
        luma = rgb @ _LUMA
        mean_r, mean_g, mean_b = rgb.reshape(-1, 3).mean(axis=0)
        ratio_rg = mean_r / mean_g if mean_g > 0 else np.nan
        ratio_bg = mean_b / mean_g if mean_g > 0 else np.nan
    else:  # grey: balance is not defined; the channel expectation names the problem
        luma = pixels[..., 0]
        ratio_rg = ratio_bg = np.nan
    return {
        "image_height": image.shape[0],
        "image_width": image.shape[1],
        "image_channels": channels,
        "image_dtype": str(image.dtype),
        "brightness": float(luma.mean()),
        "contrast": float(luma.std()),
        "ratio_rg": float(ratio_rg),
        "ratio_bg": float(ratio_bg),
    }


MONITORED_IMAGE_COLUMNS = ("brightness", "contrast", "ratio_rg", "ratio_bg")


def monitored_image_statistics(image: np.ndarray) -> dict[str, float]:
    """The image statistics that monitoring compares (reference_stats.parquet, served images):
    size, brightness, contrast and colour balance with the validation definitions above."""
    stats = _image_statistics(image)
    return {
        "image_height": int(image.shape[0]),
        "image_width": int(image.shape[1]),
        **{key: stats[key] for key in MONITORED_IMAGE_COLUMNS},
    }


def prediction_statistics(
    prediction: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    defect_score: float | None = None,
) -> dict[str, float]:
    """One image's prediction statistics (decoded Predictor outputs for that image):
    ``pred_frac_<class>``, ``pred_height_mean_mm`` / ``_std_mm``, ``pred_depth_mean``,
    ``pred_normals_z_mean``, and ``pred_defect_score`` (`Predictor.inspect`'s score of the
    image, when it has one)."""
    row: dict[str, float] = {}
    if defect_score is not None:
        row["pred_defect_score"] = float(defect_score)
    if "semseg" in prediction:
        counts = np.bincount(prediction["semseg"].ravel(), minlength=max(len(class_names), 1))
        total = counts.sum()
        for index, name in enumerate(class_names):
            row[f"pred_frac_{name}"] = float(counts[index] / total)
    if "height" in prediction:
        row["pred_height_mean_mm"] = float(prediction["height"].mean())
        row["pred_height_std_mm"] = float(prediction["height"].std())
    if "depth" in prediction:
        row["pred_depth_mean"] = float(prediction["depth"].mean())
    if "normals" in prediction:
        row["pred_normals_z_mean"] = float(prediction["normals"][..., 2].mean())
    return row


def _class_ids(semseg: np.ndarray) -> np.ndarray:
    """Class ids as int64 with -1 for the file's invalid value (255 / 65535)."""
    labels = semseg.astype(np.int64)
    if semseg.dtype == np.uint8:
        labels[semseg == SEMSEG_INVALID_UINT8] = -1
    elif semseg.dtype == np.uint16:
        labels[semseg == SEMSEG_INVALID_UINT16] = -1
    return labels


def _semseg_statistics(semseg: np.ndarray) -> dict[str, Any]:
    if semseg.ndim != 2:  # e.g. an RGB label image; the dtype / shape checks say so
        return {}
    labels = _class_ids(semseg)
    valid = labels[labels >= 0]
    stats: dict[str, Any] = {"semseg_valid_frac": valid.size / labels.size}
    if valid.size == 0:
        return stats
    counts = np.bincount(valid, minlength=NUM_CLASSES)
    for column, count in zip(SEMSEG_FRACTION_COLUMNS, counts[:NUM_CLASSES], strict=True):
        stats[column] = count / valid.size
    stats["semseg_frac_unknown"] = counts[NUM_CLASSES:].sum() / valid.size
    stats["semseg_min_class"] = int(valid.min())
    stats["semseg_max_class"] = int(valid.max())
    return stats


def _height_statistics(height: np.ndarray) -> dict[str, Any]:
    finite = np.isfinite(height)
    stats: dict[str, Any] = {
        "height_valid_frac": finite.mean(),
        "height_inf_count": int(np.isinf(height).sum()),
    }
    if finite.any():
        values = height[finite]
        stats.update(
            height_min_mm=values.min(), height_max_mm=values.max(), height_mean_mm=values.mean()
        )
    return stats


def _vector_lengths(vectors: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("...c,...c->...", vectors, vectors))


def _normals_statistics(normals: np.ndarray) -> dict[str, Any]:
    valid = np.any(normals != 0, axis=-1)  # NaN != 0, so NaN vectors count as (broken) valid
    stats: dict[str, Any] = {"normals_valid_frac": valid.mean()}
    if valid.any():
        lengths = _vector_lengths(normals[valid])
        # A NaN length is infinitely wrong, not "no data": keep it visible to the checks.
        stats["normals_length_err"] = float(np.nan_to_num(np.abs(lengths - 1), nan=np.inf).mean())
    return stats


# --- cross-task consistency (label quality) ---


def normals_vs_height(normals: np.ndarray, height: np.ndarray, pitch: float) -> dict[str, Any]:
    """Median angle (deg) between stored normals and normalize(-dh/dx, -dh/dy, 1) from height.

    ``np.gradient`` uses a pixel's neighbours, so a NaN next to a pixel makes its recomputed
    normal NaN: only pixels where the height and its neighbours are valid take part.
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        d_dy, d_dx = np.gradient(height, pitch)
        slope_sq = d_dx * d_dx + d_dy * d_dy
        stored_length = _vector_lengths(normals)
        usable = (
            np.isfinite(height)
            & np.isfinite(slope_sq)
            & (stored_length > 0)
            & np.isfinite(stored_length)
        )
        if not usable.any():
            return {}
        # cos = stored . (-dh/dx, -dh/dy, 1) / (|stored| |(-dh/dx, -dh/dy, 1)|), on usable pixels.
        n_x, n_y, n_z = (normals[..., channel][usable] for channel in range(3))
        dot = n_z - n_x * d_dx[usable] - n_y * d_dy[usable]
        slope_sq = slope_sq[usable]
        cosine = np.clip(dot / (stored_length[usable] * np.sqrt(1.0 + slope_sq)), -1.0, 1.0)
        angles = np.degrees(np.arccos(cosine))
    stats = {"normals_vs_height_deg": float(np.median(angles))}
    tilted = slope_sq >= np.tan(np.radians(TILTED_DEG)) ** 2
    if tilted.sum() >= MIN_TILTED_PIXELS:
        stats["normals_vs_height_tilted_deg"] = float(np.median(angles[tilted]))
    return stats


def defect_height_anomaly(labels: np.ndarray, height: np.ndarray, pitch: float) -> dict[str, Any]:
    """Share of geometric-defect pixels whose height leaves the surrounding surface.

    The reference is the median height of the non-defect top-face pixels in a window around
    each defect pixel (holes, walls and the conveyor are left out, so part edges do not count
    as anomalies). A defect mask that sits where the height is smooth scores near 0.
    """
    defect = np.isin(labels, _GEOMETRIC_IDS) & np.isfinite(height)
    count = int(defect.sum())
    stats: dict[str, Any] = {"defect_pixels": count}
    if count < MIN_DEFECT_PIXELS:
        return stats
    reference = np.isin(labels, _REFERENCE_IDS) & np.isfinite(height)
    radius = ANOMALY_WINDOW_PX // 2
    padded = np.pad(np.where(reference, height, np.nan), radius, constant_values=np.nan)
    windows = sliding_window_view(padded, (ANOMALY_WINDOW_PX, ANOMALY_WINDOW_PX))
    rows, cols = np.nonzero(defect)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows: no reference there
        local_surface = np.nanmedian(windows[rows, cols].reshape(count, -1), axis=1)
    residual = np.abs(height[rows, cols] - local_surface)
    judged = np.isfinite(residual)
    if judged.sum() >= MIN_DEFECT_PIXELS:
        stats["defect_height_anomaly"] = float((residual[judged] > ANOMALY_SLOPE * pitch).mean())
    return stats
