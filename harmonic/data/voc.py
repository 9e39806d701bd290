"""PASCAL VOC XML annotations -> one COCO-format JSON file, readable by :class:`harmonic.data.CocoDetection`.

Box convention. VOC ``<bndbox>`` stores ``xmin, ymin, xmax, ymax`` as 1-based, inclusive pixel indices
(a box covering only the top-left pixel is ``1, 1, 1, 1``). COCO boxes are ``[x, y, w, h]`` in continuous
0-based coordinates where pixel ``i`` spans ``[i, i + 1)``. So::

    x = xmin - 1,   y = ymin - 1,   w = xmax - xmin + 1,   h = ymax - ymin + 1

i.e. in XYXY the box is ``(xmin - 1, ymin - 1, xmax, ymax)`` and its area counts the pixels it covers.
(Other codebases subtract 1 from all four coordinates or from none; boxes then differ by one pixel.)

Difficult objects. VOC's evaluation ignores detections matched to ``difficult`` objects. The closest COCO
notion is an ignore region: by default a difficult object becomes an ``iscrowd=1`` annotation (with
``"difficult": 1`` kept in the annotation), which :class:`~harmonic.data.CocoDetection` turns into a
``crowd_boxes`` entry and pycocotools' COCOeval ignores. COCOeval matches a crowd region by
intersection over the *detection's* area rather than IoU, a small difference from VOC's rule.
``difficult="keep"`` keeps them as ordinary objects, ``difficult="drop"`` leaves them out.

Command line: ``python -m harmonic voc2coco --voc-root VOCdevkit/VOC2007 --split trainval --out FILE``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from harmonic.utils.files import atomic_write_json

__all__ = ["VOC_CLASSES", "VocError", "parse_voc_xml", "read_image_set", "voc_to_coco"]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

DIFFICULT_MODES = ("crowd", "keep", "drop")


class VocError(ValueError):
    """A VOC annotation that cannot be converted; the message names the XML (or image set) file."""


def _text(node: ET.Element, path: str, xml_file: Path, where: str = "") -> str:
    child = node.find(path)
    if child is None or child.text is None or not child.text.strip():
        raise VocError(f"{xml_file}: missing <{path}>{where}")
    return child.text.strip()


def _number(node: ET.Element, path: str, xml_file: Path, where: str = "") -> float:
    value = _text(node, path, xml_file, where)
    try:
        return float(value)
    except ValueError:
        raise VocError(f"{xml_file}: <{path}>{where} is not a number: {value!r}") from None


def parse_voc_xml(xml_file: str | os.PathLike) -> dict[str, Any]:
    """Read one VOC annotation file.

    Returns ``{"filename", "width", "height", "objects": [{"name", "bbox": (xmin, ymin, xmax, ymax),
    "difficult": bool, "truncated": bool}]}`` with the VOC 1-based inclusive coordinates as written.
    Raises :class:`VocError` naming the file for malformed XML, missing fields, non-numeric or inverted
    boxes. A missing ``<filename>`` defaults to the XML file's stem plus ``.jpg``.
    """
    xml_file = Path(xml_file)
    try:
        root = ET.parse(xml_file).getroot()
    except FileNotFoundError:
        raise VocError(f"VOC annotation file not found: {xml_file}") from None
    except ET.ParseError as exc:
        raise VocError(f"{xml_file}: malformed XML ({exc})") from None
    if root.tag != "annotation":
        raise VocError(f"{xml_file}: root element is <{root.tag}>, expected <annotation>")
    filename_node = root.find("filename")
    filename = (filename_node.text or "").strip() if filename_node is not None else ""
    filename = filename or f"{xml_file.stem}.jpg"
    if root.find("size") is None:
        raise VocError(f"{xml_file}: missing <size>")
    width = _number(root, "size/width", xml_file)
    height = _number(root, "size/height", xml_file)
    if width <= 0 or height <= 0 or width != int(width) or height != int(height):
        raise VocError(f"{xml_file}: <size> must hold positive integers, got width={width:g}, height={height:g}")
    objects = []
    for k, obj in enumerate(root.findall("object")):
        where = f" in object {k}"
        name = _text(obj, "name", xml_file, where)
        where = f" in object {k} ({name})"
        if obj.find("bndbox") is None:
            raise VocError(f"{xml_file}: missing <bndbox>{where}")
        xmin, ymin, xmax, ymax = (_number(obj, f"bndbox/{key}", xml_file, where) for key in ("xmin", "ymin", "xmax", "ymax"))
        if xmax < xmin or ymax < ymin:
            raise VocError(f"{xml_file}: inverted box{where}: xmin={xmin:g}, ymin={ymin:g}, xmax={xmax:g}, ymax={ymax:g}")
        flags = {}
        for flag in ("difficult", "truncated"):
            node = obj.find(flag)
            raw = (node.text or "0").strip() if node is not None else "0"
            if raw not in ("0", "1"):
                raise VocError(f"{xml_file}: <{flag}>{where} must be 0 or 1, got {raw!r}")
            flags[flag] = raw == "1"
        objects.append({"name": name, "bbox": (xmin, ymin, xmax, ymax), **flags})
    return {"filename": filename, "width": int(width), "height": int(height), "objects": objects}


def read_image_set(image_set: str | os.PathLike) -> list[str]:
    """Image ids of a VOC ``ImageSets/Main/*.txt`` file (first token per line; class-specific files
    such as ``cat_train.txt`` carry a second token, which is ignored)."""
    path = Path(image_set)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise VocError(f"image set file not found: {path}") from None
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise VocError(f"{path}: the image set is empty")
    return ids


def _xml_files(source: str | os.PathLike | Iterable[str | os.PathLike], image_set: str | os.PathLike | None) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise VocError(f"VOC annotations folder not found: {folder}")
        if image_set is None:
            files = sorted(folder.glob("*.xml"))
            if not files:
                raise VocError(f"{folder}: no .xml files in this folder")
            return files
        image_ids = read_image_set(image_set)
        files = [folder / f"{image_id}.xml" for image_id in image_ids]
        for image_id, file in zip(image_ids, files):
            if not file.is_file():
                raise VocError(f"{image_set}: image id {image_id!r} has no annotation file {file}")
        return files
    if image_set is not None:
        raise VocError("image_set selects files from an annotations folder; pass a folder, not a list of files")
    files = [Path(f) for f in source]
    if not files:
        raise VocError("no VOC XML files given")
    return files


def voc_to_coco(
    source: str | os.PathLike | Iterable[str | os.PathLike],
    out_json: str | os.PathLike | None = None,
    *,
    image_set: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = VOC_CLASSES,
    difficult: str = "crowd",
) -> dict[str, Any]:
    """Convert VOC XML annotations to one COCO dict, and write it atomically to ``out_json`` if given.

    ``source``: a folder of ``*.xml`` files (all of them, sorted, or those listed in ``image_set``) or
    a list of XML files (in that order). Image ids are ``1..N`` in that order (the VOC name is kept as
    ``"voc_id"``); category ids are ``1..K`` in the order of ``class_names`` (default: the 20 VOC classes;
    ``None``: the sorted names found in the files). Boxes follow the conversion in the module docstring;
    ``difficult``: ``"crowd"`` (default, ignore regions), ``"keep"`` or ``"drop"``.
    Raises :class:`VocError` naming the XML file for malformed XML, missing fields or an unknown class.
    """
    if difficult not in DIFFICULT_MODES:
        raise ValueError(f"difficult must be one of {list(DIFFICULT_MODES)}, got {difficult!r}")
    files = _xml_files(source, image_set)
    parsed = [(f, parse_voc_xml(f)) for f in files]
    if class_names is None:
        class_names = sorted({obj["name"] for _, record in parsed for obj in record["objects"]})
    class_names = list(class_names)
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names has duplicates: {class_names}")
    cat_ids = {name: k + 1 for k, name in enumerate(class_names)}
    images, annotations = [], []
    for image_id, (xml_file, record) in enumerate(parsed, start=1):
        images.append(
            {"id": image_id, "file_name": record["filename"], "width": record["width"], "height": record["height"],
             "voc_id": xml_file.stem}
        )
        for k, obj in enumerate(record["objects"]):
            if obj["name"] not in cat_ids:
                raise VocError(
                    f"{xml_file}: object {k} has unknown class {obj['name']!r}; known classes: {class_names} "
                    "(pass class_names=None to take the classes from the files)"
                )
            if obj["difficult"] and difficult == "drop":
                continue
            xmin, ymin, xmax, ymax = obj["bbox"]
            w, h = xmax - xmin + 1.0, ymax - ymin + 1.0
            crowd = int(obj["difficult"] and difficult == "crowd")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_ids[obj["name"]],
                    "bbox": [xmin - 1.0, ymin - 1.0, w, h],
                    "area": w * h,
                    "iscrowd": crowd,
                    "difficult": int(obj["difficult"]),
                    "truncated": int(obj["truncated"]),
                    "segmentation": [],
                }
            )
    coco = {
        "info": {"description": "converted from PASCAL VOC XML by harmonic.data.voc", "difficult": difficult},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "none"} for name, cid in cat_ids.items()],
    }
    if out_json is not None:
        atomic_write_json(out_json, coco)
    return coco
