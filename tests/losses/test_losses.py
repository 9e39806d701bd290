"""Tests of harmonic.losses: closed forms, gradients, properties, dtypes, errors and the module wrappers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import box_iou

from harmonic.losses import (
    HarmonicIoULoss,
    HarmonicLoss,
    TaskContrastingLoss,
    aligned_box_iou,
    class_entropy,
    harmonic_factors,
    harmonic_iou_loss,
    harmonic_loss,
    hiou_from_iou,
    task_contrasting_loss,
    weight_reduce_loss,
)

F64 = torch.float64
HYPOTHESIS = settings(max_examples=150, deadline=None)
HYPOTHESIS_FEW = settings(max_examples=60, deadline=None)


def _random_box_pairs(n: int, seed: int, dtype=torch.float32, scale: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping xyxy pairs: targets with sides in [0.1, 0.6] * scale, predictions jittered around them."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen, dtype=F64) * scale
    wh = (0.1 + 0.5 * torch.rand(n, 2, generator=gen, dtype=F64)) * scale
    target = torch.cat([xy, xy + wh], dim=1)
    pred = target + 0.05 * scale * torch.randn(n, 4, generator=gen, dtype=F64)
    return pred.to(dtype), target.to(dtype)


# ----------------------------------------------------------------------------------------------------
# Harmonic loss, supplement Eq. 1
# ----------------------------------------------------------------------------------------------------
def test_harmonic_loss_hand_values():
    cls = torch.tensor([0.0, math.log(2.0), 1.0, 3.0], dtype=F64)
    reg = torch.tensor([0.0, 0.0, 2.0, 0.5], dtype=F64)
    expected = [
        0.0,
        2.0 * math.log(2.0),  # (1 + e^0) ln 2 + (1 + 1/2) * 0
        (1 + math.exp(-2.0)) * 1.0 + (1 + math.exp(-1.0)) * 2.0,
        (1 + math.exp(-0.5)) * 3.0 + (1 + math.exp(-3.0)) * 0.5,
    ]
    assert harmonic_loss(cls, reg).tolist() == pytest.approx(expected, rel=1e-14, abs=1e-15)


def test_harmonic_loss_matches_eq1_closed_form(device):
    gen = torch.Generator().manual_seed(1)
    cls = (torch.rand(257, generator=gen, dtype=F64) * 6.0).to(device)
    reg = (torch.rand(257, generator=gen, dtype=F64) * 6.0).to(device)
    beta_r, beta_c = torch.exp(-reg), torch.exp(-cls)
    expected = (1 + beta_r) * cls + (1 + beta_c) * reg
    for detach in (False, True):  # detaching changes gradients only, never values
        torch.testing.assert_close(harmonic_loss(cls, reg, detach_factors=detach), expected, rtol=1e-14, atol=0)
    cls_factor, reg_factor = harmonic_factors(cls, reg)
    torch.testing.assert_close(cls_factor, 1 + beta_r, rtol=0, atol=0)
    torch.testing.assert_close(reg_factor, 1 + beta_c, rtol=0, atol=0)


@pytest.mark.parametrize("detach_factors", [False, True])
def test_harmonic_loss_gradcheck(detach_factors):
    gen = torch.Generator().manual_seed(2)
    cls = (0.05 + 3 * torch.rand(6, generator=gen, dtype=F64)).requires_grad_(True)
    reg = (0.05 + 3 * torch.rand(6, generator=gen, dtype=F64)).requires_grad_(True)

    def fn(c, r):
        return harmonic_loss(c, r, detach_factors=detach_factors)

    if not detach_factors:
        assert torch.autograd.gradcheck(fn, (cls, reg))
        assert torch.autograd.gradgradcheck(fn, (cls, reg))
        return
    # Detached factors are constants for autograd: the gradient is that of Eq. 1 with the factors frozen
    # at their current values, which gradcheck confirms; finite differences of the loss itself move the
    # factors too, so gradcheck against the unfrozen loss must fail.
    cls_factor, reg_factor = harmonic_factors(cls.detach(), reg.detach())
    frozen = lambda c, r: cls_factor * c + reg_factor * r  # noqa: E731
    assert torch.autograd.gradcheck(frozen, (cls, reg))
    analytic = torch.autograd.grad(fn(cls, reg).sum(), (cls, reg))
    expected = torch.autograd.grad(frozen(cls, reg).sum(), (cls, reg))
    for a, e in zip(analytic, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert not torch.autograd.gradcheck(fn, (cls, reg), raise_exception=False)


def test_harmonic_loss_gradients_with_and_without_detached_factors(device):
    gen = torch.Generator().manual_seed(3)
    c0 = (torch.rand(64, generator=gen, dtype=F64) * 4).to(device)
    r0 = (torch.rand(64, generator=gen, dtype=F64) * 4).to(device)

    cls, reg = c0.clone().requires_grad_(True), r0.clone().requires_grad_(True)
    gc, gr = torch.autograd.grad(harmonic_loss(cls, reg, detach_factors=True, reduction="sum"), (cls, reg))
    torch.testing.assert_close(gc, 1 + torch.exp(-r0), rtol=0, atol=0)  # d/dcls = 1 + beta_r exactly
    torch.testing.assert_close(gr, 1 + torch.exp(-c0), rtol=0, atol=0)  # d/dreg = 1 + beta_c exactly

    cls, reg = c0.clone().requires_grad_(True), r0.clone().requires_grad_(True)
    gc, gr = torch.autograd.grad(harmonic_loss(cls, reg, reduction="sum"), (cls, reg))
    # supplement Eq. 8: dF/dx = 1 + e^-y - y e^-x (and symmetrically for the regression loss)
    torch.testing.assert_close(gc, (1 + torch.exp(-r0)) - torch.exp(-c0) * r0, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(gr, (1 + torch.exp(-c0)) - torch.exp(-r0) * c0, rtol=1e-14, atol=1e-15)
    # the extra term is really there: the two gradients differ wherever the other loss is non-zero
    assert (gc - (1 + torch.exp(-r0))).abs().min() > 0


def test_harmonic_loss_reductions():
    cls = torch.tensor([0.2, 1.5, 0.7])
    reg = torch.tensor([0.3, 0.0, 2.0])
    per_sample = harmonic_loss(cls, reg)
    assert per_sample.shape == (3,)
    torch.testing.assert_close(harmonic_loss(cls, reg, reduction="sum"), per_sample.sum())
    torch.testing.assert_close(harmonic_loss(cls, reg, reduction="mean"), per_sample.sum() / 3)
    assert harmonic_loss(cls, reg, reduction="mean").dim() == 0


def test_harmonic_loss_bad_input_errors():
    cls, reg = torch.rand(3), torch.rand(3)
    with pytest.raises(ValueError, match="'avg'"):
        harmonic_loss(cls, reg, reduction="avg")
    with pytest.raises(ValueError, match=r"cls_loss and reg_loss must have the same shape.*\(3,\).*\(4,\)"):
        harmonic_loss(cls, torch.rand(4))
    with pytest.raises(TypeError, match="reg_loss must be a torch.Tensor, got list"):
        harmonic_loss(cls, [0.1, 0.2, 0.3])
    with pytest.raises(TypeError, match="cls_loss must be a floating-point tensor.*int64"):
        harmonic_loss(torch.arange(3), reg)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_harmonic_loss_empty_input_is_a_connected_zero(reduction):
    cls = torch.zeros(0, requires_grad=True)
    reg = torch.zeros(0, requires_grad=True)
    out = harmonic_loss(cls, reg, reduction=reduction)
    assert out.dim() == 0 and out.item() == 0.0 and not torch.isnan(out)
    assert out.grad_fn is not None
    out.backward()
    assert cls.grad is not None and cls.grad.shape == (0,)
    assert reg.grad is not None and reg.grad.shape == (0,)


@HYPOTHESIS
@given(st.lists(st.tuples(st.floats(0, 1e6), st.floats(0, 1e6)), min_size=1, max_size=16))
def test_harmonic_factors_in_one_to_two(pairs):
    cls = torch.tensor([p[0] for p in pairs], dtype=F64)
    reg = torch.tensor([p[1] for p in pairs], dtype=F64)
    for factor, loss in zip(harmonic_factors(cls, reg), (reg, cls)):
        assert ((factor >= 1) & (factor <= 2)).all()
        # strictly above 1 wherever exp(-loss) is representable next to 1 in float64
        assert (factor[loss <= 30] > 1).all()
        assert (factor[loss == 0] == 2).all()


# ----------------------------------------------------------------------------------------------------
# Harmonic IoU loss, supplement Eq. 11-13
# ----------------------------------------------------------------------------------------------------
@HYPOTHESIS
@given(gamma=st.floats(-4.0, 1.0), ious=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=32))
def test_hiou_monotone_non_increasing_for_gamma_at_most_one(gamma, ious):
    grid = torch.linspace(0, 1, 2001, dtype=F64)
    assert (hiou_from_iou(grid, gamma).diff() <= 0).all()
    iou = torch.tensor(sorted(ious), dtype=F64)
    assert (hiou_from_iou(iou, gamma).diff() <= 1e-12).all()
    # and the derivative (corrected Eq. 12) is non-positive on the grid
    x = grid.clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(hiou_from_iou(x, gamma).sum(), x)
    assert (slope <= 0).all()


@HYPOTHESIS
@given(gamma=st.floats(1.01, 6.0))
def test_hiou_not_monotone_for_gamma_above_one(gamma):
    peak = (gamma - 1) / (gamma + 1)  # Eq. 13: the loss rises on [0, peak)
    values = hiou_from_iou(torch.tensor([0.0, peak], dtype=F64), gamma)
    assert values[1] > values[0] == 1.0
    grid = torch.linspace(0, 1, 2001, dtype=F64)
    assert (hiou_from_iou(grid, gamma).diff() > 0).any()


def test_hiou_not_monotone_hand_value():
    # gamma = 2: (1.2)^2 * 0.8 = 1.152 > 1 = HIoU(0)
    assert hiou_from_iou(torch.tensor(0.2, dtype=F64), 2.0).item() == pytest.approx(1.152, rel=1e-14)


@HYPOTHESIS
@given(gamma=st.floats(-4.0, 6.0))
def test_hiou_endpoints_exact(gamma):
    for dtype in (torch.float32, F64):
        values = hiou_from_iou(torch.tensor([0.0, 1.0], dtype=dtype), gamma)
        assert values.tolist() == [1.0, 0.0]


def test_harmonic_iou_loss_endpoints_on_boxes(device):
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 1.0, 1.0]], device=device)
    target = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [1.0, 0.0, 2.0, 1.0]], device=device)
    assert harmonic_iou_loss(pred, target).tolist() == [0.0, 1.0, 1.0]  # identical, disjoint, touching


def test_harmonic_iou_loss_hand_value(device):
    # IoU of [0,0,2,2] and [1,0,3,2] is 2 / 6 = 1/3
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=F64, device=device)
    target = torch.tensor([[1.0, 0.0, 3.0, 2.0]], dtype=F64, device=device)
    assert aligned_box_iou(pred, target).item() == pytest.approx(1 / 3, rel=1e-15)
    expected = (4 / 3) ** 0.8 * (2 / 3)
    assert harmonic_iou_loss(pred, target).item() == pytest.approx(expected, rel=1e-14)
    assert harmonic_iou_loss(pred, target, gamma=0.0).item() == pytest.approx(2 / 3, rel=1e-14)  # plain 1 - IoU


@HYPOTHESIS_FEW
@given(gamma=st.floats(1.0, 1e6, exclude_min=True))
def test_harmonic_iou_loss_rejects_gamma_above_one(gamma):
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"gamma=.*monotonically decreasing.*Eq\. 12-13"):
        harmonic_iou_loss(boxes, boxes, gamma=gamma)
    with pytest.raises(ValueError, match="monotonically"):
        HarmonicIoULoss(gamma=gamma)


def test_harmonic_iou_loss_gamma_and_box_errors():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert harmonic_iou_loss(boxes, boxes, gamma=1.0).item() == 0.0  # gamma = 1 is allowed
    assert harmonic_iou_loss(boxes, boxes + 5, gamma=-2.0).item() == 1.0  # negative gamma is allowed
    with pytest.raises(ValueError, match="gamma must be finite"):
        harmonic_iou_loss(boxes, boxes, gamma=float("nan"))
    with pytest.raises(TypeError, match="gamma must be a real number"):
        harmonic_iou_loss(boxes, boxes, gamma="0.8x")
    with pytest.raises(TypeError, match="pred_boxes must be a torch.Tensor"):
        harmonic_iou_loss([[0, 0, 1, 1]], boxes)
    with pytest.raises(TypeError, match="target_boxes must be a floating-point tensor"):
        harmonic_iou_loss(boxes, boxes.long())
    with pytest.raises(ValueError, match=r"target_boxes must have shape \[N, 4\].*\(1, 5\)"):
        harmonic_iou_loss(boxes, torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"pred_boxes and target_boxes must have the same shape"):
        harmonic_iou_loss(boxes, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        harmonic_iou_loss(boxes, boxes, eps=0.0)
    with pytest.raises(ValueError, match="'median'"):
        harmonic_iou_loss(boxes, boxes, reduction="median")


def test_harmonic_iou_loss_gradcheck():
    pred, target = _random_box_pairs(5, seed=4, dtype=F64, scale=10.0)
    pred.requires_grad_(True)
    target.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, t: harmonic_iou_loss(p, t, gamma=0.8), (pred, target))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_harmonic_iou_loss_empty_input_is_a_connected_zero(reduction):
    pred = torch.zeros(0, 4, requires_grad=True)
    out = harmonic_iou_loss(pred, torch.zeros(0, 4), reduction=reduction)
    assert out.item() == 0.0 and out.grad_fn is not None
    out.backward()
    assert pred.grad is not None and pred.grad.shape == (0, 4)


def test_harmonic_iou_loss_reductions():
    pred, target = _random_box_pairs(10, seed=5)
    per_pair = harmonic_iou_loss(pred, target)
    assert per_pair.shape == (10,)
    torch.testing.assert_close(harmonic_iou_loss(pred, target, reduction="sum"), per_pair.sum())
    torch.testing.assert_close(harmonic_iou_loss(pred, target, reduction="mean"), per_pair.mean())


# Box pairs for the finiteness property: arbitrary corners, plus pairs built to hit the hard cases.
RELATIONS = ("random", "identical", "zero_width", "inverted", "touching", "same_point")


@st.composite
def box_pairs(draw, coordinate):
    pred, target = [], []
    for _ in range(draw(st.integers(1, 6))):
        p = [draw(coordinate) for _ in range(4)]
        relation = draw(st.sampled_from(RELATIONS))
        if relation == "random":
            t = [draw(coordinate) for _ in range(4)]
        elif relation == "identical":
            t = list(p)
        elif relation == "zero_width":
            t = [p[0], p[1], p[0], draw(coordinate)]
        elif relation == "inverted":  # the same box, corners swapped
            t = [p[2], p[3], p[0], p[1]]
        elif relation == "touching":  # shares the edge x = max(x1, x2) of p, no overlap
            t = [max(p[0], p[2]), p[1], draw(coordinate), p[3]]
        else:
            p = [p[0], p[1], p[0], p[1]]
            t = list(p)
        pred.append(p)
        target.append(t)
    return pred, target


def _loss_and_gradients(pred_list, target_list, dtype):
    pred = torch.tensor(pred_list, dtype=dtype).requires_grad_(True)
    target = torch.tensor(target_list, dtype=dtype).requires_grad_(True)
    assert torch.isfinite(pred).all() and torch.isfinite(target).all()
    iou = aligned_box_iou(pred, target)
    loss = harmonic_iou_loss(pred, target, gamma=0.8)
    loss.sum().backward()
    return iou, loss, pred.grad, target.grad


def _check_finite_loss_and_gradients(pred_list, target_list, dtype):
    iou, loss, *grads = _loss_and_gradients(pred_list, target_list, dtype)
    assert iou.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.isfinite(iou).all() and ((iou >= 0) & (iou <= 1 + 1e-6)).all()
    assert torch.isfinite(loss).all() and ((loss >= -1e-6) & (loss <= 1)).all()
    if dtype == torch.float32:
        assert all(torch.isfinite(g).all() for g in grads)
        return
    # Low-precision leaves: the loss is computed in float32 from the upcast boxes, so it and its float32
    # gradient must equal those of float32 leaves holding the same values. The gradient is then cast back
    # to the leaf's dtype, where it can only overflow (to inf, never NaN) if its true magnitude exceeds
    # that dtype's range, as for boxes a few 1e-8 thin in fp16 (|dIoU/dx| ~ side / union).
    pred32 = torch.tensor(pred_list, dtype=dtype).float().tolist()
    target32 = torch.tensor(target_list, dtype=dtype).float().tolist()
    iou32, loss32, *grads32 = _loss_and_gradients(pred32, target32, torch.float32)
    assert torch.equal(iou, iou32) and torch.equal(loss, loss32)
    representable = 0.5 * torch.finfo(dtype).max
    for g, g32 in zip(grads, grads32):
        assert torch.isfinite(g32).all() and not torch.isnan(g).any()
        fits = g32.abs() < representable
        torch.testing.assert_close(g[fits], g32[fits].to(dtype), rtol=0, atol=0)


FINITE_F32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
FP16_RANGE = st.one_of(st.floats(-100.0, 100.0, width=16), st.floats(-65504.0, 65504.0, width=16))


@HYPOTHESIS
@given(pairs=box_pairs(FINITE_F32))
def test_harmonic_iou_loss_finite_for_any_finite_float32_boxes(pairs):
    _check_finite_loss_and_gradients(*pairs, dtype=torch.float32)


@HYPOTHESIS
@given(pairs=box_pairs(FP16_RANGE), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_harmonic_iou_loss_finite_for_boxes_in_fp16_range(pairs, dtype):
    _check_finite_loss_and_gradients(*pairs, dtype=dtype)


def test_harmonic_iou_loss_beyond_float32_area_range():
    # (4e20)^2 overflows float32: the pair is rescaled, so IoU = 1/3 as for [0,0,2,2] vs [1,0,3,2]
    pred = torch.tensor([[0.0, 0.0, 2e20, 2e20], [-3e38, -3e38, 3e38, 3e38]], requires_grad=True)
    target = torch.tensor([[1e20, 0.0, 3e20, 2e20], [-3e38, -3e38, 3e38, 3e38]])
    torch.testing.assert_close(aligned_box_iou(pred, target), torch.tensor([1 / 3, 1.0]))
    harmonic_iou_loss(pred, target).sum().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[0].abs().sum() > 0


@HYPOTHESIS
@given(
    corners=st.lists(
        st.tuples(*[st.floats(-1e3, 1e3)] * 2, *[st.floats(1e-2, 1e3)] * 2, *[st.floats(-1e3, 1e3)] * 2,
                  *[st.floats(1e-2, 1e3)] * 2),
        min_size=1,
        max_size=12,
    )
)
def test_aligned_box_iou_matches_torchvision_diagonal(corners):
    c = torch.tensor(corners, dtype=F64)
    pred = torch.cat([c[:, 0:2], c[:, 0:2] + c[:, 2:4]], dim=1)
    target = torch.cat([c[:, 4:6], c[:, 4:6] + c[:, 6:8]], dim=1)
    torch.testing.assert_close(aligned_box_iou(pred, target), box_iou(pred, target).diagonal(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(
        aligned_box_iou(pred.float(), target.float()), box_iou(pred.float(), target.float()).diagonal(),
        rtol=1e-5, atol=1e-6,
    )


def test_aligned_box_iou_inverted_and_degenerate_boxes():
    pred = torch.tensor([[2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    target = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 5.0]])
    # an inverted box is the box it spans; two identical zero-area boxes have IoU 0 (documented)
    assert aligned_box_iou(pred, target).tolist() == [1.0, 0.0, 0.0]


# ----------------------------------------------------------------------------------------------------
# dtypes and autocast
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_boxes_give_float32_matching_float64(dtype, device):
    pred, target = _random_box_pairs(128, seed=6, dtype=dtype)
    iou = aligned_box_iou(pred.to(device), target.to(device))
    loss = harmonic_iou_loss(pred.to(device), target.to(device))
    assert iou.dtype == torch.float32 and loss.dtype == torch.float32
    ref_iou = aligned_box_iou(pred.double(), target.double())  # the same (rounded) boxes, float64
    ref_loss = harmonic_iou_loss(pred.double(), target.double())
    assert ref_iou.dtype == F64
    torch.testing.assert_close(iou.cpu().double(), ref_iou, rtol=0, atol=2e-6)
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=0, atol=2e-6)


def test_large_fp16_boxes_do_not_overflow(device):
    pred = torch.tensor([[1e4, 1e4, 6e4, 6e4], [2e4, 1e4, 6.5e4, 5e4]], dtype=torch.float16, device=device)
    target = torch.tensor([[1.5e4, 1e4, 6.5e4, 6e4], [1e4, 2e4, 6e4, 6.5e4]], dtype=torch.float16, device=device)
    naive_area = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    assert torch.isinf(naive_area).all()  # what the upcast prevents
    iou = aligned_box_iou(pred, target)
    ref = aligned_box_iou(pred.double(), target.double())
    assert torch.isfinite(iou).all() and (iou > 0.4).all()
    torch.testing.assert_close(iou.cpu().double(), ref.cpu(), rtol=1e-6, atol=0)


def test_mixed_input_dtypes_promote():
    pred, target = _random_box_pairs(4, seed=7)
    assert aligned_box_iou(pred.half(), target.double()).dtype == F64
    assert aligned_box_iou(pred.half(), target.bfloat16()).dtype == torch.float32
    assert task_contrasting_loss(torch.rand(3, dtype=F64), torch.rand(3)).dtype == F64
    assert task_contrasting_loss(torch.rand(3).half(), torch.rand(3).half()).dtype == torch.float32
    assert class_entropy(torch.zeros(2, 3, dtype=F64)).dtype == F64


def test_cpu_bf16_autocast_gives_the_float32_result():
    pred, target = _random_box_pairs(64, seed=8)
    ref_iou, ref_loss = aligned_box_iou(pred, target), harmonic_iou_loss(pred, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(pred, target.T).dtype == torch.bfloat16  # autocast is really on
        iou = aligned_box_iou(pred, target)
        loss = harmonic_iou_loss(pred, target)
    assert iou.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.equal(iou, ref_iou) and torch.equal(loss, ref_loss)


# ----------------------------------------------------------------------------------------------------
# Task-contrasting term [R] and the class entropy
# ----------------------------------------------------------------------------------------------------
SCORES = [0.9, 0.5, 0.3, 0.5]
IOUS = [0.5, 0.6, 0.3, 0.2]  # gaps 0.4, 0.1, 0.0, 0.3


@pytest.mark.parametrize(
    "form, expected",
    [("margin", [0.2, 0.0, 0.0, 0.1]), ("gate", [0.4, 0.0, 0.0, 0.3])],
)
def test_task_contrasting_forms_hand_values(form, expected, device):
    scores = torch.tensor(SCORES, dtype=F64, device=device, requires_grad=True)
    ious = torch.tensor(IOUS, dtype=F64, device=device, requires_grad=True)
    loss = task_contrasting_loss(scores, ious, margin=0.2, form=form)
    # no entropy means H = 0, weight 1 / (1 + e^0) = 1/2
    torch.testing.assert_close(loss.cpu(), 0.5 * torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-15)
    loss.sum().backward()
    torch.testing.assert_close(scores.grad.cpu(), torch.tensor([0.5, 0.0, 0.0, 0.5], dtype=F64))
    torch.testing.assert_close(ious.grad.cpu(), torch.tensor([-0.5, 0.0, 0.0, -0.5], dtype=F64))


def test_task_contrasting_entropy_weighting():
    scores = torch.tensor(SCORES, dtype=F64)
    ious = torch.tensor(IOUS, dtype=F64)
    entropy = torch.tensor([0.0, math.log(2.0), 1.0, 3.0], dtype=F64, requires_grad=True)
    loss = task_contrasting_loss(scores, ious, entropy, margin=0.2, form="margin")
    weights = [0.5, 1 / 3, 1 / (1 + math.e), 1 / (1 + math.exp(3.0))]
    expected = [t * w for t, w in zip([0.2, 0.0, 0.0, 0.1], weights)]
    assert loss.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert not loss.requires_grad  # the entropy weight is a constant [D]; scores and ious need no grad here
    torch.testing.assert_close(
        task_contrasting_loss(scores, ious, entropy, reduction="sum"), torch.tensor(sum(expected), dtype=F64)
    )


def test_task_contrasting_errors():
    s, i = torch.rand(3), torch.rand(3)
    with pytest.raises(ValueError, match="'soft'"):
        task_contrasting_loss(s, i, form="soft")
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        task_contrasting_loss(s, i, margin=-0.1)
    with pytest.raises(ValueError, match="scores and entropy must have the same shape"):
        task_contrasting_loss(s, i, torch.rand(4))
    with pytest.raises(ValueError, match="scores and ious must have the same shape"):
        task_contrasting_loss(s, torch.rand(2))
    with pytest.raises(TypeError, match="entropy must be a torch.Tensor"):
        task_contrasting_loss(s, i, [0.1, 0.2, 0.3])


def test_class_entropy_softmax_is_minus_sum_p_log_p(device):
    logits = torch.randn(32, 7, generator=torch.Generator().manual_seed(9), dtype=F64).to(device) * 3
    p = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(class_entropy(logits), -(p * torch.log(p)).sum(-1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("num_classes", [2, 5, 80])
def test_class_entropy_uniform_logits_give_log_k(kind, num_classes):
    logits = torch.full((3, num_classes), 1.7)
    torch.testing.assert_close(class_entropy(logits, kind=kind), torch.full((3,), math.log(num_classes)))


def test_class_entropy_sigmoid_renormalizes_sigmoid_probabilities():
    logits = torch.randn(16, 5, generator=torch.Generator().manual_seed(10), dtype=F64) * 4
    q = torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True)
    torch.testing.assert_close(class_entropy(logits, kind="sigmoid"), -(q * q.log()).sum(-1), rtol=1e-12, atol=1e-14)
    # documented consequence: all-low scores still renormalize to (nearly) uniform; one confident class -> ~0
    extreme = torch.tensor([[-100.0, -100.0, -100.0], [100.0, -100.0, -100.0]])
    out = class_entropy(extreme, kind="sigmoid")
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(math.log(3), rel=1e-6)
    assert out[1].item() < 1e-6
    assert class_entropy(extreme, kind="softmax")[1].item() < 1e-6


@HYPOTHESIS_FEW
@given(st.lists(st.floats(-50, 50), min_size=2, max_size=10), st.sampled_from(["softmax", "sigmoid"]))
def test_class_entropy_within_zero_and_log_k(row, kind):
    h = class_entropy(torch.tensor([row], dtype=F64), kind=kind)
    assert -1e-12 <= h.item() <= math.log(len(row)) + 1e-12


def test_class_entropy_errors():
    with pytest.raises(ValueError, match=r"logits must have shape \[N, K\]"):
        class_entropy(torch.zeros(5))
    with pytest.raises(ValueError, match="'tanh'"):
        class_entropy(torch.zeros(2, 3), kind="tanh")
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        class_entropy(torch.zeros(2, 3, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------
# Weighted reduction and the nn.Module wrappers
# ----------------------------------------------------------------------------------------------------
CLS = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
REG = torch.tensor([0.1, 0.4, 0.0], dtype=F64)
WEIGHT = torch.tensor([1.0, 0.0, 2.0], dtype=F64)


def test_harmonic_loss_module_weight_avg_factor_loss_weight():
    per = harmonic_loss(CLS, REG)
    module = HarmonicLoss()
    torch.testing.assert_close(module(CLS, REG), per.mean())
    torch.testing.assert_close(module(CLS, REG, weight=WEIGHT), (per * WEIGHT).mean())
    torch.testing.assert_close(module(CLS, REG, weight=WEIGHT, avg_factor=4.0), (per * WEIGHT).sum() / 4)
    avg = torch.tensor(4.0, dtype=F64)
    torch.testing.assert_close(module(CLS, REG, weight=WEIGHT, avg_factor=avg), (per * WEIGHT).sum() / 4)
    torch.testing.assert_close(module(CLS, REG, reduction_override="sum"), per.sum())
    torch.testing.assert_close(module(CLS, REG, weight=WEIGHT, reduction_override="none"), per * WEIGHT)
    scaled = HarmonicLoss(loss_weight=2.5, reduction="sum")
    torch.testing.assert_close(scaled(CLS, REG), 2.5 * per.sum())
    torch.testing.assert_close(scaled(CLS, REG, avg_factor=2.0, reduction_override="mean"), 2.5 * per.sum() / 2)


def test_harmonic_loss_module_detach_factors():
    cls, reg = CLS.clone().requires_grad_(True), REG.clone().requires_grad_(True)
    HarmonicLoss(detach_factors=True, reduction="sum")(cls, reg).backward()
    torch.testing.assert_close(cls.grad, 1 + torch.exp(-REG), rtol=0, atol=0)


def test_module_reduction_errors():
    with pytest.raises(ValueError, match='avg_factor can only be used with reduction="mean"'):
        HarmonicLoss(reduction="sum")(CLS, REG, avg_factor=2.0)
    with pytest.raises(ValueError, match="avg_factor"):
        HarmonicLoss()(CLS, REG, avg_factor=2.0, reduction_override="sum")
    with pytest.raises(ValueError, match="avg_factor must be a finite number > 0"):
        HarmonicLoss()(CLS, REG, avg_factor=0)
    with pytest.raises(ValueError, match="'avg'"):
        HarmonicLoss()(CLS, REG, reduction_override="avg")
    with pytest.raises(ValueError, match="''"):
        HarmonicLoss()(CLS, REG, reduction_override="")
    with pytest.raises(ValueError, match="'bogus'"):
        HarmonicLoss(reduction="bogus")
    with pytest.raises(ValueError, match=r"weight of shape \(3, 1\) does not broadcast to the loss shape \(3,\)"):
        HarmonicLoss()(CLS, REG, weight=WEIGHT[:, None])  # would silently become a [3, 3] outer product
    with pytest.raises(ValueError, match=r"weight of shape \(2,\)"):
        HarmonicLoss()(CLS, REG, weight=torch.ones(2, dtype=F64))


def test_weight_reduce_loss_broadcast_and_avg_factor_semantics():
    loss = torch.arange(6, dtype=F64).reshape(2, 3)
    weight = torch.tensor([[1.0], [2.0]], dtype=F64)  # [2, 1] broadcasts to [2, 3] without enlarging it
    torch.testing.assert_close(weight_reduce_loss(loss, weight, "sum"), torch.tensor(3.0 + 24.0, dtype=F64))
    torch.testing.assert_close(weight_reduce_loss(loss, None, "none", avg_factor=7.0), loss)  # ignored
    # a tensor avg_factor of 0 (no positives) with a zero sum gives 0, not NaN
    empty = torch.zeros(0, requires_grad=True)
    out = weight_reduce_loss(empty * 2, None, "mean", avg_factor=torch.tensor(0.0))
    assert out.item() == 0.0 and out.grad_fn is not None


def test_iou_module_weight_avg_factor_and_empty():
    pred, target = _random_box_pairs(5, seed=11, dtype=F64)
    per = harmonic_iou_loss(pred, target, gamma=0.5)
    weight = torch.tensor([1.0, 2.0, 0.0, 1.0, 0.5], dtype=F64)
    module = HarmonicIoULoss(gamma=0.5, loss_weight=1.5)
    torch.testing.assert_close(module(pred, target), 1.5 * per.mean())
    torch.testing.assert_close(module(pred, target, weight=weight, avg_factor=3.0), 1.5 * (per * weight).sum() / 3)
    with pytest.raises(ValueError, match="avg_factor"):
        module(pred, target, avg_factor=3.0, reduction_override="sum")
    assert "gamma=0.5" in repr(module) and "loss_weight=1.5" in repr(module)
    empty = torch.zeros(0, 4, requires_grad=True)
    out = module(empty, torch.zeros(0, 4), avg_factor=1.0)
    assert out.item() == 0.0
    out.backward()
    assert empty.grad.shape == (0, 4)


def test_task_contrasting_module():
    scores = torch.tensor(SCORES, dtype=F64)
    ious = torch.tensor(IOUS, dtype=F64)
    entropy = torch.tensor([0.0, 1.0, 2.0, math.log(3.0)], dtype=F64)
    per = task_contrasting_loss(scores, ious, entropy, form="gate")
    torch.testing.assert_close(per, torch.tensor([0.2, 0.0, 0.0, 0.3 / 4], dtype=F64))
    module = TaskContrastingLoss(form="gate", loss_weight=2.0)
    torch.testing.assert_close(module(scores, ious, entropy, avg_factor=2.0), 2.0 * per.sum() / 2)
    torch.testing.assert_close(module(scores, ious, entropy, reduction_override="sum"), 2.0 * per.sum())
    with pytest.raises(ValueError, match="'hinge'"):
        TaskContrastingLoss(form="hinge")


# ----------------------------------------------------------------------------------------------------
# CUDA: the same values as on the CPU, fp16 on the device
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(dtype):
    pred, target = _random_box_pairs(256, seed=12, dtype=dtype, scale=5e3)
    cuda = torch.device("cuda")
    cpu_loss = harmonic_iou_loss(pred, target)
    cuda_loss = harmonic_iou_loss(pred.to(cuda), target.to(cuda))
    assert cuda_loss.dtype == torch.float32 and cuda_loss.device.type == "cuda"
    torch.testing.assert_close(cuda_loss.cpu(), cpu_loss, rtol=1e-5, atol=1e-6)
    ref = harmonic_iou_loss(pred.double(), target.double())
    torch.testing.assert_close(cuda_loss.cpu().double(), ref, rtol=0, atol=1e-5)

    pred_grad = pred.to(cuda).requires_grad_(True)
    harmonic_iou_loss(pred_grad, target.to(cuda), reduction="sum").backward()
    assert torch.isfinite(pred_grad.grad).all()

    cls, reg = torch.rand(64, dtype=dtype) * 3, torch.rand(64, dtype=dtype) * 3
    torch.testing.assert_close(harmonic_loss(cls.to(cuda), reg.to(cuda)).cpu(), harmonic_loss(cls, reg), rtol=2e-3, atol=1e-3)
    logits = torch.randn(16, 5, dtype=dtype)
    for kind in ("softmax", "sigmoid"):
        torch.testing.assert_close(class_entropy(logits.to(cuda), kind=kind).cpu(), class_entropy(logits, kind=kind))
    scores, ious = torch.rand(64, dtype=dtype), torch.rand(64, dtype=dtype)
    torch.testing.assert_close(
        task_contrasting_loss(scores.to(cuda), ious.to(cuda), form="gate").cpu(),
        task_contrasting_loss(scores, ious, form="gate"),
    )
