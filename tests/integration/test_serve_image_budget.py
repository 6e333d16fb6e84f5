"""Decoded-image budget of `cta serve` (issue 18 finding 2): the largest image is derived from
the line's camera and the model's input (not a fixed 16 MP) and checked from the image header
before decoding; the decoded bytes in flight are bounded, so concurrent largest-allowed images
keep the server's peak RSS under the line pod's memory limit (infra/k8s/lines: 4Gi)."""

from __future__ import annotations

import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from components.serve.process import start_server
from components.serve.server import IMAGE_PIXELS_FACTOR

pytestmark = pytest.mark.integration

LINE = "press-a"
POD_MEMORY_LIMIT_MB = 4096  # infra/k8s/lines/base/serve.yaml limits.memory
CONCURRENT = 8


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def _png(height: int, width: int) -> bytes:
    """A smooth height x width PNG: a few KB for millions of pixels."""
    row = (np.arange(width, dtype=np.uint32) * 255 // max(width - 1, 1)).astype(np.uint8)
    image = np.broadcast_to(row[None, :, None], (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, "PNG", optimize=False)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def lines_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/lines.yaml with press-a's camera, its 3-pixel rule off (the tiny 32x32 test
    model could not see its defects)."""
    data = yaml.safe_load(Path("configs/lines.yaml").read_text())
    for line in data["lines"]:
        line.pop("min_defect_width_mm", None)
    path = tmp_path_factory.mktemp("lines") / "lines.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _camera_limit(lines_config: Path) -> tuple[int, int, int]:
    line = next(x for x in yaml.safe_load(lines_config.read_text())["lines"] if x["id"] == LINE)
    height, width = line["resolution"]
    return height, width, math.ceil(IMAGE_PIXELS_FACTOR * height * width)


def test_a_tiny_huge_png_is_refused_from_its_header(tiny_model_dir: Path, lines_config) -> None:
    """56 KB claiming 4000 x 4000 (16 MP, inside the old fixed limit): refused with 413
    naming the line's limit, without the server's peak memory moving (decoding it would
    take 48 MB for the RGB array alone)."""
    body = _png(4000, 4000)
    assert len(body) < 100_000
    _, _, limit = _camera_limit(lines_config)
    with start_server(
        str(tiny_model_dir), line=LINE, lines_config=lines_config, stats_window_s=0
    ) as handle:
        http = _session()
        warm = http.post(
            f"{handle.url}/predict", data=_png(32, 32), headers={"Content-Type": "image/png"}
        )
        assert warm.status_code == 200
        peak_before = _status_kb(handle.pid, "VmHWM")
        answer = http.post(
            f"{handle.url}/predict", data=body, headers={"Content-Type": "image/png"}
        )
        growth_kb = _status_kb(handle.pid, "VmHWM") - peak_before
    assert answer.status_code == 413, answer.text
    assert (
        f"4000x4000 = 16000000 pixels exceeds the limit of {limit} pixels" in answer.json()["error"]
    )
    assert growth_kb < 16 * 1024, f"peak RSS rose by {growth_kb} kB: the image was decoded"
    assert (
        f"largest image: {limit} pixels ({IMAGE_PIXELS_FACTOR:g} x the larger of line "
        f"{LINE}'s camera" in handle.log_path.read_text()
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_concurrent_largest_allowed_images_stay_under_the_pod_memory_limit(
    tiny_model_dir: Path, lines_config, tmp_path: Path
) -> None:
    """Eight concurrent images of the largest size press-a's server takes, with four
    inference threads (what min(4, cores) gives on a line node): peak RSS (VmHWM) measured."""
    camera_h, camera_w, limit = _camera_limit(lines_config)
    # The largest image of the camera's aspect within the limit.
    width = math.isqrt(limit * camera_w // camera_h)
    height = limit // width
    assert height * width <= limit
    body = _png(height, width)
    with start_server(
        str(tiny_model_dir),
        line=LINE,
        lines_config=lines_config,
        stats_window_s=0,
        inference_threads=4,
        ready_timeout_s=300,
    ) as handle:
        http = _session()
        assert (
            http.post(
                f"{handle.url}/predict", data=_png(32, 32), headers={"Content-Type": "image/png"}
            ).status_code
            == 200
        )
        idle_kb = _status_kb(handle.pid, "VmHWM")

        def post(_: int) -> int:
            return (
                _session()
                .post(
                    f"{handle.url}/predict",
                    data=body,
                    headers={"Content-Type": "image/png"},
                    timeout=600,
                )
                .status_code
            )

        with ThreadPoolExecutor(max_workers=CONCURRENT) as pool:
            codes = list(pool.map(post, range(CONCURRENT)))
        peak_kb = _status_kb(handle.pid, "VmHWM")
    figures = {
        "image": f"{height}x{width}",
        "pixels": height * width,
        "concurrent": CONCURRENT,
        "idle_peak_mb": round(idle_kb / 1024),
        "peak_rss_mb": round(peak_kb / 1024),
        "pod_limit_mb": POD_MEMORY_LIMIT_MB,
    }
    print(json.dumps(figures))
    out = os.environ.get("CTA_MEMORY_FIGURES")
    if out:
        Path(out).write_text(json.dumps(figures) + "\n")
    assert codes == [200] * CONCURRENT
    # Room to spare: a quarter of the pod's limit left for bodies being read and the runtime.
    assert peak_kb / 1024 < 0.75 * POD_MEMORY_LIMIT_MB, figures
