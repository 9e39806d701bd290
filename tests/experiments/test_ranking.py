"""The oracle split of a variant's AP difference: paired parts that add up, and the table and figure."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from harmonic.experiments.ranking import (
    PARTS,
    QUANTITIES,
    VERSION,
    baseline_levels,
    is_current,
    markdown_split,
    measure_run,
    paired_split,
    plot_split,
)
from harmonic.experiments.report import Run


def _measured(ap, within, background, ideal):
    """A run's split as fractions, the gaps derived as the oracle chain derives them (AP50 and AP75 alike)."""
    row = {}
    for m in ("AP", "AP50", "AP75"):
        row.update({m: ap, f"{m}_within": within, f"{m}_background": background, f"{m}_ideal": ideal,
                    f"{m}_consistency_gap": within - ap, f"{m}_background_gap": background - within,
                    f"{m}_across_gap": ideal - background})
    return row


def _runs_and_split():
    values = {("baseline", 0): (0.30, 0.32, 0.40, 0.50), ("baseline", 1): (0.32, 0.35, 0.45, 0.54),
              ("baseline", 2): (0.31, 0.33, 0.41, 0.52), ("m", 0): (0.27, 0.28, 0.35, 0.51),
              ("m", 1): (0.30, 0.32, 0.42, 0.56), ("m", 2): (0.28, 0.30, 0.36, 0.52),
              ("baseline", 7): (0.1, 0.1, 0.1, 0.1)}  # no pair: left out of the levels
    runs = [Run(f"s-{v}-s{seed}", Path("."), v, seed, "s") for v, seed in values]
    measured = {f"s-{v}-s{seed}": _measured(*vals) for (v, seed), vals in values.items()}
    return runs, measured, values


def test_the_parts_add_up_to_the_paired_difference_with_their_signs():
    runs, measured, values = _runs_and_split()
    split = paired_split(runs, measured, ("m",))
    row = split["m"]
    assert row["pairs"] == 3 and set(QUANTITIES) >= {"AP_ideal", "AP_consistency_gap", "AP_background_gap"}
    diff = sum(100 * (values["m", s][0] - values["baseline", s][0]) for s in range(3)) / 3
    assert row["difference"]["AP"]["mean"] == pytest.approx(diff)
    parts = row["parts"]["AP"]
    boxes = sum(100 * (values["m", s][3] - values["baseline", s][3]) for s in range(3)) / 3
    consistency = -sum(100 * ((values["m", s][1] - values["m", s][0]) - (values["baseline", s][1] - values["baseline", s][0]))
                       for s in range(3)) / 3
    assert parts["boxes"]["mean"] == pytest.approx(boxes)
    assert parts["consistency"]["mean"] == pytest.approx(consistency)
    assert sum(parts[name]["mean"] for name, _, _ in PARTS) == pytest.approx(diff)
    for entry in parts.values():  # a negated part keeps its interval the right way round, around its mean
        assert entry["low"] < entry["mean"] < entry["high"]
    assert paired_split(runs, measured, ("other",)) == {}  # no such variant: nothing to split


def test_the_table_and_the_figure_show_every_study_and_variant():
    runs, measured, _ = _runs_and_split()
    levels = baseline_levels(runs, measured, ("m",))
    assert levels["AP"] == pytest.approx(31.0) and levels["AP_ideal"] == pytest.approx(52.0)  # seed 7 unpaired
    studies = [{"sweep": "s", "setting": "Faster R-CNN, 4800 iterations, d", "variants": paired_split(runs, measured, ("m",)),
                "baseline": levels}]
    table = markdown_split(studies)
    lines = table.splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[2].count("|")
    assert lines[2].startswith("| Faster R-CNN, 4800 iterations, d (`s`) | `m` | 3 | 31.0 / 33.3 / 42.0 / 52.0 | -2.7 [")
    fig = plot_split(studies)
    ax = fig.axes[0]
    assert len(ax.containers) >= 1 + len(PARTS)  # the difference and each part
    assert [t.get_text() for t in ax.get_yticklabels()] == ["Faster R-CNN, 4800 iterations, d\nm"]


def test_measure_run_refuses_detections_that_do_not_give_the_runs_ap(tmp_path):
    import contextlib
    import io

    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "width": 50, "height": 50, "file_name": "1.png"}],
                  "categories": [{"id": 1, "name": "a"}],
                  "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400,
                                   "iscrowd": 0}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    folder = tmp_path / "r-baseline-s0"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"config": {"dataset": "d", "val_dataset": None}}))
    with gzip.open(folder / "detections.json.gz", "wt") as f:
        json.dump([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.9}], f)
    seen = []
    truth = lambda name: seen.append(name) or gt  # noqa: E731
    run = Run(folder.name, folder, "baseline", 0, "r", {"AP": 1.0})
    row = measure_run(run, truth)
    assert seen == ["d"] and row["AP"] == row["AP_ideal"] == 1.0 and row["AP_across_gap"] == 0.0
    assert is_current(run, row) and not is_current(run, {**row, "version": VERSION - 1})
    with gzip.open(folder / "detections.json.gz", "wt") as f:  # other detections: the cached row is stale
        json.dump([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 10], "score": 0.9}], f)
    assert not is_current(run, row)
    with pytest.raises(ValueError, match="r-baseline-s0: its detections give AP 0.1 on d"):
        measure_run(run, truth)
    with pytest.raises(ValueError, match="metrics.json: no COCO AP"):
        measure_run(Run(folder.name, folder, "baseline", 0, "r", {}), truth)


def test_the_report_splits_its_main_variant_from_committed_detections_or_says_why_not(tmp_path):
    import contextlib
    import io

    from pycocotools.coco import COCO

    from harmonic.evaluation import coco_evaluate
    from harmonic.experiments.ranking import markdown_oracle_split, oracle_split
    from harmonic.experiments.report import load_sweep_runs

    gt = COCO()
    gt.dataset = {"images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in (1, 2)],
                  "categories": [{"id": 1, "name": "a"}],
                  "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600,
                                   "iscrowd": 0} for i in (1, 2)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    for variant in ("baseline", "harmonic_hiou"):
        for seed in (0, 1):
            poor = 0.9 if variant == "harmonic_hiou" else 0.4  # the variant scores its poor box above the exact one
            dets = [d for i in (1, 2) for d in (
                {"image_id": i, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.5 + 0.01 * seed},
                {"image_id": i, "category_id": 1, "bbox": [20, 10, 40, 40], "score": poor})]
            folder = tmp_path / "runs" / f"{variant}-s{seed}"
            folder.mkdir(parents=True)
            (folder / "run.json").write_text(json.dumps({"variant": variant, "seed": seed, "sweep": "s"}))
            (folder / "config.json").write_text(json.dumps({"config": {"dataset": "d", "val_dataset": None,
                                                                       "max_iters": 8, "detector": {"arch": "faster_rcnn"}}}))
            (folder / "metrics.json").write_text(json.dumps({"coco": coco_evaluate(gt, dets)}))
            with gzip.open(folder / "detections.json.gz", "wt") as f:
                json.dump(dets, f)
    runs = load_sweep_runs(tmp_path, ["s"])
    split = oracle_split(runs, truth=lambda name: gt)
    assert split["setting"] == "Faster R-CNN, 8 iterations, d" and split["sweep"] == "s" and len(split["runs"]) == 4
    row = split["variants"]["harmonic_hiou"]
    assert row["pairs"] == 2 and row["difference"]["AP"]["mean"] < 0
    assert row["parts"]["AP"]["boxes"]["mean"] == 0.0  # the same boxes: the whole difference is in the scores
    assert row["parts"]["AP"]["consistency"]["mean"] == pytest.approx(row["difference"]["AP"]["mean"], abs=1e-9)
    text = markdown_oracle_split(split)
    assert text.splitlines()[2].startswith("| Faster R-CNN, 8 iterations, d (`s`) | `harmonic_hiou` | 2 |")
    (tmp_path / "runs" / "baseline-s1" / "metrics.json").write_text(json.dumps({"coco": {"AP": 0.01}}))
    refused = oracle_split(load_sweep_runs(tmp_path, ["s"]), truth=lambda name: gt)
    assert refused["reason"].startswith("ValueError: ") and "baseline-s1: its detections give AP" in refused["reason"]
    assert markdown_oracle_split(refused).startswith("Not split [D]: ")
