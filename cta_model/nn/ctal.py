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

Modes (DESIGN 3.2, docs/model.md "Affinity modes"):
- `dense`: the paper's computation, O(N^2) memory per sample.
- `blocked`: the same numbers computed in blocks of rows i of G. Row i's fusion conv only reads
  row i's own T maps, so a block needs A_t[blk, :] = P̂_t[:, blk]ᵀ P̂_t and no halo; backward
  recomputes each block, so memory is O(block x N).
- `auto`: blocked when N > AUTO_BLOCKED_MIN_POSITIONS or the dense tensors would need more than
  AUTO_DENSE_MEMORY_FRACTION of the free memory, else dense.
- `pooled`: an approximation: affinities, fusion and diffusion on the feature grid average-pooled
  by `pool_factor`, the diffused features upsampled back (fusion weights sized for that grid).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cta_model.errors import ConfigError

AFFINITY_MODES = ("auto", "dense", "blocked", "pooled")
#: `auto` picks blocked above this many grid positions (a 64x64 grid); below it dense is faster.
AUTO_BLOCKED_MIN_POSITIONS = 4096
#: ... or when the dense N x N tensors would take more than this fraction of the free memory.
AUTO_DENSE_MEMORY_FRACTION = 0.25
#: Default block: as many rows as keep one block's T affinity rows (B*T*rows*N floats) this big.
AUTO_BLOCK_BYTES = 8 * 2**20


def task_affinity(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, N) cosine similarities between all pixel pairs (row-major N)."""
    flat = F.normalize(features.flatten(2), dim=1)
    return torch.bmm(flat.transpose(1, 2), flat)


def interleave_task_maps(affinities: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """T tensors (B, N, N) -> (B, T*N, H, W) with channel index i*T + t."""
    batch, n, _ = affinities[0].shape
    stacked = torch.stack(affinities, dim=2)  # (B, N, T, N): pixel i, then task t
    return stacked.reshape(batch, n * len(affinities), *grid)


def dense_tensor_bytes(batch: int, positions: int, tasks: int, fusions: int, itemsize: int) -> int:
    """Bytes of the N x N tensors dense forward+backward holds: A_t, their interleaved copy and
    its gradient (3T), and G with its gradient per fusion conv (2F)."""
    return batch * positions * positions * itemsize * (3 * tasks + 2 * fusions)


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of the device (CUDA) or MemAvailable (Linux CPU); None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def auto_block_rows(batch: int, positions: int, tasks: int, itemsize: int = 4) -> int:
    return max(1, min(positions, AUTO_BLOCK_BYTES // max(1, batch * tasks * positions * itemsize)))


def _affinity_rows(unit: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """A_t[start:stop, :] of every task, (B, T, rows, N); unit (B, T, C, N) L2-normalised."""
    return torch.matmul(unit[..., start:stop].transpose(-1, -2), unit)


def _depthwise_weight(weight: torch.Tensor) -> torch.Tensor:
    """(rows, T, k, k) -> (T*rows, 1, k, k), channel t*rows + i, matching `_affinity_rows`."""
    rows, tasks, k, _ = weight.shape
    return weight.transpose(0, 1).reshape(tasks * rows, 1, k, k)


def _fuse_rows(
    affinity: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """Each row's own k x k fusion of its T maps, (B, rows, N).

    The grouped conv of DESIGN 3.1 step 3 (groups = rows, T inputs each) equals a depthwise
    conv over the T*rows maps summed over t; the depthwise form has fast CPU kernels for
    forward and backward, while the CPU grouped conv unfolds its input (k*k*T x rows x N).
    affinity (B, T, rows, N); weight (rows, T, k, k); bias (rows,).
    """
    batch, tasks, rows, n = affinity.shape
    maps = affinity.reshape(batch, tasks * rows, *grid)
    per_task = F.conv2d(
        maps, _depthwise_weight(weight), padding=weight.shape[-1] // 2, groups=tasks * rows
    )
    return per_task.view(batch, tasks, rows, n).sum(1) + bias.view(1, rows, 1)


def _fuse_rows_backward(
    affinity: torch.Tensor, weight: torch.Tensor, d_fused: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `_fuse_rows` given d_fused (B, rows, N): (d_affinity, d_weight, d_bias)."""
    batch, tasks, rows, n = affinity.shape
    k = weight.shape[-1]
    padding = k // 2
    d_per_task = (
        d_fused.unsqueeze(1).expand(batch, tasks, rows, n).reshape(batch, tasks * rows, *grid)
    )
    d_maps, d_depthwise, _ = torch.ops.aten.convolution_backward(
        d_per_task,
        affinity.reshape(batch, tasks * rows, *grid),
        _depthwise_weight(weight),
        None,
        [1, 1],
        [padding, padding],
        [1, 1],
        False,
        [0, 0],
        tasks * rows,
        [True, True, False],
    )
    d_weight = d_depthwise.view(tasks, rows, k, k).transpose(0, 1)
    return d_maps.view(batch, tasks, rows, n), d_weight, d_fused.sum(dim=(0, 2))


def blocked_diffusion(
    unit: torch.Tensor,
    value: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    grid: tuple[int, int],
    block_rows: int,
    fusion_of_task: tuple[int, ...],
) -> torch.Tensor:
    """out[:, t, :, i] = sum_j value[:, t, :, j] G_f(t)[i, j], G built block by block.

    unit, value: (B, T, C, N); weight (F, N, T, k, k); bias (F, N); returns (B, T, C, N).
    Plain tensor ops (traceable for export).
    """
    batch, tasks, channels, n = value.shape
    out = value.new_empty(batch, tasks, channels, n)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        affinity = _affinity_rows(unit, start, stop)
        fused = [
            _fuse_rows(affinity, w[start:stop], b[start:stop], grid)
            for w, b in zip(weight, bias, strict=True)
        ]
        for t in range(tasks):
            g = fused[fusion_of_task[t]]
            out[:, t, :, start:stop] = torch.bmm(value[:, t], g.transpose(1, 2))
    return out


class _BlockedDiffusion(torch.autograd.Function):
    """`blocked_diffusion` with a backward that recomputes each block (O(block x N) memory)."""

    @staticmethod
    def forward(ctx, unit, value, weight, bias, grid, block_rows, fusion_of_task):
        ctx.save_for_backward(unit, value, weight, bias)
        ctx.grid, ctx.block_rows, ctx.fusion_of_task = grid, block_rows, fusion_of_task
        return blocked_diffusion(unit, value, weight, bias, grid, block_rows, fusion_of_task)

    @staticmethod
    def backward(ctx, grad_out):
        unit, value, weight, bias = ctx.saved_tensors
        grid, block_rows, fusion_of_task = ctx.grid, ctx.block_rows, ctx.fusion_of_task
        batch, tasks, _, n = value.shape
        grad_out = grad_out.contiguous()
        d_unit = torch.zeros_like(unit)
        d_value = torch.zeros_like(value)
        d_weight = torch.zeros_like(weight)
        d_bias = torch.zeros_like(bias)
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            affinity = _affinity_rows(unit, start, stop)
            fused = [
                _fuse_rows(affinity, w[start:stop], b[start:stop], grid)
                for w, b in zip(weight, bias, strict=True)
            ]
            d_fused = [torch.zeros_like(g) for g in fused]
            for t in range(tasks):
                f = fusion_of_task[t]
                grad_rows = grad_out[:, t, :, start:stop]  # (B, C, rows)
                d_value[:, t] += torch.bmm(grad_rows, fused[f])
                d_fused[f].baddbmm_(grad_rows.transpose(1, 2), value[:, t])
            del fused
            d_affinity = None
            for f, d_g in enumerate(d_fused):
                d_a, d_weight[f, start:stop], d_bias[f, start:stop] = _fuse_rows_backward(
                    affinity, weight[f, start:stop], d_g, grid
                )
                d_affinity = d_a if d_affinity is None else d_affinity + d_a
            del affinity, d_fused
            # A[blk] = U[:, blk]ᵀ U: U enters as the block's rows and as every column.
            d_unit[..., start:stop] += torch.matmul(unit, d_affinity.transpose(-1, -2))
            d_unit += torch.matmul(unit[..., start:stop], d_affinity)
        return d_unit, d_value, d_weight, d_bias, None, None, None


def resample_position_maps(
    maps: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], mode: str
) -> torch.Tensor:
    """(N_old, ...) per-position parameters -> (N_new, ...), resampled over the grid."""
    trailing = maps.shape[1:]
    planes = maps.reshape(*old_grid, -1).permute(2, 0, 1).unsqueeze(0)  # (1, K, H, W)
    align = False if mode in ("bilinear", "bicubic") else None
    resized = F.interpolate(planes, size=new_grid, mode=mode, align_corners=align)
    return resized[0].permute(1, 2, 0).reshape(new_grid[0] * new_grid[1], *trailing)


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
        mode: str = "auto",
        block_size: int | None = None,
        pool_factor: int = 2,
    ) -> None:
        super().__init__()
        if len(tasks) < 2:
            raise ConfigError(f"CTAL needs at least 2 tasks, got {list(tasks)}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"fusion kernel_size must be odd and >= 1, got {kernel_size}")
        if mode not in AFFINITY_MODES:
            raise ConfigError(f"affinity_mode must be one of {list(AFFINITY_MODES)}, got {mode!r}")
        if block_size is not None and block_size < 1:
            raise ConfigError(f"affinity_block_size must be >= 1 or null, got {block_size}")
        if pool_factor < 1:
            raise ConfigError(f"affinity_pool_factor must be >= 1, got {pool_factor}")
        self.tasks = tuple(tasks)
        self.channels = channels
        self.grid = (int(grid[0]), int(grid[1]))
        self.gamma = float(gamma)
        self.kernel_size = kernel_size
        self.shared_fusion = shared_fusion
        self.mode = mode
        self.block_size = block_size
        self.pool_factor = pool_factor
        # Pooled mode builds the per-pixel fusion for the pooled grid; other modes for the grid.
        factor = pool_factor if mode == "pooled" else 1
        self.fusion_grid = (math.ceil(self.grid[0] / factor), math.ceil(self.grid[1] / factor))
        self.num_positions = self.fusion_grid[0] * self.fusion_grid[1]
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
                "size or resize it first (cta_model.nn.models.resize_model)"
            )

    def _to_fusion_grid(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.fusion_grid == self.grid else F.adaptive_avg_pool2d(x, self.fusion_grid)

    @property
    def _fusion_of_task(self) -> tuple[int, ...]:
        return tuple(0 if self.shared_fusion else i for i in range(len(self.tasks)))

    def _stacked_fusion(self) -> tuple[torch.Tensor, torch.Tensor]:
        convs = list(self.fusion.values())
        return torch.stack([c.weight for c in convs]), torch.stack([c.bias for c in convs])

    def resolve_mode(self, batch: int, dtype: torch.dtype, device: torch.device) -> str:
        """The computation `forward` uses: dense, blocked or pooled (see the module docstring)."""
        if self.mode != "auto":
            return self.mode
        n = self.num_positions
        if n > AUTO_BLOCKED_MIN_POSITIONS:
            return "blocked"
        itemsize = torch.empty((), dtype=dtype).element_size()
        needed = dense_tensor_bytes(batch, n, len(self.tasks), len(self.fusion), itemsize)
        free = free_memory_bytes(device)
        if free is not None and needed > AUTO_DENSE_MEMORY_FRACTION * free:
            return "blocked"
        return "dense"

    def block_rows(self, batch: int) -> int:
        if self.block_size is not None:
            return min(self.block_size, self.num_positions)
        return auto_block_rows(batch, self.num_positions, len(self.tasks))

    def affinities(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-task affinity matrices A_t on the fusion grid, (B, N, N)."""
        for t in self.tasks:
            self._check_grid(features[t])
        return {t: task_affinity(self._to_fusion_grid(features[t])) for t in self.tasks}

    def fused_affinity(self, affinities: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """G per fusion conv, (B, N, N) with G[b, i, j] = output channel i at position j."""
        interleaved = interleave_task_maps([affinities[t] for t in self.tasks], self.fusion_grid)
        batch = interleaved.shape[0]
        return {
            name: conv(interleaved).view(batch, self.num_positions, self.num_positions)
            for name, conv in self.fusion.items()
        }

    def diffuse(self, value: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
        """out[c, i] = sum_j value[c, j] * fused[i, j]; value (B, C, h, w), fused (B, N, N)."""
        batch, channels = value.shape[:2]
        out = torch.bmm(value.flatten(2), fused.transpose(1, 2))
        return out.view(batch, channels, *self.fusion_grid)

    def _diffused(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """out_t of every task on the fusion grid, (B, C, h, w)."""
        values = {
            t: self._to_fusion_grid(self.value_projection[t](features[t])) for t in self.tasks
        }
        batch = values[self.tasks[0]].shape[0]
        mode = self.resolve_mode(batch, values[self.tasks[0]].dtype, values[self.tasks[0]].device)
        if mode in ("dense", "pooled"):
            fused = self.fused_affinity(self.affinities(features))
            return {
                t: self.diffuse(values[t], fused["shared"] if self.shared_fusion else fused[t])
                for t in self.tasks
            }
        for t in self.tasks:
            self._check_grid(features[t])
        unit = torch.stack([F.normalize(features[t].flatten(2), dim=1) for t in self.tasks], 1)
        value = torch.stack([values[t].flatten(2) for t in self.tasks], 1)
        weight, bias = self._stacked_fusion()
        args = (unit, value, weight, bias, self.fusion_grid, self.block_rows(batch))
        if torch.is_grad_enabled() and any(x.requires_grad for x in (unit, value, weight, bias)):
            out = _BlockedDiffusion.apply(*args, self._fusion_of_task)
        else:
            out = blocked_diffusion(*args, self._fusion_of_task)
        return {
            t: out[:, i].reshape(batch, -1, *self.fusion_grid) for i, t in enumerate(self.tasks)
        }

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device_type = features[self.tasks[0]].device.type
        if torch.is_autocast_enabled(device_type):
            # Cosine affinities summed over N sources lose too much in bf16: run in fp32.
            with torch.autocast(device_type, enabled=False):
                return self.forward({t: features[t].float() for t in self.tasks})
        diffused = self._diffused(features)
        refined = {}
        for t in self.tasks:
            out = diffused[t]
            if self.fusion_grid != self.grid:
                # Each pooled source stands for a cell of grid pixels: scale the sum to match.
                cell = (self.grid[0] * self.grid[1]) / self.num_positions
                out = F.interpolate(
                    out * cell, size=self.grid, mode="bilinear", align_corners=False
                )
            refined[t] = self.gamma * out + (1 - self.gamma) * features[t]
        return refined

    def affinity_maps(
        self, features: Mapping[str, torch.Tensor], pixels: Sequence[tuple[int, int]]
    ) -> dict[str, torch.Tensor]:
        """Affinity maps of chosen target pixels, computing only their rows (O(P x N)).

        `pixels` are (y, x) positions on the feature grid. Returns {task: A_t rows, "fused": G
        rows}, each (B, P, H, W) on the feature grid (pooled mode: the pixel's cell, maps
        upsampled). With per-task fusion, "fused.<task>" holds each task's G and "fused" their
        mean.
        """
        for t in self.tasks:
            self._check_grid(features[t])
        for y, x in pixels:
            if not (0 <= y < self.grid[0] and 0 <= x < self.grid[1]):
                raise ValueError(f"pixel (y={y}, x={x}) is outside the {self.grid} feature grid")
        scale_y = self.fusion_grid[0] / self.grid[0]
        scale_x = self.fusion_grid[1] / self.grid[1]
        rows = torch.tensor(
            [int(y * scale_y) * self.fusion_grid[1] + int(x * scale_x) for y, x in pixels],
            dtype=torch.long,
            device=features[self.tasks[0]].device,
        )
        unit = torch.stack(
            [F.normalize(self._to_fusion_grid(features[t]).flatten(2), dim=1) for t in self.tasks],
            1,
        )  # (B, T, C, N)
        batch, tasks, _, n = unit.shape
        affinity = torch.matmul(unit[..., rows].transpose(-1, -2), unit)  # (B, T, P, N)
        interleaved = affinity.transpose(1, 2).reshape(batch, len(rows) * tasks, *self.fusion_grid)
        maps: dict[str, torch.Tensor] = {t: affinity[:, i] for i, t in enumerate(self.tasks)}
        fused = {
            name: F.conv2d(
                interleaved,
                conv.weight[rows],
                conv.bias[rows],
                padding=self.kernel_size // 2,
                groups=len(rows),
            ).view(batch, len(rows), n)
            for name, conv in self.fusion.items()
        }
        if self.shared_fusion:
            maps["fused"] = fused["shared"]
        else:
            maps.update({f"fused.{t}": g for t, g in fused.items()})
            maps["fused"] = torch.stack(list(fused.values())).mean(0)
        out = {}
        for key, value in maps.items():
            planes = value.reshape(batch, len(rows), *self.fusion_grid)
            if self.fusion_grid != self.grid:
                planes = F.interpolate(planes, size=self.grid, mode="bilinear", align_corners=False)
            out[key] = planes
        return out

    def at_grid(
        self, new_grid: tuple[int, int], interpolation: str = "bilinear"
    ) -> CrossTaskAffinity:
        """A copy of this block for another feature grid (any-resolution inference).

        The per-position fusion kernels and biases, viewed as (h, w, T*k*k + 1) planes, are
        resampled to the new fusion grid (`bilinear` or `nearest`), then scaled by N_old / N_new:
        out_t sums over all source positions, so a finer grid would otherwise add up more terms
        for the same image area. The value projections are copied unchanged.
        """
        new_grid = (int(new_grid[0]), int(new_grid[1]))
        if new_grid == self.grid:
            return copy.deepcopy(self)
        block = CrossTaskAffinity(
            self.tasks,
            self.channels,
            new_grid,
            gamma=self.gamma,
            kernel_size=self.kernel_size,
            shared_fusion=self.shared_fusion,
            mode=self.mode,
            block_size=self.block_size,
            pool_factor=self.pool_factor,
        )
        reference = next(self.parameters())
        block.to(device=reference.device, dtype=reference.dtype)
        block.value_projection.load_state_dict(self.value_projection.state_dict())
        scale = self.num_positions / block.num_positions
        with torch.no_grad():
            for name, conv in self.fusion.items():
                target = block.fusion[name]
                params = torch.cat([conv.weight.flatten(1), conv.bias[:, None]], dim=1)
                resized = resample_position_maps(
                    params, self.fusion_grid, block.fusion_grid, interpolation
                )
                target.weight.copy_(resized[:, :-1].view_as(target.weight) * scale)
                target.bias.copy_(resized[:, -1] * scale)
        return block
