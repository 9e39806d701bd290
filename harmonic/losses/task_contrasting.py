"""The task-contrasting term, reported by secondary sources only [R] (it is not in the supplement)::

    L_TC = max(0, |p_i - IoU_i| - m) / (1 + exp(H(p)))

The entropy weight is treated as a constant, and ``class_entropy(kind="sigmoid")`` renormalizes the
per-class sigmoid probabilities into a distribution: both are our choices [D].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from harmonic.losses.reduction import WeightedLoss, check_reduction, reduce_loss
from harmonic.utils.checks import check_float_tensor, check_same_shape

FORMS = ("margin", "gate")


def class_entropy(logits: Tensor, *, kind: str = "softmax") -> Tensor:
    """Entropy ``H(p) = -sum_k p_k log p_k`` of the predicted class distribution (the ``H`` of the
    task-contrasting term [R]), per row of finite ``logits`` [N, K] -> [N], in [0, log K].

    ``kind="softmax"``: ``p = softmax(logits)``. ``kind="sigmoid"``: [D] our choice for sigmoid heads,
    which have no class distribution: the per-class sigmoid probabilities renormalized to sum to one,
    ``p_k = sigmoid(x_k) / sum_j sigmoid(x_j)``, computed as ``softmax(logsigmoid(x))`` (no clamping).
    Returns float32 (float64 for float64 logits).
    """
    logits = check_float_tensor("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [N, K], got {tuple(logits.shape)}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if kind == "softmax":
        log_p = torch.log_softmax(logits, dim=-1)
    elif kind == "sigmoid":
        log_p = torch.log_softmax(nn.functional.logsigmoid(logits), dim=-1)
    else:
        raise ValueError(f'kind must be "softmax" or "sigmoid", got {kind!r}')
    return -(log_p.exp() * log_p).sum(-1)


def task_contrasting_loss(
    scores: Tensor,
    ious: Tensor,
    entropy: Tensor | None = None,
    *,
    margin: float = 0.2,
    form: str = "margin",
    reduction: str = "none",
) -> Tensor:
    """Task-contrasting term, reported by secondary sources only [R]; not part of the supplement.

    ``L_TC = max(0, |p_i - IoU_i| - m) / (1 + exp(H(p)))`` with ``form="margin"`` (the form written in
    the secondary report), or ``|p_i - IoU_i| * [|p_i - IoU_i| > m] / (1 + exp(H(p)))`` with
    ``form="gate"`` (the hard gate one port says the original code used [R]).

    Args:
        scores: classification score ``p_i`` of the ground-truth class for each positive [N].
        ious: IoU of each positive's decoded box with its ground truth [N]. Gradients flow to both.
        entropy: entropy ``H(p)`` of each positive's predicted class distribution [N] (see
            :func:`class_entropy`); treated as a constant weight [D]. ``None`` means H = 0.
        margin: the margin ``m`` (0.2 reported [R]).
        form: ``"margin"`` or ``"gate"``.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    Returns:
        the per-sample term [N] (float32, or float64 for float64 inputs), reduced.
    """
    scores = check_float_tensor("scores", scores)
    ious = check_float_tensor("ious", ious)
    check_same_shape("scores", scores, "ious", ious)
    check_reduction(reduction)
    margin = float(margin)
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    dtype = torch.promote_types(torch.promote_types(scores.dtype, ious.dtype), torch.float32)
    gap = (scores.to(dtype) - ious.to(dtype)).abs()
    if form == "margin":
        term = (gap - margin).clamp(min=0)
    elif form == "gate":
        term = gap * (gap > margin).to(gap.dtype)
    else:
        raise ValueError(f'form must be "margin" or "gate", got {form!r}')
    if entropy is None:
        weight = 0.5  # 1 / (1 + exp(0))
    else:
        entropy = check_float_tensor("entropy", entropy)
        check_same_shape("scores", scores, "entropy", entropy)
        weight = torch.sigmoid(-entropy.detach().to(dtype))  # = 1 / (1 + exp(H))
    return reduce_loss(term * weight, reduction)


class TaskContrastingLoss(WeightedLoss):
    """Module form of :func:`task_contrasting_loss` [R]."""

    def __init__(self, *, margin: float = 0.2, form: str = "margin", reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        if form not in FORMS:
            raise ValueError(f'form must be "margin" or "gate", got {form!r}')
        self.margin = margin
        self.form = form

    def forward(self, scores, ious, entropy=None, weight=None, avg_factor=None, reduction_override=None) -> Tensor:
        loss = task_contrasting_loss(scores, ious, entropy, margin=self.margin, form=self.form)
        return self.finish(loss, weight, avg_factor, reduction_override)
