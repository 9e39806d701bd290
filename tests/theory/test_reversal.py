"""harmonic.theory.derivations.reversal_score: the score p*(y) above which Eq. 8's dF/dx is negative,
against its closed form (sympy) and the sign of dF/dx from autograd on the package's own loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy as sp
import torch

from harmonic.losses import Y_REVERSAL, harmonic_loss
from harmonic.theory.derivations import focal_target_loss, printed_eq8, reversal_score

YS = np.array([1.3, 1.5, 2.0, 3.0, 5.0, 8.0])


def test_cross_entropy_boundary_is_the_closed_form_and_zeroes_eq8():
    """x = -log p: dF/dx(p*) = 0 exactly for p* = (1 + e^-y)/y (sympy), and reversal_score gives it."""
    y = sp.Symbol("y", positive=True)
    p_star = (1 + sp.exp(-y)) / y
    assert sp.simplify(printed_eq8(-sp.log(p_star), y)) == 0
    np.testing.assert_allclose(reversal_score(YS, "ce"), (1 + np.exp(-YS)) / YS, rtol=1e-15)
    assert reversal_score(1.5, "ce") == pytest.approx(0.8154, abs=1e-4)


def test_no_score_reverses_below_the_threshold():
    for definition in ("ce", "focal"):
        np.testing.assert_array_equal(reversal_score([0.0, 0.5, 1.0, Y_REVERSAL - 1e-9], definition), 1.0)
        assert reversal_score(Y_REVERSAL + 1e-3, definition) < 1.0


def test_focal_boundary_solves_eq9_and_lies_below_the_cross_entropy_one():
    p = reversal_score(YS, "focal")
    np.testing.assert_allclose(focal_target_loss(p), np.log(YS) - np.log1p(np.exp(-YS)), rtol=1e-10)
    assert np.all(p < reversal_score(YS, "ce"))
    assert reversal_score(1.5, "focal") == pytest.approx(0.24, abs=0.005)


@pytest.mark.parametrize("definition", ["ce", "focal"])
def test_sign_of_autograd_dF_dx_changes_at_the_boundary(definition):
    """Autograd of harmonic_loss(x(p), y) w.r.t. x at scores 1e-6 below and above p*(y): positive below,
    negative above."""
    p_star = reversal_score(YS, definition)
    for offset, sign in ((-1e-6, 1.0), (1e-6, -1.0)):
        p = torch.tensor(p_star + offset * p_star, dtype=torch.float64)
        x = (-torch.log(p) if definition == "ce" else -0.25 * (1 - p) ** 2 * torch.log(p)).requires_grad_(True)
        (grad,) = torch.autograd.grad(harmonic_loss(x, torch.tensor(YS), reduction="sum"), x)
        assert torch.all(torch.sign(grad) == sign), (definition, offset, grad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="definition"):
        reversal_score(2.0, "softmax")
    with pytest.raises(ValueError, match=">= 0"):
        reversal_score(-1.0)
    assert math.isclose(reversal_score(0.0), 1.0)
