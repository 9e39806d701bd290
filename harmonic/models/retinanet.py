"""RetinaNet with the Harmonic loss: a subclass of torchvision's head overriding ``compute_loss``.

Host losses (torchvision): sigmoid focal loss over the non-ignored anchors, L1 on the encoded offsets of
the positives (summed over the 4 coordinates), each ``/ max(1, num_foreground)`` per image and averaged
over images. With ``loss="harmonic"`` (supplement Eq. 1 [S]) the same normalization is kept and
:func:`harmonic.models.head_loss.dense_harmonic_loss` composes, per positive anchor i,

    CE_i    = focal loss of anchor i summed over the K classes ("loss" source [R]),
    L_loc_i = L1_i + hiou_weight * L_HIoU(decoded box, gt box)   [R],

split into ``classification`` / ``bbox_regression`` (+ ``task_contrasting``).

With a comparison loss (``loss="qfl"`` / ``"varifocal"`` / ``"iou_balanced"`` [D]),
:func:`harmonic.models.head_loss.dense_comparison_loss` replaces only the classification loss (and for
``"iou_balanced"`` weights the positives), image by image, on the same pieces: the valid anchors, the
L1 box loss, the decoded boxes (whose detached IoU with the matched ground truth is the quality target)
and the per-image ``max(1, num_foreground)``, averaged over images as the host does.

Labels [D]: the classification head has K columns (RetinaNet's sigmoid head needs no background
column); targets and outputs use labels 1..K, shifted by one internally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.ops import boxes as box_ops

from harmonic.models.common import (
    HarmonicTransform,
    ImageCandidates,
    StatsMixin,
    float32_losses,
    ignore_crowd_in_batch,
)
from harmonic.models.head_loss import (
    ComparisonOptions,
    HarmonicOptions,
    dense_comparison_loss,
    dense_harmonic_loss,
    dense_watch_counterfactual,
    split_losses_and_stats,
)

__all__ = ["HarmonicRetinaNet", "HarmonicRetinaNetHead", "shift_labels"]


def shift_labels(targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Copies of ``targets`` with labels 1..K mapped to the sigmoid head's columns 0..K-1."""
    return [{**t, "labels": t["labels"] - 1} for t in targets]


class HarmonicRetinaNetHead(StatsMixin, RetinaNetHead):
    """torchvision's ``RetinaNetHead`` whose ``compute_loss`` is the Harmonic loss when ``options`` is set,
    a comparison loss when ``comparison`` is set, and torchvision's own otherwise (recording the watch
    statistics as counterfactuals, :meth:`watch_counterfactual`). Crowd regions: negatives inside them are
    ignored [D]."""

    def __init__(self, in_channels, num_anchors, num_classes, *, options: HarmonicOptions | None = None,
                 comparison: ComparisonOptions | None = None, crowd_iof_thresh: float = 0.5,
                 norm_layer=None) -> None:
        if options is not None and comparison is not None:
            raise ValueError("HarmonicRetinaNetHead takes either options (Harmonic loss) or comparison, not both")
        if comparison is not None and not isinstance(comparison, ComparisonOptions):
            raise TypeError(f"comparison must be a ComparisonOptions or None, got {type(comparison).__name__}")
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        self.options = options
        self.comparison = comparison
        self.crowd_iof_thresh = crowd_iof_thresh
        self._init_stats()

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        matched_idxs = ignore_crowd_in_batch(matched_idxs, anchors, targets, self.crowd_iof_thresh)
        if self.comparison is not None:
            result = self.comparison_loss(targets, head_outputs, anchors, matched_idxs)
        elif self.options is not None:
            result = self.harmonic_loss(targets, head_outputs, anchors, matched_idxs)
        else:
            losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
            self._record_stats(self.watch_counterfactual(targets, head_outputs, anchors, matched_idxs))
            return losses
        losses, stats = split_losses_and_stats(result)
        self._record_stats(stats)
        return losses

    def _positive_pieces(self, target, regression, anchors_i, matched):
        """One image's positives: (their indices [P], classes [P] in 0..K-1, L1 box loss [P] on the encoded
        offsets summed over the 4 coordinates, decoded boxes [P, 4], matched gt boxes [P, 4])."""
        box_coder = self.regression_head.box_coder
        foreground = torch.where(matched >= 0)[0]
        gt_boxes = target["boxes"][matched[foreground]]
        reg, anc = regression[foreground].float(), anchors_i[foreground]
        box_loss = F.l1_loss(reg, box_coder.encode_single(gt_boxes, anc), reduction="none").sum(1)
        return foreground, target["labels"][matched[foreground]], box_loss, box_coder.decode_single(reg, anc), gt_boxes

    def _image_pieces(self, targets, head_outputs, anchors, matched_idxs):
        """Per image: (valid logits [A, K], classes [A] (-1 negative), L1 box loss [P], decoded boxes
        [P, 4], matched gt boxes [P, 4], number of foreground anchors), as torchvision's loss sees them."""
        ignored = self.classification_head.BETWEEN_THRESHOLDS
        for target, logits, regression, anchors_i, matched in zip(
            targets, head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors, matched_idxs
        ):
            valid = matched != ignored
            foreground, fg_classes, box_loss, pred, gt_boxes = self._positive_pieces(target, regression, anchors_i, matched)
            classes = torch.full_like(matched, -1)
            classes[foreground] = fg_classes
            yield logits[valid], classes[valid], box_loss, pred, gt_boxes, foreground.numel()

    def watch_counterfactual(self, targets, head_outputs, anchors, matched_idxs) -> dict[str, Tensor]:
        """The baseline's watch statistics as counterfactuals [D]: :func:`dense_watch_counterfactual` on
        the positives' logits, L1 box loss and decoded boxes of the whole batch (detached; x = the focal
        loss summed over classes, y = L1 + 1.5 L_HIoU, the default Harmonic + HIoU options)."""
        columns: list[list[Tensor]] = [[], [], [], [], []]
        with torch.no_grad():
            for target, logits, regression, anchors_i, matched in zip(
                targets, head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors, matched_idxs
            ):
                foreground, *pieces = self._positive_pieces(target, regression, anchors_i, matched)
                for column, piece in zip(columns, [logits[foreground], *pieces]):
                    column.append(piece)
            return dense_watch_counterfactual(*(torch.cat(column) for column in columns))

    def harmonic_loss(self, targets, head_outputs, anchors, matched_idxs) -> dict[str, Tensor]:
        """Batched :func:`dense_harmonic_loss` with torchvision's per-image normalization.

        Every anchor of image b gets the divisor ``max(1, n_b) * B``, so the sums equal torchvision's
        mean over images of per-image sums ``/ max(1, n_b)``.
        """
        num_images = len(targets)
        pieces: dict[str, list[Tensor]] = {k: [] for k in ("logits", "classes", "divisor", "box_loss", "pred", "gt")}
        for logits, classes, box_loss, pred, gt, num_foreground in self._image_pieces(
            targets, head_outputs, anchors, matched_idxs
        ):
            divisor = max(1, num_foreground) * num_images
            pieces["logits"].append(logits)
            pieces["classes"].append(classes)
            pieces["divisor"].append(torch.full((classes.numel(),), float(divisor), device=logits.device))
            pieces["box_loss"].append(box_loss)
            pieces["pred"].append(pred)
            pieces["gt"].append(gt)
        cat = {k: torch.cat(v) for k, v in pieces.items()}
        return dense_harmonic_loss(
            cat["logits"], cat["classes"], cat["box_loss"], cat["pred"], cat["gt"],
            num_foreground=cat["divisor"], options=self.options,
        )

    def comparison_loss(self, targets, head_outputs, anchors, matched_idxs) -> dict[str, Tensor]:
        """:func:`dense_comparison_loss` image by image, averaged over images (torchvision's reduction);
        statistics: the total number of positives and the mean quality target ``mean_iou`` over them."""
        results = [
            dense_comparison_loss(
                self.comparison, logits, classes, box_loss, pred, gt, num_foreground=num_foreground,
            )
            for logits, classes, box_loss, pred, gt, num_foreground in self._image_pieces(
                targets, head_outputs, anchors, matched_idxs
            )
        ]
        out = {key: sum(r[key] for r in results) / len(results) for key in ("classification", "bbox_regression")}
        num_positives = sum(r["num_positives"] for r in results)
        out["num_positives"] = num_positives
        if float(num_positives) > 0:
            out["mean_iou"] = sum(r["mean_iou"] * r["num_positives"] for r in results if "mean_iou" in r) / num_positives
        return out


class HarmonicRetinaNet(RetinaNet):
    """torchvision's ``RetinaNet`` with labels 1..K on a K-column head, crowd regions, the Harmonic head
    and optional pre-NMS candidates in the eval outputs (``record_candidates``)."""

    def __init__(self, backbone, num_classes: int, **kwargs) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        self.transform = HarmonicTransform.from_transform(self.transform, num_classes)
        self.record_candidates = False

    @float32_losses
    def compute_loss(self, targets, head_outputs, anchors):
        return super().compute_loss(shift_labels(targets), head_outputs, anchors)

    def postprocess_detections(self, head_outputs, anchors, image_shapes):
        """torchvision's post-processing (score threshold, per-level top-k, decode, clip, NMS), labels
        shifted back to 1..K, candidates kept when ``record_candidates``."""
        detections = []
        for index, image_shape in enumerate(image_shapes):
            candidates = ImageCandidates(self)
            for regression, logits, level_anchors in zip(
                [br[index] for br in head_outputs["bbox_regression"]],
                [cl[index] for cl in head_outputs["cls_logits"]],
                anchors[index],
            ):
                scores, anchor_idxs, labels = candidates.select_anchors(torch.sigmoid(logits))
                boxes = self.box_coder.decode_single(regression[anchor_idxs], level_anchors[anchor_idxs])
                candidates.add(box_ops.clip_boxes_to_image(boxes, image_shape), scores, labels)
            detections.append(candidates.finish())
        return detections
