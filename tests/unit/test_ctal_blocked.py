"""Blocked exact CTAL equals dense; affinity maps for chosen pixels; the pooled variant."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from cta_model.errors import ConfigError
from cta_model.nn.ctal import CrossTaskAffinity
from cta_model.nn.models import ModelSpec, build_model, resize_model

pytestmark = pytest.mark.unit

THREE = ("semseg", "height", "normals")
TWO = ("semseg", "height")
GRID = (5, 7)  # N = 35: block sizes 4, 8 and 16 leave a partial last block


def _pair(tasks, shared, block_size, channels=6, seed=0):
    torch.manual_seed(seed)
    dense = CrossTaskAffinity(
        tasks, channels, GRID, gamma=0.5, shared_fusion=shared, mode="dense"
    ).double()
    with torch.no_grad():  # non-trivial fusion weights so every tap and bias matters
        for conv in dense.fusion.values():
            conv.weight.uniform_(-0.5, 0.5)
            conv.bias.uniform_(-0.5, 0.5)
    blocked = copy.deepcopy(dense)
    blocked.mode, blocked.block_size = "blocked", block_size
    return dense, blocked


def _features(tasks, batch=2, channels=6, dtype=torch.float64):
    return {t: torch.randn(batch, channels, *GRID, dtype=dtype, requires_grad=True) for t in tasks}


def _grads(block, features, weights):
    out = block(features)
    loss = sum((out[t] * w).sum() for t, w in zip(block.tasks, weights, strict=True))
    inputs = list(features.values()) + list(block.parameters())
    return out, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("tasks", [TWO, THREE])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_blocked_matches_dense_outputs_and_every_gradient(tasks, shared, block_size):
    dense, blocked = _pair(tasks, shared, block_size)
    features = _features(tasks)
    weights = [torch.randn(2, 6, *GRID, dtype=torch.float64) for _ in tasks]
    out_dense, grads_dense = _grads(dense, features, weights)
    out_blocked, grads_blocked = _grads(blocked, features, weights)
    for t in tasks:
        torch.testing.assert_close(out_blocked[t], out_dense[t], atol=1e-5, rtol=0)
    names = list(tasks) + [name for name, _ in dense.named_parameters()]
    assert len(grads_dense) == len(names)
    for name, g_dense, g_blocked in zip(names, grads_dense, grads_blocked, strict=True):
        assert torch.count_nonzero(g_dense) > 0, name  # the check below must be able to fail
        torch.testing.assert_close(g_blocked, g_dense, atol=1e-4, rtol=0, msg=name)


def test_blocked_matches_dense_in_float32_with_default_init():
    torch.manual_seed(1)
    dense = CrossTaskAffinity(THREE, 8, GRID, mode="dense")
    blocked = copy.deepcopy(dense)
    blocked.mode, blocked.block_size = "blocked", 6
    features = _features(THREE, channels=8, dtype=torch.float32)
    weights = [torch.randn(2, 8, *GRID) for _ in THREE]
    out_dense, grads_dense = _grads(dense, features, weights)
    out_blocked, grads_blocked = _grads(blocked, features, weights)
    for t in THREE:
        torch.testing.assert_close(out_blocked[t], out_dense[t], atol=1e-5, rtol=0)
    for g_dense, g_blocked in zip(grads_dense, grads_blocked, strict=True):
        torch.testing.assert_close(g_blocked, g_dense, atol=1e-4, rtol=0)


def test_blocked_without_grad_uses_plain_ops_and_matches():
    dense, blocked = _pair(THREE, True, 8)
    features = {t: x.detach() for t, x in _features(THREE).items()}
    with torch.no_grad():
        expected, got = dense(features), blocked(features)
    for t in THREE:
        torch.testing.assert_close(got[t], expected[t], atol=1e-5, rtol=0)


def test_dense_weights_load_into_a_blocked_block():
    dense, _ = _pair(THREE, False, 8)
    blocked = CrossTaskAffinity(THREE, 6, GRID, gamma=0.5, shared_fusion=False, mode="blocked")
    blocked.double().load_state_dict(dense.state_dict())  # same keys and shapes
    features = {t: x.detach() for t, x in _features(THREE).items()}
    with torch.no_grad():
        for t in THREE:
            torch.testing.assert_close(blocked(features)[t], dense(features)[t])


@pytest.mark.parametrize("shared", [True, False])
def test_affinity_maps_equal_rows_of_the_dense_matrices(shared):
    dense, _ = _pair(THREE, shared, 8)
    features = {t: x.detach() for t, x in _features(THREE).items()}
    pixels = [(0, 0), (2, 3), (4, 6)]
    with torch.no_grad():
        maps = dense.affinity_maps(features, pixels)
        affinities = dense.affinities(features)
        fused = dense.fused_affinity(affinities)
    rows = [y * GRID[1] + x for y, x in pixels]
    for t in THREE:
        assert maps[t].shape == (2, 3, *GRID)
        torch.testing.assert_close(maps[t].flatten(2), affinities[t][:, rows])
    if shared:
        torch.testing.assert_close(maps["fused"].flatten(2), fused["shared"][:, rows])
    else:
        for t in THREE:
            torch.testing.assert_close(maps[f"fused.{t}"].flatten(2), fused[t][:, rows])
        mean = torch.stack([fused[t][:, rows] for t in THREE]).mean(0)
        torch.testing.assert_close(maps["fused"].flatten(2), mean)
    with pytest.raises(ValueError, match="outside"):
        dense.affinity_maps(features, [(5, 0)])


def test_pooled_mode_runs_on_the_pooled_grid_and_trains():
    block = CrossTaskAffinity(THREE, 6, (9, 12), mode="pooled", pool_factor=3, gamma=0.5)
    assert block.fusion_grid == (3, 4)
    assert block.fusion["shared"].weight.shape == (12, 3, 3, 3)
    features = {t: torch.randn(2, 6, 9, 12, requires_grad=True) for t in THREE}
    out = block(features)
    assert out["height"].shape == (2, 6, 9, 12)
    sum(o.sum() for o in out.values()).backward()
    assert block.fusion["shared"].weight.grad.abs().sum() > 0
    maps = block.affinity_maps({t: x.detach() for t, x in features.items()}, [(8, 11)])
    assert maps["fused"].shape == (2, 1, 9, 12)


def test_pooled_factor_one_is_dense():
    dense, _ = _pair(THREE, True, 8)
    pooled = copy.deepcopy(dense)
    pooled.mode = "pooled"  # factor 1: the fusion grid is the feature grid
    features = {t: x.detach() for t, x in _features(THREE).items()}
    with torch.no_grad():
        for t in THREE:
            torch.testing.assert_close(pooled(features)[t], dense(features)[t])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "sparse"}, "affinity_mode"),
        ({"block_size": 0}, "affinity_block_size"),
        ({"pool_factor": 0}, "affinity_pool_factor"),
    ],
)
def test_bad_mode_options_are_rejected(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CrossTaskAffinity(THREE, 4, GRID, **kwargs)


def _smooth_field(grid, channels=4, seed=0):
    """A low-frequency field sampled at pixel centres: the same image at any grid."""
    generator = torch.Generator().manual_seed(seed)
    freq = torch.rand(channels, 2, generator=generator) * 2
    phase = torch.rand(channels, generator=generator) * 6
    ys = (torch.arange(grid[0]) + 0.5) / grid[0]
    xs = (torch.arange(grid[1]) + 0.5) / grid[1]
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    planes = [
        torch.cos(2 * math.pi * (freq[c, 0] * yy + freq[c, 1] * xx) + phase[c]) + 1.5
        for c in range(channels)
    ]
    return torch.stack(planes)[None]


def _smooth_block(grid):
    block = CrossTaskAffinity(TWO, 4, grid, gamma=1.0, mode="dense")
    with torch.no_grad():
        ys = torch.linspace(0, 1, grid[0])[:, None]
        xs = torch.linspace(0, 1, grid[1])[None, :]
        profile = (1 + 0.5 * torch.cos(3 * ys) * torch.sin(2 * xs)).reshape(-1, 1, 1, 1)
        fusion = block.fusion["shared"]
        fusion.weight.copy_(torch.rand(1, 2, 3, 3) * profile)
        fusion.bias.copy_(0.1 * profile.flatten())
        for conv in block.value_projection.values():  # V_t = P_t
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[:, :, 1, 1] = torch.eye(4)
    return block


def test_at_the_same_grid_the_block_is_identical():
    dense, _ = _pair(THREE, False, 8)
    same = dense.at_grid(GRID)
    assert same is not dense
    features = {t: x.detach() for t, x in _features(THREE).items()}
    with torch.no_grad():
        for t in THREE:
            assert torch.equal(same(features)[t], dense(features)[t])


@pytest.mark.parametrize("new_grid", [(24, 24), (18, 18), (8, 8), (12, 20)])
def test_at_another_grid_a_smooth_scene_gives_close_outputs(new_grid):
    torch.manual_seed(0)
    block = _smooth_block((12, 12))
    resized = block.at_grid(new_grid)
    assert resized.fusion["shared"].weight.shape == (new_grid[0] * new_grid[1], 2, 3, 3)
    with torch.no_grad():
        native = block({t: _smooth_field((12, 12), seed=i) for i, t in enumerate(TWO)})
        other = resized({t: _smooth_field(new_grid, seed=i) for i, t in enumerate(TWO)})
    for t in TWO:
        reference = F.interpolate(native[t], size=new_grid, mode="bilinear", align_corners=False)
        relative = (other[t] - reference).norm() / reference.norm()
        assert relative < 0.1, (t, float(relative))


def test_nearest_resampling_copies_kernels_of_the_nearest_old_position():
    block = _smooth_block((4, 4))
    resized = block.at_grid((8, 8), interpolation="nearest")
    old = block.fusion["shared"].weight.view(4, 4, 2, 3, 3)
    new = resized.fusion["shared"].weight.view(8, 8, 2, 3, 3)
    # Four times the positions: each new kernel is its old cell's kernel scaled by 1/4.
    torch.testing.assert_close(new[5, 2], old[2, 1] / 4)
    torch.testing.assert_close(new[7, 7], old[3, 3] / 4)


def _ctal_spec(size=(32, 32), **kw):
    return ModelSpec(
        arch="ctal",
        tasks=THREE,
        input_size=size,
        backbone="resnet18",
        num_classes=4,
        output_stride=8,
        decoder_channels=16,
        affinity_channels=8,
        **kw,
    )


def test_model_spec_modes_round_trip_and_old_specs_load():
    spec = _ctal_spec(affinity_mode="blocked", affinity_block_size=5)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in spec.to_dict().items() if not k.startswith("affinity_")}
    old["affinity_channels"] = 8
    assert ModelSpec.from_dict(old).affinity_mode == "auto"
    with pytest.raises(ConfigError, match="unknown affinity_mode 'sparse'"):
        _ctal_spec(affinity_mode="sparse")


@pytest.mark.parametrize(
    ("mode", "extra", "size"),
    [
        ("blocked", {"affinity_block_size": 3}, (32, 32)),
        ("linear", {}, (40, 48)),  # a non-square 5 x 6 feature grid
    ],
)
def test_a_dense_model_loads_and_runs_in_another_exact_mode(mode, extra, size):
    torch.manual_seed(0)
    dense = build_model(_ctal_spec(size, affinity_mode="dense")).eval()
    other = build_model(_ctal_spec(size, affinity_mode=mode, **extra)).eval()
    other.load_state_dict(dense.state_dict())  # strict: same keys and shapes
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected, got = dense(images), other(images)
    for t in THREE:
        torch.testing.assert_close(got.final[t], expected.final[t], atol=1e-5, rtol=1e-5)


def test_ctalnet_affinity_maps_for_image_pixels():
    model = build_model(_ctal_spec()).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        maps = model.affinity_maps(images, [(0, 0), (31, 17)])
        features, _ = model.initial_decoders(model.backbone(images))
        projected = {t: model.projections[t](features[t]) for t in THREE}
        affinities = model.refinement.affinities(projected)
    assert set(maps) == {*THREE, "fused"}
    assert maps["fused"].shape == (1, 2, 4, 4)
    # Image pixel (31, 17) lies in feature cell (3, 2) of the 4x4 grid: row 14 of A_t.
    torch.testing.assert_close(maps["height"][0, 1].flatten(), affinities["height"][0, 14])
    with pytest.raises(ValueError, match="outside the 32x32 image"):
        model.affinity_maps(images, [(32, 0)])


def test_resize_model_keeps_weights_and_runs_at_the_new_size():
    torch.manual_seed(0)
    model = build_model(_ctal_spec()).eval()
    same = resize_model(model, (32, 32))
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for t in THREE:
            assert torch.equal(same(images).final[t], model(images).final[t])
    bigger = resize_model(model, (48, 64))
    assert bigger.spec.input_size == (48, 64)
    assert bigger.refinement.grid == (6, 8)
    assert model.refinement.grid == (4, 4)  # the original is untouched
    assert torch.equal(bigger.backbone.conv1.weight, model.backbone.conv1.weight)
    with torch.no_grad():
        out = bigger(torch.randn(1, 3, 48, 64))
    assert out.final["normals"].shape == (1, 3, 48, 64)
    # The resized model saves and rebuilds from its own spec.
    rebuilt = build_model(ModelSpec.from_dict(bigger.spec.to_dict()))
    rebuilt.load_state_dict(bigger.state_dict())
    hps = build_model(_ctal_spec().replace(arch="hps"))
    assert resize_model(hps, (40, 40)).spec.input_size == (40, 40)


def test_the_block_runs_in_float32_under_bf16_autocast():
    dense, _ = _pair(THREE, True, 8)
    block = dense.float()
    features = {t: x.detach().float() for t, x in _features(THREE).items()}
    with torch.no_grad():
        expected = block(features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = block({t: x.bfloat16() for t, x in features.items()})
    for t in THREE:
        assert got[t].dtype == torch.float32
        # Only the bf16 rounding of the inputs remains (bf16 matmuls would be far worse).
        torch.testing.assert_close(got[t], expected[t], atol=0.05, rtol=0.02)
