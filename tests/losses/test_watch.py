"""harmonic.losses.watch: the watch statistics of the positives against numbers computed by hand, and
their place in the head compositions (harmonic.models.head_loss)."""

from __future__ import annotations

import math

import pytest
import torch

from harmonic.losses import WATCH_KEYS, Y_REVERSAL, harmonic_loss, watch_statistics
from harmonic.models.head_loss import (
    SAMPLE_KEYS,
    HarmonicOptions,
    dense_harmonic_loss,
    dense_watch_counterfactual,
    softmax_harmonic_loss,
    softmax_watch_counterfactual,
)

# three positives: x (the factor's CE), y (L_loc), IoU, score
X = [0.1, 1.0, 3.0]
Y = [2.0, 0.5, 0.2]
IOU = [0.2, 0.5, 0.8]
SCORE = [0.9, 0.6, 0.3]


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


def test_threshold_is_the_root_of_y_minus_exp_minus_y_equals_one():
    assert Y_REVERSAL - math.exp(-Y_REVERSAL) == pytest.approx(1.0, abs=1e-15)


def test_statistics_of_three_positives_computed_by_hand():
    """By hand: percentiles of three sorted values a <= b <= c (linear interpolation at positions 0.2, 1
    and 1.8): p10 = a + 0.2 (b - a), p50 = b, p90 = b + 0.8 (c - b).
    dF/dx = 1 + e^-y - y e^-x (Eq. 8):  1 + e^-2 - 2 e^-0.1 = -0.674340;  1 + e^-0.5 - 0.5 e^-1 = 1.422591;
    1 + e^-0.2 - 0.2 e^-3 = 1.808774, so one of three is reversed and the mean is 0.852342.
    B = 1 + e^-x - x e^-y (Eq. 5, p = e^-x): 1.891304; 0.761348; 1 + e^-3 - 3 e^-0.2 = -1.406405: one of
    three pushed away. Only y = 2 exceeds 1.2785."""
    stats = watch_statistics(f64(X), f64(Y), f64(IOU), f64(SCORE))
    assert list(stats) == list(WATCH_KEYS)
    expected = {
        "watch/x_p10": 0.28, "watch/x_p50": 1.0, "watch/x_p90": 2.6,
        "watch/y_p10": 0.26, "watch/y_p50": 0.5, "watch/y_p90": 1.7,
        "watch/iou_p10": 0.26, "watch/iou_p50": 0.5, "watch/iou_p90": 0.74,
        "watch/score_p10": 0.36, "watch/score_p50": 0.6, "watch/score_p90": 0.84,
        "watch/y_over_threshold_share": 1 / 3,
        "watch/reversed_share": 1 / 3,
        "watch/box_pushed_away_share": 1 / 3,
        "watch/cls_multiplier": 0.852342,
        "watch/counterfactual": 0.0,
    }
    for key, value in expected.items():
        assert float(stats[key]) == pytest.approx(value, abs=1e-6), key


def test_detached_factors_never_reverse_and_multiply_by_one_plus_beta_r():
    """Constant factors: dF/dx = 1 + e^-y = 1.135335, 1.606531, 1.818731 (mean 1.520199 = 1 + mean beta_r)."""
    stats = watch_statistics(f64(X), f64(Y), f64(IOU), f64(SCORE), detach_factors=True, counterfactual=True)
    assert float(stats["watch/reversed_share"]) == 0.0
    assert float(stats["watch/box_pushed_away_share"]) == 0.0
    assert float(stats["watch/cls_multiplier"]) == pytest.approx(1.520199, abs=1e-6)
    assert float(stats["watch/y_over_threshold_share"]) == pytest.approx(1 / 3)
    assert float(stats["watch/counterfactual"]) == 1.0


def test_multiplier_and_shares_agree_with_autograd_of_the_harmonic_loss():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(200, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    y = (torch.rand(200, generator=g, dtype=torch.float64) * 5).requires_grad_(True)
    grad_x, grad_y = torch.autograd.grad(harmonic_loss(x, y, reduction="sum"), (x, y))
    stats = watch_statistics(x, y, torch.rand(200, dtype=torch.float64), torch.exp(-x))
    assert float(stats["watch/cls_multiplier"]) == pytest.approx(float(grad_x.mean()), rel=1e-12)
    assert float(stats["watch/reversed_share"]) == pytest.approx(float((grad_x < 0).double().mean()))
    assert float(stats["watch/box_pushed_away_share"]) == pytest.approx(float((grad_y < 0).double().mean()))
    assert 0 < float(stats["watch/reversed_share"]) < 1 and 0 < float(stats["watch/box_pushed_away_share"]) < 1


def test_no_positives_and_bad_shapes():
    empty = torch.zeros(0)
    assert watch_statistics(empty, empty, empty, empty) == {}
    with pytest.raises(ValueError, match="y must be a 1-D tensor"):
        watch_statistics(torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(3))


def _dense_case():
    """Four anchors, K = 2: two positives (classes 0 and 1), two negatives; boxes in pixels."""
    logits = torch.tensor([[2.0, -1.0], [-0.5, 0.3], [-2.0, -2.0], [0.1, -3.0]])
    classes = torch.tensor([0, 1, -1, -1])
    box_loss = torch.tensor([0.4, 1.7])
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 25.0]])
    gt = torch.tensor([[1.0, 1.0, 11.0, 11.0], [0.0, 0.0, 20.0, 20.0]])
    return logits, classes, box_loss, pred, gt


def test_dense_loss_returns_watch_statistics_of_its_own_x_and_y():
    logits, classes, box_loss, pred, gt = _dense_case()
    out = dense_harmonic_loss(logits, classes, box_loss, pred, gt, num_foreground=2)
    focal = dense_watch_counterfactual(logits[:2], classes[:2], box_loss, pred, gt)
    for key in WATCH_KEYS[:-1]:  # the counterfactual of the same pieces is the same numbers
        torch.testing.assert_close(out[key], focal[key], msg=key)
    assert float(out["watch/counterfactual"]) == 0.0 and float(focal["watch/counterfactual"]) == 1.0
    assert set(SAMPLE_KEYS) <= set(out)
    torch.testing.assert_close(out["samples/score"], torch.sigmoid(torch.tensor([2.0, 0.3])))
    x, y = out["samples/x"], out["samples/y"]
    expected = watch_statistics(x, y, torch.tensor([81 / 119, 150 / 450]), out["samples/score"])
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value, msg=key)


@pytest.mark.parametrize("softmax", [False, True])
def test_watch_off_leaves_the_statistics_out_and_the_loss_unchanged(softmax):
    logits, classes, box_loss, pred, gt = _dense_case()
    if softmax:
        logits, classes = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.5, 0.2], [0.3, -0.2, 1.4]]), torch.tensor([1, 0, 2])

    def run(watch: bool) -> tuple[dict, tuple]:
        leaf = logits.clone().requires_grad_()
        if softmax:
            out = softmax_harmonic_loss(leaf, classes, box_loss, pred, gt, normalizer=3, options=HarmonicOptions(watch=watch))
        else:
            out = dense_harmonic_loss(leaf, classes, box_loss, pred, gt, num_foreground=2, options=HarmonicOptions(watch=watch))
        (out["classification"] + out["bbox_regression"]).backward()
        return out, leaf.grad

    (on, grad_on), (off, grad_off) = run(True), run(False)
    assert set(WATCH_KEYS) | set(SAMPLE_KEYS) <= set(on)
    assert set(off) == set(on) - set(WATCH_KEYS) - set(SAMPLE_KEYS) and {"beta_r", "beta_c"} <= set(off)
    for key in off:
        assert torch.equal(off[key], on[key]), key
    assert torch.equal(grad_off, grad_on)
    with pytest.raises(TypeError, match="watch must be a bool"):
        HarmonicOptions(watch=1)


def test_softmax_loss_and_counterfactual_use_the_cross_entropy_and_p():
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.5, 0.2], [0.3, -0.2, 1.4]])
    labels = torch.tensor([1, 0, 2])
    _, _, _, pred, gt = _dense_case()
    box_loss = torch.tensor([0.3, 2.2])
    out = softmax_harmonic_loss(logits, labels, box_loss, pred, gt, normalizer=3)
    positive = labels > 0
    cf = softmax_watch_counterfactual(logits[positive], labels[positive], box_loss, pred, gt)
    for key in WATCH_KEYS[:-1]:
        torch.testing.assert_close(out[key], cf[key], msg=key)
    ce = torch.nn.functional.cross_entropy(logits[positive], labels[positive], reduction="none")
    torch.testing.assert_close(out["samples/x"], ce)
    torch.testing.assert_close(out["samples/score"], torch.exp(-ce))
    detached = softmax_harmonic_loss(logits, labels, box_loss, pred, gt, normalizer=3,
                                     options=HarmonicOptions(detach_factors=True))
    assert float(detached["watch/reversed_share"]) == 0.0
    torch.testing.assert_close(detached["watch/cls_multiplier"], 1 + detached["beta_r"])


def test_percentiles_equal_torch_quantile():
    from harmonic.losses.watch import QUANTILES, _percentiles

    generator = torch.Generator().manual_seed(0)
    for p in (1, 2, 3, 10, 257):
        values = torch.randn(4, p, generator=generator, dtype=torch.float64)
        expected = torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64), dim=1).T
        torch.testing.assert_close(_percentiles(values), expected, rtol=0, atol=1e-12)


def test_one_factor_changes_the_derivatives_as_computed_by_hand():
    """x = 0.05, y = 1.2: the full loss has dF/dx = 1 + e^-1.2 - 1.2 e^-0.05 = 0.159719 > 0, but with
    (1 + beta_c) on L_loc alone dF/dx = 1 - 1.2 e^-0.05 = -0.141475 < 0 (reversed), and with (1 + beta_r)
    on CE alone dF/dx = 1 + e^-1.2 = 1.301194. dF/dy: full 1 + e^-0.05 - 0.05 e^-1.2 = 1.936170; "box"
    1 + e^-0.05 = 1.951229; "cls" 1 - 0.05 e^-1.2 = 0.984940."""
    x, y, iou, score = f64([0.05]), f64([1.2]), f64([0.5]), f64([0.95])
    for terms, d_dx in (("both", 0.159719), ("box", -0.141475), ("cls", 1.301194)):
        stats = watch_statistics(x, y, iou, score, factor_terms=terms)
        assert float(stats["watch/cls_multiplier"]) == pytest.approx(d_dx, abs=1e-6), terms
        assert float(stats["watch/reversed_share"]) == float(d_dx < 0), terms
        assert float(stats["watch/box_pushed_away_share"]) == 0.0, terms
    # x = 3, y = 0.2: only a differentiated (1 + beta_r) pushes the box away (1 - 3 e^-0.2 < 0)
    x, y = f64([3.0]), f64([0.2])
    pushed = {t: float(watch_statistics(x, y, iou, score, factor_terms=t)["watch/box_pushed_away_share"])
              for t in ("both", "cls", "box")}
    assert pushed == {"both": 1.0, "cls": 1.0, "box": 0.0}
    detached = watch_statistics(x, y, iou, score, factor_terms="cls", detach_factors=True)
    assert float(detached["watch/box_pushed_away_share"]) == 0.0
    with pytest.raises(ValueError, match="factor_terms must be one of"):
        watch_statistics(x, y, iou, score, factor_terms="neither")
    # the y that allows a reversal: above 1.2785 with both factors, above 1 with (1 + beta_c) alone, none
    # with (1 + beta_r) alone
    y = f64([0.5, 1.1, 2.0])
    x3, iou3, score3 = f64([0.1, 0.1, 0.1]), f64([0.5] * 3), f64([0.9] * 3)
    over = {t: float(watch_statistics(x3, y, iou3, score3, factor_terms=t)["watch/y_over_threshold_share"])
            for t in ("both", "box", "cls")}
    assert over == pytest.approx({"both": 1 / 3, "box": 2 / 3, "cls": 0.0})
