"""Comparison losses (QFL, varifocal, IoU-balanced) as loss-only swaps in RetinaNet: values against hand
computations from harmonic.losses.comparison, training, empty batches and configuration errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou, sigmoid_focal_loss

from harmonic.losses.comparison import iou_balanced_weights, quality_focal_loss, varifocal_loss
from harmonic.models import DetectorConfig, build_detector, get_stats
from harmonic.models.head_loss import (
    COMPARISON_LOSSES,
    ComparisonOptions,
    dense_comparison_loss,
    split_losses_and_stats,
)
from harmonic.models.retinanet import HarmonicRetinaNetHead

import tiny_detectors
from tiny_detectors import K, assert_finite_losses_and_gradients, batch

GT = torch.tensor([-1, 0, 2, -1, 1, -1, -1])  # 3 positives among 7 anchors
POSITIVE = GT >= 0


pytestmark = pytest.mark.usefixtures("one_thread")


def _case(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(7, K, generator=g, dtype=dtype).requires_grad_()
    box_loss = torch.rand(3, generator=g, dtype=dtype).mul(2).requires_grad_()
    target = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 15.0], [2.0, 3.0, 8.0, 9.0]], dtype=dtype)
    pred = (target + torch.randn(3, 4, generator=g, dtype=dtype)).requires_grad_()
    return logits, box_loss, pred, target


def _hand_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return box_iou(pred.detach(), target).diagonal() if len(pred) else pred.new_zeros(0)


def _hand_weights(iou: torch.Tensor, losses: torch.Tensor, power: float) -> torch.Tensor:
    """Wu et al.: w_i = IoU_i^power * sum(L) / sum(IoU^power * L), a constant."""
    raw = iou.pow(power)
    return (raw * losses.sum() / (raw * losses).sum()).detach()


def _hand_loss(kind: str, logits, classes, box_loss, iou, n):
    """(classification, bbox_regression) of one image from harmonic.losses.comparison / torchvision, by hand."""
    positive = classes >= 0
    one_hot = torch.zeros_like(logits)
    one_hot[positive, classes[positive]] = 1.0
    soft = one_hot.clone()
    soft[positive, classes[positive]] = iou.to(logits.dtype)
    if kind == "qfl":
        return quality_focal_loss(logits, soft).sum() / n, box_loss.sum() / n
    if kind == "varifocal":
        return varifocal_loss(logits, soft).sum() / n, box_loss.sum() / n
    focal = sigmoid_focal_loss(logits, one_hot, reduction="none").sum(1)
    w = _hand_weights(iou, focal[positive].detach(), 1.5)
    v = _hand_weights(iou, box_loss.detach(), 1.5)
    return (focal[~positive].sum() + (w * focal[positive]).sum()) / n, (v * box_loss).sum() / n


# ----------------------------------------------------------------------------------------------------
# the composition on one image's pieces
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", COMPARISON_LOSSES)
def test_dense_comparison_loss_equals_hand_computation(kind):
    logits, box_loss, pred, target = _case()
    out = dense_comparison_loss(ComparisonOptions(kind), logits, GT, box_loss, pred, target, num_foreground=3)
    iou = _hand_iou(pred, target)
    cls, box = _hand_loss(kind, logits, GT, box_loss, iou, 3)
    torch.testing.assert_close(out["classification"], cls, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["bbox_regression"], box, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["mean_iou"], iou.mean())
    assert float(out["num_positives"]) == 3.0
    (out["classification"] + out["bbox_regression"]).backward()
    assert pred.grad is None  # the quality target is detached
    # floored normalizer: 0 positives claimed -> divide by 1
    again = dense_comparison_loss(ComparisonOptions(kind), logits, GT, box_loss, pred, target, num_foreground=torch.tensor(0))
    torch.testing.assert_close(again["classification"], 3 * cls.detach(), rtol=1e-12, atol=1e-12)


def test_quality_targets_sit_at_the_ground_truth_class():
    """QFL with quality 1 on a perfect box is zero exactly where the score matches the soft target."""
    target = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    logits = torch.full((2, K), -30.0, dtype=torch.float64)
    logits[1, 2] = 30.0  # sigma ~ 1 on the ground-truth class 2 of the positive, ~0 elsewhere
    out = dense_comparison_loss(ComparisonOptions("qfl"), logits, torch.tensor([-1, 2]), torch.zeros(1, dtype=torch.float64), target.clone(), target, num_foreground=1)
    assert out["classification"].item() < 1e-20
    shifted = logits.clone()
    shifted[1] = shifted[1].roll(1)  # the confident column is now the wrong class
    wrong = dense_comparison_loss(ComparisonOptions("qfl"), shifted, torch.tensor([-1, 2]), torch.zeros(1, dtype=torch.float64), target.clone(), target, num_foreground=1)
    assert wrong["classification"].item() > 10.0


def test_iou_balanced_keeps_totals_and_scales_positive_gradients_by_the_weights():
    logits, box_loss, pred, target = _case(seed=2)
    out = dense_comparison_loss(ComparisonOptions("iou_balanced"), logits, GT, box_loss, pred, target, num_foreground=3)
    one_hot = torch.zeros_like(logits)
    one_hot[POSITIVE, GT[POSITIVE]] = 1.0
    focal = sigmoid_focal_loss(logits, one_hot, reduction="none").sum(1)
    # totals preserved: the values are the host's focal and L1 sums
    torch.testing.assert_close(out["classification"], focal.sum() / 3, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["bbox_regression"], box_loss.sum() / 3, rtol=1e-12, atol=1e-12)
    # gradients: positives' rows scaled by w_i (negatives' unchanged), box-loss gradient = v_i / n
    (plain_grad,) = torch.autograd.grad(focal.sum() / 3, logits)
    (grad,) = torch.autograd.grad(out["classification"], logits)
    iou = _hand_iou(pred, target)
    w = iou_balanced_weights(iou, focal[POSITIVE], eta=1.5)
    torch.testing.assert_close(grad[~POSITIVE], plain_grad[~POSITIVE])
    torch.testing.assert_close(grad[POSITIVE], w[:, None] * plain_grad[POSITIVE])
    assert not torch.allclose(w, torch.ones_like(w))
    (box_grad,) = torch.autograd.grad(out["bbox_regression"], box_loss)
    torch.testing.assert_close(box_grad, _hand_weights(iou, box_loss, 1.5) / 3)


@pytest.mark.parametrize("kind", COMPARISON_LOSSES)
def test_no_positives_gives_finite_connected_losses(kind):
    weight = torch.randn(5, K, requires_grad=True)
    logits = torch.randn(4, 5) @ weight
    box_params = torch.randn(4, 4, requires_grad=True)
    empty = box_params[:0]
    out = dense_comparison_loss(ComparisonOptions(kind), logits, torch.full((4,), -1), empty.sum(1), empty, empty.detach(), num_foreground=0)
    assert out["bbox_regression"].item() == 0.0 and out["bbox_regression"].requires_grad
    # with no positive every kind's classification is its negatives' term over all anchors and classes
    if kind == "iou_balanced":
        expected = sigmoid_focal_loss(logits, torch.zeros_like(logits), reduction="sum")
    elif kind == "qfl":
        expected = (torch.sigmoid(logits).pow(2) * nn.functional.softplus(logits)).sum()
    else:
        expected = (0.75 * torch.sigmoid(logits).pow(2) * nn.functional.softplus(logits)).sum()
    torch.testing.assert_close(out["classification"], expected)
    losses, stats = split_losses_and_stats(out)
    assert set(losses) == {"classification", "bbox_regression"} and stats == {"num_positives": out["num_positives"]}
    sum(losses.values()).backward()
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
    assert box_params.grad is not None and torch.all(box_params.grad == 0)


def test_low_precision_logits_give_float32_finite_losses():
    logits, box_loss, pred, target = _case(dtype=torch.float32)
    for kind in COMPARISON_LOSSES:
        out = dense_comparison_loss(ComparisonOptions(kind), logits.detach().bfloat16(), GT, box_loss.detach().half(), pred.detach(), target, num_foreground=3)
        reference = dense_comparison_loss(ComparisonOptions(kind), logits.detach(), GT, box_loss.detach(), pred.detach(), target, num_foreground=3)
        for key in ("classification", "bbox_regression"):
            assert out[key].dtype == torch.float32 and torch.isfinite(out[key])
            torch.testing.assert_close(out[key], reference[key], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "gfl"}, "kind"),
        ({"num_foreground": torch.ones(7)}, "num_foreground"),
        ({"num_foreground": float("nan")}, "num_foreground"),
        ({"iou_eta": -1.0}, "iou_eta"),
        ({"vfl_gamma": float("inf")}, "vfl_gamma"),
        ({"box_loss": torch.zeros(2, dtype=torch.float64)}, "box_loss"),
        ({"gt_classes": torch.tensor([-1, 0, 3, -1, 1, -1, -1])}, "gt_classes"),
    ],
)
def test_bad_inputs_are_rejected_by_name(kwargs, message):
    logits, box_loss, pred, target = _case()
    args = dict(options=ComparisonOptions("qfl"), cls_logits=logits, gt_classes=GT, box_loss=box_loss, pred_boxes=pred,
                target_boxes=target, num_foreground=3)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in ("kind", "iou_eta", "vfl_gamma")}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        if options:
            args["options"] = ComparisonOptions(**{"kind": "qfl", **options})
        dense_comparison_loss(**args)


# ----------------------------------------------------------------------------------------------------
# inside RetinaNet
# ----------------------------------------------------------------------------------------------------
def tiny(**overrides) -> DetectorConfig:
    """A tiny RetinaNet, the detector that takes the comparison losses."""
    return tiny_detectors.tiny("retinanet", **overrides)


def build(cfg: DetectorConfig) -> nn.Module:
    torch.manual_seed(0)
    return build_detector(cfg).train()


def head_inputs(model, images, targets):
    """Features (no gradient into the backbone), resized targets and anchors of one fixed batch."""
    with torch.no_grad():
        image_list, resized = model.transform(images, targets)
        features = list(model.backbone(image_list.tensors).values())
        anchors = model.anchor_generator(image_list, features)
    return features, resized, anchors


def test_retinanet_comparison_losses_equal_hand_composition_and_keep_the_host_box_loss():
    images, targets = batch()
    baseline = build(tiny())
    features, resized, anchors = head_inputs(baseline, images, targets)
    base = baseline.compute_loss(resized, baseline.head(features), anchors)
    for kind in COMPARISON_LOSSES:
        model = build(tiny(loss=kind))
        outputs = model.head(features)
        losses = model.compute_loss(resized, outputs, anchors)  # labels 1..K, shifted inside
        assert set(losses) == {"classification", "bbox_regression"}
        coder, cls_total, box_total, ious = model.box_coder, 0.0, 0.0, []
        with torch.no_grad():
            for b, target in enumerate(resized):
                matched = model.proposal_matcher(box_iou(target["boxes"], anchors[b]))
                valid, fg = matched != -2, matched >= 0
                classes = torch.full_like(matched, -1)
                classes[fg] = target["labels"][matched[fg]] - 1
                gt = target["boxes"][matched[fg]]
                reg = outputs["bbox_regression"][b][fg]
                l1 = (reg - coder.encode_single(gt, anchors[b][fg])).abs().sum(1)
                iou = _hand_iou(coder.decode_single(reg, anchors[b][fg]), gt)
                ious.append(iou)
                cls, box = _hand_loss(kind, outputs["cls_logits"][b][valid], classes[valid], l1, iou, max(1, int(fg.sum())))
                cls_total, box_total = cls_total + cls / 2, box_total + box / 2
        torch.testing.assert_close(losses["classification"].detach(), cls_total, rtol=1e-5, atol=1e-6, msg=kind)
        torch.testing.assert_close(losses["bbox_regression"].detach(), box_total, rtol=1e-5, atol=1e-6, msg=kind)
        # same weights as the baseline: the box loss is the host's (IoU-balanced: same total, too)
        torch.testing.assert_close(losses["bbox_regression"], base["bbox_regression"], rtol=1e-5, atol=1e-6)
        if kind == "iou_balanced":
            torch.testing.assert_close(losses["classification"], base["classification"], rtol=1e-5, atol=1e-6)
        else:
            assert not torch.isclose(losses["classification"], base["classification"])
        stats = get_stats(model)
        assert stats["num_positives"] == sum(len(i) for i in ious) > 0
        assert stats["mean_iou"] == pytest.approx(float(torch.cat(ious).mean()), rel=1e-5)


@pytest.mark.parametrize("kind", COMPARISON_LOSSES)
def test_sgd_steps_on_the_head_lower_each_loss_on_a_fixed_batch(kind):
    """The classification head alone lowers its loss at every step (the soft targets stay fixed while the
    boxes do); the whole head lowers the total. (With QFL / VFL the classification term may rise while the
    boxes improve: their IoU, the soft target of the positives, rises.)"""
    model = build(tiny(loss=kind))
    features, resized, anchors = head_inputs(model, *batch())
    optimizer = torch.optim.SGD(model.head.classification_head.parameters(), lr=0.2, momentum=0.9)
    classification = []
    for _ in range(6):
        loss = model.compute_loss(resized, model.head(features), anchors)["classification"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        classification.append(loss.item())
    assert all(b < a for a, b in zip(classification, classification[1:])), classification
    assert classification[-1] < 0.995 * classification[0], classification

    model = build(tiny(loss=kind))
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(8):
        losses = model.compute_loss(resized, model.head(features), anchors)
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append((total.item(), losses["bbox_regression"].item()))
    assert max(t for t, _ in history[-2:]) < 0.97 * history[0][0], history
    assert history[-1][1] < history[0][1], history


@pytest.mark.parametrize("kind", COMPARISON_LOSSES)
@pytest.mark.parametrize("empty", [(0,), (0, 1)], ids=["one-empty", "all-empty"])
def test_images_without_objects_give_finite_losses_and_gradients_everywhere(kind, empty):
    model = build(tiny(loss=kind))
    losses = model(*batch(empty))
    assert_finite_losses_and_gradients(model, losses)
    stats = get_stats(model)
    if len(empty) == 2:
        assert stats == {"num_positives": 0.0}
        assert losses["bbox_regression"].item() == 0.0
    else:
        assert stats["num_positives"] > 0 and 0 <= stats["mean_iou"] <= 1


# ----------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["fcos", "faster_rcnn", "ssd"])
@pytest.mark.parametrize("kind", COMPARISON_LOSSES)
def test_comparison_losses_are_retinanet_only_with_an_error_naming_the_field(arch, kind):
    with pytest.raises(ValueError, match=r"DetectorConfig\.loss=.*retinanet.*" + arch):
        DetectorConfig(arch=arch, num_classes=K, loss=kind)


def test_config_options_and_round_trip():
    cfg = tiny(loss="varifocal", fused=False)
    assert cfg.comparison_options() == ComparisonOptions("varifocal", fused=False)
    assert cfg.harmonic_options() is None
    assert DetectorConfig.from_dict(cfg.to_dict()) == cfg
    assert tiny(loss="harmonic").comparison_options() is None and tiny().comparison_options() is None
    head = build(tiny(loss="iou_balanced")).head
    assert head.comparison.kind == "iou_balanced" and head.comparison.iou_eta == head.comparison.iou_lambda == 1.5
    assert head.options is None


def test_head_and_options_errors():
    with pytest.raises(ValueError, match="not both"):
        HarmonicRetinaNetHead(8, 9, K, options=tiny(loss="harmonic").harmonic_options(),
                              comparison=ComparisonOptions("qfl"))
    with pytest.raises(TypeError, match="ComparisonOptions"):
        HarmonicRetinaNetHead(8, 9, K, comparison="qfl")
    with pytest.raises(ValueError, match="kind"):
        ComparisonOptions("focal")
    with pytest.raises(ValueError, match="qfl_beta"):
        ComparisonOptions("qfl", qfl_beta=-1.0)
    with pytest.raises(TypeError, match="fused"):
        ComparisonOptions("qfl", fused="yes")
    with pytest.raises(TypeError, match="options must be a ComparisonOptions"):
        dense_comparison_loss("qfl", *_case()[:1], GT, *_case()[1:], num_foreground=3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", COMPARISON_LOSSES)
def test_cuda_losses_match_cpu_and_autocast_is_finite(kind):
    model = build(tiny(loss=kind))
    images, targets = batch()
    cpu = model(images, targets)
    model.cuda()
    images_gpu = [i.cuda() for i in images]
    targets_gpu = [{k: v.cuda() for k, v in t.items()} for t in targets]
    gpu = model(images_gpu, targets_gpu)
    for key in cpu:
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.float16):
        amp = model(images_gpu, targets_gpu)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in amp.values())
    sum(amp.values()).backward()
