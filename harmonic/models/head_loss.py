"""The Harmonic loss (supplement Eq. 1) composed on a detector head's own per-sample losses::

    L_Har = (1 + beta_r) * CE_i + (1 + beta_c) * L_loc_i,   beta_r = exp(-L_loc_i),  beta_c = exp(-CE_i)

with ``L_loc_i`` the host detector's own box loss of positive i plus ``hiou_weight * L_HIoU`` (Eq. 11) on
the decoded boxes; negatives keep the plain classification loss. The result is split into the host's own
loss keys (``classification``, ``bbox_regression``), so logs stay comparable with the baseline.

:func:`dense_harmonic_loss` serves sigmoid focal heads (RetinaNet, FCOS), :func:`softmax_harmonic_loss`
softmax heads (Faster R-CNN's box head, SSD), :func:`dense_comparison_loss` the comparison losses on a
sigmoid head. ``docs/head-loss.md`` explains the split, the normalizers and the choice of ``CE_i`` for a
sigmoid head.

Beside the losses, both Harmonic compositions return the watch statistics of their positives
(:func:`harmonic.losses.watch_statistics`: percentiles of ``x = CE_i`` of the factor and ``y = L_loc_i``,
the shares with ``dF/dx < 0`` (Eq. 8-9) and with Eq. 5's bracket below zero, the mean ``dF/dx``) and the
detached per-positive ``x``, ``y`` and score under :data:`SAMPLE_KEYS` (unless
``HarmonicOptions(watch=False)``). A baseline head computes the same numbers as counterfactuals from its
own pieces with :func:`dense_watch_counterfactual` / :func:`softmax_watch_counterfactual`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from harmonic.losses.comparison import iou_balanced_weights, quality_focal_loss, soft_targets, varifocal_loss
from harmonic.losses.harmonic import harmonic_factors
from harmonic.losses.hiou import aligned_box_iou, check_gamma, hiou_from_iou
from harmonic.losses.task_contrasting import FORMS as TC_FORMS
from harmonic.losses.task_contrasting import class_entropy, task_contrasting_loss
from harmonic.losses.watch import FACTOR_TERMS, WATCH_KEYS, watch_statistics
from harmonic.ops.focal import check_logits_and_classes, positive_rows, select_focal_loss

__all__ = [
    "BETA_C_SOURCES",
    "SAMPLE_KEYS",
    "STAT_KEYS",
    "TC_FORMS",
    "IOU_LOSSES",
    "HarmonicOptions",
    "localization_loss",
    "dense_harmonic_loss",
    "softmax_harmonic_loss",
    "COMPARISON_LOSSES",
    "ComparisonOptions",
    "dense_comparison_loss",
    "dense_watch_counterfactual",
    "softmax_watch_counterfactual",
    "split_losses_and_stats",
]

BETA_C_SOURCES = ("loss", "gt_prob", "gt_ce")
COMPARISON_LOSSES = ("qfl", "varifocal", "iou_balanced")
#: the IoU-type term added to L_loc: the Harmonic IoU loss (Eq. 11) or torchvision's GIoU loss (a control)
IOU_LOSSES = ("hiou", "giou")
#: detached per-positive tensors [P] returned beside the losses: x (the factor's CE), y (L_loc) and the
#: ground-truth class score, for the watch samples of a run (:func:`harmonic.models.get_samples`)
SAMPLE_KEYS = ("samples/x", "samples/y", "samples/score")
#: detached statistics returned beside the losses (never part of the total loss): 0-dim tensors, and the
#: per-positive tensors of :data:`SAMPLE_KEYS`
STAT_KEYS = ("beta_r", "beta_c", "num_positives", "mean_iou", *WATCH_KEYS, *SAMPLE_KEYS)


@dataclass(frozen=True)
class HarmonicOptions:
    """The options of the Harmonic loss on a detector head (validated on construction).

    ``hiou`` / ``hiou_weight`` / ``hiou_gamma``: add ``hiou_weight * L_HIoU(gamma)`` to L_loc [S Eq. 11;
    alpha = 1.5, gamma = 0.8 reported R]. ``tc_weight`` / ``tc_margin`` / ``tc_form``: the task-contrasting
    term [R], off when ``tc_weight == 0``. ``detach_factors``: constant factors (ablation [R]).
    ``beta_c_source``: what defines ``beta_c`` of a sigmoid head, ``"loss"`` (``CE_i`` := the anchor's
    focal loss summed over the K classes, what one third-party port did [R]), ``"gt_prob"``
    (``beta_c := sigmoid(x_gt)`` [D]) or ``"gt_ce"`` (consistent cross-entropy [D]: ``x = -log sigmoid(x_gt)``
    both in ``beta_c = e^-x`` and as the term ``(1 + beta_r)`` multiplies, in place of the ground-truth
    entry's focal loss; the anchor's other entries keep theirs); a softmax head has ``beta_c = p_i`` either
    way (Eq. 4).
    ``fused``: per-anchor focal implementation for sigmoid heads (False: reference, True:
    :func:`harmonic.ops.focal.focal_loss_per_anchor`, None: the fused one where it is faster).
    ``iou_loss``: the IoU-type term that ``hiou`` adds, ``"hiou"`` (Eq. 11, focusing ``hiou_gamma``) or
    ``"giou"`` (torchvision's generalized IoU loss, weighted by ``hiou_weight``; a control [D]).
    ``factors``: False sets beta_r = beta_c = 0 in the loss (classification loss + L_loc, unweighted; the
    factors are still computed, detached, for the statistics): the "baseline plus IoU term" controls [D].
    ``box_weight``: the weight of the host's own box loss in L_loc (1, the paper's [R]); with ``factors=False``
    and ``hiou=False``, ``box_weight=2`` is the host's loss with its box term doubled, a control of
    the regression's gradient scale without an IoU-type term [D].
    ``factor_terms``: which terms the factors weight, ``"both"`` (Eq. 1 [S]), ``"cls"`` (``(1 + beta_r) CE_i
    + L_loc_i``) or ``"box"`` (``CE_i + (1 + beta_c) L_loc_i``): controls that attribute an effect of the
    factors to one term [D]; only with ``factors=True``.
    ``watch``: add the watch statistics of the positives and their samples to the result
    (:func:`harmonic.losses.watch_statistics`, about 30 operations on ``[P]``-sized tensors); False leaves
    them out, for a caller that does not read them. The detectors of :func:`harmonic.models.build_detector`
    keep them on: the engine logs them every iteration.
    """

    hiou: bool = True
    hiou_weight: float = 1.5
    hiou_gamma: float = 0.8
    tc_weight: float = 0.0
    tc_margin: float = 0.2
    tc_form: str = "margin"
    detach_factors: bool = False
    beta_c_source: str = "loss"
    fused: bool | None = None
    iou_loss: str = "hiou"
    factors: bool = True
    box_weight: float = 1.0
    factor_terms: str = "both"
    watch: bool = True

    def __post_init__(self) -> None:
        for name in ("hiou", "detach_factors", "factors", "watch"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.fused is not None and not isinstance(self.fused, bool):
            raise TypeError(f"fused must be None (auto), True or False, got {self.fused!r}")
        for name in ("hiou_weight", "hiou_gamma", "tc_weight", "tc_margin", "box_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("hiou_weight", "tc_weight", "tc_margin", "box_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.hiou_gamma > 1:
            raise ValueError(
                f"hiou_gamma must be <= 1, got {self.hiou_gamma}: for gamma > 1 the Harmonic IoU loss is not "
                "monotone in IoU on [0, 1] (supplement Eq. 12-13)"
            )
        if self.tc_form not in TC_FORMS:
            raise ValueError(f"tc_form must be one of {TC_FORMS}, got {self.tc_form!r}")
        if self.beta_c_source not in BETA_C_SOURCES:
            raise ValueError(f"beta_c_source must be one of {BETA_C_SOURCES}, got {self.beta_c_source!r}")
        if self.iou_loss not in IOU_LOSSES:
            raise ValueError(f"iou_loss must be one of {IOU_LOSSES}, got {self.iou_loss!r}")
        if self.factor_terms not in FACTOR_TERMS:
            raise ValueError(f"factor_terms must be one of {FACTOR_TERMS}, got {self.factor_terms!r}")
        if self.factor_terms != "both" and not self.factors:
            raise ValueError(f"factor_terms={self.factor_terms!r} needs factors=True (with factors=False no term "
                             "is weighted)")


# ----------------------------------------------------------------------------------------------------
# composition
# ----------------------------------------------------------------------------------------------------
def _check_options(options: object, kind: type) -> None:
    if not isinstance(options, kind):
        raise TypeError(f"options must be a {kind.__name__}, got {type(options).__name__}")


def _check_positive_pieces(num_positive: int, box_loss: object, pred_boxes: object, target_boxes: object) -> None:
    if not isinstance(box_loss, Tensor) or box_loss.shape != (num_positive,):
        shape = tuple(box_loss.shape) if isinstance(box_loss, Tensor) else type(box_loss).__name__
        raise ValueError(f"box_loss must have shape [P] = [{num_positive}] (one per positive), got {shape}")
    for name, boxes in (("pred_boxes", pred_boxes), ("target_boxes", target_boxes)):
        if not isinstance(boxes, Tensor) or boxes.shape != (num_positive, 4):
            shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f"{name} must have shape [P, 4] = [{num_positive}, 4] (decoded xyxy), got {shape}")


def localization_loss(
    box_loss: Tensor,
    pred_boxes: Tensor,
    target_boxes: Tensor,
    *,
    hiou: bool = True,
    hiou_weight: float = 1.5,
    hiou_gamma: float = 0.8,
) -> Tensor:
    """``L_loc_i = box_loss_i + hiou_weight * L_HIoU(pred_i, target_i; gamma)`` [R], shape [P] (float32,
    or float64 for a float64 ``box_loss``).

    ``box_loss`` is the host's own per-positive box loss; the HIoU term (supplement Eq. 11) is added only
    when ``hiou`` is true and ``hiou_weight > 0``, on decoded xyxy boxes.
    """
    return _localization(box_loss, pred_boxes, target_boxes, hiou=hiou, hiou_weight=hiou_weight,
                         hiou_gamma=hiou_gamma)[0]


def _localization(
    box_loss: Tensor, pred_boxes: Tensor, target_boxes: Tensor, *, hiou: bool, hiou_weight: float, hiou_gamma: float,
    iou_loss: str = "hiou", box_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """``(L_loc, IoU)`` of the positives, the IoU of their decoded boxes computed once: the HIoU term
    (Eq. 11, as :func:`harmonic.losses.harmonic_iou_loss`), the task-contrasting term and the watch
    statistics all use it. ``iou_loss="giou"`` adds torchvision's GIoU loss instead of HIoU; ``box_weight``
    scales the host's box loss."""
    loc = _upcast(box_loss)
    if box_weight != 1.0:
        loc = box_weight * loc
    iou = aligned_box_iou(pred_boxes, target_boxes)
    if hiou and hiou_weight > 0:
        with torch.autocast(device_type=iou.device.type, enabled=False):
            if iou_loss == "giou":
                term = generalized_box_iou_loss(_upcast(pred_boxes), _upcast(target_boxes), reduction="none")
            else:
                term = hiou_from_iou(iou, check_gamma(hiou_gamma))
            loc = loc + hiou_weight * term.to(loc.dtype)
    return loc, iou


def _options_localization(options: HarmonicOptions, box_loss: Tensor, pred_boxes: Tensor, target_boxes: Tensor):
    """:func:`_localization` with the IoU-type term of ``options``."""
    return _localization(box_loss, pred_boxes, target_boxes, hiou=options.hiou, hiou_weight=options.hiou_weight,
                         hiou_gamma=options.hiou_gamma, iou_loss=options.iou_loss, box_weight=options.box_weight)


def _upcast(tensor: Tensor) -> Tensor:
    """float64 stays float64; every other floating dtype (fp16, bf16, fp32) is computed in float32."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _normalize(values: Tensor, normalizer: Tensor | float) -> Tensor:
    """Sum of ``values / normalizer`` (elementwise normalizer tensor, or one number)."""
    if isinstance(normalizer, Tensor):
        return (values / normalizer).sum()
    return values.sum() / normalizer


def _as_normalizer(num_foreground: object, num_anchors: int, device: torch.device) -> Tensor | float:
    """``max(1, num_foreground)`` as a number, or a per-anchor divisor tensor [A] passed through."""
    if isinstance(num_foreground, Tensor) and num_foreground.dim() == 1:
        if num_foreground.shape[0] != num_anchors:
            raise ValueError(
                f"num_foreground as a per-anchor tensor must have {num_anchors} entries, got {num_foreground.shape[0]}"
            )
        return num_foreground.to(device=device, dtype=torch.float32).clamp(min=1.0)
    if isinstance(num_foreground, Tensor):
        num_foreground = float(num_foreground.item())
    if isinstance(num_foreground, bool) or not isinstance(num_foreground, (int, float)) or not math.isfinite(num_foreground):
        raise ValueError(f"num_foreground must be a finite number or a per-anchor tensor, got {num_foreground!r}")
    return max(1.0, float(num_foreground))


def _at_positives(normalizer: Tensor | float, positive: Tensor) -> Tensor | float:
    """The positives' divisors: a per-anchor normalizer indexed by ``positive``, a number as it is."""
    return normalizer[positive] if isinstance(normalizer, Tensor) else normalizer


def _checked_positives(
    cls_logits: object,
    classes: object,
    box_loss: object,
    pred_boxes: object,
    target_boxes: object,
    *,
    softmax: bool,
) -> Tensor:
    """Check a head's pieces and return the indices of its positives: ``labels > 0`` of a softmax head
    (column 0 the background), ``gt_classes >= 0`` of a sigmoid head (-1 a negative)."""
    check_logits_and_classes(cls_logits, classes, low=0 if softmax else -1)
    positive = torch.where(classes > 0)[0] if softmax else positive_rows(classes)
    _check_positive_pieces(positive.numel(), box_loss, pred_boxes, target_boxes)
    return positive


def _harmonic_inputs(
    options: HarmonicOptions,
    cls_logits: Tensor,
    classes: Tensor,
    box_loss: Tensor,
    pred_boxes: Tensor,
    target_boxes: Tensor,
    normalizer: object,
    *,
    softmax: bool,
) -> tuple[Tensor, Tensor | float, Tensor, Tensor, Tensor]:
    """The checked pieces both Harmonic compositions start from: the positives' indices
    (:func:`_checked_positives`), the normalizer (:func:`_as_normalizer`), the logits in the compute
    dtype (:func:`_upcast`), ``L_loc`` of the positives and their decoded boxes' IoU (:func:`_localization`
    with ``options``)."""
    positive = _checked_positives(cls_logits, classes, box_loss, pred_boxes, target_boxes, softmax=softmax)
    norm = _as_normalizer(normalizer, cls_logits.shape[0], cls_logits.device)
    loc, iou = _options_localization(options, box_loss, pred_boxes, target_boxes)
    return positive, norm, _upcast(cls_logits), loc, iou


def _task_contrasting(
    gt_prob: Tensor,
    logits: Tensor,
    positive: Tensor,
    iou: Tensor,
    normalizer: Tensor | float,
    options: HarmonicOptions,
    *,
    kind: str,
) -> Tensor:
    """``tc_weight`` times the task-contrasting loss of the positives [R], normalized as the other terms:
    ``gt_prob`` [P] their probability of the ground-truth class, ``logits`` [A, K] every sample's logits
    (``kind`` "sigmoid" or "softmax" for the class entropy), ``positive`` [P] the positives' indices,
    ``iou`` [P] their decoded boxes' IoU."""
    tc = task_contrasting_loss(
        gt_prob,
        iou,
        class_entropy(logits[positive], kind=kind),
        margin=options.tc_margin,
        form=options.tc_form,
    )
    return options.tc_weight * _normalize(tc, _at_positives(normalizer, positive))


def _compose(
    cls_loss: Tensor,
    positive: Tensor,
    cls_pos: Tensor,
    factor_cls_loss: Tensor,
    loc_loss: Tensor,
    normalizer: Tensor | float,
    *,
    detach_factors: bool,
    factors: bool = True,
    factor_terms: str = "both",
) -> dict[str, Tensor]:
    """Shared core: the two harmonic terms, normalized, and detached factor statistics.

    ``cls_loss`` [A]: every sample's plain classification loss; ``positive`` [P]: indices of positives in
    ``cls_loss``; ``cls_pos`` [P]: ``cls_loss[positive]``; ``factor_cls_loss`` [P]: the CE that defines
    beta_c; ``loc_loss`` [P]: L_loc. The classification term is written as every sample's loss plus
    ``beta_r * CE_i`` of the positives, which equals the negatives' loss plus ``(1 + beta_r) * CE_i``
    without building the [A] tensor of weighted terms. ``factors=False``: the loss is the plain sum
    (classification loss + L_loc); the factors are computed, detached, for the statistics only.
    ``factor_terms`` ``"cls"`` / ``"box"``: only that term is weighted (the other factor is 1).
    """
    cls_factor, reg_factor = harmonic_factors(factor_cls_loss, loc_loss, detach_factors=detach_factors or not factors)
    pos_normalizer = _at_positives(normalizer, positive)
    classification = _normalize(cls_loss, normalizer)
    if factors and factor_terms in ("both", "cls"):
        classification = classification + _normalize((cls_factor - 1.0) * cls_pos, pos_normalizer)
    if factors and factor_terms in ("both", "box"):
        regression = _normalize(reg_factor * loc_loss, pos_normalizer)
    else:
        regression = _normalize(loc_loss, pos_normalizer)
    out = {
        "classification": classification,
        "bbox_regression": regression,
        "num_positives": torch.tensor(float(positive.numel()), device=cls_loss.device),
    }
    if positive.numel() > 0:
        out["beta_r"] = (cls_factor - 1.0).detach().mean()
        out["beta_c"] = (reg_factor - 1.0).detach().mean()
    return out


def _watch(
    x: Tensor,
    y: Tensor,
    iou: Tensor,
    score: Tensor,
    *,
    detach_factors: bool,
    counterfactual: bool = False,
    factor_terms: str = "both",
) -> dict[str, Tensor]:
    """The watch statistics (:func:`watch_statistics` on the decoded boxes' ``iou``) and the detached
    samples (:data:`SAMPLE_KEYS`) of P positives; ``{}`` for P = 0. No host synchronization."""
    if x.numel() == 0:
        return {}
    with torch.no_grad():
        out = watch_statistics(x, y, iou, score, detach_factors=detach_factors, counterfactual=counterfactual,
                               factor_terms=factor_terms)
        out.update(zip(SAMPLE_KEYS, (x.detach(), y.detach(), score.detach())))
    return out


def dense_harmonic_loss(
    cls_logits: Tensor,
    gt_classes: Tensor,
    box_loss: Tensor,
    pred_boxes: Tensor,
    target_boxes: Tensor,
    *,
    num_foreground: int | float | Tensor,
    options: HarmonicOptions = HarmonicOptions(),  # noqa: B008 (frozen dataclass, safe as a default)
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> dict[str, Tensor]:
    """Harmonic loss (supplement Eq. 1) on a sigmoid focal head, split into the host's keys.

    Args:
        cls_logits: [A, K] logits of the anchors that take part in classification (ignored ones removed).
        gt_classes: [A] int64, class index 0..K-1 for a positive anchor, -1 for a negative.
        box_loss: [P] the host's box loss of each positive (RetinaNet: L1 on the encoded offsets summed
            over 4 coordinates; FCOS: GIoU loss on decoded boxes), positives in index order of
            ``gt_classes >= 0``.
        pred_boxes: [P, 4] decoded predicted boxes (xyxy) of the positives, same order.
        target_boxes: [P, 4] their matched ground-truth boxes.
        num_foreground: the host's normalizer ``n``: a number (sums are divided by ``max(1, n)``), or a
            float tensor [A] with one divisor per anchor (already ``max(1, n_image) * num_images`` for
            RetinaNet's per-image normalization averaged over images).
        options: the loss's options, :class:`HarmonicOptions`.
        focal_alpha, focal_gamma: the host's focal loss parameters (RetinaNet / FCOS: 0.25, 2).

    Returns:
        ``{"classification", "bbox_regression"[, "task_contrasting"]}`` (scalar losses; for no positives
        the box term is a graph-connected zero and the classification covers the negatives) and detached
        statistics ``"num_positives"`` and, when there is at least one positive, ``"beta_r"``,
        ``"beta_c"``: the means of beta_r = exp(-L_loc) and beta_c over the positives, the watch
        statistics (:data:`harmonic.losses.WATCH_KEYS`, x = the factor's CE, y = L_loc, score =
        sigmoid of the ground-truth logit) and the samples of :data:`SAMPLE_KEYS` (both only with
        ``options.watch``).
    """
    _check_options(options, HarmonicOptions)
    positive, normalizer, logits, loc, iou = _harmonic_inputs(
        options, cls_logits, gt_classes, box_loss, pred_boxes, target_boxes, num_foreground, softmax=False
    )
    focal = select_focal_loss(options.fused, logits.device)(logits, gt_classes, focal_alpha, focal_gamma)
    gt_logit = logits[positive, gt_classes[positive]]
    focal_pos = focal[positive]
    if options.beta_c_source == "loss":
        factor_cls = focal_pos  # CE_i := focal loss summed over classes [R]
    else:
        factor_cls = F.softplus(-gt_logit)  # -log sigmoid(x_gt), so beta_c = sigmoid(x_gt) [D]
    if options.beta_c_source == "gt_ce":
        # the positives' ground-truth entry: its cross-entropy x in place of its focal loss, so the term the
        # factor (1 + beta_r) multiplies is the same x that defines beta_c [D]
        weight = focal_alpha if focal_alpha >= 0 else 1.0
        focal_gt = weight * (1.0 - torch.sigmoid(gt_logit)).pow(focal_gamma) * factor_cls
        focal = focal.index_add(0, positive, factor_cls - focal_gt)
        focal_pos = factor_cls
    out = _compose(focal, positive, focal_pos, factor_cls, loc, normalizer, detach_factors=options.detach_factors,
                   factors=options.factors, factor_terms=options.factor_terms)
    if options.watch:
        out.update(_watch(factor_cls, loc, iou, torch.sigmoid(gt_logit.detach()), detach_factors=options.detach_factors,
                          counterfactual=not options.factors, factor_terms=options.factor_terms))
    if options.tc_weight > 0:
        out["task_contrasting"] = _task_contrasting(
            torch.sigmoid(gt_logit), logits, positive, iou, normalizer, options, kind="sigmoid"
        )
    return out


def softmax_harmonic_loss(
    cls_logits: Tensor,
    labels: Tensor,
    box_loss: Tensor,
    pred_boxes: Tensor,
    target_boxes: Tensor,
    *,
    normalizer: int | float | Tensor,
    options: HarmonicOptions = HarmonicOptions(),  # noqa: B008 (frozen dataclass, safe as a default)
) -> dict[str, Tensor]:
    """Harmonic loss (supplement Eq. 1) on a softmax head, split into the host's keys.

    Args:
        cls_logits: [A, C + 1] logits of the samples that take part in classification (Faster R-CNN: the
            sampled RoIs; SSD: positives and hard-mined negatives), column 0 the background.
        labels: [A] int64, 0 for background, 1..C for a positive.
        box_loss: [P] the host's box loss of each positive (smooth L1 on encoded offsets summed over the 4
            coordinates), positives in index order of ``labels > 0``.
        pred_boxes, target_boxes: [P, 4] decoded predicted boxes and their ground truth (xyxy).
        normalizer: the host's normalizer ``n`` (Faster R-CNN: number of sampled RoIs; SSD: number of
            positives), floored at 1.
        options: :class:`HarmonicOptions`; ``beta_c_source`` and ``fused`` make no difference here: with
            a softmax CE, exp(-CE_i) = p_i (supplement Eq. 4 [S]), and there is no focal loss to fuse.

    Returns:
        As :func:`dense_harmonic_loss`: CE_i = cross-entropy, beta_c = p_i, beta_r = exp(-L_loc_i); the
        watch statistics with x = CE_i and score = p_i.
    """
    _check_options(options, HarmonicOptions)
    positive, norm, logits, loc, iou = _harmonic_inputs(
        options, cls_logits, labels, box_loss, pred_boxes, target_boxes, normalizer, softmax=True
    )
    ce = F.cross_entropy(logits, labels, reduction="none")
    ce_pos = ce[positive]
    out = _compose(ce, positive, ce_pos, ce_pos, loc, norm, detach_factors=options.detach_factors,
                   factors=options.factors, factor_terms=options.factor_terms)
    if options.watch:
        out.update(_watch(ce_pos, loc, iou, torch.exp(-ce_pos.detach()), detach_factors=options.detach_factors,
                          counterfactual=not options.factors, factor_terms=options.factor_terms))
    if options.tc_weight > 0:
        out["task_contrasting"] = _task_contrasting(
            torch.exp(-ce_pos), logits, positive, iou, norm, options, kind="softmax"
        )  # exp(-CE_i) = p_i of the ground-truth class
    return out


# ----------------------------------------------------------------------------------------------------
# counterfactual watch statistics of a baseline head
# ----------------------------------------------------------------------------------------------------
def _check_positive_logits(pos_logits: object, pos_classes: object) -> None:
    """Shapes only (the values are the host's own, already used by its loss; no host synchronization)."""
    if not isinstance(pos_logits, Tensor) or pos_logits.dim() != 2 or not pos_logits.is_floating_point():
        raise ValueError("pos_logits must be a floating-point tensor [P, K]")
    if not isinstance(pos_classes, Tensor) or pos_classes.dtype != torch.int64 or pos_classes.shape != pos_logits.shape[:1]:
        raise ValueError(f"pos_classes must be an int64 tensor [P] = [{pos_logits.shape[0]}]")


def dense_watch_counterfactual(
    pos_logits: Tensor,
    pos_classes: Tensor,
    box_loss: Tensor,
    pred_boxes: Tensor,
    target_boxes: Tensor,
    *,
    options: HarmonicOptions = HarmonicOptions(),  # noqa: B008 (frozen dataclass, safe as a default)
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> dict[str, Tensor]:
    """The watch statistics a baseline sigmoid focal head would have under the Harmonic loss [D].

    From the baseline's own pieces of its P positives, detached, without another forward pass:
    ``x`` = the anchor's focal loss summed over the K classes (``options.beta_c_source == "loss"``) or
    ``-log sigmoid(x_gt)`` (``"gt_prob"``), ``y`` = :func:`localization_loss` with ``options`` (by default
    the host's box loss + 1.5 L_HIoU(gamma 0.8): the Harmonic + HIoU variant of the default study), the
    factors differentiated unless ``options.detach_factors``. ``watch/counterfactual`` is 1.

    Args:
        pos_logits: [P, K] the positives' logits; ``pos_classes``: [P] their classes 0..K-1.
        box_loss, pred_boxes, target_boxes: as :func:`dense_harmonic_loss`, for the same P positives.

    Returns:
        As :func:`watch_statistics` plus :data:`SAMPLE_KEYS`; ``{}`` for P = 0.
    """
    _check_options(options, HarmonicOptions)
    _check_positive_logits(pos_logits, pos_classes)
    _check_positive_pieces(pos_classes.numel(), box_loss, pred_boxes, target_boxes)
    with torch.no_grad():
        logits = _upcast(pos_logits.detach())
        gt_logit = logits.gather(1, pos_classes[:, None]).squeeze(1)
        if options.beta_c_source == "loss":
            x = select_focal_loss(False, logits.device)(logits, pos_classes, focal_alpha, focal_gamma)
        else:
            x = F.softplus(-gt_logit)
        y, iou = _options_localization(options, box_loss.detach(), pred_boxes.detach(), target_boxes.detach())
        return _watch(x, y, iou, torch.sigmoid(gt_logit),
                      detach_factors=options.detach_factors, counterfactual=True)


def softmax_watch_counterfactual(
    pos_logits: Tensor,
    pos_labels: Tensor,
    box_loss: Tensor,
    pred_boxes: Tensor,
    target_boxes: Tensor,
    *,
    options: HarmonicOptions = HarmonicOptions(),  # noqa: B008 (frozen dataclass, safe as a default)
) -> dict[str, Tensor]:
    """The watch statistics a baseline softmax head would have under the Harmonic loss [D]: ``x`` = the
    positives' cross-entropy (so the score is ``p_i = e^-x``, Eq. 4), ``y`` as in
    :func:`dense_watch_counterfactual`. ``pos_logits`` [P, C + 1] (column 0 the background),
    ``pos_labels`` [P] in 1..C."""
    _check_options(options, HarmonicOptions)
    _check_positive_logits(pos_logits, pos_labels)
    _check_positive_pieces(pos_labels.numel(), box_loss, pred_boxes, target_boxes)
    with torch.no_grad():
        x = F.cross_entropy(_upcast(pos_logits.detach()), pos_labels, reduction="none")
        y, iou = _options_localization(options, box_loss.detach(), pred_boxes.detach(), target_boxes.detach())
        return _watch(x, y, iou, torch.exp(-x),
                      detach_factors=options.detach_factors, counterfactual=True)


# ----------------------------------------------------------------------------------------------------
# comparison losses on the same head
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComparisonOptions:
    """A comparison loss for a sigmoid focal head and its parameters (validated on construction) [D].

    ``kind``: ``"qfl"`` (quality focal loss, Li et al., "Generalized Focal Loss", NeurIPS 2020;
    ``qfl_beta``), ``"varifocal"`` (Zhang et al., "VarifocalNet", CVPR 2021; ``vfl_alpha``, ``vfl_gamma``)
    or ``"iou_balanced"`` (Wu et al., IoU-balanced loss functions; ``iou_eta`` for the classification
    weights, ``iou_lambda`` for the box weights). The defaults are the values of those papers. ``fused``:
    the per-anchor focal implementation for ``"iou_balanced"`` (as :class:`HarmonicOptions`).
    """

    kind: str
    qfl_beta: float = 2.0
    vfl_alpha: float = 0.75
    vfl_gamma: float = 2.0
    iou_eta: float = 1.5
    iou_lambda: float = 1.5
    fused: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in COMPARISON_LOSSES:
            raise ValueError(f"kind must be one of {COMPARISON_LOSSES}, got {self.kind!r}")
        for name in ("qfl_beta", "vfl_alpha", "vfl_gamma", "iou_eta", "iou_lambda"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.fused is not None and not isinstance(self.fused, bool):
            raise TypeError(f"fused must be None (auto), True or False, got {self.fused!r}")


def dense_comparison_loss(
    options: ComparisonOptions,
    cls_logits: Tensor,
    gt_classes: Tensor,
    box_loss: Tensor,
    pred_boxes: Tensor,
    target_boxes: Tensor,
    *,
    num_foreground: int | float | Tensor,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> dict[str, Tensor]:
    """One image's comparison loss on a sigmoid focal head, split into the host's keys [D].

    Only the classification loss (and for ``"iou_balanced"`` the weighting) replaces the host's; the
    assignment, the box loss and the normalizer ``n = max(1, num_foreground)`` stay the host's. With
    ``q_i = IoU(decoded box_i, gt box_i)`` of each positive, detached (the quality target), and ``y`` the
    soft targets [A, K] (``q_i`` at the positive's class, 0 elsewhere; :func:`harmonic.losses.soft_targets`):

    * ``"qfl"``:       classification = sum over anchors and classes of QFL(sigma, y; beta) / n,
      bbox_regression = sum_i box_loss_i / n (Li et al., NeurIPS 2020, GFL);
    * ``"varifocal"``: classification = sum of VFL(p, y; alpha, gamma) / n, box term as QFL
      (Zhang et al., CVPR 2021, VarifocalNet);
    * ``"iou_balanced"``: classification = (sum over negatives of FL + sum_i w_i FL_i) / n with FL the
      host's focal loss summed over the K classes and ``w = iou_balanced_weights(q, FL_pos, eta)``;
      bbox_regression = sum_i v_i box_loss_i / n with ``v = iou_balanced_weights(q, box_loss, lambda)``
      (Wu et al., IoU-balanced loss functions). Both weights are constants and keep the positives' totals,
      so the values equal the host's and only the gradients change. Whether Wu et al. weight the box loss
      by the regressed box's IoU or the anchor's was not checked here; we use the regressed (decoded)
      box's IoU for both weights, as for the other kinds [D].

    The weights of ``"iou_balanced"`` are normalized over the positives of this call, hence one image per
    call (RetinaNet's host normalizes per image and averages over images).

    Args:
        options: the loss (``options.kind``, one of :data:`COMPARISON_LOSSES`) and its parameters.
        cls_logits: [A, K] logits of the anchors that take part in classification (ignored ones removed).
        gt_classes: [A] int64, class index 0..K-1 for a positive anchor, -1 for a negative.
        box_loss: [P] the host's box loss of each positive (RetinaNet: L1 on the encoded offsets summed
            over the 4 coordinates), positives in index order of ``gt_classes >= 0``.
        pred_boxes: [P, 4] decoded predicted boxes (xyxy) of the positives, same order (used detached).
        target_boxes: [P, 4] their matched ground-truth boxes.
        num_foreground: this image's number of positives (a number or a 0-dim tensor); sums are divided
            by ``max(1, num_foreground)``.
        focal_alpha, focal_gamma: the host's focal loss parameters (``"iou_balanced"`` only).

    Returns:
        ``{"classification", "bbox_regression"}`` (scalars, float32 for fp16 / bf16 / fp32 heads, float64
        for float64; with no positives the box term is a graph-connected zero) and the detached statistics
        ``"num_positives"`` and, when there is a positive, ``"mean_iou"`` (mean of q over the positives).
    """
    _check_options(options, ComparisonOptions)
    positive = _checked_positives(cls_logits, gt_classes, box_loss, pred_boxes, target_boxes, softmax=False)
    if isinstance(num_foreground, Tensor) and num_foreground.dim() > 0:
        raise ValueError(
            "num_foreground must be one image's number of positives (a number or a 0-dim tensor): "
            "dense_comparison_loss composes one image per call, got a tensor of shape "
            f"{tuple(num_foreground.shape)}"
        )
    normalizer = _as_normalizer(num_foreground, cls_logits.shape[0], cls_logits.device)

    logits = _upcast(cls_logits)
    box = _upcast(box_loss).to(logits.dtype)
    quality = aligned_box_iou(pred_boxes.detach(), target_boxes.detach()).to(logits.dtype)
    if options.kind == "iou_balanced":
        focal = select_focal_loss(options.fused, logits.device)(logits, gt_classes, focal_alpha, focal_gamma)
        focal_pos = focal[positive]
        cls_weights = iou_balanced_weights(quality, focal_pos, eta=options.iou_eta)
        cls_terms = focal.index_put((positive,), cls_weights * focal_pos)
        box_terms = iou_balanced_weights(quality, box, eta=options.iou_lambda) * box
    else:
        targets = soft_targets(gt_classes, quality, logits.shape[1])
        if options.kind == "qfl":
            cls_terms = quality_focal_loss(logits, targets, beta=options.qfl_beta)
        else:
            cls_terms = varifocal_loss(logits, targets, alpha=options.vfl_alpha, gamma=options.vfl_gamma)
        box_terms = box
    out = {
        "classification": cls_terms.sum() / normalizer,
        "bbox_regression": box_terms.sum() / normalizer,
        "num_positives": torch.tensor(float(positive.numel()), device=logits.device),
    }
    if positive.numel() > 0:
        out["mean_iou"] = quality.mean()
    return out


def split_losses_and_stats(result: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Separate the loss terms (to be summed) from the detached statistics in a result dict."""
    losses = {k: v for k, v in result.items() if k not in STAT_KEYS}
    stats = {k: v for k, v in result.items() if k in STAT_KEYS}
    return losses, stats
