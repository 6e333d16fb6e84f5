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
import yaml
from PIL import Image
from registered_thresholds import register_with_thresholds

from components.serve.process import ServerStartError, start_server
from cta_model.data.lines import DEFAULT_LINES_CONFIG
from cta_model.inference import Predictor
from cta_model.inspection import ScoreDefinition, load_inspection_config
from cta_model.model_folder import (
    InputContract,
    folder_sha256,
    save_model_folder,
)

pytestmark = pytest.mark.integration

THRESHOLD = 0.45


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


def _npz(**views: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **views)
    return buffer.getvalue()


def _default_predictor(folder: Path) -> Predictor:
    """The Predictor as the server builds it for a folder that names no reject classes."""
    config = load_inspection_config()
    default = ScoreDefinition(tuple(config.reject_classes), config.score_window_px)
    return Predictor.from_folder(folder, default_score=default)


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
        threshold=THRESHOLD,
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
    reject_classes = list(load_inspection_config().reject_classes)  # the folder names none
    assert ready.json() == {
        "model": {"uri": str(tiny_model_dir), "name": None, "version": None, "sha256": digest},
        "line": "line-a",
        "defect": {
            "threshold": THRESHOLD,
            "threshold_source": "--threshold",
            "reject_classes": [f"class_{c}" for c in reject_classes],
            "reject_class_ids": reject_classes,
            "window_px": load_inspection_config().score_window_px,
            "reason": None,
        },
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
    assert defect["threshold"] == THRESHOLD and defect["threshold_source"] == "--threshold"
    assert 0.0 <= defect["score"] <= 1.0 and defect["reason"] is None
    assert defect["reject"] == (defect["score"] >= THRESHOLD)
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
    assert _metric(after, 'cta_defect_threshold{source="--threshold"}') == THRESHOLD
    assert _metric(after, "cta_defect_score_count") - _metric(before, "cta_defect_score_count") == 3
    assert _metric(after, "cta_inflight_requests") == 0

    window = http.get(f"{server.url}/stats").json()["current"]
    assert window["n_images"] >= 3
    assert 0 <= window["stats"]["brightness"]["mean"] <= 255


def test_the_served_verdict_is_the_predictors_score_against_the_threshold(
    server, tiny_model_dir: Path
) -> None:
    images = [_image(seed) for seed in range(10, 14)]
    expected = _default_predictor(tiny_model_dir).inspect(np.stack(images)).defect_score
    http = _session()
    for image, score in zip(images, expected, strict=True):
        answer = http.post(
            f"{server.url}/predict", data=_png(image), headers={"Content-Type": "image/png"}
        )
        defect = answer.json()["defect"]
        assert defect["score"] == pytest.approx(float(score), abs=1e-5)
        assert defect["reject"] == bool(score >= THRESHOLD)


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
        # No --threshold and a folder, not a registered version: scores, no verdict.
        assert 0.0 <= row["pred_defect_score"] <= 1.0
        assert row["reject"] is None and row["threshold"] is None
    log = handle.log_path.read_text()
    assert "no operating threshold" in log and "WARNING" in log


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
        # The version has no evaluation.json: scores without a verdict, and why.
        assert answer.json()["defect"]["reject"] is None
        assert "no evaluation.json attached" in answer.json()["defect"]["reason"]
    assert (tmp_path / "cache" / digest / "weights.safetensors").is_file()


@pytest.mark.usefixtures("restore_mlflow_globals")
def test_a_registered_version_is_served_with_the_threshold_of_its_evaluation_for_the_line(
    tiny_model_dir: Path, mlflow_server: str, tmp_path: Path
) -> None:
    name = f"cta-serve-{uuid.uuid4().hex[:8]}"
    version = register_with_thresholds(
        tiny_model_dir, name, mlflow_server, tmp_path, {"line-b": 0.3, "line-c": 0.6}, 0.7
    )
    with start_server(
        f"models:/{name}/{version}",
        tracking_uri=mlflow_server,
        model_cache=tmp_path / "cache",
        line="line-b",
    ) as handle:
        defect = handle.ready["defect"]
        assert defect["threshold"] == 0.3 and defect["reason"] is None
        source = f"models:/{name}/{version} evaluation.json per_line.line-b.inspection.threshold"
        assert defect["threshold_source"] == source
        http = _session()
        image = _image(5)
        answer = http.post(
            f"{handle.url}/predict", data=_png(image), headers={"Content-Type": "image/png"}
        ).json()["defect"]
        assert answer["threshold"] == 0.3 and answer["reject"] == (answer["score"] >= 0.3)
        metrics = http.get(f"{handle.url}/metrics").text
        assert _metric(metrics, f'cta_defect_threshold{{source="{source}"}}') == 0.3
    assert f"operating threshold 0.3 on the defect score ({source})" in handle.log_path.read_text()
    # --threshold wins over the registered one.
    with start_server(
        f"models:/{name}/{version}",
        tracking_uri=mlflow_server,
        model_cache=tmp_path / "cache",
        line="line-b",
        threshold=0.9,
    ) as handle:
        assert handle.ready["defect"]["threshold"] == 0.9
        assert handle.ready["defect"]["threshold_source"] == "--threshold"


# ------------------------------------------------------------------ lines, pitch, parts
PRESS_A_FOV_MM = 2048 * 0.05  # configs/lines.yaml: the short side at the camera's pitch


def _lines_config(folder: Path, line_id: str, min_defect_width_mm: float) -> Path:
    data = yaml.safe_load(Path("configs/lines.yaml").read_text())
    for line in data["lines"]:
        if line["id"] == line_id:
            line["min_defect_width_mm"] = min_defect_width_mm
    path = folder / f"lines-{line_id}-{min_defect_width_mm:g}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def tiled_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded untrained model that tiles images at their pitch (32 px tiles), names its
    classes and reject classes and was trained at 3.2 mm/px (press-a's field of view over
    32 px)."""
    import torch

    from cta_model.data.synthetic import CLASS_NAMES
    from cta_model.nn.models import ModelSpec, build_model

    torch.manual_seed(0)
    spec = ModelSpec(
        arch="ctal",
        tasks=("semseg", "height", "normals"),
        input_size=(32, 32),
        backbone="resnet18",
        output_stride=8,
        num_classes=len(CLASS_NAMES),
    )
    return save_model_folder(
        build_model(spec),
        tmp_path_factory.mktemp("tiled") / "model",
        class_names=CLASS_NAMES,
        input_contract=InputContract(resize_policy="tile", tile_overlap_px=8),
        inspection=ScoreDefinition((5, 6, 7, 8), 3),
        trained_pitch_mm_per_px=(PRESS_A_FOV_MM / 32, PRESS_A_FOV_MM / 32),
    )


def test_a_line_whose_smallest_defect_the_model_cannot_see_is_refused_at_start(
    tiny_model_dir: Path, tiled_model_dir: Path, tmp_path: Path
) -> None:
    # The shipped inventory: press-a's 2048x2448 camera images resized to 32x32 show its
    # 0.8 mm defects over 0.2 px.
    with pytest.raises(
        ServerStartError, match=r"(?s)exited with 2.*line press-a: its smallest defect.*0\.21 px"
    ):
        start_server(
            str(tiny_model_dir),
            line="press-a",
            lines_config=DEFAULT_LINES_CONFIG,
            ready_timeout_s=120,
        )
    # Tiles keep the camera's 0.05 mm/px: a 0.1 mm defect is 2 px there.
    lines = _lines_config(tmp_path, "press-a", 0.1)
    with pytest.raises(ServerStartError, match=r"(?s)exited with 2.*line press-a.*2\.00 px"):
        start_server(str(tiled_model_dir), line="press-a", lines_config=lines, ready_timeout_s=120)


def test_a_line_server_checks_each_images_pitch_and_judges_parts(
    tiled_model_dir: Path, tmp_path: Path
) -> None:
    # 14 mm on press-a: 4.4 px on a 32 px image (3.2 mm/px), 3.3 px on 24 px, 1.1 px on 8 px.
    lines = _lines_config(tmp_path, "press-a", 14.0)
    candidates = {
        "noise": _image(1),
        "black": np.zeros((32, 32, 3), np.uint8),
        "white": np.full((32, 32, 3), 255, np.uint8),
        "red": np.tile(np.array([255, 0, 0], np.uint8), (32, 32, 1)),
    }
    predictor = Predictor.from_folder(tiled_model_dir)
    scores = {k: float(predictor.inspect(v).defect_score[0]) for k, v in candidates.items()}
    low, high = min(scores, key=scores.get), max(scores, key=scores.get)
    assert scores[high] - scores[low] > 1e-4, scores
    threshold = (scores[low] + scores[high]) / 2
    headers = {"Content-Type": "application/x-npz"}
    with start_server(
        str(tiled_model_dir), line="press-a", lines_config=lines, threshold=threshold
    ) as handle:
        http = _session()
        # The model's own reject classes and names, not the inspection config's.
        assert handle.ready["defect"]["reject_classes"] == ["scratch", "dent", "bump", "crack"]

        small = http.post(
            f"{handle.url}/predict", data=_png(_image(0, 8)), headers={"Content-Type": "image/png"}
        )
        assert small.status_code == 422
        assert "line press-a" in small.json()["error"] and "1.09 px" in small.json()["error"]
        for _ in range(2):  # 4.3 mm/px: allowed, but > 25 % off the trained 3.2 mm/px
            answer = http.post(
                f"{handle.url}/predict",
                data=_png(_image(3, 24)),
                headers={"Content-Type": "image/png"},
            )
            assert answer.status_code == 200, answer.text

        part = http.post(
            f"{handle.url}/predict",
            data=_npz(first=candidates[low], second=candidates[high]),
            headers=headers,
        )
        assert part.status_code == 200, part.text
        body = part.json()
        assert [view["view"] for view in body["views"]] == ["first", "second"]
        for view, name in zip(body["views"], (low, high), strict=True):
            assert view["defect"]["score"] == pytest.approx(scores[name], abs=1e-5)
            assert view["defect"]["reject"] == (name == high)
            assert set(view) == {"view", "defect", "tasks", "dimensions"}
        verdict = body["part"]
        assert verdict["score"] == pytest.approx(scores[high], abs=1e-5)
        assert verdict["reject"] is True and verdict["rejected_views"] == ["second"]
        assert verdict["n_views"] == 2 and verdict["threshold"] == threshold

        # One (B, H, W, 3) array: B views of the part; none rejected, so the part passes.
        batch = http.post(
            f"{handle.url}/predict",
            data=_npz(views=np.stack([candidates[low]] * 3)),
            headers=headers,
        ).json()
        assert [view["view"] for view in batch["views"]] == ["views/0", "views/1", "views/2"]
        assert batch["part"]["reject"] is False and batch["part"]["rejected_views"] == []

        # Every view meets the line's resolution rule.
        mixed = http.post(
            f"{handle.url}/predict",
            data=_npz(top=candidates[low], corner=_image(0, 8)),
            headers=headers,
        )
        assert mixed.status_code == 422 and "view 'corner'" in mixed.json()["error"]
        outputs = http.post(
            f"{handle.url}/predict?outputs=npz",
            data=_npz(top=candidates[low], side=candidates[high]),
            headers=headers,
        )
        arrays = np.load(io.BytesIO(outputs.content))
        assert arrays["top/semseg"].shape == (32, 32)
        assert arrays["side/normals"].shape == (32, 32, 3)
    log = handle.log_path.read_text()
    assert log.count("outside the model's trained pitch") == 1
