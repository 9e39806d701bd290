"""The PASCAL VOC detection metric: per-class AP at IoU 0.5 and its mean, as the VOC devkit defines it.

Written from the devkit's definition (``VOCevaldet.m`` and the VOC2007/2010 evaluation rules), not
ported from another codebase. For each class, over all evaluated images:

1. the detections of that class are sorted by descending score (ties keep the input order: image order,
   then the order within the image, a stable sort);
2. each detection, in that order, takes the ground-truth object of its class in its image with the
   largest IoU. If that IoU is **greater than** the threshold (0.5; an IoU of exactly 0.5 does not match):
   a *difficult* object makes the detection neither a true nor a false positive (it is ignored); a
   non-difficult object not yet claimed makes it a true positive and claims the object; an object already
   claimed makes it a false positive (a duplicate). Otherwise it is a false positive. The best-IoU object
   is taken among all objects, difficult ones included, as the devkit does: a detection whose best
   overlap is a difficult object is ignored even if it also overlaps a non-difficult one by more than 0.5;
3. the number of positives is the number of non-difficult objects: missing a difficult object costs
   nothing;
4. precision and recall are the cumulative counts along that order, and AP is either

   * ``"11point"`` (VOC2007): the mean over ``t = 0, 0.1, ..., 1`` of the largest precision at a recall
     ``>= t`` (0 when no recall reaches ``t``);
   * ``"area"`` (VOC2010 and later, "all points"): the area under the precision/recall curve after
     replacing each precision with the largest precision at that or a higher recall, i.e.
     ``sum_i (r_i - r_{i-1}) * max_{j >= i} p_j`` over the points where recall increases (``r_0 = 0``).

IoU and the +1 pixel convention [D]. The devkit computes widths as ``xmax - xmin + 1`` because its boxes
are 1-based inclusive pixel indices. :mod:`harmonic.data.voc` converts such a box to the continuous
0-based box ``(xmin - 1, ymin - 1, xmax, ymax)`` (pixel ``i`` spans ``[i, i + 1)``), whose width
``xmax - (xmin - 1)`` already *is* the devkit's ``xmax - xmin + 1``; and a predicted continuous box
``(x1, y1, x2, y2)`` is the devkit box ``(x1 + 1, y1 + 1, x2, y2)`` under the same mapping. So this module
computes IoU on the continuous boxes **without** adding 1, which gives exactly the devkit's IoU of the
corresponding 1-based boxes; adding 1 here would count every box one pixel too large.

Difficult objects. An annotation is difficult when its ``"difficult"`` field is 1 (the converter writes
it in every mode) or, lacking that field, when it is a crowd region (``"iscrowd": 1``, which is how
``difficult="crowd"`` stores them). A conversion with ``difficult="drop"`` has removed them, so
detections on them count as false positives there: convert the evaluation split with ``crowd``
(default) or ``keep`` to get the devkit's numbers.

A class with no non-difficult object among the evaluated images has no defined AP (the devkit divides
by zero): its AP is ``None`` and it is left out of the means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from harmonic.evaluation.predictions import (
    as_int,
    check_images,
    check_mapping_against_gt,
    label_map,
    normalize_predictions,
)

__all__ = [
    "AP_METHODS",
    "VOC_MARKER",
    "is_voc_conversion",
    "voc_ap",
    "voc_class_counts",
    "voc_evaluate",
]

AP_METHODS = ("11point", "area")
#: The ``info.source_format`` the converter writes; older conversions are recognized by the description.
VOC_MARKER = "pascal_voc"
_VOC_DESCRIPTION = "converted from PASCAL VOC XML by harmonic.data.voc"


def is_voc_conversion(coco_gt: COCO) -> bool:
    """True when ``coco_gt`` was written by :func:`harmonic.data.voc.voc_to_coco`: its ``info`` has
    ``"source_format": "pascal_voc"`` or the converter's description."""
    info = getattr(coco_gt, "dataset", {}).get("info") or {}
    if not isinstance(info, Mapping):
        return False
    return info.get("source_format") == VOC_MARKER or str(info.get("description", "")).startswith(_VOC_DESCRIPTION)


def voc_ap(recall: Sequence[float] | np.ndarray, precision: Sequence[float] | np.ndarray, method: str = "area") -> float:
    """AP of one precision/recall curve, by the VOC2007 ``"11point"`` rule or the VOC2010+ ``"area"`` rule.

    ``recall`` and ``precision`` are the values after each detection in descending score order (so
    ``recall`` is non-decreasing), of equal length; an empty curve has AP 0. See the module docstring for
    both definitions. Raises ``ValueError`` for an unknown ``method``, unequal lengths, or values outside
    ``[0, 1]``.
    """
    if method not in AP_METHODS:
        raise ValueError(f"method must be one of {list(AP_METHODS)}, got {method!r}")
    rec = np.asarray(recall, dtype=np.float64).reshape(-1)
    prec = np.asarray(precision, dtype=np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise ValueError(f"recall and precision must have the same length, got {rec.size} and {prec.size}")
    for name, values in (("recall", rec), ("precision", prec)):
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise ValueError(f"{name} must hold numbers in [0, 1]")
    if rec.size == 0:
        return 0.0
    if method == "11point":
        total = 0.0
        # t = k / 10, the double nearest each tenth: np.linspace / np.arange give 0.30000000000000004 and
        # 0.7000000000000001, which a recall of exactly 3/10 or 7/10 would miss
        for t in (k / 10.0 for k in range(11)):
            reached = prec[rec >= t]
            total += float(reached.max()) if reached.size else 0.0
        return total / 11.0
    # precision envelope: the largest precision at this or any higher recall
    envelope = np.maximum.accumulate(prec[::-1])[::-1]
    steps = np.diff(np.concatenate(([0.0], rec)))
    return float(np.sum(steps * envelope))


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one continuous xyxy box with each of ``boxes`` [n, 4] (no +1: see the module docstring)."""
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0.0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0.0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _ground_truth(coco_gt: COCO, img_ids: Sequence[int], cat_id: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``image id -> (boxes [n, 4] continuous xyxy, difficult [n] bool)`` of one category."""
    out = {}
    for iid in img_ids:
        anns = [a for a in coco_gt.imgToAnns.get(iid, []) if a["category_id"] == cat_id]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=np.float64).reshape(-1, 4)
        difficult = np.array([bool(a.get("difficult", a.get("iscrowd", 0))) for a in anns], dtype=bool)
        out[iid] = (boxes, difficult)
    return out


def voc_class_counts(
    detections: Sequence[tuple[int, float, np.ndarray]],
    ground_truth: Mapping[int, tuple[np.ndarray, np.ndarray]],
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The devkit's matching for one class: ``(tp, fp, n_positives)``.

    ``detections``: ``(image id, score, continuous xyxy box)`` of that class, in any order; they are
    visited by descending score (stable). ``ground_truth``: ``image id -> (boxes [n, 4], difficult [n])``
    of that class. ``tp`` and ``fp`` are 0/1 arrays in the visiting order; a detection ignored because it
    matched a difficult object has 0 in both. ``n_positives`` counts the non-difficult objects.
    """
    n_positives = int(sum(int((~difficult).sum()) for _, difficult in ground_truth.values()))
    scores = np.array([d[1] for d in detections], dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    claimed = {iid: np.zeros(len(difficult), dtype=bool) for iid, (_, difficult) in ground_truth.items()}
    tp = np.zeros(len(detections), dtype=np.float64)
    fp = np.zeros(len(detections), dtype=np.float64)
    for rank, index in enumerate(order):
        image_id, _, box = detections[index]
        boxes, difficult = ground_truth.get(image_id, (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        if len(boxes) == 0:
            fp[rank] = 1.0
            continue
        ious = _iou_one_to_many(np.asarray(box, dtype=np.float64), boxes)
        best = int(np.argmax(ious))  # the first of equal maxima, as the devkit's max()
        if ious[best] > iou_threshold:
            if difficult[best]:
                continue  # neither TP nor FP
            if not claimed[image_id][best]:
                claimed[image_id][best] = True
                tp[rank] = 1.0
            else:
                fp[rank] = 1.0
        else:
            fp[rank] = 1.0
    return tp, fp, n_positives


def voc_evaluate(
    predictions: Sequence[Mapping[str, Any]],
    coco_gt: COCO,
    label_to_cat_id: Mapping[int, int],
    *,
    iou_threshold: float = 0.5,
    img_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """VOC AP of predictions in the package's format against a COCO ground truth (e.g. a VOC conversion).

    ``predictions``: one dict per image (``image_id``, ``boxes`` [n, 4] continuous xyxy in the image's
    pixels, ``scores``, ``labels`` 1..K; see :mod:`harmonic.evaluation.predictions`); ``label_to_cat_id``
    maps labels to the ground truth's category ids. Evaluated over ``img_ids``: by default the images in
    ``predictions`` (an image without detections must be listed with empty arrays to count its objects),
    or every image of the ground truth when ``predictions`` is empty.

    Returns ``{"mAP_11point", "mAP_area", "iou_threshold", "n_images", "n_classes_evaluated",
    "per_class": {class name: {"AP_11point", "AP_area", "n_positives", "n_detections", "n_ignored"}}}``,
    APs in [0, 1]; a class without non-difficult objects has ``None`` APs and is left out of the means
    (both ``None`` when no class has any). Raises ``ValueError`` naming the image and field for malformed
    predictions, an image or category id the ground truth lacks, or a threshold outside (0, 1).
    """
    if not isinstance(coco_gt, COCO):
        raise ValueError(f"coco_gt: expected a pycocotools.coco.COCO object, got {type(coco_gt).__name__}")
    if not (isinstance(iou_threshold, (int, float)) and 0 < iou_threshold < 1):
        raise ValueError(f"iou_threshold must be a number in (0, 1), got {iou_threshold!r}")
    mapping = label_map(label_to_cat_id)
    check_mapping_against_gt(coco_gt, mapping)
    preds = normalize_predictions(predictions, mapping)
    if img_ids is None:
        img_ids = [p.image_id for p in preds] if preds else sorted(coco_gt.getImgIds())
    img_ids = [as_int(i, "img_ids") for i in img_ids]
    check_images(coco_gt, sorted(set(img_ids) | {p.image_id for p in preds}))
    wanted = set(img_ids)
    by_label: dict[int, list[tuple[int, float, np.ndarray]]] = {label: [] for label in mapping}
    for p in preds:
        if p.image_id in wanted:
            for box, score, label in zip(p.boxes, p.scores.tolist(), p.labels.tolist()):
                by_label[label].append((p.image_id, score, box))
    per_class: dict[str, dict[str, Any]] = {}
    for label, cat_id in sorted(mapping.items()):
        name = str(coco_gt.cats[cat_id].get("name", cat_id))
        dets = by_label[label]
        tp, fp, n_pos = voc_class_counts(dets, _ground_truth(coco_gt, img_ids, cat_id), iou_threshold)
        entry: dict[str, Any] = {"AP_11point": None, "AP_area": None, "n_positives": n_pos,
                                 "n_detections": len(dets), "n_ignored": int(len(dets) - tp.sum() - fp.sum())}
        if n_pos > 0:
            ctp, cfp = np.cumsum(tp), np.cumsum(fp)
            recall = ctp / n_pos
            # 0 before the first counted detection; an ignored detection repeats the previous point
            # (or adds (0, 0) before any counted one), which changes neither AP
            precision = ctp / np.maximum(ctp + cfp, 1.0)
            entry["AP_11point"] = voc_ap(recall, precision, "11point")
            entry["AP_area"] = voc_ap(recall, precision, "area")
        per_class[name] = entry
    evaluated = [e for e in per_class.values() if e["n_positives"] > 0]

    def mean(key: str) -> float | None:
        return float(np.mean([e[key] for e in evaluated])) if evaluated else None

    return {"mAP_11point": mean("AP_11point"), "mAP_area": mean("AP_area"), "iou_threshold": float(iou_threshold),
            "n_images": len(set(img_ids)), "n_classes_evaluated": len(evaluated), "per_class": per_class}
