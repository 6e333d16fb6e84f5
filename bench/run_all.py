"""`make bench`: run every benchmark script in bench/ and gather their Markdown in one README.

A benchmark is a bench/*.py that calls `bench_main` (bench/common.py); each runs in its own
interpreter (its configurations in further subprocesses), one after another so they do not
share the cores. A failing benchmark is reported and the others still run; the exit status
is then 1. `--quick` (or BENCH_QUICK=1) runs the smoke sizes into bench/results/raw/quick.

    python bench/run_all.py [--quick] [--only train_step,inference] [--readme-only]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, quick, results_dir  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
# The order of the README; scripts not named here follow alphabetically.
ORDER = ("ctal_block", "train_step", "inference", "ddp", "data_loading", "pipeline_overhead")
# Benchmarks with their own make target and size flags (training runs), not part of `make bench`.
SEPARATE = ("quality",)  # make bench-quality


def discover() -> list[str]:
    names = [
        path.stem
        for path in BENCH_DIR.glob("*.py")
        if path.stem not in ("common", "run_all", *SEPARATE) and "bench_main(" in path.read_text()
    ]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def run_one(name: str) -> tuple[bool, float]:
    started = time.monotonic()
    print(f"=== bench/{name}.py", flush=True)
    done = subprocess.run([sys.executable, str(BENCH_DIR / f"{name}.py")], check=False)
    return done.returncode == 0, time.monotonic() - started


def write_readme(names: list[str], failed: list[str], seconds: dict[str, float]) -> Path:
    from cta_model.atomic import write_bytes_atomic

    folder = results_dir()
    info = machine()
    header = [
        "# Benchmark results (`make bench`)" + (" — QUICK smoke sizes" if quick() else ""),
        "",
        f"Written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {info['cores']} cores ({info['cpu']}), "
        f"torch {info['torch']}, {info['torch_threads']} threads, Python {info['python']}. "
        "Every figure is a ratio of rows measured side by side in one run, each row in a fresh "
        "subprocess; times are medians after warm-up; peak memory is ru_maxrss above the "
        "row's own baseline after imports. The JSON beside this file holds every row.",
        "",
    ]
    sections = []
    for name in names:
        md = folder / f"{name}.md"
        if name in failed or not md.is_file():
            sections.append(f"## {name}\n\nNo result in this run (failed or not run).\n")
        else:
            took = f", {seconds[name]:.0f} s" if name in seconds else ""
            sections.append(md.read_text().rstrip() + f"\n\n_(bench/{name}.py{took})_\n")
    out = folder / "README.md"
    write_bytes_atomic(out, ("\n".join(header) + "\n" + "\n".join(sections)).encode())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes (BENCH_QUICK=1)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument(
        "--readme-only",
        action="store_true",
        help="run nothing; gather the existing results/<name>.md into README.md",
    )
    args = parser.parse_args()
    if args.quick:
        os.environ["BENCH_QUICK"] = "1"
    names = discover()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; known: {names}")
        names = [n for n in names if n in wanted]
    failed, seconds = [], {}
    if args.readme_only:
        names = [n for n in names if (results_dir() / f"{n}.md").is_file()]
        print(f"wrote {write_readme(names, failed, seconds)}")
        return 0
    for name in names:
        ok, seconds[name] = run_one(name)
        if not ok:
            failed.append(name)
            print(f"=== bench/{name}.py FAILED", flush=True)
    out = write_readme(names, failed, seconds)
    print(f"wrote {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
