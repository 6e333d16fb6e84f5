"""EMA-teacher self-distillation (`distill.enabled`): an exponential moving average of the model
labels the tasks a sample lacks (segmentation only where its max softmax >= seg_confidence)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from cta_model import tasks as task_registry
from cta_model.nn.models import MultiTaskNet


class EMATeacher:
    """An exponential moving average of the model that labels the tasks a sample lacks."""

    def __init__(self, model: MultiTaskNet, decay: float, seg_confidence: float) -> None:
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.seg_confidence = seg_confidence

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        for mine, theirs in zip(self.model.parameters(), student.parameters(), strict=True):
            mine.lerp_(theirs.detach(), 1.0 - self.decay)
        for mine, theirs in zip(self.model.buffers(), student.buffers(), strict=True):
            mine.copy_(theirs)

    @torch.no_grad()
    def fill_missing(
        self,
        images: torch.Tensor,
        targets: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor],
        device_type: str,
        bf16: bool,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Pseudo-labels only where a sample's label is absent; present labels are untouched."""
        if all(bool(flags.all()) for flags in present.values()):
            return targets, present
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            predictions = self.model(images).final
        targets, present = dict(targets), dict(present)
        for task, flags in present.items():
            absent = ~flags
            if not bool(absent.any()):
                continue
            raw = predictions[task].float()
            if task_registry.get_task(task).label_channels == 0:
                confidence, ids = raw.softmax(dim=1).max(dim=1)
                pseudo = torch.where(confidence >= self.seg_confidence, ids, -1)
                mask = absent.view(-1, 1, 1)
            else:
                pseudo = raw
                mask = absent.view(-1, 1, 1, 1)
            targets[task] = torch.where(mask, pseudo.to(targets[task].dtype), targets[task])
            present[task] = torch.ones_like(flags)
        return targets, present

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state)
