"""Faster R-CNN with the Harmonic loss on the box head: a ``RoIHeads`` subclass with its own loss step.

Host losses (torchvision's ``fastrcnn_loss``): softmax cross-entropy averaged over the sampled RoIs, and
smooth L1 (beta = 1/9) on the encoded offsets of the positives' ground-truth class, summed and divided
by the number of sampled RoIs. With ``loss="harmonic"`` :func:`harmonic.models.head_loss.softmax_harmonic_loss`
composes, per positive RoI i (supplement Eq. 1 and 4 [S]),

    CE_i = cross-entropy, beta_c = exp(-CE_i) = p_i,
    L_loc_i = smooth-L1_i (summed over 4 coordinates) + hiou_weight * L_HIoU(decoded box, gt box) [R],

normalized by the number of sampled RoIs as the host does, under the host's keys ``loss_classifier`` /
``loss_box_reg`` (+ ``task_contrasting``). The RPN keeps torchvision's losses [D]: the paper applies the
loss to the detection head; nothing recovered says it touched the RPN.

:class:`HarmonicRoIHeads` also carries torchvision's mask branch when it is given one
(:mod:`harmonic.models.mask_rcnn`): the mask loss and mask inference are torchvision's own
(``maskrcnn_loss``, ``maskrcnn_inference``), unchanged. Keypoint heads are not supported. ``crowd_boxes``
are not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import boxes as box_ops

from harmonic.models.common import HarmonicTransform, StatsMixin, finish_detections, float32_losses
from harmonic.models.head_loss import (
    HarmonicOptions,
    softmax_harmonic_loss,
    softmax_watch_counterfactual,
    split_losses_and_stats,
)

__all__ = ["HarmonicFasterRCNN", "HarmonicRoIHeads"]

_KEYS = {"classification": "loss_classifier", "bbox_regression": "loss_box_reg"}


class HarmonicRoIHeads(StatsMixin, RoIHeads):
    """torchvision's ``RoIHeads`` whose box loss step is the Harmonic loss when ``options`` is set and
    torchvision's ``fastrcnn_loss`` otherwise; eval outputs can carry pre-NMS candidates.

    With a mask branch (``mask_roi_pool``, ``mask_head``, ``mask_predictor``, as torchvision's
    ``RoIHeads`` takes them) it is Mask R-CNN's RoI heads: training adds ``loss_mask`` (torchvision's
    ``maskrcnn_loss`` on the positive sampled RoIs, targets need ``masks`` [N, H, W]), eval outputs add
    ``masks`` [n, 1, H, W] (torchvision's ``maskrcnn_inference``: the sigmoid of the detected class's mask
    logits, pasted into the image by the model's transform).
    """

    def __init__(self, *args, options: HarmonicOptions | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.options = options
        self.record_candidates = False
        self._init_stats()

    @classmethod
    def from_roi_heads(cls, heads: RoIHeads, options: HarmonicOptions | None) -> HarmonicRoIHeads:
        """The same modules and settings as ``heads`` (its mask branch included), with the Harmonic loss step."""
        if heads.has_keypoint():
            raise ValueError("HarmonicRoIHeads supports the box and mask branches only (no keypoint heads)")
        return cls(
            heads.box_roi_pool, heads.box_head, heads.box_predictor,
            heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
            mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head, mask_predictor=heads.mask_predictor,
            options=options,
        )

    def forward(self, features, proposals, image_shapes, targets=None):
        """torchvision's RoI heads: sample RoIs (training), pool, predict, then the box loss or detections;
        with a mask branch, then the mask loss or the detections' masks."""
        if targets is not None:
            for t in targets:
                if t["boxes"].dtype not in (torch.float, torch.double, torch.half):
                    raise TypeError(f"target boxes must be of float type, got {t['boxes'].dtype}")
                if t["labels"].dtype != torch.int64:
                    raise TypeError(f"target labels must be of int64 type, got {t['labels'].dtype}")
            for index, t in enumerate(targets):
                if self.training and self.has_mask() and "masks" not in t:
                    raise ValueError(f"targets[{index}] needs 'masks' [N, H, W] to train a detector with a mask branch")
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if not self.training:
            result = self.detections(class_logits, box_regression, proposals, image_shapes)
            if self.has_mask():
                self.mask_detections(features, result, image_shapes)
            return result, {}
        losses = self.box_loss(class_logits, box_regression, proposals, matched_idxs, labels, regression_targets,
                               targets)
        if self.has_mask():
            losses["loss_mask"] = self.mask_loss(features, proposals, image_shapes, targets, labels, matched_idxs)
        return [], losses

    def mask_loss(self, features, proposals, image_shapes, targets, labels, matched_idxs) -> Tensor:
        """torchvision's ``maskrcnn_loss`` on the positive sampled RoIs (their matched targets' ``masks``)."""
        positives = [torch.where(image_labels > 0)[0] for image_labels in labels]
        mask_proposals = [p[pos] for p, pos in zip(proposals, positives)]
        positive_matched_idxs = [m[pos] for m, pos in zip(matched_idxs, positives)]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
        return maskrcnn_loss(
            mask_logits, mask_proposals, [t["masks"] for t in targets], [t["labels"] for t in targets],
            positive_matched_idxs,
        )

    def mask_detections(self, features, result: list[dict[str, Tensor]], image_shapes) -> None:
        """Add ``masks`` [n, 1, 28, 28] (per detection, torchvision's ``maskrcnn_inference``) to each image's
        detections in place; the model's transform pastes them into the image."""
        boxes = [r["boxes"] for r in result]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
        for probabilities, r in zip(maskrcnn_inference(mask_logits, [r["labels"] for r in result]), result):
            r["masks"] = probabilities

    @float32_losses
    def box_loss(
        self, class_logits, box_regression, proposals, matched_idxs, labels, regression_targets, targets
    ) -> dict[str, Tensor]:
        """The box head's loss, in float32: torchvision's ``fastrcnn_loss`` (the watch statistics recorded as
        counterfactuals, :func:`softmax_watch_counterfactual`), or the Harmonic loss when ``options`` is set
        (its terms under torchvision's key names, statistics recorded)."""
        if self.options is None:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            with torch.no_grad():
                labels_cat, positive, *pieces = self._positive_pieces(
                    box_regression, proposals, matched_idxs, labels, regression_targets, targets
                )
                self._record_stats(softmax_watch_counterfactual(class_logits[positive], labels_cat[positive], *pieces))
            return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        result = self.harmonic_loss(
            class_logits, box_regression, proposals, matched_idxs, labels, regression_targets, targets
        )
        losses, stats = split_losses_and_stats(result)
        self._record_stats(stats)
        return {_KEYS.get(k, k): v for k, v in losses.items()}

    def harmonic_loss(
        self, class_logits, box_regression, proposals, matched_idxs, labels, regression_targets, targets
    ) -> dict[str, Tensor]:
        """:func:`softmax_harmonic_loss` over the sampled RoIs, normalized by their number (as the host)."""
        labels, _, box_loss, pred_boxes, gt_boxes = self._positive_pieces(
            box_regression, proposals, matched_idxs, labels, regression_targets, targets
        )
        return softmax_harmonic_loss(
            class_logits, labels, box_loss, pred_boxes, gt_boxes, normalizer=labels.numel(), options=self.options,
        )

    def _positive_pieces(self, box_regression, proposals, matched_idxs, labels, regression_targets, targets):
        """The sampled RoIs' labels [A] (concatenated), the positives' indices [P], their smooth L1 (beta
        1/9, summed over the 4 encoded coordinates of the ground-truth class) [P], decoded boxes [P, 4] and
        matched ground-truth boxes [P, 4]."""
        labels = torch.cat(labels)
        regression_targets = torch.cat(regression_targets)
        gt_boxes = torch.cat([
            t["boxes"][m] if t["boxes"].numel() else t["boxes"].new_zeros((len(m), 4))
            for t, m in zip(targets, matched_idxs)
        ])
        positive = torch.where(labels > 0)[0]
        box_regression = box_regression.reshape(labels.shape[0], -1, 4)
        regression = box_regression[positive, labels[positive]].float()
        box_loss = F.smooth_l1_loss(regression, regression_targets[positive], beta=1 / 9, reduction="none").sum(1)
        pred_boxes = self.box_coder.decode_single(regression, torch.cat(proposals)[positive])
        return labels, positive, box_loss, pred_boxes, gt_boxes[positive]

    def detections(self, class_logits, box_regression, proposals, image_shapes) -> list[dict[str, Tensor]]:
        """torchvision's ``postprocess_detections`` (softmax, per-class boxes, score threshold, small-box
        removal, class-wise NMS, top-k), with the pre-NMS candidates kept when ``record_candidates``."""
        num_classes = class_logits.shape[-1]
        boxes_per_image = [len(p) for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(boxes_per_image, 0)
        pred_scores = F.softmax(class_logits, -1).split(boxes_per_image, 0)
        results = []
        for boxes, scores, image_shape in zip(pred_boxes, pred_scores, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            labels = torch.arange(num_classes, device=class_logits.device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            inds = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            results.append(
                finish_detections(
                    boxes[keep], scores[keep], labels[keep], nms_thresh=self.nms_thresh,
                    detections_per_img=self.detections_per_img, record_candidates=self.record_candidates,
                )
            )
        return results


class HarmonicFasterRCNN(FasterRCNN):
    """torchvision's ``FasterRCNN`` (``num_classes`` = K, without background: the box predictor gets
    K + 1 outputs as torchvision expects) with :class:`HarmonicRoIHeads`."""

    def __init__(self, backbone, num_classes: int, *, options: HarmonicOptions | None = None, **kwargs) -> None:
        super().__init__(backbone, num_classes + 1, **kwargs)
        self.roi_heads = HarmonicRoIHeads.from_roi_heads(self.roi_heads, options)
        self.transform = HarmonicTransform.from_transform(self.transform, num_classes)
