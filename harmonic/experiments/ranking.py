"""Boxes or scores: where a variant's AP difference from its baseline comes from [D].

:mod:`harmonic.evaluation.oracle` re-scores a run's committed detections twice: inside each object's
candidates by their IoU (the within-object oracle), and everywhere by their IoU (the full oracle). Per run
that gives, for AP, AP50 and AP75, the oracle's AP (what the boxes reach when perfectly ranked), the
within-object gap (what the scores' inconsistency costs, the paper's subject [A]) and the between gap
(oracle minus within: what the scores cost in telling objects from background and one object from
another). Paired by seed, a variant's difference from its baseline then splits exactly into three parts
(:data:`PARTS`), each with its own t-interval:

    difference = d(oracle) - d(within gap) - d(between gap)
               = boxes + consistency + object-background ranking

``tools/testbed.py ranking`` measures the committed runs into ``results/testbed/ranking.json`` and writes the
table into docs/testbed.md and the figure beside the JSON.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harmonic.experiments.report import ARCH_NAMES, Run, paired_differences

#: the COCO numbers split
SPLIT_METRICS = ("AP", "AP50", "AP75")
#: the parts of a difference: (name, the per-run quantity's suffix, its sign in the sum)
PARTS = (("boxes", "_oracle", 1), ("consistency", "_within_gap", -1), ("object-background ranking", "_between_gap", -1))
#: every per-run quantity the paired comparison reads, in percent
QUANTITIES = tuple(f"{m}{suffix}" for m in SPLIT_METRICS for suffix in ("", "_within", "_oracle", "_within_gap",
                                                                       "_between_gap", "_gap"))


def measure_run(run: Run, truth: Callable[[str], Any]) -> dict[str, float]:
    """The oracle split of one run folder's ``detections.json.gz`` on its validation images (``truth(dataset)``
    gives the COCO ground truth of a data set name), as fractions. The detections' own AP must equal the
    run's metrics.json, or the ground truth is not what the run was evaluated on."""
    from harmonic.evaluation.oracle import ranking_decomposition

    config = json.loads((run.folder / "config.json").read_text())["config"]
    dataset = config.get("val_dataset") or config["dataset"]
    with gzip.open(run.folder / "detections.json.gz", "rt") as f:
        split = ranking_decomposition(truth(dataset), json.load(f))
    if run.metrics.get("AP") is None or abs(split["AP"] - run.metrics["AP"]) > 1e-6:
        raise ValueError(f"{run.folder}: its detections give AP {split['AP']:.6f} on {dataset}'s validation images, "
                         f"its metrics.json {run.metrics.get('AP')}: not the images it was evaluated on")
    return {k: round(v, 6) for k, v in split.items()}


def dataset_truth(root: Path | None = None) -> Callable[[str], Any]:
    """``truth(dataset)``: the COCO ground truth of a data set's validation split (a preset name, generated
    where missing, or an annotation file), loaded once per data set."""
    from pycocotools.coco import COCO

    from harmonic.data import resolve_dataset

    cache: dict[str, Any] = {}

    def truth(dataset: str) -> Any:
        if dataset not in cache:
            ann = resolve_dataset(dataset, "val", root=root)[1]
            with contextlib.redirect_stdout(io.StringIO()):
                cache[dataset] = COCO(str(ann))
        return cache[dataset]

    return truth


def setting_of(run: Run) -> str:
    """A run's setting in words: detector, length and data set (from its config.json)."""
    config = json.loads((run.folder / "config.json").read_text())["config"]
    arch = ARCH_NAMES.get(config["detector"].get("arch", "retinanet"), config["detector"].get("arch"))
    return f"{arch}, {config['max_iters']} iterations, {config['dataset']}"


def paired_split(runs: list[Run], measured: dict[str, dict[str, float]], variants: tuple[str, ...],
                 confidence: float = 0.95, baseline: str = "baseline") -> dict[str, Any]:
    """``{variant: {"pairs", "difference": {metric: entry}, "parts": {metric: {part: entry}}}}`` for each of
    ``variants`` with a common seed with ``baseline`` among ``runs``: paired t-intervals (report's
    :func:`~harmonic.experiments.report.paired_differences`) in AP points of the difference and of each of
    :data:`PARTS`, signed so that the parts add up to the difference."""
    scored = [Run(r.name, r.folder, r.variant, r.seed, r.sweep, {k: 100 * v for k, v in measured[r.name].items()})
              for r in runs if r.name in measured and r.variant in (baseline, *variants)]
    out: dict[str, Any] = {}
    for variant, by_q in paired_differences(scored, baseline, metrics=QUANTITIES, confidence=confidence).items():
        if not by_q["AP"]["n"]:
            continue
        row: dict[str, Any] = {"pairs": by_q["AP"]["n"], "difference": {}, "parts": {}}
        for m in SPLIT_METRICS:
            row["difference"][m] = by_q[m]
            row["parts"][m] = {}
            for part, suffix, sign in PARTS:
                entry = dict(by_q[f"{m}{suffix}"])
                if sign < 0:
                    entry["mean"], entry["low"], entry["high"] = (
                        None if v is None else -v for v in (entry["mean"], entry["high"], entry["low"]))
                row["parts"][m][part] = entry
        out[variant] = row
    return {variant: out[variant] for variant in variants if variant in out}  # in the order asked for


def baseline_levels(runs: list[Run], measured: dict[str, dict[str, float]], baseline: str = "baseline") -> dict[str, float]:
    """The baseline's own AP, within-object oracle AP and full oracle AP, means over its seeds, in percent."""
    rows = [measured[r.name] for r in runs if r.variant == baseline and r.name in measured]
    return {q: 100 * sum(row[q] for row in rows) / len(rows) for q in ("AP", "AP_within", "AP_oracle")} if rows else {}


def _cell(entry: dict[str, Any]) -> str:
    if entry.get("mean") is None:
        return "n/a"
    if entry.get("low") is None:
        return f"{entry['mean']:+.1f}"
    return f"{entry['mean']:+.1f} [{entry['low']:+.1f}, {entry['high']:+.1f}]"


def markdown_split(studies: list[dict[str, Any]], metric: str = "AP") -> str:
    """The table of :func:`paired_split` results: one row per study and variant. ``studies``: dicts with
    ``sweep``, ``setting``, ``baseline`` (:func:`baseline_levels`) and ``variants`` (:func:`paired_split`)."""
    names = [part for part, _, _ in PARTS]
    lines = [f"| study | variant | pairs | baseline {metric}: own / within-object oracle / full oracle | "
             f"{metric} difference | " + " | ".join(names) + " |",
             "|---|---|---|---|---|" + "---|" * len(names)]
    for study in studies:
        levels = study["baseline"]
        level = (f"{levels['AP']:.1f} / {levels['AP_within']:.1f} / {levels['AP_oracle']:.1f}"
                 if metric == "AP" and levels else "")
        for variant, row in study["variants"].items():
            lines.append(f"| {study['setting']} (`{study['sweep']}`) | `{variant}` | {row['pairs']} | {level} | "
                         f"{_cell(row['difference'][metric])} | "
                         + " | ".join(_cell(row["parts"][metric][part]) for part in names) + " |")
    return "\n".join(lines)


def plot_split(studies: list[dict[str, Any]], metric: str = "AP", path: Path | None = None, dpi: int = 100):
    """Each study's variant against its baseline: the difference and its three parts as bars with 95%
    intervals, one group per study and variant."""
    import numpy as np

    from harmonic.utils.figures import caption, finish, new_figure

    rows = [(f"{study['setting']}\n{variant}", row) for study in studies for variant, row in study["variants"].items()]
    fig = new_figure((7.2, 0.75 * len(rows) + 1.6))
    ax = fig.add_subplot()
    bars = [("difference", None)] + [(part, part) for part, _, _ in PARTS]
    height = 0.8 / len(bars)
    for k, (label, part) in enumerate(bars):
        entries = [row["difference"][metric] if part is None else row["parts"][metric][part] for _, row in rows]
        y = np.arange(len(rows)) + (k - (len(bars) - 1) / 2) * height
        mean = np.array([e["mean"] for e in entries], dtype=float)
        err = np.array([[e["mean"] - e["low"], e["high"] - e["mean"]] if e["low"] is not None else [0.0, 0.0]
                        for e in entries]).T
        ax.barh(y, mean, height, xerr=err, label=label, capsize=2, color=f"C{k}", alpha=0.85)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(np.arange(len(rows)), [label for label, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} points, variant minus baseline (paired by seed, 95% interval)")
    ax.set_title(f"where the {metric} difference comes from: boxes or scores [D]", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    caption(fig, "boxes: the full oracle's AP (scores = IoU); consistency: scores permuted inside each object's "
                 "candidates;\nobject-background ranking: the rest. The parts add up to the difference.")
    return finish(fig, path, dpi)
