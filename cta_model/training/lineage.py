"""What a trained model came from (`lineage.json` in its folder): config, data, code, run."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cta_model.train_config import TrainConfig

LINEAGE_FILE = "lineage.json"


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from; None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit or None


def run_lineage(
    config: TrainConfig,
    dataset: Mapping[str, Any],
    *,
    world_size: int,
    steps: int,
    best_epoch: int,
) -> dict[str, Any]:
    return {
        "config": config.model_dump(mode="json"),
        "dataset": dataset,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "world_size": world_size,
        "steps": steps,
        "best_epoch": best_epoch,
        "selection_metric": config.early_stopping.metric,
    }
