"""Data: COCO-format datasets (:mod:`.coco`), their transforms (:mod:`.transforms`), the generated default
dataset (:mod:`.shapes`: irregular, occluding shapes on clutter) and the PASCAL VOC converter
(:mod:`.voc`). :func:`build_dataset` turns a dataset spec (a preset name, a COCO JSON file or a folder)
into a :class:`CocoDetection` with its transforms.
"""

from __future__ import annotations

import os
from pathlib import Path

from harmonic.data.coco import (
    CocoDetection,
    DatasetError,
    DatasetWarning,
    collate_fn,
    load_coco_json,
    load_image_rgb,
    targets_to,
)
from harmonic.data.shapes import (
    CATEGORIES,
    GENERATOR_VERSION,
    PRESETS,
    SPLITS,
    ShapesParams,
    default_data_root,
    ensure_dataset,
    ensure_default_dataset,
    generate_dataset,
    render_shapes_image,
)
from harmonic.data.transforms import DetectionTransform, build_transforms

__all__ = [
    "CocoDetection",
    "DatasetError",
    "DatasetWarning",
    "DetectionTransform",
    "build_dataset",
    "build_transforms",
    "collate_fn",
    "load_coco_json",
    "load_image_rgb",
    "resolve_dataset",
    "targets_to",
    "CATEGORIES",
    "GENERATOR_VERSION",
    "PRESETS",
    "SPLITS",
    "ShapesParams",
    "default_data_root",
    "ensure_dataset",
    "ensure_default_dataset",
    "generate_dataset",
    "render_shapes_image",
]


def resolve_dataset(
    spec: str | os.PathLike,
    split: str,
    image_dir: str | os.PathLike | None = None,
    *,
    root: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """``(image_dir, ann_file)`` for a dataset spec and split.

    ``spec`` is one of: a preset name (``"shapes"``, ``"shapes-tiny"``: generated under ``root`` on first
    use; ``split`` is ``"train"`` or ``"val"``); a COCO annotation JSON (``split`` only names it; images in
    ``image_dir``, default the ``images/`` folder beside the JSON if there is one, else the JSON's folder);
    or a folder holding ``<split>.json`` and ``images/`` (as written by :func:`generate_dataset`).
    """
    spec_str = os.fspath(spec)
    if spec_str in PRESETS:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)} for preset {spec_str!r}, got {split!r}")
        if image_dir is not None:
            raise ValueError(f"image_dir is only for annotation files, not for preset {spec_str!r}")
        image_path, ann_file = ensure_default_dataset(spec_str, root)[split]
        return Path(image_path), Path(ann_file)
    path = Path(spec_str)
    if path.is_dir():
        ann_file = path / f"{split}.json"
        if not ann_file.is_file():
            raise DatasetError(f"{path}: no annotation file {ann_file.name} for split {split!r} in this folder")
        return (Path(image_dir) if image_dir is not None else path / "images"), ann_file
    if path.suffix.lower() == ".json" or path.is_file():
        if not path.is_file():
            raise DatasetError(f"annotation file not found: {path}")
        if image_dir is None:
            image_dir = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
        return Path(image_dir), path
    raise DatasetError(
        f"dataset {spec_str!r} is neither a preset ({', '.join(sorted(PRESETS))}), nor a COCO annotation "
        "JSON file, nor a folder with <split>.json"
    )


def build_dataset(
    name_or_ann_file: str | os.PathLike,
    split: str,
    image_dir: str | os.PathLike | None = None,
    train: bool | None = None,
    *,
    root: str | os.PathLike | None = None,
    flip_prob: float = 0.5,
    min_size: int | None = None,
    max_size: int | None = None,
    check_files: bool = True,
    masks: bool = False,
) -> CocoDetection:
    """A :class:`CocoDetection` for a spec (see :func:`resolve_dataset`) with :func:`build_transforms`.

    ``train`` selects the training transforms (random flip); default: ``split == "train"``. ``masks``:
    targets also carry instance ``masks`` (for detectors that predict them; see :class:`CocoDetection`).
    """
    image_path, ann_file = resolve_dataset(name_or_ann_file, split, image_dir, root=root)
    train = (split == "train") if train is None else bool(train)
    transforms = build_transforms(train, flip_prob=flip_prob, min_size=min_size, max_size=max_size)
    return CocoDetection(image_path, ann_file, transforms, check_files=check_files, masks=masks)


# --------------------------------------------------------------------------------------------------
