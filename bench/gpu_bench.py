"""bf16 training throughput on one GPU: CTAL dense vs blocked vs linear vs HPS, and model FLOP
utilisation.

Run through bench/gpu.sh. Rows run one after another in this process (a GPU is not shared the
way CPU cores are); the JSON file is rewritten after every row, so a run stopped by
--max-seconds keeps what it measured. Each row: bf16 autocast training steps (Adam) at 288x384
(the affinity block itself runs in fp32: CrossTaskAffinity disables autocast inside), images/s
from the median step time after warm-up, model FLOPs per image = 3 x forward FLOPs of the
affinity mode the row runs (cta_model/nn/summary.py counts the computation that runs, so the
linear row counts its O(N) products, not the dense N x N ones; backward ~ 2 x forward, and
blocked's recompute in backward is not counted), MFU = FLOPs/s / --peak-tflops.
`--dry-run`: CPU, ResNet-18 at 32x32, a few steps, to prove the script end to end (its MFU is
against the same --peak-tflops, so only a smoke value).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, machine  # noqa: E402

ROWS = (
    ("ctal-dense", "ctal", "dense"),
    ("ctal-blocked", "ctal", "blocked"),
    ("ctal-linear", "ctal", "linear"),
    ("hps", "hps", None),
)
TASKS = ("semseg", "height", "normals")


def _row(name: str, arch: str, mode: str | None, args: argparse.Namespace, deadline: float):
    import torch

    from cta_model.losses import MultiTaskLoss, build_weighting
    from cta_model.nn.models import ModelSpec, build_model
    from cta_model.nn.summary import model_summary
    from cta_model.tasks import pixel_loss

    device = torch.device("cpu" if args.dry_run else "cuda")
    size = (32, 32) if args.dry_run else (288, 384)
    backbone = "resnet18" if args.dry_run else "hrnet-w18-small-v2"
    spec = ModelSpec(
        arch=arch,
        tasks=TASKS,
        input_size=size,
        backbone=backbone,
        output_stride=8 if backbone == "resnet18" else None,
        num_classes=10,
        affinity_mode=mode or "auto",
    )
    torch.manual_seed(0)
    model = build_model(spec)
    summary = model_summary(model, size)
    flops_per_image = 3 * summary["flops"]["total"]
    model.to(device).train()
    loss_fn = MultiTaskLoss({t: pixel_loss(t) for t in TASKS}, build_weighting("fixed", TASKS))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch, 3, *size, device=device)
    targets = {
        "semseg": torch.randint(0, 10, (args.batch, *size), device=device),
        "height": torch.randn(args.batch, 1, *size, device=device),
        "normals": torch.nn.functional.normalize(torch.randn(args.batch, 3, *size), dim=1).to(
            device
        ),
    }

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(images)
            total, _ = loss_fn(out.final, out.initial, targets)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        sync()
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    times = []
    while len(times) < args.steps and time.monotonic() < deadline:
        times.append(step())
    if not times:
        return {"row": name, "skipped": "time budget spent during warm-up"}
    median = statistics.median(times)
    images_per_s = args.batch / median
    row: dict[str, Any] = {
        "row": name,
        "arch": arch,
        "affinity_mode": summary["affinity_mode"],
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "image_size": list(size),
        "batch": args.batch,
        "steps": len(times),
        "step_median_s": median,
        "images_per_s": images_per_s,
        "train_gflops_per_image": flops_per_image / 1e9,
        "mfu": flops_per_image * images_per_s / (args.peak_tflops * 1e12),
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny, a few steps")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 dense peak")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu.json")
    args = parser.parse_args()
    args.batch = args.batch or (2 if args.dry_run else 8)
    args.steps = args.steps or (2 if args.dry_run else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3)
    import torch

    from cta_model.atomic import write_bytes_atomic

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run for the CPU check", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.max_seconds
    payload: dict[str, Any] = {
        "benchmark": "gpu",
        "dry_run": args.dry_run,
        "machine": machine(),
        "max_seconds": args.max_seconds,
        "peak_tflops": args.peak_tflops,
        "rows": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, arch, mode in ROWS:
        if time.monotonic() >= deadline:
            payload["rows"].append({"row": name, "skipped": "--max-seconds reached"})
        else:
            try:
                payload["rows"].append(_row(name, arch, mode, args, deadline))
            except torch.OutOfMemoryError as exc:
                payload["rows"].append({"row": name, "error": f"out of memory: {exc}"[:300]})
                torch.cuda.empty_cache()
        print(json.dumps(payload["rows"][-1]), flush=True)
        write_bytes_atomic(args.out, (json.dumps(payload, indent=2) + "\n").encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
