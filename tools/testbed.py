"""Test-bed measurements: short RetinaNet runs over the levers of the study's difficulty and budget.

One run = a shapes dataset (generator parameters given as JSON, cached under the data root by their hash),
a detector (the ``shapes-cpu`` preset, or ``--preset shapes-study``, with overrides), a schedule (iterations, lr; the preset's step
decays scaled to the length), a seed. It trains one process with one thread, evaluates COCO AP on the
dataset's validation split, and measures what the log does not hold for the baseline loss:

* ``pos_iou``: the mean IoU of the positives' decoded boxes with their targets (anchors matched as in
  training, IoU >= 0.5 or the best anchor of each object), on the validation images, model in eval mode;
* ``share_above_05``: the share of matched detections (the consistency metric's matching) scoring > 0.5;
* ``watch_<key>``: the watch statistics of the training log over its last 10% (:func:`watch_tail`).

Every run writes a small JSON record to ``results/testbed/runs/<name>.json``; ``frontier`` collects them
into ``results/testbed/frontier.json`` (with the runs grouped over seeds and each loss paired with the
baseline by seed) and rewrites the frontier table of ``docs/testbed.md``. Checkpoints and detections stay
under ``data/testbed-runs/``.

    python tools/testbed.py run NAME [--data JSON] [--detector JSON] [--train JSON] [--iters N] [--lr X] [--seed S] [--preset P]
    python tools/testbed.py frontier
    python tools/testbed.py rewatch NAME...
    python tools/testbed.py pos-iou RUN_DIR...
    python tools/testbed.py subset-ap RUN_DIR... [--subset shapes-study]
    python tools/testbed.py data-lever
    python tools/testbed.py ranking
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "results" / "testbed" / "runs"
#: the notes the frontier and the ranking split write their tables into
DOC = ROOT / "docs" / "testbed.md"


def dataset_folder(data: dict[str, Any], root: Path | None = None) -> Path:
    """The cached dataset of generator overrides ``data`` (over the ``shapes`` preset): ``data/testbed/<hash>``."""
    from harmonic.data.shapes import PRESETS, ShapesParams, default_data_root, ensure_dataset

    params = ShapesParams(**{**dataclasses.asdict(PRESETS["shapes"]), **data}).validate()
    key = hashlib.sha256(json.dumps(dataclasses.asdict(params), sort_keys=True).encode()).hexdigest()[:12]
    folder = (root or default_data_root()) / "testbed" / f"shapes-{key}"
    ensure_dataset(folder, params, 0)
    return folder


def scaled_schedule(iters: int) -> dict[str, Any]:
    """The ``shapes-cpu`` schedule (warmup 200, decays at 77% and 93%) at another length."""
    return {"max_iters": iters, "warmup_iters": min(200, iters // 5), "lr_steps": [round(0.767 * iters), round(0.933 * iters)]}


def positive_iou(model, dataset, batch_size: int = 8) -> dict[str, float]:
    """Mean IoU of the decoded boxes of the positive anchors with their matched objects (eval mode)."""
    import torch
    from torchvision.ops import box_iou

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            images = [img for img, _ in items]
            targets = [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in items]
            batch, targets = model.transform(images, targets)
            features = list(model.backbone(batch.tensors).values())
            head = model.head(features)
            anchors = model.anchor_generator(batch, features)
            for i, target in enumerate(targets):
                if target["boxes"].numel() == 0:
                    continue
                matched = model.proposal_matcher(box_iou(target["boxes"], anchors[i]))
                pos = torch.where(matched >= 0)[0]
                pred = model.box_coder.decode_single(head["bbox_regression"][i][pos].float(), anchors[i][pos])
                gt = target["boxes"][matched[pos]]
                ious = box_iou(pred, gt).diagonal()
                total += float(ious.sum())
                count += int(pos.numel())
    return {"pos_iou": total / max(1, count), "num_positives": count}


def portable_backbone(value: str | None) -> str | None:
    """A pretrained-backbone setting as a result file records it: a named source ("imagenet", "shapes")
    as it is, a weights file by its name under the data root, never this machine's absolute path."""
    if value is None or "/" not in value:
        return value
    return f"<data root>/pretrained/{Path(value).name}"


def run(name: str, data: dict, detector: dict, train: dict, iters: int, lr: float, seed: int,
        preset: str = "shapes-cpu") -> dict[str, Any]:
    import torch

    from harmonic.data import build_dataset
    from harmonic.engine import TrainConfig
    from harmonic.engine.checkpoints import load_model
    from harmonic.engine.predict import evaluate
    from harmonic.engine.training import train as train_run
    from harmonic.utils.files import atomic_write_json
    from harmonic.utils.runlog import read_log

    torch.set_num_threads(1)
    # the preset's own data set unless generator overrides are given (the shapes-cpu preset: always the
    # `shapes` generator with the overrides, as the first lever runs were)
    folder = dataset_folder(data) if data or preset == "shapes-cpu" else None
    run_dir = ROOT / "data" / "testbed-runs" / name
    changes = {**({"dataset": str(folder)} if folder else {}), "output_dir": str(run_dir), "seed": seed, "lr": lr, "amp": "bf16",
               "channels_last": True, **TOOL_RUNTIME, "resume": True, "checkpoint_every": 10**6,
               "log_every": 500, **scaled_schedule(iters), **train}
    if detector:
        changes["detector"] = detector
    cfg = TrainConfig.preset(preset, **changes)
    start = time.perf_counter()
    train_run(cfg, progress=False)
    train_minutes = (time.perf_counter() - start) / 60
    metrics = evaluate(run_dir, out_dir=run_dir, device="cpu", progress=False)
    model, _ = load_model(run_dir / "checkpoints" / "final.pt")
    val = build_dataset(str(folder) if folder else cfg.dataset, "val", train=False)
    piou = positive_iou(model, val)
    scores = json.loads((run_dir / "score_iou.json").read_text())["scores"]
    log = read_log(run_dir)  # log.jsonl.gz once the run is finished
    record = {
        "name": name, **({} if preset == "shapes-cpu" else {"preset": preset}), "data": data,
        "detector": {k: portable_backbone(v) if k == "pretrained_backbone" else v for k, v in detector.items()},
        "train": train, "iters": iters, "lr": lr, "seed": seed,
        "batch_size": cfg.batch_size, "min_size": cfg.detector.get("min_size"),
        "pretrained_backbone": portable_backbone(cfg.detector.get("pretrained_backbone")),
        "train_minutes": round(train_minutes, 2),
        "sec_per_iter": round(sum(r["time"] for r in log) / len(log), 4),
        "AP": round(100 * metrics["coco"]["AP"], 2), "AP50": round(100 * metrics["coco"]["AP50"], 2),
        "AP75": round(100 * metrics["coco"]["AP75"], 2),
        "pos_iou": round(piou["pos_iou"], 4), "num_positives_val": piou["num_positives"],
        "n_matched": len(scores), "n_matched_above_05": sum(s > 0.5 for s in scores),
        "share_above_05": round(sum(s > 0.5 for s in scores) / max(1, len(scores)), 4),
        "n_objects": metrics["consistency"]["n_objects"],
        "spearman": metrics["consistency"]["spearman"],
        "final_loss": round(sum(r["loss"] for r in log[-100:]) / min(100, len(log)), 4),
        **watch_tail(log),
    }
    atomic_write_json(RECORDS / f"{name}.json", record)
    print(json.dumps(record), flush=True)
    return record


#: the watch statistics a record keeps: their mean over the last :data:`WATCH_TAIL` of training
WATCH_KEYS = ("reversed_share", "y_over_threshold_share", "iou_p50", "score_p50", "score_p90")
WATCH_TAIL = 0.1


def watch_tail(log: list[dict[str, Any]], tail: float = WATCH_TAIL) -> dict[str, float]:
    """``watch_<key>``: the mean of ``watch/<key>`` over the last ``tail`` of the log's records that carry it
    (:func:`harmonic.utils.runlog.tail_means`, as ``tools/watch_summary.py`` reads it); keys the log lacks
    are left out. A baseline's log holds them as counterfactuals (the engine's watch statistics)."""
    from harmonic.utils.runlog import tail_means

    means = tail_means(log, [f"watch/{key}" for key in WATCH_KEYS], tail)
    return {f"watch_{key}": round(means[f"watch/{key}"], 4) for key in WATCH_KEYS if means[f"watch/{key}"] is not None}


def rewatch(name: str, records_dir: Path = RECORDS, runs_dir: Path = ROOT / "data" / "testbed-runs") -> dict[str, Any]:
    """Replace the ``watch_<key>`` fields of the record of run ``name`` with :func:`watch_tail` of its log
    (read from ``runs_dir/<name>``): for runs trained before records kept them."""
    from harmonic.utils.files import atomic_write_json
    from harmonic.utils.runlog import find_log, read_log

    path = records_dir / f"{name}.json"
    record = load_record(path)
    log = find_log(runs_dir / name)
    if not log.is_file():
        raise FileNotFoundError(f"{log}: no training log of the test-bed run {name!r}")
    watch = watch_tail(read_log(log))
    if not watch:
        raise ValueError(f"{log}: the log holds no watch statistics (watch/...) to add to {path}")
    record = {**{k: v for k, v in record.items() if not k.startswith("watch_")}, **watch}
    atomic_write_json(path, record)
    return record


#: the fields every record has (``frontier`` refuses a record without one, naming it)
REQUIRED = ("name", "seed", "iters", "lr", "AP", "AP50", "AP75", "train_minutes", "n_matched", "n_matched_above_05")


def load_record(path: Path) -> dict[str, Any]:
    """One record, checked for :data:`REQUIRED`; errors name the file and the field."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no record of a test-bed run") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON record ({err})") from None
    missing = [field for field in REQUIRED if not isinstance(record, dict) or field not in record]
    if missing:
        raise ValueError(f"{path}: record without the field(s) {missing}")
    return record


def load_records(records_dir: Path = RECORDS) -> list[dict[str, Any]]:
    """Every record of ``records_dir`` (:func:`load_record`), by file name."""
    return [load_record(path) for path in sorted(records_dir.glob("*.json"))]


#: the positives' IoU on the validation images of committed run folders (``pos-iou``), by run name
POS_IOU = ROOT / "results" / "testbed" / "pos_iou.json"
SUBSET_AP = ROOT / "results" / "testbed" / "subset_ap.json"


def _read_table(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON table ({err})") from None


def run_pos_iou(run_dirs: list[Path], out: Path = POS_IOU) -> dict[str, Any]:
    """:func:`positive_iou` of each run folder's ``checkpoints/final.pt`` on its data set's validation
    split, merged into ``out`` by run name (for runs trained elsewhere than this tool, e.g. a sweep's).
    Every folder is checked before the first is measured; ``out`` is rewritten after each."""
    import torch

    from harmonic.data import build_dataset
    from harmonic.engine.checkpoints import load_model
    from harmonic.utils.files import atomic_write_json

    for run_dir in run_dirs:
        for needed in (run_dir / "checkpoints" / "final.pt", run_dir / "config.json"):
            if not needed.is_file():
                raise FileNotFoundError(f"{needed}: missing, so {run_dir} cannot be measured (a run folder's "
                                        "checkpoints are not committed: train the run here first)")
    table = _read_table(out)
    torch.set_num_threads(1)
    for run_dir in run_dirs:
        config = json.loads((run_dir / "config.json").read_text())["config"]
        model, _ = load_model(run_dir / "checkpoints" / "final.pt")
        measured = positive_iou(model, build_dataset(config["dataset"], "val", train=False))
        table[run_dir.name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in measured.items()}
        atomic_write_json(out, dict(sorted(table.items())))  # after each run: an interruption keeps the rest
        print(run_dir.name, table[run_dir.name], flush=True)
    return table


def _same_images(subset: dict[str, Any], full: dict[str, Any], where: str) -> set[int]:
    """The image ids of COCO dict ``subset``, after checking that ``full`` holds each of them with the same
    file name, size and annotations (``where`` names the two files in the error)."""
    images = {image["id"]: image for image in full["images"]}
    anns: dict[int, list[dict[str, Any]]] = {}
    for ann in full["annotations"]:
        anns.setdefault(ann["image_id"], []).append(ann)
    mine: dict[int, list[dict[str, Any]]] = {}
    for ann in subset["annotations"]:
        mine.setdefault(ann["image_id"], []).append(ann)
    ids = set()
    for image in subset["images"]:
        if images.get(image["id"]) != image:
            raise ValueError(f"{where}: image {image['id']} ({image.get('file_name')}) is not the same in both")
        ids.add(image["id"])
    for image_id in ids:
        if (sorted(json.dumps(a, sort_keys=True) for a in mine.get(image_id, []))
                != sorted(json.dumps(a, sort_keys=True) for a in anns.get(image_id, []))):
            raise ValueError(f"{where}: the annotations of image {image_id} are not the same in both")
    return ids


def run_subset_ap(run_dirs: list[Path], subset: str = "shapes-study", out: Path = SUBSET_AP,
                  root: Path | None = None) -> dict[str, Any]:
    """COCO AP, AP50 and AP75 of each run folder's detections (``detections.json.gz``, from its evaluation)
    on the validation images of ``subset`` (a preset or an annotation file), which must be among the run's own
    validation images, the same files with the same annotations: e.g. a ``shapes-study-large`` run on
    exactly the 150 images every ``shapes-study`` run is evaluated on. Merged into ``out`` by run name,
    rewritten after each run; every folder is checked before the first is measured."""
    import gzip

    from pycocotools.coco import COCO

    from harmonic.data import resolve_dataset
    from harmonic.evaluation.coco import coco_evaluate
    from harmonic.utils.files import atomic_write_json

    for run_dir in run_dirs:
        for needed in (run_dir / "detections.json.gz", run_dir / "config.json"):
            if not needed.is_file():
                raise FileNotFoundError(f"{needed}: missing, so {run_dir} cannot be measured (a sweep's detections "
                                        "are not committed: evaluate the run here first)")
    subset_ann = resolve_dataset(subset, "val", root=root)[1]
    subset_gt = json.loads(subset_ann.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(subset_ann))
    table = _read_table(out)
    for run_dir in run_dirs:
        config = json.loads((run_dir / "config.json").read_text())["config"]
        dataset = config.get("val_dataset") or config["dataset"]
        run_ann = resolve_dataset(dataset, "val", root=root)[1]
        ids = _same_images(subset_gt, json.loads(run_ann.read_text()), f"{subset_ann} against {run_ann}")
        with gzip.open(run_dir / "detections.json.gz", "rt") as f:
            detections = [d for d in json.load(f) if d["image_id"] in ids]
        metrics = coco_evaluate(coco_gt, detections)
        table[run_dir.name] = {"subset": subset, "images": len(ids),
                               **{m: round(metrics[m], 6) for m in ("AP", "AP50", "AP75")}}
        atomic_write_json(out, dict(sorted(table.items())))
        print(run_dir.name, table[run_dir.name], flush=True)
    return table


DATA_LEVER = ROOT / "results" / "testbed" / "data_lever.json"


def _mean_sd(values: list[float]) -> dict[str, Any]:
    import numpy as np

    return {"n": len(values), "mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None}


def data_lever(runs_dir: Path = ROOT / "results" / "runs", subset_ap: Path = SUBSET_AP, out: Path | None = DATA_LEVER,
               small: str = "faster_rcnn_long", large: str = "faster_rcnn_data", baseline: str = "baseline",
               confidence: float = 0.95) -> dict[str, Any]:
    """What the training data's size alone does: sweep ``large`` is sweep ``small`` on a data set whose
    validation images include all of ``small``'s (``run_subset_ap`` scores its runs there, ``subset_ap``).

    * ``by_variant``: AP in percent on the shared images, ``small`` against ``large``, each mean ± sd over
      seeds, and their difference with a Welch t-interval (unpaired: a seed trains on other images in the
      two sweeps, so seeds do not pair);
    * ``large_paired``: each variant of ``large`` minus its baseline, paired by seed, scored on the shared
      images and on all of ``large``'s validation images, with the seed sd of each variant on both (how
      much the larger validation split narrows the comparison).
    Written to ``out`` (None: not written)."""
    from scipy import stats

    from harmonic.experiments.report import Run, load_runs, paired_differences
    from harmonic.utils.files import atomic_write_json

    table = _read_table(subset_ap)
    small_runs = load_runs(runs_dir, sweep=small)
    large_runs = load_runs(runs_dir, sweep=large)
    if not small_runs or not large_runs:
        raise ValueError(f"{runs_dir}: no finished runs of {small if not small_runs else large}")
    missing = [r.name for r in large_runs if r.name not in table]
    if missing:
        raise ValueError(f"{subset_ap}: no subset AP for {missing} (python tools/testbed.py subset-ap RUN_DIR...)")
    on_shared = [Run(r.name, r.folder, r.variant, r.seed, r.sweep, {"AP": table[r.name]["AP"]}) for r in large_runs]
    result: dict[str, Any] = {"small": small, "large": large, "shared_images": sorted({table[r.name]["images"] for r in large_runs}),
                              "confidence": confidence, "by_variant": {}, "large_paired": {}}
    for variant in sorted({r.variant for r in large_runs}, key=lambda v: (v != baseline, v)):
        before = [100 * r.metrics["AP"] for r in small_runs if r.variant == variant]
        after = [100 * r.metrics["AP"] for r in on_shared if r.variant == variant]
        row: dict[str, Any] = {"small": _mean_sd(before), "large": _mean_sd(after)}
        if len(before) > 1 and len(after) > 1:
            test = stats.ttest_ind(after, before, equal_var=False)
            low, high = test.confidence_interval(confidence)
            row["difference"] = {"mean": float(sum(after) / len(after) - sum(before) / len(before)),
                                 "low": float(low), "high": float(high), "p": float(test.pvalue)}
        result["by_variant"][variant] = row
    for label, runs in (("shared_images", on_shared), ("all_images", large_runs)):
        for variant, entry in paired_differences(runs, baseline, metrics=("AP",), confidence=confidence).items():
            ap = {k: (100 * v if isinstance(v, float) else v) for k, v in entry["AP"].items()}
            result["large_paired"].setdefault(variant, {})[label] = ap
        for variant in {r.variant for r in runs}:
            result["large_paired"].setdefault(variant, {})[f"sd_{label}"] = _mean_sd(
                [100 * r.metrics["AP"] for r in runs if r.variant == variant])["sd"]
    if out is not None:
        atomic_write_json(out, result)
    return result


RANKING = ROOT / "results" / "testbed" / "ranking.json"
#: the sweeps whose variants the ranking split compares with their baseline, and those variants: the whole
#: method of each study, and the steps of the paper's ablation on Faster R-CNN
RANKING_SWEEPS = {"default": ("harmonic_hiou", "harmonic_hiou_detached"), "long": ("harmonic_hiou",),
                  "faster_rcnn_ablation": ("harmonic", "harmonic_tc", "harmonic_tc_iou", "harmonic_tc_hiou"),
                  "faster_rcnn_long": ("harmonic_tc_hiou",), "faster_rcnn_data": ("harmonic_tc_hiou",),
                  "faster_rcnn_data_long": ("harmonic_tc_hiou",)}
#: the block of docs/testbed.md that ``ranking`` rewrites
RANKING_BEGIN, RANKING_END = "<!-- ranking:begin -->", "<!-- ranking:end -->"


def run_ranking(runs_dir: Path = ROOT / "results" / "runs", sweeps: dict[str, tuple[str, ...]] | None = None,
                out: Path = RANKING, doc: Path | None = DOC, root: Path | None = None,
                confidence: float = 0.95) -> dict[str, Any]:
    """Where each study's AP difference comes from: its boxes, or its scores' consistency inside an object's
    candidates, their ranking of background, or their ranking across objects (:mod:`harmonic.experiments.ranking`).

    Measures every finished run of the baseline and of the chosen variants of each sweep of ``sweeps``
    (sweep -> variants, default :data:`RANKING_SWEEPS`) from its committed detections, on its own
    validation images (a run already in ``out``, measured from the same detections under the same
    ``ranking.VERSION``, is not measured again; ``out`` is rewritten after each),
    then writes per sweep the paired split into ``out``, the figure beside it (``ranking.png``) and the
    table into the ranking block of ``doc``."""
    from harmonic.experiments.ranking import (
        baseline_levels,
        dataset_truth,
        is_current,
        markdown_split,
        measure_run,
        paired_split,
        plot_split,
        setting_of,
    )
    from harmonic.experiments.report import load_runs
    from harmonic.utils.figures import save_figure
    from harmonic.utils.files import atomic_write_json, atomic_write_text

    sweeps = RANKING_SWEEPS if sweeps is None else sweeps
    text = doc.read_text() if doc is not None else None
    if text is not None and (RANKING_BEGIN not in text or RANKING_END not in text):
        raise ValueError(f"{doc}: no {RANKING_BEGIN} ... {RANKING_END} block to write the split into")
    measured: dict[str, Any] = _read_table(out).get("runs", {})
    truth = dataset_truth(root)
    studies = []
    for sweep, variants in sweeps.items():
        runs = [r for r in load_runs(runs_dir, sweep=sweep) if r.variant in ("baseline", *variants)]
        for run in runs:
            if (run.folder / "detections.json.gz").is_file() and not is_current(run, measured.get(run.name)):
                measured[run.name] = measure_run(run, truth)
                atomic_write_json(out, {"runs": dict(sorted(measured.items()))})
                print(run.name, measured[run.name]["AP"], measured[run.name]["AP_ideal"], flush=True)
        split = paired_split(runs, measured, variants, confidence)
        if split:
            studies.append({"sweep": sweep, "setting": setting_of(runs[0]),
                            "baseline": baseline_levels(runs, measured, variants), "variants": split})
    if not studies:
        raise ValueError(f"{runs_dir}: no pair of a baseline and a variant of {sorted(sweeps)} with detections")
    figure = plot_split(studies)
    result = {"note": "oracle split [D]: percent AP points, variant minus baseline paired by seed "
                      "(harmonic.experiments.ranking)", "confidence": confidence, "studies": studies,
              "runs": dict(sorted(measured.items()))}
    atomic_write_json(out, result)
    save_figure(figure, out.with_suffix(".png"), dpi=100)
    if text is not None:
        head, rest = text.split(RANKING_BEGIN, 1)
        atomic_write_text(doc, head + RANKING_BEGIN + "\n" + markdown_split(studies) + "\n" + RANKING_END
                          + rest.split(RANKING_END, 1)[1])
    return result


#: the data sets of docs/testbed.md by their generator overrides (the shapes-study preset's data is D3)
DATA_NAMES = {
    "{}": "default",
    json.dumps({"max_objects": 4, "max_occlusion": 0.5, "min_object_size": 0.2, "overlap_prob": 0.3},
               sort_keys=True): "D2",
    json.dumps({"max_object_size": 0.7, "max_objects": 3, "max_occlusion": 0.4, "min_object_size": 0.25,
                "overlap_prob": 0.3}, sort_keys=True): "D3",
    json.dumps({"max_object_size": 0.7, "max_objects": 2, "max_occlusion": 0.3, "min_object_size": 0.3,
                "overlap_prob": 0.3}, sort_keys=True): "D4",
}
#: the named data presets by the names above (shapes-study-large: D3 with 6000 training and 600 validation images)
PRESET_DATA = {"shapes": "default", "shapes-study": "D3", "shapes-study-large": "D3-large"}


def loss_variant(detector: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(name, rest)``: the loss options of ``detector`` named as the sweeps' variant with exactly those
    options (:data:`harmonic.experiments.sweeps.VARIANTS`; their JSON where none matches) and the
    detector overrides that are not loss options."""
    from harmonic.experiments.sweeps import VARIANTS

    loss_keys = {key for options in VARIANTS.values() for key in options}
    options = {key: value for key, value in detector.items() if key in loss_keys}
    rest = {key: value for key, value in detector.items() if key not in loss_keys}
    options.setdefault("loss", "baseline")
    name = next((variant for variant, known in VARIANTS.items() if known == options), None)
    return name or json.dumps(options, sort_keys=True), rest


#: the TrainConfig fields a run sets to say how it is executed, not what it computes: left out of its setting
BOOKKEEPING = frozenset({"checkpoint_every", "log_every"})
#: the tool's own run-time settings (a --train override that repeats one changes nothing)
TOOL_RUNTIME = {"num_threads": 1}


def setting_of(record: dict[str, Any]) -> dict[str, Any]:
    """What a run was, without its seed: data, backbone (the one it trained with, as the record keeps it),
    loss (:func:`loss_variant`), image size, length, lr, and any other override (JSON, "" for none). The
    ``shapes-study`` preset's own data is D3. Training overrides of :data:`BOOKKEEPING` fields, and those
    that repeat the tool's :data:`TOOL_RUNTIME`, are not part of the setting."""
    detector = dict(record.get("detector") or {})
    data = json.dumps(record.get("data") or {}, sort_keys=True)
    if not record.get("data") and record.get("preset") in PRESET_DATA:
        data = PRESET_DATA[record["preset"]]
    backbone = record["pretrained_backbone"] if "pretrained_backbone" in record else detector.get("pretrained_backbone")
    detector.pop("pretrained_backbone", None)
    detector.pop("max_size", None)
    px = detector.pop("min_size", None) or record.get("min_size")
    loss, rest = loss_variant(detector)
    train = {k: v for k, v in (record.get("train") or {}).items()
             if k not in BOOKKEEPING and not (k in TOOL_RUNTIME and TOOL_RUNTIME[k] == v)}
    return {"data": DATA_NAMES.get(data, data), "backbone": backbone or "scratch", "loss": loss, "px": px,
            "iters": record["iters"], "lr": record["lr"],
            "other": json.dumps({**rest, **train}, sort_keys=True) if rest or train else ""}


def _by_setting(records: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """The records by the JSON of :func:`setting_of`, then by seed; the same seed twice in one setting is an
    error naming both runs (a repeat would count twice in a spread and once in a pairing)."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for record in records:
        seeds = out.setdefault(json.dumps(setting_of(record), sort_keys=True), {})
        if record["seed"] in seeds:
            raise ValueError(f"records {seeds[record['seed']]['name']!r} and {record['name']!r} are the same setting "
                             f"and seed {record['seed']}: remove or rename one")
        seeds[record["seed"]] = record
    return out


def _as_run(record: dict[str, Any], variant: str):
    """A record as :class:`harmonic.experiments.report.Run` (AP in percent), for the report's statistics."""
    from harmonic.experiments.report import Run

    return Run(record["name"], Path(record["name"]), variant, int(record["seed"]), None,
               {metric: record[metric] for metric in ("AP", "AP50", "AP75")})


def _pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of one setting pooled over seeds: ``seeds``; AP / AP50 / AP75 mean and sd over seeds
    (:func:`harmonic.experiments.report.summarize`: ddof=1, None for one seed); ``minutes`` a run (min,
    max); ``pos_iou`` mean (None where a run lacks it); the matched detections above 0.5 and in all
    (summed); the ``watch_<key>`` means where every run has them."""
    import statistics

    from harmonic.experiments.report import summarize

    runs = sorted(runs, key=lambda r: r["seed"])
    entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
    (summary,) = summarize([_as_run(r, "pooled") for r in runs], metrics=("AP", "AP50", "AP75")).values()
    for metric, stats_ in summary.items():
        entry[metric] = round(stats_["mean"], 2)
        entry[f"{metric}_sd"] = None if stats_["std"] is None else round(stats_["std"], 2)
    entry["minutes"] = [round(min(r["train_minutes"] for r in runs), 2), round(max(r["train_minutes"] for r in runs), 2)]
    ious = [r.get("pos_iou") for r in runs]
    entry["pos_iou"] = None if None in ious else round(statistics.fmean(ious), 4)
    entry["matched_above_05"] = sum(r["n_matched_above_05"] for r in runs)
    entry["matched"] = sum(r["n_matched"] for r in runs)
    for key in WATCH_KEYS:
        values = [r[f"watch_{key}"] for r in runs if f"watch_{key}" in r]
        if len(values) == len(runs):
            entry[f"watch_{key}"] = round(statistics.fmean(values), 4)
    return entry


def frontier_groups(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records grouped by :func:`setting_of` (seeds pooled, :func:`_pool`), each with its ``runs``' names.
    Sorted by data, backbone, loss, image size, length, lr."""
    out = [{**json.loads(key), **_pool(list(seeds.values())), "runs": sorted(r["name"] for r in seeds.values())}
           for key, seeds in _by_setting(records).items()]
    return sorted(out, key=lambda g: (g["data"], g["backbone"], g["loss"], g["px"] or 0, g["iters"], g["lr"], g["other"]))


#: detector fields of the sweeps' variants that change the network, not the loss: a variant's reference is
#: the baseline loss on the same network (``harmonic_hiou_gn`` against ``baseline_gn``)
NETWORK_FIELDS = ("head_norm",)


def reference_variant(variant: str) -> str:
    """The variant a loss is paired with: the sweeps' baseline variant with the same :data:`NETWORK_FIELDS`
    (``"baseline"`` for a loss that changes none, or for options no sweep variant names)."""
    from harmonic.experiments.sweeps import VARIANTS

    options = VARIANTS.get(variant, {})
    wanted = {"loss": "baseline", **{key: options[key] for key in NETWORK_FIELDS if key in options}}
    return next((name for name, known in VARIANTS.items() if known == wanted), "baseline")


def _reference_of(variant: str) -> str | None:
    """What ``variant`` is paired with: its :func:`reference_variant`; a baseline on another network (itself
    a reference) against the plain ``"baseline"``, which is paired with nothing."""
    reference = reference_variant(variant)
    if reference != variant:
        return reference
    return None if variant == "baseline" else "baseline"


def paired_loss_contrasts(records: list[dict[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """Every loss against the baseline of the same setting (all but the loss) on the same network
    (:func:`reference_variant`; a baseline on another network against the plain baseline), paired by seed:
    the mean AP difference, its t-interval, the sd of the differences and the minimum detectable effect at
    that number of pairs (power 0.8), where there are at least two pairs
    (:func:`harmonic.experiments.report.paired_differences`). ``reference`` names the baseline each row is
    paired with."""
    from harmonic.experiments.report import paired_differences

    by_rest: dict[str, list] = {}
    for key, seeds in _by_setting(records).items():
        setting = json.loads(key)
        loss = setting.pop("loss")
        by_rest.setdefault(json.dumps(setting, sort_keys=True), []).extend(_as_run(r, loss) for r in seeds.values())
    out = []
    for key, runs in sorted(by_rest.items()):
        for reference in sorted({ref for run in runs if (ref := _reference_of(run.variant)) is not None}):
            group = [run for run in runs if run.variant == reference or _reference_of(run.variant) == reference]
            base_seeds = {run.seed for run in group if run.variant == reference}
            for loss, entry in paired_differences(group, baseline=reference, metrics=("AP",), confidence=confidence).items():
                if entry["AP"]["n"] < 2:
                    continue
                seeds = sorted({run.seed for run in group if run.variant == loss} & base_seeds)
                out.append({**json.loads(key), "loss": loss, "reference": reference, "seeds": seeds,
                            **{field: round(entry["AP"][name], 2) for field, name in
                               (("diff", "mean"), ("low", "low"), ("high", "high"), ("sd", "sd"), ("mde", "mde"))}})
    return out


#: the larger splits of the D3 data whose committed studies the frontier also draws, with what they hold
FRONTIER_DATA = {"D3-large": "10x the training images"}
#: the detectors other than RetinaNet whose committed sweeps the frontier draws, and the variants it takes
#: from them: the baseline and the method as the paper's ablation builds it
FRONTIER_STUDIES = {"faster_rcnn_ablation": ("baseline", "harmonic_tc_hiou"),
                    "faster_rcnn_long": ("baseline", "harmonic_tc_hiou"),
                    "faster_rcnn_data": ("baseline", "harmonic_tc_hiou"),
                    "faster_rcnn_data_long": ("baseline", "harmonic_tc_hiou")}


def _arch_name(arch: str) -> str:
    """A detector's name as the report writes it (``report.ARCH_NAMES``)."""
    from harmonic.experiments.report import ARCH_NAMES

    return ARCH_NAMES.get(arch, arch)


def study_groups(runs_dir: Path = ROOT / "results" / "runs", sweep: str = "default",
                 pos_iou: Path = POS_IOU, variants: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """The committed runs of a sweep (``report.load_runs``: variant and seed from each run.json) as
    :func:`frontier_groups` entries, one per variant (only ``variants`` where given); data, backbone, image
    size, length, lr and, for a detector other than RetinaNet, its ``arch`` from each run's config.json.
    Minutes are the logged iteration times summed; the positives' IoU on the validation images comes from
    ``pos_iou`` (:func:`run_pos_iou`; None where a run has not been measured)."""
    from harmonic.experiments.report import load_runs
    from harmonic.utils.runlog import read_log

    measured = _read_table(pos_iou)
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for run in load_runs(runs_dir, sweep=sweep):
        if variants is not None and run.variant not in variants:
            continue
        config = json.loads((run.folder / "config.json").read_text())["config"]
        detector = config["detector"]
        if any(run.metrics.get(m) is None for m in ("AP", "AP50", "AP75")):
            raise ValueError(f"{run.folder / 'metrics.json'}: no COCO AP, AP50 and AP75")
        scores = json.loads((run.folder / "score_iou.json").read_text())["scores"]
        log = read_log(run.folder)
        setting = {"data": PRESET_DATA.get(config["dataset"], config["dataset"]),
                   "backbone": portable_backbone(detector.get("pretrained_backbone")) or "scratch",
                   "loss": f"{run.variant} (`make sweep SWEEP={sweep}`)", "variant": run.variant, "px": detector.get("min_size"),
                   "iters": config["max_iters"], "lr": config["lr"], "other": ""}
        if setting["data"] != "D3":  # another data set's study: named in its label (the frontier's data is D3)
            setting["loss"] = f"{run.variant} on {setting['data']} (`make sweep SWEEP={sweep}`)"
        arch = detector.get("arch", "retinanet")
        if arch != "retinanet":  # its own line in the figure, never joined to RetinaNet's
            setting["arch"] = arch
            setting["loss"] = f"{_arch_name(arch)} {setting['loss']}"
        by_setting.setdefault(json.dumps(setting, sort_keys=True), []).append({
            "name": run.name, "seed": run.seed, **{m: 100 * run.metrics[m] for m in ("AP", "AP50", "AP75")},
            "train_minutes": sum(r["time"] for r in log) / 60,
            "pos_iou": measured.get(run.name, {}).get("pos_iou"),
            "n_matched_above_05": sum(x > 0.5 for x in scores), "n_matched": len(scores), **watch_tail(log)})
    return [{**json.loads(key), **_pool(runs), "runs": sorted(r["name"] for r in runs)}
            for key, runs in sorted(by_setting.items())]


def _fmt_sd(mean: float, sd: float | None) -> str:
    return f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"


def markdown_frontier(groups: list[dict[str, Any]], contrasts: list[dict[str, Any]]) -> str:
    """The frontier of docs/testbed.md: the groups of the D3 data with the shapes backbone at 160 px and lr
    0.02 (the default study's setting) by loss and length (:func:`frontier_groups`, with
    :func:`study_groups`' rows), then the paired loss contrasts."""
    rows = _frontier_rows(groups)
    lines = ["| loss | iterations | seeds | minutes a run | AP (mean ± sd over seeds) | AP50 | AP75 | positives' IoU "
             "(validation) | matched detections above 0.5 | share with y > 1.2785 (last 10%) | share with dF/dx < 0 "
             "(last 10%) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in rows:
        y_share, reversed_ = ("" if g.get(f"watch_{key}") is None else f"{g[f'watch_{key}']:.3f}"
                              for key in ("y_over_threshold_share", "reversed_share"))
        pos_iou = "not measured" if g["pos_iou"] is None else f"{g['pos_iou']:.3f}"
        lines.append(
            f"| {g['loss']} | {g['iters']} | {len(g['seeds'])} | {g['minutes'][0]:.1f}-{g['minutes'][1]:.1f} | "
            f"{_fmt_sd(g['AP'], g['AP_sd'])} | {g['AP50']:.1f} | {g['AP75']:.1f} | {pos_iou} | "
            f"{g['matched_above_05']} of {g['matched']} | {y_share} | {reversed_} |")
    if contrasts:
        lines += ["", "| setting | loss − its baseline, paired by seed | pairs | AP difference [95% interval] | "
                  "sd of the differences | minimum detectable effect (power 0.8) |", "|---|---|---|---|---|---|"]
        for c in contrasts:
            other = f", {c['other']}" if c["other"] else ""
            lines.append(f"| {c['data']}, {c['backbone']} backbone, {c['px']} px, lr {c['lr']}, {c['iters']} iterations"
                         f"{other} | {c['loss']} − {c['reference']} | "
                         f"{len(c['seeds'])} | {c['diff']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] | {c['sd']:.2f} | "
                         f"{c['mde']:.2f} |")
    return "\n".join(lines)


def _frontier_rows(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups of the default study's setting (D3, shapes backbone, 160 px, lr 0.02, nothing else
    changed), with the committed studies on its larger split (:data:`FRONTIER_DATA`), by length, the test
    bed's runs before the committed study's at the same length."""
    return sorted((g for g in groups if (g["data"] == "D3" or (g["data"] in FRONTIER_DATA and "variant" in g))
                   and g["backbone"] == "shapes" and g["px"] == 160 and g["lr"] == 0.02 and not g["other"]),
                  key=lambda g: (g["iters"], g["pos_iou"] is None, g["loss"]))


def plot_frontier(groups: list[dict[str, Any]], path: Path | None = None, dpi: int = 100):
    """AP (mean ± sd over seeds) against the length of training, one line per loss of
    :func:`_frontier_rows` (the committed study's variants as their own points; another detector's
    committed studies, :data:`FRONTIER_STUDIES`, as that detector's own lines)."""
    from harmonic.experiments.figures import plot_metric_vs_param
    from harmonic.utils.figures import caption, finish, new_figure

    series: dict[str, list[dict[str, Any]]] = {}
    rows = _frontier_rows(groups)
    for g in rows:  # the test bed's runs first; a committed study's variant (its group names the "variant") then
        if "variant" not in g:  # joins the line of its loss where that line has no point at its length
            series.setdefault(g["loss"], []).append(g)
    for g in rows:
        if "variant" in g:
            base = g["variant"] if "arch" not in g else f"{_arch_name(g['arch'])} {g['variant']}"
            base += f" on {g['data']}" if g["data"] != "D3" else ""
            # another detector's variants make their own line across the lengths of its studies
            joins = (base in series or "arch" in g) and all(other["iters"] != g["iters"] for other in series.get(base, []))
            series.setdefault(base if joins else g["loss"], []).append(g)
    for line in series.values():
        line.sort(key=lambda g: g["iters"])
    fig = new_figure((6.4, 4.4))
    ax = fig.add_subplot()
    for label, line in series.items():
        plot_metric_vs_param([g["iters"] for g in line], [g["AP"] for g in line], [g["AP_sd"] for g in line],
                             f"{label.replace('`', '')}, seeds: {', '.join(str(len(g['seeds'])) for g in line)}",
                             "training iterations",
                             ax=ax)
    lengths = sorted({g["iters"] for g in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_title("the test bed's frontier: AP against training length [D]", fontsize=10)
    detectors = "RetinaNet" + "".join(sorted({f" and {_arch_name(g['arch'])}" for g in rows if "arch" in g}))
    data = "shapes-study data" + ("".join(sorted({f" ({g['data']}: {FRONTIER_DATA[g['data']]})" for g in rows
                                                 if g["data"] != "D3"})))
    caption(fig, f"{detectors} R18-FPN, shapes-pretrained backbone, {data},\n160 px, lr 0.02, bfloat16, 2-core CPU")
    return finish(fig, path, dpi)


#: the block of docs/testbed.md that ``frontier`` rewrites
BEGIN, END = "<!-- frontier:begin -->", "<!-- frontier:end -->"


def frontier(doc: Path | None = DOC, *, records_dir: Path = RECORDS,
             out: Path = ROOT / "results" / "testbed" / "frontier.json", runs_dir: Path = ROOT / "results" / "runs") -> Path:
    """Collect the records of ``records_dir`` into ``out`` (runs, groups, paired loss contrasts), with the
    default study's committed runs of ``runs_dir`` as groups too; draw :func:`plot_frontier` beside ``out``
    (``frontier.png``) and rewrite the frontier block of ``doc`` (docs/testbed.md) from them. Returns ``out``."""
    from harmonic.utils.figures import save_figure
    from harmonic.utils.files import atomic_write_json, atomic_write_text

    records = load_records(records_dir)
    groups, contrasts = frontier_groups(records) + study_groups(runs_dir), paired_loss_contrasts(records)
    for sweep, variants in FRONTIER_STUDIES.items():  # the other detectors' committed studies, as their own lines
        groups += study_groups(runs_dir, sweep=sweep, variants=variants)
    text = doc.read_text() if doc is not None else None
    if text is not None and (BEGIN not in text or END not in text):
        raise ValueError(f"{doc}: no {BEGIN} ... {END} block to write the frontier into")
    figure = plot_frontier(groups)  # everything computed before the first write: no file left out of step
    atomic_write_json(out, {"note": "every test-bed run [D]: 1 torch thread, bf16, channels_last, 2-core CPU shared "
                                    "with one other run", "runs": records, "groups": groups,
                            "paired_loss_contrasts": contrasts})
    save_figure(figure, out.with_suffix(".png"), dpi=100)
    if text is not None:
        head, rest = text.split(BEGIN, 1)
        atomic_write_text(doc, head + BEGIN + "\n" + markdown_frontier(groups, contrasts) + "\n" + END
                          + rest.split(END, 1)[1])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("name")
    r.add_argument("--data", default="{}")
    r.add_argument("--detector", default="{}")
    r.add_argument("--train", default="{}")
    r.add_argument("--iters", type=int, default=1200)
    r.add_argument("--lr", type=float, default=0.02)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--preset", default="shapes-cpu", choices=("shapes-cpu", "shapes-study"),
                   help="the training preset the overrides apply to (shapes-study: the default study's, with its "
                        "own data unless --data is given, which overrides the `shapes` generator as for shapes-cpu)")
    sub.add_parser("frontier", help="collect the records into results/testbed/frontier.json and docs/testbed.md")
    q = sub.add_parser("pos-iou", help="measure the positives' IoU of committed run folders (results/testbed/pos_iou.json)")
    q.add_argument("run_dirs", nargs="+", type=Path)
    a = sub.add_parser("subset-ap", help="AP of run folders' detections on another data set's validation images, "
                       "which must be among theirs (results/testbed/subset_ap.json)")
    a.add_argument("run_dirs", nargs="+", type=Path)
    a.add_argument("--subset", default="shapes-study", help="a preset or annotation file (default: shapes-study)")
    sub.add_parser("data-lever", help="faster_rcnn_long against faster_rcnn_data on their shared validation images "
                   "(results/testbed/data_lever.json)")
    sub.add_parser("ranking", help="the method's AP difference split into its boxes' part and its scores' parts, by "
                   "oracle re-scoring of the committed detections (results/testbed/ranking.json)")
    w = sub.add_parser("rewatch", help="add the watch statistics to records of runs trained before they were kept")
    w.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.name, json.loads(args.data), json.loads(args.detector), json.loads(args.train), args.iters, args.lr,
            args.seed, args.preset)
    elif args.command == "pos-iou":
        run_pos_iou(args.run_dirs)
    elif args.command == "subset-ap":
        run_subset_ap(args.run_dirs, args.subset)
    elif args.command == "data-lever":
        print(json.dumps(data_lever(), indent=1))
    elif args.command == "ranking":
        for study in run_ranking()["studies"]:
            print(study["setting"], {v: row["parts"]["AP"] for v, row in study["variants"].items()})
    elif args.command == "rewatch":
        for name in args.names:
            print(json.dumps(rewatch(name)))
    else:
        print(frontier())
    return 0


if __name__ == "__main__":
    sys.exit(main())
