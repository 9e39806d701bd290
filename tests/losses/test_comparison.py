import math

import pytest
import torch

from harmonic.losses.comparison import iou_balanced_weights, quality_focal_loss, soft_targets, varifocal_loss


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_soft_targets_places_quality_at_gt_class():
    gt = torch.tensor([-1, 2, 0, -1])
    q = torch.tensor([0.9, 0.4])
    t = soft_targets(gt, q, num_classes=3)
    expected = torch.zeros(4, 3)
    expected[1, 2] = 0.9
    expected[2, 0] = 0.4
    assert torch.equal(t, expected)
    # per-anchor quality gives the same result
    assert torch.equal(soft_targets(gt, torch.tensor([0.0, 0.9, 0.4, 0.0]), num_classes=3), expected)


def test_soft_targets_errors():
    with pytest.raises(ValueError, match="num_classes"):
        soft_targets(torch.tensor([3]), torch.tensor([0.5]), num_classes=3)
    with pytest.raises(ValueError, match="one entry per anchor"):
        soft_targets(torch.tensor([1, -1, 0]), torch.tensor([0.5, 0.2, 0.1, 0.3]), num_classes=3)


def test_quality_focal_loss_matches_formula():
    x, y = 0.7, 0.6
    s = _sig(x)
    expected = -abs(y - s) ** 2 * ((1 - y) * math.log(1 - s) + y * math.log(s))
    got = quality_focal_loss(torch.tensor([[x]], dtype=torch.float64), torch.tensor([[y]], dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_quality_focal_loss_is_zero_when_score_equals_target_and_has_correct_gradient_sign():
    y = 0.3
    x = torch.tensor([[math.log(y / (1 - y))]], dtype=torch.float64, requires_grad=True)
    loss = quality_focal_loss(x, torch.tensor([[y]], dtype=torch.float64))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    x2 = torch.tensor([[2.0]], dtype=torch.float64, requires_grad=True)  # sigma too high for y = 0.3
    quality_focal_loss(x2, torch.tensor([[y]], dtype=torch.float64)).sum().backward()
    assert x2.grad.item() > 0


@pytest.mark.parametrize("q", [0.0, 0.8])
def test_varifocal_loss_matches_formula(q):
    x = -0.4
    p = _sig(x)
    if q > 0:
        expected = -q * (q * math.log(p) + (1 - q) * math.log(1 - p))
    else:
        expected = -0.75 * p**2 * math.log(1 - p)
    got = varifocal_loss(torch.tensor([[x]], dtype=torch.float64), torch.tensor([[q]], dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_varifocal_gradcheck():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(5, 3, dtype=torch.float64)
    t[1, 2] = 0.7
    assert torch.autograd.gradcheck(lambda a: varifocal_loss(a, t, reduction="sum"), (x,))
    assert torch.autograd.gradcheck(lambda a: quality_focal_loss(a, t, reduction="sum"), (x,))


def test_iou_balanced_weights_preserve_total_and_favour_high_iou():
    ious = torch.tensor([0.2, 0.5, 0.9])
    losses = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
    w = iou_balanced_weights(ious, losses, eta=1.5)
    assert not w.requires_grad
    assert (w * losses).sum().item() == pytest.approx(losses.sum().item(), rel=1e-6)
    assert w[2] > w[1] > w[0]
    assert torch.allclose(w[2] / w[0], torch.tensor((0.9 / 0.2) ** 1.5))


def test_iou_balanced_weights_degenerate_cases():
    assert iou_balanced_weights(torch.zeros(3), torch.ones(3)).tolist() == [1.0, 1.0, 1.0]
    assert iou_balanced_weights(torch.zeros(0), torch.zeros(0)).numel() == 0
