"""`cta serve` as a real subprocess on loopback (components.serve.process.start_server)."""

from __future__ import annotations

import io
import json
import shutil
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from PIL import Image

from components.serve.process import ServerStartError, start_server
from cta_model.model_folder import folder_sha256

pytestmark = pytest.mark.integration


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxy for loopback
    return session


def _image(seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _metric(text: str, name: str) -> float:
    """The value of one sample line (``name`` includes labels) of Prometheus text; 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    stats_dir = tmp_path_factory.mktemp("serve-stats")
    with start_server(
        str(tiny_model_dir),
        line="line-a",
        threshold_px=1,
        stats_dir=stats_dir,
        stats_window_s=3600,
        log_level="debug",
    ) as handle:
        handle.stats_dir = stats_dir
        yield handle


def test_health_ready_and_predict(server, tiny_model_dir: Path) -> None:
    http = _session()
    assert http.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = http.get(f"{server.url}/readyz")
    assert ready.status_code == 200
    digest = folder_sha256(tiny_model_dir)
    assert ready.json() == {
        "model": {"uri": str(tiny_model_dir), "name": None, "version": None, "sha256": digest},
        "line": "line-a",
    }
    before = http.get(f"{server.url}/metrics").text

    image = _image()
    by_png = http.post(
        f"{server.url}/predict", data=_png(image), headers={"Content-Type": "image/png"}
    )
    assert by_png.status_code == 200, by_png.text
    body = by_png.json()
    assert body["model"]["sha256"] == digest
    fractions = body["tasks"]["semseg"]["class_fractions"]
    assert len(fractions) == 10 and sum(fractions) == pytest.approx(1.0, abs=1e-4)
    defect = body["defect"]
    assert defect["threshold_px"] == 1
    assert defect["reject"] == (defect["reject_area_px"] >= 1)
    assert set(body["tasks"]) == {"semseg", "height", "normals"}
    assert body["tasks"]["height"]["p95_mm"] >= body["tasks"]["height"]["mean_mm"] - 1e-6
    assert sum(region["area_px"] for region in body["dimensions"]) == 32 * 32

    by_npy = http.post(
        f"{server.url}/predict", data=_npy(image), headers={"Content-Type": "application/x-npy"}
    )
    assert by_npy.status_code == 200, by_npy.text
    # The same pixels by either encoding: the same answer.
    assert by_npy.json()["tasks"] == body["tasks"]

    npz = http.post(
        f"{server.url}/predict?outputs=npz",
        data=_png(_image(1, 48)),
        headers={"Content-Type": "image/png"},
    )
    assert npz.status_code == 200 and npz.headers["content-type"] == "application/x-npz"
    arrays = np.load(io.BytesIO(npz.content))
    assert arrays["semseg"].shape == (48, 48) and arrays["normals"].shape == (48, 48, 3)

    refused = http.post(f"{server.url}/predict", data=b"x", headers={"Content-Type": "text/csv"})
    assert refused.status_code == 415 and "text/csv" in refused.json()["error"]

    after = http.get(f"{server.url}/metrics").text
    ok = 'cta_requests_total{code="200"}'
    assert _metric(after, ok) - _metric(before, ok) == 3
    assert _metric(after, 'cta_requests_total{code="415"}') >= 1
    count = "cta_request_latency_seconds_count"
    assert _metric(after, count) - _metric(before, count) == 3
    assert f'cta_model_info{{line="line-a",name="",sha256="{digest}",version=""}} 1.0' in after
    assert _metric(after, "cta_inflight_requests") == 0

    window = http.get(f"{server.url}/stats").json()["current"]
    assert window["n_images"] >= 3
    assert 0 <= window["stats"]["brightness"]["mean"] <= 255


def test_statistics_windows_on_metrics_and_in_snapshots(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    images = [_image(seed) for seed in range(3)]
    luma = np.array([0.299, 0.587, 0.114])
    brightness = [float((image.astype(float) @ luma).mean()) for image in images]
    with start_server(str(tiny_model_dir), stats_dir=tmp_path, stats_window_s=1) as handle:
        http = _session()
        for image in images:
            answer = http.post(
                f"{handle.url}/predict", data=_png(image), headers={"Content-Type": "image/png"}
            )
            assert answer.status_code == 200
        deadline = time.monotonic() + 30
        while not _metric(http.get(f"{handle.url}/metrics").text, "cta_stats_window_images"):
            assert time.monotonic() < deadline, "no statistics window published"
            time.sleep(0.2)
        metrics = http.get(f"{handle.url}/metrics").text
        median = _metric(metrics, 'cta_stats_window{agg="p50",stat="brightness"}')
        assert min(brightness) <= median <= max(brightness)
        assert _metric(metrics, "cta_stats_window_end_timestamp_seconds") > 0
        # Graceful: uvicorn finishes, then re-raises the SIGTERM it caught.
        assert handle.stop() == -signal.SIGTERM
    snapshots = sorted(tmp_path.glob(f"stats-*-{handle.pid}.jsonl"))
    rows = [json.loads(line) for path in snapshots for line in path.read_text().splitlines()]
    assert len(rows) == 3  # every image once, across however many windows it took
    rows.sort(key=lambda row: row["unix_time"])
    for row, expected in zip(rows, brightness, strict=True):
        assert row["brightness"] == pytest.approx(expected)
        assert row["model_sha256"] == folder_sha256(tiny_model_dir)
        assert sum(row[f"pred_frac_class_{i}"] for i in range(10)) == pytest.approx(1.0)
        for key in ("contrast", "ratio_rg", "ratio_bg", "pred_height_mean_mm", "latency_ms"):
            assert np.isfinite(row[key])


def test_tampered_or_unexpected_folder_is_refused_at_start(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    weights = bytearray((copy / "weights.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (copy / "weights.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ServerStartError, match="weights.safetensors: sha256 differs"):
        start_server(str(copy), ready_timeout_s=120)
    with pytest.raises(ServerStartError, match="(?s)exited with 2.*!= expected 0{64}"):
        start_server(str(tiny_model_dir), sha256="0" * 64, ready_timeout_s=120)


def test_saturation_answers_503_then_recovers(tiny_model_dir: Path) -> None:
    body = _png(_image())
    headers = {"Content-Type": "image/png"}
    with start_server(
        str(tiny_model_dir), max_concurrency=1, extra_args=["--debug-delay-ms", "3000"]
    ) as handle:

        def post(_: int) -> requests.Response:
            return _session().post(f"{handle.url}/predict", data=body, headers=headers)

        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(post, range(4)))
        codes = sorted(answer.status_code for answer in answers)
        assert codes == [200, 503, 503, 503]
        saturated = [answer for answer in answers if answer.status_code == 503]
        assert all(answer.headers["retry-after"] == "1" for answer in saturated)
        assert "saturated" in saturated[0].json()["error"]
        assert post(0).status_code == 200  # recovered once the slot is free
        metrics = _session().get(f"{handle.url}/metrics").text
        assert _metric(metrics, 'cta_requests_total{code="503"}') == 3
        assert _metric(metrics, 'cta_requests_total{code="200"}') == 2


@pytest.mark.usefixtures("restore_mlflow_globals")
def test_serves_a_registered_version_by_alias(
    tiny_model_dir: Path, mlflow_server: str, tmp_path: Path
) -> None:
    from components.register_model.step import run as register
    from components.train.logged_model import log_model_folder

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment(f"cta-serve-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run():
        model_id = log_model_folder(tiny_model_dir).model_id
    name = f"cta-serve-{uuid.uuid4().hex[:8]}"
    version = register(model_id, name, tracking_uri=mlflow_server)["version"]
    digest = folder_sha256(tiny_model_dir)
    with start_server(
        f"models:/{name}@challenger",
        sha256=digest,
        tracking_uri=mlflow_server,
        model_cache=tmp_path / "cache",
        line="line-b",
    ) as handle:
        assert handle.ready["model"] == {
            "uri": f"models:/{name}@challenger",
            "name": name,
            "version": version,
            "sha256": digest,
        }
        answer = _session().post(
            f"{handle.url}/predict", data=_png(_image()), headers={"Content-Type": "image/png"}
        )
        assert answer.status_code == 200 and answer.json()["model"]["version"] == version
    assert (tmp_path / "cache" / digest / "weights.safetensors").is_file()
