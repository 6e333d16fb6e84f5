"""The demo network on CPU: fp32 vs bf16 autocast, NCHW vs channels-last (issue 15).

Training rows: one step (forward + deep-supervised multitask loss + backward + Adam) of
configs/demo.yaml's network on a batch of its 64 px tiles (random tensors of the right shapes),
as `precision: fp32|bf16` x `channels_last: false|true`. Inference rows: the Predictor on
384 px images (the demo's scenes, cut into the model's tiles) with the network NCHW as before,
channels-last as the Predictor now runs it, and channels-last under bf16 (a model folder whose
model.yaml says `precision: bf16`, as a bf16-trained one does). Each row is a fresh subprocess; the
variants are interleaved over PROCESSES rounds and a figure is the median over rounds.
bf16 rows say whether the CPU runs bf16 natively (AVX512-BF16 / AMX); emulated, it is slower.

    python bench/cpu_precision.py [--quick]   # -> bench/results/cpu_precision.{json,md}
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO_ROOT,
    bench_main,
    markdown_table,
    median_over_processes,
    quick,
    timed_median,
)
from train_step import NUM_CLASSES, build_step  # noqa: E402  (the step and its labels)

TRAIN_VARIANTS = ("fp32", "fp32-channels-last", "bf16", "bf16-channels-last")
INFER_VARIANTS = ("nchw", "channels-last", "channels-last-bf16")
PROCESSES = 3


def settings() -> dict[str, Any]:
    return (
        {"batch": 4, "image": 128, "images": 1, "repeats": 2, "rounds": 1}
        if quick()
        else {"batch": 16, "image": 384, "images": 4, "repeats": 5, "rounds": PROCESSES}
    )


def configs() -> list[str]:
    rounds = range(settings()["rounds"])
    return [f"train:{v}:{r}" for r in rounds for v in TRAIN_VARIANTS] + [
        f"infer:{v}:{r}" for r in rounds for v in INFER_VARIANTS
    ]


def demo_spec() -> Any:
    import yaml

    from cta_model.train_config import ModelConfig

    model = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())["model"]
    return ModelConfig(**model).spec(NUM_CLASSES)


def train_row(variant: str) -> dict[str, Any]:
    import torch

    from cta_model.training.distributed import has_native_bf16

    s, spec = settings(), demo_spec()
    _, step = build_step(
        spec.arch,
        spec.input_size,
        s["batch"],
        spec=spec,
        channels_last=variant.endswith("channels-last"),
        bf16=variant.startswith("bf16"),
    )
    timing = timed_median(step, repeats=s["repeats"], warmup=2)
    return {
        "batch": s["batch"],
        "tile": spec.input_size[0],
        "s": timing["median_s"],
        "cpu_s": timing["cpu_median_s"],
        "native_bf16": has_native_bf16(torch.device("cpu")),
    }


def infer_row(variant: str) -> dict[str, Any]:
    import numpy as np
    import torch

    from cta_model.inference import Predictor
    from cta_model.model_folder import InputContract, save_model_folder
    from cta_model.nn.models import build_model

    s, spec = settings(), demo_spec()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        save_model_folder(
            build_model(spec).eval(),
            folder,
            class_names=[f"c{i}" for i in range(NUM_CLASSES)],
            input_contract=InputContract(resize_policy="tile", tile_overlap_px=16),
            precision="bf16" if variant.endswith("bf16") else "fp32",
        )
        predictor = Predictor.from_folder(folder)
    if variant == "nchw":  # the Predictor before channels-last
        predictor.model = predictor.model.to(memory_format=torch.contiguous_format)
        predictor.forward = lambda x: predictor.model(x.contiguous())
    side = s["image"]
    images = np.random.default_rng(0).integers(0, 255, (s["images"], side, side, 3), np.uint8)
    timing = timed_median(
        lambda: predictor.inspect(images), repeats=max(2, s["repeats"] - 2), warmup=1
    )
    return {
        "image": side,
        "s": timing["median_s"] / s["images"],
        "cpu_s": timing["cpu_median_s"] / s["images"],
    }


def measure(key: str) -> dict[str, Any]:
    import torch

    kind, variant, round_ = key.split(":")
    row = train_row(variant) if kind == "train" else infer_row(variant)
    return {
        "config": key,
        "kind": kind,
        "variant": variant,
        "round": int(round_),
        "threads": torch.get_num_threads(),
        **row,
    }


def summarise(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["kind"], row["variant"]), []).append(row)
    merged = {key: median_over_processes(group, "s", ["cpu_s"]) for key, group in grouped.items()}
    ratios: dict[str, Any] = {}
    table = []
    for kind, variants, unit in (
        ("train", TRAIN_VARIANTS, "s/step"),
        ("infer", INFER_VARIANTS, "s/image"),
    ):
        base = merged[(kind, variants[0])]
        for variant in variants:
            row = merged[(kind, variant)]
            low, high = row["s_range"]
            speedup = base["s"] / row["s"]
            ratios[f"{kind}.{variant}.speedup_over_{variants[0]}"] = speedup
            table.append(
                {
                    "work": f"train step, batch {row['batch']} of {row['tile']} px tiles"
                    if kind == "train"
                    else f"Predictor.inspect, {row['image']} px images (tiled)",
                    "variant": variant,
                    "time": f"{row['s']:.4g} [{low:.4g}, {high:.4g}] {unit}",
                    "speed-up": f"{speedup:.3g}x {variants[0]}",
                    "processes": row["processes"],
                }
            )
    native = next(r["native_bf16"] for r in rows if r["kind"] == "train")
    lines = [
        "## The demo network on CPU: bf16 and channels-last (`bench/cpu_precision.py`)",
        "",
        "configs/demo.yaml's network; median over fresh processes [min, max]. "
        f"This CPU runs bf16 {'natively (AVX512-BF16 / AMX)' if native else 'EMULATED'}.",
        "",
        markdown_table(table, list(table[0])),
    ]
    ratios["native_bf16"] = native
    return ratios, "\n".join(lines)


if __name__ == "__main__":
    bench_main("cpu_precision", Path(__file__), configs, measure, summarise)
