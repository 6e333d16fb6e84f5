"""Backbones written from scratch whose parameter names match torchvision (ResNet) and the
official HRNet code, so users' existing checkpoint files load into them as they are."""

from __future__ import annotations

import os
from collections.abc import Callable

from cta_model.errors import ConfigError
from cta_model.nn.backbones.base import Backbone
from cta_model.nn.backbones.hrnet import HRNetW18SmallV2, hrnet_w18_small_v2
from cta_model.nn.backbones.resnet import ResNet, resnet18, resnet34, resnet50
from cta_model.nn.backbones.weights import BackboneWeightsError, load_backbone_weights

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneWeightsError",
    "HRNetW18SmallV2",
    "ResNet",
    "build_backbone",
    "load_backbone_weights",
]

# Each factory takes a keyword-only `output_stride` (None for the backbone's default).
BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "hrnet-w18-small-v2": hrnet_w18_small_v2,
}


def build_backbone(
    name: str,
    *,
    output_stride: int | None = None,
    weights: str | os.PathLike[str] | None = None,
) -> Backbone:
    """Build backbone `name` and, if `weights` is given, load that checkpoint file into it.

    Raises ConfigError (a ValueError) for an unknown name or an unsupported output_stride,
    FileNotFoundError / BackboneWeightsError for a weights file that is absent or does not fit.
    """
    factory = BACKBONES.get(name)
    if factory is None:
        valid = ", ".join(BACKBONES)
        raise ConfigError(f"unknown backbone {name!r}; valid names: {valid}")
    backbone = factory(output_stride=output_stride)
    if weights is not None:
        load_backbone_weights(backbone, weights)
    return backbone
