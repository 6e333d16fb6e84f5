"""One optimizer step: the multitask loss, the EMA teacher, the optimizer, the LR schedule and
the module DDP wraps (network + loss, so learned loss weights are reduced too).

A step: bf16 autocast on CUDA, gradient accumulation with DDP `no_sync` on the non-final
micro-steps, channels_last, optional torch.compile, grad norm (clipped when configured), the
per-step LR schedule; partial labels through the batch's presence flags and, with
`distill.enabled`, the teacher's pseudo-labels for the tasks a sample lacks.

A step whose loss or gradient norm is not finite on any rank is skipped on every rank (the
decision is all-reduced, so ranks never diverge): the weights, the optimizer state and the EMA
teacher stay as they were and the epoch's sums leave it out; the LR schedule still advances, so
the trajectory stays a function of the step count (as with a GradScaler's skipped steps).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from cta_model import tasks as task_registry
from cta_model.losses import DefectAwareCrossEntropy, MultiTaskLoss, build_weighting
from cta_model.nn.models import MultiTaskNet
from cta_model.train_config import OptimConfig, ScheduleConfig, TrainConfig
from cta_model.training.distributed import all_reduce_sum, is_distributed
from cta_model.training.ema import EMATeacher
from cta_model.training.loaders import batch_to_device
from cta_model.training.progress import EpochAccumulator


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base LR after `step` optimizer steps (linear warmup, then cosine to 0
    at `total_steps` or constant)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_loss(config: TrainConfig, reject_classes: tuple[int, ...] = ()) -> MultiTaskLoss:
    """The registry's pixel loss per task under the configured weighting; the class task's is
    the defect-aware cross-entropy when ``loss.defects`` asks for it."""
    tasks = config.model.tasks
    pixel_losses = {t: task_registry.pixel_loss(t) for t in tasks}
    class_task = task_registry.task_of_kind("classes", tasks)
    defects = config.loss.defects
    if class_task is not None and not defects.is_plain:
        pixel_losses[class_task] = DefectAwareCrossEntropy(
            reject_classes, defects.reject_weight, defects.focal_gamma, defects.dice_weight
        )
    weighting_options: dict[str, Any] = {}
    if config.loss.weighting == "fixed":
        weighting_options["weights"] = config.loss.weights
    if config.loss.weighting == "dwa":
        weighting_options["temperature"] = config.loss.dwa_temperature
    weighting = build_weighting(config.loss.weighting, tasks, **weighting_options)
    return MultiTaskLoss(
        pixel_losses,
        weighting,
        deep_supervision=config.loss.deep_supervision,
    )


def build_optimizer(optim: OptimConfig, model: nn.Module, loss: nn.Module) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    if loss_params:  # learned loss weights: no weight decay pulling log-variances to 0
        groups.append({"params": loss_params, "weight_decay": 0.0})
    # torch's fused Adam kernels (CPU and CUDA): the same update in one pass over the
    # parameters, 26 -> 5 ms a step for the demo network on 2 CPU cores (rounding may differ
    # in the last bits from the per-tensor loop).
    fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
    if optim.name == "adam":
        return torch.optim.Adam(groups, lr=optim.lr, weight_decay=optim.weight_decay, fused=fused)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay, fused=fused)
    return torch.optim.SGD(
        groups, lr=optim.lr, weight_decay=optim.weight_decay, momentum=optim.momentum
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step (see `lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps, schedule.warmup_steps, schedule.name),
    )


class TrainStep(nn.Module):
    """Network + multitask loss in one module, so DDP also reduces the gradients of learned
    loss weights (uncertainty weighting) and sees every parameter in the graph."""

    def __init__(
        self, model: MultiTaskNet, loss: MultiTaskLoss, device_type: str, bf16: bool
    ) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.device_type = device_type
        self.bf16 = bf16

    def forward(
        self,
        images: torch.Tensor,
        targets: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(images)
        final = {t: v.float() for t, v in out.final.items()}
        initial = {t: v.float() for t, v in out.initial.items()}
        total, per_task = self.loss(final, initial, targets, present)
        # A zero that keeps every output, hence every parameter, in the graph: DDP runs with
        # find_unused_parameters=False, and an unsupervised initial head (deep_supervision
        # off) must still deliver its (zero) gradient to the all-reduce.
        anchor = sum(v.sum() for v in (*final.values(), *initial.values()))
        return total + 0.0 * anchor, per_task


@dataclass(frozen=True)
class StepOutcome:
    loss: float  # mean over the micro-batches
    task_losses: dict[str, float]  # per task with a label in the step: mean over micro-batches
    grad_norm: float  # before clipping
    skipped: bool = False  # a loss or gradient was not finite on some rank: weights unchanged


def finite_on_every_rank(values: list[float], device: torch.device) -> bool:
    """True when every value is finite on every rank (one all-reduce: all ranks agree)."""
    bad = 0.0 if all(math.isfinite(v) for v in values) else 1.0
    return all_reduce_sum([bad], device)[0] == 0.0


class Optimization:
    """Everything that changes the weights; `step` runs one optimizer step on this rank."""

    def __init__(
        self,
        config: TrainConfig,
        model: MultiTaskNet,
        device: torch.device,
        *,
        bf16: bool,
        total_steps: int,
        reject_classes: tuple[int, ...] = (),
    ) -> None:
        self.config = config
        self.tasks = config.model.tasks
        self.model = model
        self.device = device
        self.bf16 = bf16
        self.loss = build_loss(config, reject_classes).to(device)
        self.teacher = (
            EMATeacher(model, config.distill.ema_decay, config.distill.seg_confidence)
            if config.distill.enabled
            else None
        )
        self.step_module = TrainStep(model, self.loss, device.type, bf16)
        self.optimizer = build_optimizer(config.optim, model, self.loss)
        self.scheduler = build_scheduler(self.optimizer, config.schedule, total_steps)
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        forward: nn.Module = self.step_module
        if is_distributed():
            self.ddp = nn.parallel.DistributedDataParallel(
                self.step_module,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=False,  # masked losses keep every parameter in the graph
            )
            forward = self.ddp
        self.forward: Callable[..., Any] = torch.compile(forward) if config.compile else forward

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.step_module.parameters() if p.requires_grad]

    def step(
        self,
        batches: Iterator[dict[str, Any]],
        epoch_acc: EpochAccumulator,
        masked_tasks: tuple[str, ...] = (),
        *,
        nan_loss: bool = False,
    ) -> StepOutcome:
        """grad_accum_steps micro-batches from `batches`, one optimizer and schedule step (the
        optimizer's skipped when a loss or the gradient norm is not finite on some rank); the
        epoch's sums go into `epoch_acc`. Debug hooks: masked_tasks, labels this rank drops;
        nan_loss, this rank's loss value is NaN (its gradients stay finite)."""
        accum = self.config.grad_accum_steps
        step_loss = 0.0
        step_tasks: dict[str, list[float]] = {t: [] for t in self.tasks}
        micro_losses: list[float] = []
        anomalies = 0
        for micro in range(accum):
            batch = next(batches)
            images, targets, present = batch_to_device(
                batch, self.tasks, self.device, self.config.channels_last
            )
            for task in masked_tasks:
                present[task] = torch.zeros_like(present[task])
            if self.teacher is not None:
                targets, present = self.teacher.fill_missing(
                    images, targets, present, self.device.type, self.bf16
                )
            sync = micro == accum - 1
            no_sync = self.ddp.no_sync() if (self.ddp is not None and not sync) else None
            with no_sync or contextlib.nullcontext():
                loss, per_task = self.forward(images, targets, present)
                (loss / accum).backward()
            value = math.nan if nan_loss else float(loss.detach())
            step_loss += value / accum
            micro_losses.append(value)
            if "anomalies" in batch:
                anomalies += int(batch["anomalies"].sum())
            for task in self.tasks:
                if bool(present[task].any()):
                    step_tasks[task].append(per_task[task])
        clip = self.config.optim.grad_clip
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters, clip or float("inf"))
        )
        task_losses = {t: sum(v) / len(v) for t, v in step_tasks.items() if v}
        finite = finite_on_every_rank([step_loss, grad_norm, *task_losses.values()], self.device)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        epoch_acc.anomalies += anomalies
        if not finite:
            epoch_acc.skipped_steps += 1
            return StepOutcome(step_loss, task_losses, grad_norm, skipped=True)
        if self.teacher is not None:
            self.teacher.update(self.model)
        # Added one micro-batch at a time, in order: the same float sums as summing as we go.
        for value in micro_losses:
            epoch_acc.loss_sum += value
            epoch_acc.micro_batches += 1
        for task, values in step_tasks.items():
            for value in values:
                epoch_acc.task_sums[task] = epoch_acc.task_sums.get(task, 0.0) + value
                epoch_acc.task_counts[task] = epoch_acc.task_counts.get(task, 0) + 1
        epoch_acc.grad_norm_sum += grad_norm
        epoch_acc.steps += 1
        return StepOutcome(step_loss, task_losses, grad_norm)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entries of the weights and the optimization state."""
        return {
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": None,  # bf16 needs no loss scaling
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.teacher is not None and state.get("teacher") is not None:
            self.teacher.load_state_dict(state["teacher"])
