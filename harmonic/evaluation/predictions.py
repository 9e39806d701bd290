"""Predictions as the models and the engine produce them, read into one checked form.

A prediction is one dict per image, ``{"image_id": int, "boxes": [n, 4] xyxy, "scores": [n],
"labels": [n]}`` (tensors on any device, or arrays), labels contiguous ``1..K``; optionally the pre-NMS
candidates ``"candidate_boxes"`` [c, 4], ``"candidate_scores"`` [c], ``"candidate_labels"`` [c] (after
the score threshold / top-k, before NMS); for detectors that predict masks, ``"masks"``: one instance
mask per box, either an array [n, 1, H, W] or [n, H, W] in the image's pixels (probabilities, binarized
at > 0.5 as torchvision's references do, or binary) or a list of n COCO RLE dicts (:func:`encode_masks`).
Ground truth is a ``pycocotools.coco.COCO`` object with ``label_to_cat_id`` (contiguous label -> COCO
category id).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO

CANDIDATE_KEYS = ("candidate_boxes", "candidate_scores", "candidate_labels")


@dataclass
class ImagePredictions:
    image_id: int
    boxes: np.ndarray  # float64 [n, 4] xyxy
    scores: np.ndarray  # float64 [n]
    labels: np.ndarray  # int64 [n]
    candidates: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # boxes, scores, labels


def _to_numpy(value: Any, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        return value.numpy() if value.dtype != torch.bfloat16 else value.float().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: cannot be read as an array ({exc})") from exc


def as_int(value: Any, where: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where}: expected one integer, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float, np.floating, str)):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    try:
        as_float = float(value)
    except ValueError as exc:
        raise ValueError(f"{where}: expected an integer, got {value!r}") from exc
    if not math.isfinite(as_float) or as_float != int(as_float):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    return int(as_float)


def label_map(label_to_cat_id: Mapping[Any, Any]) -> dict[int, int]:
    """``label_to_cat_id`` with int keys and values (JSON round trips turn the keys into strings)."""
    if not isinstance(label_to_cat_id, Mapping) or not label_to_cat_id:
        raise ValueError("label_to_cat_id: expected a non-empty mapping {label: COCO category id}")
    mapping = {}
    for key, value in label_to_cat_id.items():
        label = as_int(key, f"label_to_cat_id key {key!r}")
        mapping[label] = as_int(value, f"label_to_cat_id[{key!r}]")
    if len(set(mapping.values())) != len(mapping):
        raise ValueError(f"label_to_cat_id: two labels map to the same category id: {mapping}")
    return mapping


def _boxes_scores_labels(
    pred: Mapping[str, Any], keys: Sequence[str], where: str, mapping: Mapping[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    box_key, score_key, label_key = keys
    for key in keys:
        if key not in pred:
            raise ValueError(f"{where}: missing key {key!r}")
    boxes = _to_numpy(pred[box_key], f"{where} {box_key!r}").astype(np.float64, copy=False)
    scores = _to_numpy(pred[score_key], f"{where} {score_key!r}").astype(np.float64, copy=False)
    labels_raw = _to_numpy(pred[label_key], f"{where} {label_key!r}")
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where} {box_key!r}: expected shape [n, 4] (xyxy), got {boxes.shape}")
    n = boxes.shape[0]
    scores = scores.reshape(-1) if scores.ndim <= 1 else scores
    labels_raw = labels_raw.reshape(-1) if labels_raw.ndim <= 1 else labels_raw
    if scores.shape != (n,):
        raise ValueError(f"{where} {score_key!r}: expected shape [{n}], got {scores.shape}")
    if labels_raw.shape != (n,):
        raise ValueError(f"{where} {label_key!r}: expected shape [{n}], got {labels_raw.shape}")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{where} {box_key!r}: contains NaN or infinite coordinates")
    if not np.isfinite(scores).all():
        raise ValueError(f"{where} {score_key!r}: contains NaN or infinite scores")
    if n and ((boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any()):
        bad = int(np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0])
        raise ValueError(f"{where} {box_key!r}: box {bad} is not xyxy with x2 >= x1, y2 >= y1: {boxes[bad].tolist()}")
    labels_float = labels_raw.astype(np.float64)
    if n and (not np.isfinite(labels_float).all() or (labels_float != np.round(labels_float)).any()):
        raise ValueError(f"{where} {label_key!r}: labels must be integers")
    labels = labels_float.astype(np.int64)
    unknown = sorted(set(labels.tolist()) - set(mapping))
    if unknown:
        raise ValueError(f"{where} {label_key!r}: label(s) {unknown} not in label_to_cat_id (known: {sorted(mapping)})")
    return boxes, scores, labels


def normalize_predictions(
    predictions: Iterable[Mapping[str, Any]], mapping: Mapping[int, int], *, with_candidates: bool = False
) -> list[ImagePredictions]:
    if isinstance(predictions, Mapping):
        raise ValueError("predictions: expected a list with one dict per image, got a single dict")
    out: list[ImagePredictions] = []
    seen: set[int] = set()
    for index, pred in enumerate(predictions):
        if not isinstance(pred, Mapping):
            raise ValueError(f"predictions[{index}]: expected a dict, got {type(pred).__name__}")
        if "image_id" not in pred:
            raise ValueError(f"predictions[{index}]: missing key 'image_id'")
        image_id = as_int(pred["image_id"], f"predictions[{index}] 'image_id'")
        where = f"predictions[{index}] (image_id {image_id})"
        if image_id in seen:
            raise ValueError(f"{where}: image_id {image_id} appears more than once")
        seen.add(image_id)
        boxes, scores, labels = _boxes_scores_labels(pred, ("boxes", "scores", "labels"), where, mapping)
        candidates = None
        present = [key for key in CANDIDATE_KEYS if key in pred]
        if with_candidates and present:
            candidates = _boxes_scores_labels(pred, CANDIDATE_KEYS, where, mapping)
        out.append(ImagePredictions(image_id, boxes, scores, labels, candidates))
    return out


#: a predicted mask probability above this is inside the mask (torchvision's detection references)
MASK_THRESHOLD = 0.5


def encode_masks(masks: Any, where: str = "masks") -> list[dict[str, Any]]:
    """Instance masks -> COCO RLE dicts ``{"size": [H, W], "counts": str}`` (JSON-serializable).

    ``masks``: a tensor or array [n, 1, H, W] or [n, H, W]: bool, integer (0 / 1) or float probabilities
    (inside where > :data:`MASK_THRESHOLD`). ``where`` names the value in errors.
    """
    from pycocotools import mask as mask_utils

    array = _to_numpy(masks, where)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"{where}: expected masks of shape [n, 1, H, W] or [n, H, W], got {array.shape}")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError(f"{where}: contains NaN or infinite mask values")
        binary = array > MASK_THRESHOLD
    elif array.dtype.kind in "biu":
        binary = array > 0
    else:
        raise ValueError(f"{where}: expected bool, integer or float masks, got dtype {array.dtype}")
    rles = []
    for mask in binary:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rles.append({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})
    return rles


def mask_rles(pred: Mapping[str, Any], n: int, size: tuple[int, int], where: str) -> list[dict[str, Any]]:
    """The ``"masks"`` of one prediction with ``n`` boxes on an image of ``size`` (H, W), as RLE dicts;
    ``ValueError`` naming the image for a count or size that does not match."""
    masks = pred["masks"]
    if isinstance(masks, (list, tuple)) and all(isinstance(m, Mapping) for m in masks):
        rles = [dict(m) for m in masks]
        for k, rle in enumerate(rles):
            if "size" not in rle or "counts" not in rle:
                raise ValueError(f"{where} 'masks': RLE {k} needs 'size' and 'counts'")
    else:
        rles = encode_masks(masks, f"{where} 'masks'")
    if len(rles) != n:
        raise ValueError(f"{where} 'masks': expected {n} masks (one per box), got {len(rles)}")
    for k, rle in enumerate(rles):
        if [int(v) for v in rle["size"]] != list(size):
            raise ValueError(
                f"{where} 'masks': mask {k} is {list(rle['size'])} (H, W) but the image is {list(size)}"
            )
    return rles


def check_images(coco_gt: COCO, image_ids: Iterable[int]) -> None:
    if not isinstance(coco_gt, COCO):
        raise ValueError(f"coco_gt: expected a pycocotools.coco.COCO object, got {type(coco_gt).__name__}")
    missing = [iid for iid in image_ids if iid not in coco_gt.imgs]
    if missing:
        raise ValueError(f"predictions: image_id(s) {missing[:10]} are not images of the ground truth")


def check_mapping_against_gt(coco_gt: COCO, mapping: Mapping[int, int]) -> None:
    unknown = sorted(set(mapping.values()) - set(coco_gt.getCatIds()))
    if unknown:
        raise ValueError(
            f"label_to_cat_id: category id(s) {unknown} are not categories of the ground truth "
            f"(its ids: {sorted(coco_gt.getCatIds())})"
        )


def valid_xywh(bbox: Any) -> bool:
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return False
    return len(values) == 4 and all(math.isfinite(v) for v in values) and values[2] >= 0 and values[3] >= 0
