"""Dense vs blocked vs linear CTAL block (and the pooled variant), forward+backward, C=128,
batch 1, shared fusion: over the grid (T = 3) and over the number of tasks (72x96, T = 2, 3, 5).

Each row is one (grid, T, mode) in a fresh subprocess (bench/common.py): time is the median of
repeats after a warm-up, memory is the peak RSS above the child's baseline taken after imports,
block construction and input creation. Dense runs only where its N x N tensors fit in
DENSE_MAX_BYTES (not at 144x192, where it would need ~35 GB). ROUNDS rounds of such processes
run the modes interleaved (identical processes differ by up to 2x on the development VM); the
tables give medians over rounds, the ratios to dense of each mode, linear's own growth from
72x96 to 144x192, and which mode `auto` picks (the cost model of cta_model/nn/ctal.py).

    python bench/ctal_block.py            # all rows -> bench/results/ctal_block.{json,md}
    python bench/ctal_block.py --quick    # smoke sizes -> bench/results/raw/quick/
    python bench/ctal_block.py --config 72x96:linear:t3   # or 72x96:blocked:t3:256 (rows)
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
    quick,
    timed_median,
)

CHANNELS = 128
TASKS = 3
GRIDS = ((32, 32), (48, 64), (72, 96), (96, 128), (144, 192))
TASK_GRID = (72, 96)
TASK_COUNTS = (2, 3, 5)
QUICK_GRIDS = ((16, 16), (24, 32))
QUICK_TASK_GRID = (24, 32)
MODES = ("dense", "blocked", "linear", "pooled")
POOL_FACTOR = 2
#: Dense runs where its N x N tensors (forward+backward) take at most this much.
DENSE_MAX_BYTES = 8 * 2**30
#: Targets of the linear-time issue (docs/performance.md), checked in the summary.
TARGET_LINEAR_OVER_DENSE_72x96 = {"time": 0.4, "memory": 0.1}
TARGET_LINEAR_144x192 = {"peak_mb": 1024.0, "time_over_72x96": 4.5}


def grids() -> tuple[tuple[int, int], ...]:
    return QUICK_GRIDS if quick() else GRIDS


def task_grid() -> tuple[int, int]:
    return QUICK_TASK_GRID if quick() else TASK_GRID


def rounds() -> int:
    return 1 if quick() else 3


def repeats(grid: tuple[int, int]) -> int:
    """Passes per process after the warm-up: one where a pass takes tens of seconds."""
    return 1 if quick() or grid[0] * grid[1] > 10_000 else 3


def dense_fits(grid: tuple[int, int], tasks: int) -> bool:
    from cta_model.nn.ctal import dense_tensor_bytes

    return dense_tensor_bytes(1, grid[0] * grid[1], tasks, 1, 4) <= DENSE_MAX_BYTES


def _points() -> list[tuple[tuple[int, int], int]]:
    """(grid, T) rows: every grid at T = 3, then the task grid at the other task counts."""
    points = [(grid, TASKS) for grid in grids()]
    points += [(task_grid(), t) for t in TASK_COUNTS if t != TASKS]
    return points


def configs() -> list[str]:
    """`HxW:mode:tT:rROUND`, the modes interleaved within each (grid, T)'s rounds."""
    return [
        f"{h}x{w}:{mode}:t{tasks}:r{round_}"
        for (h, w), tasks in _points()
        for round_ in range(rounds())
        for mode in MODES
        if mode != "dense" or dense_fits((h, w), tasks)
    ]


def _parse(key: str) -> tuple[tuple[int, int], str, int, int | None]:
    grid_text, mode, *extra = key.split(":")  # "HxW:mode[:tT][:ROWS][:rROUND]"
    tasks = next((int(p[1:]) for p in extra if p.startswith("t")), TASKS)
    rows = next((int(p) for p in extra if p.isdigit()), None)
    return tuple(int(s) for s in grid_text.split("x")), mode, tasks, rows


def measure(key: str) -> dict[str, Any]:
    import torch

    from cta_model.nn.ctal import CrossTaskAffinity

    grid, mode, tasks, rows = _parse(key)
    names = tuple(f"task{i}" for i in range(tasks))
    torch.manual_seed(0)
    block = CrossTaskAffinity(
        names, CHANNELS, grid, mode=mode, block_size=rows, pool_factor=POOL_FACTOR
    )
    features = {t: torch.randn(1, CHANNELS, *grid, requires_grad=True) for t in names}
    baseline = peak_rss_mb()

    def step() -> None:
        out = block(features)
        sum(o.sum() for o in out.values()).backward()
        block.zero_grad(set_to_none=True)
        for x in features.values():
            x.grad = None

    timing = timed_median(step, repeats=repeats(grid), warmup=1)
    return {
        "config": key,
        "grid": f"{grid[0]}x{grid[1]}",
        "tasks": tasks,
        "positions": grid[0] * grid[1],
        "mode": mode,
        "block_rows": block.block_rows(1) if mode == "blocked" else None,
        "time_s": timing["median_s"],
        "time_min_s": timing["min_s"],
        "time_max_s": timing["max_s"],
        "peak_mb": peak_rss_mb() - baseline,
        "threads": torch.get_num_threads(),
    }


def auto_pick(grid: tuple[int, int], tasks: int) -> str:
    """The mode `auto` picks for this block at batch 1 on this machine's CPU."""
    import torch

    from cta_model.nn.ctal import CrossTaskAffinity

    names = tuple(f"task{i}" for i in range(tasks))
    block = CrossTaskAffinity(names, CHANNELS, grid, mode="auto")
    return block.resolve_mode(1, torch.float32, torch.device("cpu"))


def summarise(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    grouped: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        grouped.setdefault((r["grid"], r.get("tasks", TASKS), r["mode"]), []).append(r)
    by_key = {
        key: median_over_processes(group, "time_s", ["peak_mb"]) for key, group in grouped.items()
    }
    ratios: dict[str, Any] = {}
    table = []
    for (h, w), tasks in _points():
        grid = f"{h}x{w}"
        label = grid if tasks == TASKS else f"{grid}.t{tasks}"
        linear = by_key[(grid, tasks, "linear")]
        dense = by_key.get((grid, tasks, "dense"))
        entry: dict[str, Any] = {"grid": grid, "T": tasks, "N": linear["positions"]}
        for mode in MODES:
            row = by_key.get((grid, tasks, mode))
            entry[f"{mode} s"] = row["time_s"] if row else None
            entry[f"{mode} MB"] = row["peak_mb"] if row else None
            if row and dense and mode != "dense":
                time_ratio = row["time_s"] / dense["time_s"]
                memory_ratio = row["peak_mb"] / max(dense["peak_mb"], 1e-9)
                ratios[f"{label}.{mode}_over_dense.time"] = time_ratio
                ratios[f"{label}.{mode}_over_dense.memory"] = memory_ratio
                entry[f"{mode}/dense time"] = time_ratio
                entry[f"{mode}/dense mem"] = memory_ratio
        blocked = by_key[(grid, tasks, "blocked")]
        ratios[f"{label}.linear_over_blocked.time"] = linear["time_s"] / blocked["time_s"]
        entry["linear/blocked time"] = ratios[f"{label}.linear_over_blocked.time"]
        entry["block rows"] = blocked["block_rows"]
        entry["auto picks"] = auto_pick((h, w), tasks)
        ratios[f"{label}.auto"] = entry["auto picks"]
        table.append(entry)
    if not quick():
        _targets(by_key, ratios)
    columns = [
        "grid", "T", "N", "dense s", "blocked s", "linear s", "linear/dense time",
        "linear/blocked time", "blocked/dense time", "dense MB", "blocked MB", "linear MB",
        "linear/dense mem", "blocked/dense mem", "pooled/dense time", "pooled/dense mem",
        "block rows", "auto picks",
    ]  # fmt: skip
    markdown = (
        f"## CTAL block, forward+backward (C={CHANNELS}, batch 1, shared fusion, pooled factor "
        f"{POOL_FACTOR})\n\nTimes and memory: medians over {rounds()} rounds of fresh "
        "processes; each time is that process's median of repeats. Dense only where its N x N "
        f"tensors fit in {DENSE_MAX_BYTES / 2**30:.0f} GiB. `auto picks`: the cost model's "
        "choice at batch 1 on this machine.\n\n" + markdown_table(table, columns)
    )
    for key, value in ratios.items():
        if key.startswith("target_"):
            markdown += f"\n- {key}: measured {value['measured']:.3g}, target {value['target']}, "
            markdown += "holds" if value["holds"] else "misses"
    return ratios, markdown + "\n"


def _targets(by_key: dict[tuple[str, int, str], dict[str, Any]], ratios: dict[str, Any]) -> None:
    def target(name: str, measured: float, limit: float) -> None:
        ratios[f"target_{name}"] = {
            "target": limit,
            "measured": measured,
            "holds": measured <= limit,
        }

    for what, limit in TARGET_LINEAR_OVER_DENSE_72x96.items():
        target(f"72x96_linear_over_dense_{what}", ratios[f"72x96.linear_over_dense.{what}"], limit)
    big, base = by_key[("144x192", TASKS, "linear")], by_key[("72x96", TASKS, "linear")]
    target("144x192_linear_peak_mb", big["peak_mb"], TARGET_LINEAR_144x192["peak_mb"])
    target(
        "144x192_linear_time_over_its_72x96",
        big["time_s"] / base["time_s"],
        TARGET_LINEAR_144x192["time_over_72x96"],
    )


if __name__ == "__main__":
    bench_main("ctal_block", Path(__file__), configs, measure, summarise)
