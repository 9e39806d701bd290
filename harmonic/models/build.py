"""``build_detector``, ``get_stats``, ``get_samples`` and ``set_record_candidates``."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.ssd import SSDHead

from harmonic.models.backbones import RefineDetVGG16, build_backbone, default_anchor_sizes, level_strides
from harmonic.models.common import StatsMixin, unwrap
from harmonic.models.config import HEAD_GN_GROUPS, TWO_STAGE_SAMPLING, DetectorConfig
from harmonic.models.faster_rcnn import HarmonicFasterRCNN
from harmonic.models.fcos import HarmonicFCOS, HarmonicFCOSHead
from harmonic.models.mask_rcnn import HarmonicMaskRCNN
from harmonic.models.refinedet import ASPECT_RATIOS, HarmonicRefineDet, RefineDetHead
from harmonic.models.retinanet import HarmonicRetinaNet, HarmonicRetinaNetHead
from harmonic.models.ssd import HarmonicSSD

__all__ = ["build_detector", "get_samples", "get_stats", "set_record_candidates"]

# torchvision's SSD300 VGG16 default boxes and input normalization (its weights expect 0-255 inputs)
_SSD300_BOXES = {
    "aspect_ratios": [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
    "scales": [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
    "steps": [8, 16, 32, 64, 100, 300],
}
_SSD300_NORMALIZATION = {"image_mean": [0.48235, 0.45882, 0.40784], "image_std": [1.0 / 255.0] * 3}


def build_detector(cfg: DetectorConfig) -> nn.Module:
    """The detector described by ``cfg``, with torchvision semantics.

    Train mode: ``model(images, targets) -> dict`` of scalar loss tensors (the host's keys, plus
    ``task_contrasting`` when enabled; RefineDet adds its ARM's ``arm_classification`` and
    ``arm_bbox_regression``, Mask R-CNN ``loss_mask``). Eval mode: ``model(images) -> list`` of dicts with
    ``boxes`` (xyxy, original image coordinates), ``scores`` and ``labels`` (1..K), Mask R-CNN also
    ``masks`` (float [n, 1, H, W], mask probabilities in the original image's pixels), plus the pre-NMS
    candidates when :func:`set_record_candidates` is on. ``images``: float tensors [3, H, W] in 0-1;
    targets: ``boxes`` [N, 4] xyxy, ``labels`` int64 1..K, optional ``crowd_boxes`` [M, 4]; Mask R-CNN
    (``cfg.needs_masks``) also ``masks`` uint8 [N, H, W], one per box.

    Nothing is downloaded unless ``cfg.pretrained_backbone == "imagenet"``.
    """
    if not isinstance(cfg, DetectorConfig):
        raise TypeError(f"build_detector expects a DetectorConfig, got {type(cfg).__name__}")
    backbone = build_backbone(cfg)
    options = cfg.harmonic_options()
    num_classes = cfg.num_classes
    min_size, max_size = cfg.resolved("min_size"), cfg.resolved("max_size")
    post = {"score_thresh": cfg.resolved("score_thresh"), "detections_per_img": cfg.resolved("detections_per_img")}
    channels = cfg.fpn_channels

    if cfg.arch == "ssd":
        if cfg.resolved("backbone") == "vgg16":
            anchors = DefaultBoxGenerator(**_SSD300_BOXES)
            return HarmonicSSD(backbone, anchors, (300, 300), num_classes, options=options, **_SSD300_NORMALIZATION, **post)
        anchors = DefaultBoxGenerator([[2]] + [[2, 3]] * 3 + [[2]])
        head = SSDHead([channels] * 5, anchors.num_anchors_per_location(), num_classes + 1)
        return HarmonicSSD(backbone, anchors, (min_size, min_size), num_classes, options=options, head=head, **post)

    sizes = default_anchor_sizes(cfg)
    num_levels = len(level_strides(cfg))
    if len(sizes) != num_levels:
        raise ValueError(
            f"DetectorConfig.anchor_sizes has {len(sizes)} levels but the {cfg.resolved('backbone')} backbone "
            f"of {cfg.arch} returns {num_levels} feature levels"
        )
    if cfg.arch == "refinedet":
        return _build_refinedet(cfg, backbone, sizes, options, post)
    if cfg.arch == "retinanet":
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * num_levels)
        head = HarmonicRetinaNetHead(
            channels, anchors.num_anchors_per_location()[0], num_classes,
            options=options, comparison=cfg.comparison_options(), crowd_iof_thresh=cfg.crowd_iof_thresh,
            norm_layer=partial(nn.GroupNorm, HEAD_GN_GROUPS) if cfg.head_norm == "gn" else None,
        )
        return HarmonicRetinaNet(
            backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchors, head=head, **post
        )
    if cfg.arch == "fcos":
        anchors = AnchorGenerator(sizes, ((1.0,),) * num_levels)
        head = HarmonicFCOSHead(channels, 1, num_classes, options=options, crowd_iof_thresh=cfg.crowd_iof_thresh)
        return HarmonicFCOS(
            backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchors, head=head, **post
        )
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * num_levels)
    two_stage = dict(
        options=options, min_size=min_size, max_size=max_size, rpn_anchor_generator=anchors,
        box_score_thresh=post["score_thresh"], box_detections_per_img=post["detections_per_img"],
        **{name: getattr(cfg, name) for name in TWO_STAGE_SAMPLING if getattr(cfg, name) is not None},
    )
    if cfg.arch == "mask_rcnn":
        return HarmonicMaskRCNN(backbone, num_classes, mask_channels=channels, **two_stage)
    return HarmonicFasterRCNN(backbone, num_classes, **two_stage)


def _build_refinedet(cfg: DetectorConfig, backbone: nn.Module, sizes, options, post) -> nn.Module:
    """RefineDet512 on VGG16 (TCB width 256, SSD300's input normalization) or on an FPN backbone (TCB
    width ``fpn_channels``, ImageNet normalization) [D]."""
    vgg = isinstance(backbone, RefineDetVGG16)
    in_channels = list(backbone.out_channels) if vgg else [cfg.fpn_channels] * 4
    head = RefineDetHead(in_channels, len(sizes[0]) * len(ASPECT_RATIOS), cfg.num_classes + 1, 256 if vgg else cfg.fpn_channels)
    normalization = _SSD300_NORMALIZATION if vgg else {}
    return HarmonicRefineDet(
        backbone, head, level_strides(cfg), sizes, cfg.resolved("min_size"), cfg.num_classes, options=options,
        harmonic_arm=cfg.refinedet_harmonic_arm, **normalization, **post,
    )


def _recorder(model: nn.Module) -> StatsMixin | None:
    """The first :class:`StatsMixin` module of ``model`` that recorded something, or None."""
    for module in unwrap(model).modules():
        if isinstance(module, StatsMixin) and (module.harmonic_stats or module.harmonic_samples):
            return module
    return None


def get_stats(model: nn.Module) -> dict[str, float]:
    """The loss's statistics over the positives of the last training forward, read in one host sync.

    Harmonic loss: ``{"beta_r", "beta_c", "num_positives"}`` (the means only when there was a positive)
    and, when there was a positive, the watch statistics :data:`harmonic.losses.WATCH_KEYS` (percentiles
    of x = the factor's CE, y = L_loc, decoded IoU and score; ``"watch/reversed_share"``, the share of
    positives with dF/dx < 0, where Eq. 8-9 fail and the score is pushed down [D];
    ``"watch/box_pushed_away_share"``, Eq. 5's bracket below zero; ``"watch/cls_multiplier"``, the mean
    dF/dx). Baseline RetinaNet, Faster R-CNN, Mask R-CNN, SSD and RefineDet: the same watch statistics as
    counterfactuals (``"watch/counterfactual"`` 1; see :func:`harmonic.models.head_loss.dense_watch_counterfactual`);
    baseline FCOS: empty. Comparison loss: ``{"num_positives", "mean_iou"}`` (mean quality target, only
    when there was a positive). Empty before the first training forward. ``DistributedDataParallel`` is
    unwrapped. The values are stacked into one tensor and read with a single ``.tolist()``.
    """
    module = _recorder(model)
    if module is None or not module.harmonic_stats:
        return {}
    keys = list(module.harmonic_stats)
    values = torch.stack([module.harmonic_stats[k].reshape(()) for k in keys]).tolist()
    return dict(zip(keys, values))


def get_samples(model: nn.Module) -> dict[str, Tensor]:
    """The detached per-positive tensors [P] of the last training forward: ``{"x", "y", "score"}`` (the
    factor's CE, L_loc and the ground-truth class score, as :func:`get_stats`' watch statistics use them);
    empty when there was no positive, for a comparison loss and baseline FCOS. Left on the model's device."""
    module = _recorder(model)
    return dict(module.harmonic_samples) if module is not None else {}


def set_record_candidates(model: nn.Module, flag: bool) -> None:
    """When on, eval outputs also carry ``candidate_boxes`` / ``candidate_scores`` / ``candidate_labels``:
    the candidates after the score threshold and top-k, before NMS (original image coordinates)."""
    found = False
    for module in unwrap(model).modules():
        if hasattr(module, "record_candidates"):
            module.record_candidates = bool(flag)
            found = True
    if not found:
        raise TypeError(f"set_record_candidates needs a detector from build_detector, got {type(model).__name__}")
