"""Multitask networks under one interface (DESIGN 3.1, 3.3).

Every model maps an image batch (B, 3, H, W) to `MultiTaskOutput(final, initial)`: two dicts
{task: (B, out_channels, H, W)} at the input resolution. `initial` holds the deep-supervision
predictions (empty for models without them). Architectures are chosen by name from
`ARCHITECTURES`; a `ModelSpec` is everything needed to rebuild a model (it goes to model.yaml).
Its settings (`NetworkSettings`) are defined once, with their defaults and checks; the train
config's `model:` section extends them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Self

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator, model_validator

from cta_model import tasks as task_registry
from cta_model.config import StrictModel, format_validation_error
from cta_model.errors import ConfigError
from cta_model.nn.backbones import BACKBONES, build_backbone
from cta_model.nn.ctal import (
    AFFINITY_MODES,
    DEFAULT_GAMMA,
    DEFAULT_KERNEL_SIZE,
    DEFAULT_MODE,
    DEFAULT_POOL_FACTOR,
    DEFAULT_SHARED_FUSION,
    CrossTaskAffinity,
)
from cta_model.nn.heads import InitialTaskDecoders, LightTaskHead, TaskHead, Upsample2x

MAX_INPUT_SIDE = 8192  # pixels per side of model.input_size


class MultiTaskOutput(NamedTuple):
    final: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]


class NetworkSettings(StrictModel):
    """The settings that decide a network's layers, with their defaults and checks, defined
    once: `ModelSpec` (model.yaml) and the train config's `model:` section extend it."""

    arch: str = "ctal"
    tasks: tuple[str, ...] = ("semseg", "height", "normals")
    input_size: tuple[int, int] = (128, 128)  # (H, W) the model is built for; CTAL's grid
    backbone: str = "hrnet-w18-small-v2"
    num_classes: int | None = Field(default=None, ge=2, le=65_536)  # semseg classes
    output_stride: Literal[8, 16, 32] | None = None  # ResNet only
    backbone_weights: str | None = None  # a local checkpoint file; never downloaded
    decoder_channels: int = Field(default=256, ge=8, le=8192)
    affinity_channels: int = Field(default=128, ge=1, le=8192)  # C of DESIGN 3.1
    gamma: float = Field(default=DEFAULT_GAMMA, ge=0, le=1)
    fusion_kernel_size: int = Field(default=DEFAULT_KERNEL_SIZE, ge=1, le=31)
    shared_fusion: bool = DEFAULT_SHARED_FUSION
    # How CTAL computes the block (cta_model/nn/ctal.py): auto | dense | blocked | linear | pooled.
    # dense/blocked/linear/auto share state-dict keys and shapes; pooled sizes the fusion for the
    # pooled grid. Old model.yaml files without these keys load with the defaults.
    affinity_mode: str = DEFAULT_MODE
    affinity_block_size: int | None = Field(default=None, ge=1, le=2**24)  # None: by memory
    affinity_pool_factor: int = Field(default=DEFAULT_POOL_FACTOR, ge=1, le=64)  # pooled only

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            raise ValueError(f"unknown arch {value!r}; choose one of {', '.join(ARCHITECTURES)}")
        return value

    @field_validator("tasks", mode="before")
    @classmethod
    def _parse_tasks(cls, value: Any) -> Any:
        if isinstance(value, str | list | tuple):
            return task_registry.parse_tasks(value)  # ConfigError is a ValueError
        return value

    @field_validator("input_size")
    @classmethod
    def _check_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 8 or max(value) > MAX_INPUT_SIDE:
            raise ValueError(
                f"must be [height, width], each in [8, {MAX_INPUT_SIDE}], got {list(value)}"
            )
        return value

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r}; choose one of {', '.join(BACKBONES)}")
        return value

    @field_validator("backbone_weights")
    @classmethod
    def _local_weights(cls, value: str | None) -> str | None:
        if value is not None and "://" in value:
            raise ValueError("must be a local file (weights are never downloaded)")
        return value

    @field_validator("affinity_mode")
    @classmethod
    def _known_mode(cls, value: str) -> str:
        if value not in AFFINITY_MODES:
            raise ValueError(
                f"unknown affinity_mode {value!r}; choose one of {', '.join(AFFINITY_MODES)}"
            )
        return value

    @model_validator(mode="after")
    def _check_arch(self) -> Self:
        if self.arch == "ctal" and len(self.tasks) < 2:
            raise ValueError(f"arch 'ctal' needs at least 2 tasks, got {list(self.tasks)}")
        if self.output_stride is not None and not self.backbone.startswith("resnet"):
            raise ValueError(f"output_stride applies to ResNet backbones only, not {self.backbone}")
        return self


class ModelSpec(NetworkSettings):
    """Everything needed to rebuild a model: the `model:` section of model.yaml.

    Invalid settings raise ConfigError naming the key.
    """

    extra: dict[str, Any] = Field(default_factory=dict)

    def __init__(self, **settings: Any) -> None:
        try:
            super().__init__(**settings)
        except ValidationError as exc:
            raise ConfigError(format_validation_error("model", exc)) from None

    def replace(self, **changes: Any) -> ModelSpec:
        """A checked copy with `changes` applied."""
        return ModelSpec(**{**self.model_dump(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        known = set(cls.model_fields)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(data))

    @property
    def out_channels(self) -> dict[str, int]:
        return task_registry.out_channels(self.tasks, self.num_classes)


class MultiTaskNet(nn.Module):
    """Base: keeps the spec, upsamples raw task maps to the input size and applies activations."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.tasks = spec.tasks

    def _to_input_size(
        self, raw: Mapping[str, torch.Tensor], size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        return {
            t: task_registry.get_task(t).activation(
                F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            )
            for t, x in raw.items()
        }

    def _check_task_keys(self, **module_dicts: Mapping[str, Any]) -> None:
        # Vandenhende's rule: a config drift fails at construction, not at epoch 40.
        for name, modules in module_dicts.items():
            if tuple(modules.keys()) != self.tasks:
                raise ConfigError(f"{name} tasks {list(modules)} != model tasks {list(self.tasks)}")


def feature_grid(input_size: tuple[int, int], stride: int) -> tuple[int, int]:
    # Every stride-2 step (3x3 conv, padding 1) yields ceil(size / 2), so the grid is a ceil.
    return (math.ceil(input_size[0] / stride), math.ceil(input_size[1] / stride))


class _DictIdentity(nn.Module):
    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return features


class DecoderNet(MultiTaskNet):
    """Backbone -> initial decoders (deep supervision) -> 1x1 to C -> refinement -> x2 -> heads.

    HPS and CTAL differ only in `refinement`: identity for HPS, the affinity block for CTAL, so
    a ratio of the two isolates the block's cost (DESIGN 3.3).
    """

    def __init__(
        self,
        spec: ModelSpec,
        make_refinement: Callable[[tuple[int, int]], nn.Module] | None = None,
    ) -> None:
        super().__init__(spec)
        self.backbone = build_backbone(
            spec.backbone, output_stride=spec.output_stride, weights=spec.backbone_weights
        )
        out_channels = spec.out_channels
        self.initial_decoders = InitialTaskDecoders(
            self.backbone.out_channels, out_channels, spec.decoder_channels
        )
        c = spec.affinity_channels
        self.projections = nn.ModuleDict(
            {t: nn.Conv2d(spec.decoder_channels, c, 1) for t in self.tasks}
        )
        # The refinement (CTAL's block) is sized by the feature grid, known once the backbone is.
        self.refinement = make_refinement(self.grid) if make_refinement else _DictIdentity()
        self.upsample = nn.ModuleDict({t: Upsample2x(c) for t in self.tasks})
        self.heads = nn.ModuleDict({t: TaskHead(c, out_channels[t]) for t in self.tasks})
        self._check_task_keys(
            initial_decoders=self.initial_decoders.decoders,
            projections=self.projections,
            upsample=self.upsample,
            heads=self.heads,
        )

    @property
    def grid(self) -> tuple[int, int]:
        return feature_grid(self.spec.input_size, self.backbone.stride)

    def refined_features(self, images: torch.Tensor):
        """Backbone to refined per-task features; also returns the initial raw predictions."""
        features, initial = self.initial_decoders(self.backbone(images))
        projected = {t: self.projections[t](features[t]) for t in self.tasks}
        return self.refinement(projected), initial, projected

    def forward(self, images: torch.Tensor) -> MultiTaskOutput:
        size = (images.shape[-2], images.shape[-1])
        refined, initial, _ = self.refined_features(images)
        final = {t: self.heads[t](self.upsample[t](refined[t])) for t in self.tasks}
        return MultiTaskOutput(self._to_input_size(final, size), self._to_input_size(initial, size))


class HPSNet(DecoderNet):
    """Hard parameter sharing with CTAL's decoders and heads; the affinity block is identity."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)


class CTALNet(DecoderNet):
    """HPS plus the Cross-Task Affinity block on the per-task C-channel features."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(
            spec,
            make_refinement=lambda grid: CrossTaskAffinity(
                spec.tasks,
                channels=spec.affinity_channels,
                grid=grid,
                gamma=spec.gamma,
                kernel_size=spec.fusion_kernel_size,
                shared_fusion=spec.shared_fusion,
                mode=spec.affinity_mode,
                block_size=spec.affinity_block_size,
                pool_factor=spec.affinity_pool_factor,
            ),
        )

    def affinity_maps(
        self, images: torch.Tensor, pixels: Sequence[tuple[int, int]]
    ) -> dict[str, torch.Tensor]:
        """Affinity maps of chosen image pixels (y, x), per task and fused, for explanation.

        Each pixel maps to its feature-grid cell; returns
        `CrossTaskAffinity.affinity_maps` ({task: (B, P, h, w), "fused": ...} on the feature
        grid, computing only the chosen rows).
        """
        height, width = images.shape[-2:]
        for y, x in pixels:
            if not (0 <= y < height and 0 <= x < width):
                raise ValueError(f"pixel (y={y}, x={x}) is outside the {height}x{width} image")
        grid = self.refinement.grid
        cells = [(int(y * grid[0] / height), int(x * grid[1] / width)) for y, x in pixels]
        features, _ = self.initial_decoders(self.backbone(images))
        projected = {t: self.projections[t](features[t]) for t in self.tasks}
        return self.refinement.affinity_maps(projected, cells)


class HPSLightNet(MultiTaskNet):
    """Backbone + one light head per task (the paper's lighter HPS); no deep supervision."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.backbone = build_backbone(
            spec.backbone, output_stride=spec.output_stride, weights=spec.backbone_weights
        )
        self.heads = nn.ModuleDict(
            {t: LightTaskHead(self.backbone.out_channels, c) for t, c in spec.out_channels.items()}
        )
        self._check_task_keys(heads=self.heads)

    def forward(self, images: torch.Tensor) -> MultiTaskOutput:
        size = (images.shape[-2], images.shape[-1])
        features = self.backbone(images)
        raw = {t: head(features) for t, head in self.heads.items()}
        return MultiTaskOutput(self._to_input_size(raw, size), {})


class STLNet(MultiTaskNet):
    """One independent single-task network (HPS layout) per task, behind the same interface."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.networks = nn.ModuleDict(
            {t: HPSNet(spec.replace(arch="hps", tasks=(t,))) for t in self.tasks}
        )

    def forward(self, images: torch.Tensor) -> MultiTaskOutput:
        final: dict[str, torch.Tensor] = {}
        initial: dict[str, torch.Tensor] = {}
        for network in self.networks.values():
            out = network(images)
            final.update(out.final)
            initial.update(out.initial)
        return MultiTaskOutput(final, initial)


ARCHITECTURES: dict[str, type[MultiTaskNet]] = {
    "stl": STLNet,
    "hps": HPSNet,
    "hps-light": HPSLightNet,
    "ctal": CTALNet,
}


def build_model(spec: ModelSpec) -> MultiTaskNet:
    return ARCHITECTURES[spec.arch](spec)


def resize_model(
    model: MultiTaskNet, input_size: tuple[int, int], interpolation: str = "bilinear"
) -> MultiTaskNet:
    """A copy of a trained model for another input size (any-resolution inference).

    Only CTAL depends on the grid: its per-position fusion kernels and biases are resampled to
    the new feature grid (`CrossTaskAffinity.at_grid`, `bilinear` or `nearest`); every other
    weight is copied. The copy's spec carries the new input_size, so it saves and loads as a
    model folder for that size. Other architectures only get the new spec.
    """
    spec = model.spec.replace(input_size=tuple(input_size))
    resized = build_model(spec)
    state = model.state_dict()
    if isinstance(model, CTALNet):
        new_block = model.refinement.at_grid(
            feature_grid(spec.input_size, model.backbone.stride), interpolation
        )
        state.update({f"refinement.{k}": v for k, v in new_block.state_dict().items()})
    resized.load_state_dict(state)
    reference = next(model.parameters())
    return resized.to(device=reference.device, dtype=reference.dtype).train(model.training)
