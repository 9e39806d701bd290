"""Watching the supplement's assumptions during training: per-batch statistics of the positives.

With ``x`` the classification loss that defines ``beta_c = e^-x`` and ``y`` the localization loss
``L_loc`` (so ``beta_r = e^-y``), supplement Eq. 7 writes a positive's Harmonic loss as
``F(x, y) = (1 + e^-y) x + (1 + e^-x) y`` [S]. Two derivatives decide where its gradients point:

* Eq. 8 [S]: ``dF/dx = 1 + e^-y - y e^-x``, the multiplier of ``dCE/dlogit``. Eq. 9 [S] assumes it is
  positive ("basically always true during training"); it is negative exactly when
  ``x < ln y - ln(1 + e^-y)``, which is possible only for ``y > Y_REVERSAL = 1 + W(1/e) ~ 1.2785`` [D]
  (the root of ``y - e^-y = 1``). There gradient descent pushes the positive's score *down*.
* Eq. 5 [S]: ``dL_Har/dt = B(p, L) dL/dt`` with ``B(p, L) = 1 + p + e^-L log p``; with ``p = e^-x`` and
  ``L = y`` this is ``dF/dy = 1 + e^-x - x e^-y``. ``B < 0`` [D] means the box is pushed *away* from its
  target.

With detached factors (``detach_factors=True``) the factors are constants: the multipliers are
``1 + e^-y`` and ``1 + e^-x``, both in (1, 2], so nothing is reversed [D].

With one factor applied (``factor_terms``, an attribution control [D]), the other term is unweighted:
``F = (1 + e^-y) x + y`` ("cls") has ``dF/dx = 1 + e^-y > 0`` and ``dF/dy = 1 - x e^-y``;
``F = x + (1 + e^-x) y`` ("box") has ``dF/dx = 1 - y e^-x``, negative for ``x < ln y`` (possible for
``y > 1``), and ``dF/dy = 1 + e^-x > 0``. ``watch/y_over_threshold_share`` counts the positives whose ``y``
allows a reversal under the loss as trained: ``y > Y_REVERSAL`` (both factors), ``y > 1`` ("box"), none ("cls").

:func:`watch_statistics` turns the positives' detached ``x``, ``y``, decoded IoU and ground-truth class
score into the numbers of :data:`WATCH_KEYS`, computed as one tensor that nothing here reads back (the
caller reads them all at once, e.g. :func:`harmonic.models.get_stats`; on CUDA two small host-to-device
copies of constants remain: the interpolation weights and the percentiles' indices).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FACTOR_TERMS", "QUANTILES", "WATCH_KEYS", "WATCH_QUANTITIES", "Y_REVERSAL", "watch_statistics"]

#: [D] ``1 + W(1/e)``, the root of ``y - e^-y = 1``: for ``y <= Y_REVERSAL``, ``ln y - ln(1 + e^-y) <= 0``
#: and Eq. 9 holds for every ``x >= 0``; only positives with ``y`` above it can have ``dF/dx < 0``.
Y_REVERSAL = 1.2784645427610738
#: which terms the harmonic factors weight: both (Eq. 1), the classification term only (``(1 + beta_r) CE``)
#: or the localization term only (``(1 + beta_c) L_loc``)
FACTOR_TERMS = ("both", "cls", "box")
#: the percentiles reported per quantity, as fractions
QUANTILES = (0.1, 0.5, 0.9)
#: the per-positive quantities summarized by percentiles: x (the factor's CE), y (L_loc), decoded IoU,
#: ground-truth class score
WATCH_QUANTITIES = ("x", "y", "iou", "score")
#: every key :func:`watch_statistics` returns, in order
WATCH_KEYS = (
    *(f"watch/{name}_p{round(100 * q)}" for name in WATCH_QUANTITIES for q in QUANTILES),
    "watch/y_over_threshold_share",
    "watch/reversed_share",
    "watch/box_pushed_away_share",
    "watch/cls_multiplier",
    "watch/counterfactual",
)


def _percentiles(values: Tensor) -> Tensor:
    """:data:`QUANTILES` of each row of ``values`` [R, P], ``[R, len(QUANTILES)]``, with torch.quantile's
    linear interpolation, from one sort and one gather (torch.quantile costs several times more on the
    small tensors of a batch's positives). The positions are computed on the host from P: nothing is read
    back from the device."""
    ordered = values.sort(dim=1).values
    last = values.shape[1] - 1
    positions = [q * last for q in QUANTILES]
    low = [int(p) for p in positions]
    high = [min(i + 1, last) for i in low]
    frac = torch.tensor([p - i for p, i in zip(positions, low)], dtype=values.dtype, device=values.device)
    below, above = ordered[:, low + high].split(len(QUANTILES), dim=1)
    return below + (above - below) * frac


def watch_statistics(
    x: Tensor,
    y: Tensor,
    iou: Tensor,
    score: Tensor,
    *,
    detach_factors: bool = False,
    counterfactual: bool = False,
    factor_terms: str = "both",
) -> dict[str, Tensor]:
    """The watch statistics of P positives, as 0-dim detached tensors keyed by :data:`WATCH_KEYS`.

    Args:
        x: [P] the classification loss that defines ``beta_c = e^-x`` (the factor's CE; Eq. 4 and 7).
        y: [P] the localization loss ``L_loc`` that defines ``beta_r = e^-y`` (Eq. 1 and 7).
        iou: [P] IoU of each positive's decoded box with its ground truth.
        score: [P] the predicted probability of the ground-truth class.
        detach_factors: the factors are constants (``dF/dx = 1 + e^-y``, ``B = 1 + e^-x``); otherwise they
            are differentiated through (Eq. 8 and Eq. 5).
        counterfactual: the numbers describe a loss that was not trained (a baseline run logging the
            ``x`` and ``y`` the Harmonic loss would have used); recorded as ``watch/counterfactual`` 1 or 0.
        factor_terms: the terms the factors weight, one of :data:`FACTOR_TERMS` (the derivatives of the
            module docstring).

    Returns:
        ``{}`` for P = 0; otherwise ``watch/<q>_p10|p50|p90`` for q in :data:`WATCH_QUANTITIES` (linear
        interpolation, as ``torch.quantile``), ``watch/y_over_threshold_share`` (share with
        ``y > Y_REVERSAL``), ``watch/reversed_share`` (share with ``dF/dx < 0``, Eq. 8 / 9 failing: the
        score is pushed down), ``watch/box_pushed_away_share`` (share with ``B(e^-x, y) < 0``, Eq. 5's
        bracket), ``watch/cls_multiplier`` (mean of ``dF/dx``: the net multiplier of ``dCE/dlogit``, equal
        to ``1 + mean beta_r`` with detached factors) and ``watch/counterfactual``. All in float32 (float64
        when ``x`` is float64), views of one tensor.
    """
    for name, value in (("x", x), ("y", y), ("iou", iou), ("score", score)):
        if not isinstance(value, Tensor) or value.dim() != 1 or value.shape != x.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a 1-D tensor [P] like x {tuple(x.shape)}, got {shape}")
    if factor_terms not in FACTOR_TERMS:
        raise ValueError(f"factor_terms must be one of {FACTOR_TERMS}, got {factor_terms!r}")
    if x.numel() == 0:
        return {}
    weighted_cls, weighted_box = factor_terms in ("both", "cls"), factor_terms in ("both", "box")
    with torch.no_grad():  # small [P]-sized tensors: each operation costs its launch, not its arithmetic
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        values = torch.stack((x, y, iou, score)).to(dtype)  # [4, P]
        percentiles = _percentiles(values).reshape(-1)  # [4 * 3], quantity-major
        x, y = values[0], values[1]
        beta_r, beta_c = torch.exp(-y), torch.exp(-x)
        # Eq. 8: dF/dx = 1 + e^-y - y e^-x; Eq. 5's bracket B(p, L) = dF/dy with p = e^-x, log p = -x, L = y;
        # a factor left out contributes neither its value nor its derivative, a detached one only its value
        d_dx = 1.0 + beta_r if weighted_cls else torch.ones_like(x)
        d_dy = 1.0 + beta_c if weighted_box else torch.ones_like(y)
        if not detach_factors:
            if weighted_box:
                d_dx = d_dx - y * beta_c
            if weighted_cls:
                d_dy = d_dy - x * beta_r
        derivatives = torch.stack((d_dx, d_dy))
        threshold = {"both": Y_REVERSAL, "box": 1.0, "cls": float("inf")}[factor_terms]
        # y over the threshold, dF/dx < 0, dF/dy < 0, dF/dx: their means over the positives
        indicators = torch.cat((values[1:2] > threshold, derivatives < 0)).to(dtype)
        shares = torch.cat((indicators, derivatives[:1])).mean(dim=1)
        flag = torch.full((1,), float(counterfactual), dtype=dtype, device=values.device)
        packed = torch.cat((percentiles, shares, flag))
    return dict(zip(WATCH_KEYS, packed.unbind()))
