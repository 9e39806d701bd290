"""Prediction-consistency metrics: how well a detector's scores rank its boxes.

The paper's subject [A]: classification and box regression are trained independently, so a detector
makes *inconsistent* predictions (a high score with a poor box, a low score with a good box), and NMS,
which keeps the highest-scored box of a cluster, then discards better-localized boxes. This module
measures that directly, next to the usual COCO AP.

Inputs are described in :mod:`harmonic.evaluation.predictions`. Crowd annotations (``iscrowd=1``) are
ignore regions, as in COCOeval.

The paper's own measure of consistency was not recovered; the definitions below are this project's
choices, tagged [D], stated where they are computed and checked by ``tests/evaluation/test_consistency.py``:

* A detection's **IoU** is its IoU with the best-overlapping ground-truth object of its own class in its
  image (the max over those objects, 0 when there is none), whether or not it is matched to that object.
  This is the localization quality its score should predict.
* **Matching** is COCO's greedy rule at one threshold: per image, detections in descending score order,
  each takes the unmatched same-class object of highest IoU if that IoU >= ``iou_threshold``; every
  object is matched at most once; crowd regions are never matched. A detection left unmatched that lies
  on a same-class crowd region (COCO's crowd overlap: intersection / detection area >=
  ``iou_threshold``) is *ignored*, as COCOeval ignores it, and left out of every consistency statistic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from scipy import stats

from harmonic.evaluation.predictions import (
    CANDIDATE_KEYS,
    ImagePredictions,
    check_images,
    check_mapping_against_gt,
    label_map,
    normalize_predictions,
    valid_xywh,
)

# --------------------------------------------------------------------------------------------------
# Matching detections to objects
# --------------------------------------------------------------------------------------------------


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes [n, 4] x [m, 4] -> [n, m], float64; 0 where the union is empty."""
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    inter = _intersection(a, b)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    wh = np.clip(np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2]), 0, None)
    return wh[..., 0] * wh[..., 1]


def _same_class_iou(boxes: np.ndarray, labels: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray) -> np.ndarray:
    """IoU [n, g] with -1 for pairs of different classes (so that they never pass a threshold)."""
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return np.zeros((len(boxes), len(gt_boxes)))
    iou = _box_iou(boxes, gt_boxes)
    return np.where(labels[:, None] == gt_labels[None, :], iou, -1.0)


@dataclass
class _ImageTruth:
    boxes: np.ndarray  # float64 [g, 4] xyxy, non-crowd objects
    labels: np.ndarray  # int64 [g] contiguous labels
    ann_ids: np.ndarray  # int64 [g]
    crowd_boxes: np.ndarray  # float64 [k, 4]
    crowd_labels: np.ndarray  # int64 [k]


def _image_truth(coco_gt: COCO, image_id: int, cat_to_label: Mapping[int, int]) -> _ImageTruth:
    """The image's annotations of the mapped categories (others cannot be predicted and are skipped)."""
    objects, crowds = [], []
    for ann in coco_gt.imgToAnns.get(image_id, []):
        label = cat_to_label.get(ann.get("category_id"))
        if label is None:
            continue
        bbox = ann.get("bbox")
        if not valid_xywh(bbox):
            raise ValueError(
                f"coco_gt annotation {ann.get('id')!r}: 'bbox' must be 4 finite numbers [x, y, w, h] with w, h >= 0, got {bbox!r}"
            )
        x, y, w, h = (float(v) for v in bbox)
        row = (x, y, x + w, y + h, label, int(ann.get("id", -1)))
        (crowds if ann.get("iscrowd", 0) else objects).append(row)
    obj = np.asarray(objects, dtype=np.float64).reshape(-1, 6)
    crowd = np.asarray(crowds, dtype=np.float64).reshape(-1, 6)
    return _ImageTruth(
        boxes=obj[:, :4], labels=obj[:, 4].astype(np.int64), ann_ids=obj[:, 5].astype(np.int64),
        crowd_boxes=crowd[:, :4], crowd_labels=crowd[:, 4].astype(np.int64),
    )


def _greedy_match(iou: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """COCO's greedy assignment at one threshold: detections by descending score (ties: input order),
    each takes the unmatched object of highest IoU >= ``iou_threshold``. Returns the matched object's
    column per detection, -1 when unmatched."""
    n, g = iou.shape
    match = np.full(n, -1, dtype=np.int64)
    if n == 0 or g == 0:
        return match
    can_match = (iou >= iou_threshold).any(axis=1)
    taken = np.zeros(g, dtype=bool)
    for i in np.argsort(-scores, kind="stable"):
        if not can_match[i]:
            continue
        row = np.where(taken, -1.0, iou[i])
        j = int(row.argmax())
        if row[j] >= iou_threshold:
            match[i] = j
            taken[j] = True
    return match


@dataclass
class DetectionMatches:
    """Per-detection arrays (length N, all detections of all images, in input order) and counts.

    ``ious`` is each detection's IoU with its best-overlapping same-class non-crowd object (max IoU, 0
    if none), whether or not it is matched; ``matched`` says whether the greedy rule gave it an object
    (``gt_ann_ids`` its annotation id, -1 otherwise); ``ignored`` marks unmatched detections on a
    same-class crowd region. ``n_objects`` counts the non-crowd objects of the mapped categories in the
    evaluated images.
    """

    image_ids: np.ndarray  # int64 [N]
    labels: np.ndarray  # int64 [N]
    scores: np.ndarray  # float64 [N]
    ious: np.ndarray  # float64 [N]
    matched: np.ndarray  # bool [N]
    gt_ann_ids: np.ndarray  # int64 [N]
    ignored: np.ndarray  # bool [N]
    n_objects: int
    n_images: int

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def _check_unit(name: str, value: float, *, low_open: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or value > 1 or (low_open and value == 0):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")
    return value


def _match(
    preds: Sequence[ImagePredictions], coco_gt: COCO, mapping: Mapping[int, int], iou_threshold: float
) -> tuple[DetectionMatches, dict[int, _ImageTruth]]:
    cat_to_label = {cat: label for label, cat in mapping.items()}
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("image_ids", "labels", "scores", "ious", "matched", "gt_ann_ids", "ignored")}
    truths: dict[int, _ImageTruth] = {}
    n_objects = 0
    for pred in preds:
        truth = _image_truth(coco_gt, pred.image_id, cat_to_label)
        truths[pred.image_id] = truth
        n_objects += len(truth.labels)
        iou = _same_class_iou(pred.boxes, pred.labels, truth.boxes, truth.labels)
        best = np.clip(iou.max(axis=1), 0, None) if iou.shape[1] else np.zeros(len(pred.scores))
        match = _greedy_match(iou, pred.scores, iou_threshold)
        ignored = np.zeros(len(pred.scores), dtype=bool)
        if len(truth.crowd_labels) and len(pred.scores):
            # COCO's overlap with a crowd region: intersection / detection area.
            area = np.clip(pred.boxes[:, 2] - pred.boxes[:, 0], 0, None) * np.clip(pred.boxes[:, 3] - pred.boxes[:, 1], 0, None)
            inter = _intersection(pred.boxes, truth.crowd_boxes)
            iof = np.divide(inter, area[:, None], out=np.zeros_like(inter), where=area[:, None] > 0)
            iof = np.where(pred.labels[:, None] == truth.crowd_labels[None, :], iof, -1.0)
            ignored = (match < 0) & (iof.max(axis=1) >= iou_threshold)
        parts["image_ids"].append(np.full(len(pred.scores), pred.image_id, dtype=np.int64))
        parts["labels"].append(pred.labels)
        parts["scores"].append(pred.scores)
        parts["ious"].append(best)
        parts["matched"].append(match >= 0)
        parts["gt_ann_ids"].append(np.where(match >= 0, truth.ann_ids[np.clip(match, 0, None)] if len(truth.ann_ids) else -1, -1))
        parts["ignored"].append(ignored)
    dtypes = {"image_ids": np.int64, "labels": np.int64, "scores": np.float64, "ious": np.float64,
              "matched": bool, "gt_ann_ids": np.int64, "ignored": bool}
    arrays = {k: (np.concatenate(v).astype(dtypes[k]) if v else np.zeros(0, dtype=dtypes[k])) for k, v in parts.items()}
    return DetectionMatches(**arrays, n_objects=n_objects, n_images=len(preds)), truths


def match_detections(
    predictions: Iterable[Mapping[str, Any]],
    coco_gt: COCO,
    label_to_cat_id: Mapping[int, int],
    iou_threshold: float = 0.5,
) -> DetectionMatches:
    """Match every detection to the ground truth of its image and class (module docstring, [D]).

    Per image, detections are taken in descending score order; each is matched to the unmatched
    non-crowd object of its class with the highest IoU, if that IoU >= ``iou_threshold`` (each object
    at most once; crowd regions never). Independently of matching, ``ious`` holds each detection's IoU
    with its best same-class object (0 if the image has none). Only the images in ``predictions`` are
    visited; an image with no detections is still counted in ``n_objects``. Returns
    :class:`DetectionMatches`.
    """
    iou_threshold = _check_unit("iou_threshold", iou_threshold, low_open=True)
    mapping = label_map(label_to_cat_id)
    preds = normalize_predictions(predictions, mapping)
    check_images(coco_gt, [p.image_id for p in preds])
    check_mapping_against_gt(coco_gt, mapping)
    return _match(preds, coco_gt, mapping, iou_threshold)[0]


def score_iou_pairs(
    predictions: Iterable[Mapping[str, Any]],
    coco_gt: COCO,
    label_to_cat_id: Mapping[int, int],
    *,
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ious)`` of the matched detections (float64 arrays of equal length), for the
    score-vs-IoU figure: the population of the ``pearson`` / ``spearman`` numbers of
    :func:`consistency_metrics`. A consistent detector puts these points on a rising curve."""
    matches = match_detections(predictions, coco_gt, label_to_cat_id, iou_threshold)
    return matches.scores[matches.matched].copy(), matches.ious[matches.matched].copy()


# --------------------------------------------------------------------------------------------------
# Consistency
# --------------------------------------------------------------------------------------------------


def _correlations(scores: np.ndarray, ious: np.ndarray) -> tuple[float | None, float | None]:
    """Pearson and Spearman correlation of score and IoU; ``None`` for fewer than 3 points or a
    constant input (where the coefficient is undefined)."""
    if len(scores) < 3 or np.ptp(scores) == 0 or np.ptp(ious) == 0:
        return None, None
    pearson = float(stats.pearsonr(scores, ious)[0])
    spearman = float(stats.spearmanr(scores, ious)[0])
    # Clip float round-off just outside [-1, 1]; a NaN here would be a bug, never written silently.
    if not (math.isfinite(pearson) and math.isfinite(spearman)):
        raise FloatingPointError(f"correlation is not finite (pearson={pearson}, spearman={spearman})")
    return max(-1.0, min(1.0, pearson)), max(-1.0, min(1.0, spearman))


def _share(mask: np.ndarray, population: np.ndarray) -> float | None:
    n = int(population.sum())
    return float((mask & population).sum() / n) if n else None


def _nms_localization(
    preds: Sequence[ImagePredictions], truths: Mapping[int, _ImageTruth], iou_threshold: float, tolerance: float
) -> dict[str, float | int | None]:
    """The ``nms_*`` entries of :func:`consistency_metrics` (project definition, [D]).

    An object is *eligible* when a pre-NMS candidate of its class has IoU >= ``iou_threshold`` with it
    (best candidate IoU: the max). Its *covering* detection is the highest-scored final detection of its
    class with IoU >= ``iou_threshold``; success when that IoU >= best candidate IoU - ``tolerance``.
    Eligible but uncovered (NMS or top-k removed every good candidate) is a failure; the gap is over
    covered objects only, and can be negative when a final box is not one of the candidates (box voting,
    refinement after NMS).
    """
    best_all, kept_all, covered_all = [], [], []
    for pred in preds:
        if pred.candidates is None:
            continue
        truth = truths[pred.image_id]
        if len(truth.labels) == 0:
            continue
        cand_boxes, _, cand_labels = pred.candidates
        cand_iou = _same_class_iou(cand_boxes, cand_labels, truth.boxes, truth.labels)
        best = cand_iou.max(axis=0) if len(cand_boxes) else np.full(len(truth.labels), -1.0)
        eligible = best >= iou_threshold
        if not eligible.any():
            continue
        final_iou = _same_class_iou(pred.boxes, pred.labels, truth.boxes, truth.labels)
        if len(pred.boxes):
            covers = final_iou >= iou_threshold
            ranked = np.where(covers, pred.scores[:, None], -np.inf)
            top = ranked.argmax(axis=0)
            covered = covers.any(axis=0)
            kept = final_iou[top, np.arange(len(truth.labels))]
        else:
            covered = np.zeros(len(truth.labels), dtype=bool)
            kept = np.zeros(len(truth.labels))
        best_all.append(best[eligible])
        kept_all.append(kept[eligible])
        covered_all.append(covered[eligible])
    if not best_all:
        return {"nms_best_box_rate": None, "nms_mean_iou_gap": None, "nms_n_objects": 0, "nms_n_covered": 0}
    best, kept, covered = np.concatenate(best_all), np.concatenate(kept_all), np.concatenate(covered_all)
    success = covered & (kept >= best - tolerance)
    gap = best[covered] - kept[covered]
    return {
        "nms_best_box_rate": float(success.mean()),
        "nms_mean_iou_gap": float(gap.mean()) if len(gap) else None,
        "nms_n_objects": int(len(best)),
        "nms_n_covered": int(covered.sum()),
    }


def consistency_metrics(
    predictions: Iterable[Mapping[str, Any]],
    coco_gt: COCO,
    label_to_cat_id: Mapping[int, int],
    *,
    iou_threshold: float = 0.5,
    high_score: float = 0.5,
    low_score: float = 0.3,
    good_iou: float = 0.75,
    poor_iou: float = 0.5,
    min_iou: float = 0.1,
    nms_tolerance: float = 1e-6,
) -> dict[str, Any]:
    """Prediction consistency between classification score and localization quality (project
    definitions, [D]; the paper's own measure was not recovered). Returns a JSON-ready dict:

    * ``pearson``, ``spearman``: correlation of score and IoU over the *matched* detections (IoU >=
      ``iou_threshold`` with an object they took), the detections that survive as true positives, where
      the score should rank the boxes; ``pearson_all``, ``spearman_all``: the same over every
      non-ignored detection with IoU > 0. ``None`` for fewer than 3 points or a constant input.
    * ``inconsistent_share``: among non-ignored detections with IoU >= ``min_iou`` (detections on an
      object; pure background false positives are a classification error, not an inconsistency), the
      share that is either ``high_score_poor_iou`` (score >= ``high_score`` and IoU < ``poor_iou``) or
      ``low_score_good_iou`` (score < ``low_score`` and IoU >= ``good_iou``); both parts are reported
      as ``high_score_poor_iou_share`` and ``low_score_good_iou_share``. ``None`` if the population is
      empty.
    * ``nms_best_box_rate``: does score-ranked NMS keep the best-localized box [A]? Over the objects
      that have a pre-NMS candidate of their class with IoU >= ``iou_threshold``, the share whose
      covering final detection (the highest-scored post-NMS detection of the class with IoU >=
      ``iou_threshold``) has an IoU within ``nms_tolerance`` (default 1e-6: the same box up to
      round-off) of the best candidate IoU; an object no final detection covers counts as a failure.
      ``nms_mean_iou_gap``: mean of best candidate IoU - covering detection IoU over covered objects.
      Computed only when every prediction carries the pre-NMS candidates; ``None`` when none does
      (a mix is an error).
    * counts ``n_images``, ``n_detections`` (all), ``n_ignored`` (on crowd regions), ``n_matched``,
      ``n_objects``, ``n_inconsistency_population``, ``nms_n_objects``, ``nms_n_covered``; and the
      ``thresholds`` used.

    Every detection counts, not only COCOeval's top 100 per image. Matching and IoU as in
    :func:`match_detections`; ignored detections (on crowd regions) enter no statistic.
    """
    thresholds = {
        "iou_threshold": _check_unit("iou_threshold", iou_threshold, low_open=True),
        "high_score": _check_unit("high_score", high_score),
        "low_score": _check_unit("low_score", low_score),
        "good_iou": _check_unit("good_iou", good_iou),
        "poor_iou": _check_unit("poor_iou", poor_iou),
        "min_iou": _check_unit("min_iou", min_iou),
        "nms_tolerance": _check_unit("nms_tolerance", nms_tolerance),
    }
    if thresholds["low_score"] > thresholds["high_score"]:
        raise ValueError(f"low_score ({low_score}) must not exceed high_score ({high_score})")
    if thresholds["poor_iou"] > thresholds["good_iou"]:
        raise ValueError(f"poor_iou ({poor_iou}) must not exceed good_iou ({good_iou})")

    mapping = label_map(label_to_cat_id)
    preds = normalize_predictions(predictions, mapping, with_candidates=True)
    check_images(coco_gt, [p.image_id for p in preds])
    check_mapping_against_gt(coco_gt, mapping)
    with_candidates = [p.candidates is not None for p in preds]
    if any(with_candidates) and not all(with_candidates):
        missing = preds[with_candidates.index(False)].image_id
        raise ValueError(
            f"predictions: image_id {missing} has no pre-NMS candidates ({', '.join(CANDIDATE_KEYS)}) "
            "while other images have them; record candidates for every image or for none"
        )
    m, truths = _match(preds, coco_gt, mapping, thresholds["iou_threshold"])

    kept = ~m.ignored
    matched = m.matched & kept
    pearson, spearman = _correlations(m.scores[matched], m.ious[matched])
    overlapping = kept & (m.ious > 0)
    pearson_all, spearman_all = _correlations(m.scores[overlapping], m.ious[overlapping])

    population = kept & (m.ious >= thresholds["min_iou"])
    high_poor = (m.scores >= thresholds["high_score"]) & (m.ious < thresholds["poor_iou"])
    low_good = (m.scores < thresholds["low_score"]) & (m.ious >= thresholds["good_iou"])

    result: dict[str, Any] = {
        "pearson": pearson,
        "spearman": spearman,
        "n_correlation": int(matched.sum()),
        "pearson_all": pearson_all,
        "spearman_all": spearman_all,
        "n_correlation_all": int(overlapping.sum()),
        "inconsistent_share": _share(high_poor | low_good, population),
        "high_score_poor_iou_share": _share(high_poor, population),
        "low_score_good_iou_share": _share(low_good, population),
        "n_inconsistency_population": int(population.sum()),
        "n_images": m.n_images,
        "n_detections": len(m),
        "n_ignored": int(m.ignored.sum()),
        "n_matched": int(matched.sum()),
        "n_objects": m.n_objects,
        "thresholds": thresholds,
    }
    result.update(_nms_localization(preds, truths, thresholds["iou_threshold"], thresholds["nms_tolerance"]))
    return result


