import math

import matplotlib.pyplot as plt  # only to check that no figure is registered with pyplot
import numpy as np
import pytest
import torch
from matplotlib.collections import QuadMesh
from matplotlib.figure import Figure
from PIL import Image
from scipy import stats

from harmonic.evaluation.figures import plot_score_vs_iou
from harmonic.experiments.figures import plot_metric_vs_param, plot_training_curves
from harmonic.losses import hiou_from_iou
from harmonic.theory import figures as theory
from harmonic.theory.derivations import bracket_root
from harmonic.utils.figures import FIGSIZE, save_figure

DPI = 40


def _records(n=30, *, harmonic=False, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r = {"iter": i * 10, "loss": 2.0 - i / n + 0.05 * rng.normal(), "loss/classification": 1.0 - i / (2 * n),
             "loss/bbox_regression": 1.0 - i / (2 * n), "lr": 0.01}
        if harmonic:
            r.update({"beta_r": 0.4 + i / (4 * n), "beta_c": 0.3 + i / (4 * n)})
        out.append(r)
    return out


def _logs():
    return {"baseline": _records(), "harmonic": _records(harmonic=True, seed=1)}


def _score_runs():
    rng = np.random.default_rng(0)
    iou = rng.uniform(0.5, 1.0, 200)
    return {"baseline": (np.clip(iou + rng.normal(0, 0.2, 200), 0, 1), iou), "harmonic": (iou * 0.9, iou)}


FIGURES = {
    "fig1a_grad_t": lambda path: theory.fig1a_grad_t(21, path=path, dpi=DPI),
    "fig1b_grad_t_standard": lambda path: theory.fig1b_grad_t_standard(21, path=path, dpi=DPI),
    "fig1a_signed": lambda path: theory.fig1a_signed(21, path=path, dpi=DPI),
    "fig2_grad_p": lambda path: theory.fig2_grad_p(21, path=path, dpi=DPI),
    "fig4_hiou": lambda path: theory.fig4_hiou([0.4, 0.8], points=21, path=path, dpi=DPI),
    "training_curves": lambda path: plot_training_curves(_logs(), path=path, dpi=DPI),
    "score_vs_iou": lambda path: plot_score_vs_iou(_score_runs(), path=path, dpi=DPI),
    "metric_vs_param": lambda path: plot_metric_vs_param(
        [0.2, 0.4, 0.8], [30.0, 31.0, 32.0], [0.5, None, 0.4], "hiou", "gamma", path=path, dpi=DPI),
}


# ----------------------------------------------------------------------------------------------------
# every figure: a Figure, a PNG of figsize * dpi pixels, no pyplot state, no temporary files left
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figure_returns_figure_and_writes_png_of_expected_size(name, tmp_path):
    open_before = plt.get_fignums()
    path = tmp_path / "sub" / f"{name}.png"
    fig = FIGURES[name](path)
    assert isinstance(fig, Figure)
    assert plt.get_fignums() == open_before  # nothing registered with pyplot
    width, height = (round(v * DPI) for v in fig.get_size_inches())
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (width, height)
        assert np.unique(np.asarray(image.convert("L"))).size > 10  # not a blank canvas
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_single_panel_figures_use_the_documented_size(tmp_path):
    fig = theory.fig4_hiou(points=11, path=tmp_path / "f.png", dpi=50)
    assert tuple(fig.get_size_inches()) == FIGSIZE
    with Image.open(tmp_path / "f.png") as image:
        assert image.size == (round(FIGSIZE[0] * 50), round(FIGSIZE[1] * 50))


def test_save_figure_is_atomic_and_checks_its_arguments(tmp_path, monkeypatch):
    path = tmp_path / "f.png"
    path.write_bytes(b"old")
    fig = theory.fig4_hiou(points=11)

    def broken(*args, **kwargs):
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError, match="renderer failed"):
        save_figure(fig, path)
    assert path.read_bytes() == b"old"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png"]
    with pytest.raises(ValueError, match=r"\.png"):
        save_figure(theory.fig4_hiou(points=11), tmp_path / "f.jpg")
    with pytest.raises(ValueError, match="dpi"):
        save_figure(theory.fig4_hiou(points=11), path, dpi=0)


# ----------------------------------------------------------------------------------------------------
# the plotted values are the code's gradients, and they agree with the supplement's closed forms
# ----------------------------------------------------------------------------------------------------
P = np.linspace(0.01, 1.0, 41)
T = np.linspace(-3.0, 3.0, 41)
L = np.linspace(0.0, 4.0, 41)


def test_grad_t_autograd_agrees_with_eq5_closed_form_on_the_grid():
    auto = theory.grad_t_grid(P, T)
    closed = theory.grad_t_grid(P, T, method="closed_form")
    assert auto.shape == (41, 41)
    np.testing.assert_allclose(auto, closed, rtol=1e-12, atol=1e-12)
    detached = theory.grad_t_grid(P, T, detach_factors=True)
    np.testing.assert_allclose(detached, theory.grad_t_grid(P, T, method="closed_form", detach_factors=True),
                               rtol=1e-12, atol=1e-12)
    assert not np.allclose(auto, detached)  # the d beta_r / dt term matters


def test_grad_t_hand_values():
    # p = 1: log p = 0, bracket 2; t = 0.5: dL/dt = 0.5 -> 1.0
    assert theory.grad_t_grid([1.0], [0.5])[0, 0] == pytest.approx(1.0, abs=1e-12)
    # p = e^-1, t = 2: L = 1.5, dL/dt = 1 -> 1 + e^-1 - e^-1.5
    expected = 1 + math.exp(-1) - math.exp(-1.5)
    assert theory.grad_t_grid([math.exp(-1)], [2.0])[0, 0] == pytest.approx(expected, abs=1e-12)
    # t = -2: the gradient flips with dL/dt
    assert theory.grad_t_grid([math.exp(-1)], [-2.0])[0, 0] == pytest.approx(-expected, abs=1e-12)


def test_standard_gradient_does_not_depend_on_p():
    grad = theory.grad_t_standard_grid(P, T)
    np.testing.assert_allclose(grad, np.broadcast_to(np.clip(T, -1, 1), grad.shape), atol=1e-12)


def test_grad_t_reverses_exactly_below_the_bracket_root():
    t = np.array([-1.5, -0.5, 0.3, 1.0, 2.0])
    loss = theory.smooth_l1(torch.as_tensor(t)).numpy()
    root = bracket_root(loss)
    below = np.array([theory.grad_t_grid([r * 0.9], [ti])[0, 0] for r, ti in zip(root, t)])
    above = np.array([theory.grad_t_grid([min(1.0, r * 1.1)], [ti])[0, 0] for r, ti in zip(root, t)])
    assert np.all(np.sign(below) == -np.sign(t))  # gradient step increases the regression loss
    assert np.all(np.sign(above) == np.sign(t))


def test_grad_p_autograd_agrees_with_eq10_and_changes_sign_at_the_eq9_boundary():
    auto = theory.grad_p_grid(P, L)
    closed = theory.grad_p_grid(P, L, method="closed_form")
    assert auto.shape == (41, 41)
    np.testing.assert_allclose(auto, closed, rtol=1e-12, atol=1e-12)
    # Eq. 10 at L = 3: zero at p = (1 + e^-3) / 3
    boundary = (1 + math.exp(-3)) / 3
    assert theory.grad_p_grid([boundary * 0.95], [3.0])[0, 0] < 0 < theory.grad_p_grid([boundary * 1.05], [3.0])[0, 0]


def test_gradient_grid_discrepancy_is_round_off():
    gaps = theory.gradient_grid_discrepancy(31)
    assert set(gaps) == {"eq5", "eq5_detached", "eq10"}
    assert all(0 <= g < 1e-10 for g in gaps.values())


def test_fig1a_shows_the_absolute_autograd_gradient():
    fig = theory.fig1a_grad_t(11)
    mesh = next(c for c in fig.axes[0].collections if isinstance(c, QuadMesh))
    p = np.linspace(0.01, 1.0, 11)
    t = np.linspace(-3.0, 3.0, 11)
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(11, 11), np.abs(theory.grad_t_grid(p, t)), atol=1e-12)
    assert "[S]" in fig.axes[0].get_title()


def test_fig1a_signed_marks_the_root_curve_and_is_tagged_derived():
    fig = theory.fig1a_signed(11)
    ax = fig.axes[0]
    assert "[D]" in ax.get_title()
    (line,) = ax.get_lines()
    t = np.linspace(-3.0, 3.0, 11)
    expected = bracket_root(theory.smooth_l1(torch.as_tensor(t)).numpy())
    np.testing.assert_allclose(line.get_ydata(), expected, atol=1e-12)


def test_fig4_curves_are_hiou_from_iou():
    fig = theory.fig4_hiou([0.3, 0.9], nonmonotone_gamma=3.0, points=51)
    lines = fig.axes[0].get_lines()
    labels = [ln.get_label() for ln in lines]
    assert len([lb for lb in labels if "gamma" in lb]) == 4  # 1 - IoU, two gammas, the gamma > 1 curve
    iou = torch.linspace(0, 1, 51, dtype=torch.float64)
    np.testing.assert_allclose(lines[0].get_ydata(), (1 - iou).numpy())
    np.testing.assert_allclose(lines[1].get_ydata(), hiou_from_iou(iou, 0.3).numpy())
    np.testing.assert_allclose(lines[2].get_ydata(), hiou_from_iou(iou, 0.9).numpy())
    assert lines[3].get_linestyle() == "--"
    assert np.any(np.diff(lines[3].get_ydata()) > 0)  # gamma > 1 is not monotone
    assert "not recovered" in fig.get_supxlabel()
    assert len(theory.fig4_hiou(points=11, nonmonotone_gamma=None).axes[0].get_lines()) == 1 + 5


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: theory.fig1a_grad_t(1), "grid"),
        (lambda: theory.fig1a_grad_t(11, p_range=(0.0, 1.0)), "p_range"),
        (lambda: theory.fig1a_signed(11, t_range=(2.0, -2.0)), "t_range"),
        (lambda: theory.fig2_grad_p(11, loss_range=(-1.0, 2.0)), "loss_range"),
        (lambda: theory.fig4_hiou([]), "gammas"),
        (lambda: theory.fig4_hiou(nonmonotone_gamma=0.5), "nonmonotone_gamma"),
        (lambda: theory.grad_t_grid([0.5], [0.0], method="numeric"), "method"),
        (lambda: theory.grad_p_grid([1.5], [0.0]), "p must lie"),
    ],
)
def test_figure_arguments_are_checked(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------------------------------
# training-notebook figures
# ----------------------------------------------------------------------------------------------------
def test_training_curves_default_panels_and_moving_average():
    logs = _logs()
    fig = plot_training_curves(logs, smooth=5)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["total loss", "loss/bbox_regression", "loss/classification", "beta_r", "beta_c"]
    total = fig.axes[0]
    raw, smoothed = total.get_lines()[:2]
    values = np.array([r["loss"] for r in logs["baseline"]])
    np.testing.assert_allclose(raw.get_ydata(), values)
    expected = [values[max(0, i - 4): i + 1].mean() for i in range(len(values))]
    np.testing.assert_allclose(smoothed.get_ydata(), expected)
    beta_r = fig.axes[3]
    assert [ln.get_label() for ln in beta_r.get_lines() if not ln.get_label().startswith("_")] == ["harmonic"]


def test_training_curves_selected_terms_without_smoothing():
    fig = plot_training_curves(_logs(), terms=["classification", "lr"], smooth=0)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["loss/classification", "lr"]
    assert len(visible[0].get_lines()) == 2  # one raw line per run


def test_training_curves_sort_records_by_iteration():
    records = _records(5)
    fig = plot_training_curves({"run": records[::-1]}, terms=["loss"], smooth=0)
    np.testing.assert_array_equal(fig.axes[0].get_lines()[0].get_xdata(), [0, 10, 20, 30, 40])


@pytest.mark.parametrize(
    "logs, terms, match",
    [
        ({}, None, "non-empty dict"),
        ({"baseline": []}, None, r"logs\['baseline'\] must be a non-empty list"),
        ({"baseline": [{"loss": 1.0}]}, None, r"logs\['baseline'\]\[0\] has no 'iter'"),
        ({"baseline": [{"iter": 0}]}, None, r"has no 'loss'"),
        ({"baseline": _records(3)}, ["hiou"], r"'loss/hiou'.*not logged by any run"),
        ({"baseline": [*_records(2), {"iter": 99, "loss": 1.0}]}, ["classification"],
         r"logs\['baseline'\]\[2\] has no 'loss/classification'"),
        ({"baseline": [{"iter": 0, "loss": float("nan")}]}, None, "not finite"),
        ({"baseline": _records(3)}, [], "at least one term"),
        ({"baseline": ["oops"]}, None, r"\[0\] must be a dict"),
    ],
)
def test_training_curves_bad_logs_give_clear_errors(logs, terms, match):
    with pytest.raises(ValueError, match=match):
        plot_training_curves(logs, terms)


def test_score_vs_iou_titles_carry_scipy_correlations():
    runs = _score_runs()
    fig = plot_score_vs_iou(runs)
    scores, ious = runs["baseline"]
    title = fig.axes[0].get_title()
    assert f"{stats.pearsonr(ious, scores).statistic:.3f}" in title
    assert f"{stats.spearmanr(ious, scores).statistic:.3f}" in title
    assert "n=200" in title
    assert "Spearman rho = 1.000" in fig.axes[1].get_title()  # a monotone run


def test_score_vs_iou_degenerate_runs_say_undefined():
    fig = plot_score_vs_iou({"empty": ([], []), "one": ([0.5], [0.7])})
    assert all("undefined" in ax.get_title() for ax in fig.axes)
    assert "nan" not in " ".join(ax.get_title() for ax in fig.axes).lower()


@pytest.mark.parametrize(
    "runs, match",
    [
        ({}, "non-empty dict"),
        ({"a": ([0.1, 0.2], [0.3])}, r"runs\['a'\]: 2 scores but 1 ious"),
        ({"a": ([0.1, 1.2], [0.3, 0.4])}, r"runs\['a'\] scores must lie in \[0, 1\]"),
        ({"a": ([0.1, np.nan], [0.3, 0.4])}, "non-finite"),
        ({"a": ([0.1, 0.2],)}, "pair"),
        ({"a": (np.ones((2, 2)) * 0.5, np.ones((2, 2)) * 0.5)}, "1-D"),
    ],
)
def test_score_vs_iou_bad_input(runs, match):
    with pytest.raises(ValueError, match=match):
        plot_score_vs_iou(runs)


def test_metric_vs_param_overlays_and_skips_missing_stds():
    fig = plot_metric_vs_param([0.8, 0.2, 0.4], [32.0, 30.0, 31.0], [0.4, 0.5, None], "a", "gamma")
    ax = fig.axes[0]
    plot_metric_vs_param([0.2, 0.4], [29.0, 29.5], None, "b", "gamma", ax=ax)
    data_lines = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]
    np.testing.assert_allclose(data_lines[0].get_xdata(), [0.2, 0.4, 0.8])  # sorted by x
    np.testing.assert_allclose(data_lines[0].get_ydata(), [30.0, 31.0, 32.0])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    assert ax.get_xlabel() == "gamma" and ax.get_ylabel() == "AP"


@pytest.mark.parametrize(
    "args, match",
    [
        (([0.2, 0.4], [30.0], [0.1, 0.1]), "same length"),
        (([0.2], [None], [0.1]), "None"),
        (([], [], []), "non-empty"),
        (([0.2], [30.0], [-1.0]), ">= 0"),
        (([0.2], [float("inf")], [0.0]), "finite"),
    ],
)
def test_metric_vs_param_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        plot_metric_vs_param(*args, "label", "gamma")
