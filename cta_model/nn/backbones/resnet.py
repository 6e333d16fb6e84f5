"""ResNet-18/34/50 feature extractors with torchvision's parameter names, minus avgpool and fc.

Parameter and buffer names and shapes match torchvision.models.resnet{18,34,50} exactly, so
torchvision ImageNet checkpoints (and fine-tuned copies of them) load as they are; only the
classification head `fc.*` is dropped. Output strides 16 and 8 replace the strides of the last
one or two stages by dilation, as torchvision's `replace_stride_with_dilation` does; unlike
torchvision, BasicBlock (ResNet-18/34) supports dilation too.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from cta_model.nn.backbones.base import Backbone, resolve_output_stride


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    # padding=dilation keeps the spatial size at stride 1 for any dilation.
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size=3,
        stride=stride,
        padding=dilation,
        dilation=dilation,
        bias=False,
    )


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion: ClassVar[int] = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        input_dilation: int = 1,
        output_dilation: int = 1,
    ) -> None:
        super().__init__()
        # conv1 sees the block's input resolution, conv2 the output resolution; when a stage's
        # stride is replaced by dilation the two differ in the stage's first block.
        self.conv1 = _conv3x3(in_channels, planes, stride, input_dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, dilation=output_dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 with a residual connection (ResNet-50), stride on the 3x3 (v1.5)."""

    expansion: ClassVar[int] = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        input_dilation: int = 1,
        output_dilation: int = 1,
    ) -> None:
        super().__init__()
        del output_dilation  # the only 3x3 conv works at the input resolution
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, input_dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# Which of layer2..layer4 trade their stride 2 for dilation, per output stride (torchvision's
# `replace_stride_with_dilation`).
_DILATED_STAGES: dict[int, tuple[bool, bool, bool]] = {
    32: (False, False, False),
    16: (False, False, True),
    8: (False, True, True),
}

_RESNET_CONFIGS: dict[
    int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]
] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(Backbone):
    """ResNet without avgpool/fc; forward returns layer4's map (B, 512|2048, H/os, W/os)."""

    supported_output_strides: ClassVar[tuple[int, ...]] = (32, 16, 8)
    ignored_checkpoint_prefixes: ClassVar[tuple[str, ...]] = ("fc.",)

    def __init__(self, depth: int, *, output_stride: int | None = None) -> None:
        super().__init__()
        if depth not in _RESNET_CONFIGS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNET_CONFIGS)}, got {depth}")
        block, blocks_per_stage = _RESNET_CONFIGS[depth]
        self.depth = depth
        self.stride = resolve_output_stride(
            f"resnet{depth}", output_stride, self.supported_output_strides
        )
        self._in_channels = 64
        self._dilation = 1

        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        dilate2, dilate3, dilate4 = _DILATED_STAGES[self.stride]
        self.layer1 = self._make_stage(block, 64, blocks_per_stage[0])
        self.layer2 = self._make_stage(block, 128, blocks_per_stage[1], stride=2, dilate=dilate2)
        self.layer3 = self._make_stage(block, 256, blocks_per_stage[2], stride=2, dilate=dilate3)
        self.layer4 = self._make_stage(block, 512, blocks_per_stage[3], stride=2, dilate=dilate4)
        self.out_channels = 512 * block.expansion
        self._init_weights()

    def _make_stage(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        num_blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        input_dilation = self._dilation
        if dilate:
            # Keep the resolution and grow the receptive field as the stride would have.
            self._dilation *= stride
            stride = 1
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_channels != out_channels:
            downsample = nn.Sequential(
                _conv1x1(self._in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
            )
        blocks = [
            block(self._in_channels, planes, stride, downsample, input_dilation, self._dilation)
        ]
        self._in_channels = out_channels
        for _ in range(1, num_blocks):
            blocks.append(
                block(
                    self._in_channels,
                    planes,
                    input_dilation=self._dilation,
                    output_dilation=self._dilation,
                )
            )
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        # Same scheme as torchvision (without zero_init_residual).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1.0)
                nn.init.constant_(module.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def resnet18(*, output_stride: int | None = None) -> ResNet:
    return ResNet(18, output_stride=output_stride)


def resnet34(*, output_stride: int | None = None) -> ResNet:
    return ResNet(34, output_stride=output_stride)


def resnet50(*, output_stride: int | None = None) -> ResNet:
    return ResNet(50, output_stride=output_stride)
