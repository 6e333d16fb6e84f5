"""Accuracy cost of running a trained CTAL model at another input size, and of the pooled mode.

Each configuration (a fresh subprocess) trains one small CTAL model (ResNet-18 at output stride
8, three tasks) on synthetic inspection scenes at NATIVE x NATIVE, then evaluates it on the same
held-out scenes rendered at every size in EVAL_SIZES: at the native size as trained, at the
others after `resize_model` (fusion kernels resampled bilinearly). Rows: `exact` (CTAL,
affinity_mode auto), `pooled` (affinity on a 2x-pooled grid), so the native rows also compare
the pooled variant's accuracy with exact CTAL's, and `hps`, the control: the same network
without the affinity block, whose loss at other sizes is the network's own scale effect (no
fusion to resample). Ratios: metric at size / at native.

    python bench/resolution.py            # -> bench/results/resolution.{json,md}
    python bench/resolution.py --config exact
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_main, markdown_table  # noqa: E402

TASKS = ("semseg", "height", "normals")
NATIVE = 64
EVAL_SIZES = (48, 64, 96, 128)
TRAIN_SAMPLES = 48
TEST_SAMPLES = 12
STEPS = 100
BATCH = 4
#: row -> (arch, affinity_mode)
MODELS = {"exact": ("ctal", "auto"), "pooled": ("ctal", "pooled"), "hps": ("hps", "auto")}


def _batch(samples: list[Any]) -> tuple[Any, dict[str, Any]]:
    import numpy as np
    import torch

    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2)
    targets = {
        "semseg": torch.from_numpy(np.stack([s.semseg for s in samples])).long(),
        "height": torch.from_numpy(np.stack([s.height for s in samples]))[:, None].float(),
        "normals": torch.from_numpy(np.stack([s.normals for s in samples])).permute(0, 3, 1, 2),
    }
    return images.float() / 255, targets


def _render(indices: range, size: int, seed: int) -> list[Any]:
    from cta_model.data.lines import load_lines_config
    from cta_model.data.synthetic import render_sample

    lines = load_lines_config().lines
    return [
        render_sample(lines[i % len(lines)], i, seed=seed, height=size, width=size) for i in indices
    ]


def measure(key: str) -> dict[str, Any]:
    import torch

    from cta_model.data.synthetic import NUM_CLASSES
    from cta_model.losses import MultiTaskLoss, build_weighting
    from cta_model.nn.models import ModelSpec, build_model, resize_model
    from cta_model.tasks import flatten_metrics, make_meters, pixel_loss

    torch.manual_seed(0)
    spec = ModelSpec(
        arch=MODELS[key][0],
        tasks=TASKS,
        input_size=(NATIVE, NATIVE),
        backbone="resnet18",
        output_stride=8,
        num_classes=NUM_CLASSES,
        decoder_channels=64,
        affinity_channels=64,
        affinity_mode=MODELS[key][1],
    )
    model = build_model(spec).train()
    images, targets = _batch(_render(range(TRAIN_SAMPLES), NATIVE, seed=0))
    loss_fn = MultiTaskLoss({t: pixel_loss(t) for t in TASKS}, build_weighting("fixed", TASKS))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(STEPS):
        pick = torch.randint(0, TRAIN_SAMPLES, (BATCH,), generator=generator)
        out = model(images[pick])
        total, _ = loss_fn(out.final, out.initial, {t: v[pick] for t, v in targets.items()})
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        if step % 25 == 0:
            print(f"[{key}] step {step} loss {float(total):.3f}", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - started
    model.eval()
    test = range(TRAIN_SAMPLES, TRAIN_SAMPLES + TEST_SAMPLES)
    per_size = {}
    for size in EVAL_SIZES:
        net = model if size == NATIVE else resize_model(model, (size, size))
        test_images, test_targets = _batch(_render(test, size, seed=0))
        meters = make_meters(TASKS, num_classes=NUM_CLASSES)
        with torch.no_grad():
            out = net(test_images)
        for t, meter in meters.items():
            meter.update(out.final[t], test_targets[t])
        per_size[str(size)] = flatten_metrics({t: m.compute() for t, m in meters.items()})
    return {
        "config": key,
        "arch": MODELS[key][0],
        "affinity_mode": MODELS[key][1],
        "native": NATIVE,
        "train_s": train_s,
        "metrics": per_size,
    }


PRIMARY = ("semseg.miou", "height.abs_err_mm", "normals.mean")


def summarise(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    ratios: dict[str, Any] = {}
    table = []
    for row in rows:
        native = row["metrics"][str(NATIVE)]
        for size, values in row["metrics"].items():
            entry = {"model": row["config"], "eval size": f"{size}x{size}"}
            for metric in PRIMARY:
                value = values.get(metric)
                entry[metric] = value
                if value is not None and native.get(metric):
                    ratio = value / native[metric]
                    entry[f"{metric} / native"] = ratio
                    ratios[f"{row['config']}.{size}.{metric}_over_native"] = ratio
            table.append(entry)
    by_config = {row["config"]: row for row in rows}
    if {"exact", "pooled"} <= set(by_config):
        for metric in PRIMARY:
            pooled = by_config["pooled"]["metrics"][str(NATIVE)].get(metric)
            exact = by_config["exact"]["metrics"][str(NATIVE)].get(metric)
            if pooled is not None and exact:
                ratios[f"pooled_over_exact.{metric}"] = pooled / exact
        ratios["pooled_over_exact.train_time"] = by_config["pooled"]["train_s"] / max(
            by_config["exact"]["train_s"], 1e-9
        )
    if {"exact", "hps"} <= set(by_config):
        # CTAL's loss at another size beyond the control's: what resampling the fusion costs.
        for size in EVAL_SIZES:
            if size == NATIVE:
                continue
            for metric in PRIMARY:
                key = f"{size}.{metric}_over_native"
                exact, control = ratios.get(f"exact.{key}"), ratios.get(f"hps.{key}")
                if exact is not None and control:
                    ratios[f"exact_over_hps.{key}"] = exact / control
    columns = ["model", "eval size"] + [c for m in PRIMARY for c in (m, f"{m} / native")]
    markdown = (
        f"## Any resolution: trained at {NATIVE}x{NATIVE}, evaluated at other sizes "
        f"({STEPS} steps, batch {BATCH}, {TEST_SAMPLES} test scenes)\n\n"
        + markdown_table(table, columns)
        + "\nRatios: "
        + ", ".join(
            f"{k} = {v:.3g}" for k, v in ratios.items() if k.startswith(("pooled_", "exact_over"))
        )
        + "\n"
    )
    return ratios, markdown


if __name__ == "__main__":
    bench_main("resolution", Path(__file__), list(MODELS), measure, summarise)
