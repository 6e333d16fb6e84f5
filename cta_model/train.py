"""The training loop (DESIGN 3, 5.1, 5.3, 6.1): one process or `torchrun` DDP, resumable exactly.

    result = train(load_train_config("configs/demo.yaml"), callbacks=[...], resume="auto")

What one run does:

* data: a line dataset (folder, `s3://` through `opener_for`, a `dataset_ref.json` whose
  quarantine is skipped, or the cached synthetic dataset) or a research format; the train split
  goes through the registry transforms with per-sample random streams keyed by (seed, epoch,
  index), so augmentations do not depend on workers, order or resumption;
* sampling: `ResumableDistributedSampler` (seeded per epoch, padded like DistributedSampler,
  restartable at a sample position) for training; `ShardSampler` (rank r gets r::world_size,
  no padding, no duplicates) for validation, whose meters are merged with
  `reduce_distributed`, so pooled metrics are the same on 1 and N processes;
* a step: bf16 autocast on CUDA (precision bf16/auto), gradient accumulation with DDP
  `no_sync` on the non-final micro-steps, channels_last, optional torch.compile, grad norm,
  per-step LR schedule; partial labels through the batch's presence flags;
* optional EMA-teacher self-distillation (`distill.enabled`): pseudo-labels only for the
  tasks a sample lacks (segmentation where the teacher's max softmax >= seg_confidence);
* each epoch: validation on `val_split` -> `<task>.<metric>` + `val_loss`, model selection and
  early stopping on val only, the best weights kept;
* checkpoints (atomic, tensors and primitive containers only, loaded with weights_only=True)
  every `checkpoint.every_steps` and at each epoch end; `resume="auto"` continues from the
  latest readable one when its config hash matches. With `deterministic: true`, fixed seeds and
  the same thread count, a killed and resumed run ends with bit-identical weights;
* rank 0 writes `<output>/model` (save_model_folder + lineage.json + reference_stats.parquet,
  computed with the Predictor built from the saved folder) and `<output>/train_result.json`.

`batch_size` is global: per process and micro-step each rank sees
batch_size / (world_size * grad_accum_steps) samples.

Command line (what `cta train` wraps; also the entry point of the kill-and-resume tests):

    python -m cta_model.train --config FILE [--set key=value ...] [--resume auto|never|PATH]
    torchrun --nproc_per_node=2 -m cta_model.train --config FILE
    python -m cta_model.train --config FILE --validate-only --metrics-out m.json

CTA_* environment variables override the file unless `--no-env` (for a launcher that already
resolved flag > env > file into the file it passes).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from cta_model import tasks as task_registry
from cta_model.atomic import fsync_dir, write_bytes_atomic
from cta_model.data import transforms as T
from cta_model.data.line_dataset import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    LineDataset,
    LocalOpener,
    Opener,
    generate_dataset,
    sha256_hex,
)
from cta_model.data.statistics import monitored_image_statistics, prediction_statistics
from cta_model.data.synthetic import CLASS_NAMES
from cta_model.errors import ConfigError, CtaError, DataError
from cta_model.losses import MultiTaskLoss, build_weighting
from cta_model.model_folder import (
    WEIGHTS,
    InputContract,
    file_sha256,
    save_model_folder,
    verify_checksums,
)
from cta_model.nn.models import ModelSpec, MultiTaskNet, build_model
from cta_model.train_config import (
    VAL_LOSS,
    DataConfig,
    TrainConfig,
    config_differences,
    load_train_config,
    resolve_overrides,
)

log = logging.getLogger("cta_model.train")

CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"
RESULT_FILE = "train_result.json"
LINEAGE_FILE = "lineage.json"
REFERENCE_STATS_FILE = "reference_stats.parquet"
CHECKPOINT_FORMAT = 1
_CHECKPOINT_RE = re.compile(r"^step-(\d{8})\.pt$")

OpenerFor = Callable[[str], Opener]

__all__ = [
    "Callback",
    "DistributedEnv",
    "EMATeacher",
    "ResumableDistributedSampler",
    "ShardSampler",
    "TrainCallback",
    "TrainResult",
    "Trainer",
    "distributed_session",
    "ensure_synthetic_dataset",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "main",
    "open_datasets",
    "reference_statistics",
    "save_checkpoint_atomic",
    "train",
    "validate",
]


# ================================================================== public types
class TrainCallback(Protocol):
    """Hooks called on rank 0 only (tracking, e.g. the MLflow callback of the train step)."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, step: int, logs: dict[str, float]) -> None: ...

    def on_epoch_end(
        self, epoch: int, train_logs: dict[str, float], val_metrics: dict[str, float]
    ) -> None: ...

    def on_train_end(self, result: TrainResult) -> None: ...


class Callback:
    """A TrainCallback doing nothing: subclass it and override the hooks you need."""

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, step: int, logs: dict[str, float]) -> None:
        pass

    def on_epoch_end(
        self, epoch: int, train_logs: dict[str, float], val_metrics: dict[str, float]
    ) -> None:
        pass

    def on_train_end(self, result: TrainResult) -> None:
        pass


@dataclass
class TrainResult:
    model_dir: Path
    best_metrics: dict[str, float]  # "<task>.<metric>" and "val_loss" at the best epoch
    best_epoch: int  # 1-based
    history: list[dict[str, Any]]  # one entry per epoch: epoch, step, train, val, loss_weights
    steps: int  # optimizer steps
    images_per_s: float  # training throughput over all processes (this process's run time)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_dir"] = str(self.model_dir)
        return out


# ================================================================== distributed
@dataclass(frozen=True)
class DistributedEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DistributedEnv:
        """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them: one process."""
        environ = os.environ if environ is None else environ
        if "RANK" not in environ or "WORLD_SIZE" not in environ:
            return cls()
        return cls(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
        )


def _device_for(env: DistributedEnv) -> torch.device:
    # Never assume cuda:0: each process drives the GPU of its LOCAL_RANK.
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


@contextlib.contextmanager
def distributed_session() -> Iterator[DistributedEnv]:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) for the block's duration.

    A group that is already initialised is used and left alone.
    """
    env = DistributedEnv.from_environ()
    owned = False
    if env.world_size > 1 and not dist.is_initialized():
        device = _device_for(env)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        owned = True
    if dist.is_initialized():
        env = DistributedEnv(dist.get_rank(), dist.get_world_size(), env.local_rank)
    try:
        yield env
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _broadcast_object(value: Any) -> Any:
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather_object(value: Any) -> list[Any]:
    if not _distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    if not _distributed():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# ================================================================== samplers
class ResumableDistributedSampler(Sampler[int]):
    """DistributedSampler semantics (seed + epoch permutation, padded to equal shards, rank r
    takes every world_size-th index from r) plus a start position within the rank's shard, so
    a run resumed mid-epoch sees exactly the samples it had not seen yet."""

    def __init__(
        self, dataset_len: int, world_size: int = 1, rank: int = 0, seed: int = 0, shuffle=True
    ) -> None:
        if dataset_len < 1:
            raise ValueError("dataset_len must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.dataset_len = dataset_len
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.num_samples = math.ceil(dataset_len / world_size)  # per rank, after padding
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index {start_index} outside 0..{self.num_samples}")
        self.epoch = epoch
        self.start_index = start_index

    def shard(self, epoch: int | None = None) -> list[int]:
        """This rank's whole shard of `epoch` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.num_samples * self.world_size
        while len(order) < total:  # pad by repeating from the start
            order += order[: total - len(order)]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.start_index :])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r gets indices r, r + W, r + 2W, ..."""

    def __init__(self, dataset_len: int, world_size: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, dataset_len, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _EpochTagged(Sampler[tuple[int, int]]):
    """Yields (epoch, index) so a sample's random stream travels with it into any worker."""

    def __init__(self, sampler: ResumableDistributedSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


# ================================================================== datasets
class _Subset:
    """Rows of a raw dataset by index (quarantined samples left out)."""

    def __init__(self, base: Any, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.base[self.indices[index]]


class _TrainView:
    """Raw samples -> tensors -> augmentation with the stream of (seed, epoch, index)."""

    def __init__(self, base: Any, transform: T.Compose, seed: int) -> None:
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        return self.transform(self.base[index], T.sample_generator(self.seed, epoch, index))


class _EvalView:
    def __init__(self, base: Any, transform: T.Compose) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.transform(self.base[index], None)


class _ResizeTo:
    """Resize to the model's input size only where a sample differs from it."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size
        self.resize = T.Resize(size)

    def __call__(self, sample, generator=None):
        if tuple(sample["image"].shape[-2:]) == self.size:
            return sample
        return self.resize(sample, generator)


@dataclass
class DataBundle:
    train: Any  # raw train samples (sample dicts of numpy arrays)
    val: Any
    class_names: tuple[str, ...]
    depth_is_disparity: bool
    lineage: dict[str, Any]


def synthetic_cache_root(data: DataConfig) -> Path:
    """`<cache_dir>/synthetic/<hash>` of the generator parameters, the inventory's bytes and
    the generator's version (its format version and source), so any change regenerates."""
    from cta_model.data import line_dataset, synthetic
    from cta_model.data.lines import DEFAULT_LINES_CONFIG

    assert data.synthetic is not None
    lines_path = Path(data.lines_config) if data.lines_config else DEFAULT_LINES_CONFIG
    try:
        lines_sha = sha256_hex(lines_path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"data.lines_config: cannot read {lines_path}: {exc}") from None
    generator_sha = sha256_hex(
        Path(synthetic.__file__).read_bytes() + Path(line_dataset.__file__).read_bytes()
    )
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


def _read_dataset_ref(path: str) -> dict[str, Any]:
    try:
        ref = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"data.dataset_ref: cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"data.dataset_ref: {path} is not valid JSON: {exc}") from None
    if not isinstance(ref, dict) or not isinstance(ref.get("uri"), str) or not ref["uri"]:
        raise ConfigError(f"data.dataset_ref: {path} has no 'uri' string")
    quarantine = ref.get("quarantine", [])
    if not isinstance(quarantine, list) or not all(isinstance(q, str) for q in quarantine):
        raise ConfigError(f"data.dataset_ref: {path}: 'quarantine' must be a list of sample ids")
    return ref


def open_datasets(
    config: TrainConfig, opener_for: OpenerFor | None = None, *, generate: bool = True
) -> DataBundle:
    """The raw train and val datasets of `config.data` and their lineage."""
    data = config.data
    tasks = config.model.tasks
    if data.format != "line":
        return _open_research_format(config)
    ref: dict[str, Any] | None = None
    quarantine: set[str] = set()
    if data.synthetic is not None:
        root = ensure_synthetic_dataset(data) if generate else synthetic_cache_root(data)
        uri = str(root.resolve())
    elif data.dataset_ref is not None:
        ref = _read_dataset_ref(data.dataset_ref)
        uri = ref["uri"]
        quarantine = set(ref.get("quarantine", []))
    else:
        assert data.path is not None
        uri = data.path
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
    missing = [t for t in tasks if t not in ("semseg", "height", "normals")]
    if missing:
        raise ConfigError(f"model.tasks: a line dataset has no {', '.join(missing)} labels")

    def open_split(split: str) -> tuple[Any, int]:
        dataset = LineDataset(uri, data.lines_config, split=split, opener=opener)
        keep = [i for i, sid in enumerate(dataset.sample_ids) if sid not in quarantine]
        skipped = len(dataset) - len(keep)
        if not keep:
            raise DataError(f"{uri}: split {split!r} has no samples outside the quarantine")
        return (dataset if not skipped else _Subset(dataset, keep)), skipped

    train_set, train_skipped = open_split(data.train_split)
    val_set, val_skipped = open_split(data.val_split)
    base = train_set.base if isinstance(train_set, _Subset) else train_set
    generator_meta = json.loads(base.metadata.get("cta.generator", "{}") or "{}")
    class_names = tuple(generator_meta.get("class_names") or CLASS_NAMES)
    manifest_sha = ref.get("manifest_sha256") if ref else None
    actual_sha = sha256_hex(opener(MANIFEST_NAME))
    if manifest_sha and manifest_sha != actual_sha:
        raise DataError(
            f"{uri}/{MANIFEST_NAME}: sha256 {actual_sha} differs from the validated "
            f"manifest_sha256 {manifest_sha} in {data.dataset_ref}; validate the data again"
        )
    lineage = {
        "format": "line",
        "uri": uri,
        "manifest_sha256": actual_sha,
        "dvc_rev": ref.get("dvc_rev") if ref else None,
        "dataset_ref": data.dataset_ref,
        "quarantine_listed": len(quarantine),
        "quarantine_skipped": {"train": train_skipped, "val": val_skipped},
        "splits": {"train": data.train_split, "val": data.val_split},
        "sizes": {"train": len(train_set), "val": len(val_set)},
    }
    return DataBundle(train_set, val_set, class_names, False, lineage)


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


def build_transforms(
    config: TrainConfig, contract: InputContract, depth_is_disparity: bool = False
) -> tuple[T.Compose, T.Compose]:
    """(train, eval) transforms: tensors -> input size -> [scale-crop] -> [flip] -> normalise."""
    size = config.model.input_size
    augment = config.data.augment
    train_steps: list[Any] = [T.ToTensors(config.model.tasks), _ResizeTo(size)]
    if any(s != 1.0 for s in augment.scales):
        train_steps.append(
            T.RandomScaleCrop(augment.scales, size=size, depth_is_disparity=depth_is_disparity)
        )
    if augment.hflip:
        train_steps.append(T.RandomHorizontalFlip(0.5))
    normalize = T.Normalize(contract.mean, contract.std)
    train_steps.append(normalize)
    eval_steps = [T.ToTensors(config.model.tasks), _ResizeTo(size), normalize]
    return T.Compose(train_steps), T.Compose(eval_steps)


# ================================================================== checkpoints
def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def remove_checkpoint(path: Path) -> None:
    path.unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def save_checkpoint_atomic(path: Path, state: Mapping[str, Any]) -> None:
    """torch.save into a temp file of the same folder, flush + fsync, os.replace, fsync folder:
    a crash leaves the old file or the new one, never half of one under the final name.
    The sha256 sidecar is written first, so a checkpoint without a matching one is invalid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(dict(state), stream)
            stream.flush()
            os.fsync(stream.fileno())
        write_bytes_atomic(checksum_path(path), (file_sha256(temporary) + "\n").encode())
        os.replace(temporary, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


_REQUIRED_CHECKPOINT_KEYS = ("format", "config_hash", "model", "optimizer", "global_step")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with weights_only=True; DataError when the file is truncated, corrupt or foreign."""
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        raise DataError(f"{path}: no {sidecar.name}; the checkpoint was never completed")
    if file_sha256(path) != sidecar.read_text().strip():
        raise DataError(f"{path}: sha256 differs from {sidecar.name} (corrupt checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncation surfaces as zipfile / pickle / runtime errors
        raise DataError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED_CHECKPOINT_KEYS):
        raise DataError(f"{path}: not a cta training checkpoint")
    if state["format"] != CHECKPOINT_FORMAT:
        raise DataError(
            f"{path}: checkpoint format {state['format']}, expected {CHECKPOINT_FORMAT}"
        )
    return state


def load_latest_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint; unreadable newer ones are skipped with a warning."""
    candidates = list_checkpoints(folder)
    problems = []
    for _, path in reversed(candidates):
        try:
            state = load_checkpoint(path)
        except DataError as exc:
            message = f"{exc}; falling back to the previous checkpoint"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            log.warning(message)
            problems.append(str(exc))
            continue
        return path, state
    if candidates:
        raise DataError(
            f"{folder}: no readable checkpoint ({'; '.join(problems)}); "
            "start over with resume=False (--resume never)"
        )
    return None


# ================================================================== RNG state
def _rng_state(device: torch.device, loader_generator: torch.Generator) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "loader": loader_generator.get_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    return state


def _set_rng_state(
    state: Mapping[str, Any], device: torch.device, loader_generator: torch.Generator
) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _set_deterministic(mode: bool, *, warn_only: bool, compiling: bool = False) -> None:
    """torch.use_deterministic_algorithms, without importing inductor unless it is used:
    the public function imports torch._inductor (about 4 s per process) only to set the
    compiler's flag, which matters for torch.compile and nothing else."""
    if (
        compiling
        or torch.cuda.is_available()
        or not hasattr(torch._C, "_set_deterministic_algorithms")
    ):
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ================================================================== the pieces of a step
def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base LR after `step` optimizer steps (linear warmup, then cosine to 0
    at `total_steps` or constant)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class _TrainStep(nn.Module):
    """Network + multitask loss in one module, so DDP also reduces the gradients of learned
    loss weights (uncertainty weighting) and sees every parameter in the graph."""

    def __init__(
        self, model: MultiTaskNet, loss: MultiTaskLoss, device_type: str, bf16: bool
    ) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.device_type = device_type
        self.bf16 = bf16

    def forward(
        self,
        images: torch.Tensor,
        targets: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(images)
        final = {t: v.float() for t, v in out.final.items()}
        initial = {t: v.float() for t, v in out.initial.items()}
        total, per_task = self.loss(final, initial, targets, present)
        # A zero that keeps every output, hence every parameter, in the graph: DDP runs with
        # find_unused_parameters=False, and an unsupervised initial head (deep_supervision
        # off) must still deliver its (zero) gradient to the all-reduce.
        anchor = sum(v.sum() for v in (*final.values(), *initial.values()))
        return total + 0.0 * anchor, per_task


class EMATeacher:
    """An exponential moving average of the model that labels the tasks a sample lacks."""

    def __init__(self, model: MultiTaskNet, decay: float, seg_confidence: float) -> None:
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.seg_confidence = seg_confidence

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        for mine, theirs in zip(self.model.parameters(), student.parameters(), strict=True):
            mine.lerp_(theirs.detach(), 1.0 - self.decay)
        for mine, theirs in zip(self.model.buffers(), student.buffers(), strict=True):
            mine.copy_(theirs)

    @torch.no_grad()
    def fill_missing(
        self,
        images: torch.Tensor,
        targets: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor],
        device_type: str,
        bf16: bool,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Pseudo-labels only where a sample's label is absent; present labels are untouched."""
        if all(bool(flags.all()) for flags in present.values()):
            return targets, present
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            predictions = self.model(images).final
        targets, present = dict(targets), dict(present)
        for task, flags in present.items():
            absent = ~flags
            if not bool(absent.any()):
                continue
            raw = predictions[task].float()
            if task_registry.get_task(task).label_channels == 0:
                confidence, ids = raw.softmax(dim=1).max(dim=1)
                pseudo = torch.where(confidence >= self.seg_confidence, ids, -1)
                mask = absent.view(-1, 1, 1)
            else:
                pseudo = raw
                mask = absent.view(-1, 1, 1, 1)
            targets[task] = torch.where(mask, pseudo.to(targets[task].dtype), targets[task])
            present[task] = torch.ones_like(flags)
        return targets, present

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state)


@dataclass
class _EpochAccumulator:
    """Sums over this rank's micro-batches of the running epoch (saved in checkpoints so a
    resumed epoch reports, and feeds DWA, the same means)."""

    loss_sum: float = 0.0
    micro_batches: int = 0
    task_sums: dict[str, float] = field(default_factory=dict)
    task_counts: dict[str, int] = field(default_factory=dict)
    grad_norm_sum: float = 0.0
    steps: int = 0

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _EpochAccumulator:
        return cls(**dict(state))


@dataclass
class _RunState:
    global_step: int = 0
    epoch: int = 0  # 0-based index of the running epoch
    steps_in_epoch: int = 0
    stopped_early: bool = False
    best_value: float | None = None
    best_epoch: int = 0  # 1-based; 0 = none yet
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    images_seen: int = 0
    train_time_s: float = 0.0


# ================================================================== the trainer
class Trainer:
    """Builds data, model, loss, optimizer and schedule from a TrainConfig and runs them.

    Construct inside `distributed_session()` (what `train` does) for multi-process runs.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        callbacks: Sequence[TrainCallback] = (),
        opener_for: OpenerFor | None = None,
    ) -> None:
        self.config = config
        self.env = (
            DistributedEnv(dist.get_rank(), dist.get_world_size(), _local_rank())
            if dist.is_initialized()
            else DistributedEnv()
        )
        self.device = _device_for(self.env)
        self.callbacks = list(callbacks) if self.env.is_main else []
        self.output = Path(config.output)
        self.checkpoint_dir = self.output / CHECKPOINT_DIR
        self.tasks = config.model.tasks
        # auto: bf16 only where the GPU has it; bf16 asked for explicitly is honoured on CUDA
        self.bf16 = config.use_bf16(self.device.type) and (
            config.precision == "bf16" or torch.cuda.is_bf16_supported()
        )
        if config.precision == "bf16" and not self.bf16:
            self._info("precision bf16: autocast applies on CUDA only; this run is fp32")
        if config.eval.reduction == "batch_mean" and self.env.world_size > 1:
            raise ConfigError("eval.reduction batch_mean needs one process (use pooled)")
        self.micro_batch = config.micro_batch_size(self.env.world_size)
        self.eval_batch = config.eval.batch_size or self.micro_batch
        self._setup_determinism()
        _seed_everything(config.seed)
        self._build_data(opener_for)
        self._build_model()
        self._build_optimization()
        self.state = _RunState()
        self.epoch_acc = _EpochAccumulator()
        self.best_state: dict[str, torch.Tensor] | None = None
        self._masked_tasks = tuple(config.debug.mask_tasks_by_rank.get(self.env.rank, ()))

    def _build_data(self, opener_for: OpenerFor | None) -> None:
        config = self.config
        # Rank 0 generates a synthetic dataset once; the others wait for it.
        if self.env.is_main:
            self.data = open_datasets(config, opener_for)
        _barrier()
        if not self.env.is_main:
            self.data = open_datasets(config, opener_for, generate=False)
        lineage = self.data.lineage
        if lineage.get("quarantine_listed"):
            skipped = lineage["quarantine_skipped"]
            self._info(
                "quarantine: skipped %d train and %d val samples (%d listed in %s)",
                skipped["train"],
                skipped["val"],
                lineage["quarantine_listed"],
                lineage["dataset_ref"],
            )
        self.contract = InputContract()
        train_tf, eval_tf = build_transforms(config, self.contract, self.data.depth_is_disparity)
        self.sampler = ResumableDistributedSampler(
            len(self.data.train), self.env.world_size, self.env.rank, config.seed, shuffle=True
        )
        self.loader_generator = torch.Generator().manual_seed(config.seed)
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(
            _TrainView(self.data.train, train_tf, config.seed),
            batch_size=self.micro_batch,
            sampler=_EpochTagged(self.sampler),
            collate_fn=T.collate,
            num_workers=config.data.num_workers,
            drop_last=True,
            generator=self.loader_generator,  # never touches the global torch RNG
            pin_memory=pin,
        )
        self.val_loader = DataLoader(
            _EvalView(self.data.val, eval_tf),
            batch_size=self.eval_batch,
            sampler=ShardSampler(len(self.data.val), self.env.world_size, self.env.rank),
            collate_fn=T.collate,
            num_workers=config.data.num_workers,
            pin_memory=pin,
        )
        self.steps_per_epoch = (self.sampler.num_samples // self.micro_batch) // (
            config.grad_accum_steps
        )
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"batch_size {config.batch_size}: the train split ({len(self.data.train)} "
                f"samples over {self.env.world_size} process(es)) is smaller than one step"
            )
        by_epochs = config.epochs * self.steps_per_epoch if config.epochs else None
        self.total_steps = min(s for s in (by_epochs, config.max_steps) if s is not None)
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

    def _build_model(self) -> None:
        config = self.config
        self.class_names = self.data.class_names
        num_classes = config.model.num_classes or (len(self.class_names) or None)
        if "semseg" in self.tasks and not num_classes:
            raise ConfigError("model.num_classes: the dataset names no classes; set it")
        if num_classes and self.class_names and num_classes < len(self.class_names):
            raise ConfigError(
                f"model.num_classes {num_classes} < the dataset's {len(self.class_names)} classes"
            )
        self.num_classes = num_classes
        m = config.model
        self.spec = ModelSpec(
            arch=m.arch,
            tasks=m.tasks,
            input_size=m.input_size,
            backbone=m.backbone,
            num_classes=num_classes,
            output_stride=m.output_stride,
            backbone_weights=m.backbone_weights,
            decoder_channels=m.decoder_channels,
            affinity_channels=m.affinity_channels,
            gamma=m.gamma,
            fusion_kernel_size=m.fusion_kernel_size,
            shared_fusion=m.shared_fusion,
            affinity_mode=m.affinity_mode,
            affinity_block_size=m.affinity_block_size,
            affinity_pool_factor=m.affinity_pool_factor,
        )
        self.model = build_model(self.spec)
        if m.init_from:
            self._load_initial_weights(m.init_from)
        self.model.to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _build_optimization(self) -> None:
        """Loss (with its weighting), EMA teacher, optimizer, LR schedule, DDP, compile."""
        config = self.config
        weighting_options: dict[str, Any] = {}
        if config.loss.weighting == "fixed":
            weighting_options["weights"] = config.loss.weights
        if config.loss.weighting == "dwa":
            weighting_options["temperature"] = config.loss.dwa_temperature
        weighting = build_weighting(config.loss.weighting, self.tasks, **weighting_options)
        self.loss = MultiTaskLoss(
            {t: task_registry.pixel_loss(t) for t in self.tasks},
            weighting,
            deep_supervision=config.loss.deep_supervision,
        ).to(self.device)
        self.val_weights = {t: float(config.loss.weights.get(t, 1.0)) for t in self.tasks}
        self.teacher = (
            EMATeacher(self.model, config.distill.ema_decay, config.distill.seg_confidence)
            if config.distill.enabled
            else None
        )
        self.step_module = _TrainStep(self.model, self.loss, self.device.type, self.bf16)
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(
                step, self.total_steps, config.schedule.warmup_steps, config.schedule.name
            ),
        )
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        forward: nn.Module = self.step_module
        if _distributed():
            self.ddp = nn.parallel.DistributedDataParallel(
                self.step_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False,  # masked losses keep every parameter in the graph
            )
            forward = self.ddp
        self.forward: Callable[..., Any] = torch.compile(forward) if config.compile else forward

    # ---- setup helpers ------------------------------------------------------------------
    def _info(self, message: str, *args: Any) -> None:
        if self.env.is_main:
            log.info(message, *args)

    def _setup_determinism(self) -> None:
        if not self.config.deterministic:
            return
        if self.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        # warn_only: an op without a deterministic kernel warns instead of stopping the run
        _set_deterministic(True, warn_only=True, compiling=self.config.compile)

    def _load_initial_weights(self, folder: str) -> None:
        from safetensors.torch import load_file

        verify_checksums(folder)
        state = load_file(Path(folder) / WEIGHTS)
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"model.init_from: {folder} does not fit model: {exc}") from None

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        loss_params = [p for p in self.loss.parameters() if p.requires_grad]
        if loss_params:  # learned loss weights: no weight decay pulling log-variances to 0
            groups.append({"params": loss_params, "weight_decay": 0.0})
        if o.name == "adam":
            return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay)
        if o.name == "adamw":
            return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
        return torch.optim.SGD(groups, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)

    @property
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.step_module.parameters() if p.requires_grad]

    # ---- batches ------------------------------------------------------------------------
    def _to_device(
        self, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        images = batch["image"].to(self.device, non_blocking=True)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = {t: batch[t].to(self.device, non_blocking=True) for t in self.tasks}
        present = {t: batch["present"][t].to(self.device, non_blocking=True) for t in self.tasks}
        return images, targets, present

    # ---- the loop -----------------------------------------------------------------------
    def fit(self, resume: bool | str = "auto") -> TrainResult:
        config = self.config
        self._start(resume)
        for callback in self.callbacks:
            callback.on_train_start(self)
        accum = config.grad_accum_steps
        while (
            not self.state.stopped_early
            and self.state.epoch < self.num_epochs
            and self.state.global_step < self.total_steps
        ):
            epoch = self.state.epoch
            start = self.state.steps_in_epoch * self.micro_batch * accum
            self.sampler.set_epoch(epoch, start_index=start)
            self.step_module.train()
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=self.state.steps_in_epoch,
                desc=f"epoch {epoch + 1}/{self.num_epochs}",
                unit="step",
                disable=not (self.env.is_main and config.progress and sys.stderr.isatty()),
                leave=False,
            )
            batches = iter(self.train_loader)
            while (
                self.state.steps_in_epoch < self.steps_per_epoch
                and self.state.global_step < self.total_steps
            ):
                logs = self._optimizer_step(batches)
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{logs['images_per_s']:.1f}")
                for callback in self.callbacks:
                    callback.on_step_end(self.state.global_step, logs)
                every = config.checkpoint.every_steps
                mid_epoch = self.state.steps_in_epoch < self.steps_per_epoch
                if every and self.state.global_step % every == 0 and mid_epoch:
                    self.save_checkpoint()
            bar.close()
            del batches
            self._end_epoch()
        return self._finish()

    def _optimizer_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, float]:
        accum = self.config.grad_accum_steps
        started = time.perf_counter()
        step_loss = 0.0
        step_tasks: dict[str, list[float]] = {t: [] for t in self.tasks}
        for micro in range(accum):
            batch = next(batches)
            images, targets, present = self._to_device(batch)
            for task in self._masked_tasks:  # debug hook: this rank "has no labels" for task
                present[task] = torch.zeros_like(present[task])
            if self.teacher is not None:
                targets, present = self.teacher.fill_missing(
                    images, targets, present, self.device.type, self.bf16
                )
            sync = micro == accum - 1
            no_sync = self.ddp.no_sync() if (self.ddp is not None and not sync) else None
            with no_sync or contextlib.nullcontext():
                loss, per_task = self.forward(images, targets, present)
                (loss / accum).backward()
            value = float(loss.detach())
            step_loss += value / accum
            acc = self.epoch_acc
            acc.loss_sum += value
            acc.micro_batches += 1
            for task in self.tasks:
                if bool(present[task].any()):
                    acc.task_sums[task] = acc.task_sums.get(task, 0.0) + per_task[task]
                    acc.task_counts[task] = acc.task_counts.get(task, 0) + 1
                    step_tasks[task].append(per_task[task])
        clip = self.config.optim.grad_clip
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters, clip or float("inf"))
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.teacher is not None:
            self.teacher.update(self.model)
        elapsed = time.perf_counter() - started
        self.state.global_step += 1
        self.state.steps_in_epoch += 1
        self.state.images_seen += self.config.batch_size
        self.state.train_time_s += elapsed
        self.epoch_acc.grad_norm_sum += grad_norm
        self.epoch_acc.steps += 1
        logs = {
            "epoch": float(self.state.epoch + 1),
            "loss": step_loss,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "grad_norm": grad_norm,
            "images_per_s": self.config.batch_size / elapsed if elapsed > 0 else 0.0,
        }
        for task, values in step_tasks.items():
            if values:
                logs[f"loss_{task}"] = sum(values) / len(values)
        return logs

    def _end_epoch(self) -> None:
        acc = self.epoch_acc
        # Means over all ranks' micro-batches, identical on every rank (DWA must agree).
        sums = [acc.loss_sum, float(acc.micro_batches), acc.grad_norm_sum, float(acc.steps)]
        for task in self.tasks:
            sums += [acc.task_sums.get(task, 0.0), float(acc.task_counts.get(task, 0))]
        reduced = _all_reduce_sum(sums, self.device)
        train_logs: dict[str, float] = {
            "loss": reduced[0] / max(reduced[1], 1.0),
            "grad_norm": reduced[2] / max(reduced[3], 1.0),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        mean_losses: dict[str, float] = {}
        for i, task in enumerate(self.tasks):
            total, count = reduced[4 + 2 * i], reduced[5 + 2 * i]
            if count > 0:
                mean_losses[task] = total / count
                train_logs[f"loss_{task}"] = total / count
        self.loss.weighting.epoch_end(mean_losses)
        val_metrics = self.validate()
        epoch_number = self.state.epoch + 1
        improved = self._update_best(val_metrics, epoch_number)
        patience = self.config.early_stopping.patience
        if patience is not None and not improved:
            self.state.bad_epochs += 1
            if self.state.bad_epochs >= patience:
                self.state.stopped_early = True
                self._info(
                    "early stopping after epoch %d: %s did not improve for %d epochs",
                    epoch_number,
                    self.config.early_stopping.metric,
                    patience,
                )
        entry = {
            "epoch": epoch_number,
            "step": self.state.global_step,
            "train": train_logs,
            "val": val_metrics,
            "loss_weights": self.loss.weighting.weights(),
            "improved": improved,
        }
        self.state.history.append(entry)
        metric = self.config.early_stopping.metric
        selection = (
            "" if metric == VAL_LOSS else f", {metric} {val_metrics.get(metric, math.nan):.4f}"
        )
        self._info(
            "epoch %d/%d step %d: train loss %.4f, val_loss %.4f%s%s",
            epoch_number,
            self.num_epochs,
            self.state.global_step,
            train_logs["loss"],
            val_metrics[VAL_LOSS],
            selection,
            " (best)" if improved else "",
        )
        self.state.epoch += 1
        self.state.steps_in_epoch = 0
        self.epoch_acc = _EpochAccumulator()
        self.save_checkpoint()
        for callback in self.callbacks:
            callback.on_epoch_end(epoch_number, train_logs, val_metrics)

    def _update_best(self, metrics: Mapping[str, float], epoch_number: int) -> bool:
        name = self.config.early_stopping.metric
        value = float(metrics.get(name, math.nan))
        if not math.isfinite(value):
            return False
        best = self.state.best_value
        delta = self.config.early_stopping.min_delta
        higher = self.config.metric_direction(name) == "higher"
        if best is not None and not (value > best + delta if higher else value < best - delta):
            return False
        self.state.best_value = value
        self.state.best_epoch = epoch_number
        self.state.best_metrics = dict(metrics)
        self.state.bad_epochs = 0
        if self.env.is_main:
            self.best_state = {
                k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
            }
        return True

    # ---- validation -----------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Metrics on `val_split`: `<task>.<metric>` (pooled over all ranks) and `val_loss`
        (the pixel-pooled loss of final + initial predictions with the config's fixed
        weights, so epochs compare under any weighting)."""
        was_training = self.model.training
        self.model.eval()
        meters = task_registry.make_meters(
            self.tasks,
            num_classes=self.num_classes,
            miou_rule=self.config.eval.miou_rule,
            reduction=self.config.eval.reduction,
        )
        deep = self.config.loss.deep_supervision
        sums: dict[str, list[float]] = {t: [0.0, 0.0, 0.0, 0.0] for t in self.tasks}
        for batch in self.val_loader:
            images, targets, present = self._to_device(batch)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = self.model(images)
            for task in self.tasks:
                pred = out.final[task].float()
                meters[task].update(pred, targets[task], present[task].bool())
                loss_fn = task_registry.pixel_loss(task)
                loss, count = loss_fn(pred, targets[task], present[task])
                sums[task][0] += float(loss) * float(count)
                sums[task][1] += float(count)
                if deep and task in out.initial:
                    loss, count = loss_fn(out.initial[task].float(), targets[task], present[task])
                    sums[task][2] += float(loss) * float(count)
                    sums[task][3] += float(count)
        for meter in meters.values():
            meter.reduce_distributed()
        flat = [value for task in self.tasks for value in sums[task]]
        reduced = _all_reduce_sum(flat, self.device)
        val_loss = 0.0
        for i, task in enumerate(self.tasks):
            final_sum, final_n, initial_sum, initial_n = reduced[4 * i : 4 * i + 4]
            task_loss = (final_sum / final_n if final_n else 0.0) + (
                initial_sum / initial_n if initial_n else 0.0
            )
            val_loss += self.val_weights[task] * task_loss
        metrics = task_registry.flatten_metrics({t: m.compute() for t, m in meters.items()})
        metrics[VAL_LOSS] = val_loss
        self.model.train(was_training)
        return metrics

    # ---- checkpoints ----------------------------------------------------------------------
    def _checkpoint_state(self) -> dict[str, Any]:
        s = self.state
        return {
            "format": CHECKPOINT_FORMAT,
            "config_hash": self.config.trajectory_hash(),
            "config": json.dumps(self.config.trajectory_dict(), sort_keys=True),
            "world_size": self.env.world_size,
            "global_step": s.global_step,
            "epoch": s.epoch,
            "steps_in_epoch": s.steps_in_epoch,
            "sampler": {
                "epoch": s.epoch,
                "start_index": s.steps_in_epoch * self.micro_batch * self.config.grad_accum_steps,
            },
            "stopped_early": s.stopped_early,
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": None,  # bf16 needs no loss scaling
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "epoch_acc": self.epoch_acc.to_state(),
            "best": {
                "value": s.best_value,
                "epoch": s.best_epoch,
                "metrics": s.best_metrics,
                "bad_epochs": s.bad_epochs,
                "model": self.best_state,
            },
            "history": s.history,
            "images_seen": s.images_seen,
            "train_time_s": s.train_time_s,
        }

    def save_checkpoint(self) -> Path:
        """Every rank takes part (RNG states are gathered); rank 0 writes and prunes."""
        rng = _all_gather_object(_rng_state(self.device, self.loader_generator))
        path = checkpoint_path(self.checkpoint_dir, self.state.global_step)
        if self.env.is_main:
            state = self._checkpoint_state()
            state["rng"] = rng
            save_checkpoint_atomic(path, state)
            for _, old in list_checkpoints(self.checkpoint_dir)[
                : -self.config.checkpoint.keep_last
            ]:
                remove_checkpoint(old)
        _barrier()
        return path

    def _start(self, resume: bool | str) -> None:
        chosen: str | None = None
        if self.env.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            chosen = self._choose_checkpoint(resume)
        chosen = _broadcast_object(chosen)
        if chosen is not None:
            self._restore(load_checkpoint(Path(chosen)), Path(chosen))
        else:
            self._info(
                "training %s on %d process(es): %d steps (%d epochs of %d), micro-batch %d",
                self.spec.arch,
                self.env.world_size,
                self.total_steps,
                self.num_epochs,
                self.steps_per_epoch,
                self.micro_batch,
            )
        if self.env.is_main:  # only once the checkpoint (if any) proved it is the same run
            config_text = yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False)
            write_bytes_atomic(self.output / "config.yaml", config_text.encode())

    def _choose_checkpoint(self, resume: bool | str) -> str | None:
        if resume is False or resume == "never":
            stale = list_checkpoints(self.checkpoint_dir)
            if stale:
                log.warning("resume=False: removing %d checkpoints of an earlier run", len(stale))
                for _, path in stale:
                    remove_checkpoint(path)
            return None
        if isinstance(resume, str) and resume not in ("auto", "always"):
            path = Path(resume)
            load_checkpoint(path)  # fail here, clearly, if it is unreadable
            return str(path)
        found = load_latest_checkpoint(self.checkpoint_dir)
        if found is None:
            if resume is True or resume == "always":
                raise DataError(f"{self.checkpoint_dir}: no checkpoint to resume from")
            return None
        return str(found[0])

    def _restore(self, state: Mapping[str, Any], path: Path) -> None:
        if state["config_hash"] != self.config.trajectory_hash():
            differences = config_differences(
                json.loads(state["config"]), self.config.trajectory_dict()
            )
            raise ConfigError(
                f"{path}: was written with a different config; resuming would not continue "
                f"the same run. Differences (checkpoint -> now): {'; '.join(differences)}. "
                "Use another output folder or resume=False (--resume never)."
            )
        if state["world_size"] != self.env.world_size:
            log.warning(
                "%s: written by %d process(es), resumed on %d: the data order after the "
                "resume point differs from an uninterrupted run",
                path,
                state["world_size"],
                self.env.world_size,
            )
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.teacher is not None and state.get("teacher") is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.epoch_acc = _EpochAccumulator.from_state(state["epoch_acc"])
        best = state["best"]
        self.state = _RunState(
            global_step=state["global_step"],
            epoch=state["epoch"],
            steps_in_epoch=state["steps_in_epoch"],
            stopped_early=state["stopped_early"],
            best_value=best["value"],
            best_epoch=best["epoch"],
            best_metrics=dict(best["metrics"]),
            bad_epochs=best["bad_epochs"],
            history=list(state["history"]),
            images_seen=state["images_seen"],
            train_time_s=state["train_time_s"],
        )
        self.best_state = best["model"] if self.env.is_main else None
        rng_states = state["rng"]
        rank_state = rng_states[self.env.rank] if self.env.rank < len(rng_states) else rng_states[0]
        _set_rng_state(rank_state, self.device, self.loader_generator)
        self._info(
            "resumed from %s: step %d, epoch %d, %d steps into it",
            path,
            self.state.global_step,
            self.state.epoch + 1,
            self.state.steps_in_epoch,
        )

    # ---- the end ----------------------------------------------------------------------------
    def _finish(self) -> TrainResult:
        s = self.state
        images_per_s = s.images_seen / s.train_time_s if s.train_time_s > 0 else 0.0
        best_metrics = s.best_metrics or (s.history[-1]["val"] if s.history else {})
        best_epoch = s.best_epoch or (s.history[-1]["epoch"] if s.history else 0)
        result = TrainResult(
            model_dir=self.output / MODEL_DIR,
            best_metrics=dict(best_metrics),
            best_epoch=best_epoch,
            history=list(s.history),
            steps=s.global_step,
            images_per_s=images_per_s,
        )
        if self.config.debug.dump_param_hashes:
            self._dump_param_hash()
        if self.env.is_main:
            if self.best_state is not None:
                self.model.load_state_dict(self.best_state)
            self._write_model_folder()
            write_bytes_atomic(
                self.output / RESULT_FILE,
                json.dumps(result.to_dict(), indent=2, allow_nan=True).encode(),
            )
            self._info(
                "done: %d steps, best epoch %d (%s = %.4f), %.1f images/s, model in %s",
                s.global_step,
                best_epoch,
                self.config.early_stopping.metric,
                best_metrics.get(self.config.early_stopping.metric, math.nan),
                images_per_s,
                result.model_dir,
            )
            for callback in self.callbacks:
                callback.on_train_end(result)
        _barrier()  # every rank returns once the model folder exists
        return result

    def _dump_param_hash(self) -> None:
        digest = hashlib.sha256()
        for name, parameter in self.step_module.named_parameters():
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
        folder = self.output / "debug"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"params-rank{self.env.rank}.sha256").write_text(digest.hexdigest() + "\n")

    def lineage(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(mode="json"),
            "dataset": self.data.lineage,
            "git_commit": _git_commit(),
            "torch_version": torch.__version__,
            "world_size": self.env.world_size,
            "steps": self.state.global_step,
            "best_epoch": self.state.best_epoch,
            "selection_metric": self.config.early_stopping.metric,
        }

    def _write_model_folder(self) -> Path:
        """Save, build the Predictor from the saved folder, compute the reference statistics
        with it, then write the final folder with everything (SHA256SUMS covers all files)."""
        lineage = json.dumps(self.lineage(), indent=2, allow_nan=True).encode()
        model = self.model
        with tempfile.TemporaryDirectory(prefix=".model-staging.", dir=self.output) as staging:
            staged = save_model_folder(
                model,
                Path(staging) / MODEL_DIR,
                class_names=self.class_names,
                input_contract=self.contract,
                extra_files={LINEAGE_FILE: lineage},
            )
            from cta_model.inference import Predictor

            predictor = Predictor.from_folder(staged, device=self.device)
            stats = reference_statistics(
                predictor, self.data.val, self.class_names, self.eval_batch
            )
        buffer = io.BytesIO()
        pq.write_table(stats, buffer)
        return save_model_folder(
            model,
            self.output / MODEL_DIR,
            class_names=self.class_names,
            input_contract=self.contract,
            extra_files={LINEAGE_FILE: lineage, REFERENCE_STATS_FILE: buffer.getvalue()},
            overwrite=True,
        )


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit or None


# ================================================================== reference statistics
def reference_statistics(
    predictor: Any, dataset: Any, class_names: Sequence[str], batch_size: int = 8
) -> pa.Table:
    """Per image of `dataset`: identity, image statistics and the Predictor's prediction
    statistics (`pred_frac_<class>`, `pred_height_mean_mm`/`_std_mm`, `pred_depth_mean`,
    `pred_normals_z_mean`): the baseline that monitoring compares served images with."""
    rows: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        if not pending:
            return
        images = np.stack([sample["image"] for sample in pending])
        predictions = predictor.predict(images)
        for i, sample in enumerate(pending):
            rows.append(
                {
                    "sample_id": str(sample.get("sample_id", "")),
                    "line_id": str(sample.get("line_id", "")),
                    **monitored_image_statistics(sample["image"]),
                    **prediction_statistics(
                        {task: values[i] for task, values in predictions.items()}, class_names
                    ),
                }
            )
        pending.clear()

    for index in range(len(dataset)):
        sample = dataset[index]
        if pending and (
            len(pending) >= batch_size or pending[0]["image"].shape != sample["image"].shape
        ):
            flush()
        pending.append(sample)
    flush()
    return pa.Table.from_pylist(rows)


# ================================================================== entry points
def train(
    config: TrainConfig,
    *,
    callbacks: Sequence[TrainCallback] = (),
    resume: bool | str = "auto",
    opener_for: OpenerFor | None = None,
) -> TrainResult:
    """Train one model; under torchrun every process calls this with the same config.

    resume: "auto" (continue from the latest readable checkpoint in <output>/checkpoints when
    there is one; its config must match), True / "always" (must resume), False / "never"
    (start over, deleting old checkpoints) or the path of a checkpoint file.
    opener_for: maps a dataset URI to an opener (components.storage.opener_for for s3://).
    """
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with distributed_session():
            trainer = Trainer(config, callbacks=callbacks, opener_for=opener_for)
            return trainer.fit(resume)
    finally:
        _set_deterministic(previous, warn_only=previous_warn, compiling=config.compile)


def validate(config: TrainConfig, *, opener_for: OpenerFor | None = None) -> dict[str, float]:
    """Validation metrics of the weights in `config.model.init_from` (no training)."""
    with distributed_session():
        return Trainer(config, opener_for=opener_for).validate()


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. optim.lr=1e-4)")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cta_model.train", description="Train (or validate) one CTA model."
    )
    parser.add_argument("--config", required=True, help="train config YAML")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override"
    )
    parser.add_argument("--resume", default="auto", help="auto | always | never | PATH")
    parser.add_argument(
        "--validate-only",
        action="store_true",
        help="evaluate model.init_from on the val split and print the metrics as JSON",
    )
    parser.add_argument("--metrics-out", default=None, help="with --validate-only: JSON file")
    parser.add_argument(
        "--no-env",
        action="store_true",
        help="ignore CTA_* environment overrides (the config file is already resolved)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        overrides = resolve_overrides(_parse_set(args.set), {} if args.no_env else os.environ)
        config = load_train_config(args.config, overrides)
        rank = DistributedEnv.from_environ().rank
        if args.validate_only:
            metrics = validate(config)
            text = json.dumps(metrics, indent=2, sort_keys=True, allow_nan=True)
            if rank == 0:
                if args.metrics_out:
                    write_bytes_atomic(Path(args.metrics_out), text.encode())
                print(text)
            return 0
        resume: bool | str = args.resume
        result = train(config, resume=resume)
        if rank == 0:
            print(json.dumps(result.to_dict()["best_metrics"], indent=2, allow_nan=True))
        return 0
    except CtaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
