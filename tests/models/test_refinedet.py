"""harmonic.models.refinedet: RefineDet (Zhang et al., CVPR 2018) on torchvision parts, with the Harmonic
loss on its object detection module (tiny CPU models; hand-worked numbers)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from harmonic.models import CANDIDATE_KEYS, DetectorConfig, build_detector, get_stats, set_record_candidates
from harmonic.models.backbones import RefineDetVGG16, default_anchor_sizes, level_strides
from harmonic.models.head_loss import softmax_harmonic_loss
from harmonic.models.refinedet import HarmonicRefineDet, RefineDetHead, refinedet_anchors

from tiny_detectors import K, assert_cuda_matches_cpu, assert_finite_losses_and_gradients, batch, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

LN = math.log


def build(seed: int = 0, **overrides) -> HarmonicRefineDet:
    torch.manual_seed(seed)
    return build_detector(tiny("refinedet", **overrides))


def train_losses(model, images, targets) -> dict[str, torch.Tensor]:
    model.train()
    return model(images, targets)


# ----------------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------------
def test_refinedet512_head_has_16320_anchors_and_the_paper_anchor_layout():
    cfg = DetectorConfig(arch="refinedet", num_classes=80)
    assert level_strides(cfg) == [8, 16, 32, 64]
    assert default_anchor_sizes(cfg) == ((32.0,), (64.0,), (128.0,), (256.0,))  # 4 x stride [R]
    head = RefineDetHead([4, 4, 8, 4], 3, 81, tcb_channels=8)
    features = [torch.zeros(1, c, s, s) for c, s in zip([4, 4, 8, 4], [64, 32, 16, 8])]
    out = head(features)
    count = 3 * (64**2 + 32**2 + 16**2 + 8**2)
    assert count == 16320
    assert out["arm_cls_logits"].shape == (1, count, 2) and out["arm_bbox_regression"].shape == (1, count, 4)
    assert out["cls_logits"].shape == (1, count, 81) and out["bbox_regression"].shape == (1, count, 4)
    anchors = refinedet_anchors([(64, 64), (32, 32), (16, 16), (8, 8)], [8, 16, 32, 64], list(default_anchor_sizes(cfg)))
    assert anchors.shape == (count, 4)


def test_vgg16_source_layers_have_strides_8_to_64():
    from torchvision.models import vgg16

    torch.manual_seed(0)
    backbone = RefineDetVGG16(vgg16().features).eval()
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, 128, 128))
    assert [tuple(v.shape[1:]) for v in out.values()] == [(512, 16, 16), (512, 8, 8), (1024, 4, 4), (512, 2, 2)]
    # L2Norm: each position of conv4_3 has norm 10 (its initial scale) across channels
    norms = out["0"].pow(2).sum(1).sqrt()
    torch.testing.assert_close(norms[norms > 0], torch.full_like(norms[norms > 0], 10.0), rtol=1e-4, atol=1e-4)


def test_built_models_forward_shapes_on_small_backbones():
    model = build().eval()
    images, _ = batch()
    image_list, _ = model.transform(images)
    assert image_list.tensors.shape[-2:] == (64, 64)  # a fixed square of min_size
    features = list(model.backbone(image_list.tensors).values())
    assert [f.shape[-1] for f in features] == [8, 4, 2, 1]
    out = model.head(features)
    count = 3 * (64 + 16 + 4 + 1)
    assert out["cls_logits"].shape == (2, count, K + 1) and out["arm_cls_logits"].shape == (2, count, 2)


# ----------------------------------------------------------------------------------------------------
# anchors and the two-step decoding, by hand
# ----------------------------------------------------------------------------------------------------
def test_anchor_boxes_by_hand():
    # one level of 1 x 2 positions at stride 8, size 16, ratios w/h = 1 and 4: centres (4, 4) and (12, 4);
    # ratio 1: 16 x 16; ratio 4: w = 16 * 2 = 32, h = 16 / 2 = 8
    anchors = refinedet_anchors([(1, 2)], [8], [(16.0,)], (1.0, 4.0))
    expected = torch.tensor([
        [-4.0, -4.0, 12.0, 12.0], [-12.0, 0.0, 20.0, 8.0],  # position (0, 0)
        [4.0, -4.0, 20.0, 12.0], [-4.0, 0.0, 28.0, 8.0],  # position (0, 1)
    ])
    torch.testing.assert_close(anchors, expected)


def hand_model() -> HarmonicRefineDet:
    return build(score_thresh=0.0, detections_per_img=10)


def test_refined_anchor_then_odm_decoding_by_hand():
    """anchor (cx, cy, w, h) = (10, 5, 20, 10). ARM offsets (1, -2, 5 ln 2, 0) with weights (10, 10, 5, 5):
    cx = 10 + 0.1 * 20 = 12, cy = 5 - 0.2 * 10 = 3, w = 20 * 2 = 40, h = 10: refined [-8, -2, 32, 8].
    ODM offsets (0, 5, 0, -5 ln 2) relative to it: cy = 3 + 0.5 * 10 = 8, h = 5: box [-8, 5.5, 32, 10.5],
    clipped to the 64 x 64 image: [0, 5.5, 32, 10.5]."""
    model = hand_model()
    anchors = torch.tensor([[0.0, 0.0, 20.0, 10.0]])
    arm_reg = torch.tensor([[[1.0, -2.0, 5 * LN(2), 0.0]]])
    torch.testing.assert_close(model.refine(arm_reg, anchors), torch.tensor([[[-8.0, -2.0, 32.0, 8.0]]]))
    head_outputs = {
        "arm_cls_logits": torch.tensor([[[0.0, 0.0]]]),  # objectness 0.5: kept
        "arm_bbox_regression": arm_reg,
        "cls_logits": torch.tensor([[[0.0, LN(3), 0.0, 0.0]]]),  # softmax (1, 3, 1, 1) / 6
        "bbox_regression": torch.tensor([[[0.0, 5.0, 0.0, -5 * LN(2)]]]),
    }
    (det,) = model.postprocess_detections(head_outputs, anchors, [(64, 64)])
    torch.testing.assert_close(det["boxes"][0], torch.tensor([0.0, 5.5, 32.0, 10.5]))
    assert det["labels"][0] == 1 and det["scores"][0].item() == pytest.approx(0.5)
    assert sorted(det["labels"].tolist()) == [1, 2, 3]  # 1/6 each for the others, one box per class

    # negative anchor filtering at inference: background probability 199/200 = 0.995 > 0.99
    filtered = {**head_outputs, "arm_cls_logits": torch.tensor([[[LN(199), 0.0]]])}
    (none,) = model.postprocess_detections(filtered, anchors, [(64, 64)])
    assert none["boxes"].shape == (0, 4)


# ----------------------------------------------------------------------------------------------------
# RefineDet's loss against its closed form
# ----------------------------------------------------------------------------------------------------
ANCHORS = torch.tensor([
    [0.0, 0.0, 20.0, 20.0],  # a0: IoU 1 with the ground truth
    [40.0, 40.0, 60.0, 60.0],  # a1..a4: IoU 0
    [0.0, 40.0, 20.0, 60.0],
    [40.0, 0.0, 60.0, 20.0],
    [80.0, 80.0, 100.0, 100.0],
])
TARGETS = [{"boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0]]), "labels": torch.tensor([2])}]


def hand_outputs() -> dict[str, torch.Tensor]:
    """ARM: a0 is the positive; a4 has background probability 0.999 > 0.99, so it is filtered out of the
    ODM. ARM offsets (2, 0, 0, 0) on a0 move it by 0.2 * 20 = 4 px: refined a0 = [4, 0, 24, 20], IoU 2/3
    with the ground truth, still the ODM's positive, whose target offsets are (10 * -4 / 20, 0, 0, 0)."""
    arm_cls = torch.tensor([[0.0, 0.0], [0.0, LN(3)], [0.0, 0.0], [LN(3), 0.0], [LN(999), 0.0]])
    arm_reg = torch.zeros(5, 4)
    arm_reg[0, 0] = 2.0
    odm_cls = torch.tensor([
        [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [LN(2), 0.0, 0.0, 0.0], [LN(3), 0.0, 0.0, 0.0], [0.0, 5.0, 5.0, 5.0],
    ])
    return {
        "arm_cls_logits": arm_cls[None], "arm_bbox_regression": arm_reg[None],
        "cls_logits": odm_cls[None], "bbox_regression": torch.zeros(1, 5, 4),
    }


def test_baseline_loss_equals_the_hand_computed_closed_form():
    """ARM (N_arm = 1): CE of a0 (label 1) ln 2; negatives' CE a1 ln 4, a2 ln 2, a3 ln 4/3, a4 ln 1000/999;
    3 mined: a1, a2, a3. Smooth L1 of a0's offset 2 against 0: 2 - 0.5 = 1.5.
    ODM (N_odm = 1, a4 filtered although its CE is the largest): a0 (label 2) ln 4; a1 ln 4, a2 ln 5/2,
    a3 ln 2, all three mined. Box: smooth L1 of 0 against the refined target -2: 1.5."""
    model = hand_model()
    losses = model.compute_loss(TARGETS, hand_outputs(), ANCHORS)
    expected = {
        "arm_classification": LN(2) + LN(4) + LN(2) + LN(4 / 3),
        "arm_bbox_regression": 1.5,
        "classification": LN(4) + LN(4) + LN(5 / 2) + LN(2),
        "bbox_regression": 1.5,
    }
    assert losses.keys() == expected.keys()
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-6), key
    stats = get_stats(model)  # the ODM positive's counterfactual: x = CE = ln 4, score 1/4
    assert "beta_r" not in stats and stats["watch/counterfactual"] == 1.0
    assert stats["watch/x_p50"] == pytest.approx(LN(4)) and stats["watch/score_p90"] == pytest.approx(0.25)


def test_harmonic_loss_on_the_hand_case_without_hiou():
    """Harmonic on the ODM's one positive: CE = ln 4, L_loc = 1.5, so classification = negatives' CE +
    (1 + e^-1.5) ln 4 and bbox_regression = (1 + 1/4) 1.5; the ARM keeps RefineDet's loss unless the switch
    is on, then its positive (CE ln 2, L_loc 1.5) gets the same composition."""
    negatives = LN(4) + LN(5 / 2) + LN(2)
    model = build(loss="harmonic", hiou=False)
    losses = model.compute_loss(TARGETS, hand_outputs(), ANCHORS)
    assert losses["classification"].item() == pytest.approx(negatives + (1 + math.exp(-1.5)) * LN(4), rel=1e-6)
    assert losses["bbox_regression"].item() == pytest.approx(1.25 * 1.5, rel=1e-6)
    assert losses["arm_classification"].item() == pytest.approx(LN(2) + LN(4) + LN(2) + LN(4 / 3), rel=1e-6)
    assert losses["arm_bbox_regression"].item() == pytest.approx(1.5, rel=1e-6)
    stats = get_stats(model)
    assert {k: stats[k] for k in ("num_positives", "beta_r", "beta_c")} == pytest.approx(
        {"num_positives": 1.0, "beta_r": math.exp(-1.5), "beta_c": 0.25}
    )
    # watch [D]: y = 1.5 > 1.2785; dF/dx = 1 + e^-1.5 - 1.5 / 4 = 0.848130 > 0 (Eq. 8);
    # B = 1 + 1/4 - ln 4 e^-1.5 = 0.940676 > 0 (Eq. 5)
    assert stats["watch/y_over_threshold_share"] == 1.0 and stats["watch/y_p10"] == pytest.approx(1.5)
    assert stats["watch/reversed_share"] == 0.0 and stats["watch/box_pushed_away_share"] == 0.0
    assert stats["watch/cls_multiplier"] == pytest.approx(0.848130, abs=1e-6)

    both = build(loss="harmonic", hiou=False, refinedet_harmonic_arm=True)
    arm = both.compute_loss(TARGETS, hand_outputs(), ANCHORS)
    arm_negatives = LN(4) + LN(2) + LN(4 / 3)
    assert arm["arm_classification"].item() == pytest.approx(arm_negatives + (1 + math.exp(-1.5)) * LN(2), rel=1e-6)
    assert arm["arm_bbox_regression"].item() == pytest.approx(1.5 * 1.5, rel=1e-6)
    torch.testing.assert_close(arm["classification"], losses["classification"])


def test_filtered_positive_leaves_the_odm_loss():
    outputs = hand_outputs()
    outputs["arm_cls_logits"][0, 0] = torch.tensor([LN(999), 0.0])  # a0 filtered: no ODM positive left
    losses = hand_model().compute_loss(TARGETS, outputs, ANCHORS)
    assert losses["classification"].item() == 0.0 and losses["bbox_regression"].item() == 0.0
    assert losses["arm_bbox_regression"].item() == pytest.approx(1.5)  # the ARM still trains on it


# ----------------------------------------------------------------------------------------------------
# the Harmonic loss on the ODM pieces of a real batch
# ----------------------------------------------------------------------------------------------------
def test_harmonic_loss_differs_from_baseline_and_equals_softmax_harmonic_loss_on_the_odm_pieces():
    images, targets = batch()
    base = train_losses(build(), images, targets)
    model = build(loss="harmonic")
    harm = train_losses(model, images, targets)
    for key in ("arm_classification", "arm_bbox_regression"):  # the switch is off: the ARM keeps its loss
        torch.testing.assert_close(harm[key], base[key])
    for key in ("classification", "bbox_regression"):
        assert harm[key] > base[key], key
    with torch.no_grad():
        image_list, resized = model.transform(images, targets)
        features = list(model.backbone(image_list.tensors).values())
        outputs = model.head(features)
        anchors = model.anchors(tuple(image_list.tensors.shape[-2:]), features)
        odm = model.loss_pieces(resized, outputs, anchors)["odm"]
        selected = odm["selected"]
        expected = softmax_harmonic_loss(
            outputs["cls_logits"][selected], odm["labels"][selected], odm["box_loss"], odm["pred_boxes"],
            odm["target_boxes"], normalizer=odm["num_positives"], options=model.options,
        )
    for key in ("classification", "bbox_regression"):
        torch.testing.assert_close(harm[key], expected[key], rtol=1e-5, atol=1e-6)
    stats = get_stats(model)
    assert stats["num_positives"] == odm["num_positives"] > 0 and 0 < stats["beta_c"] <= 1

    with_arm = train_losses(build(loss="harmonic", refinedet_harmonic_arm=True), images, targets)
    assert with_arm["arm_bbox_regression"] > base["arm_bbox_regression"]
    torch.testing.assert_close(with_arm["classification"], harm["classification"])


def test_odm_loss_sends_no_gradient_into_the_arm_through_the_refined_anchors():
    model = build(loss="harmonic")
    losses = train_losses(model, *batch())
    (losses["classification"] + losses["bbox_regression"]).backward()
    assert all(m.weight.grad is None for m in model.head.arm_reg)
    assert all(m.weight.grad is None for m in model.head.arm_cls)
    assert model.head.odm_reg[0].weight.grad is not None


# ----------------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    {}, {"loss": "harmonic"}, {"loss": "harmonic", "refinedet_harmonic_arm": True, "tc_weight": 1.0},
    {"backbone": "mobilenet_v3_fpn"},
], ids=["baseline", "harmonic", "harmonic-arm-tc", "mobilenet"])
def test_sgd_steps_lower_the_loss_with_finite_gradients_everywhere(overrides):
    model = build(**overrides)
    images, targets = batch()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    history = []
    for step in range(5):
        losses = train_losses(model, images, targets)
        optimizer.zero_grad()
        if step == 0:
            assert_finite_losses_and_gradients(model, losses)
        else:
            sum(losses.values()).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        history.append(sum(losses.values()).item())
    assert min(history[-2:]) < history[0], history


@pytest.mark.parametrize("empty", [(0,), (0, 1)], ids=["one-empty", "all-empty"])
def test_images_without_objects_give_finite_losses_and_gradients(empty):
    model = build(loss="harmonic", refinedet_harmonic_arm=True)
    losses = train_losses(model, *batch(empty))
    assert_finite_losses_and_gradients(model, losses)
    if len(empty) == 2:
        assert all(v.item() == 0.0 for v in losses.values())


def test_eval_returns_detections_with_candidates():
    model = build(loss="harmonic", score_thresh=0.0, detections_per_img=20).eval()
    images, _ = batch()
    with torch.no_grad():
        plain = model(images)
        set_record_candidates(model, True)
        recorded = model(images)
    for image, out, rec in zip(images, plain, recorded):
        assert set(out) == {"boxes", "scores", "labels"}
        assert 0 < len(out["boxes"]) <= 20
        assert out["labels"].min() >= 1 and out["labels"].max() <= K
        height, width = image.shape[-2:]
        assert (out["boxes"] >= -1e-3).all()
        assert (out["boxes"][:, 0::2] <= width + 1e-3).all() and (out["boxes"][:, 1::2] <= height + 1e-3).all()
        assert torch.all(out["scores"][:-1] >= out["scores"][1:])
        assert set(CANDIDATE_KEYS) <= set(rec) and len(rec["candidate_boxes"]) >= len(rec["boxes"])
        for box, label in zip(rec["boxes"], rec["labels"]):  # every detection is one of the candidates
            same = (rec["candidate_boxes"] - box).abs().amax(1) < 1e-4
            assert (same & (rec["candidate_labels"] == label)).any()
        torch.testing.assert_close(rec["boxes"], out["boxes"])


# ----------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------
def test_config_defaults_and_errors_name_the_field():
    cfg = DetectorConfig(arch="refinedet", num_classes=2)
    assert (cfg.resolved("backbone"), cfg.resolved("min_size"), cfg.resolved("max_size")) == ("vgg16", 512, 512)
    assert default_anchor_sizes(tiny("refinedet")) == ((4.0,), (8.0,), (16.0,), (32.0,))  # "auto": x 64 / 512
    with pytest.raises(ValueError, match="min_size"):
        DetectorConfig(arch="refinedet", num_classes=2, min_size=300)
    with pytest.raises(ValueError, match="refinedet_harmonic_arm"):
        tiny("refinedet", refinedet_harmonic_arm=True)  # needs loss="harmonic"
    with pytest.raises(ValueError, match="refinedet_harmonic_arm"):
        tiny("ssd", loss="harmonic", refinedet_harmonic_arm=True)
    with pytest.raises(ValueError, match="refinedet_harmonic_arm"):
        tiny("refinedet", loss="harmonic", refinedet_harmonic_arm=1)
    with pytest.raises(ValueError, match="anchor_sizes has 5 levels"):
        build_detector(tiny("refinedet", anchor_sizes=[[8]] * 5))
    with pytest.raises(ValueError, match="backbone"):
        DetectorConfig(arch="fcos", num_classes=2, backbone="vgg16")
    round_trip = tiny("refinedet", loss="harmonic", refinedet_harmonic_arm=True)
    assert DetectorConfig.from_dict(round_trip.to_dict()) == round_trip


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_losses_match_cpu_and_eval_runs():
    model = build(loss="harmonic", refinedet_harmonic_arm=True, tc_weight=1.0)
    assert_cuda_matches_cpu(model, *batch(), train_losses)
