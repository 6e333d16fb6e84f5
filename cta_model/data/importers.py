"""Import a research benchmark as one line dataset (``cta data import``, DESIGN 4.3).

MVTec AD and MVTec 3D-AD are read with their read-only loaders (``cta_model.data.formats``) and
written with the line-dataset writer (``cta_model.data.line_writer``):

- **one line per category**: line id = the category folder's name in lower case with
  underscores as hyphens (``metal_nut`` -> ``metal-nut``); a name that cannot be a line id
  (``LINE_ID_PATTERN``) is refused, naming the folder.
- **classes**: ``good`` = 0, then every defect type (a ``test/`` sub-folder other than ``good``)
  of the imported categories, pooled and sorted; a defect pixel gets its image's type. They
  go into the manifest's ``cta.generator`` JSON as ``class_names``, with ``reject_classes`` =
  every id but ``good``, so training, evaluation and serving reject any defect type.
- **splits**: ``train`` = ``train/good`` (good only, as the benchmarks define it: training needs
  ``data.anomalies`` or labelled defects to learn what a defect is); ``val`` is carved from the
  ``test/`` images, stratified by type: of a type's n images, ``round(n * val_fraction)`` but at
  least 1 and at most n - 1 (a type with one image stays in ``test``), picked by a permutation
  seeded from (``seed``, line id, type), so a category's split does not depend on which others
  are imported; the rest are ``test``. MVTec 3D-AD's ``validation/good`` goes to ``qa``: held
  out like the benchmark intends (train stays the benchmark's train set, so figures stay
  comparable), and it is what roll-out health checks replay.
- **tasks**: every dataset carries the columns of semseg, height and normals. MVTec AD has only
  semseg (``has_height`` / ``has_normals`` false); MVTec 3D-AD has height (mm, ``datum - z``
  with the datum from the category's good training parts) and normals from the point maps, so
  multitask models (CTAL) apply.
- **pitch**: MVTec 3D-AD's per image from its point map (median x step); MVTec AD states none:
  the manifest records NaN (resolution checks skip such lines).
- **inventory**: ``<out>/lines.yaml`` lists the categories as lines (``LinesConfig``), so that
  ``LineDataset`` finds them without ``--lines-config``; fields a benchmark has no value for
  carry placeholders documented in the file's header.

Sample ids are ``<line>-<split in the source>-<type>-<file stem>`` (characters other than
letters, digits, ``.``, ``_`` and ``-`` become ``_``). The same source and arguments give the
same bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import ndimage
from tqdm import tqdm

from cta_model.data.formats._common import subfolders
from cta_model.data.formats.mvtec_3d_ad import Mvtec3dAD
from cta_model.data.formats.mvtec_ad import GOOD, MvtecAD, category_dir
from cta_model.data.line_dataset import DATASET_LINES_NAME
from cta_model.data.line_writer import (
    SampleRecord,
    WrittenSample,
    prepare_root,
    write_atomic,
    write_manifest,
    write_sample,
)
from cta_model.data.lines import LinesConfig, validate_line_id
from cta_model.data.synthetic import line_key
from cta_model.errors import ConfigError, DataError

IMPORT_FORMATS: tuple[str, ...] = ("mvtec-ad", "mvtec-3d-ad")
IMPORT_TASKS: tuple[str, ...] = ("semseg", "height", "normals")
DEFAULT_VAL_FRACTION = 0.3
# Placeholders of lines.yaml fields that a benchmark has no value for (see LINES_HEADER).
PLACEHOLDER_PITCH_MM_PER_PX = 1.0
PLACEHOLDER_PARTS_PER_HOUR = 1.0
PLACEHOLDER_HOURS_PER_YEAR = 1.0
PLACEHOLDER_DEFECT_PREVALENCE = 0.01
_SOURCE_SPLITS = {"mvtec-ad": ("train", "test"), "mvtec-3d-ad": ("train", "validation", "test")}
_SENSORS = {"mvtec-ad": ["rgb"], "mvtec-3d-ad": ["rgb", "height"]}
_SAMPLE_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# Seeds the val draw of one (line, type) stratum, beside the user's seed.
_VAL_STREAM = 3

LINES_HEADER = """\
# Fleet inventory of a benchmark imported by `cta data import {format}`: one line per category.
# LineDataset uses this file for this dataset when no --lines-config / data.lines_config is
# given (docs/data.md). The categories are not production lines: the fields below that a
# benchmark has no value for are PLACEHOLDERS the schema requires, not measurements.
#
#   resolution          the images' [height, width] (the largest, should sizes differ)
#   pitch_mm_per_px     {pitch_note}
#   sensors             [rgb] for MVTec AD, [rgb, height] for MVTec 3D-AD (height and normals
#                       come from the point maps)
#   parts_per_hour, hours_per_year, defect_prevalence
#                       placeholders ({parts_per_hour:g}, {hours_per_year:g}, \
{defect_prevalence:g}): no production behind a benchmark;
#                       an ROI report over these lines means nothing
#   min_defect_width_mm null: the benchmark states no smallest defect (no resolution check)
#   site, camera        the benchmark's name; pilot: the first category (exactly one is needed);
#                       serving_target: local
"""
_PITCH_NOTES = {
    "mvtec-ad": (
        f"placeholder {PLACEHOLDER_PITCH_MM_PER_PX:g}: MVTec AD states no pitch (the manifest "
        "records NaN)"
    ),
    "mvtec-3d-ad": "the median pitch of the category's point maps (median x step, mm)",
}


@dataclass(frozen=True)
class _Source:
    """One image of the source: which loader holds it and where it goes."""

    category: str
    line_id: str
    loader: Any  # MvtecAD | Mvtec3dAD of one source split
    index: int  # in the loader
    kind: str  # "good" or the defect type
    split: str  # the line-dataset split


@dataclass
class ImportSummary:
    """What an import wrote: counts per split and line, the classes and the inventory."""

    root: Path
    format: str
    lines: dict[str, str]  # category -> line id
    class_names: tuple[str, ...]
    split_counts: dict[str, int] = field(default_factory=dict)
    # Images of a defect type whose mask marks no pixel: they count as good everywhere.
    empty_defect_masks: list[str] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        return sum(self.split_counts.values())

    @property
    def lines_path(self) -> Path:
        return self.root / DATASET_LINES_NAME


def category_line_id(category: str) -> str:
    """The line id of a category: lower case, underscores -> hyphens; ConfigError if invalid."""
    candidate = category.lower().replace("_", "-")
    try:
        return validate_line_id(candidate)
    except ValueError as exc:
        raise ConfigError(
            f"category {category!r}: cannot be a line id ({exc}); rename the folder or leave "
            "it out with --category"
        ) from None


def val_count(n_images: int, val_fraction: float) -> int:
    """Images of one type that go to ``val``: round(n * fraction), at least 1, at most n - 1."""
    if n_images < 2:
        return 0
    return min(n_images - 1, max(1, round(n_images * val_fraction)))


def stratified_val(
    kinds: Sequence[str], val_fraction: float, seed: int, line_id: str
) -> list[bool]:
    """For each image (its type in ``kinds``), whether it goes to ``val`` (else ``test``)."""
    chosen = [False] * len(kinds)
    for kind in sorted(set(kinds)):
        members = [index for index, value in enumerate(kinds) if value == kind]
        rng = np.random.default_rng([seed, line_key(f"{line_id}/{kind}"), _VAL_STREAM])
        for position in rng.permutation(len(members))[: val_count(len(members), val_fraction)]:
            chosen[members[position]] = True
    return chosen


def find_categories(format_name: str, root: Path, requested: Sequence[str] | None) -> list[str]:
    """The requested categories (each checked), else every sub-folder with train/ and test/."""
    if requested:
        for category in requested:
            category_dir(format_name, root, category)
        if len(set(requested)) != len(requested):
            raise ConfigError(f"--category: a category is named twice: {list(requested)}")
        return sorted(requested)
    if not root.is_dir():
        raise DataError(f"{root}: root: folder missing")
    found = [
        name
        for name in subfolders(root)
        if (root / name / "train").is_dir() and (root / name / "test").is_dir()
    ]
    if not found:
        raise DataError(
            f"{root}: no {format_name} category (a folder with train/ and test/) in it; "
            f"sub-folders: {', '.join(subfolders(root)) or '(none)'}"
        )
    return found


def defect_types(root: Path, categories: Sequence[str]) -> list[str]:
    """Every defect type (``test/`` sub-folder other than ``good``) of ``categories``, sorted."""
    types: set[str] = set()
    for category in categories:
        test = root / category / "test"
        if not test.is_dir():
            raise DataError(f"{test}: test: folder missing")
        types.update(name for name in subfolders(test) if name != GOOD)
    return sorted(types)


def import_mvtec(
    format_name: str,
    src: str | Path,
    out: str | Path,
    *,
    categories: Sequence[str] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportSummary:
    """Write the MVTec AD / 3D-AD folder ``src`` as one line dataset in ``out`` (see the module
    docstring); returns what was written."""
    if format_name not in IMPORT_FORMATS:
        raise ConfigError(
            f"unknown import format {format_name!r}; one of {', '.join(IMPORT_FORMATS)}"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    src, root = Path(src), Path(out)
    chosen = find_categories(format_name, src, categories)
    lines = {category: category_line_id(category) for category in chosen}
    _refuse_shared_line_ids(lines)
    class_names = (GOOD, *defect_types(src, chosen))
    if len(class_names) == 1:
        raise DataError(f"{src}: no defect type (test/ sub-folder other than good) to import")
    class_ids = {name: index for index, name in enumerate(class_names)}
    sources = [
        item
        for category in chosen
        for item in _category_sources(
            format_name, src, category, lines[category], val_fraction, seed
        )
    ]
    prepare_root(root, IMPORT_TASKS, overwrite)

    summary = ImportSummary(root, format_name, lines, class_names)
    written: list[WrittenSample] = []
    sizes: dict[str, tuple[int, int]] = {}
    pitches: dict[str, list[float]] = {}
    seen_ids: set[str] = set()
    for item in tqdm(sources, desc="import", unit="image", disable=not progress):
        record = _record(item, class_ids[item.kind], format_name)
        if record.sample_id in seen_ids:
            raise DataError(
                f"{src / item.category}: two images map to sample id {record.sample_id!r} "
                "(file names that differ only in characters other than letters, digits, "
                "'.', '_' and '-'); rename one"
            )
        seen_ids.add(record.sample_id)
        written.append(write_sample(root, record, IMPORT_TASKS))
        height, width = record.image.shape[:2]
        old = sizes.get(item.line_id, (0, 0))
        sizes[item.line_id] = (max(old[0], height), max(old[1], width))
        if math.isfinite(record.pitch_mm_per_px):
            pitches.setdefault(item.line_id, []).append(record.pitch_mm_per_px)
        summary.split_counts[item.split] = summary.split_counts.get(item.split, 0) + 1
        if item.kind != GOOD and not record.has_defect:
            summary.empty_defect_masks.append(record.sample_id)

    inventory = lines_inventory(format_name, list(lines.values()), sizes, pitches)
    write_atomic(root / DATASET_LINES_NAME, inventory.encode("utf-8"))
    generator = {
        "importer": "cta data import",
        "format": format_name,
        "source": src.name,
        "categories": lines,
        "class_names": list(class_names),
        "reject_classes": list(range(1, len(class_names))),
        "val_fraction": val_fraction,
        "seed": seed,
        "splits": {
            "train": "train/good",
            "val": "carved from test/, stratified by type",
            "test": "the rest of test/",
            **({"qa": "validation/good"} if format_name == "mvtec-3d-ad" else {}),
        },
    }
    if format_name == "mvtec-3d-ad":
        # Every loader of a category shares the datum of its good training parts.
        generator["height_datum_mm"] = {item.line_id: item.loader.datum_mm for item in sources}
    write_manifest(root, written, IMPORT_TASKS, generator)
    return summary


def lines_inventory(
    format_name: str,
    line_ids: Sequence[str],
    sizes: dict[str, tuple[int, int]],
    pitches: dict[str, list[float]],
) -> str:
    """The text of ``lines.yaml`` for the imported lines (checked against ``LinesConfig``)."""
    entries = []
    for number, line_id in enumerate(line_ids):
        if line_id not in sizes:
            raise DataError(f"line {line_id!r}: no image was imported")
        line_pitches = pitches.get(line_id)
        pitch = (
            float(f"{np.median(line_pitches):.6g}") if line_pitches else PLACEHOLDER_PITCH_MM_PER_PX
        )
        entries.append(
            {
                "id": line_id,
                "site": format_name,
                "camera": format_name,
                "resolution": list(sizes[line_id]),
                "pitch_mm_per_px": pitch,
                "sensors": list(_SENSORS[format_name]),
                "parts_per_hour": PLACEHOLDER_PARTS_PER_HOUR,
                "hours_per_year": PLACEHOLDER_HOURS_PER_YEAR,
                "defect_prevalence": PLACEHOLDER_DEFECT_PREVALENCE,
                "min_defect_width_mm": None,
                "pilot": number == 0,
                "serving_target": "local",
            }
        )
    body = {"lines": entries}
    LinesConfig.from_dict(body, source=DATASET_LINES_NAME)  # a bug here, not a user error
    header = LINES_HEADER.format(
        format=format_name,
        pitch_note=_PITCH_NOTES[format_name],
        parts_per_hour=PLACEHOLDER_PARTS_PER_HOUR,
        hours_per_year=PLACEHOLDER_HOURS_PER_YEAR,
        defect_prevalence=PLACEHOLDER_DEFECT_PREVALENCE,
    )
    return header + "\n" + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


# --- helpers ---


def _refuse_shared_line_ids(lines: dict[str, str]) -> None:
    by_id: dict[str, str] = {}
    for category, line_id in lines.items():
        if line_id in by_id:
            raise ConfigError(
                f"categories {by_id[line_id]!r} and {category!r} both become line id "
                f"{line_id!r}; import them separately or rename one folder"
            )
        by_id[line_id] = category


def _open_loaders(format_name: str, src: Path, category: str) -> dict[str, Any]:
    """The loader of each source split the category has (train and test are required)."""
    loaders: dict[str, Any] = {}
    if format_name == "mvtec-ad":
        for split in _SOURCE_SPLITS[format_name]:
            loaders[split] = MvtecAD(src, split, category)
        return loaders
    train = Mvtec3dAD(src, "train", category)
    loaders["train"] = train
    for split in ("validation", "test"):
        if split == "validation" and not (src / category / split).is_dir():
            continue  # validation/good is optional: it only feeds qa
        # Every split shares the datum of the training parts: computed once.
        loaders[split] = Mvtec3dAD(src, split, category, datum_mm=train.datum_mm)
    return loaders


def _category_sources(
    format_name: str, src: Path, category: str, line_id: str, val_fraction: float, seed: int
) -> list[_Source]:
    loaders = _open_loaders(format_name, src, category)
    sources: list[_Source] = []
    for source_split, loader in loaders.items():
        kinds = [kind for kind, _ in loader.items]
        if source_split == "test":
            to_val = stratified_val(kinds, val_fraction, seed, line_id)
            splits = ["val" if chosen else "test" for chosen in to_val]
        else:
            splits = ["train" if source_split == "train" else "qa"] * len(kinds)
        sources += [
            _Source(category, line_id, loader, index, kind, split)
            for index, (kind, split) in enumerate(zip(kinds, splits, strict=True))
        ]
    return sources


def _record(item: _Source, class_id: int, format_name: str) -> SampleRecord:
    sample = item.loader[item.index]
    defect = sample["semseg"] > 0  # the loaders' own ids: any non-zero id is this image's type
    semseg = np.where(defect, class_id, np.where(sample["semseg"] < 0, -1, 0)).astype(np.int64)
    labels: dict[str, np.ndarray] = {"semseg": semseg}
    for task in ("height", "normals"):
        if sample["present"][task]:
            labels[task] = sample[task]
    n_defects = int(ndimage.label(defect, structure=np.ones((3, 3), dtype=bool))[1])
    source_id = sample["sample_id"].replace("/", "-")
    return SampleRecord(
        sample_id=_SAMPLE_ID_UNSAFE.sub("_", f"{item.line_id}-{source_id}"),
        line_id=item.line_id,
        image=sample["image"],
        camera=format_name,
        pitch_mm_per_px=float(sample["pitch_mm_per_px"]),
        labels=labels,
        split=item.split,
        has_defect=bool(defect.any()),
        n_defects=n_defects,
    )
