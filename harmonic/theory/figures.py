"""The supplement's figures, regenerated from its formulas.

The supplementary material is available as text only, so its figures are rebuilt here from its
equations (tags as in the project's docs: [S] supplement, [R] secondary report, [D] ours):

* Fig. 1 (a) [S]: ``|dL_Har/dt|`` over the score ``p`` and the offset ``t`` (Eq. 5);
  Fig. 1 (b) [S]: the same for the standard loss CE + smooth L1, which does not depend on ``p``;
* the signed Fig. 1 (a) [D]: ``dL_Har/dt`` with its sign, and the zero set ``p = p*(L)`` of the bracket
  ``1 + p + exp(-L) log p`` of Eq. 5 (from :mod:`harmonic.theory.derivations`), below which gradient descent
  *increases* the regression loss;
* Fig. 2 [S]: ``dL_Har/dp = L - (1 + exp(-L)) / p`` (Eq. 10) over ``p`` and ``L``;
* Fig. 4 [S]: the HIoU loss ``(1 + IoU)^gamma (1 - IoU)`` (Eq. 11) for several ``gamma``.

The gradient grids are computed with autograd through :func:`harmonic.losses.harmonic_loss`, so the
figures show the package's gradient; ``method="closed_form"`` evaluates Eq. 5 / Eq. 10 instead, and the
tests check that the two agree on the grid.

"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from harmonic.losses.harmonic import harmonic_loss
from harmonic.losses.hiou import hiou_from_iou
from harmonic.theory.derivations import bracket, bracket_root
from harmonic.utils.figures import FIGSIZE, caption, check_grid, check_range, finish, new_figure

# [D] The supplement's five gamma values of Fig. 4 were not recovered from the text; these are ours.
DEFAULT_GAMMAS = (0.2, 0.4, 0.6, 0.8, 1.0)
# [D] The supplement names "smooth L1" for L(t) without its beta; beta = 1 is the Fast R-CNN default.
SMOOTH_L1_BETA = 1.0
_DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------------
# the quantities plotted
# ----------------------------------------------------------------------------------------------------
def smooth_l1(t: torch.Tensor, beta: float = SMOOTH_L1_BETA) -> torch.Tensor:
    """Smooth L1 of the offset ``t``: ``0.5 t^2 / beta`` for ``|t| < beta``, else ``|t| - 0.5 beta``."""
    return torch.nn.functional.smooth_l1_loss(t, torch.zeros_like(t), beta=beta, reduction="none")


def _axes_values(p_range, other_range, grid):
    grid = check_grid(grid)
    p = torch.linspace(*p_range, grid, dtype=_DTYPE)
    other = torch.linspace(*other_range, grid, dtype=_DTYPE)
    return p, other


def _p_t_axes(p_range, t_range, grid):
    """The score values ``p`` and offsets ``t`` of Fig. 1's grid, ranges and grid size checked."""
    p_range = check_range("p_range", p_range, low=0.0, high=1.0)
    return _axes_values(p_range, check_range("t_range", t_range), grid)


def grad_t_grid(
    p: np.ndarray | torch.Tensor,
    t: np.ndarray | torch.Tensor,
    *,
    beta: float = SMOOTH_L1_BETA,
    method: str = "autograd",
    detach_factors: bool = False,
) -> np.ndarray:
    """``dL_Har/dt`` (signed) on the grid ``p x t``, shape ``[len(p), len(t)]``, with ``L(t)`` smooth L1.

    ``method="autograd"``: differentiates :func:`harmonic.losses.harmonic_loss` with
    ``cls_loss = CE = -log p`` (p held fixed) and ``reg_loss = smooth_l1(t)``; the factors are not detached,
    as in supplement Eq. 2-5 [S], unless ``detach_factors``. ``method="closed_form"``:
    ``(1 + p + exp(-L(t)) log p) * dL/dt`` (Eq. 5), or ``(1 + p) * dL/dt`` with ``detach_factors`` (the
    ``d beta_r / dt`` term of Eq. 3 is then gone).
    """
    p = torch.as_tensor(p, dtype=_DTYPE).reshape(-1, 1)
    t = torch.as_tensor(t, dtype=_DTYPE).reshape(1, -1)
    if torch.any(p <= 0) or torch.any(p > 1):
        raise ValueError("scores p must lie in (0, 1]")
    if method == "autograd":
        t_var = t.expand(p.shape[0], -1).clone().requires_grad_(True)
        cls_loss = (-torch.log(p)).expand_as(t_var)
        total = harmonic_loss(cls_loss, smooth_l1(t_var, beta), detach_factors=detach_factors, reduction="sum")
        (grad,) = torch.autograd.grad(total, t_var)
        return grad.numpy()
    if method == "closed_form":
        loss = smooth_l1(t, beta)
        dloss_dt = torch.clamp(t / beta, -1.0, 1.0)  # derivative of smooth L1
        beta_r_term = 0.0 if detach_factors else torch.exp(-loss) * torch.log(p)
        return ((1.0 + p + beta_r_term) * dloss_dt).numpy()
    raise ValueError(f'method must be "autograd" or "closed_form", got {method!r}')


def grad_t_standard_grid(
    p: np.ndarray | torch.Tensor, t: np.ndarray | torch.Tensor, *, beta: float = SMOOTH_L1_BETA
) -> np.ndarray:
    """``d(CE + smooth_L1)/dt`` on the grid ``p x t`` by autograd: the standard loss of Fig. 1 (b) [S].

    The CE term does not depend on ``t``, so every row is ``dL/dt``: the regression gradient ignores ``p``.
    """
    p = torch.as_tensor(p, dtype=_DTYPE).reshape(-1, 1)
    t = torch.as_tensor(t, dtype=_DTYPE).reshape(1, -1)
    if torch.any(p <= 0) or torch.any(p > 1):
        raise ValueError("scores p must lie in (0, 1]")
    t_var = t.expand(p.shape[0], -1).clone().requires_grad_(True)
    total = ((-torch.log(p)).expand_as(t_var) + smooth_l1(t_var, beta)).sum()
    (grad,) = torch.autograd.grad(total, t_var)
    return grad.numpy()


def grad_p_grid(
    p: np.ndarray | torch.Tensor, loss: np.ndarray | torch.Tensor, *, method: str = "autograd"
) -> np.ndarray:
    """``dL_Har/dp`` on the grid ``L x p``, shape ``[len(loss), len(p)]`` (supplement Eq. 10).

    ``method="autograd"``: differentiates :func:`harmonic.losses.harmonic_loss` with ``cls_loss = -log p``
    and ``reg_loss = L`` held fixed. ``method="closed_form"``: ``L - (1 + exp(-L)) / p``.
    """
    p = torch.as_tensor(p, dtype=_DTYPE).reshape(1, -1)
    loss = torch.as_tensor(loss, dtype=_DTYPE).reshape(-1, 1)
    if torch.any(p <= 0) or torch.any(p > 1):
        raise ValueError("scores p must lie in (0, 1]")
    if torch.any(loss < 0):
        raise ValueError("regression losses L must be >= 0")
    if method == "autograd":
        p_var = p.expand(loss.shape[0], -1).clone().requires_grad_(True)
        total = harmonic_loss(-torch.log(p_var), loss.expand_as(p_var), reduction="sum")
        (grad,) = torch.autograd.grad(total, p_var)
        return grad.numpy()
    if method == "closed_form":
        return (loss - (1.0 + torch.exp(-loss)) / p).numpy()
    raise ValueError(f'method must be "autograd" or "closed_form", got {method!r}')


def gradient_grid_discrepancy(
    grid: int = 201,
    *,
    p_range: tuple[float, float] = (0.01, 1.0),
    t_range: tuple[float, float] = (-3.0, 3.0),
    loss_range: tuple[float, float] = (0.0, 4.0),
    beta: float = SMOOTH_L1_BETA,
) -> dict[str, float]:
    """Max ``|autograd - closed form|`` over the figures' grids, per gradient (should be ~1e-15).

    Keys: ``"eq5"`` (``dL_Har/dt``), ``"eq5_detached"`` (factors detached: ``(1 + p) dL/dt``) and
    ``"eq10"`` (``dL_Har/dp``).
    """
    p, t = _p_t_axes(p_range, t_range, grid)
    _, loss = _axes_values(p_range, check_range("loss_range", loss_range), grid)

    def gap(a, b):
        return float(np.max(np.abs(a - b)))

    return {
        "eq5": gap(grad_t_grid(p, t, beta=beta), grad_t_grid(p, t, beta=beta, method="closed_form")),
        "eq5_detached": gap(grad_t_grid(p, t, beta=beta, detach_factors=True),
                            grad_t_grid(p, t, beta=beta, method="closed_form", detach_factors=True)),
        "eq10": gap(grad_p_grid(p, loss), grad_p_grid(p, loss, method="closed_form")),
    }


# ----------------------------------------------------------------------------------------------------
# the supplement's figures
# ----------------------------------------------------------------------------------------------------
def _heatmap(fig: Figure, x, y, z, *, cmap: str, label: str, norm=None, levels: int = 8):
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(x, y, z, cmap=cmap, norm=norm, shading="auto", rasterized=True)
    contours = ax.contour(x, y, z, levels=levels, colors="white", linewidths=0.6, alpha=0.8)
    ax.clabel(contours, fontsize=6, fmt="%.2g")
    fig.colorbar(mesh, ax=ax, label=label)
    return ax


def _label_p_t(ax) -> None:
    """Axis labels of Fig. 1: the offset ``t`` on x, the score ``p`` on y."""
    ax.set_xlabel(r"regression offset $t = d_i - \hat d_i$")
    ax.set_ylabel(r"classification score $p_i$")


def _fig1_abs_heatmap(
    gradient, p, t, *, beta: float, label: str, title: str, how: str, path, dpi: int, figsize
) -> Figure:
    """Fig. 1 (a) / (b): the heatmap of ``|gradient|`` (rows ``p``, columns ``t``) with its title, axis
    labels and a caption naming the smooth L1 ``beta`` and ``how`` the gradient was computed."""
    fig = new_figure(figsize)
    ax = _heatmap(fig, t.numpy(), p.numpy(), np.abs(gradient), cmap="viridis", label=label)
    _label_p_t(ax)
    ax.set_title(title, fontsize=10)
    caption(fig, f"L(t) = smooth L1 with beta = {beta:g} [D: beta not stated in the supplement]; {how}")
    return finish(fig, path, dpi)


def fig1a_grad_t(
    grid: int = 201,
    *,
    p_range: tuple[float, float] = (0.01, 1.0),
    t_range: tuple[float, float] = (-3.0, 3.0),
    beta: float = SMOOTH_L1_BETA,
    path: str | Path | None = None,
    dpi: int = 120,
    figsize: tuple[float, float] = FIGSIZE,
) -> Figure:
    """Supplement Fig. 1 (a) [S]: ``|dL_Har/dt|`` (Eq. 5) over ``t`` (x) and ``p`` (y), autograd grid."""
    p, t = _p_t_axes(p_range, t_range, grid)
    return _fig1_abs_heatmap(
        grad_t_grid(p, t, beta=beta), p, t, beta=beta, label=r"$|\partial L_{Har} / \partial t|$",
        title=r"Fig. 1 (a) [S]: $|\partial L_{Har}/\partial t|$, Harmonic loss (Eq. 5)",
        how="gradient by autograd through harmonic_loss", path=path, dpi=dpi, figsize=figsize,
    )


def fig1b_grad_t_standard(
    grid: int = 201,
    *,
    p_range: tuple[float, float] = (0.01, 1.0),
    t_range: tuple[float, float] = (-3.0, 3.0),
    beta: float = SMOOTH_L1_BETA,
    path: str | Path | None = None,
    dpi: int = 120,
    figsize: tuple[float, float] = FIGSIZE,
) -> Figure:
    """Supplement Fig. 1 (b) [S]: ``|d(CE + smooth L1)/dt| = |dL/dt|``, the same for every ``p``."""
    p, t = _p_t_axes(p_range, t_range, grid)
    return _fig1_abs_heatmap(
        grad_t_standard_grid(p, t, beta=beta), p, t, beta=beta, label=r"$|\partial L_{std} / \partial t|$",
        title=r"Fig. 1 (b) [S]: $|\partial L/\partial t|$, CE + smooth L1 (independent of $p$)",
        how="gradient by autograd", path=path, dpi=dpi, figsize=figsize,
    )


def fig1a_signed(
    grid: int = 201,
    *,
    p_range: tuple[float, float] = (0.01, 1.0),
    t_range: tuple[float, float] = (-3.0, 3.0),
    beta: float = SMOOTH_L1_BETA,
    path: str | Path | None = None,
    dpi: int = 120,
    figsize: tuple[float, float] = FIGSIZE,
) -> Figure:
    """Signed Fig. 1 (a) [D]: ``dL_Har/dt`` with the zero set of the Eq. 5 bracket marked.

    Below the curve ``p = p*(L(t))`` (:func:`harmonic.theory.derivations.bracket_root`), hatched, the bracket
    ``1 + p + exp(-L) log p`` is negative: the gradient points the other way from ``dL/dt``, so a gradient
    step on ``t`` *increases* the regression loss. The supplement's Fig. 1 shows ``|.|``, which hides this.
    """
    p, t = _p_t_axes(p_range, t_range, grid)
    z = grad_t_grid(p, t, beta=beta)
    limit = float(np.max(np.abs(z))) or 1.0
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    tn, pn = t.numpy(), p.numpy()
    mesh = ax.pcolormesh(tn, pn, z, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -limit, limit), shading="auto",
                         rasterized=True)
    fig.colorbar(mesh, ax=ax, label=r"$\partial L_{Har} / \partial t$")
    sign = bracket(pn[:, None], smooth_l1(t, beta).numpy()[None, :])
    if sign.min() < 0.0:
        ax.contourf(tn, pn, sign, levels=[sign.min() - 1.0, 0.0], colors="none", hatches=["////"])
    root = bracket_root(smooth_l1(t, beta).numpy())
    ax.plot(tn, root, color="black", linewidth=1.4, label=r"$1 + p + e^{-L(t)}\log p = 0$")
    ax.set_ylim(pn[0], pn[-1])
    ax.legend(loc="upper right", fontsize=7, framealpha=0.9)
    _label_p_t(ax)
    ax.set_title(r"Signed Fig. 1 (a) [D]: $\partial L_{Har}/\partial t$ (Eq. 5 [S])", fontsize=10)
    caption(fig, "hatched: bracket < 0, a gradient step on t increases the regression loss [D]; "
             f"smooth L1, beta = {beta:g} [D]")
    return finish(fig, path, dpi)


def fig2_grad_p(
    grid: int = 201,
    *,
    p_range: tuple[float, float] = (0.05, 1.0),
    loss_range: tuple[float, float] = (0.0, 4.0),
    path: str | Path | None = None,
    dpi: int = 120,
    figsize: tuple[float, float] = FIGSIZE,
) -> Figure:
    """Supplement Fig. 2 [S]: ``dL_Har/dp = L - (1 + exp(-L)) / p`` (Eq. 10) over ``p`` (x) and ``L`` (y).

    The zero contour ``p = (1 + exp(-L)) / L`` is the boundary of Eq. 9; beyond it (large ``L`` and high
    ``p``) the gradient is positive, i.e. the loss is no longer decreasing in ``p``.
    """
    p, loss = _axes_values(
        check_range("p_range", p_range, low=0.0, high=1.0), check_range("loss_range", loss_range), grid
    )
    if loss[0] < 0:
        raise ValueError(f"loss_range must be >= 0, got {loss_range!r}")
    z = grad_p_grid(p, loss)
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    pn, ln = p.numpy(), loss.numpy()
    vmin, vmax = float(z.min()), float(z.max())
    norm = TwoSlopeNorm(0.0, min(vmin, -1e-9), max(vmax, 1e-9))
    mesh = ax.pcolormesh(pn, ln, z, cmap="RdBu_r", norm=norm, shading="auto", rasterized=True)
    levels = [lv for lv in (-20.0, -10.0, -5.0, -2.0, -1.0) if vmin < lv < vmax]
    ticks = sorted({vmin, *[lv for lv in levels if lv <= -5.0], 0.0, vmax})
    fig.colorbar(mesh, ax=ax, label=r"$\partial L_{Har} / \partial p_i$", ticks=ticks, format="%.3g")
    if levels:
        grey = ax.contour(pn, ln, z, levels=levels, colors="0.25", linewidths=0.6)
        ax.clabel(grey, fontsize=6, fmt="%g")
    if vmin < 0.0 < vmax:
        ax.contour(pn, ln, z, levels=[0.0], colors="black", linewidths=1.4)
        ax.plot([], [], color="black", label=r"$\partial L_{Har}/\partial p_i = 0$ (Eq. 9 boundary)")
        ax.legend(loc="upper left", fontsize=7, framealpha=0.9)
    ax.set_xlabel(r"classification score $p_i$")
    ax.set_ylabel(r"regression loss $L(d_i, \hat d_i)$")
    ax.set_title(r"Fig. 2 [S]: $\partial L_{Har}/\partial p_i = L - (1 + e^{-L})/p_i$ (Eq. 10)", fontsize=10)
    caption(fig, "gradient by autograd through harmonic_loss with CE = -log p; "
             "positive only beyond the black line (Eq. 9 violated)")
    return finish(fig, path, dpi)


def fig4_hiou(
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    *,
    nonmonotone_gamma: float | None = 2.0,
    points: int = 201,
    path: str | Path | None = None,
    dpi: int = 120,
    figsize: tuple[float, float] = FIGSIZE,
) -> Figure:
    """Supplement Fig. 4 [S]: ``L_HIoU = (1 + IoU)^gamma (1 - IoU)`` (Eq. 11) over IoU in [0, 1].

    One curve per ``gamma`` (the supplement's five values were not recovered: the defaults are ours [D]),
    ``1 - IoU`` (gamma = 0) for reference, and, unless ``nonmonotone_gamma`` is None, a dashed curve for a
    ``gamma > 1``, which rises on ``[0, (gamma - 1)/(gamma + 1)]`` (Eq. 12-13 [S]). Values come from
    :func:`harmonic.losses.hiou_from_iou`.
    """
    gammas = [float(g) for g in gammas]
    if not gammas or not all(math.isfinite(g) for g in gammas):
        raise ValueError(f"gammas must be a non-empty list of finite numbers, got {gammas!r}")
    if nonmonotone_gamma is not None and not (math.isfinite(nonmonotone_gamma) and nonmonotone_gamma > 1):
        raise ValueError(f"nonmonotone_gamma must be > 1 or None, got {nonmonotone_gamma!r}")
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points!r}")
    iou = torch.linspace(0.0, 1.0, points, dtype=_DTYPE)
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    ax.plot(iou, 1.0 - iou, color="black", linewidth=1.0, label=r"$1 - IoU$ ($\gamma = 0$)")
    colors = [f"C{i}" for i in range(len(gammas))]
    for gamma, color in zip(gammas, colors):
        ax.plot(iou, hiou_from_iou(iou, gamma), color=color, label=rf"$\gamma = {gamma:g}$")
    if nonmonotone_gamma is not None:
        g = float(nonmonotone_gamma)
        ax.plot(iou, hiou_from_iou(iou, g), color="0.4", linestyle="--",
                label=rf"$\gamma = {g:g} > 1$: not monotone")
        peak = (g - 1.0) / (g + 1.0)
        ax.axvline(peak, color="0.6", linestyle=":", linewidth=0.8)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("IoU")
    ax.set_ylabel(r"$L_{HIoU}$")
    ax.set_title(r"Fig. 4 [S]: $L_{HIoU} = (1 + IoU)^\gamma (1 - IoU)$ (Eq. 11)", fontsize=10)
    ax.legend(fontsize=7)
    caption(fig, "gamma values ours [D]: the supplement's five were not recovered; "
             "dotted line: IoU = (gamma - 1)/(gamma + 1), Eq. 13")
    return finish(fig, path, dpi)

