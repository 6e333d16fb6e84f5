"""The synthetic line dataset: scenes of ``cta_model.data.synthetic`` written through the
line-dataset writer, with the labels each line's sensors give, split per line.

Each sample depends only on (seed, line, index), so the same seed gives a byte-identical tree,
with or without worker processes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cta_model.data.line_dataset import SPLITS, as_lines_config
from cta_model.data.line_writer import (
    SampleRecord,
    WrittenSample,
    prepare_root,
    sample_id_for,
    write_manifest,
    write_sample,
)
from cta_model.data.lines import LinesConfig, LineSpec
from cta_model.data.synthetic import CLASS_NAMES, line_key, render_sample
from cta_model.errors import ConfigError

#: The labels the synthetic generator renders, in manifest order.
SYNTHETIC_TASKS: tuple[str, ...] = ("semseg", "height", "normals")
# Random streams of the writer, beside the per-sample scene streams of the generator.
_PRESENCE_STREAM = 1
_SPLIT_STREAM = 2


def presence_for(line: LineSpec, seed: int, sample_index: int) -> dict[str, bool]:
    """Which modalities sample ``sample_index`` of ``line`` has (sensors, label fraction)."""
    spec = line.synthetic
    assert spec is not None
    rng = np.random.default_rng([seed, line_key(line.id), sample_index, _PRESENCE_STREAM])
    has_height = line.has_height_sensor
    return {
        "semseg": bool(rng.random() < spec.segmentation_label_fraction),
        "height": has_height,
        "height_clean": has_height,
        "normals": has_height,  # normals come from the height sensor
    }


def synthetic_record(
    line: LineSpec, sample_index: int, seed: int, height: int, width: int
) -> SampleRecord:
    """Sample ``sample_index`` of ``line`` rendered by the synthetic generator, with the labels
    its line's sensors and label fraction give it (``presence_for``)."""
    sample = render_sample(line, sample_index, seed, height, width)
    present = presence_for(line, seed, sample_index)
    rendered = {"semseg": sample.semseg, "height": sample.height, "normals": sample.normals}
    return SampleRecord(
        sample_id=sample_id_for(line.id, sample_index),
        line_id=line.id,
        image=sample.image,
        camera=line.camera,
        pitch_mm_per_px=sample.pitch_mm_per_px,
        labels={task: label for task, label in rendered.items() if present[task]},
        companions={"height_clean": sample.height_clean} if present["height_clean"] else {},
        has_defect=sample.has_defect,
        n_defects=len(sample.defects),
        features=[
            {
                "feature_id": feature.feature_id,
                "type": feature.type,
                "x0": feature.box[0],
                "y0": feature.box[1],
                "x1": feature.box[2],
                "y1": feature.box[3],
                "nominal_mm": feature.nominal_mm,
                "actual_mm": feature.actual_mm,
                "tolerance_mm": feature.tolerance_mm,
                "in_tolerance": feature.in_tolerance,
            }
            for feature in sample.features
        ],
    )


def _write_synthetic_sample(
    root: Path, line: LineSpec, sample_index: int, seed: int, height: int, width: int
) -> WrittenSample:
    record = synthetic_record(line, sample_index, seed, height, width)
    return write_sample(root, record, SYNTHETIC_TASKS)


def split_counts(total: int, fractions: Sequence[float]) -> list[int]:
    """Exact counts summing to ``total`` (largest remainder; ties go to the earlier split)."""
    raw = [total * fraction for fraction in fractions]
    counts = [int(value) for value in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def assign_splits(
    has_defect: Sequence[bool], fractions: Sequence[float], rng: np.random.Generator
) -> list[str]:
    """Exact split sizes, each split getting a proportional share of the defective samples."""
    total = len(has_defect)
    counts = split_counts(total, fractions)
    # Evenly interleaved label sequence (train, val, train, test, ...) with exact counts.
    slots = sorted(
        ((j + 0.5) / count, split_index)
        for split_index, count in enumerate(counts)
        for j in range(count)
    )
    labels = [SPLITS[split_index] for _, split_index in slots]
    defective = [i for i in range(total) if has_defect[i]]
    clean = [i for i in range(total) if not has_defect[i]]
    order = [defective[i] for i in rng.permutation(len(defective))] + [
        clean[i] for i in rng.permutation(len(clean))
    ]
    # Any prefix of the interleaved labels holds each split in proportion, so the defective
    # samples (first in ``order``) are spread over the splits like the rest.
    result = [""] * total
    for sample, label in zip(order, labels, strict=True):
        result[sample] = label
    return result


def generate_dataset(
    out_dir: str | Path,
    lines_config: LinesConfig | str | Path | None = None,
    *,
    n_lines: int,
    samples_per_line: int,
    height: int = 128,
    width: int = 128,
    seed: int = 0,
    splits: Sequence[float] = (0.6, 0.15, 0.15, 0.1),
    progress: bool = True,
    overwrite: bool = False,
    workers: int = 1,
    line_samples: Mapping[str, int] | None = None,
) -> Path:
    """Generate the synthetic dataset of the first ``n_lines`` lines; returns the root.

    ``line_samples`` overrides ``samples_per_line`` for the lines it names (e.g. more samples
    for the pilot line, whose test split needs enough good and defective parts).

    Files are written atomically; ``manifest.parquet`` is written last, so a folder without one
    is an interrupted generation. An existing dataset is replaced only with ``overwrite``.
    ``workers`` > 1 renders in that many processes; the bytes do not depend on it, because each
    sample depends only on (seed, line, index).
    """
    config = as_lines_config(lines_config)
    lines = config.first(n_lines)
    for line in lines:
        if line.synthetic is None:
            raise ConfigError(f"{config.source}: line {line.id!r} has no 'synthetic' block")
    counts = {line.id: samples_per_line for line in lines}
    for line_id, count in (line_samples or {}).items():
        if line_id not in counts:
            raise ConfigError(
                f"line_samples: line {line_id!r} is not among the generated lines "
                f"({', '.join(counts)})"
            )
        counts[line_id] = count
    if min(counts.values()) < 1:
        raise ConfigError(f"samples per line must be >= 1, got {counts}")
    if len(splits) != len(SPLITS) or min(splits) < 0 or abs(sum(splits) - 1) > 1e-6:
        raise ConfigError(
            f"splits must be {len(SPLITS)} fractions >= 0 for {'/'.join(SPLITS)} summing to 1, "
            f"got {list(splits)}"
        )
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    if min(height, width) < 8:
        raise ConfigError(f"image size must be at least 8 x 8, got {height} x {width}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    root = Path(out_dir)
    prepare_root(root, SYNTHETIC_TASKS, overwrite)

    jobs = [
        (root, line, sample_index, seed, height, width)
        for line in lines
        for sample_index in range(counts[line.id])
    ]
    ordered: list[WrittenSample] = []
    with (
        tqdm(total=len(jobs), desc="generate", unit="sample", disable=not progress) as bar,
        _job_runner(workers) as run,
    ):
        results = []
        for written_sample in run(jobs):
            results.append(written_sample)
            bar.update(1)
        start = 0
        for line in lines:
            written = results[start : start + counts[line.id]]
            start += counts[line.id]
            split_rng = np.random.default_rng([seed, line_key(line.id), _SPLIT_STREAM])
            labels = assign_splits([w.row["has_defect"] for w in written], splits, split_rng)
            for item, label in zip(written, labels, strict=True):
                item.set_split(label)
                ordered.append(item)

    generator = {
        "seed": seed,
        "n_lines": n_lines,
        "samples_per_line": samples_per_line,
        **({"line_samples": dict(line_samples)} if line_samples else {}),
        "height": height,
        "width": width,
        "splits": list(splits),
        "class_names": list(CLASS_NAMES),
        "lines": [line.model_dump(mode="json") for line in lines],
    }
    return write_manifest(root, ordered, SYNTHETIC_TASKS, generator)


@contextlib.contextmanager
def _job_runner(workers: int) -> Iterator[Callable[[list[tuple]], Iterator[WrittenSample]]]:
    """Yield a function writing the synthetic samples of jobs, in order, in-process or in a
    pool."""
    if workers == 1:
        yield lambda jobs: (_write_synthetic_sample(*job) for job in jobs)
        return
    # spawn, not fork: the parent may hold threads (torch, tqdm) that fork would copy mid-lock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield lambda jobs: pool.map(_write_synthetic_sample_job, jobs, chunksize=8)


def _write_synthetic_sample_job(job: tuple) -> WrittenSample:
    return _write_synthetic_sample(*job)
