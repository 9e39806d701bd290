"""Figures of the training notebooks: training curves (the supplement's Fig. 3), the watch statistics of
the supplement's assumptions during training (shares against iteration, histograms of the positives in
(y, score) over the sign of Eq. 8's dF/dx) and a metric against a swept parameter."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from harmonic.losses.watch import Y_REVERSAL
from harmonic.utils.figures import finish, new_figure, save_figure
from harmonic.utils.runlog import find_log, read_log

# Keys of a training-log record that are looked up as they are, not as "loss/<term>".
_PLAIN_LOG_KEYS = ("loss", "beta_r", "beta_c", "lr")


def _log_key(term: str) -> str:
    return term if term in _PLAIN_LOG_KEYS else f"loss/{term}"


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` points (fewer at the start)."""
    if window <= 1 or values.size == 0:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    index = np.arange(1, values.size + 1)
    start = np.maximum(index - window, 0)
    return (cumsum[index] - cumsum[start]) / (index - start)


def _series(label: str, records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    iters, values = [], []
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(f"logs[{label!r}][{i}] must be a dict, got {type(record).__name__}")
        for needed in ("iter", key):
            if record.get(needed) is None:
                raise ValueError(f"logs[{label!r}][{i}] has no {needed!r} (keys: {sorted(record)})")
        value = float(record[key])
        if not math.isfinite(value):
            raise ValueError(f"logs[{label!r}][{i}][{key!r}] is {value} at iter {record['iter']}: not finite")
        iters.append(int(record["iter"]))
        values.append(value)
    return np.asarray(iters), np.asarray(values)


def _plot_series(ax, label: str, records: list[dict], key: str, *, color: str, smooth: int, legend: str,
                 widths: tuple[float, float]) -> None:
    """One run's ``key`` against iteration (records sorted by iteration): with ``smooth`` > 1 the raw
    values faint and their trailing moving average on top (line width ``widths[0]``), else the raw values
    (``widths[1]``)."""
    iters, values = _series(label, records, key)
    order = np.argsort(iters, kind="stable")
    iters, values = iters[order], values[order]
    if smooth > 1:
        ax.plot(iters, values, color=color, alpha=0.25, linewidth=0.7)
        ax.plot(iters, _moving_average(values, smooth), color=color, linewidth=widths[0], label=legend)
    else:
        ax.plot(iters, values, color=color, linewidth=widths[1], label=legend)


def plot_training_curves(
    logs: dict[str, list[dict]],
    terms: list[str] | None = None,
    smooth: int = 20,
    *,
    path: str | Path | None = None,
    dpi: int = 120,
    panel_size: tuple[float, float] = (4.0, 3.2),
) -> Figure:
    """Training loss during training (the supplement's Fig. 3 [S]): one panel per term, runs overlaid.

    Args:
        logs: run label (e.g. ``"baseline"``, ``"harmonic"``) -> its JSONL records, each a dict with
            ``"iter"`` and ``"loss"``, per-term ``"loss/<term>"`` and optionally ``"beta_r"``, ``"beta_c"``,
            ``"lr"``.
        terms: panels, as term names: ``"loss"`` (the total), ``"beta_r"``, ``"beta_c"``, ``"lr"`` or a
            ``<term>`` of ``"loss/<term>"``. ``None``: the total, then every ``loss/<term>`` found in any run,
            then ``beta_r`` / ``beta_c`` if logged. A term a run never logs is left out of that run's panel;
            a term no run logs is an error.
        smooth: window of the trailing moving average drawn over the faint raw curve (<= 1: none).

    Raises:
        ValueError: empty logs, a record without ``"iter"`` or a plotted key (when the run logs that key in
        other records), a non-finite value, or a requested term that no run logs.
    """
    if not isinstance(logs, Mapping) or not logs:
        raise ValueError("logs must be a non-empty dict: run label -> list of log records")
    for label, records in logs.items():
        if not isinstance(records, list | tuple) or not records:
            raise ValueError(f"logs[{label!r}] must be a non-empty list of log records")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 0:
        raise ValueError(f"smooth must be a non-negative integer, got {smooth!r}")

    def logged(records, key):
        return any(isinstance(r, Mapping) and key in r for r in records)

    if terms is None:
        found = sorted({k[5:] for records in logs.values() for r in records if isinstance(r, Mapping)
                        for k in r if k.startswith("loss/")})
        terms = ["loss", *found] + [k for k in ("beta_r", "beta_c") if any(logged(r, k) for r in logs.values())]
    else:
        terms = list(terms)
        if not terms:
            raise ValueError("terms must name at least one term (or be None for all)")
        for term in terms:
            if not any(logged(records, _log_key(term)) for records in logs.values()):
                raise ValueError(
                    f"term {term!r} (key {_log_key(term)!r}) is not logged by any run ({sorted(logs)})"
                )

    ncols = min(len(terms), 3)
    nrows = math.ceil(len(terms) / ncols)
    fig = new_figure((panel_size[0] * ncols, panel_size[1] * nrows + 0.4))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(terms):]:
        ax.set_visible(False)
    for ax, term in zip(axes, terms):
        key = _log_key(term)
        for index, (label, records) in enumerate(logs.items()):
            if term != "loss" and not logged(records, key):
                continue  # e.g. the baseline has no harmonic factors
            _plot_series(ax, label, records, key, color=f"C{index}", smooth=smooth, legend=label,
                         widths=(1.4, 1.2))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title("total loss" if term == "loss" else key, fontsize=9)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.suptitle("Training loss during training (cf. the supplement's Fig. 3 [S]); "
                 + (f"moving average over {smooth} records" if smooth > 1 else "raw"), fontsize=10)
    return finish(fig, path, dpi)


def plot_metric_vs_param(
    xs: Sequence[float],
    means: Sequence[float],
    stds: Sequence[float | None] | None,
    label: str,
    param_name: str,
    *,
    metric_name: str = "AP",
    ax=None,
    path: str | Path | None = None,
    dpi: int = 120,
    figsize: tuple[float, float] = (4.8, 3.6),
) -> Figure:
    """A metric's mean over seeds against a parameter (e.g. gamma, alpha), with ±1 std error bars.

    ``stds`` entries that are None (a single seed) get no error bar; ``stds=None`` draws none at all.
    Pass ``ax`` to overlay several labels on one axes; the figure of that axes is returned.
    """
    xs_a = np.asarray(xs, dtype=float)
    if xs_a.ndim != 1 or xs_a.size == 0:
        raise ValueError(f"xs must be a non-empty 1-D sequence, got shape {xs_a.shape}")
    if any(m is None for m in means):
        raise ValueError(f"means of {label!r} contain None: every plotted point needs a mean")
    means_a = np.asarray(means, dtype=float)
    if stds is None:
        stds = [None] * xs_a.size
    if not (len(means_a) == len(stds) == xs_a.size):
        raise ValueError(f"xs, means and stds must have the same length, got {xs_a.size}, {len(means_a)}, {len(stds)}")
    if not (np.all(np.isfinite(xs_a)) and np.all(np.isfinite(means_a))):
        raise ValueError(f"xs and means of {label!r} must be finite")
    stds_a = np.array([np.nan if s is None else float(s) for s in stds])  # NaN: no bar for that point
    if np.any(stds_a[~np.isnan(stds_a)] < 0):
        raise ValueError(f"stds of {label!r} must be >= 0")
    if ax is None:
        fig = new_figure(figsize)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    order = np.argsort(xs_a)
    ax.errorbar(xs_a[order], means_a[order], yerr=stds_a[order], marker="o", capsize=3, label=label)
    ax.set_xlabel(param_name)
    ax.set_ylabel(metric_name)
    ax.set_title(f"{metric_name} vs {param_name} (mean ± std over seeds)", fontsize=10)
    ax.legend(fontsize=7)
    return finish(fig, path, dpi)


#: the watch shares drawn against iteration, with their panel titles
WATCH_SHARE_PANELS = {
    "watch/reversed_share": "share with dF/dx < 0 (Eq. 8-9 fail: score pushed down)",
    "watch/box_pushed_away_share": "share with Eq. 5's bracket < 0 (box pushed away)",
    "watch/y_over_threshold_share": f"share with y > {Y_REVERSAL:.4f}",
    "watch/cls_multiplier": "mean dF/dx (net multiplier of dCE/dlogit)",
}


def _watch_label(label: str, records: Sequence[Mapping]) -> str:
    counterfactual = any(r.get("watch/counterfactual") == 1.0 for r in records if isinstance(r, Mapping))
    return f"{label} (counterfactual)" if counterfactual else label


def plot_watch_shares(
    logs: dict[str, list[dict]],
    smooth: int = 20,
    *,
    path: str | Path | None = None,
    dpi: int = 120,
    panel_size: tuple[float, float] = (4.4, 3.2),
) -> Figure:
    """The watch shares against iteration [D], one panel per key of :data:`WATCH_SHARE_PANELS`, runs
    overlaid (a baseline's counterfactual numbers labelled so), raw faint and a trailing moving average over
    ``smooth`` records on top. ``logs``: run label -> its log records (records without the key are
    skipped: iterations without positives). Raises ValueError when no run logs watch statistics."""
    if not isinstance(logs, Mapping) or not logs:
        raise ValueError("logs must be a non-empty dict: run label -> list of log records")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 0:
        raise ValueError(f"smooth must be a non-negative integer, got {smooth!r}")
    watched = {label: [r for r in records if isinstance(r, Mapping) and "watch/reversed_share" in r]
               for label, records in logs.items()}
    if not any(watched.values()):
        raise ValueError(f"no run logs watch statistics ('watch/reversed_share'): {sorted(logs)}")
    fig = new_figure((panel_size[0] * 2, panel_size[1] * 2 + 0.4))
    for ax, (key, title) in zip(fig.subplots(2, 2).ravel(), WATCH_SHARE_PANELS.items()):
        for index, (label, records) in enumerate(watched.items()):
            if not records:
                continue
            _plot_series(ax, label, records, key, color=f"C{index}", smooth=smooth,
                         legend=_watch_label(label, records), widths=(1.3, 1.3))
        if key == "watch/cls_multiplier":
            ax.axhline(0.0, color="0.4", linewidth=0.7, linestyle=":")
        else:
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.suptitle("The supplement's assumptions during training, over the positives of each batch [D]"
                 + (f"; moving average over {smooth} records" if smooth > 1 else ""), fontsize=10)
    return finish(fig, path, dpi)


def reversal_region(grid_p: np.ndarray, boundary: np.ndarray, *, detached: bool = False) -> np.ndarray:
    """Where Eq. 8's dF/dx < 0 on a (score, y) grid: scores ``grid_p`` [S] above the boundary ``p*(y)`` [Y]
    (:func:`harmonic.theory.derivations.reversal_score`), as a bool array [S, Y]. With detached factors
    ``dF/dx = 1 + beta_r > 0`` everywhere: all False."""
    region = np.asarray(grid_p)[:, None] > np.asarray(boundary)[None, :]
    return np.zeros_like(region) if detached else region


def plot_watch_histograms(
    samples: dict[str, dict],
    *,
    bins: int = 40,
    path: str | Path | None = None,
    dpi: int = 120,
    panel_size: tuple[float, float] = (3.6, 3.0),
) -> Figure:
    """2-D histograms of the positives in (y, score) at the snapshots of each run [D], over the sign of
    Eq. 8's dF/dx: one row per run, one column per snapshot (``watch_samples.json``,
    :mod:`harmonic.engine.watch`).

    The background is red where ``dF/dx < 0`` for the run's definition of ``x`` (score above
    ``p*(y)``, :func:`harmonic.theory.derivations.reversal_score`), blue where ``dF/dx > 0`` (everywhere for
    a run with detached factors, ``"detached": true`` in its samples); both
    boundaries are drawn, ``p*(y)`` for the focal definition (solid) and for the cross-entropy (dashed),
    with ``y = Y_REVERSAL`` dotted. Counts on a log colour scale. The focal boundary is that of the target
    entry's focal loss; a sigmoid head's ``x`` (the focal loss summed over the K classes) also holds the
    other classes' small terms: x is a little larger at a given score, so its exact boundary lies slightly higher [D].

    Args:
        samples: run label -> the run's samples ``{"definition": "focal" | "ce", "snapshots": [{"iter",
            "y": [...], "score": [...]}, ...]}``; runs without snapshots are left out.
        bins: histogram bins per axis.

    Raises:
        ValueError: no run has a snapshot, or a snapshot whose ``y`` and ``score`` differ in length.
    """
    from matplotlib.colors import ListedColormap, LogNorm

    from harmonic.theory.derivations import reversal_score  # derivations pulls in sympy and scipy

    runs = {label: data for label, data in samples.items() if data and data.get("snapshots")}
    if not runs:
        raise ValueError(f"no run has watch samples: {sorted(samples)}")
    ncols = max(len(data["snapshots"]) for data in runs.values())
    all_y = np.concatenate([np.asarray(s["y"], dtype=float) for d in runs.values() for s in d["snapshots"]])
    y_max = max(3.0, float(np.quantile(all_y, 0.99)) * 1.05) if all_y.size else 3.0
    grid_y = np.linspace(1e-3, y_max, 400)
    boundaries = {d: reversal_score(grid_y, d) for d in ("focal", "ce")}
    sign_cmap = ListedColormap(["#dbe9f6", "#f6d5d5"])  # dF/dx > 0, dF/dx < 0
    fig = new_figure((panel_size[0] * ncols, panel_size[1] * len(runs) + 0.5))
    axes = fig.subplots(len(runs), ncols, squeeze=False)
    for row, (label, data) in zip(axes, runs.items()):
        definition = data.get("definition", "ce")
        grid_p = np.linspace(0.0, 1.0, 200)
        reversed_region = reversal_region(grid_p, boundaries[definition], detached=bool(data.get("detached")))
        for ax in row[len(data["snapshots"]):]:
            ax.set_visible(False)
        for ax, snap in zip(row, data["snapshots"]):
            y, score = np.asarray(snap["y"], dtype=float), np.asarray(snap["score"], dtype=float)
            if y.shape != score.shape:
                raise ValueError(f"{label}: snapshot at iter {snap.get('iter')} has {y.size} y and {score.size} scores")
            ax.pcolormesh(grid_y, grid_p, reversed_region.astype(float), cmap=sign_cmap, vmin=0, vmax=1,
                          shading="auto", rasterized=True)
            counts, y_edges, p_edges = np.histogram2d(y, score, bins=bins, range=[[0.0, y_max], [0.0, 1.0]])
            masked = np.ma.masked_equal(counts.T, 0)
            if masked.count():
                ax.pcolormesh(y_edges, p_edges, masked, cmap="viridis", norm=LogNorm(vmin=1, vmax=max(1.0, counts.max())))
            ax.plot(grid_y, boundaries["focal"], color="black", linewidth=1.1, label="p*(y), x = focal")
            ax.plot(grid_y, boundaries["ce"], color="black", linewidth=1.1, linestyle="--", label="p*(y), x = CE")
            ax.axvline(Y_REVERSAL, color="0.3", linewidth=0.7, linestyle=":")
            ax.set_xlim(0.0, y_max)
            ax.set_ylim(0.0, 1.0)
            note = ", all dF/dx > 0" if data.get("detached") else ""
            ax.set_title(f"{label}, iter {snap.get('iter')} (n = {y.size} of {snap.get('num_positives', y.size)}){note}",
                         fontsize=8)
            ax.set_xlabel("y = L_loc")
            ax.set_ylabel("ground-truth class score")
        row[0].legend(fontsize=6, loc="upper right")
    fig.suptitle("Positives in (y, score) over the sign of dF/dx (red: dF/dx < 0, score pushed down; "
                 "background for each run's own x) [D]", fontsize=9)
    return finish(fig, path, dpi)


def _watch_table(logs: dict[str, list[dict]], smooth: int) -> str:
    rows = []
    for label, records in logs.items():
        watched = [r for r in records if "watch/reversed_share" in r]
        if not watched:
            continue
        window = max(1, min(smooth, len(watched) // 4))
        cells = [f"{np.mean([r[k] for r in part]):.3f}"
                 for k in ("watch/reversed_share", "watch/box_pushed_away_share", "watch/y_over_threshold_share",
                           "watch/cls_multiplier")
                 for part in (watched[:window], watched[-window:])]
        rows.append(f"| {_watch_label(label, watched)} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    header = ("| run | reversed, first | reversed, last | box pushed away, first | box pushed away, last | "
              f"y > {Y_REVERSAL:.4f}, first | y > {Y_REVERSAL:.4f}, last | mean dF/dx, first | mean dF/dx, last |")
    return "\n".join([header, "|---" * 9 + "|", *rows])


def _detached(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` trained with detached harmonic factors (its ``config.json``)."""
    config = run_dir / "config.json"
    if not config.is_file():
        return False
    saved = json.loads(config.read_text())
    detector = (saved.get("resolved") or {}).get("detector") or (saved.get("config") or {}).get("detector") or {}
    return detector.get("loss") == "harmonic" and bool(detector.get("detach_factors"))


def convergence_figures(
    runs: dict[str, str], *, results_dir: str | Path = "results", smooth: int = 20, dpi: int = 120,
    output_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The supplement's Fig. 3 from the logs of ``runs`` (label -> run folder name under
    ``results_dir/runs``), and, where the runs logged them, the watch figures: :func:`plot_watch_shares`
    (``watch_shares.png``) and :func:`plot_watch_histograms` (``watch_histograms.png``, from each run's
    ``watch_samples.json``). The figures go to ``output_dir/figures`` (default: ``results_dir``), so a
    second set of runs under the same ``results_dir`` can keep its figures apart.

    Returns ``{"figures": [paths], "summary_markdown", "watch_markdown" (first and last window means of
    the watch shares; "" without watch statistics), "logs", "samples"}``.
    """
    from harmonic.engine.watch import read_samples  # engine pulls in torch and torchvision

    results_dir = Path(results_dir)
    figures_dir = (results_dir if output_dir is None else Path(output_dir)) / "figures"
    logs, samples = {}, {}
    for label, name in runs.items():
        path = find_log(results_dir / "runs" / name)
        if not path.is_file():
            raise FileNotFoundError(f"run {name!r} ({label}) has no log at {path}: train it first (notebook 03)")
        logs[label] = read_log(path)
        samples[label] = read_samples(path.parent)
        if samples[label] and _detached(path.parent):
            samples[label] = {**samples[label], "detached": True}
    fig = plot_training_curves(logs, smooth=smooth)
    figures = [save_figure(fig, figures_dir / "fig3_training_loss.png", dpi=dpi)]
    if any("watch/reversed_share" in r for records in logs.values() for r in records):
        figures.append(save_figure(plot_watch_shares(logs, smooth=smooth), figures_dir / "watch_shares.png", dpi=dpi))
    labelled = {_watch_label(label, logs[label]): data for label, data in samples.items()}
    if any(data and data.get("snapshots") for data in labelled.values()):
        figures.append(save_figure(plot_watch_histograms(labelled), figures_dir / "watch_histograms.png", dpi=dpi))
    rows = []
    for label, records in logs.items():
        window = max(1, min(smooth, len(records) // 4))
        first = float(np.mean([r["loss"] for r in records[:window]]))
        last = float(np.mean([r["loss"] for r in records[-window:]]))
        rows.append(f"| {label} | {len(records)} | {first:.4f} | {last:.4f} | {last / first:.3f} |")
    table = "\n".join(["| run | iterations | mean loss, first window | mean loss, last window | ratio |",
                       "|---|---|---|---|---|", *rows])
    return {"figures": figures, "summary_markdown": table, "watch_markdown": _watch_table(logs, smooth),
            "logs": logs, "samples": samples}
