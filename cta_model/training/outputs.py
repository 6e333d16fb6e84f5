"""What a run leaves in `<output>`: the model folder `model/` (save_model_folder + lineage.json +
reference_stats.parquet) and `train_result.json`."""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from cta_model.atomic import write_bytes_atomic
from cta_model.inspection import ScoreDefinition
from cta_model.model_folder import InputContract, save_model_folder
from cta_model.nn.models import MultiTaskNet
from cta_model.training.lineage import LINEAGE_FILE
from cta_model.training.progress import RunState
from cta_model.training.reference_stats import REFERENCE_STATS_FILE, reference_statistics

MODEL_DIR = "model"
RESULT_FILE = "train_result.json"


@dataclass
class TrainResult:
    model_dir: Path
    best_metrics: dict[str, float]  # "<task>.<metric>" and "val_loss" at the best epoch
    best_epoch: int  # 1-based
    history: list[dict[str, Any]]  # one entry per epoch: epoch, step, train, val, loss_weights
    steps: int  # optimizer steps
    images_per_s: float  # training throughput over all processes (this process's run time)
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradients

    @classmethod
    def of(cls, progress: RunState, model_dir: Path) -> TrainResult:
        """A run's result; without a best epoch (no finite selection metric) the last one."""
        s = progress
        return cls(
            model_dir=model_dir,
            best_metrics=dict(s.best_metrics or (s.history[-1]["val"] if s.history else {})),
            best_epoch=s.best_epoch or (s.history[-1]["epoch"] if s.history else 0),
            history=list(s.history),
            steps=s.global_step,
            images_per_s=s.images_seen / s.train_time_s if s.train_time_s > 0 else 0.0,
            skipped_steps=s.skipped_steps,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_dir"] = str(self.model_dir)
        return out


def write_result(output: Path, result: TrainResult) -> None:
    write_bytes_atomic(
        output / RESULT_FILE, json.dumps(result.to_dict(), indent=2, allow_nan=True).encode()
    )


def write_model_folder(
    model: MultiTaskNet,
    output: Path,
    *,
    class_names: Sequence[str],
    contract: InputContract,
    inspection: ScoreDefinition | None,
    trained_pitch_mm_per_px: tuple[float, float] | None,
    precision: str,
    lineage: dict[str, Any],
    reference_data: Any,
    device: torch.device,
    batch_size: int,
) -> Path:
    """Save, build the Predictor from the saved folder, compute the reference statistics on
    `reference_data` with it, then write `<output>/model` with everything (SHA256SUMS covers
    all files)."""
    from cta_model.inference import Predictor

    lineage_bytes = json.dumps(lineage, indent=2, allow_nan=True).encode()
    with tempfile.TemporaryDirectory(prefix=".model-staging.", dir=output) as staging:
        staged = save_model_folder(
            model,
            Path(staging) / MODEL_DIR,
            class_names=class_names,
            input_contract=contract,
            inspection=inspection,
            trained_pitch_mm_per_px=trained_pitch_mm_per_px,
            precision=precision,
            extra_files={LINEAGE_FILE: lineage_bytes},
        )
        predictor = Predictor.from_folder(staged, device=device)
        stats = reference_statistics(predictor, reference_data, class_names, batch_size)
    buffer = io.BytesIO()
    pq.write_table(stats, buffer)
    return save_model_folder(
        model,
        output / MODEL_DIR,
        class_names=class_names,
        input_contract=contract,
        inspection=inspection,
        trained_pitch_mm_per_px=trained_pitch_mm_per_px,
        precision=precision,
        extra_files={LINEAGE_FILE: lineage_bytes, REFERENCE_STATS_FILE: buffer.getvalue()},
        overwrite=True,
    )
