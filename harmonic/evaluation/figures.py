"""The figure of a detector's prediction consistency: score against IoU of its matched detections."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from harmonic.utils.figures import finish, new_figure


def _correlation_title(label: str, scores: np.ndarray, ious: np.ndarray) -> str:
    n = scores.size
    if n < 2 or np.ptp(scores) == 0 or np.ptp(ious) == 0:
        return f"{label} (n={n})\nPearson / Spearman undefined (fewer than 2 distinct values)"
    pearson = stats.pearsonr(ious, scores).statistic
    spearman = stats.spearmanr(ious, scores).statistic
    return f"{label} (n={n})\nPearson r = {pearson:.3f}, Spearman rho = {spearman:.3f}"


def plot_score_vs_iou(
    runs: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    gridsize: int = 30,
    path: str | Path | None = None,
    dpi: int = 120,
    panel_size: tuple[float, float] = (4.0, 4.0),
) -> Figure:
    """Detection score vs IoU with its matched ground truth, one hexbin panel per run, side by side.

    The paper's subject [A]: a consistent detector puts its points near the diagonal. Each panel's title
    carries Pearson's r and Spearman's rho (scipy.stats) of IoU and score, or says they are undefined
    (fewer than two detections, or a constant column); a run without detections gets an empty panel.

    Args:
        runs: run label -> ``(scores, ious)``, two 1-D arrays of the same length, finite, in [0, 1].
    """
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError("runs must be a non-empty dict: run label -> (scores, ious)")
    data = {}
    for label, pair in runs.items():
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"runs[{label!r}] must be a pair (scores, ious)")
        try:
            scores, ious = (np.asarray(a, dtype=float) for a in pair)
        except (TypeError, ValueError) as err:
            raise ValueError(f"runs[{label!r}]: scores and ious must be numeric arrays ({err})") from err
        for name, values in (("scores", scores), ("ious", ious)):
            if values.ndim != 1:
                raise ValueError(f"runs[{label!r}] {name} must be 1-D, got shape {values.shape}")
            if not np.all(np.isfinite(values)):
                raise ValueError(f"runs[{label!r}] {name} contain non-finite values")
            if values.size and (values.min() < 0 or values.max() > 1):
                raise ValueError(f"runs[{label!r}] {name} must lie in [0, 1], got [{values.min()}, {values.max()}]")
        if scores.shape != ious.shape:
            raise ValueError(f"runs[{label!r}]: {scores.size} scores but {ious.size} ious")
        data[label] = (scores, ious)

    fig = new_figure((panel_size[0] * len(data), panel_size[1]))
    axes = fig.subplots(1, len(data), squeeze=False, sharex=True, sharey=True)[0]
    for ax, (label, (scores, ious)) in zip(axes, data.items()):
        if scores.size:
            ax.hexbin(ious, scores, gridsize=gridsize, extent=(0, 1, 0, 1), cmap="magma_r", mincnt=1,
                      bins="log")
        else:
            ax.text(0.5, 0.5, "no matched detections", ha="center", va="center", transform=ax.transAxes)
        ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("IoU with matched ground truth")
        ax.set_title(_correlation_title(label, scores, ious), fontsize=8)
    axes[0].set_ylabel("detection score")
    title = "Prediction consistency: score vs IoU (log-count hexbins; dashed: score = IoU)"
    fig.suptitle("\n".join(textwrap.wrap(title, width=48 * len(data))), fontsize=10)  # fits one panel too
    return finish(fig, path, dpi)


