"""Opening a run's raw train and val datasets and recording where they came from.

`config.data` names a line dataset (folder, `s3://` through `opener_for`, a `dataset_ref.json`
whose quarantine is skipped, or the cached synthetic dataset) or a research format
(`cta_model.data.formats`). Samples stay raw (dicts of numpy arrays); `loaders.py` turns them
into batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cta_model.data.dataset_ref import (
    check_manifest,
    quarantined_ids,
    read_dataset_ref,
    refuse_empty_split,
)
from cta_model.data.line_dataset import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    LineDataset,
    LocalOpener,
    Opener,
    sha256_hex,
)
from cta_model.data.synthetic import CLASS_NAMES
from cta_model.data.synthetic_dataset import generate_dataset
from cta_model.errors import ConfigError
from cta_model.train_config import DataConfig, TrainConfig
from cta_model.training.distributed import DistributedEnv, barrier

log = logging.getLogger(__name__)

OpenerFor = Callable[[str], Opener]


@dataclass
class DataBundle:
    train: Any  # raw train samples (sample dicts of numpy arrays)
    val: Any
    class_names: tuple[str, ...]
    depth_is_disparity: bool
    lineage: dict[str, Any]
    reject_classes: tuple[int, ...] | None = None  # the dataset's own defect classes, if any


@dataclass
class ByteBudget:
    """Bytes a process may still keep; shared by the train and val sample caches."""

    left: int


class DecodedSampleCache:
    """`base`'s decoded samples kept in memory while `budget` lasts (numpy arrays' bytes).

    The first samples to arrive that fit are kept and never evicted: training reads samples in
    a new random order every epoch, where a least-recently-used cache would evict what comes
    next. Kept arrays are made read-only, so a transform that wrote into one would fail
    loudly instead of changing what later epochs see (`transforms._writable` copies them
    before torch takes them); each read gets a fresh dict.
    """

    def __init__(self, base: Any, budget: ByteBudget) -> None:
        self.base = base
        self.budget = budget
        self._kept: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        kept = self._kept.get(index)
        if kept is not None:
            return dict(kept)
        sample = self.base[index]
        arrays = [value for value in sample.values() if isinstance(value, np.ndarray)]
        size = sum(array.nbytes for array in arrays)
        if size <= self.budget.left:
            for array in arrays:
                array.flags.writeable = False
            self._kept[index] = sample
            self.budget.left -= size
            return dict(sample)
        return sample


class Subset:
    """Rows of a raw dataset by index (quarantined samples left out)."""

    def __init__(self, base: Any, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.base[self.indices[index]]


def synthetic_cache_root(data: DataConfig) -> Path:
    """`<cache_dir>/synthetic/<hash>` of the generator parameters, the inventory's bytes and
    the generator's version (its format version and source), so any change regenerates."""
    from cta_model.data import (
        line_dataset,
        line_writer,
        synthetic,
        synthetic_dataset,
        synthetic_defects,
        synthetic_parts,
    )
    from cta_model.data.lines import default_lines_config

    assert data.synthetic is not None
    lines_path = Path(data.lines_config) if data.lines_config else default_lines_config()
    try:
        lines_sha = sha256_hex(lines_path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"data.lines_config: cannot read {lines_path}: {exc}") from None
    generator_sources = (
        synthetic,
        synthetic_parts,
        synthetic_defects,
        synthetic_dataset,
        line_dataset,
        line_writer,
    )
    generator_sha = sha256_hex(b"".join(Path(m.__file__).read_bytes() for m in generator_sources))
    key = {
        "params": data.synthetic.model_dump(mode="json"),
        "lines_config_sha256": lines_sha,
        "generator": f"{FORMAT_VERSION}-{generator_sha}",
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(data.cache_dir) / "synthetic" / digest


def ensure_synthetic_dataset(data: DataConfig) -> Path:
    """Generate the synthetic dataset once (into a temp sibling, renamed into place); reuse it."""
    root = synthetic_cache_root(data)
    if (root / MANIFEST_NAME).is_file():
        return root
    assert data.synthetic is not None
    params = data.synthetic
    log.info("generating synthetic dataset %s into %s", params.model_dump(), root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        generate_dataset(
            staging,
            data.lines_config,
            n_lines=params.lines,
            samples_per_line=params.samples_per_line,
            height=params.size,
            width=params.size,
            seed=params.seed,
            progress=False,
            overwrite=True,
        )
        try:
            os.rename(staging, root)
        except OSError:  # another run finished first; its bytes are identical
            if not (root / MANIFEST_NAME).is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root


def open_datasets(
    config: TrainConfig, opener_for: OpenerFor | None = None, *, generate: bool = True
) -> DataBundle:
    """The raw train and val datasets of `config.data` and their lineage.

    opener_for: maps a dataset URI to an opener (components.storage.opener_for for s3://).
    generate: False on the ranks that wait for rank 0 to generate the synthetic dataset.
    """
    data = config.data
    tasks = config.model.tasks
    if data.format != "line":
        return _open_research_format(config)
    ref: dict[str, Any] | None = None
    if data.synthetic is not None:
        root = ensure_synthetic_dataset(data) if generate else synthetic_cache_root(data)
        uri = str(root.resolve())
    elif data.dataset_ref is not None:
        ref = read_dataset_ref(data.dataset_ref)
        uri = ref["uri"]
    else:
        assert data.path is not None
        uri = data.path
    quarantine = quarantined_ids(ref)
    if uri.startswith("s3://"):
        if opener_for is None:
            raise ConfigError(
                f"{uri}: an s3:// dataset needs an opener (pass opener_for="
                "components.storage.opener_for)"
            )
        opener = opener_for(uri)
    else:
        uri = str(Path(uri.removeprefix("file://")).resolve())
        opener = opener_for(uri) if opener_for is not None else LocalOpener(uri)

    def open_split(split: str) -> tuple[Any, int]:
        dataset = LineDataset(uri, data.lines_config, split=split, opener=opener)
        dataset.require_tasks(tasks, "model.tasks")
        keep = [i for i, sid in enumerate(dataset.sample_ids) if sid not in quarantine]
        skipped = len(dataset) - len(keep)
        refuse_empty_split(len(keep), root=uri, split=split)
        return (dataset if not skipped else Subset(dataset, keep)), skipped

    train_set, train_skipped = open_split(data.train_split)
    val_set, val_skipped = open_split(data.val_split)
    base = train_set.base if isinstance(train_set, Subset) else train_set
    class_names = base.class_names or CLASS_NAMES
    manifest_sha = sha256_hex(opener(MANIFEST_NAME))
    check_manifest(ref, manifest_sha, root=uri, ref_path=data.dataset_ref)
    lineage = {
        "format": "line",
        "uri": uri,
        "manifest_sha256": manifest_sha,
        "dvc_rev": ref.get("dvc_rev") if ref else None,
        "dataset_ref": data.dataset_ref,
        "quarantine_listed": len(quarantine),
        "quarantine_skipped": {"train": train_skipped, "val": val_skipped},
        "splits": {"train": data.train_split, "val": data.val_split},
        "sizes": {"train": len(train_set), "val": len(val_set)},
    }
    return DataBundle(train_set, val_set, class_names, False, lineage, base.reject_classes)


def open_datasets_on_every_rank(
    config: TrainConfig, env: DistributedEnv, opener_for: OpenerFor | None = None
) -> DataBundle:
    """`open_datasets` on every rank: rank 0 first (it generates a synthetic dataset once, and
    logs the quarantine), the others once it is done."""
    if env.is_main:
        data = open_datasets(config, opener_for)
        lineage = data.lineage
        if lineage.get("quarantine_listed"):
            skipped = lineage["quarantine_skipped"]
            log.info(
                "quarantine: skipped %d train and %d val samples (%d listed in %s)",
                skipped["train"],
                skipped["val"],
                lineage["quarantine_listed"],
                lineage["dataset_ref"],
            )
    barrier()
    if not env.is_main:
        data = open_datasets(config, opener_for, generate=False)
    return data


def _open_research_format(config: TrainConfig) -> DataBundle:
    data = config.data
    assert data.path is not None
    if data.path.startswith("s3://"):
        raise ConfigError(f"data.path: format {data.format!r} reads local folders only")
    try:
        from cta_model.data.formats import open_format
    except ImportError as exc:  # the registry is another module's; say what is missing
        raise ConfigError(
            f"data.format {data.format!r} needs cta_model.data.formats.open_format: {exc}"
        ) from None
    options = dict(data.format_options)
    train_set = open_format(data.format, data.path, data.train_split, **options)
    val_set = open_format(data.format, data.path, data.val_split, **options)
    provided = tuple(getattr(train_set, "tasks", ()))
    missing = [t for t in config.model.tasks if provided and t not in provided]
    if missing:
        raise ConfigError(
            f"model.tasks: format {data.format!r} has no {', '.join(missing)} labels "
            f"(it provides {', '.join(provided)})"
        )
    lineage = {
        "format": data.format,
        "uri": str(Path(data.path).resolve()),
        "manifest_sha256": None,
        "dvc_rev": None,
        "dataset_ref": None,
        "format_options": options,
        "splits": {"train": data.train_split, "val": data.val_split},
        "sizes": {"train": len(train_set), "val": len(val_set)},
    }
    return DataBundle(
        train_set,
        val_set,
        tuple(getattr(train_set, "class_names", ())),
        bool(getattr(train_set, "depth_is_disparity", False)),
        lineage,
    )
