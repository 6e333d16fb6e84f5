"""The line-dataset format (DESIGN 4.2) and its checked reader; the writer is
``cta_model.data.line_writer``, the synthetic generator ``cta_model.data.synthetic_dataset``.

Layout of a dataset root (a folder, or later an ``s3://`` prefix read through an opener)::

    manifest.parquet                    one row per sample (``manifest_schema(tasks)``)
    features.parquet                    measurable features for dimension checks
    images/<line>/<sample_id>.png       uint8 RGB
    <task>/<line>/<sample_id><suffix>   one label file per task the sample has
    <companion>/<line>/<sample_id>.npy  e.g. height_clean: the label before sensor drop-out

Which tasks a dataset can carry, and how each is encoded (suffix, invalid marker, companions),
is the task registry's ``TaskSpec.line_file`` (``cta_model/tasks.py``); the manifest has the
columns ``<task>_path``, ``has_<task>`` and ``sha256_<task>`` of every task it carries. The
synthetic generator writes semseg (uint8 PNG, 255 = invalid), height and height_clean (float32
mm, NaN = drop-out) and normals (float32 H x W x 3, (0, 0, 0) = invalid).

A manifest may carry the optional column ``part_id`` (nullable string): the part an image
shows, where a line takes several images per part (evaluate and serve then also give the
part's verdict). A part's images share one line and one split. Writers add the column only
when some sample has a part id, so datasets without parts keep the format's bytes.

A dataset may carry its own fleet inventory, ``lines.yaml`` at the root (an imported benchmark's
categories are not production lines): readers use it when the caller names no lines config.

Paths in the manifest are relative to the root and may never leave it. Every file carries a
sha256 in the manifest. All bytes are deterministic: the same seed gives a byte-identical tree.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from cta_model.config import parse_yaml
from cta_model.data.lines import (
    LINE_ID_PATTERN,
    LinesConfig,
    LineSpec,
    load_lines_config,
)
from cta_model.errors import ConfigError, DataError
from cta_model.tasks import LineFile, get_task, line_dataset_tasks

FORMAT_NAME = "cta-line-dataset"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.parquet"
FEATURES_NAME = "features.parquet"
#: The dataset's own fleet inventory (optional), beside the manifest.
DATASET_LINES_NAME = "lines.yaml"
#: Manifest metadata key of the JSON record of how the data were made (class_names, and
#: reject_classes where the dataset defines its defects).
GENERATOR_KEY = "cta.generator"
SPLITS: tuple[str, ...] = ("train", "val", "test", "qa")
IMAGE = "image"
IMAGE_DIR = "images"
#: Optional manifest column: the part an image shows (several images per part on some lines).
PART_ID = "part_id"
_PNG_LABEL_MODES = ("L", "I;16")  # 8- and 16-bit integer ids


def line_file(task: str) -> LineFile:
    spec = get_task(task)
    if spec.line_file is None:
        raise ConfigError(f"task {task!r} has no line-dataset encoding (TaskSpec.line_file)")
    return spec.line_file


@dataclass(frozen=True)
class SampleFile:
    """One kind of per-sample file: its modality (column stem), folder, suffix and encoder."""

    modality: str
    suffix: str
    encode: Callable[[np.ndarray], np.ndarray]
    task: str | None = None  # the task whose label (or companion) it holds

    @property
    def folder(self) -> str:
        return IMAGE_DIR if self.modality == IMAGE else self.modality


def sample_files(tasks: Iterable[str]) -> tuple[SampleFile, ...]:
    """The kinds of file a sample of ``tasks`` may have, in manifest order."""
    files = [SampleFile(IMAGE, ".png", np.asarray)]
    for task in tasks:
        encoding = line_file(task)
        files.append(SampleFile(task, encoding.suffix, encoding.encode, task))
        files += [SampleFile(name, ".npy", encoding.encode, task) for name in encoding.companions]
    return tuple(files)


def modalities(tasks: Iterable[str]) -> tuple[str, ...]:
    """The files a sample of ``tasks`` may have: the image, then each label and its companions."""
    return tuple(file.modality for file in sample_files(tasks))


def manifest_schema(tasks: Sequence[str], part_ids: bool = False) -> pa.Schema:
    """The manifest of a dataset carrying ``tasks`` (in this order); with ``part_ids`` the
    optional last column ``part_id``."""
    files = modalities(tasks)
    optional = [pa.field(PART_ID, pa.string(), nullable=True)] if part_ids else []
    return pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("line_id", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            *[pa.field(f"{modality}_path", pa.string()) for modality in files],
            *[pa.field(f"has_{task}", pa.bool_(), nullable=False) for task in tasks],
            *[pa.field(f"sha256_{modality}", pa.string()) for modality in files],
            pa.field("camera", pa.string(), nullable=False),
            pa.field("pitch_mm_per_px", pa.float64(), nullable=False),
            pa.field("image_height", pa.int32(), nullable=False),
            pa.field("image_width", pa.int32(), nullable=False),
            pa.field("has_defect", pa.bool_(), nullable=False),
            pa.field("n_defects", pa.int32(), nullable=False),
            *optional,
        ]
    )


def _task_columns(task: str) -> tuple[str, ...]:
    return (f"{task}_path", f"has_{task}", f"sha256_{task}")


FEATURES_SCHEMA = pa.schema(
    [
        pa.field("feature_id", pa.string(), nullable=False),  # unique within a sample
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("line_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("type", pa.string(), nullable=False),
        pa.field("x0", pa.int32(), nullable=False),  # box in pixels, end-exclusive
        pa.field("y0", pa.int32(), nullable=False),
        pa.field("x1", pa.int32(), nullable=False),
        pa.field("y1", pa.int32(), nullable=False),
        pa.field("nominal_mm", pa.float64(), nullable=False),
        pa.field("actual_mm", pa.float64(), nullable=False),
        pa.field("tolerance_mm", pa.float64(), nullable=False),
        pa.field("in_tolerance", pa.bool_(), nullable=False),
    ]
)
_LINE_ID_RE = re.compile(LINE_ID_PATTERN)

Opener = Callable[[str], bytes]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: A line's images come from its camera: an image (or a label image) may have at most the
#: camera's pixel count times this factor, and each side at most the camera's longer side times
#: its square root (a frame may be rotated). Checked on the PNG header before decoding: a 419 KB
#: PNG can declare 12000 x 12000 pixels, 432 MB decoded and gigabytes in the statistics.
IMAGE_PIXELS_PER_CAMERA_PIXEL = 1


@dataclass(frozen=True)
class ImageSizeLimit:
    """The largest image a line's camera gives (``IMAGE_PIXELS_PER_CAMERA_PIXEL``)."""

    line_id: str
    resolution: tuple[int, int]  # the camera's [height, width]

    @classmethod
    def of_line(cls, line: LineSpec) -> ImageSizeLimit:
        return cls(line.id, tuple(line.resolution))

    @property
    def max_pixels(self) -> int:
        return IMAGE_PIXELS_PER_CAMERA_PIXEL * self.resolution[0] * self.resolution[1]

    @property
    def max_side(self) -> int:
        return math.isqrt(IMAGE_PIXELS_PER_CAMERA_PIXEL) * max(self.resolution)

    def problem(self, width: int, height: int) -> str | None:
        """Why a ``width`` x ``height`` image is refused, or None when it is within the limit."""
        if width * height <= self.max_pixels and max(width, height) <= self.max_side:
            return None
        return (
            f"{height}x{width} pixels (PNG header) exceed the limit of line {self.line_id}: "
            f"at most {self.max_pixels} pixels and {self.max_side} per side (its camera's "
            f"{self.resolution[0]}x{self.resolution[1]} times {IMAGE_PIXELS_PER_CAMERA_PIXEL}); "
            "not decoded"
        )


def read_parquet_bytes(data: bytes) -> pa.Table:
    """A parquet file's table, read on the calling thread.

    Arrow's thread pools start worker threads on the first read (``pq.read_table`` goes through
    the datasets API, which uses the I/O pool even with ``use_threads=False``). A process that
    exits right after such a read (an error found in the manifest: exit code 2) can catch them
    mid-teardown, and libstdc++ aborts with "terminate called without an active exception",
    exit 134 (apache/arrow#34314). The plain file reader without threads starts none; the
    tables are small.
    """
    return pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)


def _type_name(kind: str) -> str:
    return {"string": "a string", "bool": "a boolean", "int": "an integer"}.get(kind, kind)


def _column_kind(field: pa.Field) -> str:
    """The kind a manifest or features column must hold: string, bool, int or number."""
    if pa.types.is_boolean(field.type):
        return "bool"
    if pa.types.is_integer(field.type):
        return "int"
    if pa.types.is_floating(field.type):
        return "number"
    return "string"


def _type_matches(kind: str, arrow_type: pa.DataType, nullable: bool) -> bool:
    if pa.types.is_null(arrow_type):  # a column written without a schema, every value null
        return nullable
    if kind == "string":
        return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
    if kind == "bool":
        return pa.types.is_boolean(arrow_type)
    if kind == "int":
        return pa.types.is_integer(arrow_type)
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)


def check_table_schema(table: pa.Table, schema: pa.Schema, where: str) -> None:
    """DataError naming ``where`` and the column unless ``table`` has every column of
    ``schema`` with a compatible type (strings, booleans, integers; numbers may be integers
    or floats; a nullable column may be all-null). Extra columns are allowed."""
    names = set(table.column_names)
    missing = [field.name for field in schema if field.name not in names]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(missing)}")
    for field in schema:
        actual = table.schema.field(field.name).type
        kind = _column_kind(field)
        if not _type_matches(kind, actual, field.nullable):
            raise DataError(
                f"{where}: column {field.name}: type {actual}, expected {_type_name(kind)}"
            )


def finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def as_lines_config(lines_config: LinesConfig | str | Path | None) -> LinesConfig:
    """``lines_config`` as given, or loaded from its path (default: ``$CTA_LINES_CONFIG``, else
    ``configs/lines.yaml``)."""
    if isinstance(lines_config, LinesConfig):
        return lines_config
    return load_lines_config(lines_config)


def dataset_lines_config(opener: Opener, location: str) -> LinesConfig | None:
    """The inventory the dataset carries (``<root>/lines.yaml``, read through ``opener``), or
    None when it carries none."""
    source = f"{location}/{DATASET_LINES_NAME}"
    try:
        data = opener(DATASET_LINES_NAME)
    except (FileNotFoundError, DataError):  # DataError: a missing S3 object
        return None
    except (ValueError, OSError) as exc:
        raise DataError(f"{source}: cannot read: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text: {exc}") from None
    return LinesConfig.from_dict(parse_yaml(text, source), source=source)


# --- reader ---


def check_relative_path(path: str) -> str:
    """``path`` if it is a plain relative POSIX path inside the root, else ValueError."""
    if not path:
        raise ValueError("empty path")
    if "\\" in path or ":" in path or "\x00" in path:
        raise ValueError(f"path {path!r} must be a relative POSIX path (no '\\', ':' or NUL)")
    pure = PurePosixPath(path)
    if pure.is_absolute():
        raise ValueError(f"path {path!r} is absolute; paths are relative to the dataset root")
    if any(part == ".." for part in pure.parts):
        raise ValueError(f"path {path!r} escapes the dataset root ('..')")
    return path


class LocalOpener:
    """Read files below ``root``; refuses paths (and symlinks) that resolve outside it.

    A class rather than a closure so that a LineDataset pickles into DataLoader workers.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def __call__(self, relative: str) -> bytes:
        check_relative_path(relative)
        target = (self.root / relative).resolve()
        if not target.is_relative_to(self.root):
            raise ValueError(f"path {relative!r} resolves outside the dataset root")
        return target.read_bytes()


class LineDataset:
    """Samples of a line dataset as dicts of numpy arrays (tasks absent -> invalid values).

    An item holds ``sample_id``, ``line_id``, ``image``, one label per task a line dataset can
    carry (``line_dataset_tasks()``; numpy layout), ``present`` {task: bool} and
    ``pitch_mm_per_px``; with ``include_clean`` also the companions (e.g. ``height_clean``).
    ``tasks`` are the tasks whose columns the manifest has; a task without them is absent from
    every sample. ``lines_config`` (a LinesConfig or a path) is the inventory every ``line_id``
    is checked against; without one, the dataset's own ``lines.yaml`` if it carries one, else
    ``configs/lines.yaml``. ``opener`` reads a root-relative path
    and returns its bytes; the default reads the local folder ``root``; remote stores pass
    their own.
    """

    def __init__(
        self,
        root: str | Path,
        lines_config: LinesConfig | str | Path | None = None,
        split: str | None = None,
        verify_checksums: bool = True,
        *,
        opener: Opener | None = None,
        include_clean: bool = False,
    ) -> None:
        self.location = str(root).rstrip("/")
        self.opener = opener if opener is not None else LocalOpener(root)
        self.lines_config = (
            as_lines_config(lines_config)
            if lines_config is not None
            else dataset_lines_config(self.opener, self.location) or as_lines_config(None)
        )
        self.split = split
        self.verify_checksums = verify_checksums
        self.include_clean = include_clean
        if split is not None and split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
        table = self._read_parquet(MANIFEST_NAME)
        self.tasks = self._check_columns(table)
        self.metadata = {
            key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()
        }
        all_rows = table.to_pylist()
        if not all_rows:
            raise DataError(f"{self._where(MANIFEST_NAME)}: the manifest has no rows")
        self._check_rows(all_rows)
        if split is None:
            self.rows = all_rows
        else:
            self.rows = [row for row in all_rows if row["split"] == split]
            if not self.rows:
                raise DataError(
                    f"{self._where(MANIFEST_NAME)}: split {split!r} is empty "
                    "(no row has that split)"
                )
        self._row_numbers = {row["sample_id"]: number for number, row in enumerate(all_rows)}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sample_ids(self) -> list[str]:
        return [row["sample_id"] for row in self.rows]

    @property
    def line_ids(self) -> list[str]:
        return sorted({row["line_id"] for row in self.rows})

    @property
    def generator(self) -> dict[str, Any]:
        """The manifest's ``cta.generator`` record: how the data were made (JSON)."""
        try:
            value = json.loads(self.metadata.get(GENERATOR_KEY) or "{}")
        except json.JSONDecodeError as exc:
            raise DataError(f"{self._where(MANIFEST_NAME)}: {GENERATOR_KEY}: {exc}") from None
        if not isinstance(value, dict):
            raise DataError(f"{self._where(MANIFEST_NAME)}: {GENERATOR_KEY}: not a JSON object")
        return value

    @property
    def class_names(self) -> tuple[str, ...]:
        """The segmentation classes by id, when the dataset names them."""
        return tuple(str(name) for name in self.generator.get("class_names") or ())

    @property
    def reject_classes(self) -> tuple[int, ...] | None:
        """The class ids the dataset itself calls defects (an imported benchmark does); None
        when it leaves that to the inspection config (the synthetic scenes do)."""
        value = self.generator.get("reject_classes")
        return None if value is None else tuple(int(c) for c in value)

    def require_tasks(self, tasks: Iterable[str], what: str = "tasks") -> None:
        """ConfigError naming the ``tasks`` this dataset carries no labels for."""
        missing = [task for task in tasks if task not in self.tasks]
        if missing:
            raise ConfigError(
                f"{what}: the line dataset {self.location} has no {', '.join(missing)} labels "
                f"(its manifest carries {', '.join(self.tasks) or 'no task'})"
            )

    def read_features(self, missing_ok: bool = False) -> pa.Table | None:
        """``features.parquet`` restricted to this dataset's samples; DataError naming the file
        unless it holds the columns of ``FEATURES_SCHEMA`` with their types. ``missing_ok``:
        None when the dataset has no such file (an unreadable one is still an error)."""
        if missing_ok:
            table = self._optional_features()
            if table is None:
                return None
        else:
            table = self._read_parquet(FEATURES_NAME)
        check_table_schema(table, FEATURES_SCHEMA, self._where(FEATURES_NAME))
        wanted = pa.array(self.sample_ids)
        return table.filter(pc.is_in(table["sample_id"], value_set=wanted))

    def _optional_features(self) -> pa.Table | None:
        """``features.parquet`` parsed, or None when the dataset carries none."""
        try:
            data = self.opener(FEATURES_NAME)
        except (FileNotFoundError, DataError):  # DataError: a missing S3 object
            return None
        except (ValueError, OSError) as exc:
            raise DataError(f"{self._where(FEATURES_NAME)}: cannot read: {exc}") from None
        return self._parse_parquet(FEATURES_NAME, data)

    def check_features(self) -> int | None:
        """Check every row of ``features.parquet`` against the manifest; the number of rows,
        or None when the dataset carries no features file (nothing to measure).

        DataError naming the file, the row and the sample: a null or non-finite number, a
        negative tolerance, a box outside the image, a feature id twice in a sample, or a
        sample, line or split the manifest does not have.
        """
        where = self._where(FEATURES_NAME)
        table = self._optional_features()
        if table is None:
            return None
        check_table_schema(table, FEATURES_SCHEMA, where)
        manifest = {row["sample_id"]: row for row in self.rows}
        seen: set[tuple[str, str]] = set()
        for number, feature in enumerate(table.select(FEATURES_SCHEMA.names).to_pylist()):
            at = f"{where}: row {number} ({feature['sample_id']})"
            for field in FEATURES_SCHEMA:
                if feature[field.name] is None:
                    raise DataError(f"{at}: {field.name}: missing")
            sample = manifest.get(feature["sample_id"])
            if sample is None:
                raise DataError(f"{at}: sample_id: not in {self._where(MANIFEST_NAME)}")
            for column in ("line_id", "split"):
                if feature[column] != sample[column]:
                    raise DataError(
                        f"{at}: {column}: {feature[column]!r}, the manifest says {sample[column]!r}"
                    )
            key = (feature["sample_id"], feature["feature_id"])
            if key in seen:
                raise DataError(f"{at}: feature_id: {key[1]!r} appears twice in the sample")
            seen.add(key)
            for column in ("nominal_mm", "actual_mm", "tolerance_mm"):
                if not finite_number(feature[column]):
                    raise DataError(f"{at}: {column}: {feature[column]!r}, expected a finite mm")
            if feature["tolerance_mm"] < 0:
                raise DataError(f"{at}: tolerance_mm: {feature['tolerance_mm']!r} is negative")
            box = [feature[column] for column in ("x0", "y0", "x1", "y1")]
            width, height = sample["image_width"], sample["image_height"]
            if not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
                raise DataError(
                    f"{at}: box (x0, y0, x1, y1) {tuple(box)} is empty or outside the "
                    f"{width}x{height} image"
                )
        return table.num_rows

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self.rows) <= index < len(self.rows):
            raise IndexError(f"index {index} out of range for {len(self.rows)} samples")
        row = self.rows[index]
        image = self._read_png(row, IMAGE, ("RGB",))
        height, width = image.shape[:2]
        item: dict[str, Any] = {
            "sample_id": row["sample_id"],
            "line_id": row["line_id"],
            "image": image,
        }
        present = {}
        for task in line_dataset_tasks():
            spec = get_task(task)
            present[task] = task in self.tasks and bool(row[f"has_{task}"])
            item[task] = (
                self._read_label(row, task, task, (height, width))
                if present[task]
                else spec.absent_label(height, width)
            )
        item["present"] = present
        item["pitch_mm_per_px"] = float(row["pitch_mm_per_px"])
        if self.include_clean:
            for task in line_dataset_tasks():
                for companion in line_file(task).companions:
                    item[companion] = (
                        self._read_label(row, task, companion, (height, width))
                        if row.get(f"{companion}_path")
                        else get_task(task).absent_label(height, width)
                    )
        return item

    def _read_label(
        self, row: dict[str, Any], task: str, modality: str, image_shape: tuple[int, int]
    ) -> np.ndarray:
        """The file of ``modality`` (``task``'s label or a companion), decoded and checked
        against the image's size."""
        encoding = line_file(task)
        shape = get_task(task).numpy_shape(*image_shape)
        if encoding.suffix == ".npy" or modality != task:
            return encoding.decode(self._read_npy(row, modality, shape))
        array = encoding.decode(self._read_png(row, modality, _PNG_LABEL_MODES))
        self._check_shape(row, modality, array, shape)
        return array

    # --- checks ---

    def _where(self, relative: str) -> str:
        return f"{self.location}/{relative}"

    def _read(self, relative: str, what: str) -> bytes:
        try:
            return self.opener(relative)
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(f"{self._where(relative)}: {what}: file missing") from None
        except (ValueError, OSError) as exc:
            raise DataError(f"{self._where(relative)}: {what}: cannot read: {exc}") from None

    def _read_parquet(self, relative: str) -> pa.Table:
        return self._parse_parquet(relative, self._read(relative, "line-dataset table"))

    def _parse_parquet(self, relative: str, data: bytes) -> pa.Table:
        try:
            return read_parquet_bytes(data)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(
                f"{self._where(relative)}: not a readable parquet file: {exc}"
            ) from None

    def _check_columns(self, table: pa.Table) -> tuple[str, ...]:
        """The tasks the manifest carries (a task's three columns are all there or none); every
        column of ``manifest_schema(tasks)`` is there with its type."""
        names = set(table.column_names)
        carried = tuple(
            task
            for task in line_dataset_tasks()
            if any(column in names for column in _task_columns(task))
        )
        schema = manifest_schema(carried, part_ids=PART_ID in names)
        check_table_schema(table, schema, self._where(MANIFEST_NAME))
        return carried

    def _check_rows(self, rows: list[dict[str, Any]]) -> None:
        where = self._where(MANIFEST_NAME)
        seen: dict[str, int] = {}
        parts: dict[str, tuple[str, str, int]] = {}  # part_id -> (line, split, first row)
        known = set(self.lines_config.ids)
        for number, row in enumerate(rows):
            sample_id, line_id = row["sample_id"], row["line_id"]
            at = f"{where}: row {number} ({sample_id})"
            if not isinstance(sample_id, str) or not sample_id:
                raise DataError(f"{where}: row {number}: sample_id is empty")
            if sample_id in seen:
                raise DataError(f"{at}: sample_id duplicates row {seen[sample_id]}")
            seen[sample_id] = number
            if not isinstance(line_id, str) or not _LINE_ID_RE.fullmatch(line_id):
                raise DataError(
                    f"{at}: line_id: {line_id!r} is not a valid line id (must match "
                    f"{LINE_ID_PATTERN})"
                )
            if line_id not in known:
                raise DataError(
                    f"{at}: line_id: unknown line {line_id!r}, not in "
                    f"{self.lines_config.source} (known: {', '.join(sorted(known))})"
                )
            if row["split"] not in SPLITS:
                raise DataError(f"{at}: split: {row['split']!r} is not one of {', '.join(SPLITS)}")
            if not row["image_path"]:
                raise DataError(f"{at}: image_path: missing (every sample has an image)")
            self._check_values(row, at)
            for modality in modalities(self.tasks):
                path = row.get(f"{modality}_path")
                if path is None:
                    continue
                try:
                    check_relative_path(path)
                except ValueError as exc:
                    raise DataError(f"{at}: {modality}_path: {exc}") from None
                if self.verify_checksums and not row.get(f"sha256_{modality}"):
                    raise DataError(f"{at}: sha256_{modality}: missing for {path}")
            self._check_part(row, number, at, parts)

    def _check_values(self, row: dict[str, Any], at: str) -> None:
        """Presence flags agree with the paths; capture metadata are present and in range."""
        for task in self.tasks:
            present = row[f"has_{task}"]
            if not isinstance(present, bool):
                raise DataError(f"{at}: has_{task}: {present!r}, expected true or false")
            if present and not row[f"{task}_path"]:
                raise DataError(f"{at}: {task}_path: missing although has_{task} is true")
            if not present:
                for modality in (task, *line_file(task).companions):
                    for column in (f"{modality}_path", f"sha256_{modality}"):
                        if row.get(column) is not None:
                            raise DataError(
                                f"{at}: {column}: {row[column]!r} although has_{task} is false "
                                f"(a sample without a {task} label names no {modality} file)"
                            )
        camera = row["camera"]
        if not isinstance(camera, str) or not camera:
            raise DataError(f"{at}: camera: {camera!r}, expected a non-empty string")
        for column in ("image_height", "image_width"):
            value = row[column]
            if not isinstance(value, int) or value < 1:
                raise DataError(f"{at}: {column}: {value!r}, expected a whole number >= 1 (px)")
        if not isinstance(row["has_defect"], bool):
            raise DataError(f"{at}: has_defect: {row['has_defect']!r}, expected true or false")
        n_defects = row["n_defects"]
        if not isinstance(n_defects, int) or n_defects < 0:
            raise DataError(f"{at}: n_defects: {n_defects!r}, expected a whole number >= 0")
        self._check_pitch(row, at)

    def _check_pitch(self, row: dict[str, Any], at: str) -> None:
        """A positive finite pitch; NaN (a benchmark that states none) only on a sample without
        sensor labels: sensor data (height in mm, normals from its gradient) need the pitch."""
        pitch = row["pitch_mm_per_px"]
        if finite_number(pitch) and pitch > 0:
            return
        measured = [
            task for task in self.tasks if get_task(task).sensor is not None and row[f"has_{task}"]
        ]
        if isinstance(pitch, float) and math.isnan(pitch) and not measured:
            return
        why = f" (the sample has sensor labels: {', '.join(measured)})" if measured else ""
        raise DataError(
            f"{at}: pitch_mm_per_px: {pitch!r}, expected a finite number > 0 (mm per pixel){why}"
        )

    @staticmethod
    def _check_part(
        row: dict[str, Any], number: int, at: str, parts: dict[str, tuple[str, str, int]]
    ) -> None:
        """A part id is a non-empty string whose images share one line and one split (a part
        split across train and test would leak)."""
        part_id = row.get(PART_ID)
        if part_id is None:
            return
        if not isinstance(part_id, str) or not part_id:
            raise DataError(f"{at}: {PART_ID}: {part_id!r} is not a non-empty string")
        place = (row["line_id"], row["split"])
        first = parts.setdefault(part_id, (*place, number))
        if first[:2] != place:
            raise DataError(
                f"{at}: {PART_ID}: part {part_id!r} is on line {place[0]}, split {place[1]}, but "
                f"row {first[2]} puts it on line {first[0]}, split {first[1]}: a part's images "
                "share one line and one split"
            )

    def _read_checked(self, row: dict[str, Any], modality: str) -> tuple[str, bytes]:
        relative = row[f"{modality}_path"]
        data = self._read(relative, modality)
        if self.verify_checksums:
            expected = row[f"sha256_{modality}"]
            actual = sha256_hex(data)
            if actual != expected:
                raise DataError(
                    f"{self._where(relative)}: {modality}: sha256 mismatch (manifest "
                    f"sha256_{modality}={expected}, file {actual}); the file changed after "
                    "the manifest was written"
                )
        return relative, data

    def _read_png(self, row: dict[str, Any], modality: str, modes: tuple[str, ...]) -> np.ndarray:
        relative, data = self._read_checked(row, modality)
        limit = ImageSizeLimit.of_line(self.lines_config.get(row["line_id"]))
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.format != "PNG":
                    raise DataError(
                        f"{self._where(relative)}: {modality}: expected a PNG, got {image.format}"
                    )
                too_large = limit.problem(*image.size)
                if too_large:
                    raise DataError(f"{self._where(relative)}: {modality}: {too_large}")
                if image.mode not in modes:
                    raise DataError(
                        f"{self._where(relative)}: {modality}: PNG mode {image.mode}, expected "
                        f"{' or '.join(modes)}"
                    )
                image.load()
                array = np.asarray(image)
        except DataError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{self._where(relative)}: {modality}: corrupt PNG: {exc}") from None
        return array

    def _read_npy(self, row: dict[str, Any], modality: str, shape: tuple[int, ...]) -> np.ndarray:
        relative, data = self._read_checked(row, modality)
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:
            raise DataError(
                f"{self._where(relative)}: {modality}: truncated or corrupt .npy: {exc}"
            ) from None
        if array.dtype != np.float32:
            raise DataError(
                f"{self._where(relative)}: {modality}: dtype {array.dtype}, expected float32"
            )
        self._check_shape(row, modality, array, shape)
        return array

    def _check_shape(
        self, row: dict[str, Any], modality: str, array: np.ndarray, shape: tuple[int, ...]
    ) -> None:
        if array.shape != tuple(shape):
            raise DataError(
                f"{self._where(row[f'{modality}_path'])}: {modality}: shape {array.shape}, "
                f"expected {tuple(shape)} (from the image)"
            )
