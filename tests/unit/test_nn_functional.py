import pytest
import torch

from cta_model.nn.functional import class_ids, unit_vectors


@pytest.mark.parametrize(("shape", "dim"), [((2, 3, 16, 10), -2), ((2, 3, 5, 7), 1)])
def test_unit_vectors_equal_f_normalize_with_gradients_and_zero_vectors(shape, dim):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    vectors = x.movedim(dim, -1)  # a view: one vector per last-axis row
    vectors[0, 1, 2].zero_()  # one all-zero vector: F.normalize's gradient there is 1/eps
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, reference = unit_vectors(a, dim=dim), torch.nn.functional.normalize(b, dim=dim)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-14)
    upstream = torch.randn_like(x)
    ours.backward(upstream)
    reference.backward(upstream)
    assert torch.isfinite(a.grad).all()
    assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_unit_vectors_in_float32_match_within_rounding():
    torch.manual_seed(1)
    x = torch.randn(4, 64, 256)
    reference = torch.nn.functional.normalize(x, dim=1)
    assert (unit_vectors(x, dim=1) - reference).abs().max() < 1e-6
    assert torch.allclose(unit_vectors(x, dim=1).norm(dim=1), torch.ones(4, 256), atol=1e-6)


def test_class_ids_equal_argmax_with_ties():
    torch.manual_seed(2)
    logits = torch.randint(0, 3, (2, 6, 9, 11)).float()  # many ties between classes
    assert torch.equal(class_ids(logits), logits.argmax(dim=1))
