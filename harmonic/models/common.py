"""Pieces shared by the detectors: target checks, crowd regions, candidates and statistics."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import boxes as box_ops

__all__ = [
    "CANDIDATE_KEYS",
    "HarmonicTransform",
    "ImageCandidates",
    "StatsMixin",
    "finish_detections",
    "float32_losses",
    "to_float32",
    "ignore_crowd_anchors",
    "ignore_crowd_in_batch",
]

CANDIDATE_KEYS = ("candidate_boxes", "candidate_scores", "candidate_labels")
IGNORED = -2  # torchvision's Matcher.BETWEEN_THRESHOLDS: excluded from the classification loss


class HarmonicTransform(GeneralizedRCNNTransform):
    """torchvision's transform plus: target checks with clear errors, ``crowd_boxes`` resized with the
    image, and ``candidate_boxes`` mapped back to the original image like ``boxes``.

    Targets are dicts with ``boxes`` (float [N, 4], xyxy), ``labels`` (int64 [N], 1..num_classes),
    optionally ``crowd_boxes`` (float [M, 4]) and ``masks`` (uint8 or bool [N, H, W], one per box, the
    image's height and width; torchvision resizes them with the image).
    """

    def __init__(self, *args: Any, num_classes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_classes = num_classes

    @classmethod
    def from_transform(cls, transform: GeneralizedRCNNTransform, num_classes: int) -> HarmonicTransform:
        return cls(
            transform.min_size,
            transform.max_size,
            transform.image_mean,
            transform.image_std,
            size_divisible=transform.size_divisible,
            fixed_size=transform.fixed_size,
            _skip_resize=transform._skip_resize,
            num_classes=num_classes,
        )

    def check_targets(self, targets: list[dict[str, Tensor]]) -> None:
        for index, target in enumerate(targets):
            if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
                raise ValueError(f"targets[{index}] must be a dict with 'boxes' and 'labels'")
            boxes, labels = target["boxes"], target["labels"]
            if not isinstance(boxes, Tensor) or not boxes.is_floating_point() or boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"targets[{index}]['boxes'] must be a float tensor of shape [N, 4] (x1, y1, x2, y2)")
            if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
                raise ValueError(
                    f"targets[{index}]['labels'] must be an int64 tensor of shape [{boxes.shape[0]}] (one per box)"
                )
            if labels.numel() and bool(((labels < 1) | (labels > self.num_classes)).any()):
                raise ValueError(
                    f"targets[{index}]['labels'] must lie in 1..{self.num_classes} (0 is the background), got "
                    f"values in [{int(labels.min())}, {int(labels.max())}]"
                )
            crowd = target.get("crowd_boxes")
            if crowd is not None and (
                not isinstance(crowd, Tensor) or not crowd.is_floating_point() or crowd.dim() != 2 or crowd.shape[-1] != 4
            ):
                raise ValueError(f"targets[{index}]['crowd_boxes'] must be a float tensor of shape [M, 4]")

    def check_masks(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> None:
        """Each target's optional ``masks``: uint8 / bool [N, H, W], N its number of boxes, H x W its image's."""
        for index, (image, target) in enumerate(zip(images, targets)):
            masks = target.get("masks")
            if masks is None:
                continue
            expected = (target["boxes"].shape[0], *image.shape[-2:])
            if not isinstance(masks, Tensor) or masks.dtype not in (torch.uint8, torch.bool) or tuple(masks.shape) != expected:
                got = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, Tensor) else type(masks).__name__
                raise ValueError(
                    f"targets[{index}]['masks'] must be a uint8 or bool tensor of shape {list(expected)} (one mask per "
                    f"box, the image's height and width), got {got}"
                )

    def forward(self, images, targets=None):
        if targets is not None:
            self.check_targets(targets)
            self.check_masks(images, targets)
        return super().forward(images, targets)

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        height, width = image.shape[-2:]
        image, target = super().resize(image, target)
        if target is not None and "crowd_boxes" in target:
            target["crowd_boxes"] = resize_boxes(target["crowd_boxes"], (height, width), image.shape[-2:])
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        result = super().postprocess(result, image_shapes, original_image_sizes)
        if self.training:
            return result
        for pred, size, original in zip(result, image_shapes, original_image_sizes):
            if "candidate_boxes" in pred:
                pred["candidate_boxes"] = resize_boxes(pred["candidate_boxes"], size, original)
        return result


def ignore_crowd_anchors(
    matched_idxs: Tensor, anchors: Tensor, crowd_boxes: Tensor | None, iof_thresh: float
) -> Tensor:
    """Mark negative anchors (matched index -1) lying mostly inside a crowd region as ignored (-2) [D].

    An anchor is inside when ``area(anchor & crowd) / area(anchor) > iof_thresh`` for some crowd box
    (intersection over the anchor's area, "IoF"). Positive anchors stay positive. Returns a new tensor.
    """
    if crowd_boxes is None or crowd_boxes.numel() == 0:
        return matched_idxs
    crowd = crowd_boxes.to(anchors.dtype)
    top_left = torch.maximum(anchors[:, None, :2], crowd[None, :, :2])
    bottom_right = torch.minimum(anchors[:, None, 2:], crowd[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area = box_ops.box_area(anchors).clamp(min=1e-6)
    inside = (inter / area[:, None]).amax(dim=1) > iof_thresh
    return torch.where(inside & (matched_idxs == -1), torch.full_like(matched_idxs, IGNORED), matched_idxs)


def ignore_crowd_in_batch(
    matched_idxs: list[Tensor], anchors: list[Tensor], targets: list[dict[str, Tensor]], iof_thresh: float
) -> list[Tensor]:
    """:func:`ignore_crowd_anchors` image by image, with each target's optional ``crowd_boxes``."""
    return [
        ignore_crowd_anchors(m, a, t.get("crowd_boxes"), iof_thresh)
        for m, a, t in zip(matched_idxs, anchors, targets)
    ]


def finish_detections(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    *,
    nms_thresh: float,
    detections_per_img: int,
    record_candidates: bool,
) -> dict[str, Tensor]:
    """Class-wise NMS and top-k of one image's candidates, as torchvision does; with
    ``record_candidates`` the pre-NMS candidates are kept under :data:`CANDIDATE_KEYS`."""
    keep = box_ops.batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
    out = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
    if record_candidates:
        out.update(candidate_boxes=boxes, candidate_scores=scores, candidate_labels=labels)
    return out


class ImageCandidates:
    """One image's detections, gathered as torchvision's dense post-processing does: level by level
    (RetinaNet, FCOS: scores flattened over anchors x classes) or class by class (SSD).

    :meth:`select` keeps the scores above the model's ``score_thresh`` and the ``topk_candidates`` highest
    of them (:meth:`select_anchors` does so on a level's [A, K] scores); :meth:`add` collects the decoded
    boxes, scores and labels (1..K) of one level or class; :meth:`finish` runs :func:`finish_detections`
    (class-wise NMS, top ``detections_per_img``, the pre-NMS candidates under :data:`CANDIDATE_KEYS` when
    the model's ``record_candidates`` is on).

    ``model``: a torchvision dense detector (``score_thresh``, ``topk_candidates``, ``nms_thresh``,
    ``detections_per_img``) with harmonic's ``record_candidates`` flag.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.boxes: list[Tensor] = []
        self.scores: list[Tensor] = []
        self.labels: list[Tensor] = []

    def select(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """``scores`` [N] -> (the kept scores, highest first, and their indices into ``scores``)."""
        keep = scores > self.model.score_thresh
        kept_idxs = torch.where(keep)[0]
        top, idxs = scores[keep].topk(min(self.model.topk_candidates, kept_idxs.numel()))
        return top, kept_idxs[idxs]

    def select_anchors(self, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One level's ``scores`` [A, K] -> (the kept scores, their anchor indices 0..A-1, their labels 1..K),
        selected over the A * K flattened scores as torchvision's RetinaNet and FCOS do."""
        num_classes = scores.shape[-1]
        top, idxs = self.select(scores.flatten())
        return top, torch.div(idxs, num_classes, rounding_mode="floor"), idxs % num_classes + 1

    def add(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> None:
        """Collect one level's (or one class's) selected boxes [n, 4], scores [n] and labels [n]."""
        self.boxes.append(boxes)
        self.scores.append(scores)
        self.labels.append(labels)

    def finish(self) -> dict[str, Tensor]:
        """The image's detections (:func:`finish_detections` on everything added)."""
        return finish_detections(
            torch.cat(self.boxes), torch.cat(self.scores), torch.cat(self.labels),
            nms_thresh=self.model.nms_thresh, detections_per_img=self.model.detections_per_img,
            record_candidates=self.model.record_candidates,
        )


class StatsMixin:
    """Holds the detached statistics of the last training forward: ``harmonic_stats`` the 0-dim ones
    (:func:`harmonic.models.get_stats`), ``harmonic_samples`` the per-positive tensors [P] whose keys start
    with ``"samples/"`` (:func:`harmonic.models.get_samples`). Recording keeps references only: no copy,
    no host synchronization."""

    harmonic_stats: dict[str, Tensor]
    harmonic_samples: dict[str, Tensor]

    def _init_stats(self) -> None:
        self.harmonic_stats = {}
        self.harmonic_samples = {}

    def _record_stats(self, stats: dict[str, Tensor]) -> None:
        self.harmonic_stats = {k: v.detach() for k, v in stats.items() if not k.startswith("samples/")}
        self.harmonic_samples = {k[len("samples/"):]: v.detach() for k, v in stats.items() if k.startswith("samples/")}


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def to_float32(value: Any) -> Any:
    """``value`` with every float16 / bfloat16 tensor in it (nested in dicts, lists and tuples) cast to
    float32; other tensors and objects are returned as they are."""
    if isinstance(value, Tensor):
        return value.float() if value.dtype in _LOW_PRECISION else value
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v) for v in value)
    return value


def _device_types(value: Any, found: set[str]) -> set[str]:
    if isinstance(value, Tensor):
        found.add(value.device.type)
    elif isinstance(value, dict):
        for v in value.values():
            _device_types(v, found)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _device_types(v, found)
    return found


def float32_losses(method):
    """Decorator of a detector's loss step: it runs in float32 whatever the autocast of the forward pass.

    The head outputs it receives are cast to float32 and autocast is disabled inside, so the losses, box
    IoU and the Harmonic factors are computed in float32 while the network itself may run in bfloat16 or
    float16 (:mod:`harmonic.engine.precision`).
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in sorted(_device_types((args, kwargs), set())):
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return method(self, *to_float32(args), **to_float32(kwargs))

    return wrapper

