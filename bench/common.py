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
REPO_ROOT = Path(__file__).resolve().parent.parent


def quick() -> bool:
    """Smoke mode (`BENCH_QUICK=1` or `--quick`): tiny sizes and repeats, results kept apart."""
    return os.environ.get("BENCH_QUICK", "") not in ("", "0")


def results_dir() -> Path:
    """bench/results, or `BENCH_RESULTS_DIR`; quick runs go to its raw/quick (not committed)."""
    base = Path(os.environ.get("BENCH_RESULTS_DIR") or RESULTS_DIR)
    return base / "raw" / "quick" if quick() else base


def work_dir(name: str) -> Path:
    """A scratch folder for a benchmark's prepared inputs (models, exports), shared by its
    children; under bench/results/raw (not committed), apart for quick runs."""
    base = Path(os.environ.get("BENCH_RESULTS_DIR") or RESULTS_DIR)
    return base / "raw" / ("quick" if quick() else "full") / f"{name}.work"


def load_average() -> float:
    """1-minute load average: above the core count, other jobs shared the cores."""
    return os.getloadavg()[0]


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed_median(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median and spread of wall time (seconds) over ``repeats`` calls after ``warmup`` calls,
    and the median CPU time of this process per call (all its threads; unlike wall time it
    barely moves when other jobs share the cores)."""
    for _ in range(warmup):
        fn()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "cpu_median_s": statistics.median(cpu_times),
        "repeats": repeats,
    }


def median_over_processes(
    rows: list[dict[str, Any]], time_key: str, other_keys: Iterable[str] = ()
) -> dict[str, Any]:
    """One configuration measured in several fresh processes -> one row: the median of
    ``time_key`` (with its [min, max] under ``<time_key>_range``) and of every ``other_keys``,
    the rest from the first row, and ``processes`` = how many there were."""
    times = [r[time_key] for r in rows]
    merged = {**rows[0], "processes": len(rows), time_key: statistics.median(times)}
    merged[f"{time_key}_range"] = [min(times), max(times)]
    for key in other_keys:
        merged[key] = statistics.median(r[key] for r in rows)
    return merged


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_end": load_average(),
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

    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}.json"
    write_bytes_atomic(out, (json.dumps(payload, indent=2) + "\n").encode())
    write_bytes_atomic(folder / f"{name}.md", markdown.encode())
    return out


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def run_configs(
    name: str,
    script: Path,
    keys: list[str],
    cache_dir: Path | None = None,
    cache_tag: str = "",
    estimate_s: Callable[[str], float] | None = None,
) -> list[dict[str, Any]]:
    """Each key's row from a fresh child process, with progress lines (start, each run, ETA).

    With ``cache_dir`` a finished row is kept there as JSON (with ``cache_tag``, what it was
    measured with) and reused when the same key and tag come again, so an interrupted
    benchmark continues. ``estimate_s(key)`` (seconds) gives the duration printed at start;
    the ETA scales the remaining estimates by how the finished runs compared with theirs."""
    cached: dict[str, dict[str, Any]] = {}
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for key in keys:
            path = cache_dir / f"{key.replace(':', '_')}.json"
            if path.exists():
                stored = json.loads(path.read_text())
                if stored.get("tag") == cache_tag:
                    cached[key] = stored["row"]
    todo = [key for key in keys if key not in cached]
    start_line = f"[{name}] {len(keys)} runs, {len(todo)} to do"
    if cached:
        start_line += f" ({len(cached)} cached in {cache_dir})"
    if estimate_s is not None and todo:
        start_line += f"; estimated {_duration(sum(estimate_s(k) for k in todo))}"
    print(start_line, flush=True)
    rows = []
    measured = estimated = 0.0
    started = time.monotonic()
    for index, key in enumerate(keys, 1):
        if key in cached:
            rows.append(cached[key])
            continue
        print(f"[{name}] {index}/{len(keys)} {key} started", flush=True)
        run_started = time.monotonic()
        # A run may take far longer than a micro-benchmark: allow 4x its estimate.
        timeout_s = max(1800.0, 4 * estimate_s(key)) if estimate_s is not None else 1800.0
        row = run_child(script, key, timeout_s)
        seconds = time.monotonic() - run_started
        row["run_s"] = seconds
        rows.append(row)
        if cache_dir is not None:
            path = cache_dir / f"{key.replace(':', '_')}.json"
            path.write_text(json.dumps({"tag": cache_tag, "row": row}, indent=2) + "\n")
        measured += seconds
        remaining = [k for k in keys[index:] if k not in cached]
        if estimate_s is not None:
            estimated += estimate_s(key)
            eta = sum(estimate_s(k) for k in remaining) * measured / estimated
        else:
            eta = measured / (len(rows) - len(cached)) * len(remaining)
        print(
            f"[{name}] {index}/{len(keys)} {key} done in {seconds:.0f} s, "
            f"{time.monotonic() - started:.0f} s so far, ETA {_duration(eta)}",
            flush=True,
        )
    return rows


def bench_main(
    name: str,
    script: Path,
    configs: Iterable[str] | Callable[[], Iterable[str]],
    measure: Callable[[str], dict[str, Any]],
    summarise: Callable[[list[dict[str, Any]]], tuple[dict[str, Any], str]],
    prepare: Callable[[], Any] | None = None,
    cache_dir: Path | None = None,
    cache_tag: str = "",
    estimate_s: Callable[[str], float] | None = None,
) -> None:
    """``measure(key)`` runs in the child and returns its row (include the key under "config");
    ``summarise(rows)`` returns (ratios dict, Markdown text) for the parent. ``configs`` may be
    a function, called after ``--quick`` is applied, so it can depend on `quick()`.
    ``prepare()`` runs once in the parent before the children (e.g. generating their data);
    ``cache_dir``, ``cache_tag`` and ``estimate_s``: see ``run_configs``."""
    parser = argparse.ArgumentParser(description=f"benchmark {name}")
    parser.add_argument("--config", help="measure one configuration in this process")
    parser.add_argument("--quick", action="store_true", help="smoke run (same as BENCH_QUICK=1)")
    args = parser.parse_args()
    if args.quick:
        os.environ["BENCH_QUICK"] = "1"  # the children inherit it
    if args.config:
        print(json.dumps(measure(args.config)))
        return
    keys = list(configs() if callable(configs) else configs)
    if prepare is not None:
        prepare()
    rows = run_configs(name, script, keys, cache_dir, cache_tag, estimate_s)
    ratios, markdown = summarise(rows)
    out = write_results(
        name,
        {"benchmark": name, "quick": quick(), "machine": machine(), "rows": rows, "ratios": ratios},
        markdown,
    )
    print(markdown)
    print(f"wrote {out}")
