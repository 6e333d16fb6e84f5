"""How far a run has come: the counters, the best epoch so far and the running epoch's sums.

Both are saved in every checkpoint, so a resumed run reports, selects and stops exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch

from cta_model.errors import ConfigError
from cta_model.train_config import TrainConfig
from cta_model.training.distributed import all_reduce_sum


class RunLength(NamedTuple):
    steps_per_epoch: int  # optimizer steps; a rank's last short micro-batch is dropped
    total_steps: int  # epochs or max_steps, whichever comes first
    num_epochs: int  # epochs begun, the last one possibly cut short by max_steps


def run_length(config: TrainConfig, train_size: int, world_size: int) -> RunLength:
    samples_per_rank = math.ceil(train_size / world_size)  # the sampler pads to equal shards
    micro_batch = config.micro_batch_size(world_size)
    steps_per_epoch = (samples_per_rank // micro_batch) // config.grad_accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(
            f"batch_size {config.batch_size}: the train split ({train_size} "
            f"samples over {world_size} process(es)) is smaller than one step"
        )
    by_epochs = config.epochs * steps_per_epoch if config.epochs else None
    total_steps = min(s for s in (by_epochs, config.max_steps) if s is not None)
    return RunLength(steps_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch))


@dataclass
class EpochAccumulator:
    """Sums over this rank's micro-batches of the running epoch (saved in checkpoints so a
    resumed epoch reports, and feeds DWA, the same means)."""

    loss_sum: float = 0.0
    micro_batches: int = 0
    task_sums: dict[str, float] = field(default_factory=dict)
    task_counts: dict[str, int] = field(default_factory=dict)
    grad_norm_sum: float = 0.0
    steps: int = 0  # optimizer steps taken (the sums above cover these only)
    anomalies: int = 0  # synthetic anomalies pasted into this epoch's training samples
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient (on every rank)

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> EpochAccumulator:
        return cls(**dict(state))

    def epoch_means(
        self, tasks: tuple[str, ...], lr: float, device: torch.device
    ) -> tuple[dict[str, float], dict[str, float]]:
        """(train logs, mean loss per task) over all ranks' micro-batches: the same on every
        rank (DWA must agree). Tasks without a label in the epoch have no mean; an epoch whose
        every step was skipped has a NaN loss. `skipped_steps` is agreed, hence not summed."""
        sums = [self.loss_sum, float(self.micro_batches), self.grad_norm_sum, float(self.steps)]
        sums.append(float(self.anomalies))
        for task in tasks:
            sums += [self.task_sums.get(task, 0.0), float(self.task_counts.get(task, 0))]
        reduced = all_reduce_sum(sums, device)
        logs: dict[str, float] = {
            "loss": reduced[0] / reduced[1] if reduced[1] else math.nan,
            "grad_norm": reduced[2] / reduced[3] if reduced[3] else math.nan,
            "lr": lr,
            "skipped_steps": float(self.skipped_steps),
        }
        if reduced[4]:
            logs["anomalies"] = reduced[4]
        mean_losses: dict[str, float] = {}
        for i, task in enumerate(tasks):
            total, count = reduced[5 + 2 * i], reduced[6 + 2 * i]
            if count > 0:
                mean_losses[task] = total / count
                logs[f"loss_{task}"] = total / count
        return logs, mean_losses


@dataclass
class RunState:
    global_step: int = 0
    epoch: int = 0  # 0-based index of the running epoch
    steps_in_epoch: int = 0
    stopped_early: bool = False
    best_value: float | None = None
    best_epoch: int = 0  # 1-based; 0 = none yet
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    images_seen: int = 0
    train_time_s: float = 0.0
    skipped_steps: int = 0  # over the run: non-finite loss or gradients, weights unchanged
    skipped_in_a_row: int = 0  # the latest steps, all skipped (a run stops at a limit)

    def record_if_best(
        self,
        value: float,
        epoch_number: int,
        metrics: Mapping[str, float],
        *,
        min_delta: float,
        higher: bool,
    ) -> bool:
        """Make this epoch the best when `value` (the selection metric) beats the best by more
        than `min_delta`; a non-finite value never does."""
        if not math.isfinite(value):
            return False
        best = self.best_value
        if best is not None and not (
            value > best + min_delta if higher else value < best - min_delta
        ):
            return False
        self.best_value = value
        self.best_epoch = epoch_number
        self.best_metrics = dict(metrics)
        self.bad_epochs = 0
        return True

    def stops_after_bad_epoch(self, patience: int | None) -> bool:
        """Count an epoch that did not improve; True when that stops the run early."""
        if patience is None:
            return False
        self.bad_epochs += 1
        if self.bad_epochs >= patience:
            self.stopped_early = True
        return self.stopped_early
