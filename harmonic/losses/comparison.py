"""Comparison losses that also couple the classification score with localization quality.

They are here so that the Harmonic loss can be compared with them under one protocol: the same detector,
the same assigner and schedule, only the loss changes. Each is written from its paper's formula:

* Quality focal loss (Li et al., "Generalized Focal Loss", NeurIPS 2020)::

      QFL(sigma) = -|y - sigma|^beta * ((1 - y) log(1 - sigma) + y log(sigma)),   beta = 2

  with the soft target y = IoU of the positive's decoded box for its ground-truth class, 0 elsewhere.

* Varifocal loss (Zhang et al., "VarifocalNet", CVPR 2021)::

      VFL(p, q) = -q (q log p + (1 - q) log(1 - p))     if q > 0
                = -alpha p^gamma log(1 - p)             if q = 0,     alpha = 0.75, gamma = 2

* IoU-balanced weights (Wu et al., "IoU-balanced loss functions for single-stage object detection",
  Pattern Recognition Letters 2022): each positive's loss is re-weighted by ``IoU_i^eta``, renormalized so
  that the total over positives is unchanged; the weights are constants (no gradient through them).

None of these is part of the Harmonic paper; they are tagged [D] (our implementation of other papers'
formulas) wherever results are reported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from harmonic.losses.reduction import reduce_loss
from harmonic.utils.checks import check_float_tensor

__all__ = ["soft_targets", "quality_focal_loss", "varifocal_loss", "iou_balanced_weights"]


def soft_targets(gt_classes: Tensor, quality: Tensor, num_classes: int) -> Tensor:
    """Dense soft targets [A, K]: ``quality[i]`` at ``(i, gt_classes[i])`` for positives, 0 elsewhere.

    Args:
        gt_classes: [A] int64, class index 0..K-1 for positives, -1 for negatives.
        quality: [A] or [P] localization quality (IoU) of the positives; [A] entries of negatives are ignored.
        num_classes: K.
    """
    if gt_classes.dim() != 1:
        raise ValueError(f"gt_classes must have shape [A], got {tuple(gt_classes.shape)}")
    if gt_classes.numel() and int(gt_classes.max()) >= num_classes:
        raise ValueError(f"gt_classes holds class {int(gt_classes.max())} >= num_classes={num_classes}")
    positive = gt_classes >= 0
    if quality.shape[0] == gt_classes.shape[0]:
        quality = quality[positive]
    elif quality.shape[0] != int(positive.sum()):
        raise ValueError(
            f"quality must have one entry per anchor ({gt_classes.shape[0]}) or per positive "
            f"({int(positive.sum())}), got {quality.shape[0]}"
        )
    targets = torch.zeros(gt_classes.shape[0], num_classes, dtype=quality.dtype, device=quality.device)
    targets[positive, gt_classes[positive]] = quality
    return targets


def quality_focal_loss(logits: Tensor, targets: Tensor, *, beta: float = 2.0, reduction: str = "none") -> Tensor:
    """QFL on logits [A, K] with soft targets [A, K] in [0, 1]; element-wise unless reduced."""
    logits = check_float_tensor("logits", logits)
    targets = check_float_tensor("targets", targets)
    if logits.shape != targets.shape:
        raise ValueError(f"logits and targets must have the same shape, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    sigma = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return reduce_loss(bce * (targets - sigma).abs().pow(beta), reduction)


def varifocal_loss(
    logits: Tensor, targets: Tensor, *, alpha: float = 0.75, gamma: float = 2.0, reduction: str = "none"
) -> Tensor:
    """VFL on logits [A, K] with IoU-aware targets q [A, K] (q > 0 only at the positive's class)."""
    logits = check_float_tensor("logits", logits)
    targets = check_float_tensor("targets", targets)
    if logits.shape != targets.shape:
        raise ValueError(f"logits and targets must have the same shape, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    p = torch.sigmoid(logits)
    weight = torch.where(targets > 0, targets, alpha * p.pow(gamma))
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return reduce_loss(bce * weight, reduction)


def iou_balanced_weights(ious: Tensor, losses: Tensor, *, eta: float = 1.5) -> Tensor:
    """Constant weights ``w_i = IoU_i^eta * sum(L) / sum(IoU^eta * L)`` so that ``sum(w * L) == sum(L)``."""
    ious = ious.detach().clamp(min=0.0, max=1.0)
    losses = losses.detach()
    raw = ious.pow(eta)
    denom = (raw * losses).sum()
    if ious.numel() == 0 or float(denom) <= 0.0:
        return torch.ones_like(losses)
    return raw * (losses.sum() / denom)
