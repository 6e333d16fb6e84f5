"""Masked per-task losses, loss weighting strategies and the multitask loss (DESIGN 3.2).

Partial labels: every loss takes a per-sample presence flag. Invalid pixels and absent samples
are masked, never dropped from the graph: `(loss * mask).sum() / mask.sum().clamp_min(1)`, so a
batch without any label for a task gives exactly 0 (not NaN) and DDP still sees a gradient
(zero) for every parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from cta_model.errors import ConfigError
from cta_model.nn.functional import unit_vectors


class PixelLoss(Protocol):
    def __call__(
        self, pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (masked mean loss, number of valid pixels)."""


def _sample_mask(present: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    if present is None:
        return torch.ones(batch, 1, 1, dtype=torch.bool, device=device)
    return present.to(device=device, dtype=torch.bool).view(batch, 1, 1)


def _masked_mean(per_pixel: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask_f = mask.to(per_pixel.dtype)
    count = mask_f.sum()
    return (per_pixel * mask_f).sum() / count.clamp_min(1), count


def masked_cross_entropy(
    pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """pred (B, C, H, W) logits; target (B, H, W) int64, anything outside [0, C) ignored."""
    num_classes = pred.shape[1]
    valid = (target >= 0) & (target < num_classes)
    valid = valid & _sample_mask(present, pred.shape[0], pred.device)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    per_pixel = F.cross_entropy(pred, safe_target, reduction="none")
    return _masked_mean(per_pixel, valid)


class DefectAwareCrossEntropy:
    """Cross-entropy for rare defects (a PixelLoss for the class task).

    - ``reject_weight``: pixels of reject classes weigh this much in the (masked) mean;
    - ``focal_gamma``: each pixel's loss times (1 - p_true)^gamma (focal loss, Lin et al. 2017),
      so the many easy background pixels stop dominating;
    - ``dice_weight``: plus this times a soft Dice loss on the reject-class probability mass
      against the reject-class mask, per sample with a label (smoothing 1, so a sample without
      defects is pushed towards predicting none).
    With weight 1 and gamma 0 and no Dice it equals `masked_cross_entropy`.
    """

    def __init__(
        self,
        reject_classes: Iterable[int],
        reject_weight: float = 1.0,
        focal_gamma: float = 0.0,
        dice_weight: float = 0.0,
    ) -> None:
        self.reject_classes = tuple(int(c) for c in reject_classes)
        if not self.reject_classes:
            raise ConfigError("a defect-aware loss needs at least one reject class")
        self.reject_weight = float(reject_weight)
        self.focal_gamma = float(focal_gamma)
        self.dice_weight = float(dice_weight)

    def __call__(
        self, pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_classes = pred.shape[1]
        rejects = torch.tensor(
            [c for c in self.reject_classes if c < num_classes], device=target.device
        )
        samples = _sample_mask(present, pred.shape[0], pred.device)
        valid = (target >= 0) & (target < num_classes) & samples
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        per_pixel = F.cross_entropy(pred, safe_target, reduction="none")
        if self.focal_gamma:
            p_true = torch.exp(-per_pixel.detach())
            per_pixel = per_pixel * (1.0 - p_true) ** self.focal_gamma
        is_reject = torch.isin(safe_target, rejects) & valid
        if self.reject_weight != 1.0:
            weight = torch.where(is_reject, self.reject_weight, 1.0)
            per_pixel = per_pixel * weight
        loss, count = _masked_mean(per_pixel, valid)
        if self.dice_weight:
            mass = pred.softmax(dim=1)[:, rejects].sum(dim=1) * valid
            truth = is_reject.to(mass.dtype)
            inter = (mass * truth).sum(dim=(1, 2))
            total = mass.sum(dim=(1, 2)) + truth.sum(dim=(1, 2))
            dice = 1.0 - (2.0 * inter + 1.0) / (total + 1.0)
            with_label = samples.view(-1).to(dice.dtype)
            loss = loss + self.dice_weight * (dice * with_label).sum() / with_label.sum().clamp_min(
                1
            )
        return loss, count


def masked_l1_nan_invalid(
    pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Height: only NaN is invalid; 0 mm is the datum and a valid value."""
    valid = ~torch.isnan(target).squeeze(1) & _sample_mask(present, pred.shape[0], pred.device)
    safe_target = torch.where(valid.unsqueeze(1), target, pred.detach())
    per_pixel = (pred - safe_target).abs().squeeze(1)
    return _masked_mean(per_pixel, valid)


def masked_l1_zero_invalid(
    pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth: 0 marks an invalid pixel."""
    valid = (target != 0).squeeze(1) & _sample_mask(present, pred.shape[0], pred.device)
    per_pixel = (pred - target).abs().squeeze(1)
    return _masked_mean(per_pixel, valid)


def cosine_loss(
    pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 - cos(angle) between normalised prediction and unit target; (0, 0, 0) is invalid."""
    valid = (target != 0).any(dim=1) & _sample_mask(present, pred.shape[0], pred.device)
    cosine = (unit_vectors(pred, dim=1) * target).sum(dim=1)
    return _masked_mean(1 - cosine, valid)


PIXEL_LOSSES: dict[str, PixelLoss] = {
    "masked_cross_entropy": masked_cross_entropy,
    "masked_l1_nan_invalid": masked_l1_nan_invalid,
    "masked_l1_zero_invalid": masked_l1_zero_invalid,
    "cosine": cosine_loss,
}


# ---------------------------------------------------------------- loss weighting strategies
class LossWeighting(nn.Module):
    """Combines per-task losses into one scalar, over the tasks present in the batch only."""

    def __init__(self, tasks: Iterable[str], **_: object) -> None:
        super().__init__()
        self.tasks = tuple(tasks)

    def combine(self, task_losses: Mapping[str, torch.Tensor], present: Mapping[str, bool]):
        raise NotImplementedError

    def weights(self) -> dict[str, float]:
        """Current effective weight per task, for logging."""
        return {t: 1.0 for t in self.tasks}

    def epoch_end(self, mean_losses: Mapping[str, float]) -> None:
        """Called once per epoch with the epoch's mean loss per task."""


class FixedWeighting(LossWeighting):
    def __init__(self, tasks: Iterable[str], weights: Mapping[str, float] | None = None, **_):
        super().__init__(tasks)
        weights = dict(weights or {})
        unknown = set(weights) - set(self.tasks)
        if unknown:
            raise ConfigError(
                f"loss weights for unknown tasks {sorted(unknown)}; tasks: {self.tasks}"
            )
        self.fixed = {t: float(weights.get(t, 1.0)) for t in self.tasks}

    def combine(self, task_losses, present):
        return sum(self.fixed[t] * task_losses[t] for t in self.tasks)

    def weights(self):
        return dict(self.fixed)


class UncertaintyWeighting(LossWeighting):
    """Kendall, Gal & Cipolla (CVPR 2018): L = sum_t exp(-s_t) L_t / 2 + s_t / 2, s_t = log var."""

    def __init__(self, tasks: Iterable[str], **_):
        super().__init__(tasks)
        self.log_vars = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in self.tasks})

    def combine(self, task_losses, present):
        total = 0.0
        for t in self.tasks:
            s = self.log_vars[t]
            term = 0.5 * torch.exp(-s) * task_losses[t] + 0.5 * s
            # An absent task must not pull s_t down; 0 * term keeps s_t and the task's head in
            # the graph (with zero gradient) so DDP's all-reduce still sees every parameter.
            total = total + (term if present[t] else 0.0 * term)
        return total

    def weights(self):
        return {t: 0.5 * math.exp(-float(self.log_vars[t])) for t in self.tasks}


class DynamicWeightAverage(LossWeighting):
    """Liu, Johns & Davison (MTAN, CVPR 2019): w_t = K softmax(r_t / T), r_t = L_t(e-1)/L_t(e-2).

    Uses the per-epoch mean losses; weights are 1 for the first two epochs. Over the tasks
    present in a batch the weights are renormalised to sum to the number of present tasks.
    """

    def __init__(self, tasks: Iterable[str], temperature: float = 2.0, **_):
        super().__init__(tasks)
        if temperature <= 0:
            raise ConfigError(f"dwa temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.history: list[dict[str, float]] = []
        self._weights = {t: 1.0 for t in self.tasks}

    def epoch_end(self, mean_losses):
        self.history = (self.history + [dict(mean_losses)])[-2:]
        if len(self.history) < 2:
            return
        prev, last = self.history
        ratios = {
            t: last[t] / prev[t] if prev.get(t, 0) > 0 and t in last else 1.0 for t in self.tasks
        }
        exps = {t: math.exp(r / self.temperature) for t, r in ratios.items()}
        norm = sum(exps.values())
        self._weights = {t: len(self.tasks) * e / norm for t, e in exps.items()}

    def combine(self, task_losses, present):
        active = [t for t in self.tasks if present[t]]
        scale = len(active) / sum(self._weights[t] for t in active) if active else 0.0
        return sum(
            (self._weights[t] * scale if present[t] else 0.0) * task_losses[t] for t in self.tasks
        )

    def weights(self):
        return dict(self._weights)

    def get_extra_state(self):
        return {"history": self.history, "weights": self._weights}

    def set_extra_state(self, state):
        self.history = list(state["history"])
        self._weights = dict(state["weights"])


LOSS_WEIGHTINGS: dict[str, Callable[..., LossWeighting]] = {
    "fixed": FixedWeighting,
    "uncertainty": UncertaintyWeighting,
    "dwa": DynamicWeightAverage,
}


def build_weighting(name: str, tasks: Iterable[str], **options) -> LossWeighting:
    try:
        factory = LOSS_WEIGHTINGS[name]
    except KeyError:
        raise ConfigError(
            f"unknown loss weighting {name!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}"
        ) from None
    return factory(tasks, **options)


class MultiTaskLoss(nn.Module):
    """Deep-supervised multitask loss: per task L(final) + L(initial), then weighted.

    DESIGN 3.1: initial predictions are supervised with the same loss and weight as the final
    ones. Returns the total and the per-task (final + initial) losses, detached, for logging.
    """

    def __init__(
        self,
        task_losses: Mapping[str, PixelLoss],
        weighting: LossWeighting,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        if set(task_losses) != set(weighting.tasks):
            raise ConfigError(
                f"loss tasks {sorted(task_losses)} differ from weighting tasks "
                f"{sorted(weighting.tasks)}"
            )
        self.task_losses = dict(task_losses)
        self.weighting = weighting
        self.deep_supervision = deep_supervision

    def forward(
        self,
        final: Mapping[str, torch.Tensor],
        initial: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        per_task: dict[str, torch.Tensor] = {}
        task_present: dict[str, bool] = {}
        for task, loss_fn in self.task_losses.items():
            flags = None if present is None else present.get(task)
            loss, count = loss_fn(final[task], targets[task], flags)
            if self.deep_supervision and task in initial:
                loss = loss + loss_fn(initial[task], targets[task], flags)[0]
            per_task[task] = loss
            task_present[task] = bool(count > 0)
        total = self.weighting.combine(per_task, task_present)
        return total, {t: float(v.detach()) for t, v in per_task.items()}
