import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

import harmonic.data as data
from harmonic.data import (
    CocoDetection,
    DatasetError,
    DatasetWarning,
    build_dataset,
    build_transforms,
    resolve_dataset,
)

# --------------------------------------------------------------------------------------------------
# a small hand-written COCO dataset
# --------------------------------------------------------------------------------------------------

W, H = 40, 30


def _write_image(path, mode="RGB", size=(W, H), value=None):
    if mode == "RGB":
        arr = np.zeros((size[1], size[0], 3), np.uint8)
        arr[..., 0] = np.arange(size[0], dtype=np.uint8)[None, :]  # red grows left -> right
        arr[..., 1] = 50
        img = Image.fromarray(arr)
    elif mode == "L":
        img = Image.new("L", size, value)
    elif mode == "RGBA":
        img = Image.new("RGBA", size, value)
    elif mode == "P":
        img = Image.new("P", size, 1)
        img.putpalette([0, 0, 0, *value] + [0] * 762)
    elif mode == "I;16":
        img = Image.fromarray(np.full((size[1], size[0]), value, np.uint16))
    img.save(path)


def _coco(images, annotations, categories=None):
    return {
        "images": [{"id": i, "file_name": f, "width": W, "height": H} for i, f in images],
        "annotations": annotations,
        "categories": categories or [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }


def _ann(aid, iid, bbox, cat=1, **extra):
    return {"id": aid, "image_id": iid, "category_id": cat, "bbox": bbox, **extra}


def _dataset(tmp_path, coco, transforms=None, make_images=True, **kwargs):
    if make_images:
        for img in coco["images"]:
            if not (tmp_path / img["file_name"]).exists():
                _write_image(tmp_path / img["file_name"])
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    return CocoDetection(tmp_path, ann, transforms, **kwargs)


def test_boxes_are_converted_to_xyxy_and_clipped(tmp_path):
    coco = _coco(
        [(1, "a.png")],
        [
            _ann(1, 1, [2, 3, 10, 5], area=33.0),
            _ann(2, 1, [-5, 20, 15, 20], cat=2),  # crosses the left and bottom border
            _ann(3, 1, [35.5, -2, 10, 4]),  # crosses the right and top border
        ],
    )
    image, target = _dataset(tmp_path, coco)[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image[0, 0, 7].item() == pytest.approx(7 / 255) and image[1, 5, 5].item() == pytest.approx(50 / 255)
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format == tv_tensors.BoundingBoxFormat.XYXY
    assert boxes.dtype == torch.float32 and tuple(boxes.canvas_size) == (H, W)
    expected = torch.tensor([[2, 3, 12, 8], [0, 20, 10, 30], [35.5, 0, 40, 2]], dtype=torch.float32)
    assert torch.equal(boxes.as_subclass(torch.Tensor), expected)
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1, 2, 1]
    # "area" is the annotation's when given, else the (unclipped) box area w * h
    assert target["area"].dtype == torch.float32 and target["area"].tolist() == [33.0, 300.0, 40.0]
    assert target["image_id"] == 1 and target["orig_size"] == (H, W)


def test_crowd_annotations_become_crowd_boxes(tmp_path):
    coco = _coco([(1, "a.png")], [_ann(1, 1, [1, 1, 5, 5]), _ann(2, 1, [10, 10, 40, 5], cat=2, iscrowd=1)])
    _, target = _dataset(tmp_path, coco)[0]
    assert target["labels"].tolist() == [1]
    assert target["boxes"].tolist() == [[1, 1, 6, 6]]
    assert target["crowd_boxes"].dtype == torch.float32
    assert target["crowd_boxes"].tolist() == [[10, 10, 40, 15]]  # clipped at W = 40


def test_images_without_annotations_are_kept_and_ids_sorted(tmp_path):
    coco = _coco([(9, "c.png"), (2, "a.png"), (5, "b.png")], [_ann(1, 5, [1, 1, 5, 5])])
    ds = _dataset(tmp_path, coco)
    assert ds.ids == [2, 5, 9] and len(ds) == 3
    _, target = ds[0]
    assert target["image_id"] == 2
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["area"].shape == (0,)
    assert target["crowd_boxes"].shape == (0, 4)
    assert ds[1][1]["labels"].tolist() == [1]


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 100, (100, 100, 100)),
        ("RGBA", (10, 20, 30, 0), (10, 20, 30)),  # alpha dropped, colour kept
        ("P", (200, 150, 100), (200, 150, 100)),
        ("I;16", 65535, (255, 255, 255)),
    ],
)
def test_non_rgb_images_are_converted_to_rgb(tmp_path, mode, value, expected):
    _write_image(tmp_path / "x.png", mode, value=value)
    image, _ = _dataset(tmp_path, _coco([(1, "x.png")], []))[0]
    assert image.shape == (3, H, W)
    assert torch.allclose(image[:, 4, 4], torch.tensor(expected, dtype=torch.float32) / 255)


def test_zero_size_boxes_are_dropped_with_one_warning(tmp_path):
    coco = _coco(
        [(1, "a.png"), (2, "b.png")],
        [
            _ann(1, 1, [1, 1, 0, 5]),  # zero width
            _ann(2, 1, [1, 1, 5, 5]),
            _ann(3, 2, [1, 1, 5, 0]),  # zero height
            _ann(4, 2, [50, 1, 5, 5]),  # entirely right of the 40-px image: zero after clipping
        ],
    )
    with pytest.warns(DatasetWarning) as record:
        ds = _dataset(tmp_path, coco)
    msgs = [str(w.message) for w in record if issubclass(w.category, DatasetWarning)]
    assert len(msgs) == 1
    assert "dropped 3 annotation(s)" in msgs[0] and "ann.json" in msgs[0] and "annotation id 1" in msgs[0]
    assert ds.num_dropped == 3
    assert ds[0][1]["boxes"].tolist() == [[1, 1, 6, 6]] and len(ds[1][1]["boxes"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading items never warns again
        ds[0], ds[1]


def test_labels_are_contiguous_and_map_back_to_category_ids(tmp_path):
    cats = [{"id": 42, "name": "zebra"}, {"id": 7, "name": "cat"}, {"id": 3, "name": "ant"}]
    coco = _coco([(1, "a.png")], [_ann(1, 1, [0, 0, 4, 4], cat=42), _ann(2, 1, [0, 0, 4, 4], cat=3), _ann(3, 1, [0, 0, 4, 4], cat=7)], cats)
    ds = _dataset(tmp_path, coco)
    assert ds.num_classes == 3
    assert ds.class_names == ["ant", "cat", "zebra"]
    assert ds.cat_id_to_label == {3: 1, 7: 2, 42: 3}
    assert ds.label_to_cat_id == {1: 3, 2: 7, 3: 42}
    labels = ds[0][1]["labels"].tolist()
    assert labels == [3, 1, 2]
    assert [ds.label_to_cat_id[label] for label in labels] == [42, 3, 7]
    assert sorted(ds.coco.getCatIds()) == [3, 7, 42]  # the pycocotools index is there for evaluation


def test_collate_fn_and_targets_to(tmp_path):
    coco = _coco([(1, "a.png"), (2, "b.png"), (3, "c.png")], [_ann(1, 2, [1, 1, 5, 5], cat=2)])
    ds = _dataset(tmp_path, coco, build_transforms(False))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False, collate_fn=data.collate_fn)
    batches = list(loader)
    assert [len(images) for images, _ in batches] == [2, 1]
    images, targets = batches[0]
    assert isinstance(images, list) and all(img.shape == (3, H, W) for img in images)
    assert [t["image_id"] for t in targets] == [1, 2] and targets[1]["labels"].tolist() == [2]
    moved = data.targets_to(targets, torch.device("cpu"))
    assert isinstance(moved[1]["boxes"], tv_tensors.BoundingBoxes)
    assert moved[1]["boxes"].tolist() == [[1, 1, 6, 6]] and moved[1]["orig_size"] == (H, W)


# --------------------------------------------------------------------------------------------------
# errors name the file and the id
# --------------------------------------------------------------------------------------------------


def test_malformed_json_names_file_line_and_column(tmp_path):
    (tmp_path / "broken.json").write_text('{"images": [],\n  "annotations": [,]}')
    with pytest.raises(DatasetError, match=r"broken\.json: malformed JSON at line 2, column 19"):
        CocoDetection(tmp_path, tmp_path / "broken.json")


def test_missing_top_level_key(tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match=r"ann\.json: missing top-level key\(s\) \['categories'\]"):
        CocoDetection(tmp_path, tmp_path / "ann.json")


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match=r"annotation file not found: .*nope\.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json")


def test_missing_image_file_names_file_and_image_id(tmp_path):
    _write_image(tmp_path / "a.png")
    coco = _coco([(1, "a.png"), (5, "gone.png"), (6, "gone2.png")], [])
    with pytest.raises(DatasetError, match=r"ann\.json: image id 5: image file not found: .*gone\.png \(2 of 3"):
        _dataset(tmp_path, coco, make_images=False)
    # check_files=False defers the error to loading that image
    ds = _dataset(tmp_path, coco, make_images=False, check_files=False)
    with pytest.raises(DatasetError, match=r"image id 5: image file not found: .*gone\.png"):
        ds[1]


def test_unreadable_image_names_file_and_image_id(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    ds = _dataset(tmp_path, _coco([(3, "bad.png")], []), make_images=False)
    with pytest.raises(DatasetError, match=r"ann\.json: image id 3: cannot read image .*bad\.png"):
        ds[0]


def test_image_size_mismatch_names_file_and_image_id(tmp_path):
    _write_image(tmp_path / "small.png", size=(20, 10))
    ds = _dataset(tmp_path, _coco([(4, "small.png")], []), make_images=False)
    with pytest.raises(DatasetError, match=r"image id 4: .*small\.png is 20x10 \(WxH\) but the annotation file says 40x30"):
        ds[0]


@pytest.mark.parametrize(
    ("ann", "message"),
    [
        (_ann(9, 1, [1, 1, -2, 3]), r"annotation id 9 \(image id 1\): negative box width/height"),
        (_ann(9, 1, [1, 1, 2, -3]), r"annotation id 9 \(image id 1\): negative box width/height"),
        (_ann(9, 1, [1, 1, 2, 3], cat=99), r"annotation id 9 \(image id 1\): unknown category_id 99"),
        (_ann(9, 7, [1, 1, 2, 3]), r"annotation id 9 \(image id 7\): image id 7 is not in 'images'"),
        (_ann(9, 1, [1, 1, 2]), r"annotation id 9 \(image id 1\): 'bbox' must be 4 finite numbers"),
        (_ann(9, 1, [1, 1, float("nan"), 2]), r"annotation id 9 \(image id 1\): 'bbox' must be 4 finite numbers"),
        ({"id": 9, "image_id": 1, "bbox": [1, 1, 2, 2]}, r"annotation id 9: missing key 'category_id'"),
    ],
)
def test_bad_annotations_name_file_and_annotation_id(tmp_path, ann, message):
    coco = _coco([(1, "a.png")], [_ann(1, 1, [0, 0, 3, 3]), ann])
    with pytest.raises(DatasetError, match=r"ann\.json: " + message):
        _dataset(tmp_path, coco)


def test_duplicate_ids_are_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"ann\.json: duplicate annotation id 1"):
        _dataset(tmp_path, _coco([(1, "a.png")], [_ann(1, 1, [0, 0, 3, 3]), _ann(1, 1, [0, 0, 4, 4])]))
    with pytest.raises(DatasetError, match=r"ann\.json: duplicate image id 1"):
        _dataset(tmp_path, _coco([(1, "a.png"), (1, "b.png")], []))


# --------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------


def _flip_fixture(tmp_path, transforms):
    coco = _coco(
        [(1, "a.png")],
        [_ann(1, 1, [2, 3, 10, 5], area=33.0), _ann(2, 1, [30, 0, 10, 30], cat=2), _ann(3, 1, [0, 20, 4, 6], iscrowd=1)],
    )
    return _dataset(tmp_path, coco, transforms)[0]


def test_training_flip_moves_boxes_crowd_boxes_and_pixels(tmp_path):
    image, target = _flip_fixture(tmp_path, build_transforms(True, flip_prob=1.0))
    plain, _ = _flip_fixture(tmp_path, None)
    assert torch.equal(image, plain.flip(-1))
    assert type(image) is torch.Tensor  # the tv_tensors.Image wrapper does not leak out
    # x1' = W - x2, x2' = W - x1; y unchanged
    assert target["boxes"].tolist() == [[28, 3, 38, 8], [0, 0, 10, 30]]
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and tuple(target["boxes"].canvas_size) == (H, W)
    assert target["crowd_boxes"].tolist() == [[36, 20, 40, 26]]
    assert target["labels"].tolist() == [1, 2]
    assert target["area"].tolist() == [33.0, 300.0]
    assert target["image_id"] == 1 and target["orig_size"] == (H, W)


def test_evaluation_transforms_leave_the_sample_unchanged(tmp_path):
    image, target = _flip_fixture(tmp_path, build_transforms(False, flip_prob=1.0))
    plain, expected = _flip_fixture(tmp_path, None)
    assert torch.equal(image, plain)
    assert target["boxes"].tolist() == expected["boxes"].tolist()
    assert target["crowd_boxes"].tolist() == expected["crowd_boxes"].tolist()


def test_flip_probability_zero_and_one_half(tmp_path):
    _, target = _flip_fixture(tmp_path, build_transforms(True, flip_prob=0.0))
    assert target["boxes"].tolist()[0] == [2, 3, 12, 8]
    torch.manual_seed(0)
    flipped = [_flip_fixture(tmp_path, build_transforms(True))[1]["boxes"].tolist()[0][0] == 28 for _ in range(40)]
    assert 5 < sum(flipped) < 35


def test_resize_scales_boxes_area_and_crowd(tmp_path):
    image, target = _flip_fixture(tmp_path, build_transforms(False, min_size=60))
    assert image.shape == (3, 60, 80)
    assert target["boxes"].tolist() == [[4, 6, 24, 16], [60, 0, 80, 60]]
    assert tuple(target["boxes"].canvas_size) == (60, 80)
    assert target["crowd_boxes"].tolist() == [[0, 40, 8, 52]]
    assert target["area"].tolist() == pytest.approx([132.0, 1200.0])
    assert target["orig_size"] == (H, W)
    image, _ = _flip_fixture(tmp_path, build_transforms(False, max_size=20))
    assert image.shape == (3, 15, 20)


def test_a_cropping_transform_keeps_targets_consistent(tmp_path):
    # the centre 20 columns (x 10..30): label 1 keeps a 2-px sliver, label 2 (x 30..40) and the crowd
    # box (x 0..4) fall outside and go, with their labels and areas
    image, target = _flip_fixture(tmp_path, data.DetectionTransform([v2.CenterCrop((H, 20))]))
    assert image.shape == (3, H, 20)
    assert target["labels"].tolist() == [1]
    assert target["boxes"].tolist() == [[0, 3, 2, 8]]
    assert target["area"].tolist() == pytest.approx([33.0 * 2 / 10])  # scaled with the box area
    assert target["crowd_boxes"].shape == (0, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"flip_prob": 1.5}, "flip_prob"), ({"min_size": 0}, "min_size"), ({"max_size": 2.5}, "max_size"),
     ({"min_size": 100, "max_size": 50}, "max_size")],
)
def test_build_transforms_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_transforms(True, **kwargs)


# --------------------------------------------------------------------------------------------------
# dataset specs: a preset name (generated by harmonic.data.shapes), a COCO JSON file, a folder
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return data.ensure_default_dataset("shapes-tiny", root=tmp_path_factory.mktemp("data"))


def test_resolve_and_build_dataset(tmp_path, tiny):
    root = tiny["root"].parent
    image_dir, ann = resolve_dataset("shapes-tiny", "val", root=root)
    assert (image_dir, ann) == tiny["val"]
    ds = build_dataset("shapes-tiny", "val", root=root)
    assert len(ds) == 8 and ds.transforms.transforms == []  # evaluation: no flip
    train = build_dataset("shapes-tiny", "train", root=root)
    assert isinstance(train.transforms.transforms[0], v2.RandomHorizontalFlip)
    # a COCO JSON: images/ beside it by default, or image_dir given
    assert resolve_dataset(tiny["val"][1], "val") == tiny["val"]
    assert resolve_dataset(str(tiny["val"][1]), "val", image_dir=tmp_path) == (tmp_path, tiny["val"][1])
    # a folder with <split>.json
    assert resolve_dataset(tiny["root"], "train") == tiny["train"]
    assert len(build_dataset(tiny["val"][1], "val", train=True)) == 8
    with pytest.raises(DatasetError, match="neither a preset"):
        resolve_dataset("no-such-thing", "train")
    with pytest.raises(DatasetError, match=r"annotation file not found: .*missing\.json"):
        resolve_dataset(tmp_path / "missing.json", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        resolve_dataset("shapes-tiny", "test", root=root)


# --------------------------------------------------------------------------------------------------
# instance masks (masks=True): polygons and RLE through pycocotools, through the transforms
# --------------------------------------------------------------------------------------------------
def _rle(mask):
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _uncompressed(mask):
    """COCO's uncompressed RLE: run lengths of the column-major mask, starting with a run of zeros."""
    flat = mask.astype(np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return {"size": [H, W], "counts": ([0] if flat[0] else []) + runs}


def _mask_fixture(tmp_path, transforms=None):
    """An L-shaped object as a compressed RLE, a rectangle as a polygon, a triangle as uncompressed RLE,
    and a crowd region (no mask)."""
    ell = np.zeros((H, W), bool)
    ell[3:8, 2:12] = True
    ell[3:20, 2:5] = True
    triangle = np.tril(np.ones((10, 10), bool))
    tri = np.zeros((H, W), bool)
    tri[15:25, 20:30] = triangle
    coco = _coco(
        [(1, "a.png")],
        [
            _ann(1, 1, [2, 3, 10, 17], segmentation=_rle(ell)),
            _ann(2, 1, [30, 0, 10, 30], cat=2, segmentation=[[30, 0, 40, 0, 40, 30, 30, 30]]),
            _ann(3, 1, [0, 20, 4, 6], iscrowd=1, segmentation=_rle(np.ones((H, W), bool))),
            _ann(4, 1, [20, 15, 10, 10], segmentation=_uncompressed(tri)),
        ],
    )
    return _dataset(tmp_path, coco, transforms, masks=True), (ell, tri)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_masks_are_decoded_from_rle_and_polygons_one_per_box(tmp_path):
    dataset, (ell, tri) = _mask_fixture(tmp_path)
    _, target = dataset[0]
    masks = target["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.uint8 and masks.shape == (3, H, W)
    assert target["labels"].tolist() == [1, 2, 1] and target["crowd_boxes"].shape == (1, 4)
    assert np.array_equal(masks[0].numpy(), ell)
    assert np.array_equal(masks[2].numpy(), tri)
    ys, xs = np.nonzero(masks[1].numpy())  # the polygon, rasterized by pycocotools (as COCOeval does)
    assert xs.min() >= 29 and xs.max() <= 39 and ys.min() == 0 and ys.max() == H - 1
    assert masks[1].sum() >= 9 * 29
    plain = _dataset(tmp_path, _coco([(1, "a.png")], [_ann(1, 1, [2, 3, 10, 17])]))
    assert "masks" not in plain[0][1]  # masks=False: no segmentation needed, none given


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_training_flip_and_resize_transform_the_masks_with_the_boxes(tmp_path):
    plain, _ = _mask_fixture(tmp_path)
    _, expected = plain[0]
    flipped, _ = _mask_fixture(tmp_path, build_transforms(True, flip_prob=1.0))
    _, target = flipped[0]
    assert isinstance(target["masks"], tv_tensors.Mask) and target["masks"].dtype == torch.uint8
    assert torch.equal(target["masks"], expected["masks"].flip(-1))
    for mask, box in zip(target["masks"], target["boxes"]):  # each mask still lies in its own box
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= box[0] and xs.max() < box[2] and ys.min() >= box[1] and ys.max() < box[3]
    resized, _ = _mask_fixture(tmp_path, build_transforms(False, min_size=60))
    image, target = resized[0]
    assert image.shape == (3, 60, 80) and target["masks"].shape == (3, 60, 80)
    torch.testing.assert_close(target["masks"], expected["masks"].repeat_interleave(2, 1).repeat_interleave(2, 2))
    cropped, _ = _mask_fixture(tmp_path, data.DetectionTransform([v2.CenterCrop((H, 20))]))  # x 10..30
    _, target = cropped[0]
    assert target["labels"].tolist() == [1, 1] and target["masks"].shape == (2, H, 20)  # the polygon's box left
    assert torch.equal(target["masks"], expected["masks"][[0, 2], :, 10:30])


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_bad_segmentations_name_file_and_annotation_id(tmp_path):
    cases = [
        (None, "missing key 'segmentation'"),
        ([], "non-empty list of polygons"),
        ([[1, 2, 3, 4]], "polygon 0"),
        ({"size": [H + 1, W], "counts": "abc"}, r"size \[31, 40\] but its image is \[30, 40\]"),
        ({"size": [H, W], "counts": [5, 7]}, "sum to 12"),
        ({"size": [H, W]}, "'counts'"),
    ]
    for segmentation, message in cases:
        extra = {} if segmentation is None else {"segmentation": segmentation}
        coco = _coco([(1, "a.png")], [_ann(7, 1, [2, 3, 10, 5], **extra)])
        with pytest.raises(DatasetError, match=rf"ann\.json: annotation id 7 \(image id 1\): .*{message}"):
            _dataset(tmp_path, coco, masks=True)
    crowd_only = _coco([(1, "a.png")], [_ann(7, 1, [2, 3, 10, 5], iscrowd=1)])
    assert _dataset(tmp_path, crowd_only, masks=True)[0][1]["masks"].shape == (0, H, W)  # crowd: no mask needed
    with pytest.raises(TypeError, match="masks"):
        _dataset(tmp_path, crowd_only, masks="yes")
