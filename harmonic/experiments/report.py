"""Aggregate run folders into the reproduction report: means over seeds, paired differences, tables.

A run folder (written by notebook ``03_train_eval``) holds ``run.json`` (``variant``, ``seed``,
``sweep``) and ``metrics.json`` (``coco`` and ``consistency`` sections with provenance). This module
reads them, never writes into them, and renders Markdown tables whose every number comes from those
files.

The steps, in the order notebook 05 shows them: :func:`load_sweep_runs` (the raw data,
:func:`markdown_runs`), :func:`summarize` (mean and sd over seeds, :func:`markdown_summary`),
:func:`paired_differences` (same-seed differences with a t-interval, :func:`markdown_differences`),
:func:`verdict` / :func:`markdown_verdict`, :func:`attribution` / :func:`markdown_attribution` (which part
of the method moves AP: paired contrasts between variants, ranked), and :func:`markdown_paper` (the
paper's numbers beside ours).
:func:`results_report` runs the same steps and is the only function here that writes files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from harmonic.evaluation.figures import plot_score_vs_iou
from harmonic.experiments.figures import plot_metric_vs_param
from harmonic.experiments.readme import replace_block
from harmonic.models.head_loss import HarmonicOptions
from harmonic.theory.reported import ABLATION, ABLATION_AP75, ABLATION_VARIANTS, MAIN_TABLE
from harmonic.utils.figures import save_figure
from harmonic.utils.files import atomic_write_json, atomic_write_text
from harmonic.utils.runlog import find_log, read_log

# metric key -> (section, field, label, higher is better)
METRICS: dict[str, tuple[str, str, str, bool]] = {
    "AP": ("coco", "AP", "AP", True),
    "AP50": ("coco", "AP50", "AP50", True),
    "AP75": ("coco", "AP75", "AP75", True),
    "APs": ("coco", "APs", "APs", True),
    "APm": ("coco", "APm", "APm", True),
    "APl": ("coco", "APl", "APl", True),
    "pearson": ("consistency", "pearson", "score-IoU Pearson", True),
    "spearman": ("consistency", "spearman", "score-IoU Spearman", True),
    "inconsistent_share": ("consistency", "inconsistent_share", "inconsistent share", False),
    "high_score_poor_iou_share": ("consistency", "high_score_poor_iou_share", "high-score poor-box share", False),
    "low_score_good_iou_share": ("consistency", "low_score_good_iou_share", "low-score good-box share", False),
    "nms_best_box_rate": ("consistency", "nms_best_box_rate", "NMS best-box rate", True),
}
HEADLINE = ("AP", "AP50", "AP75", "spearman", "inconsistent_share", "nms_best_box_rate")


@dataclass
class Run:
    name: str
    folder: Path
    variant: str
    seed: int
    sweep: str | None
    metrics: dict[str, float | None] = field(default_factory=dict)


def _flatten(metrics: dict) -> dict[str, float | None]:
    flat: dict[str, float | None] = {}
    for key, (section, name, _, _) in METRICS.items():
        value = metrics.get(section, {}).get(name)
        flat[key] = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    return flat


def load_run(folder: str | Path) -> Run | None:
    """The finished run in ``folder`` (its run.json and metrics.json), None when either file is missing."""
    folder = Path(folder)
    run_file, metrics_file = folder / "run.json", folder / "metrics.json"
    if not (run_file.is_file() and metrics_file.is_file()):
        return None
    try:
        info = json.loads(run_file.read_text())
        metrics = json.loads(metrics_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder}: unreadable run.json or metrics.json ({err})") from err
    return Run(folder.name, folder, info["variant"], int(info["seed"]), info.get("sweep"), _flatten(metrics))


def load_runs(runs_dir: str | Path, *, sweep: str | None = None) -> list[Run]:
    """Every finished run under ``runs_dir`` (those with both run.json and metrics.json, :func:`load_run`)."""
    runs = [run for folder in sorted(Path(runs_dir).glob("*/")) if (run := load_run(folder)) is not None]
    return [run for run in runs if sweep is None or run.sweep == sweep]


def summarize(runs: list[Run], metrics=HEADLINE) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """``{variant: {metric: {"mean", "std", "n"}}}`` over seeds (std with ddof=1; None for n < 2)."""
    table: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for variant in sorted({r.variant for r in runs}, key=_variant_order(runs)):
        rows = [r for r in runs if r.variant == variant]
        table[variant] = {}
        for m in metrics:
            values = np.array([r.metrics[m] for r in rows if r.metrics.get(m) is not None], dtype=float)
            table[variant][m] = {
                "mean": float(values.mean()) if values.size else None,
                "std": float(values.std(ddof=1)) if values.size > 1 else None,
                "n": int(values.size),
            }
    return table


def paired_differences(
    runs: list[Run], baseline: str = "baseline", metrics=HEADLINE, confidence: float = 0.95
) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Per variant and metric: mean of (variant - baseline) over seeds present in both, with a t-interval."""
    base = {r.seed: r for r in runs if r.variant == baseline}
    out: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for variant in sorted({r.variant for r in runs} - {baseline}, key=_variant_order(runs)):
        out[variant] = {}
        pairs = [(r, base[r.seed]) for r in runs if r.variant == variant and r.seed in base]
        for m in metrics:
            diffs = np.array(
                [a.metrics[m] - b.metrics[m] for a, b in pairs if a.metrics.get(m) is not None and b.metrics.get(m) is not None],
                dtype=float,
            )
            entry: dict[str, float | int | None] = {"mean": None, "low": None, "high": None, "n": int(diffs.size),
                                                    "sd": None, "mde": None}
            if diffs.size:
                entry["mean"] = float(diffs.mean())
            if diffs.size > 1:
                entry["sd"] = float(diffs.std(ddof=1))
                sem = entry["sd"] / math.sqrt(diffs.size)
                half = float(stats.t.ppf(0.5 + confidence / 2, diffs.size - 1) * sem)
                entry["low"], entry["high"] = entry["mean"] - half, entry["mean"] + half
                entry["mde"] = minimum_detectable_effect(entry["sd"], int(diffs.size), confidence=confidence)
            out[variant][m] = entry
    return out


#: the attribution's contrasts [D]: (what the contrast isolates, variant, reference), each a paired
#: difference by seed; a contrast is shown when both variants have runs with a common seed
CONTRASTS: tuple[tuple[str, str, str], ...] = (
    ("the whole method (Harmonic + HIoU)", "harmonic_hiou", "baseline"),
    ("the harmonic factors, no IoU term", "harmonic", "baseline"),
    ("HIoU, given the factors", "harmonic_hiou", "harmonic"),
    ("HIoU, without the factors", "baseline_hiou", "baseline"),
    ("torchvision's GIoU, without the factors (control)", "baseline_giou", "baseline"),
    ("HIoU against GIoU, both without the factors", "baseline_hiou", "baseline_giou"),
    ("a 2x box-loss weight, no IoU term (control)", "baseline_l1x2", "baseline"),
    ("the whole method, GroupNorm heads", "harmonic_hiou_gn", "baseline_gn"),
    ("GroupNorm heads, baseline loss", "baseline_gn", "baseline"),
    ("GroupNorm heads, Harmonic + HIoU", "harmonic_hiou_gn", "harmonic_hiou"),
    ("the gradient through the factors, GroupNorm heads", "harmonic_hiou_gn", "harmonic_hiou_detached_gn"),
    ("the whole method with detached factors, GroupNorm heads", "harmonic_hiou_detached_gn", "baseline_gn"),
    ("HIoU against the same weight on L1, both without the factors", "baseline_hiou", "baseline_l1x2"),
    ("the factors, given HIoU", "harmonic_hiou", "baseline_hiou"),
    ("the gradient through the factors", "harmonic_hiou", "harmonic_hiou_detached"),
    ("beta_c from the ground-truth probability instead of the focal loss", "harmonic_hiou_gt_prob", "harmonic_hiou"),
    ("the consistent cross-entropy in the factor and its term", "harmonic_hiou_gt_ce", "harmonic_hiou"),
    ("the whole method, beta_c from the ground-truth probability", "harmonic_hiou_gt_prob", "baseline"),
    ("(1 + beta_r) on the classification term alone, given HIoU", "harmonic_hiou_cls_factor", "baseline_hiou"),
    ("(1 + beta_c) on the localization term alone, given HIoU", "harmonic_hiou_box_factor", "baseline_hiou"),
    ("(1 + beta_c) alone against both factors, given HIoU", "harmonic_hiou_box_factor", "harmonic_hiou"),
    ("HIoU, the alpha 1.0 dose against none (factors on)", "hiou_alpha_1.0", "harmonic"),
    ("the ablation: the task-contrasting term, given the factors", "harmonic_tc", "harmonic"),
    ("the ablation: a plain IoU loss (HIoU at gamma 0), given factors and TC", "harmonic_tc_iou", "harmonic_tc"),
    ("the ablation: HIoU (gamma 0.8) instead of the plain IoU loss", "harmonic_tc_hiou", "harmonic_tc_iou"),
    ("the comparison: quality focal loss", "qfl", "baseline"),
    ("the comparison: varifocal loss", "varifocal", "baseline"),
    ("the comparison: IoU-balanced loss", "iou_balanced", "baseline"),
)


def attribution(runs: list[Run], metric: str = "AP", contrasts=CONTRASTS,
                confidence: float = 0.95) -> list[dict[str, Any]]:
    """The contrasts of ``contrasts`` that ``runs`` can form, as paired differences of ``metric`` (each
    as :func:`paired_differences` with the contrast's reference in place of the baseline), ranked by
    the size of the mean difference. Each row: ``contrast``, ``variant``, ``reference``, ``mean``,
    ``low``, ``high``, ``n``, ``sd``, ``mde`` and ``excludes_zero`` (None when there is no interval)."""
    rows = []
    for label, variant, reference in contrasts:
        subset = [r for r in runs if r.variant in (variant, reference)]
        entry = paired_differences(subset, baseline=reference, metrics=(metric,), confidence=confidence)
        entry = entry.get(variant, {}).get(metric)
        if not entry or not entry["n"]:
            continue
        excludes = None if entry["low"] is None else bool(entry["low"] > 0 or entry["high"] < 0)
        rows.append({"contrast": label, "variant": variant, "reference": reference, **entry, "excludes_zero": excludes})
    rows.sort(key=lambda row: -abs(row["mean"]))
    return rows


def markdown_attribution(runs: list[Run], metric: str = "AP") -> str:
    """The ranked contrasts of :func:`attribution` as a table (AP in points), with one line saying which
    intervals exclude zero."""
    rows = attribution(runs, metric)
    if not rows:
        return "These sweeps hold no pair of variants that the attribution contrasts compare [D]."
    scale, digits = _scale(metric)
    lines = [f"| rank | what the contrast isolates | variant − reference | {METRICS[metric][2]} difference | "
             "95% CI | pairs | min. detectable | interval excludes 0 |", "|---|---|---|---|---|---|---|---|"]
    for rank, row in enumerate(rows, 1):
        ci, mde = _interval_cells(row, scale, digits)
        excludes = {None: "n/a", True: "yes", False: "no"}[row["excludes_zero"]]
        lines.append(f"| {rank} | {row['contrast']} | `{row['variant']}` − `{row['reference']}` | "
                     f"{row['mean'] * scale:+.{digits}f} | {ci} | {row['n']} | {mde} | {excludes} |")
    shown = [row["contrast"] for row in rows if row["excludes_zero"]]
    lines += ["", "Intervals that exclude zero: " + ("; ".join(shown) if shown else "none") + "."]
    return "\n".join(lines)


def minimum_detectable_effect(sd: float, n: int, *, confidence: float = 0.95, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired t-test on ``n`` pairs detects with probability
    ``power`` at level ``1 - confidence``, when the paired differences have standard deviation ``sd``:
    ``(t_{1 - alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)`` (the usual t approximation)."""
    if n < 2:
        raise ValueError(f"n must be at least 2 pairs, got {n}")
    df = n - 1
    return float((stats.t.ppf(0.5 + confidence / 2, df) + stats.t.ppf(power, df)) * sd / math.sqrt(n))


def markdown_power(diffs, variant: str, metric: str = "AP", baseline: str = "baseline") -> str:
    """One sentence: the spread of the paired differences of ``metric`` and the smallest effect the
    comparison can detect at its number of pairs (power 0.8, 95%), from the numbers."""
    e = diffs.get(variant, {}).get(metric)
    if not e or e.get("mde") is None:
        return f"- Too few pairs of `{variant}` and `{baseline}` to estimate the smallest detectable {METRICS[metric][2]} effect."
    scale, digits = _scale(metric)
    return (f"- Minimum detectable effect [D]: with {e['n']} paired seeds and a seed-to-seed sd of the paired "
            f"{METRICS[metric][2]} differences of {e['sd'] * scale:.{digits}f}, this comparison detects a true "
            f"difference of {e['mde'] * scale:.{digits}f} {METRICS[metric][2]} with power 0.8 at the 95% level; "
            "smaller effects, such as the paper's reported gains, can go unseen.")


def markdown_paired(diffs, variant: str, baseline: str = "baseline") -> str:
    """The paired differences table (:func:`markdown_differences`) and, for ``variant``, the smallest AP
    effect the comparison can detect (:func:`markdown_power`)."""
    return markdown_differences(diffs, baseline=baseline) + "\n\n" + markdown_power(diffs, variant, "AP", baseline)


def _variant_order(runs: list[Run]):
    first_seen: dict[str, int] = {}
    for i, r in enumerate(sorted(runs, key=lambda r: r.name)):
        first_seen.setdefault(r.variant, i)

    def key(variant: str):
        return (variant != "baseline", first_seen.get(variant, 0), variant)

    return key


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def _interval_cells(row: dict[str, Any], scale: float, digits: int) -> tuple[str, str]:
    """A paired difference's 95% interval and minimum detectable effect as table text ("n/a" where missing)."""
    ci = "n/a" if row["low"] is None else f"[{row['low'] * scale:+.{digits}f}, {row['high'] * scale:+.{digits}f}]"
    mde = "n/a" if row["mde"] is None else f"{row['mde'] * scale:.{digits}f}"
    return ci, mde


def _scale(metric: str) -> tuple[float, int]:
    # AP-type metrics in percent (as papers print them); correlations and shares as fractions
    return (100.0, 1) if metric.startswith("AP") else (1.0, 3)


def markdown_summary(summary, metrics=HEADLINE) -> str:
    header = "| variant | seeds | " + " | ".join(METRICS[m][2] for m in metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    for variant, row in summary.items():
        n = max((row[m]["n"] for m in metrics), default=0)
        cells = []
        for m in metrics:
            scale, digits = _scale(m)
            mean, std = row[m]["mean"], row[m]["std"]
            cells.append(_fmt(mean, scale, digits) + ("" if std is None else f" ± {_fmt(std, scale, digits)}"))
        lines.append(f"| {variant} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_differences(diffs, metrics=HEADLINE, baseline: str = "baseline") -> str:
    header = f"| variant - {baseline} | pairs | " + " | ".join(METRICS[m][2] for m in metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    for variant, row in diffs.items():
        n = max((row[m]["n"] for m in metrics), default=0)
        cells = []
        for m in metrics:
            scale, digits = _scale(m)
            e = row[m]
            cell = "n/a" if e["mean"] is None else f"{e['mean'] * scale:+.{digits}f}"
            if e["low"] is not None:
                cell += f" [{e['low'] * scale:+.{digits}f}, {e['high'] * scale:+.{digits}f}]"
            cells.append(cell)
        lines.append(f"| {variant} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(diffs, metric: str, variant: str) -> str:
    """One sentence on whether the interval of (variant - baseline) excludes zero, from the numbers."""
    e = diffs.get(variant, {}).get(metric)
    scale, digits = _scale(metric)
    label = METRICS[metric][2]
    if not e or e["mean"] is None:
        return f"No paired runs of {variant} and the baseline for {label}."
    mean = f"{e['mean'] * scale:+.{digits}f}"
    if e["low"] is None:
        return f"{variant} changes {label} by {mean} on one seed: too few seeds for an interval."
    ci = f"[{e['low'] * scale:+.{digits}f}, {e['high'] * scale:+.{digits}f}]"
    better = METRICS[metric][3]
    if e["low"] > 0 or e["high"] < 0:
        direction = "improves" if (e["low"] > 0) == better else "worsens"
        change = "raises" if e["low"] > 0 else "lowers"
        size = f"{abs(e['mean']) * scale:.{digits}f}"
        return (f"{variant} {change} {label} by {size}, which {direction} it (difference {mean}, 95% CI {ci}, "
                f"{e['n']} paired seeds): the interval excludes zero.")
    return (
        f"{variant} changes {label} by {mean} (95% CI {ci}, {e['n']} paired seeds): the interval includes zero, "
        "so this data does not show a difference."
    )


def _score_iou(run_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    path = run_dir / "score_iou.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return np.asarray(data["scores"], dtype=float), np.asarray(data["ious"], dtype=float)


def load_sweep_runs(results_dir: str | Path, sweeps) -> list[Run]:
    """The finished runs of ``sweeps`` under ``results_dir/runs`` (read by :func:`load_runs`).

    Raises:
        FileNotFoundError: no finished run belongs to these sweeps.
    """
    runs_dir = Path(results_dir) / "runs"
    wanted = set(sweeps)
    runs = [r for r in load_runs(runs_dir) if r.sweep in wanted]
    if not runs:
        raise FileNotFoundError(f"no finished runs of sweeps {list(sweeps)} under {runs_dir}: run notebook 03 first")
    seen: dict[tuple[str, int], Run] = {}
    for run in runs:  # pairing is by (variant, seed): two sweeps that each ran one would pair the wrong runs
        other = seen.setdefault((run.variant, run.seed), run)
        if other is not run:
            raise ValueError(f"sweeps {list(sweeps)} hold variant {run.variant!r} seed {run.seed} twice ({other.folder.name} "
                             f"and {run.folder.name}): report such sweeps apart, each against its own baseline")
    return runs


def describe_runs(runs: list[Run]) -> str:
    """``"6 runs, 2 variants, seeds [0, 1, 2]"``: what the statistics below are computed from."""
    return f"{len(runs)} runs, {len({r.variant for r in runs})} variants, seeds {sorted({r.seed for r in runs})}"


def markdown_runs(runs: list[Run], metrics=HEADLINE) -> str:
    """The raw data: :func:`describe_runs`, then one table row per run (variant order, then seed)."""
    order = _variant_order(runs)
    header = "| run | variant | seed | " + " | ".join(METRICS[m][2] for m in metrics) + " |"
    lines = [describe_runs(runs) + ":", "", header, "|" + "---|" * (len(metrics) + 3)]
    for r in sorted(runs, key=lambda r: (order(r.variant), r.seed, r.name)):
        cells = [_fmt(r.metrics.get(m), *_scale(m)) for m in metrics]
        lines.append(f"| {r.name} | {r.variant} | {r.seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conclusion(diffs, main_variant: str, baseline: str = "baseline") -> str:
    """The one-line conclusion on AP: does the paired 95% interval of ``main_variant - baseline`` exclude zero?"""
    if main_variant not in diffs:
        return f"The variant `{main_variant}` has no runs paired with `{baseline}` in these sweeps."
    ap = diffs[main_variant].get("AP", {})
    if ap.get("low") is not None and ap["low"] > 0:
        claim = "supports the paper's claim [A] that the loss improves accuracy, in this setting"
    elif ap.get("high") is not None and ap["high"] < 0:
        claim = ("does not support the paper's reported gains [R]: in this setting the method lowers AP, "
                 "and the interval excludes zero")
    else:
        claim = "does not show an AP difference either way in this setting"
    return f"**Conclusion [D]:** on these runs, `{main_variant}` against `{baseline}` {claim}."


def markdown_verdict(diffs, main_variant: str, baseline: str = "baseline", metrics=HEADLINE) -> str:
    """:func:`conclusion`, then one :func:`verdict` bullet per metric for ``main_variant``."""
    if main_variant not in diffs:
        return f"- {conclusion(diffs, main_variant, baseline)}"
    return "\n".join([conclusion(diffs, main_variant, baseline), ""]
                     + [f"- {verdict(diffs, m, main_variant)}" for m in metrics])


def markdown_paper(summary, diffs, baseline: str = "baseline", main_variant: str = "harmonic_hiou",
                   runs: list[Run] | None = None) -> str:
    """The paper's AP table [R], with our paired AP difference of ``main_variant`` as the last row [D]."""
    lines = ["| detector | dataset | baseline AP | with the method | gain | tag |", "|---|---|---|---|---|---|"]
    for r in MAIN_TABLE:
        lines.append(f"| {r.detector} | {r.dataset} | {r.baseline:.1f} | {r.harmonic:.1f} | {r.gain:+.1f} | {r.tag} |")
    ours = diffs.get(main_variant, {}).get("AP")
    if ours and ours["mean"] is not None:
        ci = "" if ours["low"] is None else f" [{100 * ours['low']:+.1f}, {100 * ours['high']:+.1f}]"
        base_ap = summary.get(baseline, {}).get("AP", {}).get("mean")
        base_txt = "n/a" if base_ap is None else f"{100 * base_ap:.1f}"
        with_txt = "n/a" if base_ap is None else f"{100 * (base_ap + ours['mean']):.1f}"
        detector, dataset = setting_label(runs)
        lines.append(f"| {detector} (ours) | {dataset} | {base_txt} | {with_txt} | "
                     f"{100 * ours['mean']:+.1f}{ci} | [D] |")
    return "\n".join(lines)


ARCH_NAMES = {"retinanet": "RetinaNet", "fcos": "FCOS", "faster_rcnn": "Faster R-CNN", "mask_rcnn": "Mask R-CNN",
               "ssd": "SSD", "refinedet": "RefineDet"}
_BACKBONE_NAMES = {"resnet18_fpn": "R18-FPN", "resnet50_fpn": "R50-FPN", "mobilenet_v3_fpn": "MobileNetV3-FPN",
                   "vgg16": "VGG16"}


def holds_ablation(runs: list[Run]) -> bool:
    """True when ``runs`` hold the baseline and at least one more of the paper's ablation rows
    (:data:`harmonic.theory.reported.ABLATION_VARIANTS`)."""
    have = {r.variant for r in runs}
    return "baseline" in have and sum(variant in have for variant in ABLATION_VARIANTS.values()) >= 2


def markdown_ablation(runs: list[Run], confidence: float = 0.95) -> str:
    """The paper's cumulative ablation (Faster R-CNN R50-FPN, COCO val [R]) row by row beside the runs'
    variants of the same meaning (:data:`harmonic.theory.reported.ABLATION_VARIANTS`): each row's AP and its
    step over the row before, the paper's [R] and ours [D] (mean ± sd over seeds; the step as a paired
    difference with its 95% interval and minimum detectable effect, and the whole method so far against the
    baseline). A sentence saying so when the runs hold fewer than two of the rows or no baseline
    (:func:`holds_ablation`). AP only: the paper's rows are AP."""
    if not holds_ablation(runs):
        return ("These sweeps hold fewer than two of the paper's ablation rows with their baseline, so there is no "
                "ablation to set beside the paper's [D].")
    have = {r.variant for r in runs}
    rows = [(name, paper, ABLATION_VARIANTS[name]) for name, paper in ABLATION]
    metric = "AP"
    scale, digits = _scale(metric)
    summary = summarize(runs, metrics=(metric,))

    def paired(variant: str, reference: str) -> str:
        found = attribution(runs, metric, (("", variant, reference),), confidence)
        if not found:
            return "n/a"
        row = found[0]
        text = f"{row['mean'] * scale:+.{digits}f}"
        if row["low"] is not None:
            ci, mde = _interval_cells(row, scale, digits)
            text += f" {ci}, MDE {mde}"
        return text + f" ({row['n']} pairs)"

    lines = [f"| paper's row | variant | paper {metric} [R] | paper step [R] | our {metric} [D] | our step, paired, 95% CI [D] | "
             "ours against the baseline [D] |", "|---|---|---|---|---|---|---|"]
    previous = None
    for name, paper, variant in rows:
        step = "" if previous is None else f"{paper - previous[1]:+.1f}"
        if variant in have:
            cell = summary[variant][metric]
            ours = _fmt(cell["mean"], scale, digits) + ("" if cell["std"] is None else f" ± {_fmt(cell['std'], scale, digits)}")
            our_step = "" if previous is None else (paired(variant, previous[2]) if previous[2] in have else "n/a")
            against = "" if variant == "baseline" else paired(variant, "baseline")
        else:
            ours, our_step, against = "not run", "n/a", "n/a"
        lines.append(f"| {name} | `{variant}` | {paper:.1f} | {step} | {ours} | {our_step} | {against} |")
        previous = (name, paper, variant)
    detector, dataset = setting_label(runs)
    lines += ["", f"Ours: {detector} on {dataset} ({describe_runs(runs)}). A step the paper reports below the "
              "minimum detectable effect can go unseen here."]
    return "\n".join(lines)


def setting_label(runs: list[Run] | None) -> tuple[str, str]:
    """``(detector, dataset)`` of the runs' setting, read from the first run's ``config.json``, for the
    paper table: e.g. ``("RetinaNet R18-FPN, shapes-pretrained backbone", "shapes-study, val")``."""
    try:
        config = json.loads((runs[0].folder / "config.json").read_text())["config"]
        detector = config["detector"]
    except (TypeError, IndexError, OSError, KeyError, ValueError):
        return "our detector", "our data, val"
    arch = ARCH_NAMES.get(detector.get("arch"), str(detector.get("arch")))
    backbone = _BACKBONE_NAMES.get(detector.get("backbone"), str(detector.get("backbone")))
    pretrained = detector.get("pretrained_backbone")
    origin = {None: "from scratch", "imagenet": "ImageNet backbone", "shapes": "shapes-pretrained backbone"}.get(
        pretrained, "pretrained backbone")
    return f"{arch} {backbone}, {origin}", f"{Path(str(config.get('dataset'))).stem}, val"


def setting_note(runs: list[Run] | None) -> str:
    """How the runs' setting (:func:`setting_label`) differs from the paper's, and what that means for a verdict."""
    detector, dataset = setting_label(runs)
    return (
        "Differences of setting: the paper trains ImageNet-pretrained ResNet-50/101 detectors on COCO with "
        f"GPU schedules [R]; these runs train a small detector ({detector}) on a generated dataset ({dataset}) "
        "on a CPU, for minutes (docs/testbed.md). A gain there and none here (or the reverse) is not a "
        "contradiction by itself."
    )


def markdown_setting(runs: list[Run]) -> str:
    """The training time of ``runs`` (when every run has its log) and how our setting differs from the paper's."""
    minutes = _training_minutes(runs)
    parts = []
    if minutes is not None:
        parts += [f"Training time of these {len(runs)} runs: {minutes:.1f} minutes in all (sum of the logged "
                  f"iteration times; {_device_of(runs)}) [D].", ""]
    return "\n".join(parts + [setting_note(runs)])


def assumption_record(run: Run, tail: float = 0.2) -> dict[str, float | int | bool] | None:
    """How often Eq. 9's assumption (dF/dx > 0, "basically always true during training" [S]) failed in
    one run, from its log's ``watch/reversed_share`` (None for a run logged without the watch statistics):
    the share of reversed positives averaged over all iterations and over the last ``tail`` of them, the
    largest share, the share of iterations with any reversed positive, and whether the numbers are a
    baseline's counterfactual."""
    log = find_log(run.folder)
    if not log.is_file():
        return None
    shares, counterfactual = [], False
    for record in read_log(log):
        if record.get("watch/reversed_share") is not None:
            shares.append(float(record["watch/reversed_share"]))
            counterfactual = counterfactual or bool(record.get("watch/counterfactual"))
    if not shares:
        return None
    last = shares[-max(1, int(round(tail * len(shares)))):]
    return {"iterations": len(shares), "mean": float(np.mean(shares)), "mean_last": float(np.mean(last)),
            "max": float(np.max(shares)), "iterations_with_reversal": float(np.mean([v > 0 for v in shares])),
            "counterfactual": counterfactual}


def markdown_assumptions(runs: list[Run]) -> str:
    """Per variant, whether Eq. 9's assumption held during training, with numbers from the runs' logs
    (means over the variant's seeds of :func:`assumption_record`)."""
    lines = ["| variant | runs | mean share of positives with dF/dx < 0 | over the last 20% | largest | "
             "iterations with any | kind |", "|---|---|---|---|---|---|---|"]
    missing = []
    for variant in sorted({r.variant for r in runs}, key=_variant_order(runs)):
        records = [rec for r in runs if r.variant == variant and (rec := assumption_record(r)) is not None]
        if not records:
            missing.append(variant)
            continue
        mean = {k: float(np.mean([rec[k] for rec in records])) for k in ("mean", "mean_last", "max", "iterations_with_reversal")}
        kind = "counterfactual (not trained with these factors)" if records[0]["counterfactual"] else "trained"
        lines.append(f"| {variant} | {len(records)} | {mean['mean']:.3f} | {mean['mean_last']:.3f} | {mean['max']:.3f} | "
                     f"{mean['iterations_with_reversal']:.3f} | {kind} |")
    if len(lines) == 2:
        return ("The runs were logged without the watch statistics, so whether Eq. 9's assumption held cannot be "
                "read from them [D].")
    text = "\n".join(lines)
    if missing:
        text += f"\n\nNot logged (runs that predate the watch statistics): {', '.join(missing)}."
    return text


_PAPER_ABLATION = dict(ABLATION)
_RETINANET = next(row for row in MAIN_TABLE if row.detector.startswith("RetinaNet"))


def _ablation_step(row: str) -> str:
    """The AP gain the paper reports for ablation row ``row`` over the row before it [R], as text."""
    names = [name for name, _ in ABLATION]
    if names.index(row) == 0:
        raise ValueError(f"the ablation's first row {row!r} has no step over a row before it")
    before = names[names.index(row) - 1]
    return f"{_PAPER_ABLATION[row] - _PAPER_ABLATION[before]:+.1f}"


#: the paper's claims the sweeps can test [D]: (claim, its source tag, variant, reference, metric, the
#: direction the claim predicts: +1 a rise, -1 a fall). Variant None: the report's main variant (the method
#: as the report's runs build it: Harmonic + HIoU by default, + task-contrasting in the Faster R-CNN ablation).
#: The ablation's numbers are Faster R-CNN's [R]; the test here is on the runs' own detector (:func:`setting_label`).
CLAIMS: tuple[tuple[str, str, str | None, str, str, int], ...] = (
    (f"Harmonic + HIoU raises AP (RetinaNet R50, COCO test-dev: {_RETINANET.gain:+.1f})", "[R]", "harmonic_hiou",
     "baseline", "AP", +1),
    ("Harmonic + HIoU raises AP, with beta_c from the ground-truth probability (a softmax head's beta_c)", "[R]",
     "harmonic_hiou_gt_prob", "baseline", "AP", +1),
    ("Harmonic + HIoU raises AP, on GroupNorm heads", "[R]", "harmonic_hiou_gn", "baseline_gn", "AP", +1),
    (f"the method raises AP75 (ablation: {ABLATION_AP75[0]:.1f} to {ABLATION_AP75[1]:.1f}, row unclear)", "[R]", None,
     "baseline", "AP75", +1),
    (f"the harmonic loss alone raises AP (ablation: {_ablation_step('+ Harmonic')})", "[R]", "harmonic", "baseline",
     "AP", +1),
    (f"the task-contrasting term raises AP, given the factors (ablation: {_ablation_step('+ task-contrasting')})", "[R]",
     "harmonic_tc", "harmonic", "AP", +1),
    (f"a plain IoU loss raises AP, given the factors and task-contrasting (ablation: {_ablation_step('+ plain IoU loss')})",
     "[R]", "harmonic_tc_iou", "harmonic_tc", "AP", +1),
    (f"HIoU in place of the plain IoU loss raises AP (ablation: {_ablation_step('HIoU instead of IoU')})", "[R]",
     "harmonic_tc_hiou", "harmonic_tc_iou", "AP", +1),
    (f"the ablation's whole method (Harmonic + task-contrasting + HIoU) raises AP (ablation: "
     f"{_PAPER_ABLATION['baseline']:.1f} to {_PAPER_ABLATION['HIoU instead of IoU']:.1f})", "[R]", "harmonic_tc_hiou",
     "baseline", "AP", +1),
    ("the loss makes scores rank boxes by their IoU (score-IoU Spearman up)", "[A]", None, "baseline", "spearman", +1),
    ("the loss lowers the share of inconsistent detections (high score and poor box, or low score and good box)", "[A]",
     None, "baseline", "inconsistent_share", -1),
    ("NMS keeps the best box more often", "[A]", None, "baseline", "nms_best_box_rate", +1),
)
#: Eq. 9's "basically always true during training" [S], read from the runs of the report's main variant [D]: it is
#: contradicted when in every run more than this share of the positives has dF/dx < 0 over the last fifth of
#: training, supported when in none, undecided otherwise
ASSUMPTION_TOLERANCE = 0.01


def claims(runs: list[Run], confidence: float = 0.95, main_variant: str = "harmonic_hiou") -> list[dict[str, Any]]:
    """The paper's claims of :data:`CLAIMS` that ``runs`` can test, each with its paired difference (as
    :func:`attribution`) and a ``verdict``: "supports" when the 95% interval excludes zero in the claimed
    direction, "contradicts" when it excludes zero in the other, else "cannot decide" (the row's ``mde``
    says what effect the pairs could have detected). Then two rows of their own: Eq. 9's assumption
    (:data:`ASSUMPTION_TOLERANCE`, from the logs of ``main_variant``, which also stands for the claims whose
    variant is None) and the reported HIoU weight alpha =
    1.5 and focusing parameter gamma = 0.8 as the best values [R] (:func:`_best_value_claim`; ``harmonic``
    counts as alpha 0)."""
    rows = []
    for claim, tag, variant, reference, metric, direction in CLAIMS:
        variant = main_variant if variant is None else variant
        found = attribution(runs, metric, ((claim, variant, reference),), confidence)
        if not found:
            continue
        row = found[0]
        if row["low"] is None:
            verdict_ = "cannot decide"
        elif (row["low"] > 0 and direction > 0) or (row["high"] < 0 and direction < 0):
            verdict_ = "supports"
        elif row["low"] > 0 or row["high"] < 0:
            verdict_ = "contradicts"
        else:
            verdict_ = "cannot decide"
        rows.append({**row, "claim": claim, "tag": tag, "metric": metric, "verdict": verdict_})
        if metric == "inconsistent_share":  # its two parts, which can move for different reasons
            parts = [part for key in ("high_score_poor_iou_share", "low_score_good_iou_share")
                     for part in attribution(runs, key, ((METRICS[key][2], variant, reference),), confidence)]
            if parts:
                rows[-1]["parts"] = "; ".join(f"{part['contrast']} {part['mean']:+.3f}" for part in parts)
    records = [rec for r in runs if r.variant == main_variant and (rec := assumption_record(r)) is not None]
    records = [rec for rec in records if not rec["counterfactual"]]
    if records:
        last = [rec["mean_last"] for rec in records]
        rows.append({
            "claim": "Eq. 9: dF/dx > 0 is \"basically always true during training\"", "tag": "[S]",
            "variant": main_variant, "reference": None, "metric": "reversed share", "n": len(records),
            "mean": float(np.mean(last)), "low": float(np.min(last)), "high": float(np.max(last)), "mde": None,
            "verdict": "contradicts" if min(last) > ASSUMPTION_TOLERANCE else
            ("supports" if max(last) <= ASSUMPTION_TOLERANCE else "cannot decide"),
        })
    for param in ("alpha", "gamma"):
        row = _best_value_claim(runs, param, confidence)
        if row is not None:
            rows.append(row)
    return rows


#: the HIoU parameters whose reported value [R] the claims test as the best one, with their names in the paper
BEST_VALUE_CLAIMS = {"alpha": "HIoU weight", "gamma": "HIoU focusing parameter"}


def _best_value_claim(runs: list[Run], param: str, confidence: float) -> dict[str, Any] | None:
    """The claim that the reported ``param`` value [R] (alpha 1.5, gamma 0.8: ``harmonic_hiou``) is the best:
    every other value of :func:`param_points` paired with ``harmonic_hiou`` on AP. Contradicted when one of
    them is above it with an interval that excludes zero (the row shows the largest such gain), supported
    when the sweep of ``param`` ran and all are below it so; None without two values."""
    points = param_points(dict.fromkeys(r.variant for r in runs), param)
    if "harmonic_hiou" not in points.values() or len(points) < 2:
        return None
    default = next(value for value, variant in points.items() if variant == "harmonic_hiou")
    others = [(f"{param} {value:g}", variant, "harmonic_hiou") for value, variant in sorted(points.items())
              if variant != "harmonic_hiou"]
    found = attribution(runs, "AP", tuple(others), confidence)
    if not found:
        return None
    above = [row for row in found if row["low"] is not None and row["low"] > 0]
    below = [row for row in found if row["high"] is not None and row["high"] < 0]
    swept = any(row["variant"].startswith(f"hiou_{param}_") for row in found)
    # the row shows the contrast that decides: the largest gain above zero, else the largest mean
    best = max(above or found, key=lambda row: row["mean"])
    return {
        "claim": f"{param} = {default:g} is the best {BEST_VALUE_CLAIMS[param]}", "tag": "[R]",
        "variant": best["variant"], "reference": "harmonic_hiou", "metric": "AP", "n": best["n"],
        "mean": best["mean"], "low": best["low"], "high": best["high"], "mde": best["mde"],
        "verdict": "contradicts" if above else ("supports" if swept and len(below) == len(found) else "cannot decide"),
        "param": param, "default": default,
        "detail": "; ".join(f"{row['contrast']}: {100 * row['mean']:+.1f}" for row in
                            sorted(found, key=lambda row: row["contrast"])),
    }


def markdown_claims(runs: list[Run], main_variant: str = "harmonic_hiou") -> str:
    """:func:`claims` as a table: the claim and its source, the test, what we measured [D], the verdict."""
    rows = claims(runs, main_variant=main_variant)
    if not rows:
        return "These sweeps hold no runs that test one of the paper's claims [D]."
    detector, _ = setting_label(runs)
    lines = [f"Tested on {detector} ({describe_runs(runs)}); the paper's numbers come from larger detectors on COCO.",
             "", "| the paper's claim | source | test [D] | measured [D] | 95% CI | pairs | min. detectable | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["metric"] == "reversed share":
            test = f"share of `{row['variant']}`'s positives with dF/dx < 0, last 20% of training"
            measured = f"{row['mean']:.3f} (runs from {row['low']:.3f} to {row['high']:.3f})"
            ci, mde = f"tolerance {ASSUMPTION_TOLERANCE:g}", "n/a"
        else:
            scale, digits = _scale(row["metric"])
            test = f"`{row['variant']}` − `{row['reference']}`, {METRICS[row['metric']][2]}"
            if "parts" in row:
                test += f" (its parts: {row['parts']})"
            if "detail" in row:
                test = (f"each swept {row['param']} − `harmonic_hiou` ({row['default']:g}), AP; best: `{row['variant']}` "
                        f"({row['detail']})")
            measured = f"{row['mean'] * scale:+.{digits}f}"
            ci, mde = _interval_cells(row, scale, digits)
        lines.append(f"| {row['claim']} | {row['tag']} | {test} | {measured} | {ci} | {row['n']} | {mde} | "
                     f"**{row['verdict']}** |")
    lines += ["", "Supports / contradicts: the 95% interval excludes zero in the claimed / the other direction; "
              "cannot decide: it includes zero (an effect below the minimum detectable can go unseen). Eq. 9: "
              f"contradicted when every run has more than {ASSUMPTION_TOLERANCE:g} of its positives with dF/dx < 0 "
              "over the last fifth of training, supported when none has. alpha, gamma: contradicted when another value's "
              "interval lies above the reported value's, supported when every swept value's lies below. In this "
              "setting only: " + setting_note(runs)[len("Differences of setting: "):]]
    return "\n".join(lines)


def report_markdown(runs: list[Run], summary, diffs, *, baseline: str = "baseline",
                    main_variant: str = "harmonic_hiou", oracle_section: str | None = None) -> str:
    """The whole report (report.md and the README block): the sections of notebook 05, with headings; the
    oracle split's section (:func:`harmonic.experiments.ranking.markdown_oracle_split`) where given."""
    return "\n".join([
        f"### Our runs [D]: {describe_runs(runs)}",
        "",
        "Mean ± standard deviation over seeds. AP in percent; correlations and shares as fractions.",
        "",
        markdown_summary(summary),
        "",
        f"### Paired difference to `{baseline}` (same seed), with 95% t-interval [D]",
        "",
        markdown_paired(diffs, main_variant, baseline),
        "",
        "### What the data says",
        "",
        markdown_verdict(diffs, main_variant, baseline),
        "",
        "### Which part moves AP? Paired contrasts, ranked [D]",
        "",
        markdown_attribution(runs),
        "",
        *([f"### Boxes or scores? `{main_variant}` against `{baseline}`, split by oracle re-scoring [D]", "",
           oracle_section, ""] if oracle_section is not None else []),
        "### Did the supplement's assumption hold? [D]",
        "",
        "Eq. 9 [S] takes dF/dx > 0 (a positive's score is pushed up) as basically always true during training; "
        "the share of positives for which it failed, from every run's log:",
        "",
        markdown_assumptions(runs),
        "",
        "### Which of the paper's claims do the data support? [D]",
        "",
        markdown_claims(runs, main_variant),
        "",
        "### The paper's reported numbers [R], beside ours",
        "",
        markdown_paper(summary, diffs, baseline, main_variant, runs),
        "",
        *(["### The paper's ablation [R], row by row beside ours [D]", "", markdown_ablation(runs), ""]
          if holds_ablation(runs) else []),
        markdown_setting(runs),
    ])


def _report_figures(runs, summary, results_dir: Path, baseline: str, main_variant: str, dpi: int) -> list[Path]:
    figures = []
    pair = {}
    for variant in (baseline, main_variant):
        candidates = sorted((r for r in runs if r.variant == variant), key=lambda r: r.seed)
        for r in candidates:
            data = _score_iou(r.folder)
            if data is not None:
                pair[f"{variant} (seed {r.seed})"] = data
                break
    if len(pair) == 2:
        fig = plot_score_vs_iou(pair)
        figures.append(save_figure(fig, results_dir / "figures" / "score_vs_iou_side_by_side.png", dpi=dpi))
    for param in ("gamma", "alpha"):
        points = param_points(summary, param)
        if len(points) >= 2 and any(v.startswith("hiou_") for v in points.values()):
            xs = sorted(points)
            fig = plot_metric_vs_param(
                xs,
                [100 * (summary[points[x]]["AP"]["mean"] or 0.0) for x in xs],
                [None if summary[points[x]]["AP"]["std"] is None else 100 * summary[points[x]]["AP"]["std"] for x in xs],
                "Harmonic + HIoU (ours) [D]", param, metric_name="AP (%)",
            )
            figures.append(save_figure(fig, results_dir / "figures" / f"ap_vs_{param}.png", dpi=dpi))
    return figures


def param_points(summary, param: str) -> dict[float, str]:
    """``{value: variant}`` of the HIoU parameter ``param`` ("alpha" or "gamma") over the variants of
    ``summary``: the swept ``hiou_<param>_<value>`` runs, ``harmonic_hiou`` at the default value (alpha 1.5,
    gamma 0.8) and, for alpha, ``harmonic`` (no HIoU term) as 0. A swept run wins over the others."""
    prefix = f"hiou_{param}_"
    points = {float(v[len(prefix):]): v for v in summary if v.startswith(prefix)}
    if param == "alpha" and "harmonic" in summary:
        points.setdefault(0.0, "harmonic")
    if "harmonic_hiou" in summary:
        points.setdefault(float(getattr(HarmonicOptions(), f"hiou_{'weight' if param == 'alpha' else 'gamma'}")),
                          "harmonic_hiou")
    return points


def results_report(
    *,
    sweeps: list[str],
    baseline: str = "baseline",
    main_variant: str = "harmonic_hiou",
    results_dir: str | Path = "results",
    dpi: int = 120,
    update_readme: str | Path | None = None,
    output_dir: str | Path | None = None,
    oracle_split: dict[str, Any] | None = None,
    oracle_section: str | None = None,
) -> dict[str, Any]:
    """Tables, verdicts, the paper side by side and figures, all computed from the run folders.

    The one function that writes files: ``output_dir/report.md`` (:func:`report_markdown`),
    ``output_dir/report.json`` and the figures under ``output_dir/figures``, where ``output_dir``
    defaults to ``results_dir`` (the runs are read from ``results_dir/runs`` either way, so a report of
    other sweeps can be written beside the default one without replacing it); with ``update_readme`` (a
    path to README.md) it replaces the block between ``<!-- results:begin -->`` and ``<!-- results:end -->``.
    Notebook 05 shows the same steps one by one (:func:`load_sweep_runs`, :func:`summarize`,
    :func:`paired_differences`, :func:`markdown_verdict`, :func:`markdown_attribution`,
    :func:`markdown_paper`) before calling it. ``oracle_split`` and ``oracle_section``: the oracle split of
    :mod:`harmonic.experiments.ranking` (which builds on this module) and its section, written into the
    report where given (notebook 05 computes them).

    Returns:
        ``{"markdown", "figures", "summary", "differences", "written"}``; ``written`` lists every file written.
    """
    results_dir = Path(results_dir)
    output_dir = results_dir if output_dir is None else Path(output_dir)
    runs = load_sweep_runs(results_dir, sweeps)
    summary = summarize(runs)
    diffs = paired_differences(runs, baseline=baseline)
    markdown = report_markdown(runs, summary, diffs, baseline=baseline, main_variant=main_variant,
                               oracle_section=oracle_section)
    figures = _report_figures(runs, summary, output_dir, baseline, main_variant, dpi)
    written = [
        atomic_write_text(output_dir / "report.md", markdown + "\n"),
        atomic_write_json(output_dir / "report.json", {"sweeps": sweeps, "summary": summary, "differences": diffs,
                                                         "attribution": attribution(runs), "claims": claims(runs, main_variant=main_variant),
                                                         "oracle_split": oracle_split,
                                                         "runs": [r.name for r in runs]}),
    ]
    if update_readme is not None:
        replace_block(update_readme, "results", markdown, figures)
        written.append(Path(update_readme))
    return {"markdown": markdown, "figures": figures, "summary": summary, "differences": diffs,
            "written": written + figures}


def _training_minutes(runs) -> float | None:
    total = 0.0
    for r in runs:
        log = find_log(r.folder)
        if not log.is_file():
            return None
        total += sum(record.get("time", 0.0) for record in read_log(log))
    return total / 60.0


def _device_of(runs) -> str:
    try:
        prov = json.loads((runs[0].folder / "config.json").read_text())["provenance"]["device"]
    except (OSError, KeyError, ValueError):
        return "device not recorded"
    return f"{prov.get('device')}, {prov.get('cpu_count')} CPU cores, {prov.get('torch_threads')} torch thread(s) per run"
