"""COCO-format detection datasets: :class:`CocoDetection` reads any COCO annotation file (pycocotools) and
validates it whole at construction, so a bad file fails before the first epoch with an error naming the
file and the id."""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from harmonic.utils.checks import is_int, is_number


class DatasetError(ValueError):
    """A dataset file (annotation JSON, image) that cannot be used; the message names the file and id."""


class DatasetWarning(UserWarning):
    """Something in a dataset was repaired or dropped (issued once per dataset, with a count)."""


# --------------------------------------------------------------------------------------------------
# COCO-format dataset
# --------------------------------------------------------------------------------------------------

_REQUIRED_KEYS = ("images", "annotations", "categories")


def load_coco_json(ann_file: str | os.PathLike) -> dict:
    """Read a COCO annotation file; malformed JSON raises :class:`DatasetError` with line and column."""
    path = Path(ann_file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"annotation file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start}): is this a JSON file?") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        raise DatasetError(f"{path}: missing top-level key(s) {missing}; a COCO file needs {list(_REQUIRED_KEYS)}")
    for key in _REQUIRED_KEYS:
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: {key!r} must be a list, got {type(data[key]).__name__}")
    return data


def load_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to a ``uint8`` array ``[H, W, 3]``.

    Grayscale, palette and CMYK images are converted to RGB; an alpha channel (RGBA, LA, palette with
    transparency) is dropped, keeping the stored colour values (no compositing over a background).
    16-bit grayscale is scaled to 8 bits. Raises ``OSError``/``PIL.UnidentifiedImageError`` when the
    file cannot be decoded (:class:`CocoDetection` turns these into a :class:`DatasetError`).
    """
    with Image.open(path) as img:
        img.load()
        if img.mode.startswith("I;16"):
            arr = np.asarray(img).astype(np.float32) / 257.0
            gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        if img.mode in ("P", "PA"):
            img = img.convert("RGBA")  # a palette's transparency is expressed through alpha first
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.array(img, dtype=np.uint8)


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset for torchvision detectors.

    ``dataset[i] -> (image, target)`` with ``image`` a float32 tensor ``[3, H, W]`` in ``[0, 1]`` and
    ``target`` a dict:

    * ``"boxes"``: ``tv_tensors.BoundingBoxes`` (XYXY, float32 ``[n, 4]``, absolute pixels), converted
      from COCO ``[x, y, w, h]`` and clipped to the image; ``iscrowd=1`` annotations are not in it;
    * ``"labels"``: int64 ``[n]``, contiguous ``1..K`` in increasing category id (0 is background, as
      torchvision detectors expect); :attr:`label_to_cat_id` maps them back for evaluation;
    * ``"image_id"``: int, the COCO image id;
    * ``"crowd_boxes"``: float32 ``[m, 4]`` XYXY, the ``iscrowd=1`` annotations, kept as ignore regions;
    * ``"area"``: float32 ``[n]``, the annotation's ``"area"`` (its box area when absent);
    * ``"orig_size"``: ``(H, W)`` of the stored image, before any transform;
    * ``"masks"``, only with ``masks=True`` (for detectors that predict masks, e.g. Mask R-CNN):
      ``tv_tensors.Mask`` uint8 ``[n, H, W]``, one binary instance mask per row of ``"boxes"``, decoded
      with pycocotools from each annotation's ``"segmentation"`` (COCO polygons, uncompressed RLE or
      compressed RLE). Crowd annotations get no mask: they stay ignore regions (``"crowd_boxes"``).

    Images need ``id``, ``file_name`` (relative to ``image_dir``), ``width`` and ``height``; annotations
    need ``id``, ``image_id``, ``category_id`` and ``bbox``. The whole file is validated here, not mid-epoch: malformed JSON, missing keys, missing
    ids, an unknown ``category_id``, a box with negative width or height, duplicate ids and (with
    ``check_files``) missing image files raise :class:`DatasetError` naming the file and the id. Boxes
    with zero width or height after clipping are dropped with one :class:`DatasetWarning` giving the
    count. Images without annotations are kept. With ``masks=True`` every non-crowd annotation also needs
    a ``"segmentation"``: a non-empty list of polygons (each an even number >= 6 of coordinates) or an RLE
    dict ``{"size": [height, width], "counts": ...}`` of its image's size; anything else raises
    :class:`DatasetError` naming the file and the annotation id.

    ``transforms``: a callable ``(image, target) -> (image, target)``, e.g. :func:`build_transforms`.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Callable | None = None,
        *,
        check_files: bool = True,
        masks: bool = False,
    ) -> None:
        if not isinstance(masks, bool):
            raise TypeError(f"CocoDetection: masks must be True or False, got {masks!r}")
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.masks = masks
        data = load_coco_json(self.ann_file)
        self._categories(data["categories"])
        self._images(data["images"])
        self._annotations(data["annotations"])
        if check_files:
            self._check_files()
        self.coco = _make_coco(data)

    # -- construction-time validation ------------------------------------------------------------

    def _categories(self, categories: list) -> None:
        seen: dict[int, str] = {}
        for k, cat in enumerate(categories):
            if not isinstance(cat, dict) or not is_int(cat.get("id")):
                raise DatasetError(f"{self.ann_file}: categories[{k}] needs an integer 'id'")
            if cat["id"] in seen:
                raise DatasetError(f"{self.ann_file}: duplicate category id {cat['id']}")
            seen[cat["id"]] = str(cat.get("name", cat["id"]))
        cat_ids = sorted(seen)
        self.cat_id_to_label: dict[int, int] = {cid: k + 1 for k, cid in enumerate(cat_ids)}
        self.label_to_cat_id: dict[int, int] = {k + 1: cid for k, cid in enumerate(cat_ids)}
        self.class_names: list[str] = [seen[cid] for cid in cat_ids]
        self.num_classes: int = len(cat_ids)

    def _images(self, images: list) -> None:
        self._info: dict[int, tuple[str, int, int]] = {}
        for k, img in enumerate(images):
            if not isinstance(img, dict) or not is_int(img.get("id")):
                raise DatasetError(f"{self.ann_file}: images[{k}] needs an integer 'id'")
            iid = img["id"]
            if iid in self._info:
                raise DatasetError(f"{self.ann_file}: duplicate image id {iid}")
            for key in ("file_name", "width", "height"):
                if key not in img:
                    raise DatasetError(f"{self.ann_file}: image id {iid}: missing key {key!r}")
            if not isinstance(img["file_name"], str) or not img["file_name"]:
                raise DatasetError(f"{self.ann_file}: image id {iid}: 'file_name' must be a non-empty string")
            if not (is_int(img["width"]) and is_int(img["height"]) and img["width"] > 0 and img["height"] > 0):
                raise DatasetError(
                    f"{self.ann_file}: image id {iid}: 'width'/'height' must be positive integers, "
                    f"got {img['width']!r}/{img['height']!r}"
                )
            self._info[iid] = (img["file_name"], img["width"], img["height"])
        self.ids: list[int] = sorted(self._info)

    def _annotations(self, annotations: list) -> None:
        per_image: dict[int, dict[str, list]] = {
            iid: {"boxes": [], "labels": [], "area": [], "crowd": [], "segmentation": []} for iid in self.ids
        }
        seen: set[int] = set()
        dropped: list[tuple[int, int]] = []
        for k, ann in enumerate(annotations):
            if not isinstance(ann, dict) or not is_int(ann.get("id")):
                raise DatasetError(f"{self.ann_file}: annotations[{k}] needs an integer 'id'")
            aid = ann["id"]
            if aid in seen:
                raise DatasetError(f"{self.ann_file}: duplicate annotation id {aid}")
            seen.add(aid)
            for key in ("image_id", "category_id", "bbox"):
                if key not in ann:
                    raise DatasetError(f"{self.ann_file}: annotation id {aid}: missing key {key!r}")
            iid = ann["image_id"]
            where = f"{self.ann_file}: annotation id {aid} (image id {iid})"
            if iid not in self._info:
                raise DatasetError(f"{where}: image id {iid} is not in 'images'")
            cid = ann["category_id"]
            if cid not in self.cat_id_to_label:
                known = sorted(self.cat_id_to_label)
                shown = known if len(known) <= 20 else [*known[:20], "..."]
                raise DatasetError(f"{where}: unknown category_id {cid!r}; known category ids: {shown}")
            bbox = ann["bbox"]
            if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
                raise DatasetError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
            x, y, w, h = (float(v) for v in bbox)
            if w < 0 or h < 0:
                raise DatasetError(f"{where}: negative box width/height in bbox [x, y, w, h] = {bbox}")
            crowd = ann.get("iscrowd", 0)
            if crowd not in (0, 1):
                raise DatasetError(f"{where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
            _, width, height = self._info[iid]
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x2 <= x1 or y2 <= y1:
                dropped.append((aid, iid))
                continue
            record = per_image[iid]
            if crowd:
                record["crowd"].append((x1, y1, x2, y2))
                continue
            area = ann.get("area", w * h)
            if not is_number(area) or area < 0:
                raise DatasetError(f"{where}: 'area' must be a finite number >= 0, got {area!r}")
            if self.masks:
                record["segmentation"].append(_checked_segmentation(ann.get("segmentation"), where, height, width))
            record["boxes"].append((x1, y1, x2, y2))
            record["labels"].append(self.cat_id_to_label[cid])
            record["area"].append(float(area))
        if dropped:
            aid, iid = dropped[0]
            warnings.warn(
                f"{self.ann_file}: dropped {len(dropped)} annotation(s) whose box has zero width or height "
                f"after clipping to the image (first: annotation id {aid}, image id {iid})",
                DatasetWarning,
                stacklevel=3,
            )
        self.num_dropped = len(dropped)
        self._targets = {
            iid: (
                np.asarray(r["boxes"], dtype=np.float32).reshape(-1, 4),
                np.asarray(r["labels"], dtype=np.int64),
                np.asarray(r["area"], dtype=np.float32),
                np.asarray(r["crowd"], dtype=np.float32).reshape(-1, 4),
            )
            for iid, r in per_image.items()
        }
        self._segmentations = {iid: r["segmentation"] for iid, r in per_image.items()} if self.masks else {}

    def _check_files(self) -> None:
        missing = [iid for iid in self.ids if not (self.image_dir / self._info[iid][0]).is_file()]
        if missing:
            iid = missing[0]
            raise DatasetError(
                f"{self.ann_file}: image id {iid}: image file not found: {self.image_dir / self._info[iid][0]} "
                f"({len(missing)} of {len(self.ids)} image files are missing under {self.image_dir})"
            )

    # -- items -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self._info[self.ids[index]][0]

    def load_image(self, index: int) -> torch.Tensor:
        """The image of item ``index`` as float32 ``[3, H, W]`` in ``[0, 1]``, without transforms."""
        iid = self.ids[index]
        file_name, width, height = self._info[iid]
        path = self.image_dir / file_name
        try:
            arr = load_image_rgb(path)
        except FileNotFoundError:
            raise DatasetError(f"{self.ann_file}: image id {iid}: image file not found: {path}") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DatasetError(f"{self.ann_file}: image id {iid}: cannot read image {path}: {exc}") from None
        if arr.shape[:2] != (height, width):
            raise DatasetError(
                f"{self.ann_file}: image id {iid}: {path} is {arr.shape[1]}x{arr.shape[0]} (WxH) but the "
                f"annotation file says {width}x{height}"
            )
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div_(255.0)

    def load_target(self, index: int) -> dict[str, Any]:
        """The target of item ``index`` before transforms (see the class docstring for the fields)."""
        from torchvision import tv_tensors

        iid = self.ids[index]
        _, width, height = self._info[iid]
        boxes, labels, area, crowd = self._targets[iid]
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes.copy()), format="XYXY", canvas_size=(height, width)),
            "labels": torch.from_numpy(labels.copy()),
            "image_id": iid,
            "crowd_boxes": torch.from_numpy(crowd.copy()),
            "area": torch.from_numpy(area.copy()),
            "orig_size": (height, width),
        }
        if self.masks:
            target["masks"] = tv_tensors.Mask(decode_segmentations(self._segmentations[iid], height, width))
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self.load_image(index), self.load_target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ann_file={str(self.ann_file)!r}, images={len(self)}, "
            f"classes={self.num_classes}, transforms={self.transforms!r})"
        )


def _checked_segmentation(segmentation: Any, where: str, height: int, width: int) -> Any:
    """``segmentation`` if it is COCO polygons or an RLE dict for a ``height`` x ``width`` image, else a
    :class:`DatasetError` prefixed with ``where`` (the file and the annotation id)."""
    if segmentation is None:
        raise DatasetError(f"{where}: missing key 'segmentation' (instance masks were asked for: masks=True)")
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(is_int(v) for v in size)):
            raise DatasetError(f"{where}: RLE 'segmentation' needs 'size' [height, width], got {size!r}")
        if list(size) != [height, width]:
            raise DatasetError(
                f"{where}: RLE 'segmentation' has size {list(size)} but its image is [{height}, {width}] (height, width)"
            )
        if not (isinstance(counts, str) or (isinstance(counts, list) and all(is_int(c) and c >= 0 for c in counts))):
            raise DatasetError(
                f"{where}: RLE 'segmentation' needs 'counts' (a compressed string or a list of run lengths)"
            )
        if isinstance(counts, list) and sum(counts) != height * width:
            raise DatasetError(
                f"{where}: uncompressed RLE 'counts' sum to {sum(counts)}, not height x width = {height * width}"
            )
        return segmentation
    if isinstance(segmentation, list) and segmentation:
        for k, polygon in enumerate(segmentation):
            if not (
                isinstance(polygon, (list, tuple)) and len(polygon) >= 6 and len(polygon) % 2 == 0
                and all(is_number(v) for v in polygon)
            ):
                raise DatasetError(
                    f"{where}: polygon {k} of 'segmentation' must be an even number >= 6 of coordinates "
                    "[x1, y1, x2, y2, ...]"
                )
        return segmentation
    raise DatasetError(
        f"{where}: 'segmentation' must be a non-empty list of polygons or an RLE dict (instance masks were "
        f"asked for: masks=True), got {segmentation!r:.80}"
    )


def decode_segmentations(segmentations: Sequence[Any], height: int, width: int) -> torch.Tensor:
    """COCO ``segmentation`` values (polygons, uncompressed or compressed RLE) -> uint8 masks ``[n, height, width]``.

    Polygons are rasterized by pycocotools (the rule COCOeval uses for ``iouType="segm"``); an object of
    several polygons is their union.
    """
    from pycocotools import mask as mask_utils

    masks = np.zeros((len(segmentations), height, width), dtype=np.uint8)
    for k, segmentation in enumerate(segmentations):
        if isinstance(segmentation, list):  # polygons: one RLE each, merged
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        masks[k] = mask_utils.decode(rle)
    return torch.from_numpy(masks)


def _make_coco(data: dict):
    """A pycocotools ``COCO`` over an already loaded and validated dict (its index messages silenced)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def collate_fn(batch: Sequence[tuple[Any, Any]]) -> tuple[list, list]:
    """``[(image, target), ...] -> ([images], [targets])``: detectors take lists, images differ in size."""
    return [item[0] for item in batch], [item[1] for item in batch]


def targets_to(targets: Sequence[dict[str, Any]], device: torch.device | str) -> list[dict[str, Any]]:
    """Move every tensor of every target to ``device`` (ints and tuples stay as they are)."""
    return [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]

