"""harmonic.models.head_loss: the Harmonic loss composed on per-sample host losses, checked against hand composition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from harmonic.losses import (
    aligned_box_iou,
    class_entropy,
    harmonic_iou_loss,
    harmonic_loss,
    task_contrasting_loss,
)
from harmonic.models.head_loss import (
    HarmonicOptions,
    dense_harmonic_loss,
    localization_loss,
    softmax_harmonic_loss,
    split_losses_and_stats,
)
from harmonic.ops.focal import focal_loss_per_anchor_reference, select_focal_loss

GT = torch.tensor([-1, 0, 2, -1, 1, -1, -1])  # 3 positives among 7 anchors, K = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _case(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(7, 3, generator=g, dtype=dtype).requires_grad_()
    box_loss = torch.rand(3, generator=g, dtype=dtype).mul(2).requires_grad_()
    target = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 15.0], [2.0, 3.0, 8.0, 9.0]], dtype=dtype)
    pred = (target + torch.randn(3, 4, generator=g, dtype=dtype)).requires_grad_()
    return logits, box_loss, pred, target


def test_focal_reference_is_torchvision_sigmoid_focal_loss_summed_over_classes():
    logits, *_ = _case()
    one_hot = torch.zeros(7, 3, dtype=logits.dtype)
    one_hot[[1, 2, 4], [0, 2, 1]] = 1.0
    expected = sigmoid_focal_loss(logits, one_hot, alpha=0.25, gamma=2.0, reduction="none").sum(1)
    torch.testing.assert_close(focal_loss_per_anchor_reference(logits, GT), expected, rtol=0, atol=0)
    expected_a = sigmoid_focal_loss(logits, one_hot, alpha=0.5, gamma=1.0, reduction="none").sum(1)
    torch.testing.assert_close(focal_loss_per_anchor_reference(logits, GT, 0.5, 1.0), expected_a, rtol=0, atol=0)


@pytest.mark.parametrize("hiou", [False, True])
def test_dense_loss_equals_hand_composed_harmonic_loss(hiou):
    logits, box_loss, pred, target = _case()
    out = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=3, options=HarmonicOptions(hiou=hiou))
    focal = focal_loss_per_anchor_reference(logits, GT)
    positive, negative = GT >= 0, GT < 0
    ce = focal[positive]
    loc = box_loss + (1.5 * harmonic_iou_loss(pred, target, gamma=0.8) if hiou else 0.0)
    total = (focal[negative].sum() + harmonic_loss(ce, loc).sum()) / 3
    torch.testing.assert_close(out["classification"] + out["bbox_regression"], total)
    torch.testing.assert_close(out["classification"], (focal[negative].sum() + ((1 + torch.exp(-loc)) * ce).sum()) / 3)
    torch.testing.assert_close(out["bbox_regression"], ((1 + torch.exp(-ce)) * loc).sum() / 3)
    torch.testing.assert_close(out["beta_r"], torch.exp(-loc).mean().float(), check_dtype=False)
    torch.testing.assert_close(out["beta_c"], torch.exp(-ce).mean().float(), check_dtype=False)
    assert float(out["num_positives"]) == 3.0
    assert "task_contrasting" not in out
    assert 0 < float(out["beta_r"]) <= 1 and 0 < float(out["beta_c"]) <= 1


def test_num_foreground_is_floored_at_one_and_per_anchor_divisors_average_images():
    logits, box_loss, pred, target = _case()
    low = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=0, options=HarmonicOptions(hiou=False))
    one = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=1, options=HarmonicOptions(hiou=False))
    torch.testing.assert_close(low["classification"], one["classification"])
    # two "images": anchors 0-3 (2 positives) and 4-6 (1 positive); mean of per-image sums / n_b
    divisors = torch.tensor([2.0] * 4 + [1.0] * 3) * 2
    batched = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=divisors, options=HarmonicOptions(hiou=False))
    first = dense_harmonic_loss(logits[:4], GT[:4], box_loss[:2], pred[:2], target[:2], num_foreground=2, options=HarmonicOptions(hiou=False))
    second = dense_harmonic_loss(logits[4:], GT[4:], box_loss[2:], pred[2:], target[2:], num_foreground=1, options=HarmonicOptions(hiou=False))
    for key in ("classification", "bbox_regression"):
        torch.testing.assert_close(batched[key], (first[key] + second[key]) / 2)


def test_detach_factors_changes_gradients_not_values():
    grads, values = {}, {}
    for detach in (False, True):
        logits, box_loss, pred, target = _case()
        out = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=3, options=HarmonicOptions(hiou=False, detach_factors=detach))
        total = out["classification"] + out["bbox_regression"]
        total.backward()
        values[detach], grads[detach] = total.detach(), (logits.grad.clone(), box_loss.grad.clone())
        ce = focal_loss_per_anchor_reference(logits.detach(), GT)[GT >= 0]
        # d total / d L_i: (1 + e^{-CE}) / n with constant factors, plus -e^{-L} CE / n through beta_r (Eq. 5)
        expected = (1 + torch.exp(-ce)) / 3 - (0 if detach else torch.exp(-box_loss.detach()) * ce / 3)
        torch.testing.assert_close(box_loss.grad, expected)
    torch.testing.assert_close(values[False], values[True])
    assert not torch.allclose(grads[False][0], grads[True][0])


def test_gt_prob_source_sets_beta_c_to_the_gt_class_probability():
    logits, box_loss, pred, target = _case()
    by_loss = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=3, options=HarmonicOptions(hiou=False))
    out = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=3, options=HarmonicOptions(hiou=False, beta_c_source="gt_prob"))
    positive = torch.where(GT >= 0)[0]
    p_gt = torch.sigmoid(logits[positive, GT[positive]])
    torch.testing.assert_close(out["beta_c"], p_gt.mean().float(), check_dtype=False)
    torch.testing.assert_close(out["bbox_regression"], ((1 + p_gt) * box_loss).sum() / 3)
    torch.testing.assert_close(out["classification"], by_loss["classification"])  # CE term stays the focal sum
    assert not torch.allclose(out["bbox_regression"], by_loss["bbox_regression"])


@pytest.mark.parametrize("iou_loss", ["hiou", "giou"])
def test_without_factors_the_loss_is_focal_plus_l1_plus_the_iou_term(iou_loss):
    logits, box_loss, pred, target = _case()
    options = HarmonicOptions(factors=False, iou_loss=iou_loss)
    out = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=3, options=options)
    focal = focal_loss_per_anchor_reference(logits, GT)
    term = harmonic_iou_loss(pred, target, gamma=0.8) if iou_loss == "hiou" else generalized_box_iou_loss(pred, target)
    torch.testing.assert_close(out["classification"], focal.sum() / 3)
    torch.testing.assert_close(out["bbox_regression"], (box_loss + 1.5 * term).sum() / 3)
    # the factors the loss would apply are still reported, and the watch marks them as not applied
    loc = box_loss.detach() + 1.5 * term.detach()
    torch.testing.assert_close(out["beta_r"], torch.exp(-loc).mean(), check_dtype=False)
    assert out["watch/counterfactual"].item() == 1.0
    (out["classification"] + out["bbox_regression"]).backward()
    torch.testing.assert_close(box_loss.grad, torch.full_like(box_loss, 1 / 3))  # no factor on L_loc
    logits, box_loss, pred, target = _case()
    with_factors = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=3,
                                       options=HarmonicOptions(iou_loss=iou_loss))
    assert not torch.allclose(with_factors["bbox_regression"], out["bbox_regression"].detach())


def test_softmax_loss_without_factors_is_cross_entropy_plus_l_loc():
    logits = torch.randn(5, 4, dtype=torch.float64)
    labels = torch.tensor([0, 2, 0, 3, 1])
    _, box_loss, pred, target = _case()
    out = softmax_harmonic_loss(logits, labels, box_loss, pred, target, normalizer=5,
                                options=HarmonicOptions(hiou=False, factors=False))
    torch.testing.assert_close(out["classification"], F.cross_entropy(logits, labels, reduction="sum") / 5)
    torch.testing.assert_close(out["bbox_regression"], box_loss.sum() / 5)


def test_gt_ce_source_uses_the_same_cross_entropy_in_the_factor_and_its_term():
    logits, box_loss, pred, target = _case()
    out = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=3,
                              options=HarmonicOptions(hiou=False, beta_c_source="gt_ce"))
    positive = torch.where(GT >= 0)[0]
    z = logits[positive, GT[positive]]
    x = F.softplus(-z)  # -log sigmoid(z_gt)
    focal = focal_loss_per_anchor_reference(logits, GT)
    focal_gt = 0.25 * (1 - torch.sigmoid(z)) ** 2 * x  # the ground-truth entry's focal loss
    beta_r = torch.exp(-box_loss)
    expected_cls = (focal.sum() - focal_gt.sum() + ((1 + beta_r) * x).sum()) / 3
    torch.testing.assert_close(out["classification"], expected_cls)
    torch.testing.assert_close(out["bbox_regression"], ((1 + torch.exp(-x)) * box_loss).sum() / 3)
    # d classification / d z_gt: -(1 - p) (1 + beta_r) / n from the cross-entropy, not the focal entry's
    grad = torch.autograd.grad(out["classification"], logits)[0]
    p = torch.sigmoid(z.detach())
    torch.testing.assert_close(grad[positive, GT[positive]], -(1 - p) * (1 + beta_r.detach()) / 3)


def test_task_contrasting_term_is_added_outside_the_factors():
    logits, box_loss, pred, target = _case()
    base = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=3)
    for form in ("margin", "gate"):
        out = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=3, options=HarmonicOptions(tc_weight=2.0, tc_margin=0.1, tc_form=form))
        positive = torch.where(GT >= 0)[0]
        expected = task_contrasting_loss(
            torch.sigmoid(logits[positive, GT[positive]]),
            aligned_box_iou(pred, target),
            class_entropy(logits[positive], kind="sigmoid"),
            margin=0.1,
            form=form,
        ).sum() * 2.0 / 3
        torch.testing.assert_close(out["task_contrasting"], expected, check_dtype=False)
        assert out["task_contrasting"].item() > 0
        torch.testing.assert_close(out["classification"], base["classification"])
        torch.testing.assert_close(out["bbox_regression"], base["bbox_regression"])


def test_no_positives_gives_finite_connected_losses():
    weight = torch.randn(5, 3, requires_grad=True)
    logits = torch.randn(4, 5) @ weight
    box_params = torch.randn(4, 4, requires_grad=True)
    empty = box_params[:0]
    gt = torch.full((4,), -1)
    out = dense_harmonic_loss(logits, gt, empty.sum(1), empty, empty.detach(), num_foreground=0, options=HarmonicOptions(tc_weight=1.0))
    assert out["bbox_regression"].item() == 0.0 and out["bbox_regression"].requires_grad
    torch.testing.assert_close(out["classification"], focal_loss_per_anchor_reference(logits, gt).sum())
    assert out["task_contrasting"].item() == 0.0
    sum(v for k, v in split_losses_and_stats(out)[0].items()).backward()
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
    assert box_params.grad is not None and torch.all(box_params.grad == 0)
    assert "beta_r" not in out and float(out["num_positives"]) == 0.0


def test_degenerate_predicted_boxes_keep_gradients_finite():
    logits, box_loss, _, target = _case(dtype=torch.float32)
    pred = torch.tensor([[3.0, 3.0, 3.0, 3.0], [20.0, 15.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    out = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=3, options=HarmonicOptions(tc_weight=1.0))
    (out["classification"] + out["bbox_regression"] + out["task_contrasting"]).backward()
    assert torch.isfinite(pred.grad).all() and torch.isfinite(logits.grad).all()


def test_softmax_loss_has_beta_c_equal_to_the_class_probability():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 0, 3, 1, 0])
    box_loss = torch.rand(3, generator=g, dtype=torch.float64)
    target = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 15.0], [2.0, 3.0, 8.0, 9.0]], dtype=torch.float64)
    pred = target + 0.5
    out = softmax_harmonic_loss(logits, labels, box_loss, pred, target, normalizer=6)
    ce = F.cross_entropy(logits, labels, reduction="none")
    positive = labels > 0
    p_gt = torch.softmax(logits, -1)[positive, labels[positive]]
    loc = localization_loss(box_loss, pred, target)
    torch.testing.assert_close(out["beta_c"], p_gt.mean().float(), check_dtype=False)
    torch.testing.assert_close(
        out["classification"] + out["bbox_regression"], (ce[~positive].sum() + harmonic_loss(ce[positive], loc).sum()) / 6
    )
    torch.testing.assert_close(out["bbox_regression"], ((1 + p_gt) * loc).sum() / 6)
    same = softmax_harmonic_loss(logits, labels, box_loss, pred, target, normalizer=6, options=HarmonicOptions(beta_c_source="gt_prob"))
    torch.testing.assert_close(same["bbox_regression"], out["bbox_regression"])


def test_low_precision_logits_give_float32_finite_losses():
    logits, box_loss, pred, target = _case(dtype=torch.float32)
    out = dense_harmonic_loss(logits.bfloat16(), GT, box_loss.half(), pred.half(), target.half(), num_foreground=3)
    ref = dense_harmonic_loss(logits.bfloat16().float(), GT, box_loss.half().float(), pred.half().float(), target.half().float(), num_foreground=3)
    for key in ("classification", "bbox_regression"):
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key])
        torch.testing.assert_close(out[key], ref[key])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hiou_gamma": 1.5}, "hiou_gamma"),
        ({"hiou_weight": -1.0}, "hiou_weight"),
        ({"tc_form": "soft"}, "tc_form"),
        ({"beta_c_source": "prob"}, "beta_c_source"),
        ({"tc_weight": float("nan")}, "tc_weight"),
        ({"iou_loss": "diou"}, "iou_loss"),
    ],
)
def test_bad_options_are_rejected_by_name(kwargs, message):
    logits, box_loss, pred, target = _case()
    with pytest.raises(ValueError, match=message):
        HarmonicOptions(**kwargs)
    with pytest.raises(TypeError, match="options must be a HarmonicOptions"):
        dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=3, options=kwargs)


def test_bad_inputs_are_rejected_with_clear_errors():
    logits, box_loss, pred, target = _case()
    with pytest.raises(ValueError, match="gt_classes values"):
        dense_harmonic_loss(logits, torch.tensor([-1, 0, 3, -1, 1, -1, -1]), box_loss, pred, target, num_foreground=3)
    with pytest.raises(ValueError, match="gt_classes must be an int64"):
        dense_harmonic_loss(logits, GT.float(), box_loss, pred, target, num_foreground=3)
    with pytest.raises(ValueError, match=r"box_loss must have shape \[P\] = \[3\]"):
        dense_harmonic_loss(logits, GT, box_loss[:2], pred, target, num_foreground=3)
    with pytest.raises(ValueError, match="pred_boxes"):
        dense_harmonic_loss(logits, GT, box_loss, pred[:, :2], target, num_foreground=3)
    with pytest.raises(ValueError, match="cls_logits"):
        dense_harmonic_loss(logits[0], GT, box_loss, pred, target, num_foreground=3)
    with pytest.raises(ValueError, match="num_foreground"):
        dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=torch.ones(3))
    with pytest.raises(ValueError, match="gt_classes values"):
        softmax_harmonic_loss(logits, torch.tensor([-1, 0, 2, 0, 1, 0, 2]), box_loss, pred, target, normalizer=7)


def test_fused_selection(monkeypatch):
    from harmonic.ops import focal as focal_module

    calls = []

    def fake_focal(logits, gt_classes, alpha=0.25, gamma=2.0):
        calls.append(logits.shape)
        return focal_loss_per_anchor_reference(logits, gt_classes, alpha, gamma)

    monkeypatch.setattr(focal_module, "focal_loss_per_anchor", fake_focal)
    monkeypatch.setattr(focal_module, "is_faster", lambda device: device.type == "cpu")
    assert select_focal_loss(False, "cpu") is focal_loss_per_anchor_reference
    assert select_focal_loss(True, "cpu") is fake_focal
    assert select_focal_loss(None, "cpu") is fake_focal
    assert select_focal_loss(None, "cuda") is focal_loss_per_anchor_reference
    monkeypatch.setattr(focal_module, "is_faster", lambda device: False)
    assert select_focal_loss(None, "cpu") is focal_loss_per_anchor_reference
    logits, box_loss, pred, target = _case()
    fused = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=3, options=HarmonicOptions(fused=True))
    reference = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=3, options=HarmonicOptions(fused=False))
    assert len(calls) == 1
    torch.testing.assert_close(fused["classification"], reference["classification"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    logits, box_loss, pred, target = _case(dtype=torch.float32)
    cpu = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=3, options=HarmonicOptions(tc_weight=1.0, fused=False))
    gpu = dense_harmonic_loss(logits.cuda(), GT.cuda(), box_loss.cuda(), pred.cuda(), target.cuda(), num_foreground=3, options=HarmonicOptions(tc_weight=1.0, fused=False))
    for key in ("classification", "bbox_regression", "task_contrasting", "beta_r", "beta_c"):
        torch.testing.assert_close(gpu[key].cpu(), cpu[key])


@pytest.mark.parametrize("detach_factors", [False, True])
def test_one_factor_weights_one_term_and_the_other_term_is_the_plain_one(detach_factors):
    """``factor_terms="cls"``: the classification term of the full loss and the unweighted L_loc;
    ``"box"``: the plain focal term and the weighted L_loc. Gradients: with "box" and differentiated
    factors the logits also get -beta_c L_loc through beta_c = e^-x; with "cls" the box gets
    -beta_r CE through beta_r = e^-y."""
    def run(**kw):
        logits, box_loss, pred, target = _case()
        options = HarmonicOptions(detach_factors=detach_factors, **kw)
        out = dense_harmonic_loss(logits, GT, box_loss, pred, target, num_foreground=3, options=options)
        (out["classification"] + out["bbox_regression"]).backward()
        return out, logits.grad, box_loss.grad

    both, both_gl, both_gb = run()
    none, none_gl, none_gb = run(factors=False)
    cls, cls_gl, cls_gb = run(factor_terms="cls")
    box, box_gl, box_gb = run(factor_terms="box")
    torch.testing.assert_close(cls["classification"], both["classification"])
    torch.testing.assert_close(cls["bbox_regression"], none["bbox_regression"])
    torch.testing.assert_close(box["classification"], none["classification"])
    torch.testing.assert_close(box["bbox_regression"], both["bbox_regression"])
    negatives = GT < 0
    torch.testing.assert_close(cls_gl[negatives], none_gl[negatives])  # negatives: the focal loss alone
    if detach_factors:
        torch.testing.assert_close(box_gl, none_gl)  # a constant (1 + beta_c) leaves the logits alone
        torch.testing.assert_close(cls_gb, none_gb)  # a constant (1 + beta_r) leaves the box alone
    else:
        assert not torch.allclose(box_gl, none_gl) and not torch.allclose(cls_gb, none_gb)
        # the two one-factor gradients add up to the full loss's, less the plain loss's counted twice
        torch.testing.assert_close(cls_gl + box_gl - none_gl, both_gl)
        torch.testing.assert_close(cls_gb + box_gb - none_gb, both_gb)
    assert box["watch/counterfactual"].item() == 0.0 and cls["watch/counterfactual"].item() == 0.0


def test_factor_terms_is_validated():
    with pytest.raises(ValueError, match="factor_terms must be one of"):
        HarmonicOptions(factor_terms="classification")
    with pytest.raises(ValueError, match="needs factors=True"):
        HarmonicOptions(factor_terms="box", factors=False)
