"""Reproducibility: seeds, deterministic kernels and the RNG state a checkpoint carries.

With `deterministic: true`, fixed seeds and the same thread count, a killed and resumed run
ends with bit-identical weights: every random stream a step draws from (Python, NumPy, torch,
CUDA and the train loader's own generator) is saved per rank and restored on resume.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(mode: bool, *, warn_only: bool, compiling: bool = False) -> None:
    """torch.use_deterministic_algorithms, without importing inductor unless it is used:
    the public function imports torch._inductor (about 4 s per process) only to set the
    compiler's flag, which matters for torch.compile and nothing else."""
    if (
        compiling
        or torch.cuda.is_available()
        or not hasattr(torch._C, "_set_deterministic_algorithms")
    ):
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


def enable_determinism(device: torch.device, *, compiling: bool) -> None:
    """Deterministic cuBLAS / cuDNN on CUDA and deterministic algorithms everywhere."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    # warn_only: an op without a deterministic kernel warns instead of stopping the run
    set_deterministic(True, warn_only=True, compiling=compiling)


def rng_state(device: torch.device, loader_generator: torch.Generator) -> dict[str, Any]:
    """Every random stream of this process, as tensors and primitives (weights_only loads it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "loader": loader_generator.get_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(
    state: Mapping[str, Any], device: torch.device, loader_generator: torch.Generator
) -> None:
    """Restore what `rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def parameter_digest(module: torch.nn.Module) -> str:
    """sha256 over the names and bytes of a module's parameters (equal weights, equal digest)."""
    digest = hashlib.sha256()
    for name, parameter in module.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
