"""A fifth, toy task as a task plugin (``CTA_TASK_PLUGINS=toy_task``, this folder on the path).

``brightness``: the mean of a pixel's RGB channels in [0, 1], one float channel, NaN invalid,
L1 loss, scored by its mean absolute error. Nothing else in the project names it: the test
``test_toy_task.py`` trains, evaluates and serves it through the registry alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cta_model import metrics
from cta_model.tasks import LineFile, MetricSpec, TaskSpec


class AbsErrMeter(metrics.Meter):
    """``abs_err`` = mean |pred - target| over the pixels whose target is not NaN."""

    metric_names = ("abs_err",)

    def _empty_state(self) -> dict[str, Any]:
        return {"count": 0, "abs_sum": 0.0}

    def _check_inputs(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 1:
            raise ValueError(f"brightness: pred {tuple(pred.shape)}, target {tuple(target.shape)}")

    def _batch_state(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
        pred, target = pred.double().cpu(), target.double().cpu()
        valid = ~torch.isnan(target)
        return {
            "count": int(valid.sum()),
            "abs_sum": float((pred[valid] - target[valid]).abs().sum()),
        }

    def _valid_count(self, state: Mapping[str, Any]) -> int:
        return state["count"]

    def _metrics(self, state: Mapping[str, Any]) -> dict[str, float]:
        return {"abs_err": state["abs_sum"] / state["count"]}


def _summarize(brightness: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    return {"mean": float(brightness.mean())}


BRIGHTNESS = TaskSpec(
    name="brightness",
    description="toy: mean of the RGB channels per pixel, in [0, 1]",
    unit="1",
    label_channels=1,
    label_dtype=torch.float32,
    invalid_rule="NaN",
    valid_mask=lambda label: ~torch.isnan(label).any(dim=-3),
    fill_value=float("nan"),
    flip_negates_channel=None,
    divide_by_scale=False,
    renormalize_after_resize=False,
    loss="masked_l1_nan_invalid",
    metrics=(MetricSpec("abs_err", "lower"),),
    make_meter=lambda reduction="pooled", **_: AbsErrMeter(reduction=reduction),
    summarize=_summarize,
    fixed_out_channels=1,
    line_file=LineFile(".npy"),
)

TASK_SPECS = (BRIGHTNESS,)
