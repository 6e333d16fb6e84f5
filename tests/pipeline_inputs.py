"""Inputs of a whole training-pipeline run on tiny data, shared by the kfp.local e2e test and the
containers test: a tiny train config, a gate that passes without a champion, and a one-wave
roll-out plan for the pilot line."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

PERMISSIVE_GATE = {
    "schema_version": 1,
    "data_validation": {"required": True},
    "when_no_champion": "pass",
    "approval": {"required": False},
}


def pilot_shadow_plan(name: str) -> dict:
    """One shadow wave on press-a that bakes on 2 replayed samples."""
    return {
        "name": name,
        "waves": [
            {
                "name": "pilot shadow",
                "lines": ["press-a"],
                "mode": "shadow",
                "bake": {"min_samples": 2, "min_seconds": 0},
                "health": {"max_error_rate": 0.0, "max_p95_latency_ms": 60000},
                "failure_policy": "halt_and_rollback",
            }
        ],
    }


def write_tiny_config(path: Path) -> Path:
    """configs/demo.yaml made tiny: ResNet-18 at stride 8, 32x32, one epoch of batches of 4. The
    pipeline replaces the data source with the validated dataset_ref and sets the output."""
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["model"].update(backbone="resnet18", output_stride=8, input_size=[32, 32])
    config.update(epochs=1, batch_size=4, progress=False)
    config["checkpoint"]["every_steps"] = 0
    config["data"]["tiling"].update(tiles_per_image=1, val_tiles_per_image=1)
    path.write_text(yaml.safe_dump(config))
    return path
