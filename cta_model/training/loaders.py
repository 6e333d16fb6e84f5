"""From raw samples to batches: transforms, samplers and the train / val DataLoaders.

* train: `ResumableDistributedSampler` (seeded per epoch, padded like DistributedSampler,
  restartable at a sample position); each sample goes through the registry transforms with the
  random stream of (seed, epoch, index), so augmentations do not depend on workers, order or
  resumption;
* val: `ShardSampler` (rank r gets r::world_size, no padding, no duplicates), so pooled metrics
  merged over ranks are the same on 1 and N processes.

With ``data.tiling`` each image stands for ``tiles_per_image`` training tiles (a different
random tile each time, defects oversampled) and ``val_tiles_per_image`` validation tiles drawn
once from the stream of (seed, index), so validation sees the same tiles every epoch. With
``data.anomalies`` synthetic anomalies are pasted into the raw training sample first. With
``data.memory_cache_mb`` decoded samples are kept in memory (`DecodedSampleCache`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from cta_model.data import transforms as T
from cta_model.model_folder import InputContract
from cta_model.train_config import TrainConfig
from cta_model.training.datasets import ByteBudget, DecodedSampleCache
from cta_model.training.distributed import DistributedEnv


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


class EpochTagged(Sampler[tuple[int, int]]):
    """Yields (epoch, index) so a sample's random stream travels with it into any worker."""

    def __init__(self, sampler: ResumableDistributedSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class Repeated:
    """Each sample of ``base`` ``times`` times in a row: index i -> base[i // times]."""

    def __init__(self, base: Any, times: int) -> None:
        self.base, self.times = base, times

    def __len__(self) -> int:
        return len(self.base) * self.times

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.base[index // self.times]


def tiled(dataset: Any, times: int) -> Any:
    return dataset if times == 1 else Repeated(dataset, times)


class DefectBalancedTiles:
    """The training tiles of an epoch, planned so that ``defect_fraction`` of them are cut
    around a defect pixel whatever share of the images shows one: ``times`` tiles per image
    in all, the defect tiles spread round-robin over the defective images, the rest over every
    image. (Deciding per image would give defect_fraction x the defective share: with half the
    images defective, a quarter of the tiles.) Each entry tells RandomTile which kind to cut."""

    def __init__(
        self, base: Any, times: int, defective: Sequence[int], defect_fraction: float
    ) -> None:
        total = len(base) * times
        n_defect = round(defect_fraction * total)
        self.base = base
        self.plan = [(defective[k % len(defective)], True) for k in range(n_defect)] + [
            (k % len(base), False) for k in range(total - n_defect)
        ]

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict[str, Any]:
        base_index, on_defect = self.plan[index]
        return {**self.base[base_index], T.TILE_ON_DEFECT: on_defect}


class TrainView:
    """Raw samples -> tensors -> augmentation with the stream of (seed, epoch, index)."""

    def __init__(self, base: Any, transform: T.Compose, seed: int) -> None:
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        return self.transform(self.base[index], T.sample_generator(self.seed, epoch, index))


class EvalView:
    """Raw samples -> tensors; with a seed, random transforms (validation tiles) draw from the
    stream of (seed, index), the same every epoch."""

    def __init__(self, base: Any, transform: T.Compose, seed: int | None = None) -> None:
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = None if self.seed is None else T.sample_generator(self.seed, 0, index)
        return self.transform(self.base[index], generator)


class ResizeTo:
    """Resize to the model's input size only where a sample differs from it."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size
        self.resize = T.Resize(size)

    def __call__(self, sample, generator=None):
        if tuple(sample["image"].shape[-2:]) == self.size:
            return sample
        return self.resize(sample, generator)


def build_transforms(
    config: TrainConfig,
    contract: InputContract,
    depth_is_disparity: bool = False,
    class_task: str | None = None,
    reject_classes: tuple[int, ...] = (),
) -> tuple[T.Compose, T.Compose]:
    """(train, eval) transforms: [anomalies] -> tensors -> input size (resize, or a tile at the
    image's pitch) -> [scale-crop] -> [flip] -> normalise."""
    size = config.model.input_size
    augment = config.data.augment
    tiling = config.data.tiling
    to_size: Any = ResizeTo(size)
    eval_size: Any = to_size
    if tiling is not None:
        to_size = T.RandomTile(size, class_task, reject_classes, tiling.defect_fraction)
        eval_size = T.RandomTile(size, class_task, reject_classes, tiling.defect_fraction)
    train_steps: list[Any] = []
    anomalies = config.data.anomalies
    if anomalies is not None and class_task is not None:
        class_id = anomalies.class_id if anomalies.class_id is not None else reject_classes[0]
        train_steps.append(
            T.PasteAnomalies(anomalies, class_task, class_id, anomalies.region_classes)
        )
    train_steps += [T.ToTensors(config.model.tasks), to_size]
    if any(s != 1.0 for s in augment.scales):
        train_steps.append(
            T.RandomScaleCrop(augment.scales, size=size, depth_is_disparity=depth_is_disparity)
        )
    if augment.hflip:
        train_steps.append(T.RandomHorizontalFlip(0.5))
    normalize = T.Normalize(contract.mean, contract.std)
    train_steps.append(normalize)
    eval_steps = [T.ToTensors(config.model.tasks), eval_size, normalize]
    return T.Compose(train_steps), T.Compose(eval_steps)


@dataclass
class Loaders:
    sampler: ResumableDistributedSampler  # the train sampler; set_epoch before each epoch
    generator: torch.Generator  # the train loader's own RNG (saved in checkpoints)
    train: DataLoader
    val: DataLoader


def build_loaders(
    config: TrainConfig,
    env: DistributedEnv,
    train_set: Any,
    val_set: Any,
    transforms: tuple[T.Compose, T.Compose],
    *,
    defective: Sequence[int] = (),
    micro_batch: int,
    eval_batch: int,
    pin_memory: bool,
) -> Loaders:
    """This rank's train loader (micro-batches, last short one dropped) and val loader.
    ``defective``: indices of training samples with a reject-class pixel (the tile plan)."""
    train_tf, eval_tf = transforms
    tiling = config.data.tiling
    if config.data.memory_cache_mb:
        budget = ByteBudget(config.data.memory_cache_mb * 2**20)
        train_set = DecodedSampleCache(train_set, budget)
        val_set = DecodedSampleCache(val_set, budget)
    if tiling is not None and defective:
        train_set = DefectBalancedTiles(
            train_set, tiling.tiles_per_image, defective, tiling.defect_fraction
        )
    elif tiling is not None:  # no census (other formats): RandomTile decides per image
        train_set = tiled(train_set, tiling.tiles_per_image)
    if tiling is not None:
        val_set = tiled(val_set, tiling.val_tiles_per_image)
    sampler = ResumableDistributedSampler(
        len(train_set), env.world_size, env.rank, config.seed, shuffle=True
    )
    generator = torch.Generator().manual_seed(config.seed)
    train = DataLoader(
        TrainView(train_set, train_tf, config.seed),
        batch_size=micro_batch,
        sampler=EpochTagged(sampler),
        collate_fn=T.collate,
        num_workers=config.data.num_workers,
        drop_last=True,
        generator=generator,  # never touches the global torch RNG
        pin_memory=pin_memory,
    )
    val = DataLoader(
        EvalView(val_set, eval_tf, None if tiling is None else config.seed),
        batch_size=eval_batch,
        sampler=ShardSampler(len(val_set), env.world_size, env.rank),
        collate_fn=T.collate,
        num_workers=config.data.num_workers,
        pin_memory=pin_memory,
    )
    return Loaders(sampler, generator, train, val)


def batch_to_device(
    batch: Mapping[str, Any],
    tasks: tuple[str, ...],
    device: torch.device,
    channels_last: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(images, targets, presence flags) of a collated batch on `device`."""
    images = batch["image"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = {t: batch[t].to(device, non_blocking=True) for t in tasks}
    present = {t: batch["present"][t].to(device, non_blocking=True) for t in tasks}
    return images, targets, present
