"""Blocked vs dense CTAL block (and the pooled variant), forward+backward, C=128, T=3, batch 1.

Each row is one (grid, mode) in a fresh subprocess (bench/common.py): time is the median of
repeats after a warm-up, memory is the peak RSS above the child's baseline taken after imports,
block construction and input creation. Ratios blocked/dense and pooled/dense per grid.
ROUNDS rounds of such processes run the modes interleaved (identical processes differ by up
to 2x on the development VM); the table gives medians over rounds.

    python bench/ctal_block.py            # all rows -> bench/results/ctal_block.{json,md}
    python bench/ctal_block.py --config 72x96:blocked        # or 72x96:blocked:256 (rows)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    bench_main,
    markdown_table,
    median_over_processes,
    peak_rss_mb,
    timed_median,
)

TASKS = ("semseg", "height", "normals")
CHANNELS = 128
GRIDS = ((16, 16), (32, 32), (48, 64), (72, 96))
MODES = ("dense", "blocked", "pooled")
POOL_FACTOR = 2
REPEATS = 3
ROUNDS = 3


def configs() -> list[str]:
    """`HxW:mode:rROUND`, the modes interleaved within each grid's rounds."""
    return [
        f"{h}x{w}:{mode}:r{round_}" for h, w in GRIDS for round_ in range(ROUNDS) for mode in MODES
    ]


def measure(key: str) -> dict[str, Any]:
    import torch

    from cta_model.nn.ctal import CrossTaskAffinity

    grid_text, mode, *extra = key.split(":")  # "HxW:mode[:ROWS][:rROUND]"
    rows = [part for part in extra if not part.startswith("r")]
    grid = tuple(int(s) for s in grid_text.split("x"))
    torch.manual_seed(0)
    block = CrossTaskAffinity(
        TASKS,
        CHANNELS,
        grid,
        mode=mode,
        block_size=int(rows[0]) if rows else None,
        pool_factor=POOL_FACTOR,
    )
    features = {t: torch.randn(1, CHANNELS, *grid, requires_grad=True) for t in TASKS}
    baseline = peak_rss_mb()

    def step() -> None:
        out = block(features)
        sum(o.sum() for o in out.values()).backward()
        block.zero_grad(set_to_none=True)
        for x in features.values():
            x.grad = None

    timing = timed_median(step, repeats=REPEATS, warmup=1)
    return {
        "config": key,
        "grid": grid_text,
        "positions": grid[0] * grid[1],
        "mode": mode,
        "block_rows": block.block_rows(1) if mode == "blocked" else None,
        "time_s": timing["median_s"],
        "time_min_s": timing["min_s"],
        "time_max_s": timing["max_s"],
        "peak_mb": peak_rss_mb() - baseline,
        "threads": torch.get_num_threads(),
    }


def summarise(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        grouped.setdefault((r["grid"], r["mode"]), []).append(r)
    by_key = {
        key: median_over_processes(group, "time_s", ["peak_mb"]) for key, group in grouped.items()
    }
    ratios: dict[str, Any] = {}
    table = []
    for h, w in GRIDS:
        grid = f"{h}x{w}"
        dense = by_key[(grid, "dense")]
        entry = {"grid": grid, "N": dense["positions"], "dense s": dense["time_s"]}
        entry["dense MB"] = dense["peak_mb"]
        for mode in ("blocked", "pooled"):
            row = by_key[(grid, mode)]
            time_ratio = row["time_s"] / dense["time_s"]
            memory_ratio = row["peak_mb"] / max(dense["peak_mb"], 1e-9)
            ratios[f"{grid}.{mode}_over_dense.time"] = time_ratio
            ratios[f"{grid}.{mode}_over_dense.memory"] = memory_ratio
            entry[f"{mode} s"] = row["time_s"]
            entry[f"{mode} MB"] = row["peak_mb"]
            entry[f"{mode}/dense time"] = time_ratio
            entry[f"{mode}/dense mem"] = memory_ratio
        entry["block rows"] = by_key[(grid, "blocked")]["block_rows"]
        table.append(entry)
    columns = [
        "grid", "N", "dense s", "blocked s", "blocked/dense time", "dense MB", "blocked MB",
        "blocked/dense mem", "block rows", "pooled/dense time", "pooled/dense mem",
    ]  # fmt: skip
    markdown = (
        "## CTAL block, forward+backward (C=128, T=3, batch 1, pooled factor "
        f"{POOL_FACTOR})\n\nTimes and memory: medians over {ROUNDS} rounds of fresh processes; "
        "each time is that process's median of repeats.\n\n" + markdown_table(table, columns)
    )
    return ratios, markdown


if __name__ == "__main__":
    bench_main("ctal_block", Path(__file__), configs(), measure, summarise)
