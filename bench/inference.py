"""Inference latency of one CTAL model: eager vs torch.export (.pt2) vs ONNX Runtime fp32 vs
int8 (static PTQ, affinity block in float), at batch 1 and 8, plus the int8 metric check.

Rows, each in a fresh subprocess (bench/common.py), in this order:
- `prepare`: synthetic line dataset (cached), a short CTAL training run (the real trainer), then
  `cta_model.export.export_model` with every format (int8 calibrated on `train`); the row holds
  the export errors vs eager and the quantized layer count. Children after it reuse the files.
- `metrics`: the primary metric of every task on the `test` split for eager, ONNX fp32 and int8,
  all through the one Predictor's preprocessing and decoding; int8 must be within 1% relative
  of fp32 (issue 8).
- `<engine>:b<batch>`: latency of the network alone on a normalised batch (the preprocessing is
  the same code for every engine), median of repeats after warm-up.

    python bench/inference.py [--quick]      # -> bench/results/inference.{json,md}
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO_ROOT,
    bench_main,
    markdown_table,
    peak_rss_mb,
    quick,
    timed_median,
    work_dir,
)

ENGINES = ("eager", "pt2", "onnx", "int8")
BATCHES = (1, 8)
TARGET_INT8_OVER_FP32 = 0.6  # issue 8
TARGET_METRIC_REL = 0.01
# One intra-op thread for every engine: CPU time is then the work itself (no spinning pool
# threads), and the ratios hold even while other jobs share the cores.
LATENCY_THREADS = 1


def settings() -> dict[str, Any]:
    """Sizes; `BENCH_INFERENCE_TRAIN_STEPS` overrides the training steps (0: an untrained
    model, enough for latency, not for the metric check)."""
    # `scene`: the synthetic scenes' side; the network sees `size` px tiles cut from them at
    # their own pitch (configs/demo.yaml's tiling), as training refuses a pitch at which a
    # line's smallest defect spans fewer than 3 px.
    if quick():
        chosen = {
            "size": 64,
            "scene": 384,
            "samples_per_line": 8,
            "train_steps": 2,
            "calib": 4,
            "repeats": 2,
        }
    else:
        chosen = {
            "size": 128,
            "scene": 384,
            "samples_per_line": 40,
            "train_steps": 120,
            "calib": 32,
            "repeats": 10,
        }
    steps = os.environ.get("BENCH_INFERENCE_TRAIN_STEPS")
    return {**chosen, "train_steps": int(steps)} if steps else chosen


def configs() -> list[str]:
    return ["prepare", "metrics"] + [f"{e}:b{b}" for b in BATCHES for e in ENGINES]


def _paths() -> dict[str, Path]:
    work = work_dir("inference")
    return {"work": work, "model": work / "train" / "model", "export": work / "export"}


def _dataset_root() -> Path:
    from cta_model.train_config import DataConfig
    from cta_model.training.datasets import ensure_synthetic_dataset

    s = settings()
    data = DataConfig(
        synthetic={"lines": 3, "samples_per_line": s["samples_per_line"], "size": s["scene"]},
        cache_dir=str(REPO_ROOT / ".cta" / "cache"),
    )
    return ensure_synthetic_dataset(data)


def _reusable(record: Path, s: dict[str, Any]) -> dict[str, Any] | None:
    """The previous prepare row when it was made with these settings and its files verify (a
    rerun after a failed later row need not train and export again)."""
    from cta_model.errors import DataError
    from cta_model.export import verify_export
    from cta_model.model_folder import verify_checksums

    if not record.is_file():
        return None
    row = json.loads(record.read_text())
    if row.get("settings") != s:
        return None
    try:
        verify_checksums(_paths()["model"])
        verify_export(_paths()["export"])
    except DataError:
        return None
    return {**row, "reused": True}


def _spec(config: Any) -> Any:
    """The ModelSpec the trainer would build from ``config`` on the synthetic data."""
    from cta_model.data.synthetic import NUM_CLASSES
    from cta_model.nn.models import ModelSpec

    m = config.model
    return ModelSpec(
        arch=m.arch,
        tasks=m.tasks,
        input_size=m.input_size,
        backbone=m.backbone,
        num_classes=m.num_classes or NUM_CLASSES,
    )


def prepare() -> dict[str, Any]:
    import shutil

    from cta_model.atomic import write_bytes_atomic
    from cta_model.data.line_dataset import LineDataset
    from cta_model.export import export_model
    from cta_model.model_folder import save_model_folder
    from cta_model.nn.models import build_model
    from cta_model.train_config import load_train_config
    from cta_model.training import train

    s = settings()
    paths = _paths()
    record = paths["work"] / "prepare.json"
    previous = _reusable(record, s)
    if previous is not None:
        return previous
    shutil.rmtree(paths["work"], ignore_errors=True)
    root = _dataset_root()
    config = load_train_config(
        REPO_ROOT / "configs" / "demo.yaml",
        {
            "model.input_size": [s["size"], s["size"]],
            "data.synthetic": None,
            "data.path": str(root),
            "epochs": None,
            "max_steps": max(s["train_steps"], 1),
            "output": str(paths["work"] / "train"),
            "deterministic": False,
            # fp32 NCHW training: the exported graphs are fp32, so eager and ONNX compare in
            # one arithmetic (a bf16 model.yaml would make the eager Predictor score in bf16).
            "precision": "fp32",
            "channels_last": False,
        },
    )
    started = time.perf_counter()
    if s["train_steps"] > 0:
        train(config, resume="never")
    else:
        save_model_folder(build_model(_spec(config)), paths["model"])
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    result = export_model(
        paths["model"],
        paths["export"],
        calib_data=LineDataset(root, split="train"),
        calib_samples=s["calib"],
        log=lambda message: print(message, file=sys.stderr),
    )
    row = {
        "config": "prepare",
        "settings": s,
        "reused": False,
        "size": s["size"],
        "train_steps": s["train_steps"],
        "train_s": train_s,
        "export_s": time.perf_counter() - started,
        "max_abs_error_vs_eager": result["max_abs_error_vs_eager"],
        "n_quantized_layers": len(result["quantized_layers"]),
        "n_excluded_nodes": len(result["excluded_nodes"]),
        "quantized_layers": result["quantized_layers"],
        "files": {name: entry["bytes"] for name, entry in result["files"].items()},
    }
    write_bytes_atomic(record, (json.dumps(row, indent=2) + "\n").encode())
    return row


def _primary_metrics(predictor: Any, dataset: Any, batch_size: int = 8) -> dict[str, float]:
    from components.evaluate.scoring import meter_inputs
    from cta_model.tasks import get_task, make_meters

    tasks = predictor.tasks
    num_classes = predictor.card.spec.num_classes
    meters = make_meters(tasks, num_classes=num_classes)
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        predictions = predictor.predict([s["image"] for s in samples])
        for task in tasks:
            meters[task].update(*meter_inputs(task, predictions[task], samples, num_classes))
    out = {}
    for task in tasks:
        name = get_task(task).primary_metric.name
        out[f"{task}.{name}"] = float(meters[task].compute()[name])
    return out


def metrics() -> dict[str, Any]:
    from cta_model.data.line_dataset import LineDataset
    from cta_model.export import OnnxPredictor
    from cta_model.inference import Predictor

    paths = _paths()
    test = LineDataset(_dataset_root(), split="test")
    values = {
        "eager": _primary_metrics(Predictor.from_folder(paths["model"]), test),
        "onnx": _primary_metrics(OnnxPredictor.from_export(paths["export"]), test),
        "int8": _primary_metrics(OnnxPredictor.from_export(paths["export"], quantized=True), test),
    }
    relative = {
        key: abs(values["int8"][key] - fp32) / max(abs(fp32), 1e-12)
        for key, fp32 in values["onnx"].items()
    }
    return {
        "config": "metrics",
        "n_test_images": len(test),
        "metrics": values,
        "int8_vs_fp32_relative": relative,
        "int8_within_1pct": all(r <= TARGET_METRIC_REL for r in relative.values()),
    }


def latency(engine: str, batch: int) -> dict[str, Any]:
    import torch

    from cta_model.export import (
        INPUT_NAME,
        INT8_NAME,
        ONNX_NAME,
        PT2_NAME,
        ExportWrapper,
        ort_session,
    )
    from cta_model.inference import Predictor

    paths = _paths()
    predictor = Predictor.from_folder(paths["model"])
    torch.set_num_threads(LATENCY_THREADS)
    threads = LATENCY_THREADS
    x = torch.randn(batch, 3, *predictor.input_size)
    if engine == "eager":
        # As the Predictor runs it: a channels-last network fed channels-last images.
        network = ExportWrapper(predictor.model).eval()
        x = x.contiguous(memory_format=torch.channels_last)
    elif engine == "pt2":
        network = torch.export.load(paths["export"] / PT2_NAME).module()
    else:
        name = ONNX_NAME if engine == "onnx" else INT8_NAME
        session = ort_session(paths["export"] / name, intra_op_threads=threads)
        feed = {INPUT_NAME: x.numpy()}
    baseline = peak_rss_mb()

    if engine in ("eager", "pt2"):

        def run() -> None:
            with torch.inference_mode():
                network(x)
    else:

        def run() -> None:
            session.run(None, feed)

    timing = timed_median(run, repeats=settings()["repeats"], warmup=2)
    return {
        "config": f"{engine}:b{batch}",
        "engine": engine,
        "batch": batch,
        "size": settings()["size"],
        "latency_ms": timing["median_s"] * 1000,
        "latency_min_ms": timing["min_s"] * 1000,
        "cpu_ms": timing["cpu_median_s"] * 1000,
        "images_per_s": batch / timing["median_s"],
        "peak_mb": peak_rss_mb() - baseline,
        "threads": threads,
    }


def measure(key: str) -> dict[str, Any]:
    if key == "prepare":
        return prepare()
    if key == "metrics":
        return metrics()
    engine, batch = key.split(":b")
    return latency(engine, int(batch))


def summarise(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    prep = next(r for r in rows if r["config"] == "prepare")
    check = next(r for r in rows if r["config"] == "metrics")
    by_key = {(r["engine"], r["batch"]): r for r in rows if "engine" in r}
    ratios: dict[str, Any] = {}
    table = []
    for batch in BATCHES:
        eager = by_key[("eager", batch)]
        entry: dict[str, Any] = {"batch": batch}
        for engine in ENGINES:
            row = by_key[(engine, batch)]
            entry[f"{engine} ms"] = row["latency_ms"]
            entry[f"{engine} CPU ms"] = row["cpu_ms"]
        for engine in ("pt2", "onnx", "int8"):
            ratio = by_key[(engine, batch)]["latency_ms"] / eager["latency_ms"]
            ratios[f"b{batch}.{engine}_over_eager"] = ratio
            entry[f"{engine}/eager"] = ratio
        int8_over_onnx = (
            by_key[("int8", batch)]["latency_ms"] / by_key[("onnx", batch)]["latency_ms"]
        )
        cpu_ratio = by_key[("int8", batch)]["cpu_ms"] / by_key[("onnx", batch)]["cpu_ms"]
        for engine in ("pt2", "onnx"):
            ratios[f"b{batch}.{engine}_over_eager.cpu"] = (
                by_key[(engine, batch)]["cpu_ms"] / eager["cpu_ms"]
            )
        ratios[f"b{batch}.int8_over_onnx"] = int8_over_onnx
        ratios[f"b{batch}.int8_over_onnx.cpu"] = cpu_ratio
        entry["int8/onnx"] = int8_over_onnx
        entry["int8/onnx CPU time"] = cpu_ratio
        table.append(entry)
    ratios["target_int8_over_onnx"] = {
        "target": TARGET_INT8_OVER_FP32,
        "measured": {f"b{b}": ratios[f"b{b}.int8_over_onnx"] for b in BATCHES},
        "measured_cpu": {f"b{b}": ratios[f"b{b}.int8_over_onnx.cpu"] for b in BATCHES},
        "holds": all(ratios[f"b{b}.int8_over_onnx"] <= TARGET_INT8_OVER_FP32 for b in BATCHES),
        "holds_cpu": all(
            ratios[f"b{b}.int8_over_onnx.cpu"] <= TARGET_INT8_OVER_FP32 for b in BATCHES
        ),
    }
    ratios["target_int8_metrics_within_1pct"] = {
        "measured": check["int8_vs_fp32_relative"],
        "holds": check["int8_within_1pct"],
    }
    size = prep["size"]
    columns = ["batch", *(f"{e} ms" for e in ENGINES), "pt2/eager", "onnx/eager", "int8/eager"]
    columns += ["int8/onnx", "int8/onnx CPU time"]
    cpu_columns = ["batch", *(f"{e} CPU ms" for e in ENGINES)]
    metric_rows = [
        {
            "metric": key,
            "eager": check["metrics"]["eager"][key],
            "onnx fp32": value,
            "int8": check["metrics"]["int8"][key],
            "int8 vs fp32 (rel)": check["int8_vs_fp32_relative"][key],
        }
        for key, value in check["metrics"]["onnx"].items()
    ]
    errors = "; ".join(
        f"{fmt} " + ", ".join(f"{t} {v:.1e}" for t, v in per_task.items())
        for fmt, per_task in prep["max_abs_error_vs_eager"].items()
    )
    markdown = (
        f"## Inference latency, CTAL at {size}x{size} (hrnet-w18-small-v2, network only, "
        f"{LATENCY_THREADS} thread)\n\n"
        + markdown_table(table, columns)
        + "\nCPU time of the process per call (the work itself; wall time above also holds "
        "waiting for the cores when other jobs run):\n\n"
        + markdown_table(table, cpu_columns)
        + f"\nMax abs error vs eager (random inputs, batch 2 and 1): {errors}. int8 quantizes "
        f"{prep['n_quantized_layers']} layers; {prep['n_excluded_nodes']} affinity-block nodes "
        "stay float.\n\n"
        + f"Primary metrics on the synthetic test split ({check['n_test_images']} images, "
        + (
            f"model trained {prep['train_steps']} steps):\n\n"
            if prep["train_steps"]
            else "UNTRAINED model: the comparison says little about a trained one):\n\n"
        )
        + markdown_table(
            metric_rows, ["metric", "eager", "onnx fp32", "int8", "int8 vs fp32 (rel)"]
        )
    )
    return ratios, markdown


if __name__ == "__main__":
    bench_main("inference", Path(__file__), configs, measure, summarise)
