"""Cross-Task Affinity Learning block (Sinodinos & Armanfard, WACV 2025, arXiv 2401.11124).

Shapes follow DESIGN 3.1. For each task t, P_t is (B, C, H, W) and N = H * W:
1. A_t = P̂_tᵀ P̂_t: cosine similarity of every pixel pair, (B, N, N); row i reshaped to H x W is
   the affinity map of pixel i.
2. The T maps of pixel i are interleaved so that channel i*T + t holds A_t[i] -> (B, T*N, H, W).
3. A grouped conv (groups = N, kernel k x k, zero padding) fuses the T maps of each pixel i into
   G[i] (B, N, H, W); G[i, j] = output channel i at position j. Shared across tasks (released
   code, default) or one per task (the paper's figure).
4. Diffusion: V_t = Conv3x3(P_t); out_t[c, i] = sum_j V_t[c, j] G[i, j]; no softmax, no scaling.
   refined_t = gamma * out_t + (1 - gamma) * P_t with gamma a fixed constant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cta_model.errors import ConfigError


def task_affinity(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, N) cosine similarities between all pixel pairs (row-major N)."""
    flat = F.normalize(features.flatten(2), dim=1)
    return torch.bmm(flat.transpose(1, 2), flat)


def interleave_task_maps(affinities: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """T tensors (B, N, N) -> (B, T*N, H, W) with channel index i*T + t."""
    batch, n, _ = affinities[0].shape
    stacked = torch.stack(affinities, dim=2)  # (B, N, T, N): pixel i, then task t
    return stacked.reshape(batch, n * len(affinities), *grid)


class CrossTaskAffinity(nn.Module):
    """The CTAL refinement for a fixed feature grid; input and output are {task: (B, C, H, W)}."""

    def __init__(
        self,
        tasks: Sequence[str],
        channels: int,
        grid: tuple[int, int],
        gamma: float = 0.05,
        kernel_size: int = 3,
        shared_fusion: bool = True,
    ) -> None:
        super().__init__()
        if len(tasks) < 2:
            raise ConfigError(f"CTAL needs at least 2 tasks, got {list(tasks)}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"fusion kernel_size must be odd and >= 1, got {kernel_size}")
        self.tasks = tuple(tasks)
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_positions = self.grid[0] * self.grid[1]
        self.gamma = float(gamma)
        self.shared_fusion = shared_fusion
        self.value_projection = nn.ModuleDict(
            {t: nn.Conv2d(channels, channels, kernel_size=3, padding=1) for t in self.tasks}
        )
        fusion_names = ("shared",) if shared_fusion else self.tasks
        self.fusion = nn.ModuleDict({name: self._fusion_conv(kernel_size) for name in fusion_names})

    def _fusion_conv(self, kernel_size: int) -> nn.Conv2d:
        n, t = self.num_positions, len(self.tasks)
        return nn.Conv2d(t * n, n, kernel_size, padding=kernel_size // 2, groups=n, bias=True)

    def _check_grid(self, features: torch.Tensor) -> None:
        if tuple(features.shape[-2:]) != self.grid:
            raise ValueError(
                f"CTAL block was built for a {self.grid[0]}x{self.grid[1]} feature grid but got "
                f"{features.shape[-2]}x{features.shape[-1]}: run the model at its training input "
                "size (the fusion conv has one group per grid position)"
            )

    def affinities(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-task affinity matrices A_t, (B, N, N)."""
        for t in self.tasks:
            self._check_grid(features[t])
        return {t: task_affinity(features[t]) for t in self.tasks}

    def fused_affinity(self, affinities: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """G per fusion conv, (B, N, N) with G[b, i, j] = output channel i at position j."""
        interleaved = interleave_task_maps([affinities[t] for t in self.tasks], self.grid)
        batch = interleaved.shape[0]
        return {
            name: conv(interleaved).view(batch, self.num_positions, self.num_positions)
            for name, conv in self.fusion.items()
        }

    def diffuse(self, value: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
        """out[c, i] = sum_j value[c, j] * fused[i, j]; value (B, C, H, W), fused (B, N, N)."""
        batch, channels = value.shape[:2]
        out = torch.bmm(value.flatten(2), fused.transpose(1, 2))
        return out.view(batch, channels, *self.grid)

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fused = self.fused_affinity(self.affinities(features))
        refined = {}
        for t in self.tasks:
            g = fused["shared"] if self.shared_fusion else fused[t]
            diffused = self.diffuse(self.value_projection[t](features[t]), g)
            refined[t] = self.gamma * diffused + (1 - self.gamma) * features[t]
        return refined
