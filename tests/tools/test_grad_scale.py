"""The gradient-scale tool: per-positive and regression-head gradients of the IoU-type terms against L1."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "models"))

import grad_scale  # noqa: E402

from harmonic.models import build_detector  # noqa: E402

from tiny_detectors import tiny  # noqa: E402

ANCHORS = [[16, 20, 25], [32, 40, 50], [64, 80, 101], [128, 161, 203], [256, 322, 406]]


def _data():
    boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0], [20.0, 30.0, 60.0, 60.0]])
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 64, 64, generator=g)], [{"boxes": boxes, "labels": torch.tensor([1, 2])}]


def test_measure_compares_each_term_with_l1_on_the_same_positives():
    torch.manual_seed(0)
    model = build_detector(tiny("retinanet", min_size=64, max_size=64, anchor_sizes=ANCHORS))
    images, targets = _data()
    out = grad_scale.measure(model, images, targets, alpha=1.5, gamma=0.8)
    assert out["num_positives"] > 0 and 0 < out["mean_iou"] < 1
    assert set(out["terms"]) == {"hiou", "giou", "one_minus_iou"}
    for term in out["terms"].values():
        assert term["anchor_norm_ratio_p10"] <= term["anchor_norm_ratio_median"] <= term["anchor_norm_ratio_p90"]
        assert -1 <= term["anchor_cosine_mean"] <= 1 and 0 <= term["anchor_cosine_negative_share"] <= 1
        # |a + b| <= |a| + |b|: the step growth is bounded by 1 + the term's own norm ratio
        assert term["head_step_growth"] <= 1 + term["head_norm_ratio"] + 1e-6
    # twice the weight: twice the gradient, the same direction
    double = grad_scale.measure(model, images, targets, alpha=3.0, gamma=0.8)["terms"]["hiou"]
    assert double["anchor_norm_ratio_median"] == pytest.approx(2 * out["terms"]["hiou"]["anchor_norm_ratio_median"], rel=1e-4)
    assert double["head_norm_ratio"] == pytest.approx(2 * out["terms"]["hiou"]["head_norm_ratio"], rel=1e-4)
    assert double["anchor_cosine_mean"] == pytest.approx(out["terms"]["hiou"]["anchor_cosine_mean"], abs=1e-5)


def test_l1_gradient_is_the_sign_of_the_offset_error():
    """The reference every ratio divides by: L1's gradient per positive is sign(r - t), norm 2."""
    torch.manual_seed(0)
    model = build_detector(tiny("retinanet", min_size=64, max_size=64, anchor_sizes=ANCHORS)).eval()
    images, targets = _data()
    matched = grad_scale._matched(model, images, targets)
    reg, encoded = grad_scale._regression(model, matched), matched["encoded"]
    leaf = reg.detach().requires_grad_()
    (leaf - encoded).abs().sum().backward()
    torch.testing.assert_close(leaf.grad, torch.sign(reg.detach() - encoded))


def test_dead_channels_counts_units_silent_on_every_input():
    torch.manual_seed(0)
    model = build_detector(tiny("retinanet", min_size=64, max_size=64, anchor_sizes=ANCHORS)).eval()
    images, targets = _data()
    fresh = grad_scale.dead_channels(model, images, targets)
    assert len(fresh["regression"]) == len(model.head.regression_head.conv) and max(fresh["regression"]) < 0.5
    # kill the first regression layer's units: biases far below any input, so every output is clamped to 0
    first = model.head.regression_head.conv[0][0]
    with torch.no_grad():
        first.bias[:8] = -1e6
    out = grad_scale.dead_channels(model, images, targets)
    channels = first.out_channels
    assert out["regression"][0] >= max(8 / channels, fresh["regression"][0] + 1 / channels)
    assert out["classification"] == fresh["classification"]


def test_dead_only_iou_matches_measure():
    """--dead-only reads the positives' IoU from tools/testbed.py; measure computes it from its own matching."""
    import testbed

    torch.manual_seed(0)
    model = build_detector(tiny("retinanet", min_size=64, max_size=64, anchor_sizes=ANCHORS))
    images, targets = _data()
    measured = testbed.positive_iou(model, list(zip(images, targets)))
    full = grad_scale.measure(model, images, targets, alpha=1.5, gamma=0.8)
    assert measured["num_positives"] == full["num_positives"] and measured["pos_iou"] == pytest.approx(full["mean_iou"])
