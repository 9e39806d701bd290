"""Reductions with mmdetection's semantics (``weight``, ``avg_factor``), and the base of the loss modules."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from harmonic.utils.checks import check_float_tensor, check_positive_number

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    """Reduce an element-wise loss. ``mean`` of an empty tensor is a graph-connected zero, not NaN."""
    check_reduction(reduction)
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
    check_reduction(reduction)
    if weight is not None:
        weight = check_float_tensor("weight", weight)
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
        avg_factor = check_positive_number("avg_factor", avg_factor)
    return loss.sum() / avg_factor


class WeightedLoss(nn.Module):
    """Base of the loss modules: ``reduction`` and ``loss_weight``, and :func:`weight_reduce_loss` on
    the per-sample loss a subclass computes."""

    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction
        self.loss_weight = float(loss_weight)

    def finish(self, loss: Tensor, weight, avg_factor, reduction_override) -> Tensor:
        reduction = self.reduction if reduction_override is None else reduction_override
        return self.loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, loss_weight={self.loss_weight}"
