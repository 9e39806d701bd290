"""The Harmonic loss, the Harmonic IoU loss and the task-contrasting term.

Notation follows the supplementary material (Wang and Zhang, ICCV 2021):

* Eq. 1 (per positive sample i), tag [S]::

      L_Har = (1 + beta_r) * CE(p_i, y_i) + (1 + beta_c) * L(d_i, d_hat_i)
      beta_c = exp(-CE)      (equals p_i for softmax cross-entropy, Eq. 4)
      beta_r = exp(-L)

* Eq. 11, tag [S]::

      L_HIoU = (1 + IoU)^gamma * (1 - IoU),   monotone on [0, 1] only for gamma <= 1 (Eq. 13)

* The task-contrasting term, tag [R] (secondary sources only, not in the supplement)::

      L_TC = max(0, |p_i - IoU_i| - m) / (1 + exp(H(p)))

Everything here is functional and device agnostic; ``nn.Module`` wrappers at the end add the usual
``reduction``, ``loss_weight``, ``weight`` and ``avg_factor`` arguments.

Departures from the paper, stated where they live:

* The harmonic factors are differentiated through by default, as in the supplement's Eq. 2 to 5 [S].
  ``detach_factors=True`` treats them as constants (what one third-party port does [R]).
* Box IoU is computed in float32 (or float64 when an input is float64) with autocast disabled, after the
  boxes are sanitized (inverted corners are ordered, the union floored at ``eps``, pairs with coordinates
  beyond 2**62 rescaled, which leaves IoU unchanged): [D] engineering choice so that fp16 areas cannot
  overflow and zero-area, inverted or huge boxes cannot produce NaN values or gradients.
* The task-contrasting term treats the entropy weight as a constant, and ``class_entropy(kind="sigmoid")``
  renormalizes the per-class sigmoid probabilities into a distribution: both [D].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "REDUCTIONS",
    "reduce_loss",
    "weight_reduce_loss",
    "harmonic_factors",
    "harmonic_loss",
    "aligned_box_iou",
    "hiou_from_iou",
    "harmonic_iou_loss",
    "task_contrasting_loss",
    "class_entropy",
    "HarmonicLoss",
    "HarmonicIoULoss",
    "TaskContrastingLoss",
]

REDUCTIONS = ("none", "mean", "sum")


# ----------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------
def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_float_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def _check_boxes(name: str, boxes: object) -> Tensor:
    boxes = _check_float_tensor(name, boxes)
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [N, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    return boxes


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _check_positive_number(name: str, value: object) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a real number, got {value!r}") from err
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _check_gamma(gamma: float) -> float:
    try:
        gamma = float(gamma)
    except (TypeError, ValueError) as err:
        raise TypeError(f"gamma must be a real number, got {gamma!r}") from err
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma}")
    if gamma > 1.0:
        raise ValueError(
            f"gamma={gamma} > 1: the Harmonic IoU loss (1 + IoU)^gamma (1 - IoU) is then no longer "
            "monotonically decreasing in IoU on [0, 1] (supplement Eq. 12-13: the derivative is "
            "non-positive only where IoU >= (gamma - 1) / (gamma + 1), which is > 0 for gamma > 1), "
            "so low-IoU boxes would be pushed to lower IoU. Use gamma <= 1 (the paper uses 0.8 [R])."
        )
    return gamma


# ----------------------------------------------------------------------------------------------------
# reductions (mmdetection-style semantics)
# ----------------------------------------------------------------------------------------------------
def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    """Reduce an element-wise loss. ``mean`` of an empty tensor is a graph-connected zero, not NaN."""
    _check_reduction(reduction)
    if reduction == "none":
        return loss
    if loss.numel() == 0:
        return loss.sum() * 0.0  # stays connected to the graph (DDP needs every parameter used)
    return loss.mean() if reduction == "mean" else loss.sum()


def weight_reduce_loss(
    loss: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Apply an element-wise ``weight``, then reduce.

    ``weight`` must broadcast to the loss shape without enlarging it (a [N, 1] weight on a [N] loss is an
    error, not an [N, N] outer product). With ``avg_factor`` and ``reduction="mean"`` the result is
    ``sum(weight * loss) / avg_factor`` (``avg_factor`` is typically the number of positives, floored at 1
    by the caller); with ``reduction="none"`` it is ignored; with ``reduction="sum"`` it is an error.
    A Python ``avg_factor`` must be > 0; a tensor one is floored at the float32 machine epsilon (no
    host sync on the hot path), so zero positives with a zero sum give 0, not NaN.
    """
    _check_reduction(reduction)
    if weight is not None:
        weight = _check_float_tensor("weight", weight)
        if weight.shape != loss.shape:
            try:
                broadcast = torch.broadcast_shapes(weight.shape, loss.shape)
            except RuntimeError:
                broadcast = None
            if broadcast != loss.shape:
                raise ValueError(
                    f"weight of shape {tuple(weight.shape)} does not broadcast to the loss shape "
                    f"{tuple(loss.shape)}"
                )
        loss = loss * weight
    if avg_factor is None:
        return reduce_loss(loss, reduction)
    if reduction == "sum":
        raise ValueError('avg_factor can only be used with reduction="mean" (or "none"), got reduction="sum"')
    if reduction == "none":
        return loss
    if isinstance(avg_factor, Tensor):
        avg_factor = avg_factor.clamp(min=torch.finfo(torch.float32).eps)
    else:
        avg_factor = _check_positive_number("avg_factor", avg_factor)
    return loss.sum() / avg_factor


# ----------------------------------------------------------------------------------------------------
# Harmonic loss, supplement Eq. 1
# ----------------------------------------------------------------------------------------------------
def harmonic_factors(cls_loss: Tensor, reg_loss: Tensor, *, detach_factors: bool = False) -> tuple[Tensor, Tensor]:
    """The harmonic factors ``(1 + beta_r, 1 + beta_c)`` of supplement Eq. 1 and Eq. 4.

    ``beta_r = exp(-reg_loss)`` scales the classification term, ``beta_c = exp(-cls_loss)`` the
    regression term. For non-negative losses both factors lie in (1, 2].
    """
    if detach_factors:
        cls_loss, reg_loss = cls_loss.detach(), reg_loss.detach()
    return 1.0 + torch.exp(-reg_loss), 1.0 + torch.exp(-cls_loss)


def harmonic_loss(
    cls_loss: Tensor,
    reg_loss: Tensor,
    *,
    detach_factors: bool = False,
    reduction: str = "none",
) -> Tensor:
    """Harmonic loss of supplement Eq. 1 for positive samples.

    Args:
        cls_loss: per-sample classification loss ``CE(p_i, y_i)`` of shape [N], non-negative.
        reg_loss: per-sample localization loss ``L(d_i, d_hat_i)`` of shape [N], non-negative.
        detach_factors: if False (default, as in supplement Eq. 2-5 [S]) gradients flow through
            ``beta_r`` and ``beta_c``; if True they are treated as constants.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    Returns:
        ``(1 + exp(-reg_loss)) * cls_loss + (1 + exp(-cls_loss)) * reg_loss``, reduced.
    """
    cls_loss = _check_float_tensor("cls_loss", cls_loss)
    reg_loss = _check_float_tensor("reg_loss", reg_loss)
    _check_same_shape("cls_loss", cls_loss, "reg_loss", reg_loss)
    _check_reduction(reduction)
    cls_factor, reg_factor = harmonic_factors(cls_loss, reg_loss, detach_factors=detach_factors)
    return reduce_loss(cls_factor * cls_loss + reg_factor * reg_loss, reduction)


# ----------------------------------------------------------------------------------------------------
# Harmonic IoU loss, supplement Eq. 11
# ----------------------------------------------------------------------------------------------------
# Pairs with a coordinate beyond this magnitude are rescaled before areas are taken: in float32 an area
# of coordinates up to 2**62 stays below 2**127, while (3e38)**2 would overflow to inf (and inf / inf = NaN).
_RESCALE_ABOVE = 2.0**62


def _iou_compute_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 if either input is float64."""
    return torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)


def aligned_box_iou(pred_boxes: Tensor, target_boxes: Tensor, *, eps: float = 1e-7) -> Tensor:
    """IoU of aligned xyxy box pairs ``[N, 4] x [N, 4] -> [N]`` (the ``IoU_i`` of supplement Eq. 11).

    Returns float32 (float64 if either input is float64). The boxes are upcast, then sanitized *before*
    areas are taken [D]: corners are ordered (an inverted box becomes the box it spans), intersection
    sides are floored at zero, the union at ``eps``, and a pair with a coordinate beyond 2**62 is divided
    by its largest coordinate magnitude (IoU is scale invariant; the scale is a constant for autograd).
    So the IoU lies in [0, 1] (up to rounding) and it and its gradients (in the compute dtype) are finite
    for every finite input, including zero-area, inverted, identical and huge boxes. Pairs whose union is
    below ``eps`` get ``inter / eps``: two identical zero-area boxes have IoU 0. Gradients scale like
    side / union, so for extremely thin boxes (side / union above 65504) a gradient cast back to a float16
    leaf overflows to inf (never NaN), which AMP's gradient scaler then skips. Autocast is disabled inside.
    """
    pred_boxes = _check_boxes("pred_boxes", pred_boxes)
    target_boxes = _check_boxes("target_boxes", target_boxes)
    _check_same_shape("pred_boxes", pred_boxes, "target_boxes", target_boxes)
    eps = _check_positive_number("eps", eps)
    compute_dtype = _iou_compute_dtype(pred_boxes, target_boxes)
    with torch.autocast(device_type=pred_boxes.device.type, enabled=False):
        p = pred_boxes.to(compute_dtype)
        t = target_boxes.to(compute_dtype)
        with torch.no_grad():
            magnitude = torch.cat((p, t), dim=1).abs().amax(dim=1, keepdim=True)
            huge = magnitude > _RESCALE_ABOVE
            # on CPU, the (usual) batch without a huge pair skips the division; elsewhere it stays
            # branch-free (no device synchronization). Division by 1 is exact: same values either way.
            rescale = p.device.type != "cpu" or bool(huge.any())
            scale = torch.where(huge, magnitude, torch.ones_like(magnitude)) if rescale else None
        if scale is not None:
            p, t = p / scale, t / scale
        p_lo, p_hi = torch.minimum(p[:, :2], p[:, 2:]), torch.maximum(p[:, :2], p[:, 2:])
        t_lo, t_hi = torch.minimum(t[:, :2], t[:, 2:]), torch.maximum(t[:, :2], t[:, 2:])
        p_wh = p_hi - p_lo
        t_wh = t_hi - t_lo
        inter_wh = (torch.minimum(p_hi, t_hi) - torch.maximum(p_lo, t_lo)).clamp(min=0)
        inter = inter_wh[:, 0] * inter_wh[:, 1]
        union = p_wh[:, 0] * p_wh[:, 1] + t_wh[:, 0] * t_wh[:, 1] - inter
        return inter / union.clamp(min=eps)


def hiou_from_iou(iou: Tensor, gamma: float = 0.8) -> Tensor:
    """``(1 + IoU)^gamma * (1 - IoU)`` (supplement Eq. 11) for a tensor of IoU values, no gamma check.

    Used for analysis and plotting (including gamma > 1, where the loss stops being monotone);
    training code goes through :func:`harmonic_iou_loss`, which rejects gamma > 1.
    """
    return (1.0 + iou).pow(gamma) * (1.0 - iou)


def harmonic_iou_loss(
    pred_boxes: Tensor,
    target_boxes: Tensor,
    *,
    gamma: float = 0.8,
    reduction: str = "none",
    eps: float = 1e-7,
) -> Tensor:
    """Harmonic IoU loss of supplement Eq. 11 on aligned xyxy boxes.

    Args:
        pred_boxes: decoded predicted boxes [N, 4], (x1, y1, x2, y2). Not regression offsets.
        target_boxes: matched ground-truth boxes [N, 4].
        gamma: focusing parameter; must be <= 1 (Eq. 13), default 0.8 as reported for the paper [R].
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        eps: floor of the union area.

    Returns:
        ``(1 + IoU)^gamma * (1 - IoU)`` per pair (float32, or float64 for float64 inputs), reduced.
    """
    gamma = _check_gamma(gamma)
    _check_reduction(reduction)
    iou = aligned_box_iou(pred_boxes, target_boxes, eps=eps)
    with torch.autocast(device_type=iou.device.type, enabled=False):
        loss = hiou_from_iou(iou, gamma)
    return reduce_loss(loss, reduction)


# ----------------------------------------------------------------------------------------------------
# Task-contrasting term [R]
# ----------------------------------------------------------------------------------------------------
def class_entropy(logits: Tensor, *, kind: str = "softmax") -> Tensor:
    """Entropy ``H(p) = -sum_k p_k log p_k`` of the predicted class distribution (the ``H`` of the
    task-contrasting term [R]), per row of finite ``logits`` [N, K] -> [N], in [0, log K].

    ``kind="softmax"``: ``p = softmax(logits)``. ``kind="sigmoid"``: [D] our choice for sigmoid heads,
    which have no class distribution: the per-class sigmoid probabilities renormalized to sum to one,
    ``p_k = sigmoid(x_k) / sum_j sigmoid(x_j)``, computed as ``softmax(logsigmoid(x))`` (no clamping).
    Returns float32 (float64 for float64 logits).
    """
    logits = _check_float_tensor("logits", logits)
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
    scores = _check_float_tensor("scores", scores)
    ious = _check_float_tensor("ious", ious)
    _check_same_shape("scores", scores, "ious", ious)
    _check_reduction(reduction)
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
        entropy = _check_float_tensor("entropy", entropy)
        _check_same_shape("scores", scores, "entropy", entropy)
        weight = torch.sigmoid(-entropy.detach().to(dtype))  # = 1 / (1 + exp(H))
    return reduce_loss(term * weight, reduction)


# ----------------------------------------------------------------------------------------------------
# nn.Module wrappers
# ----------------------------------------------------------------------------------------------------
class _WeightedLoss(nn.Module):
    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction
        self.loss_weight = float(loss_weight)

    def _finish(self, loss: Tensor, weight, avg_factor, reduction_override) -> Tensor:
        reduction = self.reduction if reduction_override is None else reduction_override
        return self.loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, loss_weight={self.loss_weight}"


class HarmonicLoss(_WeightedLoss):
    """Module form of :func:`harmonic_loss` with ``weight`` / ``avg_factor`` / ``loss_weight``."""

    def __init__(self, *, detach_factors: bool = False, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.detach_factors = detach_factors

    def forward(self, cls_loss, reg_loss, weight=None, avg_factor=None, reduction_override=None) -> Tensor:
        loss = harmonic_loss(cls_loss, reg_loss, detach_factors=self.detach_factors)
        return self._finish(loss, weight, avg_factor, reduction_override)


class HarmonicIoULoss(_WeightedLoss):
    """Module form of :func:`harmonic_iou_loss`."""

    def __init__(self, *, gamma: float = 0.8, eps: float = 1e-7, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.gamma = _check_gamma(gamma)
        self.eps = eps

    def forward(self, pred_boxes, target_boxes, weight=None, avg_factor=None, reduction_override=None) -> Tensor:
        loss = harmonic_iou_loss(pred_boxes, target_boxes, gamma=self.gamma, eps=self.eps)
        return self._finish(loss, weight, avg_factor, reduction_override)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, " + super().extra_repr()


class TaskContrastingLoss(_WeightedLoss):
    """Module form of :func:`task_contrasting_loss` [R]."""

    def __init__(self, *, margin: float = 0.2, form: str = "margin", reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        if form not in ("margin", "gate"):
            raise ValueError(f'form must be "margin" or "gate", got {form!r}')
        self.margin = margin
        self.form = form

    def forward(self, scores, ious, entropy=None, weight=None, avg_factor=None, reduction_override=None) -> Tensor:
        loss = task_contrasting_loss(scores, ious, entropy, margin=self.margin, form=self.form)
        return self._finish(loss, weight, avg_factor, reduction_override)
