"""FCOS with the Harmonic loss: a subclass of torchvision's ``FCOSHead`` overriding ``compute_loss``.

Host losses (torchvision): sigmoid focal loss over all anchor points, GIoU loss on the decoded boxes of
the positives, centerness BCE on the positives, each summed over the batch ``/ max(1, num_foreground)``.
With ``loss="harmonic"`` :func:`harmonic.models.head_loss.dense_harmonic_loss` composes, per positive point i,

    CE_i    = focal loss of point i summed over the K classes ("loss" source [R]),
    L_loc_i = GIoU_i + hiou_weight * L_HIoU(decoded box, gt box)   [R];

the centerness loss is unchanged (not part of Eq. 1).

Departures [D]: K-column head with labels 1..K outside (as RetinaNet here); negatives inside a crowd
region are left out of the classification loss (torchvision's FCOS has no ignore state); the head's
GroupNorm uses gcd(32, C) groups so any ``fpn_channels`` works (32 groups, torchvision's, when C % 32 == 0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.fcos import FCOS, FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from harmonic.models.backbones import fcos_head_norm
from harmonic.models.common import (
    IGNORED,
    HarmonicTransform,
    ImageCandidates,
    StatsMixin,
    float32_losses,
    ignore_crowd_in_batch,
)
from harmonic.models.head_loss import HarmonicOptions, dense_harmonic_loss, split_losses_and_stats
from harmonic.models.retinanet import shift_labels

__all__ = ["HarmonicFCOS", "HarmonicFCOSHead"]


class HarmonicFCOSHead(StatsMixin, FCOSHead):
    """torchvision's ``FCOSHead`` whose ``compute_loss`` is the Harmonic loss when ``options`` is set."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4, *,
                 options: HarmonicOptions | None = None, crowd_iof_thresh: float = 0.5) -> None:
        nn.Module.__init__(self)  # FCOSHead.__init__ hard-codes GroupNorm(32); same modules, same order
        norm = fcos_head_norm(in_channels)
        self.box_coder = det_utils.BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(in_channels, num_anchors, num_classes, num_convs, norm_layer=norm)
        self.regression_head = FCOSRegressionHead(in_channels, num_anchors, num_convs, norm_layer=norm)
        self.options = options
        self.crowd_iof_thresh = crowd_iof_thresh
        self._init_stats()

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        matched_idxs = ignore_crowd_in_batch(matched_idxs, anchors, targets, self.crowd_iof_thresh)
        if self.options is None and not any(bool((m == IGNORED).any()) for m in matched_idxs):
            return super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        losses, stats = split_losses_and_stats(self._loss_with_ignored(targets, head_outputs, anchors, matched_idxs))
        if self.options is not None:
            self._record_stats(stats)
        return losses

    def _loss_with_ignored(self, targets, head_outputs, anchors, matched_idxs) -> dict[str, Tensor]:
        """torchvision's FCOS loss with ignored points (-2) left out of the classification term, and the
        Harmonic composition when ``options`` is set."""
        cls_logits = head_outputs["cls_logits"]  # [N, HWA, K]
        bbox_regression = head_outputs["bbox_regression"]  # [N, HWA, 4]
        bbox_ctrness = head_outputs["bbox_ctrness"]  # [N, HWA, 1]
        gt_classes, gt_boxes = [], []
        for target, matched in zip(targets, matched_idxs):
            if len(target["labels"]) == 0:
                classes = target["labels"].new_zeros((len(matched),))
                boxes = target["boxes"].new_zeros((len(matched), 4))
            else:
                classes = target["labels"][matched.clip(min=0)]
                boxes = target["boxes"][matched.clip(min=0)]
            classes[matched < 0] = -1
            gt_classes.append(classes)
            gt_boxes.append(boxes)
        gt_classes, gt_boxes, anchors = torch.stack(gt_classes), torch.stack(gt_boxes), torch.stack(anchors)
        valid = torch.stack(matched_idxs) != IGNORED
        foreground = gt_classes >= 0
        num_foreground = int(foreground.sum())
        normalizer = max(1, num_foreground)

        pred_boxes = self.box_coder.decode(bbox_regression, anchors)
        giou = generalized_box_iou_loss(pred_boxes[foreground], gt_boxes[foreground], reduction="none")

        reg_targets = self.box_coder.encode(anchors, gt_boxes)
        if len(reg_targets) == 0:
            ctrness_targets = reg_targets.new_zeros(reg_targets.size()[:-1])
        else:
            left_right, top_bottom = reg_targets[:, :, [0, 2]], reg_targets[:, :, [1, 3]]
            ctrness_targets = torch.sqrt(
                (left_right.min(dim=-1)[0] / left_right.max(dim=-1)[0])
                * (top_bottom.min(dim=-1)[0] / top_bottom.max(dim=-1)[0])
            )
        loss_ctrness = nn.functional.binary_cross_entropy_with_logits(
            bbox_ctrness.squeeze(dim=2)[foreground], ctrness_targets[foreground], reduction="sum"
        )
        if self.options is None:
            one_hot = torch.zeros_like(cls_logits)
            one_hot[foreground, gt_classes[foreground]] = 1.0
            return {
                "classification": sigmoid_focal_loss(cls_logits[valid], one_hot[valid], reduction="sum") / normalizer,
                "bbox_regression": giou.sum() / normalizer,
                "bbox_ctrness": loss_ctrness / normalizer,
            }
        result = dense_harmonic_loss(
            cls_logits[valid], gt_classes[valid], giou, pred_boxes[foreground], gt_boxes[foreground],
            num_foreground=num_foreground, options=self.options,
        )
        result["bbox_ctrness"] = loss_ctrness / normalizer
        return result


class HarmonicFCOS(FCOS):
    """torchvision's ``FCOS`` with labels 1..K on a K-column head, crowd regions, the Harmonic head and
    optional pre-NMS candidates in the eval outputs (``record_candidates``)."""

    def __init__(self, backbone, num_classes: int, **kwargs) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        self.transform = HarmonicTransform.from_transform(self.transform, num_classes)
        self.record_candidates = False

    @float32_losses
    def compute_loss(self, targets, head_outputs, anchors, num_anchors_per_level):
        return super().compute_loss(shift_labels(targets), head_outputs, anchors, num_anchors_per_level)

    def postprocess_detections(self, head_outputs, anchors, image_shapes):
        """torchvision's FCOS post-processing (score sqrt(sigmoid(cls) sigmoid(ctr)), threshold, per-level
        top-k, decode, clip, NMS), labels shifted back to 1..K, candidates kept when recorded."""
        detections = []
        for index, image_shape in enumerate(image_shapes):
            candidates = ImageCandidates(self)
            for regression, logits, ctrness, level_anchors in zip(
                [br[index] for br in head_outputs["bbox_regression"]],
                [cl[index] for cl in head_outputs["cls_logits"]],
                [bc[index] for bc in head_outputs["bbox_ctrness"]],
                anchors[index],
            ):
                scores, anchor_idxs, labels = candidates.select_anchors(
                    torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(ctrness))
                )
                boxes = self.box_coder.decode(regression[anchor_idxs], level_anchors[anchor_idxs])
                candidates.add(box_ops.clip_boxes_to_image(boxes, image_shape), scores, labels)
            detections.append(candidates.finish())
        return detections
