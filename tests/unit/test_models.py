"""Every architecture behind one interface; gradients; a CTALNet that actually learns."""

import pytest
import torch

from cta_model.errors import ConfigError
from cta_model.losses import MultiTaskLoss, build_weighting
from cta_model.nn.models import ARCHITECTURES, ModelSpec, build_model
from cta_model.tasks import TASKS, pixel_loss

pytestmark = pytest.mark.unit

THREE_TASKS = ("semseg", "height", "normals")
NUM_CLASSES = 5


def _spec(arch, size, backbone="resnet18", tasks=THREE_TASKS, **kw):
    output_stride = 8 if backbone.startswith("resnet") else None
    return ModelSpec(
        arch=arch,
        tasks=tasks,
        input_size=size,
        backbone=backbone,
        num_classes=NUM_CLASSES,
        output_stride=output_stride,
        **kw,
    )


def _targets(batch, size, tasks=THREE_TASKS):
    h, w = size
    normals = torch.nn.functional.normalize(torch.randn(batch, 3, h, w), dim=1)
    all_targets = {
        "semseg": torch.randint(0, NUM_CLASSES, (batch, h, w)),
        "height": torch.randn(batch, 1, h, w),
        "depth": torch.rand(batch, 1, h, w) + 0.5,
        "normals": normals,
    }
    return {t: all_targets[t] for t in tasks}


def _loss_for(tasks):
    return MultiTaskLoss({t: pixel_loss(t) for t in tasks}, build_weighting("fixed", tasks))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("size", [(32, 32), (40, 56)])
def test_every_architecture_returns_each_task_at_input_size(arch, size):
    model = build_model(_spec(arch, size)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    expected_channels = {"semseg": NUM_CLASSES, "height": 1, "normals": 3}
    assert list(out.final) == list(THREE_TASKS)
    for task, channels in expected_channels.items():
        assert out.final[task].shape == (2, channels, *size)
        assert out.final[task].dtype == torch.float32
    # Deep supervision: every decoder model gives initial predictions; HPS-light has none.
    assert list(out.initial) == ([] if arch == "hps-light" else list(THREE_TASKS))
    for task, tensor in out.initial.items():
        assert tensor.shape == (2, expected_channels[task], *size)
    norms = out.final["normals"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.parametrize("arch", ["hps", "ctal"])
def test_hrnet_models_at_two_sizes(arch):
    for size in [(32, 32), (48, 64)]:
        model = build_model(_spec(arch, size, backbone="hrnet-w18-small-v2")).eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, *size))
        assert out.final["semseg"].shape == (1, NUM_CLASSES, *size)


def test_ctal_grid_follows_backbone_stride():
    model = build_model(_spec("ctal", (64, 96), backbone="hrnet-w18-small-v2"))
    assert model.refinement.grid == (16, 24)
    model = build_model(_spec("ctal", (64, 96), backbone="resnet18"))
    assert model.refinement.grid == (8, 12)


def test_ctal_and_hps_differ_only_in_the_refinement_block():
    ctal = build_model(_spec("ctal", (32, 32)))
    hps = build_model(_spec("hps", (32, 32)))
    ctal_keys = {k for k in ctal.state_dict() if not k.startswith("refinement.")}
    assert ctal_keys == set(hps.state_dict())


def test_stl_is_one_network_per_task():
    model = build_model(_spec("stl", (32, 32)))
    assert list(model.networks) == list(THREE_TASKS)
    single = build_model(_spec("hps", (32, 32), tasks=("height",)))
    n_single = sum(p.numel() for p in single.parameters())
    assert sum(p.numel() for p in model.networks["height"].parameters()) == n_single


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_gradients_reach_every_parameter(arch):
    size = (32, 32)
    model = build_model(_spec(arch, size)).train()
    out = model(torch.randn(2, 3, *size))
    total, _ = _loss_for(THREE_TASKS)(out.final, out.initial, _targets(2, size))
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    zero = [n for n, p in model.named_parameters() if not torch.any(p.grad != 0)]
    assert not zero, f"all-zero gradient for {zero[:5]}"


def test_absent_label_contributes_zero_gradient_and_empty_task_gives_zero_loss():
    size = (32, 32)
    model = build_model(_spec("ctal", size)).eval()  # eval: BN must not mix the samples
    images = torch.randn(2, 3, *size)
    targets = _targets(2, size)
    loss_fn = _loss_for(THREE_TASKS)

    def height_grad(present_height, sample_targets):
        model.zero_grad()
        out = model(images)
        present = {t: torch.ones(2, dtype=torch.bool) for t in THREE_TASKS}
        present["height"] = present_height
        total, parts = loss_fn(out.final, out.initial, sample_targets, present)
        total.backward()
        return model.heads["height"][-1].weight.grad.clone(), parts, total

    # Sample 1's height label is absent: changing it must not change any gradient.
    absent = torch.tensor([True, False])
    g1, _, _ = height_grad(absent, targets)
    changed = dict(targets, height=targets["height"].clone())
    changed["height"][1] += 100.0
    g2, _, _ = height_grad(absent, changed)
    torch.testing.assert_close(g1, g2)

    # No height label in the batch: the height loss is exactly 0, never NaN.
    none = torch.tensor([False, False])
    g3, parts, total = height_grad(none, targets)
    assert parts["height"] == 0.0
    assert torch.isfinite(total)
    assert torch.count_nonzero(g3) == 0


def test_spec_round_trip_and_clear_errors():
    spec = _spec("ctal", (32, 48), gamma=0.1, shared_fusion=False)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="unknown arch 'mtan'"):
        _spec("mtan", (32, 32))
    with pytest.raises(ConfigError, match="unknown backbone 'vgg'"):
        ModelSpec(arch="hps", tasks=("height",), input_size=(32, 32), backbone="vgg")
    with pytest.raises(ConfigError, match="unknown task 'edges'"):
        _spec("hps", (32, 32), tasks=("semseg", "edges"))
    with pytest.raises(ConfigError, match="unknown model keys"):
        ModelSpec.from_dict({**spec.to_dict(), "dropout": 0.1})
    with pytest.raises(ConfigError, match="at least 2 tasks"):
        build_model(_spec("ctal", (32, 32), tasks=("semseg",)))
    with pytest.raises(ConfigError, match="num_classes"):
        build_model(ModelSpec(arch="hps", tasks=("semseg",), input_size=(32, 32)))


def test_any_number_of_tasks_from_the_registry():
    tasks = tuple(TASKS)  # all four
    model = build_model(_spec("ctal", (32, 32), tasks=tasks)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert set(out.final) == set(tasks)
    assert model.refinement.fusion["shared"].weight.shape[1] == len(tasks)


def _synthetic_batch(size, n=2):
    from cta_model.data.lines import load_lines_config
    from cta_model.data.synthetic import NUM_CLASSES as SCENE_CLASSES
    from cta_model.data.synthetic import render_sample

    line = load_lines_config().lines[0]
    samples = [render_sample(line, i, seed=0, height=size[0], width=size[1]) for i in range(n)]
    images = torch.stack(
        [torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in samples]
    )
    targets = {
        "semseg": torch.stack([torch.from_numpy(s.semseg) for s in samples]),
        "height": torch.stack([torch.from_numpy(s.height)[None] for s in samples]),
        "normals": torch.stack([torch.from_numpy(s.normals).permute(2, 0, 1) for s in samples]),
    }
    return images, targets, SCENE_CLASSES


def test_ctalnet_halves_its_loss_on_a_fixed_batch_within_100_steps():
    # DESIGN acceptance: CPU, 64x64, three tasks, the paper's backbone, on inspection scenes.
    size = (64, 64)
    images, targets, scene_classes = _synthetic_batch(size)
    spec = ModelSpec(
        arch="ctal",
        tasks=THREE_TASKS,
        input_size=size,
        backbone="hrnet-w18-small-v2",
        num_classes=scene_classes,
    )
    model = build_model(spec).train()
    loss_fn = _loss_for(THREE_TASKS)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _step in range(100):
        optimizer.zero_grad()
        out = model(images)
        total, _ = loss_fn(out.final, out.initial, targets)
        total.backward()
        optimizer.step()
        losses.append(total.item())
        if losses[-1] <= 0.5 * losses[0]:
            break
    assert losses[-1] <= 0.5 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"
