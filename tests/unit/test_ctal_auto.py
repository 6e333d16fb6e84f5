"""`affinity_mode: auto` picks dense, blocked or linear from the cost model (DESIGN 3.4)."""

import pytest
import torch

from cta_model.nn import ctal
from cta_model.nn.ctal import BlockShape, CrossTaskAffinity, affinity_costs, cheapest_mode

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
PLENTY = 10**13  # bytes of free memory: every mode fits


def _shape(positions, tasks=3, channels=128, kernel_size=3, fusions=1, batch=1):
    return BlockShape(batch, positions, tasks, channels, kernel_size, fusions)


def _crossover(**kw):
    """The smallest N at which linear's estimated time is below dense's (bisection)."""
    low, high = 1, 10**6

    def linear_wins(n):
        costs = affinity_costs(_shape(n, **kw))
        return costs["linear"].seconds < costs["dense"].seconds

    assert not linear_wins(low) and linear_wins(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if linear_wins(mid) else (mid, high)
    return high


def test_flop_counts_follow_the_documented_formulas():
    costs = affinity_costs(_shape(6912))
    n, t, c, k = 6912, 3, 128, 3
    assert costs["dense"].flops == 3 * n * n * (4 * t * c + 2 * t * k * k)
    assert costs["linear"].flops == 3 * 4 * k * k * (t * c) ** 2 * n
    assert costs["blocked"].flops > costs["dense"].flops  # the recompute
    assert costs["dense"].held_bytes == ctal.dense_tensor_bytes(1, n, t, 1, 4)
    assert costs["linear"].held_bytes < 0.1 * costs["dense"].held_bytes


def test_dense_to_linear_crossover_lies_near_t_k2_c_and_grows_with_tasks():
    n3 = _crossover()
    assert 0.8 * 3 * 9 * 128 < n3 < 1.2 * 3 * 9 * 128  # about T k^2 C = 3456 positions
    n5 = _crossover(tasks=5)
    assert n5 == pytest.approx(n3 * 5 / 3, rel=0.05)  # linear's cost grows with T^2, dense's T
    assert _crossover(kernel_size=5) > 2 * n3


def test_auto_switches_from_dense_to_linear_at_the_crossover(monkeypatch):
    monkeypatch.setattr(ctal, "free_memory_bytes", lambda device: PLENTY)
    n = _crossover()
    below = CrossTaskAffinity(("a", "b", "c"), 128, (1, n - 1), mode="auto")
    at = CrossTaskAffinity(("a", "b", "c"), 128, (1, n), mode="auto")
    assert below.resolve_mode(1, torch.float32, CPU) == "dense"
    assert at.resolve_mode(1, torch.float32, CPU) == "linear"
    # The paper's 72 x 96 grid runs linear, a 32 x 32 grid dense.
    for grid, mode in (((72, 96), "linear"), ((32, 32), "dense")):
        block = CrossTaskAffinity(("a", "b", "c"), 128, grid)
        assert block.resolve_mode(1, torch.float32, CPU) == mode


def test_auto_leaves_dense_for_blocked_when_dense_does_not_fit(monkeypatch):
    # A small grid, where linear costs more than even blocked: memory decides dense vs blocked.
    block = CrossTaskAffinity(("a", "b", "c"), 128, (32, 32), mode="auto")
    costs = affinity_costs(block.block_shape(2))
    assert costs["dense"].seconds < costs["blocked"].seconds < costs["linear"].seconds
    needed = costs["dense"].held_bytes
    monkeypatch.setattr(ctal, "free_memory_bytes", lambda device: int(needed / 0.25))
    assert block.resolve_mode(2, torch.float32, CPU) == "dense"
    monkeypatch.setattr(ctal, "free_memory_bytes", lambda device: int(needed / 0.25) - 1)
    assert block.resolve_mode(2, torch.float32, CPU) == "blocked"
    # The default block keeps one block's affinity rows near AUTO_BLOCK_BYTES.
    big = CrossTaskAffinity(("a", "b", "c"), 4, (65, 64))
    rows = big.block_rows(1)
    assert rows * 3 * 65 * 64 * 4 <= ctal.AUTO_BLOCK_BYTES < (rows + 1) * 3 * 65 * 64 * 4


def test_auto_leaves_linear_for_blocked_when_linear_does_not_fit(monkeypatch):
    block = CrossTaskAffinity(("a", "b", "c"), 128, (72, 96), mode="auto")
    needed = affinity_costs(block.block_shape(4))["linear"].held_bytes
    monkeypatch.setattr(ctal, "free_memory_bytes", lambda device: int(needed / 0.25))
    assert block.resolve_mode(4, torch.float32, CPU) == "linear"
    monkeypatch.setattr(ctal, "free_memory_bytes", lambda device: int(needed / 0.25) - 1)
    assert block.resolve_mode(4, torch.float32, CPU) == "blocked"


def test_without_dense_blocked_and_linear_cross_below_the_dense_crossover():
    n = _crossover()
    tight = 0  # no free memory: only blocked is sure to fit
    assert cheapest_mode(affinity_costs(_shape(n)), tight) == "blocked"
    # Where dense does not fit, linear still wins a little below the dense crossover, as blocked
    # costs more than dense; far below it blocked wins.
    costs = affinity_costs(_shape(int(0.9 * n)))
    assert costs["blocked"].seconds > costs["linear"].seconds > costs["dense"].seconds
    fits_linear_only = int(costs["linear"].held_bytes / 0.25)
    assert cheapest_mode(costs, fits_linear_only) == "linear"
    assert cheapest_mode(affinity_costs(_shape(n // 2)), fits_linear_only) == "blocked"


def test_unknown_free_memory_lets_every_mode_fit_and_explicit_modes_stay(monkeypatch):
    costs = affinity_costs(_shape(256))
    assert cheapest_mode(costs, None) == "dense"
    monkeypatch.setattr(ctal, "free_memory_bytes", lambda device: None)
    small = CrossTaskAffinity(("a", "b", "c"), 4, (5, 7), mode="auto")
    assert small.resolve_mode(2, torch.float32, CPU) == "dense"
    for mode in ("dense", "blocked", "linear", "pooled"):
        block = CrossTaskAffinity(("a", "b"), 8, (4, 4), mode=mode)
        assert block.resolve_mode(1, torch.float32, CPU) == mode
