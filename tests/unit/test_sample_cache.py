"""`data.memory_cache_mb`: decoded samples kept in memory give the very batches that decoding
every time gives, epoch after epoch, with tiles, flips, scale-crops and pasted anomalies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cta_model.data.lines import load_lines_config
from cta_model.data.synthetic_dataset import generate_dataset
from cta_model.train_config import validate_train_config
from cta_model.training.datasets import ByteBudget, DecodedSampleCache
from cta_model.training.trainer import Trainer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache") / "ds"
    return generate_dataset(
        root,
        load_lines_config(),
        n_lines=2,
        samples_per_line=8,
        height=48,
        width=48,
        seed=5,
        progress=False,
    )


def _batches(root: Path, output: Path, memory_cache_mb: int) -> list[dict]:
    config = validate_train_config(
        {
            "model": {
                "arch": "hps",
                "backbone": "resnet18",
                "tasks": ["semseg", "height", "normals"],
                "input_size": [16, 16],
                "decoder_channels": 8,
            },
            "data": {
                "path": str(root),
                "tiling": {"tiles_per_image": 3, "val_tiles_per_image": 2},
                "anomalies": {"probability": 0.7},
                "augment": {"hflip": True, "scales": [1.0, 1.25]},
                "memory_cache_mb": memory_cache_mb,
            },
            "epochs": 2,
            "batch_size": 4,
            "progress": False,
            "output": str(output),
        },
        "test",
    )
    trainer = Trainer(config)
    loaders = trainer.loaders
    batches = []
    for epoch in range(2):
        loaders.sampler.set_epoch(epoch)
        batches += list(loaders.train)
        batches += list(loaders.val)
    return batches


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):  # bit-equal, NaN (an invalid label pixel) where NaN
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return (
            bool(torch.all((a == b) | (torch.isnan(a) & torch.isnan(b))))
            if a.is_floating_point()
            else torch.equal(a, b)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)  # NaN pitch stays NaN


def test_cached_samples_give_the_batches_of_decoding_every_time(dataset_root, tmp_path):
    decoded = _batches(dataset_root, tmp_path / "a", memory_cache_mb=0)
    cached = _batches(dataset_root, tmp_path / "b", memory_cache_mb=64)
    assert len(decoded) == len(cached) > 4
    assert all(_same(x, y) for x, y in zip(decoded, cached, strict=True))


class _Counted:
    def __init__(self, size: int) -> None:
        self.reads = 0
        self.size = size

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> dict:
        self.reads += 1
        return {"image": np.full((self.size,), index, np.uint8), "line_id": "a"}


def test_the_cache_keeps_what_fits_read_only_and_decodes_the_rest():
    base = _Counted(size=100)
    budget = ByteBudget(250)  # two samples fit
    cache = DecodedSampleCache(base, budget)
    for _ in range(3):
        for index in range(3):
            assert cache[index]["image"][0] == index
    assert base.reads == 2 + 3  # samples 0 and 1 once, sample 2 every time
    assert budget.left == 50
    kept = cache[0]
    with pytest.raises(ValueError, match="read-only"):
        kept["image"][0] = 9
    kept["extra"] = 1  # each read is a fresh dict: nothing leaks into the next
    assert "extra" not in cache[0]
