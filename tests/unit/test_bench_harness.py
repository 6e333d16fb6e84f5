"""The benchmark harness (bench/common.py) and one real benchmark's child mode, at tiny size."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def _env(results: Path, quick: bool = True) -> dict[str, str]:
    env = dict(os.environ, BENCH_RESULTS_DIR=str(results), OMP_NUM_THREADS="1")
    env["BENCH_QUICK"] = "1" if quick else "0"
    return env


def test_train_step_child_measures_one_config(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "train_step.py"), "--config", "32x32:ctal"],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["config"] == "32x32:ctal"
    assert (row["arch"], row["size"], row["backbone"]) == ("ctal", "32x32", "resnet18")
    assert row["step_s"] > 0 and row["step_cpu_s"] > 0
    assert row["images_per_s"] == pytest.approx(row["batch"] / row["step_s"])
    assert row["peak_mb"] >= 0 and row["params"] > 1_000_000
    assert row["affinity_mode"] == "dense"  # a 4x4 grid
    assert not (tmp_path / "train_step.json").exists(), "a child writes no results file"


FAKE_BENCH = """
import os, sys
sys.path.insert(0, {bench!r})
from pathlib import Path
from common import bench_main, markdown_table

def measure(key):
    return {{"config": key, "pid": os.getpid(), "value": float(len(key))}}

def summarise(rows):
    return {{"b_over_a": rows[1]["value"] / rows[0]["value"]}}, markdown_table(rows, ["config"])

if __name__ == "__main__":
    bench_main("fake", Path(__file__), lambda: ["a", "bb"], measure, summarise)
"""


@pytest.mark.parametrize("quick", [False, True])
def test_bench_main_runs_each_config_in_its_own_process(tmp_path: Path, quick: bool) -> None:
    script = tmp_path / "fake.py"
    script.write_text(FAKE_BENCH.format(bench=str(BENCH)))
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=_env(results, quick),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    folder = results / "raw" / "quick" if quick else results
    payload = json.loads((folder / "fake.json").read_text())
    assert payload["benchmark"] == "fake" and payload["quick"] is quick
    assert [r["config"] for r in payload["rows"]] == ["a", "bb"]
    pids = {r["pid"] for r in payload["rows"]}
    assert len(pids) == 2 and os.getpid() not in pids
    assert payload["ratios"] == {"b_over_a": 2.0}
    assert {"cores", "torch", "load_average_1min_at_end"} <= set(payload["machine"])
    assert "| a |" in (folder / "fake.md").read_text()


def _bench_module(name: str):
    """Import bench/<name>.py (it imports bench/common.py as a sibling)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_train_step_summary_reports_ratios_and_the_target() -> None:
    train_step = _bench_module("train_step")
    rows = []
    for size in train_step.SIZES:
        for arch, seconds in (("ctal", 1.2), ("hps", 1.0), ("stl", 3.0)):
            rows.append(
                {
                    "size": size,
                    "arch": arch,
                    "step_s": seconds,
                    "step_cpu_s": 2 * seconds,
                    "peak_mb": 100.0 * seconds,
                    "affinity_mode": "dense" if arch == "ctal" else None,
                    "params": 5_000_000,
                }
            )
    ratios, markdown = train_step.summarise(rows)
    assert ratios["128x128.ctal_over_hps.time"] == pytest.approx(1.2)
    assert "128x128.ctal_over_hps.time_per_round" not in ratios  # one process per arch
    assert ratios["288x384.ctal_over_stl.time"] == pytest.approx(0.4)
    assert ratios["target_ctal_over_hps_128"]["holds"] is True
    assert "CTAL/HPS time" in markdown and "288x384" in markdown


def test_train_step_summary_takes_medians_over_rounds_of_processes() -> None:
    train_step = _bench_module("train_step")
    rows = []
    # Three rounds; round 2 is a slow outlier for CTAL only.
    for round_, (ctal_s, hps_s) in enumerate(((1.2, 1.0), (1.3, 1.0), (3.0, 1.1))):
        for size in train_step.SIZES:
            for arch, seconds in (("ctal", ctal_s), ("hps", hps_s), ("stl", 3.0)):
                rows.append(
                    {
                        "size": size,
                        "arch": arch,
                        "round": round_,
                        "step_s": seconds,
                        "step_cpu_s": seconds,
                        "peak_mb": 100.0,
                        "affinity_mode": None,
                        "params": 5_000_000,
                    }
                )
    ratios, markdown = train_step.summarise(rows)
    assert ratios["128x128.ctal_over_hps.time"] == pytest.approx(1.3)  # medians 1.3 / 1.0
    assert ratios["128x128.ctal_over_hps.time_per_round"] == pytest.approx([1.2, 1.3, 3.0 / 1.1])
    assert "1.3 [1.2, 3]" in markdown  # median [min, max] of the CTAL step


def test_ctal_block_summary_takes_medians_over_rounds() -> None:
    ctal_block = _bench_module("ctal_block")
    assert ctal_block.configs()[:4] == [
        "32x32:dense:t3:r0",
        "32x32:blocked:t3:r0",
        "32x32:linear:t3:r0",
        "32x32:pooled:t3:r0",
    ]
    assert not any(key.startswith("144x192:dense") for key in ctal_block.configs())
    rows = []
    for dense_s in (1.0, 4.0, 2.0):  # three rounds, one an outlier for dense
        for (h, w), tasks in ctal_block._points():
            modes = [("blocked", 1.5, 100.0), ("linear", 0.5, 20.0), ("pooled", 0.5, 50.0)]
            if ctal_block.dense_fits((h, w), tasks):
                modes.append(("dense", dense_s, 800.0))
            for mode, seconds, mb in modes:
                rows.append(
                    {
                        "grid": f"{h}x{w}",
                        "tasks": tasks,
                        "positions": h * w,
                        "mode": mode,
                        "block_rows": 64 if mode == "blocked" else None,
                        "time_s": seconds * (4 if (h, w) == (144, 192) else 1),
                        "peak_mb": mb,
                    }
                )
    ratios, markdown = ctal_block.summarise(rows)
    assert ratios["72x96.blocked_over_dense.time"] == pytest.approx(0.75)  # 1.5 / median 2.0
    assert ratios["72x96.blocked_over_dense.memory"] == pytest.approx(0.125)
    assert ratios["72x96.t5.linear_over_dense.time"] == pytest.approx(0.25)
    assert ratios["144x192.linear_over_blocked.time"] == pytest.approx(1 / 3)
    assert "144x192.linear_over_dense.time" not in ratios  # dense does not fit there
    assert ratios["target_72x96_linear_over_dense_time"]["holds"] is True
    assert ratios["target_144x192_linear_time_over_its_72x96"]["measured"] == pytest.approx(4)
    assert ratios["72x96.auto"] == "linear" and ratios["32x32.auto"] == "dense"
    assert "medians over 3 rounds" in markdown
