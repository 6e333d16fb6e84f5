"""The training loop: builds a run from a TrainConfig, steps, validates, checkpoints, finishes.

* a step (optimization.py): micro-batches with gradient accumulation, one optimizer and LR step;
* each epoch: validation on `val_split` -> `<task>.<metric>` + `val_loss`, model selection and
  early stopping on val only, the best weights kept;
* checkpoints every `checkpoint.every_steps` and at each epoch end; `resume="auto"` continues
  from the latest readable one when its config hash matches;
* rank 0 writes `<output>/model` and `<output>/train_result.json` (outputs.py).

`batch_size` is global: per process and micro-step each rank sees
batch_size / (world_size * grad_accum_steps) samples.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from cta_model.atomic import write_bytes_atomic
from cta_model.errors import ConfigError, TrainingError
from cta_model.model_folder import WEIGHTS, nonfinite_tensors, verify_checksums
from cta_model.nn.models import build_model
from cta_model.tasks import get_task
from cta_model.train_config import VAL_LOSS, TrainConfig
from cta_model.training.callbacks import TrainCallback
from cta_model.training.checkpoints import (
    CHECKPOINT_DIR,
    check_resumable,
    checkpoint_path,
    choose_checkpoint,
    load_checkpoint,
    progress_of,
    prune_checkpoints,
    save_checkpoint_atomic,
    training_checkpoint,
)
from cta_model.training.datasets import OpenerFor, open_datasets_on_every_rank
from cta_model.training.determinism import (
    enable_determinism,
    parameter_digest,
    rng_state,
    seed_everything,
    set_deterministic,
    set_rng_state,
)
from cta_model.training.distributed import (
    DistributedEnv,
    all_gather_object,
    barrier,
    broadcast_object,
    device_for,
    distributed_session,
    has_native_bf16,
)
from cta_model.training.inspection_setup import (
    check_resolution,
    defect_census,
    inspection_setup,
    lines_of,
    require_class_task_for_anomalies,
    warn_if_defect_free,
)
from cta_model.training.lineage import run_lineage
from cta_model.training.loaders import build_loaders, build_transforms
from cta_model.training.optimization import Optimization, StepOutcome
from cta_model.training.outputs import MODEL_DIR, TrainResult, write_model_folder, write_result
from cta_model.training.progress import EpochAccumulator, RunState, run_length
from cta_model.training.validation import Validator

log = logging.getLogger(__name__)


class Trainer:
    """Builds a run (data, model, optimization, validation) from a TrainConfig and runs it.

    Construct inside `distributed_session()` (what `train` does) for multi-process runs.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        callbacks: Sequence[TrainCallback] = (),
        opener_for: OpenerFor | None = None,
    ) -> None:
        self.config = config
        self.env = DistributedEnv.current()
        self.device = device_for(self.env)
        self.callbacks = list(callbacks) if self.env.is_main else []
        self.output = Path(config.output)
        self.checkpoint_dir = self.output / CHECKPOINT_DIR
        self.tasks = config.model.tasks
        self.bf16 = config.use_bf16(self.device.type, has_native_bf16(self.device))
        if config.precision == "bf16" and not self.bf16:
            self._info(
                "precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), where "
                "autocast is slower than fp32; this run is fp32"
            )
        if config.eval.reduction in ("batch_mean", "mtan") and self.env.world_size > 1:
            raise ConfigError(
                f"eval.reduction {config.eval.reduction} needs one process (use pooled)"
            )
        self.micro_batch = config.micro_batch_size(self.env.world_size)
        self.eval_batch = config.eval.batch_size or self.micro_batch
        if config.deterministic:
            enable_determinism(self.device, compiling=config.compile)
        seed_everything(config.seed)
        self._build_data(opener_for)
        self._build_model()
        self.validator = Validator(
            config,
            self.loaders.val,
            num_classes=self.num_classes,
            device=self.device,
            bf16=self.bf16,
        )
        self.optimization = Optimization(
            config,
            self.model,
            self.device,
            bf16=self.bf16,
            total_steps=self.total_steps,
            reject_classes=self.inspection.reject_classes,
        )
        self.state = RunState()
        self.epoch_acc = EpochAccumulator()
        self.best_state: dict[str, torch.Tensor] | None = None
        self._masked_tasks = tuple(config.debug.mask_tasks_by_rank.get(self.env.rank, ()))
        self._nan_loss_steps = set(config.debug.nan_loss_steps_by_rank.get(self.env.rank, ()))

    def _build_data(self, opener_for: OpenerFor | None) -> None:
        config = self.config
        self.data = open_datasets_on_every_rank(config, self.env, opener_for)
        self.inspection = inspection_setup(config, self.data.train, self.data.reject_classes)
        require_class_task_for_anomalies(config, self.inspection.class_task)
        self.contract = self.inspection.contract
        defective: tuple[int, ...] = ()
        if config.data.format == "line":
            check_resolution(config, self.data.train, self.contract, lines_of(self.data.train))
            defective = self._census()
        self.loaders = build_loaders(
            config,
            self.env,
            self.data.train,
            self.data.val,
            build_transforms(
                config,
                self.contract,
                self.data.depth_is_disparity,
                self.inspection.class_task,
                self.inspection.reject_classes,
            ),
            defective=defective,
            micro_batch=self.micro_batch,
            eval_batch=self.eval_batch,
            pin_memory=self.device.type == "cuda",
        )
        tiles = config.data.tiling.tiles_per_image if config.data.tiling else 1
        self.steps_per_epoch, self.total_steps, self.num_epochs = run_length(
            config, len(self.data.train) * tiles, self.env.world_size
        )

    def _census(self) -> tuple[int, ...]:
        """The training images that show defects (every rank plans the same tiles from them);
        rank 0 logs how many and shouts when none do and nothing is pasted."""
        setup = self.inspection
        if setup.class_task is None:
            return ()
        census = defect_census(self.data.train, setup.class_task, setup.reject_classes)
        if not self.env.is_main:
            return census.defective_indices
        self._info("train split: %s", census.describe())
        warning = warn_if_defect_free(
            census, self.config.data.anomalies is not None, self.config.data.train_split
        )
        if warning:
            log.warning(warning)
        return census.defective_indices

    def _build_model(self) -> None:
        config = self.config
        self.class_names = self.data.class_names
        num_classes = config.model.num_classes or (len(self.class_names) or None)
        if any(get_task(t).needs_num_classes for t in self.tasks) and not num_classes:
            raise ConfigError("model.num_classes: the dataset names no classes; set it")
        if num_classes and self.class_names and num_classes < len(self.class_names):
            raise ConfigError(
                f"model.num_classes {num_classes} < the dataset's {len(self.class_names)} classes"
            )
        self.num_classes = num_classes
        self.spec = config.model.spec(num_classes)
        self.model = build_model(self.spec)
        if config.model.init_from:
            self._load_initial_weights(config.model.init_from)
        self.model.to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _load_initial_weights(self, folder: str) -> None:
        from safetensors.torch import load_file

        verify_checksums(folder)
        state = load_file(Path(folder) / WEIGHTS)
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"model.init_from: {folder} does not fit model: {exc}") from None

    def _info(self, message: str, *args: Any) -> None:
        if self.env.is_main:
            log.info(message, *args)

    # ---- the loop -----------------------------------------------------------------------
    def fit(self, resume: bool | str = "auto") -> TrainResult:
        config = self.config
        self._start(resume)
        for callback in self.callbacks:
            callback.on_train_start(self)
        accum = config.grad_accum_steps
        while (
            not self.state.stopped_early
            and self.state.epoch < self.num_epochs
            and self.state.global_step < self.total_steps
        ):
            epoch = self.state.epoch
            start = self.state.steps_in_epoch * self.micro_batch * accum
            self.loaders.sampler.set_epoch(epoch, start_index=start)
            self.optimization.step_module.train()
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=self.state.steps_in_epoch,
                desc=f"epoch {epoch + 1}/{self.num_epochs}",
                unit="step",
                disable=not (self.env.is_main and config.progress and sys.stderr.isatty()),
                leave=False,
            )
            batches = iter(self.loaders.train)
            while (
                self.state.steps_in_epoch < self.steps_per_epoch
                and self.state.global_step < self.total_steps
            ):
                logs = self._optimizer_step(batches)
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{logs['images_per_s']:.1f}")
                for callback in self.callbacks:
                    callback.on_step_end(self.state.global_step, logs)
                every = config.checkpoint.every_steps
                mid_epoch = self.state.steps_in_epoch < self.steps_per_epoch
                if every and self.state.global_step % every == 0 and mid_epoch:
                    self.save_checkpoint()
            bar.close()
            del batches
            self._end_epoch()
        return self._finish()

    def _optimizer_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, float]:
        started = time.perf_counter()
        nan_loss = self.state.global_step + 1 in self._nan_loss_steps
        outcome = self.optimization.step(
            batches, self.epoch_acc, self._masked_tasks, nan_loss=nan_loss
        )
        elapsed = time.perf_counter() - started
        self.state.global_step += 1
        self.state.steps_in_epoch += 1
        self.state.images_seen += self.config.batch_size
        self.state.train_time_s += elapsed
        if outcome.skipped:
            self._skipped(outcome)
        else:
            self.state.skipped_in_a_row = 0
        logs = {
            "epoch": float(self.state.epoch + 1),
            "loss": outcome.loss,
            "lr": self.optimization.lr,
            "grad_norm": outcome.grad_norm,
            "images_per_s": self.config.batch_size / elapsed if elapsed > 0 else 0.0,
            "skipped_steps": float(self.state.skipped_steps),
        }
        logs.update({f"loss_{task}": value for task, value in outcome.task_losses.items()})
        return logs

    def _skipped(self, outcome: StepOutcome) -> None:
        """Count a skipped step (every rank skips together); stop after too many in a row."""
        state = self.state
        state.skipped_steps += 1
        state.skipped_in_a_row += 1
        limit = self.config.optim.max_skipped_steps_in_a_row
        what = f"loss {outcome.loss:.4g}, grad norm {outcome.grad_norm:.4g} on this rank"
        if self.env.is_main:
            log.warning(
                "step %d: non-finite loss or gradients (%s); optimizer step skipped "
                "(%d in a row, %d in this run)",
                state.global_step,
                what,
                state.skipped_in_a_row,
                state.skipped_steps,
            )
        if state.skipped_in_a_row >= limit:
            raise TrainingError(
                f"training diverged: {limit} optimizer steps in a row (up to step "
                f"{state.global_step}) had a non-finite loss or gradients ({what}); no model "
                "written. Lower optim.lr, set optim.grad_clip or check the data "
                "(optim.max_skipped_steps_in_a_row sets the limit)"
            )

    def _end_epoch(self) -> None:
        weighting = self.optimization.loss.weighting
        train_logs, mean_losses = self.epoch_acc.epoch_means(
            self.tasks, self.optimization.lr, self.device
        )
        weighting.epoch_end(mean_losses)
        val_metrics = self.validate()
        epoch_number = self.state.epoch + 1
        improved = self._update_best(val_metrics, epoch_number)
        patience = self.config.early_stopping.patience
        if not improved and self.state.stops_after_bad_epoch(patience):
            self._info(
                "early stopping after epoch %d: %s did not improve for %d epochs",
                epoch_number,
                self.config.early_stopping.metric,
                patience,
            )
        self.state.history.append(
            {
                "epoch": epoch_number,
                "step": self.state.global_step,
                "train": train_logs,
                "val": val_metrics,
                "loss_weights": weighting.weights(),
                "improved": improved,
            }
        )
        metric = self.config.early_stopping.metric
        selection = (
            "" if metric == VAL_LOSS else f", {metric} {val_metrics.get(metric, math.nan):.4f}"
        )
        pasted = (
            f", {int(train_logs['anomalies'])} synthetic anomalies pasted"
            if train_logs.get("anomalies")
            else ""
        )
        skipped = (
            f", {int(train_logs['skipped_steps'])} steps skipped (non-finite loss or gradients)"
            if train_logs["skipped_steps"]
            else ""
        )
        self._info(
            "epoch %d/%d step %d: train loss %.4f, val_loss %.4f%s%s%s%s",
            epoch_number,
            self.num_epochs,
            self.state.global_step,
            train_logs["loss"],
            val_metrics[VAL_LOSS],
            selection,
            pasted,
            skipped,
            " (best)" if improved else "",
        )
        self.state.epoch += 1
        self.state.steps_in_epoch = 0
        self.epoch_acc = EpochAccumulator()
        self.save_checkpoint()
        for callback in self.callbacks:
            callback.on_epoch_end(epoch_number, train_logs, val_metrics)

    def _update_best(self, metrics: Mapping[str, float], epoch_number: int) -> bool:
        name = self.config.early_stopping.metric
        improved = self.state.record_if_best(
            float(metrics.get(name, math.nan)),
            epoch_number,
            metrics,
            min_delta=self.config.early_stopping.min_delta,
            higher=self.config.metric_direction(name) == "higher",
        )
        if improved and self.env.is_main:
            self.best_state = {
                k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
            }
        return improved

    def validate(self) -> dict[str, float]:
        """Metrics on `val_split` (see `Validator`)."""
        return self.validator(self.model)

    # ---- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Every rank takes part (RNG states are gathered); rank 0 writes and prunes."""
        rng = all_gather_object(rng_state(self.device, self.loaders.generator))
        path = checkpoint_path(self.checkpoint_dir, self.state.global_step)
        if self.env.is_main:
            state = training_checkpoint(
                self.config,
                world_size=self.env.world_size,
                progress=self.state,
                start_index=self.state.steps_in_epoch
                * self.micro_batch
                * self.config.grad_accum_steps,
                optimization=self.optimization.state_dict(),
                epoch_acc=self.epoch_acc,
                best_model=self.best_state,
                rng=rng,
            )
            save_checkpoint_atomic(path, state)
            prune_checkpoints(self.checkpoint_dir, self.config.checkpoint.keep_last)
        barrier()
        return path

    def _start(self, resume: bool | str) -> None:
        chosen: str | None = None
        if self.env.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            path = choose_checkpoint(self.checkpoint_dir, resume)
            chosen = None if path is None else str(path)
        chosen = broadcast_object(chosen)
        if chosen is not None:
            self._restore(load_checkpoint(Path(chosen)), Path(chosen))
        else:
            self._info(
                "training %s on %d process(es): %d steps (%d epochs of %d), micro-batch %d",
                self.spec.arch,
                self.env.world_size,
                self.total_steps,
                self.num_epochs,
                self.steps_per_epoch,
                self.micro_batch,
            )
        if self.env.is_main:  # only once the checkpoint (if any) proved it is the same run
            config_text = yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False)
            write_bytes_atomic(self.output / "config.yaml", config_text.encode())

    def _restore(self, state: Mapping[str, Any], path: Path) -> None:
        check_resumable(state, self.config, path, self.env.world_size)
        self.optimization.load_state_dict(state)
        self.state, self.epoch_acc = progress_of(state)
        self.best_state = state["best"]["model"] if self.env.is_main else None
        rng_states = state["rng"]
        rank_state = rng_states[self.env.rank] if self.env.rank < len(rng_states) else rng_states[0]
        set_rng_state(rank_state, self.device, self.loaders.generator)
        self._info(
            "resumed from %s: step %d, epoch %d, %d steps into it",
            path,
            self.state.global_step,
            self.state.epoch + 1,
            self.state.steps_in_epoch,
        )

    # ---- the end ----------------------------------------------------------------------------
    def _finish(self) -> TrainResult:
        result = TrainResult.of(self.state, self.output / MODEL_DIR)
        if self.config.debug.dump_param_hashes:
            self._dump_param_hash()
        if self.env.is_main and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        problem = broadcast_object(self._unusable(result) if self.env.is_main else None)
        if problem is not None:
            raise TrainingError(f"{self.output}: {problem}; no model written")
        if self.env.is_main:
            write_model_folder(
                self.model,
                self.output,
                class_names=self.class_names,
                contract=self.contract,
                inspection=self.inspection.score,
                trained_pitch_mm_per_px=self.inspection.trained_pitch_mm_per_px,
                # Validated under bf16, so scored and served under it (Predictor).
                precision="bf16" if self.bf16 else "fp32",
                lineage=self.lineage(),
                reference_data=self.data.val,
                device=self.device,
                batch_size=self.eval_batch,
            )
            write_result(self.output, result)
            metric = self.config.early_stopping.metric
            self._info(
                "done: %d steps, best epoch %d (%s = %.4f), %.1f images/s, model in %s",
                result.steps,
                result.best_epoch,
                metric,
                result.best_metrics.get(metric, math.nan),
                result.images_per_s,
                result.model_dir,
            )
            for callback in self.callbacks:
                callback.on_train_end(result)
        barrier()  # every rank returns once the model folder exists
        return result

    def _unusable(self, result: TrainResult) -> str | None:
        """Why the model to be written must not be (non-finite weights, no finite validation
        metric); None when it is fine. Rank 0 decides (it holds the best weights)."""
        bad = nonfinite_tensors(self.model.state_dict())
        if bad:
            return (
                f"the trained weights hold NaN or infinite values in {len(bad)} tensor(s) "
                f"(e.g. {', '.join(bad[:3])})"
            )
        if not any(math.isfinite(value) for value in result.best_metrics.values()):
            return f"no finite validation metric at epoch {result.best_epoch}"
        return None

    def _dump_param_hash(self) -> None:
        """Debug hook: each rank writes a digest of its parameters (DDP keeps them equal)."""
        folder = self.output / "debug"
        folder.mkdir(parents=True, exist_ok=True)
        digest = parameter_digest(self.optimization.step_module)
        (folder / f"params-rank{self.env.rank}.sha256").write_text(digest + "\n")

    def lineage(self) -> dict[str, Any]:
        """The model folder's lineage.json (also what the tracking callback logs)."""
        return run_lineage(
            self.config,
            self.data.lineage,
            world_size=self.env.world_size,
            steps=self.state.global_step,
            best_epoch=self.state.best_epoch,
        )


# ================================================================== entry points
def train(
    config: TrainConfig,
    *,
    callbacks: Sequence[TrainCallback] = (),
    resume: bool | str = "auto",
    opener_for: OpenerFor | None = None,
) -> TrainResult:
    """Train one model; under torchrun every process calls this with the same config.

    resume: "auto" (continue from the latest readable checkpoint in <output>/checkpoints when
    there is one; its config must match), True / "always" (must resume), False / "never"
    (start over, deleting old checkpoints) or the path of a checkpoint file.
    opener_for: maps a dataset URI to an opener (components.storage.opener_for for s3://).
    """
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with distributed_session():
            trainer = Trainer(config, callbacks=callbacks, opener_for=opener_for)
            return trainer.fit(resume)
    finally:
        set_deterministic(previous, warn_only=previous_warn, compiling=config.compile)


def validate(config: TrainConfig, *, opener_for: OpenerFor | None = None) -> dict[str, float]:
    """Validation metrics of the weights in `config.model.init_from` (no training)."""
    with distributed_session():
        return Trainer(config, opener_for=opener_for).validate()
