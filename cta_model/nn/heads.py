"""Decoders and heads shared by HPS, CTAL and STL (DESIGN 3.1, step 5, and the initial decoders)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (expansion 4) with an optional 1x1 projection shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )
            if in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def bottleneck_stack(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two bottlenecks in_channels -> out_channels, the decoder unit of the CTAL code."""
    planes = out_channels // Bottleneck.expansion
    return nn.Sequential(Bottleneck(in_channels, planes), Bottleneck(out_channels, planes))


class InitialTaskDecoders(nn.Module):
    """Per task: two bottlenecks -> `feature_channels` features (the spec's decoder_channels,
    256 in the paper), and a 1x1 conv -> initial prediction."""

    def __init__(
        self, in_channels: int, out_channels: Mapping[str, int], feature_channels: int
    ) -> None:
        super().__init__()
        self.decoders = nn.ModuleDict(
            {t: bottleneck_stack(in_channels, feature_channels) for t in out_channels}
        )
        self.predictors = nn.ModuleDict(
            {t: nn.Conv2d(feature_channels, c, 1) for t, c in out_channels.items()}
        )

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        features = {t: decoder(x) for t, decoder in self.decoders.items()}
        predictions = {t: self.predictors[t](f) for t, f in features.items()}
        return features, predictions


class Upsample2x(nn.Sequential):
    """ConvTranspose (x2) + BN + ReLU + Conv3x3: the step after the affinity block."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.ConvTranspose2d(channels, channels, 2, stride=2),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )


class TaskHead(nn.Sequential):
    """Two bottlenecks + 1x1 conv to the task's output channels (the final head)."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__(
            *bottleneck_stack(channels, channels), nn.Conv2d(channels, out_channels, 1)
        )


class LightTaskHead(nn.Sequential):
    """The lighter head of HPS-light: 1x1 conv + BN + ReLU + 1x1 conv on the backbone features
    (the HRNet segmentation head's layout)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1),
        )
