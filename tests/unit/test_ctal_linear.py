"""`affinity_mode: linear` equals the literal dense block; its memory stays linear in N."""

import copy

import pytest
import torch

from cta_model.nn.ctal import CrossTaskAffinity
from cta_model.nn.ctal_linear import LinearDiffusion

pytestmark = pytest.mark.unit

THREE = ("semseg", "height", "normals")
TWO = ("semseg", "depth")
GRID = (5, 7)  # non-square: a wrong row/column order in the shifts shows


def _block(tasks, shared, kernel_size, channels=4, grid=GRID, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    block = CrossTaskAffinity(
        tasks,
        channels,
        grid,
        gamma=0.5,
        kernel_size=kernel_size,
        shared_fusion=shared,
        mode="linear",
    ).to(dtype)
    with torch.no_grad():  # every tap and bias non-zero, so a wrong tap order or sign shows
        for conv in block.fusion.values():
            conv.weight.uniform_(-0.5, 0.5)
            conv.bias.uniform_(-0.5, 0.5)
    return block


def _literal(block, features):
    """DESIGN 3.1 steps 1-4 with the N x N tensors and the grouped conv itself."""
    fused = block.fused_affinity(block.affinities(features))
    out = {}
    for t in block.tasks:
        g = fused["shared"] if block.shared_fusion else fused[t]
        diffused = block.diffuse(block.value_projection[t](features[t]), g)
        out[t] = block.gamma * diffused + (1 - block.gamma) * features[t]
    return out


def _relative(got, expected):
    """Max absolute difference over the largest absolute reference value."""
    return float((got - expected).abs().max() / expected.abs().max())  # on detached grads


def _outputs_and_grads(block, features, weights, run):
    out = run(block, features)
    loss = sum((out[t] * w).sum() for t, w in zip(block.tasks, weights, strict=True))
    inputs = list(features.values()) + list(block.parameters())
    return out, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize(
    ("tasks", "shared", "kernel_size", "dtype", "tolerance"),
    [
        (THREE, True, 3, torch.float64, 1e-10),
        (THREE, False, 3, torch.float64, 1e-10),
        (TWO, True, 5, torch.float64, 1e-10),
        (TWO, False, 1, torch.float64, 1e-10),
        (THREE, True, 3, torch.float32, 1e-5),
        (THREE, False, 5, torch.float32, 1e-5),
    ],
)
def test_linear_equals_the_literal_dense_block_with_every_gradient(
    tasks, shared, kernel_size, dtype, tolerance
):
    block = _block(tasks, shared, kernel_size, dtype=dtype)
    features = {t: torch.randn(2, 4, *GRID, dtype=dtype, requires_grad=True) for t in tasks}
    weights = [torch.randn(2, 4, *GRID, dtype=dtype) for _ in tasks]
    expected, grads_expected = _outputs_and_grads(block, features, weights, _literal)
    got, grads_got = _outputs_and_grads(block, features, weights, lambda b, f: b(f))
    for t in tasks:
        assert got[t].dtype == dtype
        assert _relative(got[t].detach(), expected[t].detach()) <= tolerance, t
    names = list(tasks) + [name for name, _ in block.named_parameters()]
    for name, g_expected, g_got in zip(names, grads_expected, grads_got, strict=True):
        assert torch.count_nonzero(g_expected) > 0, name  # the check must be able to fail
        assert _relative(g_got, g_expected) <= tolerance, name
    # The grid's border, where the zero padding of the fusion conv cuts the shifted sums.
    border = torch.ones(GRID, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    for name, g_expected, g_got in zip(names, grads_expected, grads_got, strict=True):
        if name in tasks:
            on_border = g_expected[..., border]
            assert _relative(g_got[..., border], on_border) <= tolerance, name


@pytest.mark.parametrize("shared", [True, False])
def test_gradcheck_in_float64_on_a_tiny_grid(shared):
    torch.manual_seed(0)
    grid, tasks, channels, fusions = (2, 3), 2, 2, 1 if shared else 2
    n = grid[0] * grid[1]
    features = torch.randn(1, tasks, channels, n, dtype=torch.float64)
    unit = torch.nn.functional.normalize(features, dim=2)
    inputs = (
        unit.requires_grad_(),
        torch.randn(1, tasks, channels, n, dtype=torch.float64, requires_grad=True),
        torch.randn(fusions, n, tasks, 3, 3, dtype=torch.float64, requires_grad=True),
        torch.randn(fusions, n, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(lambda *x: LinearDiffusion.apply(*x, grid), inputs)


def test_backward_saves_only_its_inputs_and_the_small_products():
    block = _block(THREE, True, 3, channels=4, grid=(12, 16), dtype=torch.float32)
    features = {t: torch.randn(2, 4, 12, 16, requires_grad=True) for t in THREE}
    out = block(features)
    node = out["semseg"].grad_fn
    while node is not None and "LinearDiffusion" not in type(node).__name__:
        node = node.next_functions[0][0]
    assert node is not None, "the training path runs the custom Function"
    n = 12 * 16
    unit, value, weight, bias, products = node.saved_tensors
    # The inputs, and M: B k^2 (TC)^2 elements; no (B, k^2, T*C, N) stack of shifted features.
    assert unit.shape == value.shape == (2, 3, 4, n)
    assert weight.shape == (1, n, 3, 3, 3) and bias.shape == (1, n)
    assert products.shape == (2, 9, 12, 12)


def test_no_grad_path_equals_the_function():
    block = _block(THREE, False, 3)
    features = {t: torch.randn(2, 4, *GRID, dtype=torch.float64) for t in THREE}
    with torch.no_grad():
        plain = block(features)
    trained = block({t: x.clone().requires_grad_() for t, x in features.items()})
    for t in THREE:
        torch.testing.assert_close(trained[t].detach(), plain[t], atol=1e-12, rtol=0)


def test_linear_runs_in_float32_under_bf16_autocast():
    block = _block(THREE, True, 3, dtype=torch.float32)
    features = {t: torch.randn(2, 4, *GRID) for t in THREE}
    with torch.no_grad():
        expected = block(features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = block({t: x.bfloat16() for t, x in features.items()})
    for t in THREE:
        assert got[t].dtype == torch.float32
        torch.testing.assert_close(got[t], expected[t], atol=0.05, rtol=0.02)


def test_at_grid_keeps_the_linear_mode():
    block = _block(TWO, True, 3)
    resized = block.at_grid((6, 9))
    assert resized.mode == "linear"
    same = copy.deepcopy(block)
    features = {t: torch.randn(1, 4, *GRID, dtype=torch.float64) for t in TWO}
    with torch.no_grad():
        for t in TWO:
            assert torch.equal(same(features)[t], block(features)[t])
