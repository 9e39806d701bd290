"""Detection transforms: ``torchvision.transforms.v2`` applied to an ``(image, target)`` pair, keeping
boxes, labels, areas, instance masks and the crowd (ignore) boxes consistent."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from harmonic.utils.checks import is_int


class DetectionTransform:
    """Apply ``torchvision.transforms.v2`` transforms to an ``(image, target)`` pair of :class:`CocoDetection`.

    Boxes and crowd boxes go through the transforms as *one* ``BoundingBoxes`` (the v2 convention is one
    box tensor per sample), with the row index passed as ``"labels"``; afterwards the rows are split back,
    so any v2 transform, including ones that drop boxes (``SanitizeBoundingBoxes``, ``RandomIoUCrop``),
    keeps ``boxes``, ``labels``, ``area`` and ``crowd_boxes`` consistent. Boxes are then clipped to the
    image and those left with zero width or height are removed (the rule :class:`CocoDetection` applies
    at load time; ``SanitizeBoundingBoxes`` is not used for this because its ``min_size >= 1`` would also
    drop sub-pixel boxes that the dataset keeps). ``area`` is rescaled by the change of each box's area,
    which is exact for flips and resizes.

    A target's ``masks`` ([n, H, W], one per box; :class:`CocoDetection` with ``masks=True``) go through the
    same transforms as a ``tv_tensors.Mask`` (flipped, resized with nearest-neighbour sampling, cropped as
    the image) and keep the rows of the boxes that are kept; they come out as a ``tv_tensors.Mask`` of the
    same dtype, the transformed image's size.
    """

    def __init__(self, transforms: Sequence[Callable] = ()) -> None:
        from torchvision.transforms import v2

        self.transforms = list(transforms)
        self._pipeline = v2.Compose(self.transforms) if self.transforms else None

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        from torchvision import tv_tensors

        height, width = image.shape[-2:]
        boxes = torch.as_tensor(target["boxes"]).reshape(-1, 4).as_subclass(torch.Tensor)
        crowd = torch.as_tensor(target.get("crowd_boxes", torch.zeros(0, 4))).reshape(-1, 4).as_subclass(torch.Tensor)
        n = boxes.shape[0]
        every = torch.cat([boxes, crowd.to(boxes)])
        rows = torch.arange(every.shape[0])
        masks = target.get("masks")
        if masks is not None:
            masks = torch.as_tensor(masks).as_subclass(torch.Tensor)
            if masks.shape != (n, height, width):
                raise ValueError(
                    f"target 'masks' must have shape [{n}, {height}, {width}] (one per box, the image's size), "
                    f"got {list(masks.shape)}"
                )
        if self._pipeline is not None:
            sample = {
                "boxes": tv_tensors.BoundingBoxes(every, format="XYXY", canvas_size=(height, width)),
                "labels": rows,
            }
            if masks is not None:
                sample["masks"] = tv_tensors.Mask(masks)
            image, sample = self._pipeline(tv_tensors.Image(image), sample)
            image = image.as_subclass(torch.Tensor)
            every = sample["boxes"].as_subclass(torch.Tensor).reshape(-1, 4)
            rows = sample["labels"].as_subclass(torch.Tensor)
            if masks is not None:
                masks = sample["masks"].as_subclass(torch.Tensor)
        new_h, new_w = image.shape[-2:]
        every = torch.stack(
            [every[:, 0].clamp(0, new_w), every[:, 1].clamp(0, new_h), every[:, 2].clamp(0, new_w), every[:, 3].clamp(0, new_h)],
            dim=1,
        )
        valid = (every[:, 2] > every[:, 0]) & (every[:, 3] > every[:, 1])
        every, rows = every[valid], rows[valid]
        is_object = rows < n
        kept = rows[is_object]
        out = dict(target)
        out["boxes"] = tv_tensors.BoundingBoxes(every[is_object], format="XYXY", canvas_size=(new_h, new_w))
        out["labels"] = target["labels"][kept]
        out["crowd_boxes"] = every[~is_object]
        if masks is not None:
            out["masks"] = tv_tensors.Mask(masks[kept])
        if "area" in target:
            old = boxes[kept]
            ratio = _box_area(every[is_object]) / _box_area(old).clamp_min(torch.finfo(old.dtype).tiny)
            out["area"] = target["area"][kept] * ratio.to(target["area"].dtype)
        return image, out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms!r})"


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def build_transforms(
    train: bool,
    *,
    flip_prob: float = 0.5,
    min_size: int | None = None,
    max_size: int | None = None,
    extra: Sequence[Callable] = (),
) -> DetectionTransform:
    """The project's detection transforms.

    Training: random horizontal flip with probability ``flip_prob``; evaluation: no flip. Both resize
    only when ``min_size`` (shorter side) and/or ``max_size`` (cap on the longer side) is given:
    torchvision detectors resize internally, so the default is no resize. ``extra`` v2 transforms run
    after these. The result always clips boxes and removes empty ones (see :class:`DetectionTransform`).
    The paper's augmentation was not recovered; a horizontal flip is what the torchvision detection
    references use for their COCO recipes.
    """
    from torchvision.transforms import v2

    if not (isinstance(flip_prob, (int, float)) and 0.0 <= flip_prob <= 1.0):
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob!r}")
    for name, value in (("min_size", min_size), ("max_size", max_size)):
        if value is not None and not (is_int(value) and value > 0):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if min_size is not None and max_size is not None and max_size <= min_size:
        raise ValueError(f"max_size ({max_size}) must be greater than min_size ({min_size})")
    steps: list[Callable] = []
    if train and flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=flip_prob))
    if min_size is not None or max_size is not None:
        steps.append(v2.Resize(size=min_size, max_size=max_size, antialias=True))
    steps.extend(extra)
    return DetectionTransform(steps)
