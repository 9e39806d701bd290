"""SSD with the Harmonic loss: a subclass of torchvision's ``SSD`` overriding ``compute_loss``.

Host losses (torchvision): smooth L1 (beta = 1) on the encoded offsets of the positives, and softmax
cross-entropy over the positives plus the hard-mined negatives (3 per positive), both summed over the
batch and divided by N = max(1, number of positives). With ``loss="harmonic"`` the same samples and the
same N are kept and :func:`harmonic.models.head_loss.softmax_harmonic_loss` composes, per positive default box i
(supplement Eq. 1 and 4 [S]),

    CE_i = cross-entropy, beta_c = exp(-CE_i) = p_i,
    L_loc_i = smooth-L1_i (summed over 4 coordinates) + hiou_weight * L_HIoU(decoded box, gt box) [R].

Hard negatives are mined on the plain cross-entropy, as the host does. ``crowd_boxes`` are not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.ssd import SSD
from torchvision.ops import boxes as box_ops

from harmonic.models.common import HarmonicTransform, ImageCandidates, StatsMixin, float32_losses
from harmonic.models.head_loss import (
    HarmonicOptions,
    softmax_harmonic_loss,
    softmax_watch_counterfactual,
    split_losses_and_stats,
)

__all__ = ["HarmonicSSD"]


class HarmonicSSD(StatsMixin, SSD):
    """torchvision's ``SSD`` (``num_classes`` = K, without background; the head gets K + 1 columns as
    torchvision expects) with the Harmonic loss when ``options`` is set and optional pre-NMS candidates
    in the eval outputs (``record_candidates``)."""

    def __init__(self, backbone, anchor_generator, size, num_classes: int, *,
                 options: HarmonicOptions | None = None, **kwargs) -> None:
        super().__init__(backbone, anchor_generator, size, num_classes + 1, **kwargs)
        self.transform = HarmonicTransform.from_transform(self.transform, num_classes)
        self.options = options
        self.record_candidates = False
        self._init_stats()

    @float32_losses
    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        if self.options is None:
            losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
            with torch.no_grad():  # the baseline's watch statistics, as counterfactuals [D]
                box_loss, pred_boxes, gt_boxes, cls_targets = self._positive_pieces(targets, head_outputs, anchors, matched_idxs)
                foreground = cls_targets > 0
                self._record_stats(softmax_watch_counterfactual(
                    head_outputs["cls_logits"][foreground], cls_targets[foreground], box_loss, pred_boxes, gt_boxes,
                ))
            return losses
        losses, stats = split_losses_and_stats(self.harmonic_loss(targets, head_outputs, anchors, matched_idxs))
        self._record_stats(stats)
        return losses

    def harmonic_loss(self, targets, head_outputs, anchors, matched_idxs) -> dict[str, Tensor]:
        """torchvision's matching and hard-negative mining, then :func:`softmax_harmonic_loss` on the
        positives and mined negatives of the whole batch, normalized by max(1, number of positives)."""
        cls_logits = head_outputs["cls_logits"]
        box_loss, pred_boxes, gt_boxes, cls_targets = self._positive_pieces(targets, head_outputs, anchors, matched_idxs)
        num_classes = cls_logits.size(-1)

        # hard negative mining, exactly as torchvision
        with torch.no_grad():
            cls_loss = F.cross_entropy(cls_logits.view(-1, num_classes), cls_targets.view(-1), reduction="none")
            cls_loss = cls_loss.view(cls_targets.size())
        foreground = cls_targets > 0
        num_negative = self.neg_to_pos_ratio * foreground.sum(1, keepdim=True)
        negative_loss = cls_loss.clone()
        negative_loss[foreground] = -float("inf")
        _, idx = negative_loss.sort(1, descending=True)
        background = idx.sort(1)[1] < num_negative
        selected = foreground | background

        return softmax_harmonic_loss(
            cls_logits[selected], cls_targets[selected], box_loss, pred_boxes, gt_boxes,
            normalizer=int(foreground.sum()), options=self.options,
        )

    def _positive_pieces(self, targets, head_outputs, anchors, matched_idxs):
        """The batch's positives, image by image in anchor order: smooth L1 (beta 1, summed over the 4
        encoded coordinates) [P], decoded boxes [P, 4], matched gt boxes [P, 4]; and the class targets
        [N, A] (0 the background)."""
        cls_logits = head_outputs["cls_logits"]
        box_losses, pred_boxes, gt_boxes, cls_targets = [], [], [], []
        for target, regression, anchors_i, matched in zip(targets, head_outputs["bbox_regression"], anchors, matched_idxs):
            foreground = torch.where(matched >= 0)[0]
            matched_fg = matched[foreground]
            gt = target["boxes"][matched_fg]
            reg, anc = regression[foreground].float(), anchors_i[foreground]
            box_losses.append(F.smooth_l1_loss(reg, self.box_coder.encode_single(gt, anc), reduction="none").sum(1))
            pred_boxes.append(self.box_coder.decode_single(reg, anc))
            gt_boxes.append(gt)
            classes = torch.zeros(cls_logits.shape[1], dtype=target["labels"].dtype, device=target["labels"].device)
            classes[foreground] = target["labels"][matched_fg]
            cls_targets.append(classes)
        return torch.cat(box_losses), torch.cat(pred_boxes), torch.cat(gt_boxes), torch.stack(cls_targets)

    def postprocess_detections(self, head_outputs, image_anchors, image_shapes):
        """torchvision's SSD post-processing (softmax, decode, clip, per-class threshold and top-k, NMS),
        with the pre-NMS candidates kept when ``record_candidates``."""
        pred_scores = F.softmax(head_outputs["cls_logits"], dim=-1)
        num_classes = pred_scores.size(-1)
        detections = []
        for regression, scores, anchors, image_shape in zip(head_outputs["bbox_regression"], pred_scores, image_anchors, image_shapes):
            boxes = box_ops.clip_boxes_to_image(self.box_coder.decode_single(regression, anchors), image_shape)
            candidates = ImageCandidates(self)
            for label in range(1, num_classes):
                score, idxs = candidates.select(scores[:, label])
                candidates.add(boxes[idxs], score, torch.full_like(idxs, label))  # int64 labels
            detections.append(candidates.finish())
        return detections
