"""Parameter and FLOP counts per top-level module (torch.utils.flop_counter)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_summary(model: nn.Module, input_size: tuple[int, int], batch: int = 1) -> dict[str, Any]:
    """Total and per-module parameters and forward FLOPs for one batch at `input_size`.

    FLOPs count a multiply-add as 2, as torch's counter does; only matmul/conv-like ops count.
    Per-module keys are the model's direct children (e.g. backbone, refinement, heads). The
    counter runs the model, so a CTAL block counts the computation its affinity mode runs at
    this batch on the CPU (`affinity_mode`: dense, blocked, linear or pooled; None without
    a block): `auto` counts the mode it picks.
    """
    per_module_params = {name: count_parameters(child) for name, child in model.named_children()}
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, depth=None)
    with torch.no_grad(), counter:
        model(torch.zeros(batch, 3, *input_size))
    model.train(was_training)
    refinement = getattr(model, "refinement", None)
    resolve = getattr(refinement, "resolve_mode", None)
    mode = resolve(batch, torch.float32, torch.device("cpu")) if resolve else None
    totals = {key: sum(ops.values()) for key, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    per_module_flops = {name: _module_flops(totals, f"{root}.{name}") for name in per_module_params}
    return {
        "params": {"total": count_parameters(model), "per_module": per_module_params},
        "flops": {"total": int(counter.get_total_flops()), "per_module": per_module_flops},
        "affinity_mode": mode,
    }


def _module_flops(totals: dict[str, int], key: str) -> int:
    if key in totals:
        return int(totals[key])
    # A ModuleDict is never called itself: its entries are, so add up the direct entries.
    depth = key.count(".") + 1
    return int(
        sum(v for k, v in totals.items() if k.startswith(key + ".") and k.count(".") == depth)
    )
