"""Shared harness of the benchmarks (`make bench`): every configuration runs in a fresh
subprocess, peak memory is ru_maxrss minus the same process's baseline after imports, times are
medians of repeats after warm-up, and every figure a reader compares is a ratio measured side
by side in one run.

A benchmark script `bench/<name>.py` calls ``bench_main(name, configs, measure, summarise)``:
- ``python bench/<name>.py --config KEY`` measures one configuration in this process and prints
  one JSON object (the child side);
- ``python bench/<name>.py`` runs every configuration in its own subprocess, then writes
  ``bench/results/<name>.json`` (machine, rows, ratios) and ``bench/results/<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed_median(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median and spread of wall time (seconds) over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": repeats,
    }


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def run_child(script: Path, key: str, timeout_s: float = 1800.0) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; its last stdout line is its JSON row."""
    done = subprocess.run(
        [sys.executable, str(script), "--config", key],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} --config {key} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, payload: dict[str, Any], markdown: str) -> Path:
    from cta_model.atomic import write_bytes_atomic

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{name}.json"
    write_bytes_atomic(out, (json.dumps(payload, indent=2) + "\n").encode())
    write_bytes_atomic(RESULTS_DIR / f"{name}.md", markdown.encode())
    return out


def bench_main(
    name: str,
    script: Path,
    configs: Iterable[str],
    measure: Callable[[str], dict[str, Any]],
    summarise: Callable[[list[dict[str, Any]]], tuple[dict[str, Any], str]],
) -> None:
    """``measure(key)`` runs in the child and returns its row (include the key under "config");
    ``summarise(rows)`` returns (ratios dict, Markdown text) for the parent."""
    parser = argparse.ArgumentParser(description=f"benchmark {name}")
    parser.add_argument("--config", help="measure one configuration in this process")
    args = parser.parse_args()
    if args.config:
        print(json.dumps(measure(args.config)))
        return
    keys = list(configs)
    rows = []
    started = time.monotonic()
    for index, key in enumerate(keys, 1):
        rows.append(run_child(script, key))
        elapsed = time.monotonic() - started
        eta = elapsed / index * (len(keys) - index)
        print(
            f"[{name}] {index}/{len(keys)} {key} done, {elapsed:.0f} s, ETA {eta:.0f} s", flush=True
        )
    ratios, markdown = summarise(rows)
    out = write_results(
        name, {"benchmark": name, "machine": machine(), "rows": rows, "ratios": ratios}, markdown
    )
    print(markdown)
    print(f"wrote {out}")
