"""COCO metrics (pycocotools' COCOeval) of a detector's predictions."""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from harmonic.evaluation.predictions import (
    as_int,
    check_images,
    label_map,
    mask_rles,
    normalize_predictions,
    valid_xywh,
)

# The 12 numbers of ``COCOeval.summarize()`` for boxes and masks, in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")



def detections_to_coco(predictions: Iterable[Mapping[str, Any]], label_to_cat_id: Mapping[int, int]) -> list[dict]:
    """Predictions in the COCO results format.

    Each detection becomes ``{"image_id": int, "category_id": label_to_cat_id[label], "bbox": [x, y, w,
    h], "score": float}`` with ``bbox`` converted from xyxy to COCO's xywh (plain Python floats, so the
    list is JSON-serializable). Raises ``ValueError`` naming the image and field for a missing key, a
    wrong shape, a NaN, an inverted box or a label absent from ``label_to_cat_id``.
    """
    mapping = label_map(label_to_cat_id)
    results: list[dict] = []
    for pred in normalize_predictions(predictions, mapping):
        xywh = pred.boxes.copy()
        xywh[:, 2:] -= xywh[:, :2]
        for box, score, label in zip(xywh.tolist(), pred.scores.tolist(), pred.labels.tolist()):
            results.append(
                {"image_id": pred.image_id, "category_id": mapping[label], "bbox": box, "score": score}
            )
    return results


def segmentations_to_coco(
    predictions: Iterable[Mapping[str, Any]], coco_gt: COCO, label_to_cat_id: Mapping[int, int]
) -> list[dict]:
    """Predictions with ``masks`` in the COCO results format for ``iouType="segm"``.

    Each detection becomes ``{"image_id", "category_id", "segmentation": RLE, "score"}``, its mask as a
    COCO RLE dict (``counts`` a string, JSON-serializable). No ``bbox`` is written: pycocotools then takes
    the detection's area from its mask (with a ``bbox`` it would take the box's). ``coco_gt`` gives each
    image's size, which the masks must have (the stored image's pixels). Raises ``ValueError`` naming the
    image for a prediction without ``masks`` or with masks of the wrong count or size, and as
    :func:`detections_to_coco` for the other fields.
    """
    mapping = label_map(label_to_cat_id)
    predictions = list(predictions)
    checked = normalize_predictions(predictions, mapping)
    check_images(coco_gt, [p.image_id for p in checked])
    results: list[dict] = []
    for index, (raw, pred) in enumerate(zip(predictions, checked)):
        where = f"predictions[{index}] (image_id {pred.image_id})"
        if "masks" not in raw:
            raise ValueError(f"{where}: missing key 'masks' (segm evaluation needs a mask per detection)")
        image = coco_gt.imgs[pred.image_id]
        rles = mask_rles(raw, len(pred.scores), (int(image["height"]), int(image["width"])), where)
        for rle, score, label in zip(rles, pred.scores.tolist(), pred.labels.tolist()):
            results.append(
                {"image_id": pred.image_id, "category_id": mapping[label], "segmentation": rle, "score": score}
            )
    return results


def _check_results(coco_gt: COCO, coco_results: Sequence[Mapping[str, Any]], iou_type: str) -> None:
    cat_ids, img_ids = set(coco_gt.getCatIds()), set(coco_gt.getImgIds())
    for index, res in enumerate(coco_results):
        where = f"coco_results[{index}]"
        if not isinstance(res, Mapping):
            raise ValueError(f"{where}: expected a dict, got {type(res).__name__}")
        for key in ("image_id", "category_id", "bbox" if iou_type == "bbox" else "segmentation", "score"):
            if key not in res:
                raise ValueError(f"{where}: missing key {key!r}")
        if res["image_id"] not in img_ids:
            raise ValueError(f"{where} 'image_id': {res['image_id']!r} is not an image of the ground truth")
        if res["category_id"] not in cat_ids:
            raise ValueError(f"{where} 'category_id': {res['category_id']!r} is not a category of the ground truth")
        if "bbox" in res and not valid_xywh(res["bbox"]):
            raise ValueError(f"{where} 'bbox': expected 4 finite numbers [x, y, w, h] with w, h >= 0, got {res['bbox']!r}")
        try:
            score_ok = math.isfinite(float(res["score"]))
        except (TypeError, ValueError):
            score_ok = False
        if not score_ok:
            raise ValueError(f"{where} 'score': expected a finite number, got {res['score']!r}")


def _empty_results(coco_gt: COCO) -> COCO:
    """A results object with no detections (``COCO.loadRes`` fails on an empty list)."""
    res = COCO()
    res.dataset = {
        "images": list(coco_gt.dataset.get("images", [])),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    res.createIndex()
    return res


def coco_evaluate(
    coco_gt: COCO,
    coco_results: Sequence[Mapping[str, Any]],
    iou_type: str = "bbox",
    *,
    img_ids: Sequence[int] | None = None,
    verbose: bool = False,
) -> dict[str, float | None]:
    """The 12 COCOeval summary numbers, named as in :data:`STAT_NAMES`, each in [0, 1].

    AP is averaged over IoU thresholds 0.50:0.95 (AP50, AP75 at one threshold), APs/APm/APl and
    ARs/ARm/ARl over COCO's small/medium/large area ranges, AR1/AR10/AR100 at 1/10/100 detections per
    image. Where COCOeval reports -1 (no ground-truth object in that area range or at all), the value is
    ``None``: JSON has no NaN, and a 0 would read as a measured failure.

    ``coco_results`` is the list from :func:`detections_to_coco` (with ``iou_type="segm"``, results that
    also carry a ``segmentation``; it is not modified: pycocotools'
    ``loadRes`` writes into the dicts it gets, so it gets copies). An empty list gives 0 for every
    number that has ground truth (no crash). ``img_ids`` restricts the evaluation to those images
    (default: every image of ``coco_gt``). COCOeval's prints are silenced unless ``verbose``.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type: expected 'bbox' or 'segm', got {iou_type!r}")
    if not isinstance(coco_gt, COCO):
        raise ValueError(f"coco_gt: expected a pycocotools.coco.COCO object, got {type(coco_gt).__name__}")
    coco_results = list(coco_results)
    _check_results(coco_gt, coco_results, iou_type)
    if img_ids is not None:
        img_ids = [as_int(i, "img_ids") for i in img_ids]
        check_images(coco_gt, img_ids)
    needed = ("bbox", "area", "iscrowd") + (("segmentation",) if iou_type == "segm" else ())
    for ann in coco_gt.dataset.get("annotations", []):
        for key in needed:
            if key not in ann or (key == "segmentation" and not ann[key]):
                raise ValueError(
                    f"coco_gt annotation {ann.get('id')!r}: missing key {key!r} (COCOeval with iou_type={iou_type!r} needs it)"
                )

    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        if coco_results:
            coco_dt = coco_gt.loadRes(copy.deepcopy(coco_results))
        else:
            coco_dt = _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if img_ids is not None:
            evaluator.params.imgIds = sorted(set(img_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (None if value < 0 else float(value)) for name, value in zip(STAT_NAMES, evaluator.stats)}


