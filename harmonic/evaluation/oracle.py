"""How much of a detector's AP its scores lose: the same detections re-scored by a chain of oracles.

The paper's argument [A] is that a detector's scores rank its boxes badly (a high score on a poor box
wins NMS and the precision-recall curve), and that the Harmonic loss mends the ranking. Two detectors'
AP can differ because one outputs worse boxes (missed objects, poor localization), or because its scores
rank the same boxes worse, and scores can fail in three ways: among the candidates of one object they
prefer the poorer box (the paper's inconsistency), they put boxes on background above boxes on objects, or
they order one object's best box below other objects' boxes or below duplicates. This module measures each
[D] by re-scoring a run's detections, its boxes, categories and images unchanged.

A detection's *IoU* is its IoU with the best-overlapping non-crowd object of its own category in its image,
as in :mod:`harmonic.evaluation.consistency`; that object is its *owner* when the IoU is at least
``MIN_IOU`` (the consistency metrics' ``min_iou``), and a detection without an owner is *on background*.
Three re-scorings, each keeping what the one before it fixed:

1. **within** (the within-object oracle): the scores inside each owner's group are permuted to follow the
   boxes' IoU, the highest score to the best box and so on down; detections on background keep theirs. The
   set of score values, and so every group's best score, stays the detector's. Its gain over the AP
   (``*_consistency_gap``) is what the detector's inconsistency costs it.
2. **background**: as *within*, with every detection on background moved below every owned one (in the
   detector's order). Its gain over *within* (``*_background_gap``) is what the boxes on background that
   the scores rank above objects cost.
3. **ideal**: each owner's best box first (by IoU), then the other owned boxes (by IoU), then background.
   At every IoU threshold this puts every object's best box above every box that cannot match, so
   ``*_ideal`` is what the boxes allow: no order of them scores higher, up to a box that could match a
   second object of its category that it overlaps less than its owner. Its gain over *background*
   (``*_across_gap``) is what ordering objects against each other and their duplicates costs.

So AP = ideal - across gap - background gap - consistency gap, exactly, and a difference between two
detectors splits into their boxes (the difference of the ideal APs) and the three differences of gaps.
The chain's order is a choice: each gap is measured with the ranking errors after it still in place, and
another order would attribute differently.

Before re-scoring, the detections are cut to COCOeval's ``MAX_DETS`` per image and category by their own
score, as COCOeval would cut them, so the own AP is unchanged and every oracle ranks the same boxes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from scipy.stats import rankdata

from harmonic.evaluation.coco import coco_evaluate
from harmonic.evaluation.consistency import _box_iou

#: the smallest IoU with an object of its category for a detection to be on that object (else background);
#: the consistency metrics' ``min_iou``
MIN_IOU = 0.1
#: COCOeval's largest number of detections per image and category
MAX_DETS = 100
#: the COCO numbers the decomposition reports
DECOMPOSED = ("AP", "AP50", "AP75")
#: the re-scorings, in the chain's order, and the gap each adds (module docstring)
LEVELS = ("within", "background", "ideal")
GAPS = {"consistency": ("", "_within"), "background": ("_within", "_background"), "across": ("_background", "_ideal")}


def _xyxy(bboxes: Any) -> np.ndarray:
    out = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, 2:] += out[:, :2]
    return out


def _groups(coco_gt: COCO, coco_results: Sequence[Mapping[str, Any]]) -> dict[tuple[Any, Any], list[int]]:
    groups: dict[tuple[Any, Any], list[int]] = defaultdict(list)
    for i, det in enumerate(coco_results):
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in det:
                raise ValueError(f"coco_results[{i}]: missing key {key!r}")
        if det["image_id"] not in coco_gt.imgs:
            raise ValueError(f"coco_results[{i}]: image_id {det['image_id']!r} is not an image of the ground truth")
        groups[(det["image_id"], det["category_id"])].append(i)
    return groups


def capped(coco_gt: COCO, coco_results: Sequence[Mapping[str, Any]], max_dets: int = MAX_DETS) -> list[Mapping[str, Any]]:
    """The detections COCOeval evaluates: per image and category the ``max_dets`` highest-scored (ties in input
    order, COCOeval's stable sort), in input order."""
    keep = []
    for rows in _groups(coco_gt, coco_results).values():
        scores = np.array([float(coco_results[i]["score"]) for i in rows])
        keep += [rows[k] for k in np.argsort(-scores, kind="mergesort")[:max_dets]]
    return [coco_results[i] for i in sorted(keep)]


def owners(coco_gt: COCO, coco_results: Sequence[Mapping[str, Any]],
           min_iou: float = MIN_IOU) -> tuple[np.ndarray, np.ndarray]:
    """``(ious, owner)``: each detection's IoU with the best-overlapping non-crowd object of its category in
    its image (0 when none overlaps), and that object's annotation id, -1 when the IoU is below ``min_iou``
    (on background); in the order of ``coco_results`` (COCO results: ``image_id``, ``category_id``, ``bbox``
    as [x, y, w, h], ``score``)."""
    ious = np.zeros(len(coco_results), dtype=np.float64)
    owner = np.full(len(coco_results), -1, dtype=np.int64)
    for (image_id, category_id), rows in _groups(coco_gt, coco_results).items():
        truth = [ann for ann in coco_gt.imgToAnns.get(image_id, [])
                 if ann["category_id"] == category_id and not ann.get("iscrowd", 0)]
        if not truth:
            continue
        iou = _box_iou(_xyxy([coco_results[i]["bbox"] for i in rows]), _xyxy([ann["bbox"] for ann in truth]))
        best = iou.argmax(axis=1)
        ious[rows] = iou[np.arange(len(rows)), best]
        ids = np.array([ann["id"] for ann in truth], dtype=np.int64)[best]
        owner[rows] = np.where(ious[rows] >= min_iou, ids, -1)
    return ious, owner


def _owner_groups(owner: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(owner, kind="stable")
    return [rows for rows in np.split(order, np.flatnonzero(np.diff(owner[order])) + 1)
            if len(rows) and owner[rows[0]] >= 0]


def oracle_scores(coco_gt: COCO, coco_results: Sequence[Mapping[str, Any]],
                  min_iou: float = MIN_IOU) -> dict[str, np.ndarray]:
    """The scores of each re-scoring of :data:`LEVELS` (module docstring), in the order of ``coco_results``.
    Only their order matters to COCOeval, so the background and ideal scores are tiers (owned above
    background, best boxes above the rest), not probabilities."""
    ious, owner = owners(coco_gt, coco_results, min_iou)
    own = np.array([float(det["score"]) for det in coco_results], dtype=np.float64)
    within = own.copy()
    best = np.zeros(len(own), dtype=bool)
    for rows in _owner_groups(owner):
        by_iou = rows[np.lexsort((-own[rows], -ious[rows]))]  # best box first; equal IoUs: the detector's order
        within[by_iou] = np.sort(own[rows])[::-1]
        best[by_iou[0]] = True
    owned = owner >= 0

    def unit(values: np.ndarray) -> np.ndarray:  # the same order (ties kept) squeezed into (0, 1)
        ranks = rankdata(values, method="dense") if len(values) else values
        return ranks / (ranks.max(initial=0) + 1)

    own_unit = unit(own)
    background = np.where(owned, 1.0 + unit(within), own_unit)
    by_iou = ious + 1e-9 * own_unit  # equal IoUs in the detector's order
    ideal = np.where(best, 2.0 + by_iou, np.where(owned, 1.0 + by_iou, own_unit))
    return {"within": within, "background": background, "ideal": ideal}


def ranking_decomposition(coco_gt: COCO, coco_results: Sequence[Mapping[str, Any]],
                          img_ids: Sequence[int] | None = None, min_iou: float = MIN_IOU) -> dict[str, float | None]:
    """For m in AP, AP50, AP75 (fractions, as COCOeval gives them): ``m`` with the detections' own scores,
    ``m_within``, ``m_background`` and ``m_ideal`` with the re-scorings' (module docstring), and the gaps
    ``m_consistency_gap`` (within - own), ``m_background_gap`` (background - within) and ``m_across_gap``
    (ideal - background), computed from the levels as returned. ``img_ids`` restricts every evaluation to those
    images."""
    coco_results = capped(coco_gt, list(coco_results))
    scores = oracle_scores(coco_gt, coco_results, min_iou)
    levels = {"": coco_evaluate(coco_gt, coco_results, img_ids=img_ids)}
    for level in LEVELS:
        rescored = [{**det, "score": float(s)} for det, s in zip(coco_results, scores[level])]
        levels[f"_{level}"] = coco_evaluate(coco_gt, rescored, img_ids=img_ids)
    out: dict[str, float | None] = {}
    for m in DECOMPOSED:
        for suffix, values in levels.items():
            out[f"{m}{suffix}"] = None if values[m] is None else round(values[m], 6)
        for gap, (low, high) in GAPS.items():
            a, b = out[f"{m}{low}"], out[f"{m}{high}"]
            out[f"{m}_{gap}_gap"] = None if a is None or b is None else b - a
    return out
