"""The hooks a training run calls on rank 0 (tracking: the MLflow callback of the train step)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from cta_model.training.outputs import TrainResult
    from cta_model.training.trainer import Trainer


class TrainCallback(Protocol):
    """Hooks called on rank 0 only."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, step: int, logs: dict[str, float]) -> None: ...

    def on_epoch_end(
        self, epoch: int, train_logs: dict[str, float], val_metrics: dict[str, float]
    ) -> None: ...

    def on_train_end(self, result: TrainResult) -> None: ...


class Callback:
    """A TrainCallback doing nothing: subclass it and override the hooks you need."""

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, step: int, logs: dict[str, float]) -> None:
        pass

    def on_epoch_end(
        self, epoch: int, train_logs: dict[str, float], val_metrics: dict[str, float]
    ) -> None:
        pass

    def on_train_end(self, result: TrainResult) -> None:
        pass
