"""Validation of a run: `<task>.<metric>` pooled over all ranks and `val_loss`."""

from __future__ import annotations

import torch

from cta_model import tasks as task_registry
from cta_model.nn.models import MultiTaskNet
from cta_model.train_config import VAL_LOSS, TrainConfig
from cta_model.training.distributed import all_reduce_sum
from cta_model.training.loaders import batch_to_device


class Validator:
    """Scores a model on this rank's shard of the val split and merges the shards.

    `val_loss` is the pixel-pooled loss of final + initial (deep supervision) predictions with
    the config's fixed weights, so epochs compare under any loss weighting.
    """

    def __init__(
        self,
        config: TrainConfig,
        loader: torch.utils.data.DataLoader,
        *,
        num_classes: int | None,
        device: torch.device,
        bf16: bool,
    ) -> None:
        self.loader = loader
        self.tasks = config.model.tasks
        self.num_classes = num_classes
        self.eval_config = config.eval
        self.deep_supervision = config.loss.deep_supervision
        self.task_weights = {t: float(config.loss.weights.get(t, 1.0)) for t in self.tasks}
        self.device = device
        self.bf16 = bf16
        self.channels_last = config.channels_last

    @torch.no_grad()
    def __call__(self, model: MultiTaskNet) -> dict[str, float]:
        was_training = model.training
        model.eval()
        meters = task_registry.make_meters(
            self.tasks,
            num_classes=self.num_classes,
            miou_rule=self.eval_config.miou_rule,
            reduction=self.eval_config.reduction,
        )
        sums: dict[str, list[float]] = {t: [0.0, 0.0, 0.0, 0.0] for t in self.tasks}
        for batch in self.loader:
            images, targets, present = batch_to_device(
                batch, self.tasks, self.device, self.channels_last
            )
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = model(images)
            for task in self.tasks:
                pred = out.final[task].float()
                meters[task].update(pred, targets[task], present[task].bool())
                loss_fn = task_registry.pixel_loss(task)
                loss, count = loss_fn(pred, targets[task], present[task])
                sums[task][0] += float(loss) * float(count)
                sums[task][1] += float(count)
                if self.deep_supervision and task in out.initial:
                    loss, count = loss_fn(out.initial[task].float(), targets[task], present[task])
                    sums[task][2] += float(loss) * float(count)
                    sums[task][3] += float(count)
        for meter in meters.values():
            meter.reduce_distributed()
        flat = [value for task in self.tasks for value in sums[task]]
        reduced = all_reduce_sum(flat, self.device)
        val_loss = 0.0
        for i, task in enumerate(self.tasks):
            final_sum, final_n, initial_sum, initial_n = reduced[4 * i : 4 * i + 4]
            task_loss = (final_sum / final_n if final_n else 0.0) + (
                initial_sum / initial_n if initial_n else 0.0
            )
            val_loss += self.task_weights[task] * task_loss
        metrics = task_registry.flatten_metrics({t: m.compute() for t, m in meters.items()})
        metrics[VAL_LOSS] = val_loss
        model.train(was_training)
        return metrics
