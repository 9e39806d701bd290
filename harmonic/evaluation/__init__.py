"""Evaluation: COCO metrics (:mod:`.coco`), the prediction-consistency metrics (:mod:`.consistency`) and,
for data converted from PASCAL VOC, the VOC metric (:mod:`.voc`) of one set of predictions
(:mod:`.predictions`), and the metrics file that carries them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from harmonic.evaluation.coco import STAT_NAMES, coco_evaluate, detections_to_coco, segmentations_to_coco
from harmonic.evaluation.consistency import (
    DetectionMatches,
    consistency_metrics,
    match_detections,
    score_iou_pairs,
)
from harmonic.evaluation.predictions import MASK_THRESHOLD, as_int, encode_masks
from harmonic.evaluation.voc import is_voc_conversion, voc_ap, voc_evaluate
from harmonic.utils.files import atomic_write_json
from harmonic.utils.provenance import provenance

__all__ = [
    "MASK_THRESHOLD",
    "STAT_NAMES",
    "DetectionMatches",
    "coco_evaluate",
    "consistency_metrics",
    "detections_to_coco",
    "encode_masks",
    "evaluate_predictions",
    "is_voc_conversion",
    "match_detections",
    "score_iou_pairs",
    "segmentations_to_coco",
    "voc_ap",
    "voc_evaluate",
    "write_metrics",
]


def evaluate_predictions(
    predictions: Sequence[Mapping[str, Any]],
    coco_gt: COCO,
    label_to_cat_id: Mapping[int, int],
    *,
    iou_type: str = "bbox",
    img_ids: Sequence[int] | None = None,
    verbose: bool = False,
    **consistency_kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """``{"coco": coco_evaluate(...), "consistency": consistency_metrics(...)}`` for one set of predictions,
    plus ``"coco_segm"`` (the same 12 numbers for ``iouType="segm"``) when the predictions carry ``masks``,
    and ``"voc": voc_evaluate(...)`` (VOC mAP, 11-point and area, per class) when ``coco_gt`` is a
    conversion by :mod:`harmonic.data.voc` (:func:`is_voc_conversion`), over the same images.

    COCO metrics are computed over ``img_ids``; by default over the images in ``predictions`` (an image
    with no detections must still be listed, with empty arrays, to count), or over every image of the
    ground truth when ``predictions`` is empty. ``consistency_kwargs`` go to
    :func:`consistency_metrics` (thresholds). Masks are all or nothing: if one prediction has ``masks``,
    every one needs them (see :func:`segmentations_to_coco`), and every ground-truth annotation needs a
    ``segmentation``; ``ValueError`` otherwise, naming the image or annotation.
    """
    predictions = list(predictions)
    if img_ids is None and predictions:
        img_ids = [as_int(p.get("image_id") if isinstance(p, Mapping) else None, f"predictions[{i}] 'image_id'")
                   for i, p in enumerate(predictions)]
    coco = coco_evaluate(coco_gt, detections_to_coco(predictions, label_to_cat_id), iou_type,
                         img_ids=img_ids, verbose=verbose)
    consistency = consistency_metrics(predictions, coco_gt, label_to_cat_id, **consistency_kwargs)
    metrics: dict[str, dict[str, Any]] = {"coco": coco, "consistency": consistency}
    if is_voc_conversion(coco_gt):
        metrics["voc"] = voc_evaluate(predictions, coco_gt, label_to_cat_id, img_ids=img_ids)
    if any(isinstance(p, Mapping) and "masks" in p for p in predictions):
        metrics["coco_segm"] = coco_evaluate(coco_gt, segmentations_to_coco(predictions, coco_gt, label_to_cat_id),
                                             "segm", img_ids=img_ids, verbose=verbose)
    return metrics


def write_metrics(
    path: str | Path,
    metrics: Mapping[str, Any],
    parameters: Mapping[str, Any] | None = None,
    seed: int | None = None,
    device: str | None = None,
    device_details: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``metrics`` (as from :func:`evaluate_predictions`) to ``path`` as JSON, atomically, with
    :func:`harmonic.utils.provenance.provenance` under ``"provenance"``. NaN is refused rather than written. Returns
    the path."""
    if "provenance" in metrics:
        raise ValueError("metrics: already has a 'provenance' key; it is added by write_metrics")
    payload = dict(metrics)
    payload["provenance"] = provenance(dict(parameters or {}), seed=seed, device=device, device_details=device_details)
    return atomic_write_json(path, payload)
