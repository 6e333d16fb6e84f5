"""Checkpoints: what one holds, written atomically with a sha256 sidecar, read back with
weights_only=True.

`<output>/checkpoints/step-<8 digits>.pt` holds tensors and primitive containers only
(`training_checkpoint`, format `CHECKPOINT_FORMAT`). A file whose sidecar is missing or differs
is never loaded; `load_latest_checkpoint` falls back to the previous readable one. A run resumes
only from a checkpoint of the same trajectory (`TrainConfig.trajectory_hash`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cta_model.atomic import fsync_dir, write_bytes_atomic
from cta_model.errors import ConfigError, DataError
from cta_model.model_folder import file_sha256
from cta_model.train_config import TrainConfig, config_differences
from cta_model.training.progress import EpochAccumulator, RunState

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = 1
_CHECKPOINT_RE = re.compile(r"^step-(\d{8})\.pt$")
_REQUIRED_KEYS = ("format", "config_hash", "model", "optimizer", "global_step")


def training_checkpoint(
    config: TrainConfig,
    *,
    world_size: int,
    progress: RunState,
    start_index: int,
    optimization: Mapping[str, Any],
    epoch_acc: EpochAccumulator,
    best_model: Mapping[str, torch.Tensor] | None,
    rng: list[dict[str, Any]],
) -> dict[str, Any]:
    """The checkpoint of a run after `progress.global_step` steps.

    start_index: the train sampler's position in this epoch (samples per rank already seen);
    optimization: `Optimization.state_dict()` (weights, loss, optimizer, scheduler, teacher);
    best_model: the best epoch's weights so far; rng: every rank's random streams, by rank.
    """
    s = progress
    return {
        "format": CHECKPOINT_FORMAT,
        "config_hash": config.trajectory_hash(),
        "config": json.dumps(config.trajectory_dict(), sort_keys=True),
        "world_size": world_size,
        "global_step": s.global_step,
        "epoch": s.epoch,
        "steps_in_epoch": s.steps_in_epoch,
        "sampler": {"epoch": s.epoch, "start_index": start_index},
        "stopped_early": s.stopped_early,
        **optimization,
        "epoch_acc": epoch_acc.to_state(),
        "best": {
            "value": s.best_value,
            "epoch": s.best_epoch,
            "metrics": s.best_metrics,
            "bad_epochs": s.bad_epochs,
            "model": best_model,
        },
        "history": s.history,
        "images_seen": s.images_seen,
        "train_time_s": s.train_time_s,
        "skipped_steps": s.skipped_steps,
        "skipped_in_a_row": s.skipped_in_a_row,
        "rng": rng,
    }


def check_resumable(
    state: Mapping[str, Any], config: TrainConfig, path: Path, world_size: int
) -> None:
    """ConfigError naming the differing keys when `state` was written with another trajectory;
    a warning when another number of processes wrote it (the data order then differs)."""
    if state["config_hash"] != config.trajectory_hash():
        differences = config_differences(json.loads(state["config"]), config.trajectory_dict())
        raise ConfigError(
            f"{path}: was written with a different config; resuming would not continue "
            f"the same run. Differences (checkpoint -> now): {'; '.join(differences)}. "
            "Use another output folder or resume=False (--resume never)."
        )
    if state["world_size"] != world_size:
        log.warning(
            "%s: written by %d process(es), resumed on %d: the data order after the "
            "resume point differs from an uninterrupted run",
            path,
            state["world_size"],
            world_size,
        )


def progress_of(state: Mapping[str, Any]) -> tuple[RunState, EpochAccumulator]:
    """The run's progress and the running epoch's sums as a checkpoint saved them."""
    best = state["best"]
    progress = RunState(
        global_step=state["global_step"],
        epoch=state["epoch"],
        steps_in_epoch=state["steps_in_epoch"],
        stopped_early=state["stopped_early"],
        best_value=best["value"],
        best_epoch=best["epoch"],
        best_metrics=dict(best["metrics"]),
        bad_epochs=best["bad_epochs"],
        history=list(state["history"]),
        images_seen=state["images_seen"],
        train_time_s=state["train_time_s"],
        # Absent from checkpoints written before steps could be skipped.
        skipped_steps=state.get("skipped_steps", 0),
        skipped_in_a_row=state.get("skipped_in_a_row", 0),
    )
    return progress, EpochAccumulator.from_state(state["epoch_acc"])


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def remove_checkpoint(path: Path) -> None:
    path.unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def prune_checkpoints(folder: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` checkpoints."""
    for _, old in list_checkpoints(folder)[:-keep_last]:
        remove_checkpoint(old)


def save_checkpoint_atomic(path: Path, state: Mapping[str, Any]) -> None:
    """torch.save into a temp file of the same folder, flush + fsync, os.replace, fsync folder:
    a crash leaves the old file or the new one, never half of one under the final name.
    The sha256 sidecar is written first, so a checkpoint without a matching one is invalid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(dict(state), stream)
            stream.flush()
            os.fsync(stream.fileno())
        write_bytes_atomic(checksum_path(path), (file_sha256(temporary) + "\n").encode())
        os.replace(temporary, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with weights_only=True; DataError when the file is truncated, corrupt or foreign."""
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        raise DataError(f"{path}: no {sidecar.name}; the checkpoint was never completed")
    if file_sha256(path) != sidecar.read_text().strip():
        raise DataError(f"{path}: sha256 differs from {sidecar.name} (corrupt checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncation surfaces as zipfile / pickle / runtime errors
        raise DataError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED_KEYS):
        raise DataError(f"{path}: not a cta training checkpoint")
    if state["format"] != CHECKPOINT_FORMAT:
        raise DataError(
            f"{path}: checkpoint format {state['format']}, expected {CHECKPOINT_FORMAT}"
        )
    return state


def load_latest_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint; unreadable newer ones are skipped with a warning."""
    candidates = list_checkpoints(folder)
    problems = []
    for _, path in reversed(candidates):
        try:
            state = load_checkpoint(path)
        except DataError as exc:
            message = f"{exc}; falling back to the previous checkpoint"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            log.warning(message)
            problems.append(str(exc))
            continue
        return path, state
    if candidates:
        raise DataError(
            f"{folder}: no readable checkpoint ({'; '.join(problems)}); "
            "start over with resume=False (--resume never)"
        )
    return None


def choose_checkpoint(folder: Path, resume: bool | str) -> Path | None:
    """The checkpoint a run with this `resume` setting continues from (see `train`), or None to
    start over; starting over removes the checkpoints of an earlier run."""
    if resume is False or resume == "never":
        stale = list_checkpoints(folder)
        if stale:
            log.warning("resume=False: removing %d checkpoints of an earlier run", len(stale))
            for _, path in stale:
                remove_checkpoint(path)
        return None
    if isinstance(resume, str) and resume not in ("auto", "always"):
        path = Path(resume)
        load_checkpoint(path)  # fail here, clearly, if it is unreadable
        return path
    found = load_latest_checkpoint(folder)
    if found is None:
        if resume is True or resume == "always":
            raise DataError(f"{folder}: no checkpoint to resume from")
        return None
    return found[0]
