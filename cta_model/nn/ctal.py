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
- `dense`: every A_t and G as full N x N tensors (one block), kept for backward; O(N^2) memory
  per sample. Both exact modes run the grouped fusion conv as the equal channels-last depthwise
  conv summed over t (`_fuse`), much faster on CPU; `affinities`, `fused_affinity` and
  `diffuse` keep the paper's steps literally (the grouped conv itself) for explaining and as the
  reference the fast paths are tested against.
- `blocked`: the same numbers computed in blocks of rows i of G. Row i's fusion conv only reads
  row i's own T maps, so a block needs A_t[blk, :] = P̂_t[:, blk]ᵀ P̂_t and no halo; backward
  recomputes each block, so memory is O(block x N).
- `linear` (cta_model/nn/ctal_linear.py): the same numbers without forming A_t or G, in time
  O(T^2 k^2 C^2 N) and memory O(T C N) instead of O(T C N^2) and O(T N^2).
- `auto`: the exact mode with the least estimated time among those whose memory fits
  (`affinity_costs`, DESIGN 3.4): forward+backward FLOPs and memory traffic of each mode for
  the batch, grid, T, C, kernel and fusion count, over the device's rough FLOP rate and
  bandwidth; dense and linear must hold at most AUTO_MEMORY_FRACTION of the free memory,
  blocked (memory bounded by its block) always fits.
- `pooled`: an approximation: affinities, fusion and diffusion on the feature grid average-pooled
  by `pool_factor`, the diffused features upsampled back (fusion weights sized for that grid).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cta_model.errors import ConfigError
from cta_model.nn.ctal_linear import LinearDiffusion, linear_diffusion
from cta_model.nn.functional import unit_vectors

AFFINITY_MODES = ("auto", "dense", "blocked", "linear", "pooled")
# The block's defaults, also those of the model settings (ModelSpec): gamma is the paper's
# fixed blend (step 4 above); one k x k fusion conv shared by all tasks, as the released code.
DEFAULT_GAMMA = 0.05
DEFAULT_KERNEL_SIZE = 3
DEFAULT_SHARED_FUSION = True
DEFAULT_MODE = "auto"
DEFAULT_POOL_FACTOR = 2  # pooled mode: the feature grid is average-pooled by this factor
#: `auto` runs dense or linear only where its tensors take at most this fraction of the free memory.
AUTO_MEMORY_FRACTION = 0.25
#: Rough fp32 throughput (FLOP/s) and memory bandwidth (bytes/s) per device type for `auto`'s
#: time estimate; only their ratio matters. CPU: fitted to the 2-core development VM's dense
#: and blocked block timings (docs/performance.md); CUDA: an H100's fp32 rate and HBM.
DEVICE_RATES = {"cpu": (100e9, 10e9), "cuda": (50e12, 2.5e12)}
EXACT_MODES = ("dense", "linear", "blocked")  # `auto`'s candidates, in tie-break order
#: Default block: as many rows as keep one block's T affinity rows (B*T*rows*N floats) this big.
AUTO_BLOCK_BYTES = 8 * 2**20


def task_affinity(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, N) cosine similarities between all pixel pairs (row-major N)."""
    flat = unit_vectors(features.flatten(2), dim=1)
    return torch.bmm(flat.transpose(1, 2), flat)


def interleave_task_maps(affinities: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """T tensors (B, N, N) -> (B, T*N, H, W) with channel index i*T + t."""
    batch, n, _ = affinities[0].shape
    stacked = torch.stack(affinities, dim=2)  # (B, N, T, N): pixel i, then task t
    return stacked.reshape(batch, n * len(affinities), *grid)


@dataclass(frozen=True)
class BlockShape:
    """What the block's cost depends on: batch B, grid positions N, tasks T, channels C,
    fusion kernel k, fusion convs F (1 shared, T per task), bytes per element."""

    batch: int
    positions: int
    tasks: int
    channels: int
    kernel_size: int
    fusions: int
    itemsize: int = 4


@dataclass(frozen=True)
class ModeCost:
    flops: float  # forward + backward, a multiply-add counted as 2
    traffic_bytes: float  # forward + backward memory traffic of the large tensors
    held_bytes: float  # the large tensors forward + backward hold at once
    seconds: float  # flops / FLOP rate + traffic / bandwidth


def dense_tensor_bytes(batch: int, positions: int, tasks: int, fusions: int, itemsize: int) -> int:
    """Bytes of the N x N tensors dense forward+backward holds: A_t, their interleaved copy and
    its gradient (3T), and G with its gradient per fusion conv (2F)."""
    return batch * positions * positions * itemsize * (3 * tasks + 2 * fusions)


def affinity_costs(shape: BlockShape, device_type: str = "cpu") -> dict[str, ModeCost]:
    """Estimated forward+backward cost of each exact mode (DESIGN 3.4).

    dense: forward B N^2 (4TC + 2FTk^2) FLOPs (the T affinity products, F fusions of T maps, T
    diffusion products), backward twice that; each N x N tensor (T affinities, F fusions) is
    written and read once forward and twice as much backward. blocked: dense plus a recompute
    of the affinities and fusions; holds one block. linear: two stages of k^2 products of
    (TC x N) by (N x TC) or (TC x TC) by (TC x N), 4 B k^2 T^2 C^2 N forward, backward twice
    that; traffic about (5 + 2F) B k^2 T C N elements forward, held about (2k + 2F + 3) TCN
    per sample.
    """
    b, n, t, c, k, f = (
        shape.batch,
        shape.positions,
        shape.tasks,
        shape.channels,
        shape.kernel_size,
        shape.fusions,
    )
    size = shape.itemsize
    flop_rate, bandwidth = DEVICE_RATES.get(device_type, DEVICE_RATES["cuda"])
    squares = b * n * n
    dense_forward = squares * (4 * t * c + 2 * f * t * k * k)
    recompute = squares * (2 * t * c + 2 * f * t * k * k)
    linear_forward = 4 * b * k * k * (t * c) ** 2 * n
    block_rows = auto_block_rows(b, n, t, size)
    raw = {
        "dense": (3 * dense_forward, 6 * squares * (t + f) * size, None),
        "blocked": (
            3 * dense_forward + recompute,
            8 * squares * (t + f) * size,
            b * block_rows * n * size * (3 * t + 2 * f),
        ),
        "linear": (
            3 * linear_forward,
            3 * (5 + 2 * f) * b * k * k * t * c * n * size,
            b * size * ((2 * k + 2 * f + 3) * t * c * n + 2 * k * k * (t * c) ** 2),
        ),
    }
    held_dense = dense_tensor_bytes(b, n, t, f, size)
    return {
        mode: ModeCost(
            flops=float(flops),
            traffic_bytes=float(traffic),
            held_bytes=float(held_dense if held is None else held),
            seconds=flops / flop_rate + traffic / bandwidth,
        )
        for mode, (flops, traffic, held) in raw.items()
    }


def cheapest_mode(costs: Mapping[str, ModeCost], free_bytes: int | None) -> str:
    """The exact mode with the least estimated time whose held tensors fit in
    AUTO_MEMORY_FRACTION of `free_bytes` (unknown: all fit); blocked always fits."""
    fitting = [
        mode
        for mode in EXACT_MODES
        if mode == "blocked"
        or free_bytes is None
        or costs[mode].held_bytes <= AUTO_MEMORY_FRACTION * free_bytes
    ]
    return min(fitting, key=lambda mode: costs[mode].seconds)


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


def _affinity_columns(unit: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """X[b, j, t, r] = A_t[j, start + r], (B, N, T, rows); unit (B, T, C, N) L2-normalised.

    A_t is symmetric, so these columns are the rows start:stop of DESIGN 3.1 with the source
    position j outermost: the layout in which the fusion conv runs channels-last (`_fuse`).
    Each (sample, task) product is written straight into its strided slice (a BLAS leading
    dimension), which saves a transposing copy of the whole tensor.
    """
    if torch.compiler.is_compiling():  # export: a loop over the batch would fix its size
        return torch.matmul(unit.transpose(-1, -2), unit[..., start:stop]).transpose(1, 2)
    batch, tasks, _, n = unit.shape
    columns = unit.new_empty(batch, n, tasks, stop - start)
    for b in range(batch):
        for t in range(tasks):
            torch.mm(unit[b, t].t(), unit[b, t, :, start:stop], out=columns[b, :, t])
    return columns


def _conv_view(columns: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, T, rows) -> (B, T*rows, H, W) channels-last, channel t*rows + r (a view when
    `columns` is contiguous)."""
    batch, _, tasks, rows = columns.shape
    return columns.reshape(batch, *grid, tasks * rows).permute(0, 3, 1, 2)


def _depthwise_weight(weight: torch.Tensor) -> torch.Tensor:
    """(rows, T, k, k) -> (T*rows, 1, k, k), channel t*rows + r, matching `_conv_view`."""
    rows, tasks, k, _ = weight.shape
    return weight.transpose(0, 1).reshape(tasks * rows, 1, k, k)


def _fuse(
    columns: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """Gᵀ for the block's rows, (B, N, rows): each row's own k x k fusion of its T maps.

    The grouped conv of DESIGN 3.1 step 3 (groups = rows, T inputs each) equals a depthwise
    conv over the T*rows maps summed over t. Run channels-last (rows innermost) it is several
    times faster on CPU than either the grouped conv or the depthwise conv in NCHW.
    columns (B, N, T, rows) from `_affinity_columns`; weight (rows, T, k, k); bias (rows,).
    """
    batch, n, tasks, rows = columns.shape
    per_task = F.conv2d(
        _conv_view(columns, grid),
        _depthwise_weight(weight),
        padding=weight.shape[-1] // 2,
        groups=tasks * rows,
    )
    per_task = per_task.permute(0, 2, 3, 1).reshape(batch, n, tasks, rows)
    return per_task.sum(2) + bias


def _fuse_backward(
    columns: torch.Tensor, weight: torch.Tensor, d_fused: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `_fuse` given d_fused (B, N, rows): (d_columns, d_weight, d_bias)."""
    batch, n, tasks, rows = columns.shape
    k = weight.shape[-1]
    padding = k // 2
    d_per_task = d_fused.unsqueeze(2).expand(batch, n, tasks, rows).contiguous()
    d_maps, d_depthwise, _ = torch.ops.aten.convolution_backward(
        _conv_view(d_per_task, grid),
        _conv_view(columns, grid),
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
    d_columns = d_maps.permute(0, 2, 3, 1).reshape(batch, n, tasks, rows)
    d_weight = d_depthwise.view(tasks, rows, k, k).transpose(0, 1)
    return d_columns, d_weight, d_fused.sum(dim=(0, 1))


def _diffuse(value: torch.Tensor, fused_t: torch.Tensor) -> torch.Tensor:
    """out[:, t, :, r] = sum_j value[:, t, :, j] G_t[r, j] for the block's rows r.

    value (B, T, C, N); fused_t (B, F, N, rows) = Gᵀ with F = 1 (shared: one product with T*C
    rows) or F = T (one G per task); returns (B, T, C, rows).
    """
    batch, tasks, channels, _ = value.shape
    if fused_t.shape[1] == 1:
        out = torch.matmul(value.flatten(1, 2), fused_t[:, 0])
        return out.view(batch, tasks, channels, -1)
    return torch.matmul(value, fused_t)


def _forward_block(
    unit: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    grid: tuple[int, int],
    start: int,
    stop: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(affinity columns (B, N, T, rows), Gᵀ of every fusion (B, F, N, rows)) for rows
    start:stop."""
    columns = _affinity_columns(unit, start, stop)
    fused_t = [
        _fuse(columns, w[start:stop], b[start:stop], grid)
        for w, b in zip(weight, bias, strict=True)
    ]
    return columns, fused_t[0].unsqueeze(1) if len(fused_t) == 1 else torch.stack(fused_t, 1)


def blocked_diffusion(
    unit: torch.Tensor,
    value: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    grid: tuple[int, int],
    block_rows: int,
) -> torch.Tensor:
    """out[:, t, :, i] = sum_j value[:, t, :, j] G_t[i, j], G built block by block.

    unit, value: (B, T, C, N); weight (F, N, T, k, k); bias (F, N) with F = 1 (shared fusion)
    or F = T (per task); returns (B, T, C, N). Plain tensor ops (traceable for export); with
    block_rows = N it is the dense computation.
    """
    n = value.shape[-1]
    if block_rows >= n:
        return _diffuse(value, _forward_block(unit, weight, bias, grid, 0, n)[1])
    out = torch.empty_like(value)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        out[..., start:stop] = _diffuse(
            value, _forward_block(unit, weight, bias, grid, start, stop)[1]
        )
    return out


def _backward_block(
    unit: torch.Tensor,
    value: torch.Tensor,
    weight: torch.Tensor,
    grid: tuple[int, int],
    start: int,
    stop: int,
    columns: torch.Tensor,
    fused_t: torch.Tensor,
    grad_rows: torch.Tensor,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Adds one block's share of (d_unit, d_value, d_weight, d_bias) into `grads`."""
    d_unit, d_value, d_weight, d_bias = grads
    if fused_t.shape[1] == 1:  # shared: one product over all T*C value rows, as in `_diffuse`
        flat_grad = grad_rows.flatten(1, 2)  # (B, T*C, rows)
        d_value += torch.matmul(flat_grad, fused_t[:, 0].transpose(-1, -2)).view_as(value)
        d_fused_t = torch.matmul(value.flatten(1, 2).transpose(-1, -2), flat_grad).unsqueeze(1)
    else:
        d_value += torch.matmul(grad_rows, fused_t.transpose(-1, -2))
        d_fused_t = torch.matmul(value.transpose(-1, -2), grad_rows)
    d_columns = None
    for f in range(weight.shape[0]):
        d_c, d_weight[f, start:stop], d_bias[f, start:stop] = _fuse_backward(
            columns, weight[f, start:stop], d_fused_t[:, f], grid
        )
        d_columns = d_c if d_columns is None else d_columns + d_c
    # A_t[j, blk] = U_tᵀ U_t[:, blk]: U enters as every source j and as the block's columns.
    for b in range(unit.shape[0]):
        for t in range(unit.shape[1]):
            d_a = d_columns[b, :, t]  # (N, rows), a strided BLAS operand
            d_unit[b, t].addmm_(unit[b, t, :, start:stop], d_a.t())
            d_unit[b, t, :, start:stop].addmm_(unit[b, t], d_a)


class _Diffusion(torch.autograd.Function):
    """`blocked_diffusion` with a hand-written backward. Dense (block_rows >= N) keeps the one
    block's affinity columns and G for backward; blocked recomputes each block, so its memory
    is O(block x N)."""

    @staticmethod
    def forward(ctx, unit, value, weight, bias, grid, block_rows):
        n = value.shape[-1]
        ctx.grid, ctx.block_rows = grid, block_rows
        if block_rows >= n:
            columns, fused_t = _forward_block(unit, weight, bias, grid, 0, n)
            ctx.save_for_backward(unit, value, weight, columns, fused_t)
            return _diffuse(value, fused_t)
        ctx.save_for_backward(unit, value, weight, bias)
        return blocked_diffusion(unit, value, weight, bias, grid, block_rows)

    @staticmethod
    def backward(ctx, grad_out):
        grid, block_rows = ctx.grid, ctx.block_rows
        grad_out = grad_out.contiguous()
        unit, value, weight = ctx.saved_tensors[:3]
        n = value.shape[-1]
        grads = (
            torch.zeros_like(unit),
            torch.zeros_like(value),
            torch.zeros_like(weight),
            weight.new_zeros(weight.shape[:2]),
        )
        if block_rows >= n:
            columns, fused_t = ctx.saved_tensors[3:]
            _backward_block(unit, value, weight, grid, 0, n, columns, fused_t, grad_out, grads)
        else:
            bias = ctx.saved_tensors[3]
            for start in range(0, n, block_rows):
                stop = min(start + block_rows, n)
                columns, fused_t = _forward_block(unit, weight, bias, grid, start, stop)
                grad_rows = grad_out[..., start:stop]
                _backward_block(
                    unit, value, weight, grid, start, stop, columns, fused_t, grad_rows, grads
                )
        return *grads, None, None


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
        gamma: float = DEFAULT_GAMMA,
        kernel_size: int = DEFAULT_KERNEL_SIZE,
        shared_fusion: bool = DEFAULT_SHARED_FUSION,
        mode: str = DEFAULT_MODE,
        block_size: int | None = None,
        pool_factor: int = DEFAULT_POOL_FACTOR,
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

    def _stacked_fusion(self) -> tuple[torch.Tensor, torch.Tensor]:
        convs = list(self.fusion.values())
        return torch.stack([c.weight for c in convs]), torch.stack([c.bias for c in convs])

    def block_shape(self, batch: int, dtype: torch.dtype = torch.float32) -> BlockShape:
        return BlockShape(
            batch=batch,
            positions=self.num_positions,
            tasks=len(self.tasks),
            channels=self.channels,
            kernel_size=self.kernel_size,
            fusions=len(self.fusion),
            itemsize=torch.empty((), dtype=dtype).element_size(),
        )

    def resolve_mode(self, batch: int, dtype: torch.dtype, device: torch.device) -> str:
        """The computation `forward` uses: dense, blocked, linear or pooled (see the module
        docstring); `auto` asks the cost model."""
        if self.mode != "auto":
            return self.mode
        costs = affinity_costs(self.block_shape(batch, dtype), device.type)
        return cheapest_mode(costs, free_memory_bytes(device))

    def block_rows(self, batch: int) -> int:
        if self.block_size is not None:
            return min(self.block_size, self.num_positions)
        return auto_block_rows(batch, self.num_positions, len(self.tasks))

    def affinities(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-task affinity matrices A_t on the fusion grid, (B, N, N) (reference step 1)."""
        for t in self.tasks:
            self._check_grid(features[t])
        return {t: task_affinity(self._to_fusion_grid(features[t])) for t in self.tasks}

    def fused_affinity(self, affinities: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """G per fusion conv, (B, N, N) with G[b, i, j] = output channel i at position j: the
        paper's interleave and grouped conv, literally (reference steps 2-3)."""
        interleaved = interleave_task_maps([affinities[t] for t in self.tasks], self.fusion_grid)
        batch = interleaved.shape[0]
        return {
            name: conv(interleaved).view(batch, self.num_positions, self.num_positions)
            for name, conv in self.fusion.items()
        }

    def diffuse(self, value: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
        """out[c, i] = sum_j value[c, j] * fused[i, j]; value (B, C, h, w), fused (B, N, N)
        (reference step 4)."""
        batch, channels = value.shape[:2]
        out = torch.bmm(value.flatten(2), fused.transpose(1, 2))
        return out.view(batch, channels, *self.fusion_grid)

    def _diffused(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """out_t of every task on the fusion grid, (B, C, h, w)."""
        for t in self.tasks:
            self._check_grid(features[t])
        on_grid = [self._to_fusion_grid(features[t]) for t in self.tasks]
        values = [self._to_fusion_grid(self.value_projection[t](features[t])) for t in self.tasks]
        unit = torch.stack([unit_vectors(x.flatten(2), dim=1) for x in on_grid], 1)
        value = torch.stack([v.flatten(2) for v in values], 1)  # (B, T, C, N)
        weight, bias = self._stacked_fusion()
        batch = value.shape[0]
        mode = self.resolve_mode(batch, value.dtype, value.device)
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (unit, value, weight, bias))
        if mode == "linear":
            args = (unit, value, weight, bias, self.fusion_grid)
            out = LinearDiffusion.apply(*args) if grad else linear_diffusion(*args)
        else:
            rows = self.num_positions if mode in ("dense", "pooled") else self.block_rows(batch)
            args = (unit, value, weight, bias, self.fusion_grid, rows)
            out = _Diffusion.apply(*args) if grad else blocked_diffusion(*args)
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
            [unit_vectors(self._to_fusion_grid(features[t]).flatten(2), dim=1) for t in self.tasks],
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
