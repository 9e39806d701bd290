"""Prediction and evaluation of a checkpoint or model: :func:`predict` (boxes, and masks where the model
predicts them, in the stored image's pixels) and :func:`evaluate` (COCO AP, segm AP for masks, and
prediction consistency, optionally written to a folder)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harmonic.data import CocoDetection, build_dataset, collate_fn
from harmonic.engine.checkpoints import load_model
from harmonic.engine.config import DEVICES, TrainConfig
from harmonic.engine.distributed import resolve_device
from harmonic.evaluation import (
    detections_to_coco,
    encode_masks,
    evaluate_predictions,
    score_iou_pairs,
    segmentations_to_coco,
    write_metrics,
)
from harmonic.evaluation.figures import plot_score_vs_iou
from harmonic.models import set_record_candidates
from harmonic.ops.focal import backend_record
from harmonic.utils.checks import is_int
from harmonic.utils.files import atomic_write_json


def _rescale_boxes(boxes: torch.Tensor, from_hw: Sequence[int], to_hw: Sequence[int]) -> torch.Tensor:
    if tuple(from_hw) == tuple(to_hw):
        return boxes
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def _resize_masks(masks: torch.Tensor, to_hw: Sequence[int]) -> torch.Tensor:
    """Mask probabilities [n, 1, h, w] -> [n, 1, *to_hw] (bilinear); unchanged when the size is the same."""
    if tuple(masks.shape[-2:]) == tuple(to_hw):
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros((0, 1, *to_hw))
    return F.interpolate(masks, size=tuple(to_hw), mode="bilinear", align_corners=False)


def predict(model: nn.Module, dataset, *, batch_size: int = 8, device: str | torch.device = "cpu",
            num_workers: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Run ``model`` (eval mode) over ``dataset``: one dict per image with ``image_id`` and the model's
    outputs on the CPU (``boxes`` xyxy in the stored image's pixels, ``scores``, ``labels`` 1..K, and the
    ``candidate_*`` keys when recorded). A model that predicts masks (Mask R-CNN) also gives ``masks``: one
    COCO RLE dict per box, the mask probabilities resized (bilinear) to the stored image and binarized at
    > 0.5 (:func:`harmonic.evaluation.encode_masks`), so the predictions of a whole dataset stay small."""
    from tqdm.auto import tqdm


    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                                         num_workers=num_workers)
    model.eval()
    predictions = []
    with torch.inference_mode():
        for images, targets in tqdm(loader, desc="evaluate", disable=not progress, dynamic_ncols=True):
            outputs = model([image.to(device) for image in images])
            for image, target, output in zip(images, targets, outputs):
                size = tuple(image.shape[-2:])
                original = tuple(target.get("orig_size", size))
                pred = {"image_id": int(target["image_id"])}
                for key, value in output.items():
                    value = value.detach().cpu()
                    if key in ("boxes", "candidate_boxes"):
                        value = _rescale_boxes(value.float(), size, original)
                    if key == "masks":
                        value = encode_masks(_resize_masks(value.float(), original), f"image_id {pred['image_id']} 'masks'")
                    pred[key] = value
                predictions.append(pred)
    return predictions


def evaluate(
    checkpoint_or_model: str | os.PathLike | nn.Module,
    dataset=None,
    *,
    split: str = "val",
    image_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    device: str = "auto",
    out_dir: str | os.PathLike | None = None,
    record_candidates: bool = True,
    label: str | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """COCO AP and prediction consistency of a checkpoint (or a model) on a dataset.

    ``checkpoint_or_model``: a checkpoint file or run folder (see :func:`load_checkpoint`), or a detector
    from :func:`harmonic.models.build_detector`. ``dataset``: a :class:`harmonic.data.CocoDetection`, a
    dataset spec (preset, annotation JSON or folder; with ``split`` and ``image_dir``), or ``None`` for the
    checkpoint's own data (``TrainConfig.val_spec`` for ``split="val"``, else that split of its training
    data). The category ids of the dataset must be
    those the checkpoint was trained on.

    Returns the metrics of :func:`harmonic.evaluation.evaluate_predictions` (``{"coco": {AP, AP50, ...},
    "consistency": {...}}``, plus ``"coco_segm"``, the mask AP, for a model that predicts masks). With
    ``out_dir`` it also writes ``metrics.json`` (with provenance), ``detections.json.gz`` (COCO results
    format, gzip; for masks also ``segmentations.json.gz``, RLE) and ``figures/score_vs_iou.png``.
    """
    if not (is_int(batch_size) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if device not in DEVICES and not isinstance(device, torch.device):
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    target_device = resolve_device(device, 0) if not isinstance(device, torch.device) else device
    ckpt: dict[str, Any] | None = None
    if isinstance(checkpoint_or_model, nn.Module):
        model = checkpoint_or_model.to(target_device).eval()
        source = f"<{type(checkpoint_or_model).__name__}>"
    else:
        model, ckpt = load_model(checkpoint_or_model, target_device)
        source = ckpt["path"]
    if dataset is None:
        if ckpt is None:
            raise ValueError("evaluate: pass a dataset when evaluating a model object (no checkpoint to take it from)")
        train_cfg = TrainConfig.from_dict(ckpt["config"])
        if split == "val":
            dataset, split, ckpt_image_dir = train_cfg.val_spec()
        else:  # another split of the training data
            dataset, ckpt_image_dir = train_cfg.dataset, train_cfg.image_dir
        image_dir = image_dir if image_dir is not None else ckpt_image_dir
    if not isinstance(dataset, CocoDetection):
        dataset_name = os.fspath(dataset)
        dataset = build_dataset(dataset_name, split, image_dir, train=False)
    else:
        dataset_name = str(dataset.ann_file)
    mapping = {int(k): int(v) for k, v in dataset.label_to_cat_id.items()}
    if ckpt is not None and {int(k): int(v) for k, v in ckpt["label_to_cat_id"].items()} != mapping:
        raise ValueError(
            f"evaluate: the dataset's categories {dataset.class_names} (ids {sorted(mapping.values())}) are not those "
            f"the checkpoint {source} was trained on ({ckpt['class_names']}, ids "
            f"{sorted(ckpt['label_to_cat_id'].values())})"
        )
    set_record_candidates(model, record_candidates)
    try:
        predictions = predict(model, dataset, batch_size=batch_size, device=target_device, num_workers=num_workers,
                              progress=progress)
    finally:
        set_record_candidates(model, False)
    metrics = evaluate_predictions(predictions, dataset.coco, mapping)
    if out_dir is not None:
        out_dir = Path(out_dir)
        parameters = {
            "checkpoint": source, "dataset": dataset_name, "split": split, "num_images": len(dataset),
            "batch_size": batch_size, "record_candidates": record_candidates,
        }
        seed = None
        if ckpt is not None:
            parameters.update(iteration=ckpt.get("iteration"), train_config=ckpt["config"], detector=ckpt["detector"])
            seed = ckpt["config"].get("seed")
        # the full detections compressed: a run folder stays small enough to commit (about 5x smaller)
        atomic_write_json(out_dir / "detections.json.gz", detections_to_coco(predictions, mapping))
        if "coco_segm" in metrics:
            atomic_write_json(out_dir / "segmentations.json.gz",
                              segmentations_to_coco(predictions, dataset.coco, mapping))
        scores, ious = score_iou_pairs(predictions, dataset.coco, mapping)
        atomic_write_json(out_dir / "score_iou.json", {"scores": scores, "ious": ious})
        name = label or (Path(source).parent.parent.name if ckpt is not None else "model")
        plot_score_vs_iou({name: (scores, ious)}, path=out_dir / "figures" / "score_vs_iou.png")
        # metrics.json last: a run folder holding it is a finished run (see harmonic.experiments.sweeps)
        write_metrics(out_dir / "metrics.json", metrics, parameters, seed=seed, device=str(target_device),
                      device_details=backend_record(target_device))
    return metrics
