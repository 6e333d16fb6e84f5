"""Loading users' existing checkpoint files (torchvision / official HRNet / DDP-wrapped) into a
backbone, strictly, with an error that says exactly what does not fit."""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from cta_model.errors import CtaError

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
# Training scripts often save {"state_dict": ..., "epoch": ...} or {"model": ...}.
_WRAPPER_KEYS = ("state_dict", "model")
# DataParallel / DistributedDataParallel prefix every key with this.
_DATA_PARALLEL_PREFIX = "module."
# How many keys of each kind an error message lists before summarising the rest.
_MAX_LISTED_KEYS = 20


class BackboneWeightsError(CtaError, ValueError):
    """A checkpoint file cannot be read or does not fit the backbone's parameters."""


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load the weights in `path` into `backbone`, strictly, after dropping its ignored head keys.

    The backbone is only modified once every key and shape has been checked.
    Raises FileNotFoundError if `path` does not exist and BackboneWeightsError if it cannot be
    read safely or its keys/shapes do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    state_dict = _read_state_dict(path)
    state_dict = _strip_prefix(state_dict, _DATA_PARALLEL_PREFIX)

    ignored_prefixes: tuple[str, ...] = getattr(backbone, "ignored_checkpoint_prefixes", ())
    kept = {key: value for key, value in state_dict.items() if not key.startswith(ignored_prefixes)}
    if len(kept) < len(state_dict):
        logger.info(
            "%s: dropped %d classification-head entries (prefixes %s) not used by %s",
            path,
            len(state_dict) - len(kept),
            ", ".join(ignored_prefixes),
            type(backbone).__name__,
        )
    state_dict = _fill_missing_batch_counters(backbone, kept, path)

    _check_fits(backbone, state_dict, path)
    backbone.load_state_dict(state_dict, strict=True)
    logger.info("%s: loaded %d tensors into %s", path, len(state_dict), type(backbone).__name__)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError) as error:
            raise BackboneWeightsError(
                f"{path}: not a readable safetensors file: {error}"
            ) from error
    if suffix in TORCH_PICKLE_SUFFIXES:
        try:
            # weights_only: tensors and plain containers only, never arbitrary pickled objects.
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            raise BackboneWeightsError(
                f"{path}: could not be loaded as a weights-only PyTorch checkpoint (files that "
                f"need arbitrary Python objects unpickled are refused): {error}"
            ) from error
        return _unwrap(checkpoint, path)
    allowed = ", ".join(SAFETENSORS_SUFFIXES + TORCH_PICKLE_SUFFIXES)
    raise BackboneWeightsError(f"{path}: unknown weights file type {suffix!r}; expected {allowed}")


def _unwrap(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(checkpoint, Mapping):
        wrapper = next(
            (key for key in _WRAPPER_KEYS if isinstance(checkpoint.get(key), Mapping)), None
        )
        if wrapper is None:
            break
        checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, Mapping):
        raise BackboneWeightsError(
            f"{path}: expected a state dict (a mapping of names to tensors), "
            f"got {type(checkpoint).__name__}"
        )
    not_tensors = [key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise BackboneWeightsError(
            f"{path}: {len(not_tensors)} entries are not tensors: {_listed(map(str, not_tensors))}"
        )
    return dict(checkpoint)


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): value for key, value in state_dict.items()}


def _fill_missing_batch_counters(
    backbone: nn.Module, state_dict: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """Checkpoints saved before PyTorch 0.4.1 (e.g. torchvision's original ImageNet ResNets) have
    no BatchNorm `num_batches_tracked`; BatchNorm itself fills it with 0 on load, so do the same
    here rather than report it missing. Only for layers whose statistics the checkpoint does
    have, so a checkpoint lacking whole layers still reports every key of them. The counter
    only matters for BatchNorm with momentum=None."""
    counter_suffix = "num_batches_tracked"
    expected = backbone.state_dict()
    absent_counters = [
        key
        for key in expected
        if key.endswith("." + counter_suffix)
        and key not in state_dict
        and key.removesuffix(counter_suffix) + "running_mean" in state_dict
    ]
    if not absent_counters:
        return state_dict
    logger.info(
        "%s: has no num_batches_tracked for %d BatchNorm layers; set to 0",
        path,
        len(absent_counters),
    )
    return state_dict | {key: torch.zeros_like(expected[key]) for key in absent_counters}


def _check_fits(backbone: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = backbone.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: expected {tuple(expected[key].shape)} vs got {tuple(value.shape)}"
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            problems.append(f"{len(items)} {label}: {_listed(items)}")
    raise BackboneWeightsError(
        f"{path} does not fit {type(backbone).__name__}: " + "; ".join(problems)
    )


def _listed(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED_KEYS])
    if len(items) > _MAX_LISTED_KEYS:
        shown += f", ... ({len(items) - _MAX_LISTED_KEYS} more)"
    return shown
