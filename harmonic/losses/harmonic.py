"""The Harmonic loss of supplement Eq. 1 [S], per positive sample i::

    L_Har = (1 + beta_r) * CE(p_i, y_i) + (1 + beta_c) * L(d_i, d_hat_i)
    beta_c = exp(-CE)      (equals p_i for softmax cross-entropy, Eq. 4)
    beta_r = exp(-L)

The factors are differentiated through by default, as in the supplement's Eq. 2 to 5 [S];
``detach_factors=True`` treats them as constants (what one third-party port does [R]).
"""

from __future__ import annotations

import torch
from torch import Tensor

from harmonic.losses.reduction import WeightedLoss, check_reduction, reduce_loss
from harmonic.utils.checks import check_float_tensor, check_same_shape


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
    cls_loss = check_float_tensor("cls_loss", cls_loss)
    reg_loss = check_float_tensor("reg_loss", reg_loss)
    check_same_shape("cls_loss", cls_loss, "reg_loss", reg_loss)
    check_reduction(reduction)
    cls_factor, reg_factor = harmonic_factors(cls_loss, reg_loss, detach_factors=detach_factors)
    return reduce_loss(cls_factor * cls_loss + reg_factor * reg_loss, reduction)




class HarmonicLoss(WeightedLoss):
    """Module form of :func:`harmonic_loss` with ``weight`` / ``avg_factor`` / ``loss_weight``."""

    def __init__(self, *, detach_factors: bool = False, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.detach_factors = detach_factors

    def forward(self, cls_loss, reg_loss, weight=None, avg_factor=None, reduction_override=None) -> Tensor:
        loss = harmonic_loss(cls_loss, reg_loss, detach_factors=self.detach_factors)
        return self.finish(loss, weight, avg_factor, reduction_override)
