"""The Harmonic IoU loss of supplement Eq. 11 [S]::

    L_HIoU = (1 + IoU)^gamma * (1 - IoU),   monotone on [0, 1] only for gamma <= 1 (Eq. 13)

Box IoU is computed in float32 (or float64 when an input is float64) with autocast disabled, after the
boxes are sanitized: inverted corners are ordered, the union floored at ``eps``, pairs with coordinates
beyond 2**62 rescaled (IoU is unchanged). This is our engineering choice [D], so that fp16 areas cannot
overflow and zero-area, inverted or huge boxes cannot produce NaN values or gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from harmonic.losses.reduction import WeightedLoss, check_reduction, reduce_loss
from harmonic.utils.checks import check_boxes, check_positive_number, check_same_shape


def check_gamma(gamma: float) -> float:
    """``gamma`` as a float, refused above 1, where the loss is no longer monotone in IoU (Eq. 13)."""
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
            "so low-IoU boxes would be pushed to lower IoU. Use gamma <= 1 (0.8 is the value reported for the paper)."
        )
    return gamma


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
    pred_boxes = check_boxes("pred_boxes", pred_boxes)
    target_boxes = check_boxes("target_boxes", target_boxes)
    check_same_shape("pred_boxes", pred_boxes, "target_boxes", target_boxes)
    eps = check_positive_number("eps", eps)
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
    gamma = check_gamma(gamma)
    check_reduction(reduction)
    iou = aligned_box_iou(pred_boxes, target_boxes, eps=eps)
    with torch.autocast(device_type=iou.device.type, enabled=False):
        loss = hiou_from_iou(iou, gamma)
    return reduce_loss(loss, reduction)


class HarmonicIoULoss(WeightedLoss):
    """Module form of :func:`harmonic_iou_loss`."""

    def __init__(self, *, gamma: float = 0.8, eps: float = 1e-7, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.gamma = check_gamma(gamma)
        self.eps = eps

    def forward(self, pred_boxes, target_boxes, weight=None, avg_factor=None, reduction_override=None) -> Tensor:
        loss = harmonic_iou_loss(pred_boxes, target_boxes, gamma=self.gamma, eps=self.eps)
        return self.finish(loss, weight, avg_factor, reduction_override)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, " + super().extra_repr()
