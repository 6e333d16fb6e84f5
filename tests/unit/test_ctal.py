"""The affinity block pinned down by hand-set weights (DESIGN 3.1)."""

import pytest
import torch

from cta_model.nn.ctal import CrossTaskAffinity, interleave_task_maps, task_affinity

pytestmark = pytest.mark.unit

TASKS = ("semseg", "height", "normals")
GRID = (3, 4)
N = GRID[0] * GRID[1]


def _features(batch=2, channels=5):
    return {t: torch.randn(batch, channels, *GRID) for t in TASKS}


def _zero_fusion(block):
    with torch.no_grad():
        for conv in block.fusion.values():
            conv.weight.zero_()
            conv.bias.zero_()


def test_task_affinity_is_symmetric_cosine_matrix():
    x = torch.randn(2, 5, *GRID)
    a = task_affinity(x)
    assert a.shape == (2, N, N)
    torch.testing.assert_close(a, a.transpose(1, 2))
    torch.testing.assert_close(torch.diagonal(a, dim1=1, dim2=2), torch.ones(2, N))
    # Entry (i, j) is the cosine of pixel i's and pixel j's feature vectors (row-major index).
    flat = x.flatten(2)
    i, j = 5, 10
    expected = torch.nn.functional.cosine_similarity(flat[0, :, i], flat[0, :, j], dim=0)
    torch.testing.assert_close(a[0, i, j], expected)


def test_interleave_puts_task_t_of_pixel_i_at_channel_i_times_T_plus_t():
    maps = [torch.randn(1, N, N) for _ in TASKS]
    out = interleave_task_maps(maps, GRID)
    assert out.shape == (1, N * len(TASKS), *GRID)
    for i in (0, 7, N - 1):
        for t in range(len(TASKS)):
            torch.testing.assert_close(out[0, i * len(TASKS) + t], maps[t][0, i].view(GRID))


def test_fusion_parameter_count_matches_the_paper_formula():
    block = CrossTaskAffinity(TASKS, channels=5, grid=(72, 96))
    fusion = block.fusion["shared"]
    assert sum(p.numel() for p in fusion.parameters()) == 193_536  # N*T*9 + N at N=6912, T=3
    per_task = CrossTaskAffinity(TASKS, channels=5, grid=GRID, shared_fusion=False)
    assert set(per_task.fusion) == set(TASKS)


def test_centre_tap_selects_one_task_map_for_one_row():
    block = CrossTaskAffinity(TASKS, channels=5, grid=GRID)
    _zero_fusion(block)
    target_pixel, task_index = 6, 1
    with torch.no_grad():
        block.fusion["shared"].weight[target_pixel, task_index, 1, 1] = 1.0
    feats = _features()
    affinities = block.affinities(feats)
    g = block.fused_affinity(affinities)["shared"]
    torch.testing.assert_close(
        g[:, target_pixel, :], affinities[TASKS[task_index]][:, target_pixel]
    )
    others = torch.ones(N, dtype=torch.bool)
    others[target_pixel] = False
    assert torch.count_nonzero(g[:, others, :]) == 0


def test_shift_kernel_makes_g_asymmetric_and_diffusion_uses_rows_of_g():
    block = CrossTaskAffinity(TASKS, channels=5, grid=GRID)
    _zero_fusion(block)
    with torch.no_grad():
        # Every output row i takes task 0's map shifted by one column (a cross-correlation).
        block.fusion["shared"].weight[:, 0, 1, 2] = 1.0
    feats = _features(batch=1)
    affinities = block.affinities(feats)
    g = block.fused_affinity(affinities)["shared"][0]
    assert not torch.allclose(g, g.T, atol=1e-3)
    # Row i at position (r, c) reads A_0[i] at (r, c + 1); zero past the right edge.
    a0 = affinities["semseg"][0].view(N, *GRID)
    expected = torch.zeros_like(a0)
    expected[:, :, :-1] = a0[:, :, 1:]
    torch.testing.assert_close(g.view(N, *GRID), expected)

    value = torch.randn(1, 5, *GRID)
    out = block.diffuse(value, g.unsqueeze(0)).flatten(2)[0]
    v = value.flatten(2)[0]
    by_rows = torch.einsum("cj,ij->ci", v, g)  # out[:, i] = sum_j V[:, j] G[i, j]
    by_cols = torch.einsum("cj,ji->ci", v, g)  # the transposed reading
    torch.testing.assert_close(out, by_rows)
    assert not torch.allclose(out, by_cols, atol=1e-3)


def test_forward_blends_with_fixed_gamma():
    block = CrossTaskAffinity(TASKS, channels=5, grid=GRID, gamma=0.05)
    _zero_fusion(block)  # G = 0, so refined = (1 - gamma) * P
    feats = _features()
    out = block(feats)
    for t in TASKS:
        torch.testing.assert_close(out[t], 0.95 * feats[t])


def test_per_task_fusion_gives_each_task_its_own_g():
    block = CrossTaskAffinity(TASKS, channels=5, grid=GRID, shared_fusion=False, gamma=1.0)
    _zero_fusion(block)
    with torch.no_grad():
        block.fusion["height"].weight[:, 1, 1, 1] = 1.0  # only height gets a non-zero G
    out = block(_features())
    assert torch.count_nonzero(out["semseg"]) == 0
    assert torch.count_nonzero(out["height"]) > 0


def test_wrong_grid_is_a_clear_error():
    block = CrossTaskAffinity(TASKS, channels=5, grid=GRID)
    with pytest.raises(ValueError, match="built for a 3x4 feature grid but got 4x4"):
        block({t: torch.randn(1, 5, 4, 4) for t in TASKS})


@pytest.mark.parametrize("kwargs", [{"kernel_size": 2}, {"kernel_size": 0}])
def test_bad_options_are_rejected(kwargs):
    with pytest.raises(ValueError, match="kernel_size"):
        CrossTaskAffinity(TASKS, channels=5, grid=GRID, **kwargs)


def test_one_task_is_rejected():
    with pytest.raises(ValueError, match="at least 2 tasks"):
        CrossTaskAffinity(("semseg",), channels=5, grid=GRID)


def test_kernel_size_five_and_two_tasks_work():
    block = CrossTaskAffinity(("semseg", "depth"), channels=4, grid=GRID, kernel_size=5)
    assert block.fusion["shared"].weight.shape == (N, 2, 5, 5)
    out = block({t: torch.randn(1, 4, *GRID) for t in ("semseg", "depth")})
    assert out["depth"].shape == (1, 4, *GRID)


def _literal_paper_block(block, feats):
    """DESIGN 3.1 steps 1-4 with the grouped conv itself (the module's reference methods)."""
    fused = block.fused_affinity(block.affinities(feats))
    out = {}
    for t in block.tasks:
        g = fused["shared"] if block.shared_fusion else fused[t]
        diffused = block.diffuse(block.value_projection[t](feats[t]), g)
        out[t] = block.gamma * diffused + (1 - block.gamma) * feats[t]
    return out


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("mode", ["dense", "blocked"])
def test_fast_paths_equal_the_literal_grouped_conv_with_gradients(shared, mode):
    torch.manual_seed(3)
    block = CrossTaskAffinity(
        TASKS, channels=5, grid=GRID, gamma=0.5, shared_fusion=shared, mode=mode, block_size=5
    ).double()
    with torch.no_grad():  # every tap and bias non-zero, so a wrong channel order shows
        for conv in block.fusion.values():
            conv.weight.uniform_(-0.5, 0.5)
            conv.bias.uniform_(-0.5, 0.5)
    feats = {t: torch.randn(2, 5, *GRID, dtype=torch.float64, requires_grad=True) for t in TASKS}
    weights = {t: torch.randn(2, 5, *GRID, dtype=torch.float64) for t in TASKS}
    inputs = list(feats.values()) + list(block.parameters())

    def grads(out):
        loss = sum((out[t] * weights[t]).sum() for t in TASKS)
        return torch.autograd.grad(loss, inputs)

    expected, got = _literal_paper_block(block, feats), block(feats)
    for t in TASKS:
        torch.testing.assert_close(got[t], expected[t], atol=1e-10, rtol=0)
    for g_expected, g_got in zip(grads(expected), grads(got), strict=True):
        assert torch.count_nonzero(g_expected) > 0
        torch.testing.assert_close(g_got, g_expected, atol=1e-10, rtol=0)
