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


def _quality_rows(
    auroc: dict[str, list[float]], semseg: dict[str, list[float]], sha: str
) -> list[dict]:
    """Rows of bench/quality.py with fixed figures; height and normals equal for every arch,
    so Delta_m is the semseg mIoU's relative gain / 3 tasks."""
    rows = []
    for arch in ("stl", "hps", "ctal"):
        for seed, (value, miou) in enumerate(zip(auroc[arch], semseg[arch], strict=True)):
            figures = {
                "image_auroc": value,
                "aupro": value - 0.1,
                "recall_at_frr": value - 0.2,
                "n_good": 50,
                "n_defective": 50,
                "metrics": {"semseg.miou": miou, "height.abs_err_mm": 1.0, "normals.mean": 10.0},
            }
            rows.append(
                {
                    "size": "cpu",
                    "arch": arch,
                    "seed": seed,
                    "data_sha256": sha,
                    "params": 1e6,
                    "groups": {"pooled": figures, "press-a": figures},
                }
            )
    return rows


def test_quality_summary_pairs_seeds_and_judges_the_targets() -> None:
    quality = _bench_module("quality")
    pinned = quality.SIZES["cpu"]["data_sha256"]
    auroc = {
        "stl": [0.90, 0.91, 0.92, 0.93, 0.94],
        "hps": [0.95, 0.96, 0.97, 0.98, 0.99],
        "ctal": [0.97, 0.99, 0.98, 0.99, 1.00],
    }
    semseg = {
        "stl": [0.5] * 5,
        "hps": [0.5, 0.5, 0.53, 0.5, 0.5],  # Delta_m 0, 0, +2, 0, 0 %
        "ctal": [0.53, 0.56, 0.53, 0.515, 0.53],  # Delta_m +2, +4, +2, +1, +2 %
    }
    ratios, markdown = quality.summarise(_quality_rows(auroc, semseg, pinned))
    pooled = ratios["groups"]["pooled"]
    assert pooled["archs"]["ctal"]["image_auroc"] == pytest.approx(
        {"mean": 0.986, "min": 0.97, "max": 1.0}
    )
    vs_hps = pooled["paired"]["ctal_minus_hps"]
    # CTAL - HPS per seed: +0.02, +0.03, +0.01, +0.01, +0.01 -> mean 0.016, sd 0.008944;
    # t(0.975, 4) = 2.776445 -> half width 2.776445 * 0.008944 / sqrt(5) = 0.011106.
    auroc_gap = vs_hps["image_auroc"]
    assert auroc_gap["differences"] == pytest.approx([0.02, 0.03, 0.01, 0.01, 0.01])
    assert auroc_gap["mean"] == pytest.approx(0.016)
    assert auroc_gap["interval"] == pytest.approx([0.016 - 0.011106, 0.016 + 0.011106], abs=1e-5)
    assert auroc_gap["wins"] == 5
    # Delta_m: CTAL - HPS per seed +2, +4, 0, +1, +2 % -> mean 1.8, sd 1.48324,
    # half width 2.776445 * 1.48324 / sqrt(5) = 1.84169: lower bound -0.0417 < 0.
    delta = vs_hps["delta_m"]
    assert delta["differences"] == pytest.approx([2.0, 4.0, 0.0, 1.0, 2.0], abs=1e-9)
    assert delta["interval"][0] == pytest.approx(1.8 - 1.84169, abs=1e-4)
    assert delta["wins"] == 4
    assert pooled["paired"]["ctal_minus_stl"]["delta_m"]["mean"] == pytest.approx(2.2)
    assert pooled["paired"]["ctal_minus_stl"]["aupro"]["wins"] == 5
    verdicts = ratios["targets"]
    assert verdicts["ctal_image_auroc_ge_0.98"]["verdict"] == "held"
    assert verdicts["ctal_delta_m_above_hps_lower_bound_gt_0"]["verdict"] == "not held"
    assert "5 of 5 seeds" in markdown and "**not held**" in markdown
    assert "Pilot line press-a alone" in markdown
    assert "Code: not recorded (seeds 0, 1, 2, 3, 4)." in markdown
    rows = _quality_rows(auroc, semseg, pinned)
    for row in rows:
        row["git_commit"] = ("a" if row["seed"] < 2 else "b") * 40
    _, markdown = quality.summarise(rows)
    assert "Code: aaaaaaaaaa (seeds 0, 1); bbbbbbbbbb (seeds 2, 3, 4)." in markdown


def test_quality_summary_of_fewer_seeds_judges_no_target() -> None:
    quality = _bench_module("quality")
    pinned = quality.SIZES["cpu"]["data_sha256"]
    auroc = {"stl": [0.9, 0.9], "hps": [0.95, 0.96], "ctal": [0.99, 0.995]}
    semseg = {"stl": [0.5, 0.5], "hps": [0.5, 0.5], "ctal": [0.6, 0.6]}
    ratios, markdown = quality.summarise(_quality_rows(auroc, semseg, pinned))
    assert ratios["seeds"] == 2 and ratios["seeds_required"] == 5
    for target in ratios["targets"].values():
        assert target["verdict"] == "not judged (2 of 5 seeds)"
    assert "2 of 5 seeds" in markdown and "held**" not in markdown


def test_quality_report_prints_gaps_that_cancel_as_zero() -> None:
    quality = _bench_module("quality")
    pinned = quality.SIZES["cpu"]["data_sha256"]
    # CTAL - HPS image AUROC per seed: 0.97 - 0.96 and 0.93 - 0.94, equal and opposite up to
    # float rounding (their mean is 5.6e-17, not 0).
    auroc = {"stl": [0.9, 0.9], "hps": [0.96, 0.94], "ctal": [0.97, 0.93]}
    semseg = {"stl": [0.5, 0.5], "hps": [0.5, 0.5], "ctal": [0.5, 0.5]}
    ratios, markdown = quality.summarise(_quality_rows(auroc, semseg, pinned))
    assert ratios["groups"]["pooled"]["paired"]["ctal_minus_hps"]["image_auroc"]["mean"] != 0
    row = next(line for line in markdown.splitlines() if "| CTAL - HPS | image AUROC |" in line)
    assert "| +0 |" in row and "e-17" not in markdown


def test_quality_refuses_data_that_is_not_the_pinned_data(tmp_path: Path) -> None:
    quality = _bench_module("quality")
    archs = ("stl", "hps", "ctal")
    rows = _quality_rows({a: [0.9] for a in archs}, {a: [0.5] for a in archs}, "0" * 64)
    with pytest.raises(SystemExit, match="pins 1a320a4d"):
        quality.summarise(rows)
    # A regenerated dataset is checked by its manifest's bytes.
    (tmp_path / "manifest.parquet").write_bytes(b"not the pinned manifest")
    with pytest.raises(quality.DataMismatch, match="size 'cpu'"):
        quality.check_data_sha("cpu", quality.manifest_sha256(tmp_path))
    quality.check_data_sha("cpu", quality.SIZES["cpu"]["data_sha256"])  # the pinned one passes


def test_bench_main_continues_from_cached_runs(tmp_path: Path) -> None:
    script = tmp_path / "fake.py"
    script.write_text(
        FAKE_BENCH.format(bench=str(BENCH)).replace(
            'lambda: ["a", "bb"], measure, summarise)',
            'lambda: ["a", "bb"], measure, summarise, cache_dir=Path(os.environ["FAKE_CACHE"]), '
            'cache_tag="v1", estimate_s=lambda key: 60.0)',
        )
    )
    results, cache = tmp_path / "results", tmp_path / "cache"

    def run() -> tuple[dict, str]:
        done = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            env={**_env(results, quick=False), "FAKE_CACHE": str(cache)},
            timeout=180,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads((results / "fake.json").read_text()), done.stdout

    first, output = run()
    assert "2 runs, 2 to do; estimated 2 min" in output and "ETA" in output
    (cache / "bb.json").unlink()  # as if interrupted during the second run
    second, output = run()
    assert "2 runs, 1 to do (1 cached" in output and "estimated 60 s" in output
    assert second["rows"][0]["pid"] == first["rows"][0]["pid"]  # the cached row, not re-run
    assert second["rows"][1]["pid"] != first["rows"][1]["pid"]
