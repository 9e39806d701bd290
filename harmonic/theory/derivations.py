"""The supplement's derivations, equation by equation, as checked statements.

Every statement here is *checked*, not printed: a sympy identity is accepted only when
``simplify(lhs - rhs) == 0`` (or sympy's inequality solver / assumption system returns the claimed
answer), and every closed form is compared, at random float64 points, with ``torch.autograd`` applied to
the package's own loss functions in :mod:`harmonic.losses`.

Notation of the supplementary material (Wang and Zhang, ICCV 2021):

* Eq. 1: ``L_Har = (1 + beta_r) CE(p, y) + (1 + beta_c) L(t)``, ``t = d - d_hat`` the regression offset.
* Eq. 4: ``CE = -log p`` and ``beta_c = exp(-CE) = p``; ``beta_r = exp(-L(t))``.
* Eq. 5: ``dL_Har/dt = (1 + p + exp(-L) log p) dL/dt``. We call the bracket ``B(p, L)``.
* Eq. 7: ``F(x, y) = (1 + e^-y) x + (1 + e^-x) y`` with ``x = CE``, ``y = L``.
* Eq. 8 to 10: ``dF/dx = 1 + e^-y - y e^-x``; monotone in ``x`` where ``x > ln y - ln(1 + e^-y)``;
  ``dL_Har/dp = L - (1 + e^-L) / p``.
* Eq. 11 to 13: ``L_HIoU = (1 + u)^g (1 - u)`` with ``u = IoU`` and ``g = gamma``; monotone on [0, 1]
  only for ``gamma <= 1``.

Provenance tags: [S] the supplement states it (we verify it), [D] derived by us. Two [D] results:

* The bracket ``B(p, L)`` of Eq. 5 is negative for ``p < p*(L) = e^-L W(e^(L - e^L))`` (W the Lambert W
  function; ``p*(0) = W(1/e) ~ 0.2785``). There gradient descent on ``t`` *increases* the regression loss.
  The supplement's Fig. 1 plots ``|dL_Har/dt|``, which hides this sign change.
* Erratum: Eq. 12 as printed, ``(1 + u)^g ((g - 1) - (g + 1) u)``, is not the derivative of Eq. 11. The
  derivative is ``(1 + u)^(g - 1) ((g - 1) - (g + 1) u)``. The two differ by the factor ``1 + u > 0``, so
  the sign, Eq. 13 and the conclusion ``gamma <= 1`` are unaffected.

Use :func:`checks` for the structured results, ``python -m harmonic verify`` on the command line.

Each checked formula is written once, here: its LaTeX is the ``latex`` field of its :class:`Check`, and
notebook 01 displays it from there (:func:`equations_markdown`), next to the prose that explains it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sympy as sp

from harmonic.losses import aligned_box_iou, harmonic_iou_loss, harmonic_loss, hiou_from_iou
from harmonic.utils.files import atomic_write_json
from harmonic.utils.provenance import provenance

__all__ = [
    "Check",
    "TAGS",
    "KINDS",
    "ERRATUM_LINE",
    "printed_eq5",
    "printed_eq8",
    "printed_eq9_threshold",
    "printed_eq10",
    "printed_eq12",
    "corrected_eq12",
    "printed_eq13_threshold",
    "bracket",
    "bracket_root",
    "bracket_root_expr",
    "X_DEFINITIONS",
    "focal_target_loss",
    "reversal_score",
    "sympy_checks",
    "autograd_checks",
    "checks",
    "select",
    "format_rows",
    "verdict",
    "check_markdown",
    "equations_markdown",
    "bracket_root_table",
    "to_markdown",
    "assert_passed",
    "checks_to_json",
    "write_checks_json",
]

TAGS = ("[S]", "[D]")
KINDS = ("sympy", "autograd")

ERRATUM_LINE = "ERRATUM: printed Eq. 12 is not the derivative; corrected form proven"


@dataclass(frozen=True)
class Check:
    """One checked statement.

    Attributes:
        equation: the supplement's equation it concerns, e.g. ``"Eq. 5"``.
        statement: the claim, in words and plain-text formulas.
        tag: ``"[S]"`` (stated by the supplement) or ``"[D]"`` (derived by us).
        passed: whether the check succeeded.
        kind: ``"sympy"`` (symbolic proof) or ``"autograd"`` (closed form vs ``torch.autograd``).
        erratum: True for the rows that establish an error in the supplement (Eq. 12).
        detail: how it was checked, with the numbers (residuals, roots, counts).
        latex: the statement's formula in LaTeX, its one written form: notebook 01 displays it from here.
    """

    equation: str
    statement: str
    tag: str
    passed: bool
    kind: str
    erratum: bool = False
    detail: str = ""
    latex: str = ""

    def __post_init__(self) -> None:
        if self.tag not in TAGS:
            raise ValueError(f"Check.tag must be one of {TAGS}, got {self.tag!r}")
        if self.kind not in KINDS:
            raise ValueError(f"Check.kind must be one of {KINDS}, got {self.kind!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------
# The supplement's formulas, as printed. Each takes sympy or numpy arguments (``exp``/``log`` from
# ``sp`` for sympy input, from ``np`` otherwise) so the same definition feeds the proof and the
# numeric comparison.
# ----------------------------------------------------------------------------------------------------
def _ops(*args):
    if any(isinstance(a, sp.Basic) for a in args):
        return sp.exp, sp.log
    return np.exp, np.log


def printed_eq5(p, L, dL_dt):
    """Supplement Eq. 5 [S]: ``dL_Har/dt = (1 + p + exp(-L) log p) dL/dt``."""
    exp, log = _ops(p, L, dL_dt)
    return (1 + p + exp(-L) * log(p)) * dL_dt


def printed_eq8(x, y):
    """Supplement Eq. 8 [S]: ``dF/dx = 1 + e^-y - y e^-x`` for ``F`` of Eq. 7."""
    exp, _ = _ops(x, y)
    return 1 + exp(-y) - y * exp(-x)


def printed_eq9_threshold(y):
    """Supplement Eq. 9 [S]: ``F`` increases with ``x`` where ``x > ln y - ln(1 + e^-y)`` (``y > 0``)."""
    exp, log = _ops(y)
    return log(y) - log(1 + exp(-y))


def printed_eq10(p, L):
    """Supplement Eq. 10 [S]: ``dL_Har/dp = L - (1 + e^-L) / p``."""
    exp, _ = _ops(p, L)
    return L - (1 + exp(-L)) / p


def printed_eq12(u, g):
    """Supplement Eq. 12 *as printed* [S]: ``(1 + u)^g ((g - 1) - (g + 1) u)``. Not the derivative of Eq. 11."""
    return (1 + u) ** g * ((g - 1) - (g + 1) * u)


def corrected_eq12(u, g):
    """[D] erratum: the derivative of Eq. 11, ``d/du (1 + u)^g (1 - u) = (1 + u)^(g - 1) ((g - 1) - (g + 1) u)``."""
    return (1 + u) ** (g - 1) * ((g - 1) - (g + 1) * u)


def printed_eq13_threshold(g):
    """Supplement Eq. 13 [S]: ``dL_HIoU/du <= 0`` exactly where ``u >= (g - 1) / (g + 1)``."""
    return (g - 1) / (g + 1)


def bracket(p, L):
    """The bracket of Eq. 5, ``B(p, L) = 1 + p + exp(-L) log p`` (numpy or sympy)."""
    exp, log = _ops(p, L)
    return 1 + p + exp(-L) * log(p)


def bracket_root_expr(L=None) -> sp.Expr:
    """[D] Closed form of the root of ``B(p, L) = 0`` in ``p``: ``p*(L) = e^-L W(e^(L - e^L))`` (sympy)."""
    L = sp.Symbol("L", real=True) if L is None else L
    return sp.exp(-L) * sp.LambertW(sp.exp(L - sp.exp(L)))


def bracket_root(L):
    """[D] ``p*(L)``, the unique root in (0, 1) of ``B(p, L) = 1 + p + e^-L log p`` (Eq. 5's bracket).

    ``B < 0`` for ``p < p*(L)`` (gradient descent on ``t`` then increases the regression loss) and
    ``B > 0`` for ``p > p*(L)``. ``p*(0) = W(1/e) ~ 0.2785``; ``p*`` is strictly decreasing in ``L``,
    tends to 1 as ``L -> -inf`` and to 0 as ``L -> +inf``.

    Computed as ``exp(-(e^L + W(e^(L - e^L))))``, which equals ``e^-L W(e^(L - e^L))`` because
    ``W(z) = z e^-W(z)``; this form has no 0/0 for very negative ``L`` and underflows gracefully to 0
    for large ``L`` (``p*(L) ~ exp(-e^L)`` is below the float64 range for ``L`` above about 6.6).

    Args:
        L: the regression loss value(s), a float or an array of floats (any real value; NaN is refused).

    Returns:
        ``p*(L)`` as a float for scalar input, else a float64 array of the input's shape.
    """
    from scipy.special import lambertw

    arr = np.asarray(L, dtype=np.float64)
    if np.isnan(arr).any():
        raise ValueError("bracket_root: L contains NaN")
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        a = np.exp(arr)
        w = lambertw(np.exp(arr - a), 0).real
        root = np.exp(-(a + w))
    root = np.where(np.isposinf(arr), 0.0, root)
    return float(root) if root.ndim == 0 else root


#: what ``x`` of Eq. 7 is, as a function of the ground-truth class score ``p``: the cross-entropy
#: ``-log p`` (Eq. 4) or the focal loss of the target entry (a sigmoid focal head's CE_i [R])
X_DEFINITIONS = ("ce", "focal")


def focal_target_loss(p, alpha: float = 0.25, gamma: float = 2.0):
    """The focal loss of a positive's target entry, ``-alpha (1 - p)^gamma log p`` (numpy), decreasing in
    ``p`` on (0, 1) for ``alpha > 0``, ``gamma >= 0``."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return -alpha * (1.0 - p) ** gamma * np.log(p)


def reversal_score(y, definition: str = "ce", *, alpha: float = 0.25, gamma: float = 2.0):
    """[D] ``p*(y)``: with ``x = x(p)`` (``definition``), Eq. 8's ``dF/dx = 1 + e^-y - y e^-x`` is
    negative exactly for scores ``p > p*(y)`` (the classification gradient pushes the score down).

    By Eq. 9 [S], ``dF/dx < 0`` iff ``x < c(y) = ln y - ln(1 + e^-y)``; ``x(p)`` decreases from +inf to 0
    on (0, 1), so iff ``p > p*(y)`` with ``x(p*) = c(y)``. ``c(y) > 0`` only for
    ``y > 1 + W(1/e) ~ 1.2785`` (:data:`harmonic.losses.Y_REVERSAL`); for smaller ``y`` no score reverses and ``p*(y) = 1``.

    * ``"ce"``: ``x = -log p`` (Eq. 4), so ``p*(y) = (1 + e^-y) / y`` (capped at 1).
    * ``"focal"``: ``x = -alpha (1 - p)^gamma log p``, solved by bisection on ``log p`` (float64, to
      ~1e-15 relative).

    Args:
        y: the localization loss(es), ``y >= 0`` (float or array).
        definition: one of :data:`X_DEFINITIONS`.
        alpha, gamma: the focal parameters (RetinaNet's 0.25 and 2).

    Returns:
        ``p*(y)`` in (0, 1], a float for scalar input, else an array of ``y``'s shape.
    """
    if definition not in X_DEFINITIONS:
        raise ValueError(f"definition must be one of {X_DEFINITIONS}, got {definition!r}")
    arr = np.asarray(y, dtype=np.float64)
    if np.isnan(arr).any() or (arr < 0).any():
        raise ValueError("reversal_score: y must be >= 0 and not NaN")
    with np.errstate(divide="ignore", over="ignore"):
        ratio = (1.0 + np.exp(-arr)) / arr  # e^-c(y); inf at y = 0
    if definition == "ce":
        root = np.minimum(ratio, 1.0)
    else:
        c = -np.log(np.minimum(ratio, 1.0))  # c(y) >= 0; 0 where no score reverses
        low, high = np.full(arr.shape, -745.0), np.zeros(arr.shape)  # log p brackets: x(e^low) > c >= x(1) = 0
        for _ in range(200):
            mid = 0.5 * (low + high)
            above = focal_target_loss(np.exp(mid), alpha, gamma) > c  # x(p) > c: p below the root
            low, high = np.where(above, mid, low), np.where(above, high, mid)
        root = np.where(c > 0, np.exp(0.5 * (low + high)), 1.0)
    return float(root) if root.ndim == 0 else root


# ----------------------------------------------------------------------------------------------------
# Symbolic checks
# ----------------------------------------------------------------------------------------------------
def _is_zero(expr) -> bool:
    return sp.simplify(expr) == 0


def _sympy_check(equation, statement, tag, passed, detail, latex, erratum=False) -> Check:
    return Check(equation, statement, tag, bool(passed), "sympy", erratum, detail, latex)


def _checks_eq1_to_5() -> list[Check]:
    t = sp.Symbol("t", real=True)
    p = sp.Symbol("p", positive=True)
    Lf = sp.Function("L")
    Lt = Lf(t)
    dLt = sp.Derivative(Lt, t)
    out = []

    # Eq. 4: CE = -log p, beta_c = exp(-CE) = p.
    ce = -sp.log(p)
    beta_c = sp.exp(-ce)
    out.append(_sympy_check(
        "Eq. 4", "beta_c = exp(-CE) = p for CE = -log p", "[S]", _is_zero(beta_c - p),
        "simplify(exp(log p) - p) == 0 for p > 0", r"\beta_c = e^{-CE} = e^{\log p} = p",
    ))

    beta_r = sp.exp(-Lt)
    l_har = (1 + beta_r) * ce + (1 + beta_c) * Lt
    grad = sp.diff(l_har, t)  # beta_r differentiated through, as in the supplement's Eq. 2-3
    eq3 = sp.diff(beta_r, t) * ce + (1 + beta_c) * dLt
    out.append(_sympy_check(
        "Eq. 3", "dL_Har/dt = (d beta_r/dt) CE + (1 + beta_c) dL/dt (CE and beta_c do not depend on t)",
        "[S]", _is_zero(grad - eq3),
        "d/dt of (1 + e^-L(t)) (-log p) + (1 + p) L(t), L an undefined function; simplify(diff - Eq. 3) == 0",
        r"\frac{\partial \mathcal{L}_{Har}}{\partial t} = \frac{\partial \beta_r}{\partial t} CE + (1 + \beta_c)"
        r"\frac{\partial \mathcal{L}(t)}{\partial t}",
    ))
    first_line = sp.exp(-Lt) * sp.log(p) * dLt + (1 + p) * dLt
    eq5 = printed_eq5(p, Lt, dLt)
    ok = _is_zero(grad - first_line) and _is_zero(grad - eq5)
    out.append(_sympy_check(
        "Eq. 5", "dL_Har/dt, differentiating through beta_r = exp(-L(t)), equals (1 + p + exp(-L) log p) dL/dt",
        "[S]", ok,
        "simplify(diff(L_Har, t) - Eq. 5) == 0 for both printed lines of Eq. 5",
        sp.latex(sp.Eq(sp.Symbol(r"\frac{\partial \mathcal{L}_{Har}}{\partial t}"), eq5)),
    ))

    # The bracket B(p, L), [D].
    Ls = sp.Symbol("L", real=True)
    B = bracket(p, Ls)
    w = sp.Symbol("w", positive=True)
    z = sp.Symbol("z", positive=True)

    # Lambert W: w = W(z) is defined by w e^w = z; for z > 0, w > 0 and taking logs gives
    # log w = log z - w. sympy does not apply this by itself, so the rule below does, after the logs of
    # products of positive factors are expanded. The identity is checked here for w > 0, and every
    # residual is also evaluated to 50 digits without the rule (mpmath's W).
    def lambert_rule(expr):
        return sp.expand_log(expr, force=True).replace(
            lambda e: isinstance(e, sp.log) and isinstance(e.args[0], sp.LambertW),
            lambda e: sp.log(e.args[0].args[0]) - e.args[0],
        )

    identity_ok = _is_zero(sp.expand_log(sp.log(w) - (sp.log(z) - w).subs(z, w * sp.exp(w)), force=True))

    roots0 = sp.solve(bracket(p, sp.Integer(0)), p)
    p0 = sp.LambertW(sp.exp(-1))
    p0_val = float(sp.N(p0, 30))
    residual0 = abs(sp.N(bracket(p0, sp.Integer(0)), 50))
    ok = (
        roots0 == [p0]
        and identity_ok
        and _is_zero(lambert_rule(bracket(p0, sp.Integer(0))))
        and residual0 < 1e-45
        and abs(p0_val - 0.2785) < 5e-5
        and abs(bracket_root(0.0) - p0_val) < 1e-12
    )
    out.append(_sympy_check(
        "Eq. 5", "at L = 0 the bracket 1 + p + log p vanishes only at p = W(1/e) ~ 0.2785 (Lambert W)",
        "[D]", ok,
        f"sympy.solve(1 + p + log p, p) = {roots0}; B(W(1/e), 0) = 0 using log W(z) = log z - W(z) "
        "(|B| < 1e-45 evaluated at 50 digits); "
        f"W(1/e) = {p0_val:.12f}; bracket_root(0) = {bracket_root(0.0):.12f}",
        r"1 + p + \log p = 0 \iff p = W(e^{-1}) \approx " + f"{p0_val:.4f}",
    ))

    p_star = bracket_root_expr(Ls)
    solved = sp.solve(B, p)
    residual = sp.simplify(lambert_rule(B.subs(p, p_star)))
    grid = [-3.0, -0.5, 0.0, 0.25, 1.0, 2.5, 5.0]
    numeric = [float(sp.N(p_star.subs(Ls, v), 30)) for v in grid]
    residuals = [abs(sp.N(B.subs(p, p_star).subs(Ls, sp.Rational(str(v))), 50)) for v in grid]
    numeric_ok = all(
        math.isclose(bracket_root(v), ref, rel_tol=1e-12, abs_tol=1e-300) for v, ref in zip(grid, numeric)
    )
    ok = (
        len(solved) == 1 and _is_zero(solved[0] - p_star) and residual == 0 and numeric_ok
        and identity_ok and max(residuals) < 1e-40
        and _is_zero(B.subs(p, 1) - 2) and sp.limit(B, p, 0, "+") == -sp.oo
    )
    out.append(_sympy_check(
        "Eq. 5", "for every L the bracket B(p, L) = 1 + p + e^-L log p has the root p*(L) = e^-L W(e^(L - e^L)) in (0, 1)",
        "[D]", ok,
        f"sympy.solve(B, p) = {solved}; B(p*(L), L) simplifies to {residual}; B(1, L) = 2, B -> -oo as p -> 0+; "
        f"at L in {grid}: |B(p*(L), L)| < 1e-40 evaluated at 50 digits, and bracket_root agrees "
        "with the closed form to 1e-12",
        r"B(p, L) = 1 + p + e^{-L}\log p = 0 \iff p = p^*(L) = " + sp.latex(p_star),
    ))

    dB_dp = sp.diff(B, p)
    ok = _is_zero(dB_dp - (1 + sp.exp(-Ls) / p)) and bool(dB_dp.is_positive)
    out.append(_sympy_check(
        "Eq. 5", "B is strictly increasing in p, so B < 0 for p < p*(L) and B > 0 for p > p*(L); below p*(L), "
        "|dL_Har/dt| = |B| |dL/dt| therefore falls as p rises (no 'proportional correlation' with p there)",
        "[D]", ok,
        f"dB/dp = {sp.simplify(dB_dp)}, positive for p > 0 (sympy assumptions: {dB_dp.is_positive})",
        r"\frac{\partial B}{\partial p} = 1 + \frac{e^{-L}}{p} > 0",
    ))

    # p*(L) decreasing: implicit function theorem with p = e^-x, x = CE > 0 (so 0 < p < 1).
    x = sp.Symbol("x", positive=True)
    Bx = B.subs(p, sp.exp(-x))
    dpstar_dL = sp.simplify(-sp.diff(Bx, Ls) / sp.diff(Bx, x) * sp.diff(sp.exp(-x), x))
    ok = bool(dpstar_dL.is_negative) and bool(sp.diff(Bx, Ls).is_positive)
    out.append(_sympy_check(
        "Eq. 5", "p*(L) is strictly decreasing in L: a larger regression loss lowers the score below which B < 0",
        "[D]", ok,
        f"with p = e^-x, x = CE > 0: dB/dL = {sp.simplify(sp.diff(Bx, Ls))} > 0 and dp*/dL = "
        f"-(dB/dL)/(dB/dp) = {dpstar_dL} < 0 (sympy assumptions)",
        r"p = e^{-x}:\ \frac{dp^*}{dL} = -\frac{\partial B / \partial L}{\partial B / \partial p} = " + sp.latex(dpstar_dL) + " < 0",
    ))

    # One gradient-descent step t -> t - eta dL_Har/dt changes L at first order by -eta B (dL/dt)^2.
    eta = sp.Symbol("eta", positive=True)
    b = sp.Symbol("b", negative=True)
    step = sp.diff(Lf(t - eta * b * dLt), eta).subs(eta, 0).doit()
    ok = _is_zero(step + b * dLt**2)
    slope = sp.Symbol("s", real=True, nonzero=True)
    ok = ok and bool(step.subs(dLt, slope).is_positive)
    out.append(_sympy_check(
        "Eq. 5", "where B < 0 (p < p*(L)), a gradient-descent step on t increases the regression loss L(t); "
        "the supplement's Fig. 1 plots |dL_Har/dt| and hides this",
        "[D]", ok,
        f"d/d eta L(t - eta B dL/dt) at eta = 0 is {sp.simplify(step)} (B = b), positive for b < 0 and dL/dt != 0",
        r"\left.\frac{d}{d\eta}\mathcal{L}\!\left(t - \eta B \tfrac{\partial\mathcal{L}}{\partial t}\right)\right|_{\eta=0}"
        r" = -B \left(\tfrac{\partial\mathcal{L}}{\partial t}\right)^2 > 0 \text{ if } B < 0",
    ))
    return out


def _checks_eq6_to_10() -> list[Check]:
    x, y = sp.symbols("x y", real=True)
    p = sp.Symbol("p", positive=True)
    L = sp.Symbol("L", real=True)
    out = []

    F = (1 + sp.exp(-y)) * x + (1 + sp.exp(-x)) * y
    l_har = (1 + sp.exp(-L)) * (-sp.log(p)) + (1 + p) * L
    ok = _is_zero(F.subs({x: -sp.log(p), y: L}) - l_har)
    out.append(_sympy_check(
        "Eq. 7", "F(x, y) = (1 + e^-y) x + (1 + e^-x) y is Eq. 6 with x = CE = -log p, y = L",
        "[S]", ok, "simplify(F(-log p, L) - L_Har) == 0",
        r"F(x, y) = (1 + e^{-y})x + (1 + e^{-x})y",
    ))

    dF_dx = sp.diff(F, x)
    out.append(_sympy_check(
        "Eq. 8", "dF/dx = 1 + e^-y - y e^-x", "[S]", _is_zero(dF_dx - printed_eq8(x, y)),
        "simplify(diff(F, x) - Eq. 8) == 0",
        sp.latex(sp.Eq(sp.Symbol(r"\frac{\partial F}{\partial x}"), printed_eq8(x, y))),
    ))

    # Eq. 9: for y > 0, dF/dx = (1 + e^-y)(1 - e^-(x - x0)) with x0 = ln y - ln(1 + e^-y), so
    # dF/dx > 0 <=> e^-x < (1 + e^-y)/y <=> x > x0.
    yp = sp.Symbol("y", positive=True)
    xr = sp.Symbol("x", real=True)
    x0 = printed_eq9_threshold(yp)
    dF = printed_eq8(xr, yp)
    factor_ok = _is_zero(dF - (1 + sp.exp(-yp)) * (1 - sp.exp(-(xr - x0))))
    d = sp.Symbol("d", real=True)  # d = x - x0
    sign_ok = (
        bool((1 + sp.exp(-yp)).is_positive)
        and sp.solve_univariate_inequality(1 - sp.exp(-d) > 0, d, relational=False) == sp.Interval.open(0, sp.oo)
        and sp.solve_univariate_inequality(1 - sp.exp(-d) < 0, d, relational=False) == sp.Interval.open(-sp.oo, 0)
        and _is_zero(dF.subs(xr, x0))
    )
    out.append(_sympy_check(
        "Eq. 9", "for y > 0: dF/dx > 0 <=> e^-x < (1 + e^-y)/y <=> x > ln y - ln(1 + e^-y)",
        "[S]", factor_ok and sign_ok,
        "dF/dx = (1 + e^-y)(1 - e^-(x - x0)) with x0 = ln y - ln(1 + e^-y) (simplify == 0); 1 + e^-y > 0 and "
        "1 - e^-d > 0 exactly for d in (0, oo) (sympy inequality solver), so dF/dx > 0 exactly when x > x0 and dF/dx(x0) = 0. (For y = 0, dF/dx = 2.)",
        r"\frac{\partial F}{\partial x} > 0 \iff e^{-x} < \frac{1 + e^{-y}}{y} \iff x > \ln y - \ln(1 + e^{-y})",
    ))

    d_dp = sp.diff(l_har, p)
    out.append(_sympy_check(
        "Eq. 10", "d/dp of (1 + e^-L)(-log p) + (1 + p) L equals L - (1 + e^-L)/p exactly",
        "[S]", _is_zero(d_dp - printed_eq10(p, L)),
        "simplify(diff(L_Har, p) - Eq. 10) == 0 with CE = -log p, beta_c = p (Eq. 4)",
        sp.latex(sp.Eq(sp.Symbol(r"\frac{\partial \mathcal{L}_{Har}}{\partial p}"), printed_eq10(p, L))),
    ))

    # The supplement's remark after Eq. 10: dL_Har/dp < 0 under the condition of Eq. 9. Indeed
    # dL_Har/dp = (dF/dx)(dx/dp) = -(1/p) dF/dx at x = -log p, y = L.
    chain = -printed_eq8(-sp.log(p), L) / p
    out.append(_sympy_check(
        "Eq. 10", "dL_Har/dp = -(1/p) dF/dx at x = CE, so dL_Har/dp < 0 exactly under the condition of Eq. 9",
        "[S]", _is_zero(printed_eq10(p, L) - chain),
        "simplify(Eq. 10 + Eq. 8(x = -log p, y = L) / p) == 0; 1/p > 0",
        r"\frac{\partial \mathcal{L}_{Har}}{\partial p} = -\frac{1}{p}\,\frac{\partial F}{\partial x}\Big|_{x = -\log p,\ y = \mathcal{L}}",
    ))
    return out


def _checks_eq11_to_13() -> list[Check]:
    u = sp.Symbol("u", nonnegative=True)
    g = sp.Symbol("gamma", positive=True)
    hiou = (1 + u) ** g * (1 - u)
    derivative = sp.diff(hiou, u)
    out = []

    out.append(_sympy_check(
        "Eq. 12", "d/dIoU (1 + IoU)^g (1 - IoU) = (1 + IoU)^(g - 1) ((g - 1) - (g + 1) IoU) (corrected exponent g - 1)",
        "[D]", _is_zero(derivative - corrected_eq12(u, g)),
        "simplify(diff(Eq. 11, IoU) - corrected Eq. 12) == 0",
        sp.latex(sp.Eq(sp.Symbol(r"\frac{\partial \mathcal{L}_{HIoU}}{\partial IoU}"), corrected_eq12(u, g))),
    ))

    difference = sp.simplify(printed_eq12(u, g) - derivative)
    point = {u: sp.Rational(1, 2), g: sp.Rational(4, 5)}
    printed_at, true_at = printed_eq12(u, g).subs(point), derivative.subs(point)
    ratio = sp.simplify(printed_eq12(u, g) / corrected_eq12(u, g))
    ok = difference != 0 and sp.simplify(printed_at - true_at) != 0 and _is_zero(ratio - (1 + u))
    out.append(_sympy_check(
        "Eq. 12", "the printed Eq. 12, (1 + IoU)^g ((g - 1) - (g + 1) IoU), is NOT the derivative of Eq. 11",
        "[D]", ok,
        f"printed - derivative = {difference} != 0; at IoU = 1/2, gamma = 4/5: printed = "
        f"{float(printed_at):.6f}, derivative = {float(true_at):.6f}; printed / derivative = {ratio}",
        r"(1 + IoU)^{\gamma}\big((\gamma - 1) - (\gamma + 1) IoU\big) \neq "
        r"\frac{\partial \mathcal{L}_{HIoU}}{\partial IoU} = (1 + IoU)^{\gamma - 1}\big((\gamma - 1) - (\gamma + 1) IoU\big)",
        erratum=True,
    ))

    ok = _is_zero(printed_eq12(u, g) - (1 + u) * derivative) and bool((1 + u).is_positive)
    out.append(_sympy_check(
        "Eq. 12", "the sign is unaffected: printed Eq. 12 = (1 + IoU) * derivative, and 1 + IoU > 0 on [0, 1]",
        "[D]", ok, "simplify(printed - (1 + IoU) * derivative) == 0; 1 + IoU > 0 for IoU >= 0 (sympy assumptions)",
        r"(1 + IoU)^{\gamma}(\ldots) = (1 + IoU)\cdot(1 + IoU)^{\gamma - 1}(\ldots), \quad 1 + IoU > 0",
    ))

    ur = sp.Symbol("u", real=True)
    thr = printed_eq13_threshold(g)
    solved = sp.solve((g - 1) - (g + 1) * ur <= 0, ur)
    ok = (
        isinstance(solved, sp.GreaterThan) and solved.lhs == ur and _is_zero(solved.rhs - thr)
        and bool(((1 + u) ** (g - 1)).is_positive)
        and _is_zero((g - 1) - (g + 1) * ur - (g + 1) * (thr - ur))
    )
    out.append(_sympy_check(
        "Eq. 13", "dL_HIoU/dIoU <= 0 exactly where IoU >= (g - 1)/(g + 1) (the factor (1 + IoU)^(g - 1) > 0)",
        "[S]", ok,
        f"sympy.solve((g - 1) - (g + 1) IoU <= 0, IoU) = {solved} (for g > 0), i.e. IoU >= (g - 1)/(g + 1); "
        "(g - 1) - (g + 1) IoU = (g + 1)((g - 1)/(g + 1) - IoU); (1 + IoU)^(g - 1) > 0 for IoU >= 0",
        r"\frac{\partial \mathcal{L}_{HIoU}}{\partial IoU} \le 0 \iff IoU \ge \frac{\gamma - 1}{\gamma + 1}",
    ))

    solved_g = sp.solve(thr <= 0, g)
    ok = solved_g == (g <= 1)
    out.append(_sympy_check(
        "Eq. 13", "the threshold (g - 1)/(g + 1) is <= 0, so Eq. 13 holds on all of [0, 1], exactly when gamma <= 1",
        "[S]", ok,
        f"sympy.solve((g - 1)/(g + 1) <= 0, g) = {solved_g} for g > 0",
        r"\frac{\gamma - 1}{\gamma + 1} \le 0 \iff \gamma \le 1",
    ))

    s = sp.Symbol("s", positive=True)  # gamma = 1 + s > 1
    v = sp.Symbol("v", positive=True)  # IoU = threshold - v, below the threshold
    thr_above = sp.simplify(thr.subs(g, 1 + s))
    below = sp.simplify(corrected_eq12(thr - v, g).subs(g, 1 + s) / (1 + thr - v).subs(g, 1 + s) ** s)
    ok = (
        bool(thr_above.is_positive) and bool(sp.simplify(1 - thr_above).is_positive)
        and _is_zero(below - (2 + s) * v) and bool(below.is_positive)
    )
    out.append(_sympy_check(
        "Eq. 13", "for gamma > 1 the threshold lies in (0, 1) and the loss increases with IoU on [0, (g - 1)/(g + 1))",
        "[D]", ok,
        f"with g = 1 + s, s > 0: threshold = {thr_above}, in (0, 1); at IoU = threshold - v, v > 0, the "
        f"derivative is (1 + IoU)^s * {below} > 0",
        r"\gamma > 1 \Rightarrow 0 < \frac{\gamma - 1}{\gamma + 1} < 1,\quad "
        r"\frac{\partial \mathcal{L}_{HIoU}}{\partial IoU} > 0 \text{ for } IoU < \frac{\gamma - 1}{\gamma + 1}",
    ))
    return out


def sympy_checks() -> list[Check]:
    """Every symbolic check, in equation order (a few seconds)."""
    return _guarded(_checks_eq1_to_5, "Eq. 1-5", "sympy") + _guarded(_checks_eq6_to_10, "Eq. 6-10", "sympy") + _guarded(
        _checks_eq11_to_13, "Eq. 11-13", "sympy"
    )


def _guarded(fn: Callable[[], list[Check]], equation: str, kind: str) -> list[Check]:
    """Run a group of checks; an exception becomes a failed check (never a silent pass)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported as a FAIL row with the error
        return [Check(equation, f"checks of {equation} raised an error", "[S]", False, kind, False,
                      f"{type(exc).__name__}: {exc}")]


# ----------------------------------------------------------------------------------------------------
# Numeric checks: closed forms vs torch.autograd through harmonic.losses, float64
# ----------------------------------------------------------------------------------------------------
_RTOL, _ATOL = 1e-10, 1e-12


def _compare(autograd_values, closed_form) -> tuple[bool, float]:
    a = np.asarray(autograd_values, dtype=np.float64)
    c = np.asarray(closed_form, dtype=np.float64)
    if a.shape != c.shape or not (np.isfinite(a).all() and np.isfinite(c).all()):
        return False, float("nan")
    err = np.abs(a - c)
    return bool(np.all(err <= _ATOL + _RTOL * np.abs(c))), float(err.max(initial=0.0))


def _autograd_check(equation, statement, tag, passed, detail, latex="", erratum=False) -> Check:
    return Check(equation, statement, tag, bool(passed), "autograd", erratum, detail, latex)


def autograd_checks(n_points: int = 64, seed: int = 0, device: str | None = None) -> list[Check]:
    """Closed forms vs ``torch.autograd`` of :mod:`harmonic.losses` at ``n_points`` random float64 points.

    Args:
        n_points: random points per comparison (>= 1).
        seed: seed of the ``torch.Generator`` drawing the points.
        device: torch device for the loss evaluation (default CPU).
    """
    if isinstance(n_points, bool) or not isinstance(n_points, int | np.integer) or n_points < 1:
        raise ValueError(f"n_points must be an integer >= 1, got {n_points!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    import torch

    try:
        device = torch.device(device or "cpu")
    except RuntimeError as exc:
        raise ValueError(f"device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: CUDA is not available on this machine")
    gen = torch.Generator().manual_seed(int(seed))
    n = int(n_points)

    def uniform(lo, hi, shape=(n,)):
        return (lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)).to(device)

    groups = [
        lambda: _autograd_eq5(torch, uniform, n),
        lambda: _autograd_eq8_10(torch, uniform, n),
        lambda: _autograd_eq12(torch, uniform, n, gen, device),
    ]
    out: list[Check] = []
    for name, fn in zip(("Eq. 5", "Eq. 8-10", "Eq. 12"), groups):
        out += _guarded(fn, name, "autograd")
    return out


def _autograd_eq5(torch, uniform, n) -> list[Check]:
    out = []
    p = uniform(0.01, 0.99)
    t_values = uniform(-3.0, 3.0)
    reg_losses = {
        "smooth-L1 (beta = 1)": (
            lambda t: torch.nn.functional.smooth_l1_loss(t, torch.zeros_like(t), reduction="none", beta=1.0),
            lambda t: t.clamp(-1.0, 1.0),
        ),
        "t^2 / 2": (lambda t: 0.5 * t**2, lambda t: t),
    }
    for name, (loss_fn, loss_grad) in reg_losses.items():
        t = t_values.clone().requires_grad_(True)
        reg = loss_fn(t)
        total = harmonic_loss(-torch.log(p), reg, reduction="sum")
        (grad,) = torch.autograd.grad(total, t)
        closed = printed_eq5(p.cpu().numpy(), reg.detach().cpu().numpy(), loss_grad(t_values).cpu().numpy())
        ok, err = _compare(grad.cpu().numpy(), closed)
        B = bracket(p.cpu().numpy(), reg.detach().cpu().numpy())
        n_neg = int((B < 0).sum())
        below = p.cpu().numpy() < bracket_root(reg.detach().cpu().numpy())
        ok = ok and bool(np.array_equal(B < 0, below))
        out.append(_autograd_check(
            "Eq. 5", f"Eq. 5 matches autograd of harmonic_loss(-log p, L(t)) w.r.t. t, L = {name}", "[S]", ok,
            f"max |autograd - Eq. 5| = {err:.2e} over {n} points; B < 0 at {n_neg} of them, exactly those with "
            "p < bracket_root(L)",
        ))

    # detach_factors=True (the ablation switch) drops the e^-L log p term: gradient (1 + p) dL/dt.
    t = t_values.clone().requires_grad_(True)
    reg = 0.5 * t**2
    (grad,) = torch.autograd.grad(harmonic_loss(-torch.log(p), reg, detach_factors=True, reduction="sum"), t)
    ok_detached, err = _compare(grad.cpu().numpy(), ((1 + p) * t_values).cpu().numpy())
    differs = not _compare(grad.cpu().numpy(), printed_eq5(p.cpu().numpy(), reg.detach().cpu().numpy(),
                                                           t_values.cpu().numpy()))[0]
    out.append(_autograd_check(
        "Eq. 5", "with detach_factors=True the gradient is (1 + p) dL/dt, not Eq. 5 (the supplement "
        "differentiates through beta_r)", "[D]", ok_detached and differs,
        f"max |autograd - (1 + p) dL/dt| = {err:.2e}; differs from Eq. 5: {differs}",
    ))
    return out


def _autograd_eq8_10(torch, uniform, n) -> list[Check]:
    out = []
    x = uniform(0.0, 3.0).requires_grad_(True)
    y = uniform(0.0, 6.0)  # ranges where both signs of dF/dx occur
    (grad,) = torch.autograd.grad(harmonic_loss(x, y, reduction="sum"), x)
    xs, ys = x.detach().cpu().numpy(), y.cpu().numpy()
    ok, err = _compare(grad.cpu().numpy(), printed_eq8(xs, ys))
    positive = grad.cpu().numpy() > 0
    with np.errstate(divide="ignore"):
        above = xs > printed_eq9_threshold(ys)
    ok9 = bool(np.array_equal(positive, above))
    out.append(_autograd_check(
        "Eq. 8", "Eq. 8 matches autograd of harmonic_loss(cls_loss = x, reg_loss = y) w.r.t. cls_loss", "[S]", ok,
        f"max |autograd - Eq. 8| = {err:.2e} over {n} points",
    ))
    out.append(_autograd_check(
        "Eq. 9", "autograd dF/dx > 0 exactly at the points with x > ln y - ln(1 + e^-y)", "[S]", ok9,
        f"{int(positive.sum())} of {n} points have dF/dx > 0; Eq. 9 classifies all {n} alike: {ok9}",
    ))

    p = uniform(0.01, 0.99).requires_grad_(True)
    L = uniform(0.0, 5.0)
    (grad,) = torch.autograd.grad(harmonic_loss(-torch.log(p), L, reduction="sum"), p)
    ok, err = _compare(grad.cpu().numpy(), printed_eq10(p.detach().cpu().numpy(), L.cpu().numpy()))
    out.append(_autograd_check(
        "Eq. 10", "Eq. 10 matches autograd of harmonic_loss(-log p, L) w.r.t. p", "[S]", ok,
        f"max |autograd - Eq. 10| = {err:.2e} over {n} points",
    ))
    return out


def _autograd_eq12(torch, uniform, n, gen, device) -> list[Check]:
    out = []
    u = uniform(0.0, 1.0).requires_grad_(True)
    g = uniform(0.1, 2.0)  # hiou_from_iou accepts gamma > 1 too
    (grad,) = torch.autograd.grad(hiou_from_iou(u, g).sum(), u)
    us, gs, ga = u.detach().cpu().numpy(), g.cpu().numpy(), grad.cpu().numpy()
    ok, err = _compare(ga, corrected_eq12(us, gs))
    out.append(_autograd_check(
        "Eq. 12", "corrected Eq. 12 matches autograd of hiou_from_iou w.r.t. IoU (gamma in [0.1, 2])", "[D]", ok,
        f"max |autograd - corrected Eq. 12| = {err:.2e} over {n} points",
    ))
    matches_printed = np.isclose(ga, printed_eq12(us, gs), rtol=1e-6, atol=1e-9)
    rel = np.abs(ga - printed_eq12(us, gs)) / np.maximum(np.abs(ga), 1e-300)
    same_sign = bool(np.array_equal(np.sign(ga), np.sign(printed_eq12(us, gs))))
    rel_is_iou = bool(np.allclose(rel, us, rtol=1e-9, atol=1e-12))
    out.append(_autograd_check(
        "Eq. 12", "printed Eq. 12 disagrees with autograd (the erratum, numerically): relative error = IoU, same sign",
        "[D]", (not matches_printed.any()) and same_sign and rel_is_iou,
        f"printed Eq. 12 matches autograd at {int(matches_printed.sum())} of {n} points; |printed - autograd| / "
        f"|autograd| equals IoU at every point: {rel_is_iou} (median {float(np.median(rel)):.3f}); "
        f"same sign everywhere: {same_sign}",
        erratum=True,
    ))

    # Through actual boxes: d loss / d box = (d HIoU / d IoU) (d IoU / d box), chain rule.
    gamma = 0.8
    xy = uniform(0.0, 50.0, (n, 2))
    wh = uniform(10.0, 40.0, (n, 2))
    target = torch.cat([xy, xy + wh], dim=1)
    pred = (target + uniform(-3.0, 3.0, (n, 4))).requires_grad_(True)  # valid boxes, IoU > 0
    (grad_loss,) = torch.autograd.grad(harmonic_iou_loss(pred, target, gamma=gamma, reduction="sum"), pred)
    iou = aligned_box_iou(pred, target)
    (grad_iou,) = torch.autograd.grad(iou.sum(), pred)
    factor = corrected_eq12(iou.detach().cpu().numpy(), gamma)[:, None]
    ok, err = _compare(grad_loss.cpu().numpy(), factor * grad_iou.cpu().numpy())
    ok = ok and bool((iou > 0).all())
    out.append(_autograd_check(
        "Eq. 12", "autograd of harmonic_iou_loss w.r.t. the boxes = corrected Eq. 12 x autograd of aligned_box_iou "
        "(chain rule, gamma = 0.8)", "[D]", ok,
        f"max |autograd - corrected Eq. 12 * dIoU/dbox| = {err:.2e} over {n} box pairs "
        f"(IoU in [{float(iou.min().detach()):.2f}, {float(iou.max().detach()):.2f}])",
    ))
    return out


# ----------------------------------------------------------------------------------------------------
# All checks, presentation, JSON
# ----------------------------------------------------------------------------------------------------
def checks(n_points: int = 64, seed: int = 0, device: str | None = None) -> list[Check]:
    """Every check: the sympy proofs, then the autograd comparisons. Returns a list of :class:`Check`."""
    autograd = autograd_checks(n_points, seed, device)  # validates its arguments first
    return sympy_checks() + autograd


def select(results: Iterable[Check], *equations: str, kind: str | None = None, tag: str | None = None) -> list[Check]:
    """The checks of the given equations (all if none given), in ``results`` order, optionally of one ``kind``
    and one ``tag``."""
    return [c for c in results if (not equations or c.equation in equations) and (kind is None or c.kind == kind)
            and (tag is None or c.tag == tag)]


def verdict(check: Check) -> str:
    return "PASS" if check.passed else "FAIL"


def format_rows(results: Iterable[Check]) -> str:
    """One text row per check: verdict, equation, tag, kind, statement; the erratum on its own line."""
    lines = []
    for c in results:
        lines.append(f"{verdict(c)}  {c.equation:<7} {c.tag} {c.kind:<8}  {c.statement}")
        if c.erratum and c.passed and c.kind == "sympy":
            lines.append(f"      {ERRATUM_LINE}")
    return "\n".join(lines)


def check_markdown(check: Check) -> str:
    """One check as markdown: verdict, equation, tag, statement, its formula as display LaTeX, the detail."""
    flag = " **ERRATUM in the supplement**" if check.erratum else ""
    parts = [f"**{verdict(check)}** {check.equation} {check.tag} ({check.kind}){flag}: {check.statement}"]
    if check.latex:
        parts.append(f"$${check.latex}$$")
    parts.append(f"<small>{check.detail}</small>")
    return "\n\n".join(parts)


def equations_markdown(results: Iterable[Check], *equations: str, kind: str | None = None,
                       tag: str | None = None) -> str:
    """:func:`check_markdown` of each check :func:`select` picks, separated by blank lines (a notebook section)."""
    return "\n\n".join(check_markdown(c) for c in select(results, *equations, kind=kind, tag=tag))


def bracket_root_table(L_values: Iterable[float] = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)) -> str:
    """A markdown table of :func:`bracket_root`: ``p*(L)`` (4 significant digits) at each ``L``."""
    L_values = [float(v) for v in L_values]
    rows = [r"| $\mathcal{L}$ | $p^*(\mathcal{L})$ |", "|---|---|"]
    rows += [f"| {L:g} | {p:.4g} |" for L, p in zip(L_values, np.atleast_1d(bracket_root(L_values)))]
    return "\n".join(rows)


def assert_passed(results: list[Check]) -> str:
    """``"n/n checks passed"``; raises AssertionError naming every failed check."""
    failed = [c for c in results if not c.passed]
    if failed:
        raise AssertionError(f"{len(failed)} of {len(results)} checks failed: "
                             + "; ".join(f"{c.equation} ({c.kind}): {c.statement}" for c in failed))
    return f"{len(results)}/{len(results)} checks passed"


def to_markdown(results: Iterable[Check]) -> str:
    """A markdown table of the checks (for the notebook)."""
    rows = ["| | equation | tag | kind | statement | detail |", "|---|---|---|---|---|---|"]
    for c in results:
        mark = " **ERRATUM**" if c.erratum else ""
        esc = lambda s: s.replace("|", r"\|")  # noqa: E731
        rows.append(f"| {verdict(c)} | {c.equation}{mark} | {c.tag} | {c.kind} | {esc(c.statement)} | {esc(c.detail)} |")
    return "\n".join(rows)


def checks_to_json(results: list[Check], parameters: dict | None = None, seed: int | None = None) -> dict:
    """The checks with their provenance, as a JSON-ready dict (``all_passed``, ``n_failed``, ``checks``)."""
    return {
        "all_passed": all(c.passed for c in results),
        "n_checks": len(results),
        "n_failed": sum(not c.passed for c in results),
        "checks": [c.to_dict() for c in results],
        "provenance": provenance(parameters or {}, seed=seed),
    }


def write_checks_json(path: str | Path, results: list[Check], parameters: dict | None = None,
                      seed: int | None = None) -> Path:
    """Write :func:`checks_to_json` atomically to ``path``; returns the path."""
    return atomic_write_json(path, checks_to_json(results, parameters, seed))
