"""DDP on CPU: 1 vs 2 processes (gloo), the same global batch, the same training step.

Rows (each in a fresh subprocess, which spawns the ranks with torch.multiprocessing):
`1x1` (1 process, 1 thread), `1x2` (1 process, 2 intra-op threads), `2x1` (DDP, 2 processes,
1 thread each). The step is bench/train_step.py's (CTAL, deep-supervised loss, Adam) wrapped
in DistributedDataParallel, also for one process, so only the process count changes. Each
rank reports its own median step time and peak memory above its baseline; the row takes the
slowest rank. Ratios: 2x1 over 1x1 (scaling) and 2x1 over 1x2 (processes vs threads).

    python bench/ddp.py [--quick]      # -> bench/results/ddp.{json,md}
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_main, markdown_table, peak_rss_mb, quick, timed_median  # noqa: E402

LAYOUTS = ("1x1", "1x2", "2x1")  # processes x threads


def settings() -> dict[str, Any]:
    if quick():
        return {"size": 32, "backbone": "resnet18", "global_batch": 4, "repeats": 2}
    return {"size": 64, "backbone": "hrnet-w18-small-v2", "global_batch": 8, "repeats": 5}


def configs() -> list[str]:
    return list(LAYOUTS)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world: int, threads: int, port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from train_step import build_step

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        s = settings()
        size = (s["size"], s["size"])
        _, step = build_step(
            "ctal",
            size,
            s["global_batch"] // world,
            backbone=s["backbone"],
            wrap=lambda model: DistributedDataParallel(model),
        )
        baseline = peak_rss_mb()
        timing = timed_median(step, repeats=s["repeats"], warmup=2)
        row = {"step_s": timing["median_s"], "cpu_s": timing["cpu_median_s"]}
        row["peak_mb"] = peak_rss_mb() - baseline
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def measure(key: str) -> dict[str, Any]:
    import torch.multiprocessing as mp

    world, threads = (int(v) for v in key.split("x"))
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(world, threads, _free_port(), out_dir), nprocs=world, join=True)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    s = settings()
    step_s = max(r["step_s"] for r in ranks)
    return {
        "config": key,
        "processes": world,
        "threads_per_process": threads,
        "global_batch": s["global_batch"],
        "size": s["size"],
        "backbone": s["backbone"],
        "step_s": step_s,
        "steps_per_s": 1.0 / step_s,
        "images_per_s": s["global_batch"] / step_s,
        "cpu_s_per_step": sum(r["cpu_s"] for r in ranks),  # all ranks together
        "peak_mb_per_rank": max(r["peak_mb"] for r in ranks),
        "ranks": ranks,
    }


def summarise(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    by_key = {r["config"]: r for r in rows}
    ratios = {
        "2x1_over_1x1.images_per_s": by_key["2x1"]["images_per_s"] / by_key["1x1"]["images_per_s"],
        "2x1_over_1x2.images_per_s": by_key["2x1"]["images_per_s"] / by_key["1x2"]["images_per_s"],
        "1x2_over_1x1.images_per_s": by_key["1x2"]["images_per_s"] / by_key["1x1"]["images_per_s"],
    }
    table = [
        {
            "processes x threads": key,
            "s/step": by_key[key]["step_s"],
            "steps/s": by_key[key]["steps_per_s"],
            "images/s": by_key[key]["images_per_s"],
            "vs 1x1": by_key[key]["images_per_s"] / by_key["1x1"]["images_per_s"],
            "CPU s/step (all ranks)": by_key[key]["cpu_s_per_step"],
            "peak MB per rank": by_key[key]["peak_mb_per_rank"],
        }
        for key in LAYOUTS
    ]
    s = settings()
    markdown = (
        f"## DDP on CPU (gloo): CTAL, {s['backbone']}, {s['size']}x{s['size']}, global batch "
        f"{s['global_batch']}\n\n"
        + markdown_table(
            table,
            [
                "processes x threads",
                "s/step",
                "steps/s",
                "images/s",
                "vs 1x1",
                "CPU s/step (all ranks)",
                "peak MB per rank",
            ],  # fmt: skip
        )
    )
    return ratios, markdown


if __name__ == "__main__":
    bench_main("ddp", Path(__file__), configs, measure, summarise)
