import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.ops import box_iou

import harmonic.data as data
import harmonic.data.shapes as shapes
from harmonic.cli import main as cli_main
from harmonic.data import CocoDetection, DatasetError, build_transforms, collate_fn, targets_to
from harmonic.data.shapes import (
    CATEGORIES,
    contact_sheet,
    ensure_dataset,
    ensure_default_dataset,
    generate_dataset,
)

# --------------------------------------------------------------------------------------------------
# the generated shapes dataset
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_default_dataset("shapes-tiny", root=tmp_path_factory.mktemp("data"))


def test_generator_is_deterministic(tmp_path, tiny):
    again = generate_dataset(tmp_path / "again", "shapes-tiny", seed=0)
    for split in ("train", "val"):
        assert tiny[split][1].read_text() == again[split][1].read_text()
    first = sorted(p.name for p in tiny["train"][0].iterdir())
    assert first == sorted(p.name for p in again["train"][0].iterdir()) and len(first) == 32
    for name in first:
        assert (tiny["train"][0] / name).read_bytes() == (again["train"][0] / name).read_bytes()
    other = generate_dataset(tmp_path / "other", "shapes-tiny", seed=1)
    assert other["train"][1].read_text() != tiny["train"][1].read_text()
    assert (other["train"][0] / first[0]).read_bytes() != (tiny["train"][0] / first[0]).read_bytes()


def test_a_larger_split_extends_the_smaller_one(tmp_path):
    # an image depends only on (seed, split, index): shapes-study-large's first images are shapes-study's
    base = dict(image_size=48, min_objects=1, max_objects=2, min_object_size=0.3, max_object_size=0.6)
    small = generate_dataset(tmp_path / "small", {**base, "num_train": 2, "num_val": 1})
    large = generate_dataset(tmp_path / "large", {**base, "num_train": 5, "num_val": 3})
    for split, count in (("train", 2), ("val", 1)):
        few, many = (json.loads(d[split][1].read_text()) for d in (small, large))
        assert few["images"] == many["images"][:count]
        assert few["annotations"] == [a for a in many["annotations"] if a["image_id"] <= count]
        assert len(many["images"]) > count
        for image in few["images"]:
            name = image["file_name"]
            assert (small[split][0] / name).read_bytes() == (large[split][0] / name).read_bytes()
    study, study_large = shapes.PRESETS["shapes-study"], shapes.PRESETS["shapes-study-large"]
    assert dataclasses.replace(study_large, num_train=study.num_train, num_val=study.num_val) == study
    assert (study_large.num_train, study_large.num_val) == (10 * study.num_train, 4 * study.num_val)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_generated_dataset_has_occlusions_scales_and_every_category(tiny):
    coco = json.loads(tiny["train"][1].read_text())
    assert {c["name"] for c in coco["categories"]} == set(CATEGORIES) and len(CATEGORIES) >= 4
    assert {a["category_id"] for a in coco["annotations"]} == {c["id"] for c in coco["categories"]}
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    overlapping_pairs = 0
    for anns in by_image.values():
        boxes = torch.tensor([a["bbox"] for a in anns])
        xyxy = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1)
        iou = torch.triu(box_iou(xyxy, xyxy), diagonal=1)
        overlapping_pairs += int((iou > 0.05).sum())
    assert overlapping_pairs >= 5
    fractions = [a["visible_fraction"] for a in coco["annotations"]]
    assert min(fractions) >= 0.2 - 1e-6  # nothing annotated is more than 80% hidden
    assert sum(f < 0.95 for f in fractions) >= 5  # and many are partly hidden
    sides = [max(a["bbox"][2], a["bbox"][3]) for a in coco["annotations"]]
    assert max(sides) / min(sides) > 3  # a range of scales
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 96 and y + h <= 96 and w > 0 and h > 0
        visible = mask_utils.decode(a["segmentation"])
        ys, xs = np.nonzero(visible)
        assert visible.sum() == a["area"] > 0
        assert xs.min() >= x and xs.max() < x + w and ys.min() >= y and ys.max() < y + h  # visible part in box


def test_generated_dataset_loads_through_cocodetection_and_dataloader(tiny):
    ds = CocoDetection(*tiny["train"], transforms=build_transforms(True))
    assert len(ds) == 24 and ds.num_classes == len(CATEGORIES) and ds.class_names == list(CATEGORIES)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=False, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 5
    assert all(img.shape == (3, 96, 96) and img.dtype == torch.float32 for img in images)
    assert [t["image_id"] for t in targets] == ds.ids[:5]
    assert all(1 <= int(t["labels"].min()) and int(t["labels"].max()) <= 5 for t in targets if len(t["labels"]))
    assert sum(len(t["boxes"]) for t in targets) >= 5
    moved = targets_to(targets, "cpu")
    assert isinstance(moved[0]["boxes"], tv_tensors.BoundingBoxes) and moved[0]["image_id"] == targets[0]["image_id"]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_generated_masks_are_the_visible_parts_and_load_for_mask_rcnn(tiny):
    """Each annotation's RLE ``segmentation`` is its shape minus the shapes drawn over it: an image's masks
    never overlap, and the partly hidden objects' masks are smaller than their whole shape."""
    coco = json.loads(tiny["train"][1].read_text())
    flipped = CocoDetection(*tiny["train"], transforms=build_transforms(True, flip_prob=1.0), masks=True)
    plain = CocoDetection(*tiny["train"], masks=True)
    hidden = 0
    for index in range(len(plain)):
        _, target = plain[index]
        masks = target["masks"]
        anns = [a for a in coco["annotations"] if a["image_id"] == target["image_id"]]
        assert masks.shape == (len(anns), 96, 96) and masks.dtype == torch.uint8
        if len(anns):
            assert int(masks.sum(0, dtype=torch.int64).max()) <= 1  # visible parts are disjoint
        for mask, ann in zip(masks, anns):
            assert np.array_equal(mask.numpy(), mask_utils.decode(ann["segmentation"]))
            assert int(mask.sum()) == ann["area"]
            hidden += ann["visible_fraction"] < 0.95
        _, flipped_target = flipped[index]
        assert torch.equal(flipped_target["masks"], masks.flip(-1))
    assert hidden >= 5


def test_cache_is_reused_and_regenerated_when_stale(tmp_path, monkeypatch):
    calls = []
    original = shapes.generate_dataset

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(shapes, "generate_dataset", counting)
    first = ensure_default_dataset("shapes-tiny", root=tmp_path)
    stamp = (first["root"] / "manifest.json").stat().st_mtime_ns
    second = ensure_default_dataset("shapes-tiny", root=tmp_path)
    assert len(calls) == 1 and second == first
    assert (first["root"] / "manifest.json").stat().st_mtime_ns == stamp
    assert first["root"] == tmp_path / "shapes-tiny" and first["train"][0] == tmp_path / "shapes-tiny" / "images"
    first["val"][1].unlink()  # a file missing -> regenerate
    ensure_default_dataset("shapes-tiny", root=tmp_path)
    assert len(calls) == 2 and first["val"][1].is_file()
    ensure_default_dataset("shapes-tiny", root=tmp_path, seed=3)  # another seed -> regenerate
    assert len(calls) == 3
    manifest = json.loads((first["root"] / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["version"] == shapes.GENERATOR_VERSION
    params = dict(manifest["params"], num_val=5)  # other parameters -> regenerate
    ensure_dataset(first["root"], params, seed=3)
    assert len(calls) == 4 and len(json.loads(first["val"][1].read_text())["images"]) == 5
    monkeypatch.setattr(shapes, "GENERATOR_VERSION", shapes.GENERATOR_VERSION + 1)  # new generator -> regenerate
    ensure_dataset(first["root"], params, seed=3)
    assert len(calls) == 5
    assert not list(tmp_path.glob(".shapes-tiny.tmp-*")) and not list(tmp_path.glob(".shapes-tiny.old-*"))


def test_interrupted_generation_never_looks_complete(tmp_path, monkeypatch):
    original = shapes.render_shapes_image
    count = [0]

    def failing(rng, params):
        count[0] += 1
        if count[0] == 5:
            raise KeyboardInterrupt
        return original(rng, params)

    monkeypatch.setattr(shapes, "render_shapes_image", failing)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_dataset("shapes-tiny", root=tmp_path)
    assert not (tmp_path / "shapes-tiny").exists()
    assert not list(tmp_path.glob(".shapes-tiny.tmp-*"))
    monkeypatch.setattr(shapes, "render_shapes_image", original)
    layout = ensure_default_dataset("shapes-tiny", root=tmp_path)
    assert len(json.loads(layout["train"][1].read_text())["images"]) == 24


def test_default_root_is_harmonic_data_then_cwd(tmp_path, monkeypatch):
    monkeypatch.setenv("HARMONIC_DATA", str(tmp_path / "env"))
    assert shapes.default_data_root() == tmp_path / "env"
    assert ensure_default_dataset("shapes-tiny")["root"] == tmp_path / "env" / "shapes-tiny"
    monkeypatch.delenv("HARMONIC_DATA")
    monkeypatch.chdir(tmp_path)
    assert shapes.default_data_root() == tmp_path / "data"


def test_generate_refuses_a_foreign_folder_and_bad_parameters(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match=r"mine is not empty and was not written by this generator"):
        generate_dataset(tmp_path / "mine", "shapes-tiny")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="unknown dataset preset 'shapes-huge'"):
        generate_dataset(tmp_path / "x", "shapes-huge")
    with pytest.raises(ValueError, match=r"unknown shapes parameter\(s\) \['colour'\]"):
        generate_dataset(tmp_path / "x", {"colour": 1})
    with pytest.raises(ValueError, match="max_objects"):
        generate_dataset(tmp_path / "x", {"min_objects": 3, "max_objects": 2})
    assert not (tmp_path / "x").exists()


def test_jpeg_images_and_images_without_objects(tmp_path):
    params = {"image_size": 64, "num_train": 3, "num_val": 1, "min_objects": 0, "max_objects": 1, "image_format": "jpg"}
    layout = generate_dataset(tmp_path / "jpg", params, seed=0)
    ds = CocoDetection(*layout["train"])
    assert [p.suffix for p in sorted(layout["train"][0].iterdir())] == [".jpg"] * 4
    assert len(ds) == 3 and ds[0][0].shape == (3, 64, 64)


def test_cli_generate(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["generate", "--preset", "shapes-tiny", "--out", str(out), "--seed", "2"]) == 0
    assert "generated in" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["seed"] == 2
    assert len(json.loads((out / "train.json").read_text())["images"]) == 24
    assert cli_main(["generate", "--preset", "shapes-tiny", "--out", str(out), "--seed", "2"]) == 0
    assert "reused" in capsys.readouterr().out




# --------------------------------------------------------------------------------------------------
# the names stay importable from harmonic.data
# --------------------------------------------------------------------------------------------------


def test_generator_names_are_reexported_from_harmonic_data():
    names = ["CATEGORIES", "GENERATOR_VERSION", "PRESETS", "ShapesParams", "default_data_root", "ensure_dataset",
             "ensure_default_dataset", "generate_dataset", "render_shapes_image"]
    for name in names:
        assert getattr(data, name) is getattr(shapes, name), name
        assert name in data.__all__ and name in dir(data)
    with pytest.raises(AttributeError, match="has no attribute 'contact_sheets'"):
        data.contact_sheets  # noqa: B018


def test_importing_shapes_first_has_no_import_cycle():
    code = (
        "import harmonic.data.shapes as s\n"
        "from harmonic.data import PRESETS, ShapesParams, generate_dataset\n"
        "assert PRESETS is s.PRESETS and generate_dataset is s.generate_dataset\n"
        "print(PRESETS['shapes-tiny'].image_size)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "96"


# --------------------------------------------------------------------------------------------------
# contact sheet
# --------------------------------------------------------------------------------------------------


def test_contact_sheet_size(tiny):
    sheet = contact_sheet(tiny)  # 8 of the 24 training images, 96 px enlarged twice, 4 columns
    assert sheet.mode == "RGB" and sheet.size == (4 * 192 + 5 * 4, 2 * 192 + 3 * 4)
    assert contact_sheet(tiny["train"], n=3).size == (3 * 192 + 4 * 4, 192 + 2 * 4)
    val = CocoDetection(*tiny["val"])
    assert contact_sheet(val, n=20, columns=5, scale=1).size == (5 * 96 + 6 * 4, 2 * 96 + 3 * 4)  # all 8 shown
    # the same sheet whichever way the dataset is given
    assert np.array_equal(np.asarray(contact_sheet(tiny, n=2)), np.asarray(contact_sheet(CocoDetection(*tiny["train"]), n=2)))


def test_contact_sheet_draws_pixels_and_boxes(tmp_path):
    Image.new("RGB", (20, 10), (10, 20, 30)).save(tmp_path / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 10}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [2, 2, 6, 4]}],
        "categories": [{"id": 5, "name": "a"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    sheet = contact_sheet((tmp_path, tmp_path / "ann.json"))
    assert sheet.size == (40 + 8, 20 + 8)  # one image: one column
    pad = 4
    assert sheet.getpixel((pad + 0, pad + 0)) == (10, 20, 30)  # the image, outside the box
    assert sheet.getpixel((pad + 30, pad + 15)) == (10, 20, 30)
    assert sheet.getpixel((0, 0)) == (255, 255, 255)  # the margin
    # the box [2, 2, 8, 6] enlarged twice spans x 4..15: two pixels of the class colour on each side,
    # a black outline just outside
    for x in (4, 5, 14, 15):
        assert sheet.getpixel((pad + x, pad + 10)) == shapes._BOX_COLORS[0], x
    assert sheet.getpixel((pad + 3, pad + 10)) == (0, 0, 0)
    assert sheet.getpixel((pad + 16, pad + 10)) == (0, 0, 0)


def test_contact_sheet_rejects_bad_input(tiny):
    with pytest.raises(TypeError, match="dataset_or_paths must be"):
        contact_sheet("shapes-tiny")
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        contact_sheet(tiny, n=0)
    with pytest.raises(ValueError, match="scale must be an integer >= 1"):
        contact_sheet(tiny, scale=1.5)
