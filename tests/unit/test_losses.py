"""Masked losses by hand, presence flags, weighting strategies over the tasks present."""

import math

import pytest
import torch

from cta_model.errors import ConfigError
from cta_model.losses import (
    DynamicWeightAverage,
    FixedWeighting,
    MultiTaskLoss,
    UncertaintyWeighting,
    build_weighting,
    cosine_loss,
    masked_cross_entropy,
    masked_l1_nan_invalid,
    masked_l1_zero_invalid,
)

pytestmark = pytest.mark.unit
NAN = float("nan")


def test_masked_l1_height_skips_nan_and_keeps_zero_mm():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[0.0, NAN], [5.0, NAN]]]])
    loss, count = masked_l1_nan_invalid(pred, target)
    # valid: |1 - 0| = 1 (0 mm is the datum, a real value) and |3 - 5| = 2 -> mean 1.5
    assert count == 2
    assert loss.item() == pytest.approx(1.5)


def test_masked_l1_depth_skips_zero():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[0.0, 1.0], [0.0, 6.0]]]])
    loss, count = masked_l1_zero_invalid(pred, target)
    assert count == 2
    assert loss.item() == pytest.approx((1.0 + 2.0) / 2)


def test_masked_cross_entropy_ignores_minus_one_and_out_of_range():
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 1, 0, 0] = math.log(2.0)  # pixel 0: p(class 1) = 2 / 4
    target = torch.tensor([[[1, -1, 7, 0]]])
    loss, count = masked_cross_entropy(logits, target)
    # valid pixels 0 (class 1, p=1/2) and 3 (class 0, p=1/4 since pixel 3's logits are 0 -> 1/3)
    expected = (-math.log(0.5) + -math.log(1 / 3)) / 2
    assert count == 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_cosine_loss_skips_zero_normals_and_normalises_prediction():
    pred = torch.zeros(1, 3, 1, 3)
    pred[0, :, 0, 0] = torch.tensor([0.0, 0.0, 5.0])  # same direction as target: loss 0
    pred[0, :, 0, 1] = torch.tensor([3.0, 0.0, 0.0])  # 90 degrees off: loss 1
    target = torch.zeros(1, 3, 1, 3)
    target[0, 2, 0, 0] = 1.0
    target[0, 2, 0, 1] = 1.0  # pixel 2 stays (0, 0, 0): invalid
    loss, count = cosine_loss(pred, target)
    assert count == 2
    assert loss.item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "loss_fn, pred, target",
    [
        (masked_cross_entropy, torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))),
        (masked_l1_nan_invalid, torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)),
        (masked_l1_zero_invalid, torch.randn(2, 1, 4, 4), torch.rand(2, 1, 4, 4) + 1),
        (
            cosine_loss,
            torch.randn(2, 3, 4, 4),
            torch.nn.functional.normalize(torch.randn(2, 3, 4, 4)),
        ),
    ],
)
def test_absent_samples_give_zero_loss_and_zero_but_present_gradient(loss_fn, pred, target):
    pred = pred.clone().requires_grad_(True)
    loss, count = loss_fn(pred, target, torch.tensor([False, False]))
    assert loss.item() == 0.0 and count == 0
    loss.backward()
    assert pred.grad is not None and torch.count_nonzero(pred.grad) == 0
    # One present sample: the loss equals that sample's loss alone.
    alone, _ = loss_fn(pred[:1], target[:1])
    half, _ = loss_fn(pred, target, torch.tensor([True, False]))
    assert half.item() == pytest.approx(alone.item(), rel=1e-6)


def test_nan_targets_never_poison_gradients():
    pred = torch.randn(1, 1, 4, 4, requires_grad=True)
    target = torch.full((1, 1, 4, 4), NAN)
    target[0, 0, 0, 0] = 1.0
    loss, _ = masked_l1_nan_invalid(pred, target)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert torch.count_nonzero(pred.grad) == 1


def test_fixed_weighting_and_unknown_task():
    weighting = FixedWeighting(("a", "b"), weights={"a": 1.0, "b": 10.0})
    total = weighting.combine({"a": torch.tensor(2.0), "b": torch.tensor(3.0)}, {"a": 1, "b": 1})
    assert total.item() == pytest.approx(32.0)
    with pytest.raises(ConfigError, match="unknown tasks"):
        FixedWeighting(("a",), weights={"c": 1.0})


def test_uncertainty_weighting_uses_only_present_tasks_but_keeps_all_in_graph():
    weighting = UncertaintyWeighting(("a", "b"))
    with torch.no_grad():
        weighting.log_vars["a"].fill_(math.log(4.0))
    losses = {"a": torch.tensor(8.0), "b": torch.tensor(5.0, requires_grad=True)}
    total = weighting.combine(losses, {"a": True, "b": False})
    # 0.5 * exp(-s) * L + 0.5 * s for a: 0.5 * 8 / 4 + 0.5 * log 4; b absent -> 0
    assert total.item() == pytest.approx(1.0 + 0.5 * math.log(4.0))
    total.backward()
    assert weighting.log_vars["b"].grad is not None
    assert weighting.log_vars["b"].grad.item() == 0.0
    # The absent task's loss (hence its head) stays in the graph with a zero gradient (DDP).
    assert losses["b"].grad is not None and losses["b"].grad.item() == 0.0


def test_dwa_follows_loss_ratios_and_renormalises_over_present_tasks():
    dwa = DynamicWeightAverage(("a", "b"), temperature=2.0)
    assert dwa.weights() == {"a": 1.0, "b": 1.0}
    dwa.epoch_end({"a": 1.0, "b": 1.0})
    assert dwa.weights() == {"a": 1.0, "b": 1.0}  # two epochs are needed
    dwa.epoch_end({"a": 2.0, "b": 0.5})  # a's loss doubled, b's halved -> a weighs more
    w = dwa.weights()
    ea, eb = math.exp(2.0 / 2), math.exp(0.5 / 2)
    assert w["a"] == pytest.approx(2 * ea / (ea + eb))
    assert w["a"] + w["b"] == pytest.approx(2.0)
    only_b = dwa.combine({"a": torch.tensor(3.0), "b": torch.tensor(3.0)}, {"a": False, "b": True})
    assert only_b.item() == pytest.approx(3.0)  # one present task gets weight 1
    restored = DynamicWeightAverage(("a", "b"))
    restored.load_state_dict(dwa.state_dict())
    assert restored.weights() == w


def test_build_weighting_by_name():
    assert isinstance(build_weighting("dwa", ("a", "b")), DynamicWeightAverage)
    with pytest.raises(ConfigError, match="unknown loss weighting 'gradnorm'"):
        build_weighting("gradnorm", ("a",))


def test_multitask_loss_adds_initial_predictions_with_the_same_weight():
    pred = torch.zeros(1, 1, 2, 2)
    target = torch.ones(1, 1, 2, 2)
    weighting = FixedWeighting(("height",), weights={"height": 2.0})
    with_ds = MultiTaskLoss({"height": masked_l1_nan_invalid}, weighting)
    total, parts = with_ds({"height": pred}, {"height": pred + 0.5}, {"height": target})
    assert parts["height"] == pytest.approx(1.5)  # final 1.0 + initial 0.5
    assert total.item() == pytest.approx(3.0)
    without = MultiTaskLoss({"height": masked_l1_nan_invalid}, weighting, deep_supervision=False)
    total, _ = without({"height": pred}, {"height": pred + 0.5}, {"height": target})
    assert total.item() == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="differ"):
        MultiTaskLoss({"depth": masked_l1_zero_invalid}, weighting)
