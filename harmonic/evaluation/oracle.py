"""How much of a detector's AP its scores lose: the same detections re-scored by two oracles.

The paper's argument [A] is that a detector's scores rank its boxes badly (a high score on a poor box
wins NMS and the precision-recall curve), and that the Harmonic loss mends the ranking. Two detectors'
AP can differ because one outputs worse boxes (missed objects, poor localization, duplicates), because its
scores tell objects from background worse, or because among the candidates of one object its scores
prefer the poorer boxes: the paper's inconsistency. This module separates the three [D]. A detection's
*IoU* is its IoU with the best-overlapping non-crowd object of its own category in its image (0 when none
overlaps), as in :mod:`harmonic.evaluation.consistency`, and that object is its *owner*.

* The **within-object oracle** permutes the scores inside each owner's group of detections so that they
  follow the boxes' IoU (the highest score to the best box, and so on down), and leaves the scores of the
  detections that overlap no object as they are. The set of score values, and so every group's best score,
  stays what the detector gave: only the choice of box inside an object's group changes. Its gain over the
  AP is what the detector's inconsistency costs it (``*_within_gap``).
* The **full oracle** scores every detection by its IoU. Detections that overlap no object fall to the
  bottom, so this also removes what the scores cost in telling objects from background and in ranking one
  object against another. Its AP (``*_oracle``) is what these boxes reach when perfectly ranked; its gain
  over the AP is what the scores cost in all (``*_gap``).

The boxes, categories and images stay as the detector output them, after its own NMS and top-k. A
difference between two detectors then splits exactly: the difference of their oracle APs (their boxes),
minus the difference of their within-object gaps (their consistency), minus the difference of what remains
of their gaps (their object-background ranking). Ranking by IoU is not the best possible order for AP
averaged over IoU thresholds, so a gap can be slightly negative; it is a yardstick shared by both
detectors, which is what the split needs.

Among equal IoUs (0 above all) the detector's own order is kept, through a tie-break of ``TIE_BREAK`` times
its score. Crowd regions are not objects here; COCOeval still ignores detections on them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from harmonic.evaluation.coco import coco_evaluate
from harmonic.evaluation.consistency import _box_iou

#: the weight of a detection's own score in its oracle score: keeps its order among equal IoUs, and can
#: reorder only IoUs less than 1e-6 apart
TIE_BREAK = 1e-6
#: the COCO numbers the decomposition reports
DECOMPOSED = ("AP", "AP50", "AP75")


def _xyxy(bboxes: np.ndarray) -> np.ndarray:
    out = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, 2:] += out[:, :2]
    return out


def owners(coco_gt: COCO, coco_results: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """``(ious, owner)``: each detection's IoU with the best-overlapping non-crowd object of its category in
    its image, and that object's annotation id (0 and -1 when none overlaps), in the order of
    ``coco_results`` (COCO results: ``image_id``, ``category_id``, ``bbox`` as [x, y, w, h], ``score``)."""
    ious = np.zeros(len(coco_results), dtype=np.float64)
    owner = np.full(len(coco_results), -1, dtype=np.int64)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, det in enumerate(coco_results):
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in det:
                raise ValueError(f"coco_results[{i}]: missing key {key!r}")
        if det["image_id"] not in coco_gt.imgs:
            raise ValueError(f"coco_results[{i}]: image_id {det['image_id']!r} is not an image of the ground truth")
        groups[(det["image_id"], det["category_id"])].append(i)
    for (image_id, category_id), rows in groups.items():
        truth = [ann for ann in coco_gt.imgToAnns.get(image_id, [])
                 if ann["category_id"] == category_id and not ann.get("iscrowd", 0)]
        if not truth:
            continue
        iou = _box_iou(_xyxy([coco_results[i]["bbox"] for i in rows]), _xyxy([ann["bbox"] for ann in truth]))
        best = iou.argmax(axis=1)
        ious[rows] = iou[np.arange(len(rows)), best]
        ids = np.array([ann["id"] for ann in truth], dtype=np.int64)[best]
        owner[rows] = np.where(ious[rows] > 0, ids, -1)
    return ious, owner


def oracle_rescored(coco_gt: COCO, coco_results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``coco_results`` scored by the full oracle (module docstring); nothing else changes."""
    ious, _ = owners(coco_gt, coco_results)
    return [{**det, "score": float(iou + TIE_BREAK * float(det["score"]))} for det, iou in zip(coco_results, ious)]


def within_object_rescored(coco_gt: COCO, coco_results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``coco_results`` whose scores are permuted inside each object's group to follow the boxes'
    IoU (the within-object oracle, module docstring); detections that overlap no object keep theirs."""
    ious, owner = owners(coco_gt, coco_results)
    scores = np.array([float(det["score"]) for det in coco_results], dtype=np.float64)
    new = scores.copy()
    order = np.argsort(owner, kind="stable")
    bounds = np.flatnonzero(np.diff(owner[order])) + 1
    for rows in np.split(order, bounds):
        if len(rows) < 2 or owner[rows[0]] < 0:
            continue
        by_iou = rows[np.lexsort((-scores[rows], -ious[rows]))]  # best box first; equal IoUs: own order
        new[by_iou] = np.sort(scores[rows])[::-1]
    return [{**det, "score": float(score)} for det, score in zip(coco_results, new)]


def ranking_decomposition(coco_gt: COCO, coco_results: Sequence[Mapping[str, Any]],
                          img_ids: Sequence[int] | None = None) -> dict[str, float | None]:
    """For m in AP, AP50, AP75 (fractions, as COCOeval gives them): ``m`` with the detections' own scores,
    ``m_within`` and ``m_oracle`` with the two oracles' (module docstring), and the gaps ``m_within_gap`` =
    within - own, ``m_between_gap`` = oracle - within and ``m_gap`` = oracle - own (their sum). ``img_ids`` restricts every evaluation to those images."""
    coco_results = list(coco_results)
    own = coco_evaluate(coco_gt, coco_results, img_ids=img_ids)
    within = coco_evaluate(coco_gt, within_object_rescored(coco_gt, coco_results), img_ids=img_ids)
    oracle = coco_evaluate(coco_gt, oracle_rescored(coco_gt, coco_results), img_ids=img_ids)
    out: dict[str, float | None] = {}
    for m in DECOMPOSED:
        out[m], out[f"{m}_within"], out[f"{m}_oracle"] = own[m], within[m], oracle[m]
        out[f"{m}_within_gap"] = None if own[m] is None or within[m] is None else within[m] - own[m]
        out[f"{m}_gap"] = None if own[m] is None or oracle[m] is None else oracle[m] - own[m]
        out[f"{m}_between_gap"] = None if within[m] is None or oracle[m] is None else oracle[m] - within[m]
    return out
