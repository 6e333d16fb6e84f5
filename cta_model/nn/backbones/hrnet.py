"""HRNet-W18-small-v2 feature extractor with the official HRNet parameter names.

Names follow HRNet/HRNet-Image-Classification (cls_hrnet.py) and HRNet-Semantic-Segmentation
(seg_hrnet.py), so the ImageNet checkpoint `hrnet_w18_small_model_v2.pth` and checkpoints of
models built on those repositories load as they are; the classification head
(incre_modules, downsamp_modules, final_layer, classifier) is dropped.

Like seg_hrnet.py, lower-resolution branches are upsampled bilinearly to the target size inside
the fuse layers (cls_hrnet.py uses nearest-neighbour with a fixed scale factor; sizing by the
target map also copes with input sizes that are not multiples of 32). forward returns the four
branch outputs upsampled to stride 4 and concatenated: (B, 18+36+72+144 = 270, H/4, W/4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cta_model.nn.backbones.base import Backbone, resolve_output_stride


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def _upsample_to(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class BasicBlock(nn.Module):
    expansion: ClassVar[int] = 1

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion: ClassVar[int] = 4

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
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


def _make_blocks(
    block: type[BasicBlock] | type[Bottleneck], in_channels: int, planes: int, num_blocks: int
) -> nn.Sequential:
    out_channels = planes * block.expansion
    downsample = None
    if in_channels != out_channels:
        downsample = nn.Sequential(
            _conv1x1(in_channels, out_channels), nn.BatchNorm2d(out_channels)
        )
    blocks = [block(in_channels, planes, 1, downsample)]
    blocks += [block(out_channels, planes) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks)


class HighResolutionModule(nn.Module):
    """Parallel branches (one per resolution) followed by an exchange unit that sums every
    branch, resampled, into every output resolution (SUM fuse)."""

    def __init__(self, branch_channels: list[int], blocks_per_branch: list[int]) -> None:
        super().__init__()
        if len(branch_channels) != len(blocks_per_branch) or len(branch_channels) < 2:
            raise ValueError(
                f"need one block count per branch and >= 2 branches, got channels "
                f"{branch_channels} and blocks {blocks_per_branch}"
            )
        self.num_branches = len(branch_channels)
        # BasicBlock keeps each branch's width, so no branch needs a downsample projection.
        self.branches = nn.ModuleList(
            _make_blocks(BasicBlock, channels, channels, num_blocks)
            for channels, num_blocks in zip(branch_channels, blocks_per_branch, strict=True)
        )
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(
                self._make_fuse_layer(branch_channels, source, target)
                for source in range(self.num_branches)
            )
            for target in range(self.num_branches)
        )
        self.relu = nn.ReLU(inplace=True)

    @staticmethod
    def _make_fuse_layer(channels: list[int], source: int, target: int) -> nn.Module | None:
        if source == target:
            return None
        if source > target:
            # Lower resolution: match channels here, upsample in forward.
            return nn.Sequential(
                _conv1x1(channels[source], channels[target]), nn.BatchNorm2d(channels[target])
            )
        # Higher resolution: one stride-2 3x3 conv per halving; only the last changes channels
        # and has no ReLU (the ReLU comes after the sum).
        steps: list[nn.Module] = []
        for step in range(target - source):
            if step == target - source - 1:
                steps.append(
                    nn.Sequential(
                        _conv3x3(channels[source], channels[target], stride=2),
                        nn.BatchNorm2d(channels[target]),
                    )
                )
            else:
                steps.append(
                    nn.Sequential(
                        _conv3x3(channels[source], channels[source], stride=2),
                        nn.BatchNorm2d(channels[source]),
                        nn.ReLU(inplace=True),
                    )
                )
        return nn.Sequential(*steps)

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        branch_outputs = [branch(x) for branch, x in zip(self.branches, inputs, strict=True)]
        fused: list[torch.Tensor] = []
        for target, fuse_row in enumerate(self.fuse_layers):
            target_size = branch_outputs[target].shape[-2:]
            total = branch_outputs[target]
            for source, fuse in enumerate(fuse_row):
                if source == target:
                    continue
                resampled = fuse(branch_outputs[source])
                if source > target:
                    resampled = _upsample_to(resampled, target_size)
                total = total + resampled
            fused.append(self.relu(total))
        return fused


class HighResolutionStage(nn.Sequential):
    """HighResolutionModules applied in sequence to a list of branch tensors."""

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:  # type: ignore[override]
        for module in self:
            inputs = module(inputs)
        return inputs


@dataclass(frozen=True)
class StageConfig:
    num_modules: int
    branch_channels: tuple[int, ...]
    blocks_per_branch: tuple[int, ...]


# HRNet-W18-small-v2 (experiments/cls_hrnet_w18_small_v2_sgd_lr5e-2_wd1e-4_bs32_x100.yaml).
_STEM_BOTTLENECKS = 2
_W18_SMALL_V2_STAGES = (
    StageConfig(1, (18, 36), (2, 2)),
    StageConfig(3, (18, 36, 72), (2, 2, 2)),
    StageConfig(2, (18, 36, 72, 144), (2, 2, 2, 2)),
)


def _make_transition(previous_channels: list[int], channels: list[int]) -> nn.ModuleList:
    """Adapts the previous stage's branches to the next stage's: a 3x3 conv where the width
    changes (None where it does not), and a new, half-resolution branch made from the lowest one.
    """
    layers: list[nn.Module | None] = []
    for branch, width in enumerate(channels):
        if branch < len(previous_channels):
            if width == previous_channels[branch]:
                layers.append(None)
            else:
                layers.append(
                    nn.Sequential(
                        _conv3x3(previous_channels[branch], width),
                        nn.BatchNorm2d(width),
                        nn.ReLU(inplace=True),
                    )
                )
        else:
            steps = []
            num_steps = branch + 1 - len(previous_channels)
            for step in range(num_steps):
                in_width = previous_channels[-1]
                out_width = width if step == num_steps - 1 else in_width
                steps.append(
                    nn.Sequential(
                        _conv3x3(in_width, out_width, stride=2),
                        nn.BatchNorm2d(out_width),
                        nn.ReLU(inplace=True),
                    )
                )
            layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


class HRNetW18SmallV2(Backbone):
    """HRNet-W18-small-v2 without the classification head; forward -> (B, 270, H/4, W/4)."""

    supported_output_strides: ClassVar[tuple[int, ...]] = (4,)
    ignored_checkpoint_prefixes: ClassVar[tuple[str, ...]] = (
        "incre_modules.",
        "downsamp_modules.",
        "final_layer.",
        "classifier.",
    )

    transition1: nn.ModuleList
    transition2: nn.ModuleList
    transition3: nn.ModuleList
    stage2: HighResolutionStage
    stage3: HighResolutionStage
    stage4: HighResolutionStage

    def __init__(self, *, output_stride: int | None = None) -> None:
        super().__init__()
        self.stride = resolve_output_stride(
            "hrnet-w18-small-v2", output_stride, self.supported_output_strides
        )
        # Stem: two stride-2 3x3 convs -> stride 4.
        self.conv1 = _conv3x3(3, 64, stride=2)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = _conv3x3(64, 64, stride=2)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _make_blocks(Bottleneck, 64, 64, _STEM_BOTTLENECKS)

        # Registered as transition1, stage2, transition2, ... like the official code, so that
        # state_dict() lists the entries in the same order as the official checkpoints.
        previous_channels = [64 * Bottleneck.expansion]
        for index, stage in enumerate(_W18_SMALL_V2_STAGES, start=1):
            channels = list(stage.branch_channels)
            transition = _make_transition(previous_channels, channels)
            modules = HighResolutionStage(
                *(
                    HighResolutionModule(channels, list(stage.blocks_per_branch))
                    for _ in range(stage.num_modules)
                )
            )
            self.add_module(f"transition{index}", transition)
            self.add_module(f"stage{index + 1}", modules)
            previous_channels = channels
        self.out_channels = sum(previous_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # As HRNet's init_weights: kaiming fan_out for convs, BN weight 1 and bias 0.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1.0)
                nn.init.constant_(module.bias, 0.0)

    @staticmethod
    def _transition(transition: nn.ModuleList, branches: list[torch.Tensor]) -> list[torch.Tensor]:
        # A new branch grows from the lowest-resolution existing one.
        outputs = []
        for branch, layer in enumerate(transition):
            source = branches[min(branch, len(branches) - 1)]
            outputs.append(source if layer is None else layer(source))
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        branches = [self.layer1(x)]
        branches = self.stage2(self._transition(self.transition1, branches))
        branches = self.stage3(self._transition(self.transition2, branches))
        branches = self.stage4(self._transition(self.transition3, branches))
        # The fused stride-4 output of HRNet-seg / CTAL: all resolutions on one map.
        high_resolution = branches[0]
        size = high_resolution.shape[-2:]
        return torch.cat(
            [high_resolution, *(_upsample_to(branch, size) for branch in branches[1:])], dim=1
        )


def hrnet_w18_small_v2(*, output_stride: int | None = None) -> HRNetW18SmallV2:
    return HRNetW18SmallV2(output_stride=output_stride)
