"""`cta validate-data` under the issue-18 probes, in fresh processes: a 419 KB PNG declaring
12000 x 12000 pixels (sha256 matching) is named and refused under 1 GB peak RSS; the
duplicate-row manifest exits 2 on each of 50 runs (it used to abort now and then with exit
134, "terminate called without an active exception": Arrow's thread pools at exit)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from png_bombs import black_png

from cta_model.data.line_dataset import MANIFEST_NAME, sha256_hex
from cta_model.data.synthetic_dataset import generate_dataset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

MIB = 1024 * 1024
PEAK_LIMIT_MIB = 1024
REPETITIONS = 50

# Runs the CLI as a child and reports the child's exit code and peak RSS (ru_maxrss: KiB).
_MEASURE = """
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": done.returncode, "stderr": done.stderr, "peak_kib": peak}))
"""


def cta(*args: str) -> list[str]:
    return [sys.executable, "-m", "cta_cli", *args]


def measured(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cta(*args)], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("limits") / "ds"
    return generate_dataset(
        root, n_lines=2, samples_per_line=6, height=32, width=32, progress=False
    )


def test_a_12000_pixel_square_png_is_named_under_1_gb(dataset_root, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(dataset_root, root)
    table = pq.read_table(root / MANIFEST_NAME)
    rows = table.to_pylist()
    bomb = black_png(12000, 12000)
    assert len(bomb) < 430_000  # ~419 KB on disk, 432 MB decoded
    (root / rows[0]["image_path"]).write_bytes(bomb)
    rows[0]["sha256_image"] = sha256_hex(bomb)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), root / MANIFEST_NAME)

    clean = measured("validate-data", str(dataset_root), "--out", str(tmp_path / "clean"))
    bombed = measured("validate-data", str(root), "--out", str(tmp_path / "bombed"))
    assert clean["rc"] == 0, clean["stderr"]
    assert bombed["rc"] == 1, bombed["stderr"]
    assert f"{root}/{rows[0]['image_path']}: image: 12000x12000 pixels" in bombed["stderr"]
    peak_mib = bombed["peak_kib"] / 1024
    print(f"peak RSS: clean {clean['peak_kib'] / 1024:.0f} MiB, 12000x12000 {peak_mib:.0f} MiB")
    assert peak_mib < PEAK_LIMIT_MIB
    # The refused image costs next to nothing over a clean run (its bytes, the sha256).
    assert bombed["peak_kib"] - clean["peak_kib"] < 100 * 1024


def test_the_duplicate_row_case_exits_2_every_time(dataset_root, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(dataset_root, root)
    table = pq.read_table(root / MANIFEST_NAME)
    duplicated = pa.concat_tables([table, table.slice(2, 1)])
    pq.write_table(duplicated, root / MANIFEST_NAME)
    sample_id = table["sample_id"][2].as_py()
    codes = []
    for repetition in range(REPETITIONS):
        done = subprocess.run(
            cta("validate-data", str(root), "--out", str(tmp_path / "out")),
            capture_output=True,
            text=True,
        )
        codes.append(done.returncode)
        assert done.returncode == 2, (repetition, done.returncode, done.stderr[-2000:])
        assert f"({sample_id}): sample_id duplicates row 2" in done.stderr
        assert "terminate called" not in done.stderr
    assert codes == [2] * REPETITIONS
