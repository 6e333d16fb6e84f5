"""Exact CTAL in time and memory linear in the grid positions N (`affinity_mode: linear`).

The block has no softmax, so the N x N matrices never need to exist. With unit features
u_{s,j} (C-vectors, j a grid position), values V_t, and the fusion conv's weight w[i, s, d]
(target i, task s, kernel offset d) and bias b_i (DESIGN 3.1, cta_model/nn/ctal.py):

    G[i, j]     = b_i + sum_s sum_d w[i, s, d] (u_{s,i} . u_{s,j+d})       (zero off the grid)
    out_t[:, i] = sum_j V_t[:, j] G[i, j]
                = b_i sum_j V_t[:, j] + sum_d (M_d Z_d)[t, :, i]
    M_d         = sum_{j : j and j+d on the grid} V[:, j] u_{j+d}ᵀ       (T*C x T*C, all t and s)
    Z_d[s, :, i] = w[i, s, d] u_{s,i}                                   (T*C x N)

Flattened row-major, the offset d = (dy, dx) is a shift by dy*W + dx; a source whose column
would leave the grid (dx wraps into the next row) is masked on the value side, and the shift
range keeps rows inside. So M_d is one matrix product of a masked slice of V with a slice of
U (strided views, no shifted copies), and each of the two stages is k^2 products of
(T*C x N) by (N x T*C) or (T*C x T*C) by (T*C x N): O(T^2 k^2 C^2 N) time against the dense
O(T C N^2), O(T C N) memory against O(T N^2) (one masked copy of the values per column
shift at a time). Per-task fusion (F = T convs) uses w_t in
Z_d and the rows of M_d for task t. The two forms cost the same near N = T k^2 C positions
(the cost model in ctal.py decides).

`LinearDiffusion` keeps only the small M_d (k^2 (T*C)^2 per sample) for backward and
recomputes the masked values and Z_d into reused buffers, accumulating the gradients in place;
without grad (inference, torch.export, ONNX)
`linear_diffusion` runs the same plain ops.
"""

from __future__ import annotations

import torch


def _offsets(kernel_size: int) -> list[tuple[int, int]]:
    """(dy, dx) of every tap in the order of the fusion weight's flattened (k, k)."""
    pad = kernel_size // 2
    return [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)]


def _span(positions: int, shift: int) -> tuple[int, int]:
    """Sources j with j and j + shift both in [0, N)."""
    return max(0, -shift), min(positions, positions - shift)


def _column_masks(grid: tuple[int, int], kernel_size: int, like: torch.Tensor) -> torch.Tensor:
    """(k, N): mask[dx + p, j] = 1 where column(j) + dx stays on the grid."""
    pad = kernel_size // 2
    columns = torch.arange(grid[1], device=like.device).repeat(grid[0])
    shifted = columns[None, :] + torch.arange(-pad, pad + 1, device=like.device)[:, None]
    return ((shifted >= 0) & (shifted < grid[1])).to(like.dtype)


def _by_column_shift(kernel_size: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """Taps grouped by their column shift dx: [(dx, [(d, dy), ...]), ...], d the tap's index in
    `_offsets` order, so one masked copy of the values serves all k taps of a dx."""
    pad = kernel_size // 2
    return [
        (dx, [((dy + pad) * kernel_size + dx + pad, dy) for dy in range(-pad, pad + 1)])
        for dx in range(-pad, pad + 1)
    ]


def _masked(flat_value: torch.Tensor, masks: torch.Tensor, dx: int) -> torch.Tensor:
    """(B, T*C, N) with the sources whose column + dx leaves the grid zeroed (dx = 0: none)."""
    return flat_value if dx == 0 else flat_value * masks[dx + masks.shape[0] // 2]


def _tap_weights(weight: torch.Tensor) -> torch.Tensor:
    """(F, N, T, k, k) -> (F, k*k, T, N): w[f, d, s, i]."""
    fusions, n, tasks, k, _ = weight.shape
    return weight.permute(0, 3, 4, 2, 1).reshape(fusions, k * k, tasks, n)


def _shifted_products(
    flat_value: torch.Tensor, flat_unit: torch.Tensor, grid: tuple[int, int], kernel_size: int
) -> torch.Tensor:
    """M (B, k*k, T*C, T*C): M[:, d] = sum_j masked V[:, j] u[:, j + d]ᵀ."""
    n = flat_unit.shape[-1]
    masks = _column_masks(grid, kernel_size, flat_value)
    products: list[torch.Tensor] = [flat_value] * kernel_size**2  # placeholders, all replaced
    for dx, taps in _by_column_shift(kernel_size):
        masked = _masked(flat_value, masks, dx)
        for d, dy in taps:
            shift = dy * grid[1] + dx
            lo, hi = _span(n, shift)
            products[d] = torch.matmul(
                masked[..., lo:hi], flat_unit[..., lo + shift : hi + shift].mT
            )
    return torch.stack(products, 1)


def _weighted_units(unit: torch.Tensor, taps: torch.Tensor, d: int) -> torch.Tensor:
    """Z_d of every fusion, (B, F, T*C, N): Z[b, f, (s, c), i] = w_f[i, s, d] u[b, s, c, i]."""
    batch, tasks, channels, n = unit.shape
    weighted = unit.unsqueeze(1) * taps[None, :, d, :, None, :]  # (B, F, T, C, N)
    return weighted.reshape(batch, taps.shape[0], tasks * channels, n)


def _diffused(
    products: torch.Tensor,
    unit: torch.Tensor,
    value: torch.Tensor,
    taps: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """out (B, T, C, N) from M and Z_d: fusion f's output rows are its tasks' rows of M."""
    batch, tasks, channels, n = value.shape
    fusions = taps.shape[0]
    rows = tasks * channels // fusions
    value_sums = value.sum(-1).reshape(batch, fusions, rows, 1)
    # The bias term b_i sum_j V[:, j], then each tap's product added in place of a copy.
    out = (value_sums * bias[None, :, None, :]).reshape(batch * fusions, rows, n)
    for d in range(products.shape[1]):
        m_d = products[:, d].reshape(batch * fusions, rows, tasks * channels)
        weighted = _weighted_units(unit, taps, d).reshape(batch * fusions, tasks * channels, n)
        out = torch.baddbmm(out, m_d, weighted)
    return out.reshape(batch, tasks, channels, n)


def linear_diffusion(
    unit: torch.Tensor,
    value: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    grid: tuple[int, int],
) -> torch.Tensor:
    """out[:, t, :, i] = sum_j value[:, t, :, j] G_t[i, j] without forming G.

    unit, value: (B, T, C, N); weight (F, N, T, k, k); bias (F, N) with F = 1 (shared fusion)
    or F = T (per task); returns (B, T, C, N), as `ctal.blocked_diffusion`. Plain tensor ops
    with static shapes apart from the batch (traceable for export).
    """
    products = _shifted_products(value.flatten(1, 2), unit.flatten(1, 2), grid, weight.shape[-1])
    return _diffused(products, unit, value, _tap_weights(weight), bias)


class LinearDiffusion(torch.autograd.Function):
    """`linear_diffusion` with a backward that saves only M (k^2 (T*C)^2 per sample) and
    recomputes the masked values and Z_d, so memory stays O(T C N)."""

    @staticmethod
    def forward(ctx, unit, value, weight, bias, grid):
        products = _shifted_products(
            value.flatten(1, 2), unit.flatten(1, 2), grid, weight.shape[-1]
        )
        ctx.grid = grid
        ctx.save_for_backward(unit, value, weight, bias, products)
        return _diffused(products, unit, value, _tap_weights(weight), bias)

    @staticmethod
    def backward(ctx, grad_out):
        unit, value, weight, bias, products = ctx.saved_tensors
        grid = ctx.grid
        batch, tasks, channels, n = value.shape
        fusions, kernel_size = weight.shape[0], weight.shape[-1]
        pad, rows, width = kernel_size // 2, tasks * channels // fusions, tasks * channels
        taps = _tap_weights(weight)
        grad = grad_out.contiguous().reshape(batch, fusions, rows, n)

        # Bias term: out += (sum_j V[:, j]) b_i.
        value_sums = value.sum(-1).reshape(batch, fusions, 1, rows)
        d_bias = torch.matmul(value_sums, grad).sum(0).squeeze(1)  # (F, N)
        d_value_sums = torch.matmul(grad, bias[None, :, :, None])  # (B, F, rows, 1)
        d_flat_value = d_value_sums.reshape(batch, width, 1).expand(batch, width, n).clone()

        # Second stage: out += M_d Z_d.
        d_products = torch.empty_like(products)
        d_unit = torch.zeros_like(unit)
        d_taps = torch.empty_like(taps)
        # One scratch buffer serves every tap: Z_d (the weighted units) until M_d's gradient is
        # taken, then Z_d's gradient (no allocation per tap).
        scratch = unit.new_empty(batch, fusions, width, n)
        per_task = scratch.view(batch, fusions, tasks, channels, n)
        for d in range(products.shape[1]):
            torch.mul(unit.unsqueeze(1), taps[None, :, d, :, None, :], out=per_task)
            d_products[:, d] = torch.matmul(grad, scratch.mT).reshape(batch, width, width)
            m_d = products[:, d].reshape(batch, fusions, rows, width)
            torch.matmul(m_d.mT, grad, out=scratch)
            for f in range(fusions):
                d_unit.addcmul_(per_task[:, f], taps[f, d, :, None, :])
            d_taps[:, d] = per_task.mul_(unit.unsqueeze(1)).sum((0, 3))

        del scratch, per_task, grad

        # First stage: M_d = masked V[:, span] u[:, span + shift]ᵀ, one dx (one masked copy
        # of the values, one gradient accumulator) at a time.
        masks = _column_masks(grid, kernel_size, value)
        flat_value, flat_unit = value.flatten(1, 2), unit.flatten(1, 2)
        d_flat_unit = d_unit.view(batch, width, n)
        for dx, taps_of_dx in _by_column_shift(kernel_size):
            masked = _masked(flat_value, masks, dx)
            # dx = 0 masks nothing: its taps accumulate straight into the value gradient.
            d_masked = d_flat_value if dx == 0 else torch.zeros_like(flat_value)
            for d, dy in taps_of_dx:
                shift = dy * grid[1] + dx
                lo, hi = _span(n, shift)
                d_masked[..., lo:hi].baddbmm_(
                    d_products[:, d], flat_unit[..., lo + shift : hi + shift]
                )
                d_flat_unit[..., lo + shift : hi + shift].baddbmm_(
                    d_products[:, d].mT, masked[..., lo:hi]
                )
            if dx != 0:
                d_flat_value.addcmul_(d_masked, masks[dx + pad])
            del masked, d_masked

        k = kernel_size
        d_weight = d_taps.reshape(fusions, k, k, tasks, n).permute(0, 4, 3, 1, 2)
        return d_unit, d_flat_value.view_as(value), d_weight, d_bias, None
