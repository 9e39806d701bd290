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
intersection over the *detection's* area rather than IoU, a small difference from VOC's rule; the VOC
metric itself (:mod:`harmonic.evaluation.voc`, reported beside COCO AP for these files) treats them as the
devkit does.
``difficult="keep"`` keeps them as ordinary objects, ``difficult="drop"`` leaves them out.

Messy exports. An XML ``<filename>`` whose extension disagrees with the image actually shipped
(``000001.png`` in the XML, ``000001.jpg`` in ``JPEGImages/``) is corrected when an image folder is given
and exactly one file there has the same stem; the count of such fixes is in ``info["file_name_fixes"]``.
Splits converted separately share category ids when they get the same class list: the default 20 VOC
classes, an explicit list, or the categories of an earlier conversion (:func:`class_names_from_coco`,
``--classes-from`` on the command line).

The output's ``info`` carries ``"source_format": "pascal_voc"`` (and the converter's description), which
is how :mod:`harmonic.evaluation` knows to report the VOC metric beside COCO AP.

Command line: ``python -m harmonic voc2coco --voc-root VOCdevkit/VOC2007 --split trainval --out FILE``.
:func:`prepare_voc0712` builds the usual VOC07+12 trainval / VOC07 test pair from a ``VOCdevkit`` folder.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from harmonic.utils.files import atomic_write_json

__all__ = [
    "VOC_CLASSES",
    "UnknownClassError",
    "VocError",
    "class_names_from_coco",
    "merge_coco",
    "parse_voc_xml",
    "prepare_voc0712",
    "read_image_set",
    "voc0712_layout",
    "voc_to_coco",
]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

DIFFICULT_MODES = ("crowd", "keep", "drop")


SOURCE_FORMAT = "pascal_voc"
DESCRIPTION = "converted from PASCAL VOC XML by harmonic.data.voc"


class VocError(ValueError):
    """A VOC annotation that cannot be converted; the message names the XML (or image set) file."""


class UnknownClassError(VocError):
    """An object whose class is not in the class list; the message names the XML file and the class."""


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
    image_dir: str | os.PathLike | None = None,
    file_prefix: str = "",
) -> dict[str, Any]:
    """Convert VOC XML annotations to one COCO dict, and write it atomically to ``out_json`` if given.

    ``source``: a folder of ``*.xml`` files (all of them, sorted, or those listed in ``image_set``) or
    a list of XML files (in that order). Image ids are ``1..N`` in that order (the VOC name is kept as
    ``"voc_id"``); category ids are ``1..K`` in the order of ``class_names`` (default: the 20 VOC classes;
    ``None``: the sorted names found in the files). Boxes follow the conversion in the module docstring;
    ``difficult``: ``"crowd"`` (default, ignore regions), ``"keep"`` or ``"drop"``.

    ``image_dir``: the folder of the images (e.g. ``JPEGImages/``); when given, each ``<filename>`` is
    checked there, and one that is absent is replaced by the single file with the same stem (counted in
    ``info["file_name_fixes"]``); none or several such files raise :class:`VocError` naming the XML.
    ``file_prefix`` is prepended to every ``file_name`` (e.g. ``"VOC2007/JPEGImages/"`` for images read
    relative to the ``VOCdevkit`` folder). Raises :class:`VocError` naming the XML file for malformed XML
    or missing fields, :class:`UnknownClassError` for a class not in ``class_names``.
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
    shipped = _images_by_stem(Path(image_dir)) if image_dir is not None else None
    images, annotations = [], []
    fixes = 0
    for image_id, (xml_file, record) in enumerate(parsed, start=1):
        file_name = record["filename"]
        if shipped is not None:
            fixed = _shipped_file_name(file_name, xml_file, Path(image_dir), shipped)
            fixes += fixed != file_name
            file_name = fixed
        images.append(
            {"id": image_id, "file_name": file_prefix + file_name, "width": record["width"],
             "height": record["height"], "voc_id": xml_file.stem}
        )
        for k, obj in enumerate(record["objects"]):
            if obj["name"] not in cat_ids:
                raise UnknownClassError(
                    f"{xml_file}: object {k} has unknown class {obj['name']!r}; known classes: {class_names}"
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
        "info": {"description": DESCRIPTION, "source_format": SOURCE_FORMAT, "difficult": difficult,
                 "file_name_fixes": fixes},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "none"} for name, cid in cat_ids.items()],
    }
    if out_json is not None:
        atomic_write_json(out_json, coco)
    return coco


def _images_by_stem(image_dir: Path) -> dict[str, list[str]]:
    """``stem -> file names`` of the files in ``image_dir`` (one listing, not one lookup per image)."""
    if not image_dir.is_dir():
        raise VocError(f"image folder not found: {image_dir}")
    by_stem: dict[str, list[str]] = {}
    with os.scandir(image_dir) as entries:
        for entry in entries:
            if entry.is_file():
                by_stem.setdefault(Path(entry.name).stem, []).append(entry.name)
    return by_stem


def _shipped_file_name(file_name: str, xml_file: Path, image_dir: Path, shipped: dict[str, list[str]]) -> str:
    """``file_name`` if it is in ``image_dir``, else the one file there with its stem; a VocError otherwise."""
    if file_name in shipped.get(Path(file_name).stem, ()):
        return file_name
    if (image_dir / file_name).is_file():  # e.g. a name with a subfolder
        return file_name
    candidates = sorted(shipped.get(Path(file_name).stem, []))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise VocError(f"{xml_file}: <filename> {file_name!r}: no such image in {image_dir}, "
                       f"nor any file with the stem {Path(file_name).stem!r}")
    raise VocError(f"{xml_file}: <filename> {file_name!r} is not in {image_dir}, and several files there share "
                   f"its stem: {candidates}; cannot tell which is the image")


def class_names_from_coco(coco_json: str | os.PathLike) -> list[str]:
    """The class list of an earlier conversion, so that another split gets the same category ids.

    Returns the category names of ``coco_json`` in id order. Raises :class:`VocError` naming the file when
    it is unreadable or its category ids are not ``1..K`` (the ids :func:`voc_to_coco` assigns).
    """
    path = Path(coco_json)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VocError(f"class list file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise VocError(f"{path}: cannot read it as JSON ({exc})") from None
    categories = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(categories, list) or not categories:
        raise VocError(f"{path}: no 'categories' list")
    try:
        pairs = sorted((int(c["id"]), str(c["name"])) for c in categories)
    except (KeyError, TypeError, ValueError):
        raise VocError(f"{path}: every category needs an integer 'id' and a 'name'") from None
    if [cid for cid, _ in pairs] != list(range(1, len(pairs) + 1)):
        raise VocError(f"{path}: category ids must be 1..{len(pairs)}, got {[cid for cid, _ in pairs]}")
    return [name for _, name in pairs]


def merge_coco(parts: Sequence[dict[str, Any]], description: str = "") -> dict[str, Any]:
    """One COCO dict from several conversions with identical categories (e.g. VOC2007 and VOC2012
    trainval): images and annotations renumbered ``1..N`` in order, ``info`` from the first part with
    ``"merged": [each part's info]``. Raises :class:`VocError` when the categories differ."""
    if not parts:
        raise VocError("merge_coco: nothing to merge")
    categories = parts[0]["categories"]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index, part in enumerate(parts):
        if part["categories"] != categories:
            raise VocError(f"merge_coco: part {index} has other categories than part 0; convert both with the "
                           "same class list")
        new_ids = {}
        for image in part["images"]:
            new_ids[image["id"]] = len(images) + 1
            images.append({**image, "id": len(images) + 1})
        for ann in part["annotations"]:
            annotations.append({**ann, "id": len(annotations) + 1, "image_id": new_ids[ann["image_id"]]})
    info = dict(parts[0]["info"])
    info["merged"] = [part["info"] for part in parts]
    info["file_name_fixes"] = sum(int(part["info"].get("file_name_fixes", 0)) for part in parts)
    if description:
        info["parts"] = description
    return {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


# (year folder, image set) of the VOC07+12 protocol: train on both trainval sets, test on VOC2007 test
VOC0712_TRAIN = (("VOC2007", "trainval"), ("VOC2012", "trainval"))
VOC0712_TEST = (("VOC2007", "test"),)
CACHE_VERSION = 1


def voc0712_layout(voc_root: str | os.PathLike) -> Path:
    """The ``VOCdevkit`` folder of ``voc_root`` (itself, or its ``VOCdevkit/`` subfolder), checked.

    Raises ``FileNotFoundError`` listing everything the VOC07+12 protocol needs that is missing:
    ``VOC2007/`` and ``VOC2012/`` with ``Annotations/``, ``JPEGImages/`` and the image sets
    ``ImageSets/Main/trainval.txt`` (both years) and ``test.txt`` (VOC2007).
    """
    root = Path(voc_root)
    if not (root / "VOC2007").exists() and (root / "VOCdevkit").is_dir():
        root = root / "VOCdevkit"
    needed = []
    for year, split in VOC0712_TRAIN + VOC0712_TEST:
        needed += [root / year / "Annotations", root / year / "JPEGImages", root / year / "ImageSets" / "Main" / f"{split}.txt"]
    missing = sorted({str(p) for p in needed if not p.exists()})
    if missing:
        raise FileNotFoundError(
            f"{voc_root} is not a VOCdevkit folder for VOC07+12: missing {missing} (expected VOC2007/ and VOC2012/, "
            "each with Annotations/, JPEGImages/ and ImageSets/Main/trainval.txt, and VOC2007/ImageSets/Main/test.txt)"
        )
    return root


def _source_stamp(root: Path, difficult: str) -> dict[str, Any]:
    """What the cached conversion depends on: the converter version, the mode, and each image set and
    annotation folder's size and modification time."""
    stamp: dict[str, Any] = {"cache_version": CACHE_VERSION, "difficult": difficult, "voc_root": str(root.resolve())}
    for year, split in VOC0712_TRAIN + VOC0712_TEST:
        for path in (root / year / "ImageSets" / "Main" / f"{split}.txt", root / year / "Annotations",
                     root / year / "JPEGImages"):
            st = path.stat()
            stamp[str(path.relative_to(root))] = [st.st_size if path.is_file() else None, st.st_mtime_ns]
    return stamp


def prepare_voc0712(
    voc_root: str | os.PathLike, cache_dir: str | os.PathLike, *, difficult: str = "crowd", log=print
) -> dict[str, str]:
    """Convert VOC07+12 once into ``cache_dir``; return the four paths a training config needs.

    Writes ``cache_dir/voc0712_trainval.json`` (VOC2007 trainval then VOC2012 trainval, merged) and
    ``cache_dir/voc07_test.json``, both with the 20 :data:`VOC_CLASSES` as category ids 1..20 and file
    names relative to the ``VOCdevkit`` folder (``VOC2007/JPEGImages/000005.jpg``), and a
    ``manifest.json``; a later call with an unchanged source (:func:`_source_stamp`) reuses them.
    Returns ``{"dataset", "image_dir", "val_dataset", "val_image_dir"}`` (the image folders are the
    ``VOCdevkit`` folder). Raises ``FileNotFoundError`` for an incomplete layout
    (:func:`voc0712_layout`) and :class:`VocError` for an annotation that cannot be converted.
    """
    root = voc0712_layout(voc_root)
    cache = Path(cache_dir)
    train_json, test_json, manifest = cache / "voc0712_trainval.json", cache / "voc07_test.json", cache / "manifest.json"
    stamp = _source_stamp(root, difficult)
    paths = {"dataset": str(train_json), "image_dir": str(root), "val_dataset": str(test_json), "val_image_dir": str(root)}
    try:
        if json.loads(manifest.read_text(encoding="utf-8")).get("source") == stamp and train_json.is_file() \
                and test_json.is_file():
            log(f"VOC07+12: reusing the conversion in {cache}")
            return paths
    except (OSError, ValueError):
        pass

    def convert(year: str, split: str) -> dict[str, Any]:
        return voc_to_coco(root / year / "Annotations", image_set=root / year / "ImageSets" / "Main" / f"{split}.txt",
                           difficult=difficult, image_dir=root / year / "JPEGImages", file_prefix=f"{year}/JPEGImages/")

    train = merge_coco([convert(y, s) for y, s in VOC0712_TRAIN], "VOC2007 trainval + VOC2012 trainval")
    test = convert(*VOC0712_TEST[0])
    atomic_write_json(train_json, train)
    atomic_write_json(test_json, test)
    atomic_write_json(manifest, {"source": stamp, "train_images": len(train["images"]),
                                 "test_images": len(test["images"])})
    fixes = train["info"]["file_name_fixes"] + test["info"]["file_name_fixes"]
    log(f"VOC07+12: {len(train['images'])} trainval and {len(test['images'])} test images converted into {cache}"
        + (f" ({fixes} <filename> extension(s) fixed to the shipped image)" if fixes else ""))
    return paths
