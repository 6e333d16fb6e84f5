"""The small contract every backbone meets, so heads can be built without knowing which."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from cta_model.errors import ConfigError


class Backbone(nn.Module):
    """A feature extractor: image batch (B, 3, H, W) -> one feature map (B, C, H/stride, W/stride).

    Subclasses set `out_channels` and `stride` in __init__ and declare, as class attributes,
    the output strides they can be built with and the key prefixes of the classification head
    that pretrained checkpoints carry but the backbone has no use for.
    """

    out_channels: int
    stride: int
    # The output strides this backbone can be built with; the first is the default.
    supported_output_strides: ClassVar[tuple[int, ...]] = ()
    # Checkpoint keys starting with one of these are dropped when loading weights.
    ignored_checkpoint_prefixes: ClassVar[tuple[str, ...]] = ()


def resolve_output_stride(
    backbone_name: str, requested: int | None, supported: tuple[int, ...]
) -> int:
    """The output stride to build: `requested`, or the default (first of `supported`) if None."""
    if requested is None:
        return supported[0]
    if requested not in supported:
        allowed = ", ".join(str(value) for value in supported)
        raise ConfigError(
            f"output_stride={requested!r} is not supported by backbone {backbone_name!r}; "
            f"allowed values: {allowed} (or leave output_stride unset for {supported[0]})"
        )
    return requested
