"""Affinity-map images of a CTAL model for a few pixels of sample images (DESIGN 3.1, 6.1).

The CTAL block's input features are captured with a forward pre-hook on the model's
``refinement`` module during one ``Predictor`` forward pass, then
``refinement.affinity_maps(features, pixels)`` gives, per task and fused, each chosen pixel's
affinity to every position of the feature grid. One PNG per sample image and map kind
(``<task>`` / ``fused``): the image with the pixels marked, then one panel per pixel.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

EXPLAIN_DIR = "explain"
# Where on the feature grid the explained pixels sit, as fractions of its height and width.
PIXEL_FRACTIONS = ((0.5, 0.5), (0.25, 0.25), (0.75, 0.75))


def not_explainable_reason(predictor: Any) -> str | None:
    """Why the model has no affinity maps to show; None for a CTAL model."""
    refinement = getattr(predictor.model, "refinement", None)
    if refinement is None or not hasattr(refinement, "affinity_maps"):
        arch = predictor.card.spec.arch
        return f"arch {arch!r} has no cross-task affinity block (only CTAL models are explained)"
    return None


def grid_pixels(grid: tuple[int, int]) -> list[tuple[int, int]]:
    pixels = [(int(fy * grid[0]), int(fx * grid[1])) for fy, fx in PIXEL_FRACTIONS]
    return list(dict.fromkeys(pixels))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _figure_png(
    image: np.ndarray,
    maps: np.ndarray,
    pixels: Sequence[tuple[int, int]],
    grid: tuple[int, int],
    title: str,
) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    height, width = image.shape[:2]
    scale_y, scale_x = height / grid[0], width / grid[1]
    figure, axes = plt.subplots(1, len(pixels) + 1, figsize=(2.4 * (len(pixels) + 1), 2.6))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=8)
    for k, (y, x) in enumerate(pixels):
        centre = ((x + 0.5) * scale_x - 0.5, (y + 0.5) * scale_y - 0.5)
        axes[0].scatter([centre[0]], [centre[1]], s=30, marker="x", color=f"C{k}")
        axes[k + 1].imshow(maps[k], cmap="magma", extent=(-0.5, width - 0.5, height - 0.5, -0.5))
        axes[k + 1].scatter([centre[0]], [centre[1]], s=30, marker="x", color=f"C{k}")
        axes[k + 1].set_title(f"pixel (y={y}, x={x})", fontsize=8)
    for axis in axes:
        axis.set_axis_off()
    figure.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def write_affinity_images(
    predictor: Any, samples: Sequence[dict[str, Any]], out_dir: Path
) -> dict[str, Any]:
    """Write the PNGs under ``out_dir/explain``; the evaluation.json ``explain`` object."""
    import torch

    from cta_model.atomic import write_bytes_atomic

    refinement = predictor.model.refinement
    grid = tuple(refinement.grid)
    pixels = grid_pixels(grid)
    paths: list[str] = []
    captured: dict[str, Any] = {}
    hook = refinement.register_forward_pre_hook(
        lambda module, args: captured.update(features=args[0])
    )
    # One image at a time: lines may record different image sizes.
    try:
        for sample in samples:
            # A writable copy: torch warns on read-only arrays (images decoded from PNG).
            predictor.forward(predictor.preprocess(np.array(sample["image"])))
            with torch.inference_mode():
                # float32: a bf16 model's features arrive in bf16 from autocast
                features = {task: value.float() for task, value in captured["features"].items()}
                maps = refinement.affinity_maps(features, pixels)
            for kind, planes in maps.items():
                name = f"affinity_{_safe(sample['sample_id'])}_{_safe(kind)}.png"
                png = _figure_png(
                    sample["image"],
                    planes[0].float().cpu().numpy(),
                    pixels,
                    grid,
                    f"{sample['sample_id']}: {kind} affinity",
                )
                write_bytes_atomic(out_dir / EXPLAIN_DIR / name, png)
                paths.append(f"{EXPLAIN_DIR}/{name}")
    finally:
        hook.remove()
    return {"affinity_maps": paths, "pixels": [[y, x] for y, x in pixels]}


__all__ = ["EXPLAIN_DIR", "not_explainable_reason", "write_affinity_images"]
