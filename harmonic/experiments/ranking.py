"""Boxes or scores: where a variant's AP difference from its baseline comes from [D].

:mod:`harmonic.evaluation.oracle` re-scores a run's committed detections in a chain, its boxes unchanged:
inside each object's candidates by their IoU (*within*), then with the boxes on background below every box
on an object (*background*), then in the order no other beats (*ideal*: what the boxes allow). Per run that
gives, for AP, AP50 and AP75, the ideal AP and three gaps; paired by seed, a variant's difference from its
baseline splits exactly into four parts (:data:`PARTS`), each with its own t-interval:

    difference = d(ideal) - d(consistency gap) - d(background gap) - d(across gap)
               = boxes + consistency + background + across objects

*consistency* is the paper's subject [A]: which of an object's candidates its scores prefer. The chain's
order is a choice (each gap is measured with the ranking errors after it still in place).
``tools/testbed.py ranking`` measures the committed studies into ``results/testbed/ranking.json``, the table
into docs/testbed.md and the figure beside the JSON; notebook 05's report has the section for its main
variant (:func:`oracle_split`, :func:`markdown_oracle_split`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from harmonic.data import resolve_dataset
from harmonic.evaluation.oracle import MIN_IOU, ranking_decomposition
from harmonic.experiments.report import ARCH_NAMES, Run, paired_differences
from harmonic.utils.figures import caption, finish, new_figure

#: the COCO numbers split
SPLIT_METRICS = ("AP", "AP50", "AP75")
#: the parts of a difference: (name, the per-run quantity's suffix, its sign in the sum)
PARTS = (("boxes", "_ideal", 1), ("consistency", "_consistency_gap", -1), ("background", "_background_gap", -1),
         ("across objects", "_across_gap", -1))
#: every per-run quantity the paired comparison reads, in percent
QUANTITIES = tuple(f"{m}{suffix}" for m in SPLIT_METRICS
                   for suffix in ("", "_within", "_background", "_ideal", "_consistency_gap", "_background_gap",
                                  "_across_gap"))
#: the version of the measurement (:mod:`harmonic.evaluation.oracle`'s definitions); a cached run measured
#: under another is measured again
VERSION = 2


def detections_digest(run: Run) -> str:
    """The sha256 of a run folder's ``detections.json.gz`` (what a cached measurement was made from)."""
    return hashlib.sha256((run.folder / "detections.json.gz").read_bytes()).hexdigest()


def measure_run(run: Run, truth: Callable[[str], Any]) -> dict[str, Any]:
    """The oracle split of one run folder's ``detections.json.gz`` on its validation images (``truth(dataset)``
    gives the COCO ground truth of a data set name), as fractions, with the detections' digest and
    :data:`VERSION`. The detections' own AP must equal the run's metrics.json, or the ground truth is not what
    the run was evaluated on."""
    if run.metrics.get("AP") is None:
        raise ValueError(f"{run.folder / 'metrics.json'}: no COCO AP to check the detections against")
    config = json.loads((run.folder / "config.json").read_text())["config"]
    dataset = config.get("val_dataset") or config["dataset"]
    with gzip.open(run.folder / "detections.json.gz", "rt") as f:
        split = ranking_decomposition(truth(dataset), json.load(f))
    if split["AP"] is None or abs(split["AP"] - run.metrics["AP"]) > 2e-6:
        raise ValueError(f"{run.folder}: its detections give AP {split['AP']} on {dataset}'s validation images, "
                         f"its metrics.json {run.metrics['AP']:.6f}: not the images it was evaluated on")
    return {**split, "detections_sha256": detections_digest(run), "version": VERSION}


def is_current(run: Run, measured: dict[str, Any] | None) -> bool:
    """Whether a cached measurement of ``run`` was made from its present detections under :data:`VERSION`."""
    return (measured is not None and measured.get("version") == VERSION
            and measured.get("detections_sha256") == detections_digest(run))


def dataset_truth(root: Path | None = None) -> Callable[[str], Any]:
    """``truth(dataset)``: the COCO ground truth of a data set's validation split (a preset name, generated
    where missing, or an annotation file), loaded once per data set."""
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
    scored = [Run(r.name, r.folder, r.variant, r.seed, r.sweep,
                  {k: 100 * measured[r.name][k] for k in QUANTITIES if measured[r.name].get(k) is not None})
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


def baseline_levels(runs: list[Run], measured: dict[str, dict[str, Any]], variants: tuple[str, ...],
                    baseline: str = "baseline") -> dict[str, float]:
    """The baseline's AP at each level of the chain (own, within, background, ideal), means over the seeds it
    shares with one of ``variants``, in percent."""
    seeds = {r.seed for r in runs if r.variant in variants and r.name in measured}
    rows = [measured[r.name] for r in runs if r.variant == baseline and r.name in measured and r.seed in seeds]
    return ({q: 100 * sum(row[q] for row in rows) / len(rows) for q in ("AP", "AP_within", "AP_background", "AP_ideal")}
            if rows else {})


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
    lines = [f"| study | variant | pairs | baseline {metric}: own / within / background / ideal | "
             f"{metric} difference | " + " | ".join(names) + " |",
             "|---|---|---|---|---|" + "---|" * len(names)]
    for study in studies:
        levels = study["baseline"]
        level = (" / ".join(f"{levels[q]:.1f}" for q in ("AP", "AP_within", "AP_background", "AP_ideal"))
                 if metric == "AP" and levels else "")
        for variant, row in study["variants"].items():
            lines.append(f"| {study['setting']} (`{study['sweep']}`) | `{variant}` | {row['pairs']} | {level} | "
                         f"{_cell(row['difference'][metric])} | "
                         + " | ".join(_cell(row["parts"][metric][part]) for part in names) + " |")
    return "\n".join(lines)


def plot_split(studies: list[dict[str, Any]], metric: str = "AP", path: Path | None = None, dpi: int = 100):
    """Each study's variant against its baseline: the difference and its parts (:data:`PARTS`) as bars with
    95% intervals, one group per study and variant."""
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
    caption(fig, "boxes: the AP of the ideal order; consistency: each object's candidates ranked by IoU; background:\n"
                 "boxes on background below all others; across objects: the rest. The parts add up to the difference.")
    return finish(fig, path, dpi)


def oracle_split(runs: list[Run], main_variant: str = "harmonic_hiou", baseline: str = "baseline",
                 truth=None) -> dict[str, Any]:
    """Boxes or scores, the report's section (notebook 05): ``main_variant``'s AP difference from
    ``baseline`` split into its boxes, its scores' consistency inside an object, their ranking of background
    and their ranking across objects, from the committed detections of the runs of both (on their validation
    images, ground truth from ``truth(dataset)``, default :func:`dataset_truth`).

    Returns ``{"setting", "sweep", "baseline", "variants", "runs"}`` (the study of
    :func:`markdown_split`, with each run's measured split), or ``{"reason"}``
    saying why there is nothing to split: no pair with detections, or detections that cannot be read or do
    not give a run's AP."""
    chosen = [r for r in runs if r.variant in (baseline, main_variant) and (r.folder / "detections.json.gz").is_file()]
    seeds = {v: {r.seed for r in chosen if r.variant == v} for v in (baseline, main_variant)}
    if not seeds[baseline] & seeds[main_variant]:
        return {"reason": f"no seed has both a `{baseline}` and a `{main_variant}` run with its detections "
                          "(detections.json.gz) in these sweeps"}
    truth = dataset_truth() if truth is None else truth
    try:
        measured = {r.name: measure_run(r, truth) for r in chosen}
        main = [r for r in chosen if r.variant == main_variant]
        settings = sorted({setting_of(r) for r in main})
    except (ValueError, OSError, KeyError) as err:
        return {"reason": f"{type(err).__name__}: {err}"}
    return {"setting": "; ".join(settings), "sweep": ", ".join(sorted({r.sweep or "" for r in main})),
            "baseline": baseline_levels(chosen, measured, (main_variant,), baseline),
            "variants": paired_split(chosen, measured, (main_variant,), baseline=baseline), "runs": measured}


def markdown_oracle_split(split: dict[str, Any]) -> str:
    """The report's section on :func:`oracle_split`: its table, or why there is none."""
    if "reason" in split:
        return f"Not split [D]: {split['reason']}."
    return "\n".join([
        markdown_split([split]),
        "",
        "Each run's detections re-scored in a chain, their boxes unchanged (`harmonic/evaluation/oracle.py`): "
        "*within*, each object's candidates ranked by their IoU with it; *background*, then the boxes on no object "
        f"(IoU below {MIN_IOU:g}) moved below all others; *ideal*, then every object's best box first, the order no other "
        "beats. *Boxes*: the difference of the ideal AP, what the boxes allow; *consistency*: what ranking each "
        "object's candidates by IoU changes, the paper's subject [A]; *background*: what the boxes on background "
        "ranked above objects change; *across objects*: the rest (one object's best box against other objects' "
        "boxes and duplicates). Each part is a paired difference by seed with its own 95% t-interval, signed so "
        "that the parts add up to the AP difference; the chain's order is a choice [D].",
    ])
