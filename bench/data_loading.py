"""Data loading throughput vs what training consumes.

Rows (each in a fresh subprocess): `workers0`, `workers1`, `workers2`: images/s of the trainer's
own input path (LineDataset -> the train transforms with their per-sample random streams ->
T.collate, DataLoader with that many workers, persistent) over whole epochs of the synthetic
train split; `train_step`: images/s of a CTAL training step (bench/train_step.py) at the same
size and batch. Ratio loader/training > 1 means loading keeps up with a single process.

`tiles_decoded`, `tiles_cached`: the demo's tiled input path (configs/demo.yaml: 384 px scenes,
64 px tiles at the camera's pitch, 4 tiles per image, batch 16; the Trainer's own train loader)
without and with `data.memory_cache_mb`, tiles/s over whole epochs after one warm-up epoch (which
fills the cache): every tile otherwise decodes its whole image and labels again.

    python bench/data_loading.py [--quick]      # -> bench/results/data_loading.{json,md}
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, bench_main, markdown_table, peak_rss_mb, quick, timed_median  # noqa: E402

WORKERS = (0, 1, 2)
BATCH = 8


def settings() -> dict[str, Any]:
    if quick():
        return {"size": 64, "samples_per_line": 8, "repeats": 1, "backbone": "resnet18"}
    return {"size": 128, "samples_per_line": 40, "repeats": 3, "backbone": "hrnet-w18-small-v2"}


def configs() -> list[str]:
    return [f"workers{w}" for w in WORKERS] + ["train_step", "tiles_decoded", "tiles_cached"]


def _tile_epoch(memory_cache_mb: int):
    """(one epoch of the demo config's train loader, tiles per epoch, tiles per batch)."""
    import itertools
    import tempfile

    from cta_model.train_config import load_train_config
    from cta_model.training.trainer import Trainer

    samples = 4 if quick() else 40
    config = load_train_config(
        REPO_ROOT / "configs" / "demo.yaml",
        {
            "data.synthetic": {"lines": 3, "samples_per_line": samples, "size": 384, "seed": 0},
            "data.cache_dir": str(REPO_ROOT / ".cta" / "cache"),
            "data.memory_cache_mb": memory_cache_mb,
            "progress": False,
            "output": tempfile.mkdtemp(prefix="bench-tiles-"),
        },
    )
    loaders = Trainer(config).loaders
    epochs = itertools.count()

    def epoch() -> None:
        loaders.sampler.set_epoch(next(epochs))
        for _ in loaders.train:
            pass

    batch = loaders.train.batch_size
    return epoch, len(loaders.train) * batch, batch


def _train_loader(workers: int):
    from torch.utils.data import DataLoader

    from cta_model.data import transforms as T
    from cta_model.data.line_dataset import LineDataset
    from cta_model.model_folder import InputContract
    from cta_model.train_config import DataConfig, load_train_config
    from cta_model.training.datasets import ensure_synthetic_dataset
    from cta_model.training.loaders import TrainView, build_transforms

    s = settings()
    data = DataConfig(
        synthetic={"lines": 3, "samples_per_line": s["samples_per_line"], "size": s["size"]},
        cache_dir=str(REPO_ROOT / ".cta" / "cache"),
    )
    root = ensure_synthetic_dataset(data)
    config = load_train_config(
        REPO_ROOT / "configs" / "demo.yaml", {"model.input_size": [s["size"], s["size"]]}
    )
    train_tf, _ = build_transforms(config, InputContract())
    view = TrainView(LineDataset(root, split="train"), train_tf, seed=0)
    loader = DataLoader(
        view,
        batch_size=BATCH,
        sampler=[(0, i) for i in range(len(view))],
        collate_fn=T.collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
    )
    return loader, (len(view) // BATCH) * BATCH


def measure(key: str) -> dict[str, Any]:
    import torch

    s = settings()
    size, batch = s["size"], BATCH
    if key == "train_step":
        from train_step import build_step

        _, step = build_step("ctal", (s["size"], s["size"]), BATCH, backbone=s["backbone"])
        baseline = peak_rss_mb()
        timing = timed_median(step, repeats=s["repeats"], warmup=1)
        images = BATCH
    elif key.startswith("tiles_"):
        epoch, images, batch = _tile_epoch(2048 if key == "tiles_cached" else 0)
        size = 384  # the scenes; the tiles are configs/demo.yaml's model.input_size
        baseline = peak_rss_mb()
        timing = timed_median(epoch, repeats=s["repeats"], warmup=1)
    else:
        workers = int(key.removeprefix("workers"))
        loader, images = _train_loader(workers)
        baseline = peak_rss_mb()

        def epoch() -> None:
            for _ in loader:
                pass

        timing = timed_median(epoch, repeats=s["repeats"], warmup=1)
    return {
        "config": key,
        "size": size,
        "batch": batch,
        "images_per_s": images / timing["median_s"],
        "seconds": timing["median_s"],
        "images": images,
        "peak_mb": peak_rss_mb() - baseline,
        "threads": torch.get_num_threads(),
    }


def summarise(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    by_key = {r["config"]: r for r in rows}
    consumed = by_key["train_step"]["images_per_s"]
    ratios = {
        f"workers{w}.loader_over_training": by_key[f"workers{w}"]["images_per_s"] / consumed
        for w in WORKERS
    }
    tiles_speedup = by_key["tiles_cached"]["images_per_s"] / by_key["tiles_decoded"]["images_per_s"]
    ratios["tiles.cached_over_decoded"] = tiles_speedup
    table = [
        {
            "source": key,
            "images/s": by_key[key]["images_per_s"],
            "vs training": by_key[key]["images_per_s"] / consumed,
        }
        for key in configs()
        if not key.startswith("tiles_")
    ]
    tile_batch = by_key["tiles_cached"]["batch"]
    per_batch = f"ms per batch of {tile_batch}"
    tiles = [
        {
            "source": key,
            "tiles/s": by_key[key]["images_per_s"],
            per_batch: 1e3 * by_key[key]["batch"] / by_key[key]["images_per_s"],
            "peak MB": by_key[key]["peak_mb"],
        }
        for key in ("tiles_decoded", "tiles_cached")
    ]
    s = settings()
    markdown = (
        f"## Data loading vs training (synthetic {s['size']}x{s['size']}, batch {BATCH}, "
        f"CTAL {s['backbone']} step)\n\n"
        + markdown_table(table, ["source", "images/s", "vs training"])
        + f"\n\n## The demo's tiles (384 px scenes, 64 px tiles, batch {tile_batch}): decoded vs "
        + f"data.memory_cache_mb (cached {tiles_speedup:.2f}x as fast)\n\n"
        + markdown_table(tiles, ["source", "tiles/s", per_batch, "peak MB"])
    )
    return ratios, markdown


if __name__ == "__main__":
    bench_main("data_loading", Path(__file__), configs, measure, summarise)
