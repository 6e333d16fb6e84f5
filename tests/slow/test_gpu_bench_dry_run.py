"""bench/gpu.sh --dry-run runs every row on the CPU and writes its JSON (slow: ~1-2 min)."""

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_dry_run_writes_every_row(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--max-seconds", "600",
         "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["dry_run"] is True
    names = [row["row"] for row in payload["rows"]]
    assert names == ["ctal-dense", "ctal-blocked", "ctal-linear", "hps"]
    for row in payload["rows"]:
        assert row["images_per_s"] > 0
        assert row["train_gflops_per_image"] > 0
        assert row["mfu"] > 0
    # CTAL pays for the affinity block; HPS is the same network without it.
    ctal, linear, hps = payload["rows"][0], payload["rows"][2], payload["rows"][3]
    assert ctal["train_gflops_per_image"] > hps["train_gflops_per_image"]
    # Each row counts the FLOPs of the mode it runs (on a 4 x 4 grid linear costs more).
    assert (ctal["affinity_mode"], linear["affinity_mode"]) == ("dense", "linear")
    assert linear["train_gflops_per_image"] != ctal["train_gflops_per_image"]
