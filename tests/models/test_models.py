"""harmonic.models: torchvision detectors with the Harmonic losses swapped in (tiny CPU models)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.ops import sigmoid_focal_loss
from torchvision.ops.misc import FrozenBatchNorm2d

from harmonic.losses import WATCH_KEYS, harmonic_iou_loss, harmonic_loss
from harmonic.models import (
    CANDIDATE_KEYS,
    DetectorConfig,
    build_detector,
    get_samples,
    get_stats,
    set_record_candidates,
)
from harmonic.models.backbones import default_anchor_sizes, level_strides
from harmonic.models.common import HarmonicTransform, ignore_crowd_anchors

from tiny_detectors import (
    K,
    assert_cuda_matches_cpu,
    assert_finite_losses_and_gradients,
    batch,
    tiny,
    with_masks,
)

ARCHS = ("retinanet", "fcos", "faster_rcnn", "mask_rcnn", "ssd")
TWO_STAGE = ("faster_rcnn", "mask_rcnn")


pytestmark = pytest.mark.usefixtures("one_thread")


def build(cfg: DetectorConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_detector(cfg)


def train_losses(model, images, targets, seed: int = 0) -> dict[str, torch.Tensor]:
    """Training losses on ``batch()``-shaped data; a Mask R-CNN gets :func:`with_masks` targets when they have none."""
    model.train()
    if isinstance(model, MaskRCNN) and targets and "masks" not in targets[0]:
        targets = with_masks(targets)
    torch.manual_seed(seed)  # Faster R-CNN samples RoIs and anchors at random
    return model(images, targets)


# ----------------------------------------------------------------------------------------------------
# baseline == torchvision
# ----------------------------------------------------------------------------------------------------
def stock_twin(model: nn.Module, arch: str, cfg: DetectorConfig) -> nn.Module:
    """torchvision's own detector class around copies of our modules, with our weights loaded."""
    backbone, channels = copy.deepcopy(model.backbone), cfg.fpn_channels
    size = dict(min_size=cfg.min_size, max_size=cfg.max_size)
    post = dict(score_thresh=cfg.resolved("score_thresh"), detections_per_img=cfg.resolved("detections_per_img"))
    if arch == "retinanet":
        anchors = copy.deepcopy(model.anchor_generator)
        head = RetinaNetHead(channels, anchors.num_anchors_per_location()[0], K)
        stock = RetinaNet(backbone, K, anchor_generator=anchors, head=head, **size, **post)
    elif arch == "fcos":
        stock = FCOS(backbone, K, anchor_generator=copy.deepcopy(model.anchor_generator), head=FCOSHead(channels, 1, K), **size, **post)
    elif arch == "faster_rcnn":
        stock = FasterRCNN(
            backbone, K + 1, rpn_anchor_generator=copy.deepcopy(model.rpn.anchor_generator), **size,
            box_score_thresh=post["score_thresh"], box_detections_per_img=post["detections_per_img"],
        )
    elif arch == "mask_rcnn":  # torchvision's own heads, at the tiny config's width
        stock = MaskRCNN(
            backbone, None, rpn_anchor_generator=copy.deepcopy(model.rpn.anchor_generator), **size,
            box_score_thresh=post["score_thresh"], box_detections_per_img=post["detections_per_img"],
            box_predictor=FastRCNNPredictor(1024, K + 1), mask_head=MaskRCNNHeads(channels, (channels,) * 4, 1),
            mask_predictor=MaskRCNNPredictor(channels, channels, K + 1),
        )
    else:
        anchors = copy.deepcopy(model.anchor_generator)
        head = SSDHead([channels] * 5, anchors.num_anchors_per_location(), K + 1)
        stock = SSD(backbone, anchors, (cfg.min_size, cfg.min_size), K + 1, head=head, **post)
    stock.load_state_dict(model.state_dict())
    return stock


@pytest.mark.parametrize("arch", ARCHS)
def test_baseline_losses_and_detections_are_torchvisions(arch):
    cfg = tiny(arch, score_thresh=0.0)
    ours = build(cfg)
    stock = stock_twin(ours, arch, cfg)
    images, targets = batch()
    # sigmoid heads have K columns here; torchvision's head indexes its columns by the label itself
    shift = 1 if arch in ("retinanet", "fcos") else 0
    stock_targets = [{**t, "labels": t["labels"] - shift} for t in targets]
    ours_losses = train_losses(ours, images, targets)
    stock_losses = train_losses(stock, images, stock_targets)
    assert ours_losses.keys() == stock_losses.keys()
    for key in ours_losses:
        torch.testing.assert_close(ours_losses[key], stock_losses[key], rtol=0, atol=0, msg=key)
    ours.eval(), stock.eval()
    with torch.no_grad():
        ours_det, stock_det = ours(images), stock(images)
    for mine, theirs in zip(ours_det, stock_det):
        assert len(theirs["boxes"]) > 0
        assert mine.keys() == theirs.keys()
        torch.testing.assert_close(mine["boxes"], theirs["boxes"])
        torch.testing.assert_close(mine["scores"], theirs["scores"])
        torch.testing.assert_close(mine["labels"], theirs["labels"] + shift)
        if arch == "mask_rcnn":
            torch.testing.assert_close(mine["masks"], theirs["masks"])


@pytest.mark.slow
def test_default_resnet50_layouts_match_torchvision_builders():
    from torchvision.models.detection import (
        fasterrcnn_resnet50_fpn,
        fcos_resnet50_fpn,
        maskrcnn_resnet50_fpn,
        retinanet_resnet50_fpn,
        ssd300_vgg16,
    )

    builders = {
        "retinanet": (retinanet_resnet50_fpn, K),
        "fcos": (fcos_resnet50_fpn, K),
        "faster_rcnn": (fasterrcnn_resnet50_fpn, K + 1),
        "mask_rcnn": (maskrcnn_resnet50_fpn, K + 1),
        "ssd": (ssd300_vgg16, K + 1),
    }
    for arch, (builder, columns) in builders.items():
        ours = build_detector(DetectorConfig(arch=arch, num_classes=K))
        theirs = builder(weights=None, weights_backbone=None, num_classes=columns)
        mine = {k: v.shape for k, v in ours.state_dict().items()}
        assert mine == {k: v.shape for k, v in theirs.state_dict().items()}, arch
        if arch != "ssd":
            generator = ours.rpn.anchor_generator if arch in TWO_STAGE else ours.anchor_generator
            other = theirs.rpn.anchor_generator if arch in TWO_STAGE else theirs.anchor_generator
            assert [tuple(float(s) for s in level) for level in generator.sizes] == [
                tuple(float(s) for s in level) for level in other.sizes
            ]
        del ours, theirs


# ----------------------------------------------------------------------------------------------------
# the Harmonic loss inside a detector
# ----------------------------------------------------------------------------------------------------
def test_harmonic_retinanet_equals_hand_composed_loss():
    model = build(tiny("retinanet", loss="harmonic"))
    images, targets = batch()
    losses = train_losses(model, images, targets)
    # recompute from torchvision's pieces: per image, (sum_neg FL + sum_pos L_Har) / max(1, n), mean
    with torch.no_grad():
        image_list, resized = model.transform(images, targets)
        features = list(model.backbone(image_list.tensors).values())
        outputs = model.head(features)
        anchors = model.anchor_generator(image_list, features)
        coder, total = model.box_coder, 0.0
        from torchvision.ops import box_iou

        for b, target in enumerate(resized):
            matched = model.proposal_matcher(box_iou(target["boxes"], anchors[b]))
            valid, fg = matched != -2, matched >= 0
            one_hot = torch.zeros_like(outputs["cls_logits"][b])
            one_hot[fg, target["labels"][matched[fg]] - 1] = 1.0
            focal = sigmoid_focal_loss(outputs["cls_logits"][b], one_hot, reduction="none").sum(1)
            gt = target["boxes"][matched[fg]]
            reg = outputs["bbox_regression"][b][fg]
            l1 = (reg - coder.encode_single(gt, anchors[b][fg])).abs().sum(1)
            loc = l1 + 1.5 * harmonic_iou_loss(coder.decode_single(reg, anchors[b][fg]), gt, gamma=0.8)
            total += (focal[valid & ~fg].sum() + harmonic_loss(focal[fg], loc).sum()) / max(1, int(fg.sum()))
        total /= len(resized)
    torch.testing.assert_close(losses["classification"] + losses["bbox_regression"], total, rtol=1e-5, atol=1e-5)
    stats = get_stats(model)
    assert 0 < stats["beta_r"] <= 1 and 0 < stats["beta_c"] <= 1 and stats["num_positives"] > 0


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_without_factors_and_iou_term_the_harmonic_path_is_the_baseline_and_box_weight_scales_its_box_term(arch):
    """The controls of the attribution sweep: ``factors=False, hiou=False`` gives the host's own losses, and
    ``box_weight`` multiplies the box term alone."""
    images, targets = batch()
    cls_key, box_key = ("loss_classifier", "loss_box_reg") if arch in TWO_STAGE else ("classification", "bbox_regression")
    base = train_losses(build(tiny(arch)), images, targets)
    same = train_losses(build(tiny(arch, loss="harmonic", hiou=False, factors=False)), images, targets)
    scaled = train_losses(build(tiny(arch, loss="harmonic", hiou=False, factors=False, box_weight=2.5)), images, targets)
    for key in (cls_key, box_key):
        torch.testing.assert_close(same[key], base[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled[cls_key], base[cls_key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled[box_key], 2.5 * base[box_key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="box_weight"):
        tiny(arch, loss="harmonic", box_weight=-1.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_harmonic_losses_sit_between_baseline_and_twice_baseline(arch):
    """Without HIoU, each positive's terms are scaled by factors in (1, 2]: baseline < harmonic <= 2 x."""
    images, targets = batch()
    base = train_losses(build(tiny(arch)), images, targets)
    harm_model = build(tiny(arch, loss="harmonic", hiou=False))
    harm = train_losses(harm_model, images, targets)
    cls_key, box_key = ("loss_classifier", "loss_box_reg") if arch in TWO_STAGE else ("classification", "bbox_regression")
    for key in (cls_key, box_key):
        assert base[key] < harm[key] <= 2 * base[key] + 1e-6, key
    stats = get_stats(harm_model)
    assert 0 < stats["beta_r"] <= 1 and 0 < stats["beta_c"] <= 1
    assert set(WATCH_KEYS) <= set(stats) and stats["watch/counterfactual"] == 0.0
    baseline = build(tiny(arch))
    train_losses(baseline, images, targets)
    if arch == "fcos":  # torchvision's own FCOS loss: nothing recorded
        assert get_stats(baseline) == {} and get_samples(baseline) == {}
    else:  # the baseline's counterfactual watch statistics, and no harmonic factors
        assert sorted(get_stats(baseline)) == sorted(WATCH_KEYS) and get_stats(baseline)["watch/counterfactual"] == 1.0
        assert sorted(get_samples(baseline)) == ["score", "x", "y"]


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn", "ssd"])
def test_baseline_counterfactual_equals_the_harmonic_statistics_of_the_same_weights(arch):
    """Same seed, same weights: the baseline's counterfactual x and y are the ones the Harmonic + HIoU loss
    uses, so every watch statistic but the flag agrees."""
    images, targets = batch()
    stats = {}
    for loss in ("baseline", "harmonic"):
        model = build(tiny(arch, loss=loss))
        train_losses(model, images, targets)
        stats[loss] = get_stats(model)
    for key in WATCH_KEYS[:-1]:
        assert stats["baseline"][key] == pytest.approx(stats["harmonic"][key], rel=1e-5, abs=1e-6), key


def test_detach_factors_changes_gradients_not_values():
    images, targets = batch()
    grads, values = [], []
    for detach in (False, True):
        model = build(tiny("retinanet", loss="harmonic", detach_factors=detach))
        losses = train_losses(model, images, targets)
        total = sum(losses.values())
        total.backward()
        values.append(total.detach())
        grads.append(model.head.classification_head.cls_logits.weight.grad.clone())
    torch.testing.assert_close(values[0], values[1])
    assert not torch.allclose(grads[0], grads[1])


def test_get_stats_unwraps_data_parallel_and_beta_c_source_changes_stats():
    images, targets = batch()
    stats = {}
    for source in ("loss", "gt_prob"):
        model = build(tiny("fcos", loss="harmonic", beta_c_source=source))
        train_losses(model, images, targets)
        stats[source] = get_stats(nn.DataParallel(model))
        assert 0 < stats[source]["beta_c"] <= 1
    assert stats["loss"]["beta_r"] == pytest.approx(stats["gt_prob"]["beta_r"])
    assert stats["loss"]["beta_c"] != pytest.approx(stats["gt_prob"]["beta_c"])


# ----------------------------------------------------------------------------------------------------
# training on one tiny batch
# ----------------------------------------------------------------------------------------------------
LOSS_OPTIONS = {
    "baseline": {},
    "harmonic": {"loss": "harmonic", "hiou": False},
    "harmonic+hiou": {"loss": "harmonic"},
    "harmonic+hiou+tc": {"loss": "harmonic", "tc_weight": 1.0},
    "detach": {"loss": "harmonic", "detach_factors": True},
    "gt_prob": {"loss": "harmonic", "beta_c_source": "gt_prob"},
}
TRAIN_CASES = [("retinanet", name) for name in LOSS_OPTIONS] + [
    (arch, name) for arch in ("fcos", "faster_rcnn", "mask_rcnn", "ssd") for name in ("baseline", "harmonic+hiou+tc")
]


@pytest.mark.parametrize("arch, option", TRAIN_CASES)
def test_sgd_steps_lower_the_loss_on_a_fixed_batch(arch, option):
    model = build(tiny(arch, **LOSS_OPTIONS[option]))
    images, targets = batch()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    history = []
    for _ in range(6):
        losses = train_losses(model, images, targets)
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)  # SSD's summed losses diverge at lr 0.01 otherwise
        optimizer.step()
        history.append(total.item())
    assert min(history[-2:]) < history[0], history


# ----------------------------------------------------------------------------------------------------
# no objects, no positives
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("empty", [(0,), (0, 1)], ids=["one-empty", "all-empty"])
def test_images_without_objects_give_finite_losses_and_gradients_everywhere(arch, empty):
    model = build(tiny(arch, loss="harmonic", tc_weight=1.0))
    images, targets = batch(empty)
    losses = train_losses(model, images, targets)
    assert_finite_losses_and_gradients(model, losses)
    stats = get_stats(model)
    if len(empty) == 2:
        assert stats == {"num_positives": 0.0}
        box_key = "loss_box_reg" if arch in TWO_STAGE else "bbox_regression"
        assert losses[box_key].item() == 0.0


# ----------------------------------------------------------------------------------------------------
# eval outputs and candidates
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_eval_outputs_and_recorded_candidates(arch):
    model = build(tiny(arch, loss="harmonic", score_thresh=0.0, detections_per_img=20))
    images, _ = batch()
    model.eval()
    with torch.no_grad():
        plain = model(images)
        set_record_candidates(model, True)
        recorded = model(images)
        set_record_candidates(nn.DataParallel(model), False)
        again = model(images)
    for image, out, rec, off in zip(images, plain, recorded, again):
        masks = {"masks"} if arch == "mask_rcnn" else set()
        assert set(out) == {"boxes", "scores", "labels"} | masks and set(off) == set(out)
        if masks:  # one mask per detection, probabilities in the input image's pixels
            assert out["masks"].shape == (len(out["boxes"]), 1, *image.shape[-2:])
            assert out["masks"].min() >= 0 and out["masks"].max() <= 1
            torch.testing.assert_close(rec["masks"], out["masks"])
        assert 0 < len(out["boxes"]) <= 20
        assert out["labels"].min() >= 1 and out["labels"].max() <= K
        height, width = image.shape[-2:]
        assert (out["boxes"][:, 0::2] <= width + 1e-3).all() and (out["boxes"][:, 1::2] <= height + 1e-3).all()
        assert (out["boxes"] >= -1e-3).all()
        assert torch.all(out["scores"][:-1] >= out["scores"][1:])
        assert set(CANDIDATE_KEYS) <= set(rec)
        candidates = rec["candidate_boxes"]
        assert len(candidates) >= len(rec["boxes"])
        assert rec["candidate_labels"].min() >= 1 and rec["candidate_labels"].max() <= K
        for box, label in zip(rec["boxes"], rec["labels"]):  # every detection is one of the candidates
            same = (candidates - box).abs().amax(1) < 1e-4
            assert (same & (rec["candidate_labels"] == label)).any()
        torch.testing.assert_close(rec["boxes"], out["boxes"])


def test_set_record_candidates_rejects_other_models():
    with pytest.raises(TypeError, match="build_detector"):
        set_record_candidates(nn.Linear(2, 2), True)


# ----------------------------------------------------------------------------------------------------
# crowd regions
# ----------------------------------------------------------------------------------------------------
def test_ignore_crowd_anchors_marks_negatives_inside_crowd_boxes():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [8.0, 8.0, 18.0, 18.0], [50.0, 50.0, 60.0, 60.0]])
    matched = torch.tensor([-1, 0, -1, -1])
    crowd = torch.tensor([[0.0, 0.0, 12.0, 12.0]])
    out = ignore_crowd_anchors(matched, anchors, crowd, 0.5)
    assert out.tolist() == [-2, 0, -1, -1]  # inside -> ignored; positive stays; IoF 0.16 and 0 stay
    assert ignore_crowd_anchors(matched, anchors, torch.zeros(0, 4), 0.5) is matched


def test_crowd_boxes_are_resized_with_the_image():
    transform = HarmonicTransform(128, 256, [0.0] * 3, [1.0] * 3, num_classes=2)
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1]),
              "crowd_boxes": torch.tensor([[4.0, 6.0, 20.0, 30.0]])}
    _, (resized,) = transform([torch.rand(3, 64, 64)], [target])
    torch.testing.assert_close(resized["crowd_boxes"], torch.tensor([[8.0, 12.0, 40.0, 60.0]]))
    torch.testing.assert_close(target["crowd_boxes"], torch.tensor([[4.0, 6.0, 20.0, 30.0]]))  # input untouched


@pytest.mark.parametrize(
    "arch, loss",
    [(arch, loss) for arch in ("retinanet", "fcos") for loss in ("baseline", "harmonic")] + [("retinanet", "qfl")],
)
def test_crowd_regions_remove_negatives_from_the_classification_loss(arch, loss):
    model = build(tiny(arch, loss=loss))
    images, targets = batch()
    plain = train_losses(model, images, targets)
    crowded = [{**targets[0], "crowd_boxes": torch.tensor([[40.0, 0.0, 80.0, 64.0]])}, targets[1]]
    with_crowd = train_losses(model, images, crowded)
    assert with_crowd["classification"] < plain["classification"]
    torch.testing.assert_close(with_crowd["bbox_regression"], plain["bbox_regression"])


# ----------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------
def test_config_round_trips_through_json():
    cfg = tiny("retinanet", loss="harmonic", anchor_sizes=[[4, 5, 6]] * 5, tc_weight=0.5, fused=False)
    text = json.dumps(dataclasses.asdict(cfg))
    again = DetectorConfig.from_dict(json.loads(text))
    assert again == cfg
    assert DetectorConfig.from_dict(cfg.to_dict()) == cfg
    assert again.anchor_sizes == ((4.0, 5.0, 6.0),) * 5


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"arch": "yolo"}, "arch"),
        ({"num_classes": 0}, "num_classes"),
        ({"backbone": "resnet101_fpn"}, "backbone"),
        ({"backbone": "vgg16"}, "backbone"),
        ({"loss": "focal"}, "loss"),
        ({"arch": "fcos", "loss": "qfl"}, "loss"),
        ({"arch": "ssd", "loss": "iou_balanced"}, "loss"),
        ({"norm": "frozen_bn"}, "norm"),
        ({"norm": "ln"}, "norm"),
        ({"trainable_backbone_layers": 2}, "trainable_backbone_layers"),
        ({"pretrained_backbone": "imagenet", "trainable_backbone_layers": 7}, "trainable_backbone_layers"),
        ({"min_size": 0}, "min_size"),
        ({"max_size": 32}, "max_size"),
        ({"fpn_channels": 0}, "fpn_channels"),
        ({"anchor_sizes": "big"}, "anchor_sizes"),
        ({"anchor_sizes": [[4, -1]]}, "anchor_sizes"),
        ({"hiou_gamma": 1.2}, "hiou_gamma"),
        ({"hiou_weight": -0.5}, "hiou_weight"),
        ({"tc_weight": -1.0}, "tc_weight"),
        ({"tc_form": "soft"}, "tc_form"),
        ({"beta_c_source": "prob"}, "beta_c_source"),
        ({"fused": "yes"}, "fused"),
        ({"detach_factors": 1}, "detach_factors"),
        ({"score_thresh": 1.5}, "score_thresh"),
        ({"detections_per_img": 0}, "detections_per_img"),
        ({"crowd_iof_thresh": 0.0}, "crowd_iof_thresh"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny(overrides.pop("arch", "retinanet"), **overrides)


def test_config_architecture_specific_errors():
    with pytest.raises(ValueError, match="min_size"):
        DetectorConfig(arch="ssd", num_classes=2, min_size=200)  # vgg16 SSD300
    with pytest.raises(ValueError, match="anchor_sizes"):
        tiny("ssd", anchor_sizes=[[4]] * 5)
    with pytest.raises(ValueError, match="FCOS"):
        tiny("fcos", anchor_sizes=[[4, 8]] * 5)
    with pytest.raises(ValueError, match="anchor_sizes has 3 levels"):
        build_detector(tiny("retinanet", anchor_sizes=[[4]] * 3))
    with pytest.raises(ValueError, match="unknown key"):
        DetectorConfig.from_dict({"arch": "fcos", "num_classes": 2, "lr": 0.1})
    with pytest.raises(ValueError, match="missing required"):
        DetectorConfig.from_dict({"arch": "fcos"})
    with pytest.raises(TypeError, match="DetectorConfig"):
        build_detector({"arch": "fcos", "num_classes": 2})


def test_defaults_follow_torchvision_and_auto_anchors_scale_with_min_size():
    cfg = DetectorConfig(arch="ssd", num_classes=2)
    assert (cfg.resolved("backbone"), cfg.resolved("min_size"), cfg.resolved("norm")) == ("vgg16", 300, None)
    retina = DetectorConfig(arch="retinanet", num_classes=2)
    assert default_anchor_sizes(retina)[0] == (32.0, 40.0, 50.0) and len(default_anchor_sizes(retina)) == 5
    assert retina.resolved("norm") == "bn" and retina.resolved("trainable_backbone_layers") == 5
    scaled = DetectorConfig(arch="retinanet", num_classes=2, min_size=400, anchor_sizes="auto")
    assert default_anchor_sizes(scaled)[0] == (16.0, 20.0, 25.0)
    fcos = DetectorConfig(arch="fcos", num_classes=2, min_size=400, anchor_sizes="auto")
    assert default_anchor_sizes(fcos) == ((8.0,), (16.0,), (32.0,), (64.0,), (128.0,))


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn", "mask_rcnn"])
@pytest.mark.parametrize("backbone", ["resnet18_fpn", "mobilenet_v3_fpn"])
def test_feature_strides_match_the_anchor_layout(arch, backbone):
    cfg = tiny(arch, backbone=backbone)
    model = build(cfg).eval()
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 128, 128))
    assert [128 // f.shape[-1] for f in features.values()] == level_strides(cfg)


def test_local_pretrained_backbone_norms_and_frozen_layers(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(3)
    weights = resnet18().state_dict()
    path = tmp_path / "resnet18.pt"
    torch.save(weights, path)
    model = build_detector(tiny("retinanet", pretrained_backbone=str(path)))
    body = model.backbone.body
    torch.testing.assert_close(body.conv1.weight, weights["conv1.weight"])
    torch.testing.assert_close(body.layer3[0].bn1.running_var, weights["layer3.0.bn1.running_var"])
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad
    gn = build_detector(tiny("retinanet", norm="gn"))
    assert isinstance(gn.backbone.body.bn1, nn.GroupNorm)
    losses = train_losses(gn, *batch())
    assert all(torch.isfinite(v) for v in losses.values())

    with pytest.raises(FileNotFoundError, match="pretrained_backbone"):
        build_detector(tiny("retinanet", pretrained_backbone=str(tmp_path / "missing.pt")))
    torch.save({"backbone.body.conv1.weight": weights["conv1.weight"]}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="does not match"):
        build_detector(tiny("retinanet", pretrained_backbone=str(tmp_path / "wrong.pt")))


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_bad_targets_get_clear_errors(arch):
    model = build(tiny(arch)).train()
    images, targets = batch()
    for labels, message in ((torch.tensor([0, 1]), "1..3"), (torch.tensor([1, 4]), "1..3"), (torch.tensor([1.0, 2.0]), "int64")):
        bad = [{**targets[0], "labels": labels}, targets[1]]
        with pytest.raises(ValueError, match=message):
            model(images, bad)
    with pytest.raises(ValueError, match="crowd_boxes"):
        model(images, [{**targets[0], "crowd_boxes": torch.zeros(4)}, targets[1]])


def test_cpu_autocast_gives_finite_harmonic_losses():
    model = build(tiny("retinanet", loss="harmonic", tc_weight=1.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = train_losses(model, *batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_losses_match_cpu_and_autocast_is_finite(arch):
    model = build(tiny(arch, loss="harmonic", tc_weight=1.0))
    assert_cuda_matches_cpu(model, *batch(), train_losses, compare=arch not in TWO_STAGE)


def test_losses_are_float32_under_bfloat16_autocast(monkeypatch):
    from harmonic.models.common import float32_losses, to_float32

    seen = []

    class Probe:
        @float32_losses
        def loss(self, outputs):
            seen.append((outputs["x"].dtype, torch.is_autocast_enabled("cpu")))
            return outputs["x"].sum()

    x = torch.ones(3, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = Probe().loss({"x": x * 1.5})
    assert seen == [(torch.float32, False)] and out.dtype == torch.float32
    out.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad.float(), torch.full((3,), 1.5))
    nested = to_float32({"a": [torch.ones(1, dtype=torch.float16)], "b": (torch.ones(1, dtype=torch.int64),)})
    assert nested["a"][0].dtype == torch.float32 and nested["b"][0].dtype == torch.int64

    model = build_detector(tiny("retinanet", loss="harmonic")).train()
    images, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
# ----------------------------------------------------------------------------------------------------
# Mask R-CNN: the Harmonic loss on the box head, torchvision's mask loss
# ----------------------------------------------------------------------------------------------------
def test_mask_rcnn_harmonic_changes_the_box_losses_only():
    images, targets = batch()
    base = train_losses(build(tiny("mask_rcnn")), images, targets)
    harmonic = train_losses(build(tiny("mask_rcnn", loss="harmonic")), images, targets)
    assert set(base) == set(harmonic) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    for key in ("loss_mask", "loss_objectness", "loss_rpn_box_reg"):  # same weights, same RoIs: unchanged
        torch.testing.assert_close(harmonic[key], base[key], rtol=0, atol=0, msg=key)
    assert harmonic["loss_classifier"] > base["loss_classifier"] and harmonic["loss_box_reg"] > base["loss_box_reg"]


def test_mask_rcnn_needs_masks_of_the_image_size_one_per_box():
    model = build(tiny("mask_rcnn")).train()
    images, targets = batch()
    with pytest.raises(ValueError, match=r"targets\[0\] needs 'masks'"):
        model(images, targets)
    bad = with_masks(targets)
    bad[1] = {**bad[1], "masks": bad[1]["masks"][:, :10]}
    with pytest.raises(ValueError, match=r"targets\[1\]\['masks'\] must be a uint8 or bool tensor of shape \[1, 72, 64\]"):
        model(images, bad)
    assert build_detector(tiny("mask_rcnn")).roi_heads.has_mask() and not build_detector(tiny("faster_rcnn")).roi_heads.has_mask()
    assert tiny("mask_rcnn").needs_masks and not tiny("faster_rcnn").needs_masks


def test_head_norm_gn_puts_group_norm_in_both_retinanet_towers_and_is_checked():
    from torch import nn as tnn

    model = build(tiny("retinanet", head_norm="gn"))
    for tower in (model.head.classification_head.conv, model.head.regression_head.conv):
        norms = [m for m in tower.modules() if isinstance(m, tnn.GroupNorm)]
        assert len(norms) == len(tower) and all(n.num_groups == 32 for n in norms)
    assert not any(isinstance(m, tnn.GroupNorm) for m in build(tiny("retinanet")).head.modules())
    images, targets = batch()
    losses = train_losses(build(tiny("retinanet", head_norm="gn", loss="harmonic")), images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="head_norm"):
        tiny("fcos", head_norm="gn")
    with pytest.raises(ValueError, match="head_norm"):
        tiny("retinanet", head_norm="bn")
    with pytest.raises(ValueError, match="divide"):
        tiny("retinanet", head_norm="gn", fpn_channels=48)


def test_two_stage_sampling_reaches_torchvision_and_is_refused_elsewhere():
    from harmonic.models import DetectorConfig, build_detector

    small = dict(num_classes=3, backbone="resnet18_fpn", min_size=64, max_size=64, fpn_channels=32)
    model = build_detector(DetectorConfig(arch="faster_rcnn", rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=50,
                                          box_batch_size_per_image=16, **small))
    assert model.rpn._pre_nms_top_n == {"training": 300, "testing": 1000}
    assert model.rpn._post_nms_top_n == {"training": 50, "testing": 1000}
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 16
    default = build_detector(DetectorConfig(arch="faster_rcnn", **small))
    assert default.roi_heads.fg_bg_sampler.batch_size_per_image == 512  # torchvision's
    with pytest.raises(ValueError, match="box_batch_size_per_image applies to arch"):
        DetectorConfig(arch="retinanet", box_batch_size_per_image=16, **small)
    with pytest.raises(ValueError, match="rpn_post_nms_top_n_train must be None or an int >= 1"):
        DetectorConfig(arch="mask_rcnn", rpn_post_nms_top_n_train=0, **small)
    for bad in (True, 2.0, "500"):  # a bool is not a count, nor a float or a string
        with pytest.raises(ValueError, match="rpn_pre_nms_top_n_train must be None or an int >= 1"):
            DetectorConfig(arch="faster_rcnn", rpn_pre_nms_top_n_train=bad, **small)
