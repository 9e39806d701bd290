"""RefineDet (Zhang, Wen, Bian, Lei and Li, "Single-Shot Refinement Neural Network for Object Detection",
CVPR 2018) on torchvision parts, with the Harmonic loss on its object detection module.

The paper's parts (Sec. 3 and Fig. 1-2 of the RefineDet paper, [R]) and how they are built here:

* **Anchors**: one size per source layer, 4 x its stride, with aspect ratios 0.5, 1 and 2 (w / h), so
  A = 3 anchors per position, centred on the cells ((x + 0.5) * stride, as SSD's prior boxes).
* **Anchor refinement module (ARM)**: per source layer a 3x3 convolution predicting, per anchor, two
  objectness logits (background, object: the paper's binary classification as a two-class softmax) and
  four box offsets. The *refined anchors* are the anchors decoded by these offsets, **detached** (no
  gradient flows from the ODM into the ARM's offsets through them).
* **Transfer connection blocks (TCB)**, Fig. 2: conv3x3 - ReLU - conv3x3 on the source layer, plus a 4x4
  stride-2 deconvolution of the deeper TCB's output (not on the deepest layer), summed, then ReLU -
  conv3x3 - ReLU; 256 channels.
* **Object detection module (ODM)**: per TCB output a 3x3 convolution predicting C + 1 class logits
  (softmax, column 0 the background) and four box offsets *relative to the refined anchor*.
* **Matching**: each ground truth to its best-overlap anchor, then every anchor with IoU >= 0.5 to its
  best ground truth (torchvision's ``SSDMatcher``); the ARM matches the anchors, the ODM the refined
  anchors. Box coding: torchvision's ``BoxCoder`` with weights (10, 10, 5, 5), SSD's variances 0.1 / 0.2.
* **Negative anchor filtering**: a refined anchor whose ARM background probability exceeds
  theta = 0.99 (objectness below 0.01) is left out of the ODM's loss, positive or negative, and is dropped
  at inference.
* **Hard negative mining** in both modules: per image, the negatives (of the ODM: among the anchors kept
  by the filtering) with the highest cross-entropy, 3 per positive.
* **Loss** (Eq. 1 of the RefineDet paper):
  ``L = (sum_i L_b + sum_{i pos} L_r) / N_arm + (sum_i L_m + sum_{i pos} L_r) / N_odm`` with L_b the
  ARM's binary cross-entropy, L_m the ODM's softmax cross-entropy (positives and mined negatives), L_r
  smooth L1 (beta 1) on the encoded offsets summed over the 4 coordinates, and N the number of positive
  anchors of the module in the batch. Returned as the keys ``arm_classification``,
  ``arm_bbox_regression`` and (the ODM's, under the host keys every other detector uses)
  ``classification``, ``bbox_regression``.
* **Inference**: ODM boxes decoded from the refined anchors and clipped, filtered anchors removed, then
  per class the scores above ``score_thresh`` and the ``topk_candidates`` highest, class-wise NMS at
  ``nms_thresh``, the ``detections_per_img`` best, as :class:`harmonic.models.common.ImageCandidates`
  does for SSD (with the pre-NMS candidates when ``record_candidates``).

With ``loss="harmonic"`` the ODM's positives get the Harmonic loss through
:func:`harmonic.models.head_loss.softmax_harmonic_loss` (softmax CE, so beta_c = p_i; beta_r =
exp(-L_loc_i) with L_loc_i = smooth L1_i + hiou_weight * L_HIoU of the decoded box [R]), on the same
positives, mined negatives and N_odm. ``refinedet_harmonic_arm`` (:class:`HarmonicRefineDet`'s
``harmonic_arm``) does the same for the ARM, its binary CE written as a two-column softmax [D]. The
paper under reproduction reports RefineDet512 36.4 -> 38.8 AP on COCO test-dev with its method [R]; it
does not say whether the ARM took the Harmonic loss, hence the switch, off by default [D].

Where this departs from the RefineDet paper, or could not be confirmed against the authors' release:

* [D] The ODM is matched to the refined anchors and a filtered anchor leaves the ODM's loss also when it
  is a positive; both as we recall the authors' release (the paper says "refined anchors" are the ODM's
  input and filtered anchors are "discarded in training the ODM"), not confirmed.
* [D] The normalizers are ``max(1, N)``: the paper sets a module's loss to 0 when N = 0, which is what
  ``max(1, N)`` gives (no positives, no mined negatives), with the graph kept connected.
* [D] A deconvolution output larger than the shallower layer (odd sizes) is cropped to its size.
* [D] Head and TCB convolutions: Xavier-uniform weights and zero biases, as torchvision's SSD head.
* [D] Anchors are not clipped to the image; whether the authors' prior boxes were clipped was not
  confirmed.
* [D] Inference defaults (``nms_thresh`` 0.45, ``topk_candidates`` 1000 per class, 500 detections per
  image, score threshold 0.01) are the authors' test settings as we recall them, not confirmed.
* [D] On an FPN backbone (the CPU option) the four source layers are the FPN's stride 8 / 16 / 32 levels
  and a max-pooled stride-64 level, the TCB width is ``fpn_channels``, and the images are normalized
  with torchvision's ImageNet mean and std; the VGG16 network is :class:`harmonic.models.backbones.RefineDetVGG16`
  with SSD300's 0-255 input normalization.
* Data augmentation, the training schedule and the multi-scale test of the paper are not part of the
  model; ``crowd_boxes`` are not used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import boxes as box_ops

from harmonic.models.common import HarmonicTransform, ImageCandidates, StatsMixin
from harmonic.models.head_loss import (
    HarmonicOptions,
    softmax_harmonic_loss,
    softmax_watch_counterfactual,
    split_losses_and_stats,
)

__all__ = [
    "ASPECT_RATIOS",
    "NEGATIVE_FILTER_THRESH",
    "HarmonicRefineDet",
    "RefineDetHead",
    "refinedet_anchors",
]

#: the anchors' aspect ratios w / h (RefineDet paper, Sec. 3 [R])
ASPECT_RATIOS = (0.5, 1.0, 2.0)
#: theta: an anchor whose ARM background probability exceeds it is filtered out of the ODM [R]
NEGATIVE_FILTER_THRESH = 0.99
#: box coding weights: SSD's variances (0.1, 0.1, 0.2, 0.2) as torchvision's BoxCoder weights [R]
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def refinedet_anchors(
    feature_sizes: list[tuple[int, int]],
    strides: list[int],
    sizes: list[tuple[float, ...]],
    aspect_ratios: tuple[float, ...] = ASPECT_RATIOS,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The anchors of all levels, [sum_l H_l W_l A, 4] xyxy in the resized image's pixels.

    Level l has ``feature_sizes[l] = (H_l, W_l)`` positions at ``strides[l]`` pixels; position (y, x)
    carries, for every size s of ``sizes[l]`` and ratio r of ``aspect_ratios`` (in that order), the box of
    width ``s sqrt(r)`` and height ``s / sqrt(r)`` centred at ``((x + 0.5) stride, (y + 0.5) stride)``.
    Order: level, then y, then x, then (size, ratio), the order of :class:`RefineDetHead`'s outputs.
    """
    if not (len(feature_sizes) == len(strides) == len(sizes)):
        raise ValueError(
            f"feature_sizes, strides and sizes need one entry per level, got {len(feature_sizes)}, {len(strides)} "
            f"and {len(sizes)}"
        )
    out = []
    for (height, width), stride, level_sizes in zip(feature_sizes, strides, sizes):
        shapes = torch.tensor(
            [[s * math.sqrt(r), s / math.sqrt(r)] for s in level_sizes for r in aspect_ratios], dtype=dtype, device=device
        )
        ys = (torch.arange(height, dtype=dtype, device=device) + 0.5) * stride
        xs = (torch.arange(width, dtype=dtype, device=device) + 0.5) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)
        half = shapes.reshape(1, -1, 2) / 2
        out.append(torch.cat([centres - half, centres + half], dim=-1).reshape(-1, 4))
    return torch.cat(out)


def _flatten(level_outputs: list[Tensor], columns: int) -> Tensor:
    """[N, A * k, H, W] per level -> [N, sum_l H W A, k], positions (y, x) then anchors, as the anchors."""
    flat = []
    for out in level_outputs:
        n, _, height, width = out.shape
        flat.append(out.view(n, -1, columns, height, width).permute(0, 3, 4, 1, 2).reshape(n, -1, columns))
    return torch.cat(flat, dim=1)


class RefineDetHead(nn.Module):
    """The ARM, the transfer connection blocks and the ODM (RefineDet paper, Sec. 3, Fig. 1-2 [R]).

    ``in_channels``: channels of the source layers, shallow to deep; ``num_anchors``: A per position;
    ``num_columns``: the ODM's C + 1 class columns; ``tcb_channels``: the TCB width (256 in the paper).

    ``forward(features)`` (the source layers, shallow to deep) returns ``arm_cls_logits`` [N, R, 2],
    ``arm_bbox_regression`` [N, R, 4], ``cls_logits`` [N, R, C + 1] and ``bbox_regression`` [N, R, 4] for
    the R anchors in :func:`refinedet_anchors` order.
    """

    def __init__(self, in_channels: list[int], num_anchors: int, num_columns: int, tcb_channels: int = 256) -> None:
        super().__init__()
        t = tcb_channels
        self.num_columns = num_columns
        self.arm_cls = nn.ModuleList(nn.Conv2d(c, num_anchors * 2, 3, padding=1) for c in in_channels)
        self.arm_reg = nn.ModuleList(nn.Conv2d(c, num_anchors * 4, 3, padding=1) for c in in_channels)
        self.tcb_lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, t, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(t, t, 3, padding=1))
            for c in in_channels
        )
        # the deconvolution of level l + 1's TCB output, added to level l's lateral branch
        self.tcb_deconv = nn.ModuleList(nn.ConvTranspose2d(t, t, 4, stride=2, padding=1) for _ in in_channels[:-1])
        self.tcb_out = nn.ModuleList(
            nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(t, t, 3, padding=1), nn.ReLU(inplace=True)) for _ in in_channels
        )
        self.odm_cls = nn.ModuleList(nn.Conv2d(t, num_anchors * num_columns, 3, padding=1) for _ in in_channels)
        self.odm_reg = nn.ModuleList(nn.Conv2d(t, num_anchors * 4, 3, padding=1) for _ in in_channels)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def transfer(self, features: list[Tensor]) -> list[Tensor]:
        """The TCB outputs, deepest first computed: ``lateral_l + deconv(tcb_{l+1})``, then ReLU-conv-ReLU."""
        outputs: list[Tensor] = [features[0]] * len(features)
        deeper = None
        for level in range(len(features) - 1, -1, -1):
            x = self.tcb_lateral[level](features[level])
            if deeper is not None:
                up = self.tcb_deconv[level](deeper)
                x = x + up[..., : x.shape[-2], : x.shape[-1]]  # crop an odd-sized level [D]
            deeper = self.tcb_out[level](x)
            outputs[level] = deeper
        return outputs

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        if len(features) != len(self.arm_cls):
            raise ValueError(f"RefineDetHead expects {len(self.arm_cls)} source layers, got {len(features)}")
        transferred = self.transfer(features)
        return {
            "arm_cls_logits": _flatten([m(f) for m, f in zip(self.arm_cls, features)], 2),
            "arm_bbox_regression": _flatten([m(f) for m, f in zip(self.arm_reg, features)], 4),
            "cls_logits": _flatten([m(f) for m, f in zip(self.odm_cls, transferred)], self.num_columns),
            "bbox_regression": _flatten([m(f) for m, f in zip(self.odm_reg, transferred)], 4),
        }


class HarmonicRefineDet(StatsMixin, nn.Module):
    """RefineDet with torchvision's detection interface (see the module docstring for the definitions).

    Args:
        backbone: returns the four source layers (a dict, shallow to deep) of a [N, 3, S, S] batch.
        head: a :class:`RefineDetHead` for those layers.
        strides: the source layers' strides (8, 16, 32, 64 for RefineDet512).
        anchor_sizes: one tuple of anchor sizes per level (RefineDet: ``(4 * stride,)``).
        size: the fixed square side S images are resized to.
        num_classes: K, without background; targets carry labels 1..K, and so do the outputs.
        options: :class:`HarmonicOptions` for the Harmonic loss on the ODM, None for RefineDet's own loss.
        harmonic_arm: with ``options``, the Harmonic loss on the ARM's positives too [D].
        image_mean, image_std: input normalization of :class:`HarmonicTransform` (defaults: ImageNet's).
        score_thresh, nms_thresh, detections_per_img, topk_candidates: post-processing (see the module).
        neg_to_pos_ratio: hard negatives per positive (3 [R]).
        filter_thresh: theta of the negative anchor filtering (0.99 [R]).

    Train mode: ``model(images, targets) -> {"arm_classification", "arm_bbox_regression",
    "classification", "bbox_regression"}`` (plus ``task_contrasting`` terms when enabled). Eval mode:
    ``model(images) -> [{"boxes", "scores", "labels"}]`` in the original image coordinates, plus the
    candidates under :data:`harmonic.models.common.CANDIDATE_KEYS` when ``record_candidates``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: RefineDetHead,
        strides: list[int],
        anchor_sizes: tuple[tuple[float, ...], ...],
        size: int,
        num_classes: int,
        *,
        options: HarmonicOptions | None = None,
        harmonic_arm: bool = False,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        score_thresh: float = 0.01,
        nms_thresh: float = 0.45,
        detections_per_img: int = 500,
        topk_candidates: int = 1000,
        neg_to_pos_ratio: int = 3,
        filter_thresh: float = NEGATIVE_FILTER_THRESH,
    ) -> None:
        super().__init__()
        if len(strides) != len(anchor_sizes):
            raise ValueError(f"anchor_sizes needs one tuple per level ({len(strides)} levels), got {len(anchor_sizes)}")
        if len({len(level) for level in anchor_sizes}) != 1:
            raise ValueError("anchor_sizes needs the same number of sizes on every level")
        if harmonic_arm and options is None:
            raise ValueError("harmonic_arm=True needs options (the Harmonic loss); the baseline has no ARM switch")
        self.backbone = backbone
        self.head = head
        self.strides = list(strides)
        self.anchor_sizes = tuple(tuple(level) for level in anchor_sizes)
        self.box_coder = det_utils.BoxCoder(weights=BOX_CODER_WEIGHTS)
        self.matcher = det_utils.SSDMatcher(0.5)
        mean = [0.485, 0.456, 0.406] if image_mean is None else image_mean
        std = [0.229, 0.224, 0.225] if image_std is None else image_std
        self.transform = HarmonicTransform(
            size, size, mean, std, size_divisible=1, fixed_size=(size, size), num_classes=num_classes
        )
        self.num_classes = num_classes
        self.options = options
        self.harmonic_arm = harmonic_arm
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.neg_to_pos_ratio = neg_to_pos_ratio
        self.filter_thresh = filter_thresh
        self.record_candidates = False
        self._init_stats()

    # ------------------------------------------------------------------------------------------------
    def anchors(self, image_size: tuple[int, int], features: list[Tensor]) -> Tensor:
        """The anchors [R, 4] of a batch of ``image_size`` (the same for every image of the batch)."""
        if len(features) != len(self.strides):
            raise ValueError(f"the backbone returned {len(features)} source layers, RefineDet needs {len(self.strides)}")
        sizes = [tuple(f.shape[-2:]) for f in features]
        return refinedet_anchors(sizes, self.strides, list(self.anchor_sizes), device=features[0].device)

    def refine(self, arm_regression: Tensor, anchors: Tensor) -> Tensor:
        """The refined anchors [..., R, 4]: ``anchors`` decoded by the ARM's offsets, detached."""
        shape = arm_regression.shape
        flat = arm_regression.detach().reshape(-1, shape[-2], 4)
        refined = torch.stack([self.box_coder.decode_single(reg.float(), anchors) for reg in flat])
        return refined.reshape(shape)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training and targets is None:
            raise ValueError("targets must be given in training mode")
        original_sizes = []
        for index, image in enumerate(images):
            if not isinstance(image, Tensor) or image.dim() != 3:
                raise ValueError(f"images[{index}] must be a [3, H, W] tensor")
            original_sizes.append((int(image.shape[-2]), int(image.shape[-1])))
        image_list, targets = self.transform(images, targets)
        features = list(self.backbone(image_list.tensors).values())
        head_outputs = self.head(features)
        anchors = self.anchors(tuple(image_list.tensors.shape[-2:]), features)
        if self.training:
            return self.compute_loss(targets, head_outputs, anchors)
        detections = self.postprocess_detections(head_outputs, anchors, image_list.image_sizes)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    # ------------------------------------------------------------------------------------------------
    def match(self, gt_boxes: Tensor, boxes: Tensor) -> Tensor:
        """Index of the matched ground truth of each box [R], -1 for a negative (``SSDMatcher(0.5)``)."""
        if gt_boxes.numel() == 0:
            return torch.full((boxes.shape[0],), -1, dtype=torch.int64, device=boxes.device)
        return self.matcher(box_ops.box_iou(gt_boxes, boxes))

    def mine_negatives(self, cls_logits: Tensor, labels: Tensor, candidates: Tensor) -> Tensor:
        """Hard negative mining, per image: ``candidates`` [N, R] (bool) are the negatives that may be
        mined; the ``neg_to_pos_ratio * positives`` of them with the highest cross-entropy against
        ``labels`` [N, R] (0 the background) are returned as a [N, R] mask."""
        with torch.no_grad():
            loss = F.cross_entropy(cls_logits.reshape(-1, cls_logits.shape[-1]).float(), labels.reshape(-1), reduction="none")
            loss = loss.view(labels.shape).masked_fill(~candidates, -float("inf"))
            num_negative = self.neg_to_pos_ratio * (labels > 0).sum(1, keepdim=True)
            order = loss.argsort(dim=1, descending=True)
            rank = order.argsort(dim=1)
        return (rank < num_negative) & candidates

    def loss_pieces(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: Tensor) -> dict:
        """The samples and per-positive pieces of both modules' losses, for the whole batch.

        Returns ``{"arm": module, "odm": module, "kept": [N, R] bool}``, each module a dict with
        ``labels`` [N, R] (ARM: 0/1; ODM: 0..K), ``selected`` [N, R] (positives and mined negatives; for
        the ODM only among ``kept``, the anchors that pass the negative anchor filtering), ``box_loss``
        [P] (smooth L1 summed over the 4 encoded coordinates), ``pred_boxes`` [P, 4] and ``target_boxes``
        [P, 4] of its P positives, image by image in anchor order (the order of ``labels > 0`` masked by
        ``selected``), and ``num_positives`` (an int).
        """
        arm_logits, odm_logits = head_outputs["arm_cls_logits"], head_outputs["cls_logits"]
        refined = self.refine(head_outputs["arm_bbox_regression"], anchors)
        with torch.no_grad():
            background = F.softmax(arm_logits.detach().float(), dim=-1)[..., 0]
        kept = background <= self.filter_thresh
        pieces: dict[str, dict] = {}
        for name, logits, regression, priors in (
            ("arm", arm_logits, head_outputs["arm_bbox_regression"], None),
            ("odm", odm_logits, head_outputs["bbox_regression"], refined),
        ):
            labels = torch.zeros(logits.shape[:2], dtype=torch.int64, device=logits.device)
            box_loss, pred_boxes, target_boxes = [], [], []
            for b, target in enumerate(targets):
                boxes_b = anchors if priors is None else priors[b]
                matched = self.match(target["boxes"], boxes_b)
                positive = matched >= 0
                if name == "odm":
                    positive = positive & kept[b]
                index = torch.where(positive)[0]
                gt = target["boxes"][matched[index]]
                labels[b, index] = target["labels"][matched[index]] if name == "odm" else 1
                reg, prior = regression[b, index].float(), boxes_b[index]
                box_loss.append(F.smooth_l1_loss(reg, self.box_coder.encode_single(gt, prior), reduction="none").sum(1))
                pred_boxes.append(self.box_coder.decode_single(reg, prior))
                target_boxes.append(gt)
            candidates = labels == 0
            if name == "odm":
                candidates = candidates & kept
            selected = (labels > 0) | self.mine_negatives(logits, labels, candidates)
            pieces[name] = {
                "labels": labels,
                "selected": selected,
                "box_loss": torch.cat(box_loss),
                "pred_boxes": torch.cat(pred_boxes),
                "target_boxes": torch.cat(target_boxes),
                "num_positives": int((labels > 0).sum()),
            }
        pieces["kept"] = kept
        return pieces

    def compute_loss(
        self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: Tensor
    ) -> dict[str, Tensor]:
        """Both modules' losses (the module docstring's Eq. 1), baseline or Harmonic; the ODM's statistics
        recorded (the baseline's as counterfactuals, :func:`softmax_watch_counterfactual`)."""
        pieces = self.loss_pieces(targets, head_outputs, anchors)
        losses: dict[str, Tensor] = {}
        for name, logits_key, prefix in (("arm", "arm_cls_logits", "arm_"), ("odm", "cls_logits", "")):
            module = pieces[name]
            selected = module["selected"]
            logits, labels = head_outputs[logits_key][selected], module["labels"][selected]
            harmonic = self.options is not None and (name == "odm" or self.harmonic_arm)
            if harmonic:
                result, stats = split_losses_and_stats(softmax_harmonic_loss(
                    logits, labels, module["box_loss"], module["pred_boxes"], module["target_boxes"],
                    normalizer=module["num_positives"], options=self.options,
                ))
                if name == "odm":
                    self._record_stats(stats)
            else:
                normalizer = max(1, module["num_positives"])
                result = {
                    "classification": F.cross_entropy(logits.float(), labels, reduction="sum") / normalizer,
                    "bbox_regression": module["box_loss"].sum() / normalizer,
                }
                if name == "odm" and self.options is None:  # the baseline's watch statistics [D]
                    positive = labels > 0
                    self._record_stats(softmax_watch_counterfactual(
                        logits[positive].detach(), labels[positive], module["box_loss"], module["pred_boxes"],
                        module["target_boxes"],
                    ))
            losses.update({prefix + key: value for key, value in result.items()})
        return losses

    # ------------------------------------------------------------------------------------------------
    def postprocess_detections(
        self, head_outputs: dict[str, Tensor], anchors: Tensor, image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Per image: filtered anchors dropped, ODM boxes decoded from the refined anchors and clipped,
        per class the candidates of :class:`ImageCandidates`, class-wise NMS and the best
        ``detections_per_img`` (in the resized image's coordinates)."""
        refined = self.refine(head_outputs["arm_bbox_regression"], anchors)
        background = F.softmax(head_outputs["arm_cls_logits"].float(), dim=-1)[..., 0]
        scores_all = F.softmax(head_outputs["cls_logits"].float(), dim=-1)
        detections = []
        for b, image_shape in enumerate(image_shapes):
            kept = torch.where(background[b] <= self.filter_thresh)[0]
            boxes = self.box_coder.decode_single(head_outputs["bbox_regression"][b, kept].float(), refined[b, kept])
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            scores = scores_all[b, kept]
            candidates = ImageCandidates(self)
            for label in range(1, scores.shape[-1]):
                score, idxs = candidates.select(scores[:, label])
                candidates.add(boxes[idxs], score, torch.full_like(idxs, label))
            detections.append(candidates.finish())
        return detections
