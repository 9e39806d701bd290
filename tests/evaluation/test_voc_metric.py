"""The VOC metric (harmonic.evaluation.voc) on cases computed by hand, on ground truth from the converter."""

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from torch import nn

from harmonic.data import CocoDetection
from harmonic.data.voc import voc_to_coco
from harmonic.engine.predict import evaluate
from harmonic.evaluation import evaluate_predictions, is_voc_conversion
from harmonic.evaluation.voc import voc_ap, voc_class_counts, voc_evaluate


def _xml(filename, size, objects):
    objs = ""
    for name, box, difficult in objects:
        coords = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        objs += f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>{coords}</bndbox></object>"
    return (f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
            f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>")


def _coco(data):
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@pytest.fixture
def one_image(tmp_path):
    """One 50x20 image: a dog at VOC (1,1,10,10) and a difficult dog at VOC (21,1,30,10). Classes: cat, dog."""
    (tmp_path / "a.xml").write_text(_xml("a.jpg", (50, 20), [("dog", (1, 1, 10, 10), 0), ("dog", (21, 1, 30, 10), 1)]))
    return tmp_path / "a.xml"


def _pred(image_id, boxes, scores, labels):
    return {"image_id": image_id, "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores), "labels": torch.tensor(labels)}


# three detections of dogs, in score order: on the difficult dog, on nothing, on the dog
THREE = [_pred(1, [[20, 0, 30, 10], [40, 0, 50, 10], [0, 0, 10, 10]], [0.9, 0.8, 0.7], [2, 2, 2])]


def test_difficult_objects_are_neither_counted_nor_penalized(one_image):
    coco = voc_to_coco([one_image], class_names=["cat", "dog"])  # difficult -> iscrowd=1 ignore region
    assert [(a["bbox"], a["iscrowd"]) for a in coco["annotations"]] == [([0, 0, 10, 10], 0), ([20, 0, 10, 10], 1)]
    result = voc_evaluate(THREE, _coco(coco), {1: 1, 2: 2})
    dog = result["per_class"]["dog"]
    # by hand: ignored (difficult), FP, TP; 1 positive (the difficult dog does not count)
    # recall 0, 0, 1; precision 0, 0, 1/2 -> 11-point: max precision at recall >= t is 1/2 for every t -> 1/2;
    # area: the only recall step (0 -> 1) times the precision envelope 1/2 -> 1/2
    assert (dog["n_positives"], dog["n_detections"], dog["n_ignored"]) == (1, 3, 1)
    assert dog["AP_11point"] == pytest.approx(0.5) and dog["AP_area"] == pytest.approx(0.5)
    # cat has no object: no AP, and it is left out of the mean
    assert result["per_class"]["cat"] == {"AP_11point": None, "AP_area": None, "n_positives": 0,
                                          "n_detections": 0, "n_ignored": 0}
    assert result["mAP_11point"] == pytest.approx(0.5) and result["mAP_area"] == pytest.approx(0.5)
    assert result["n_classes_evaluated"] == 1 and result["n_images"] == 1
    # "keep" keeps the difficult flag as an ordinary object for training and COCO, the VOC metric still ignores it
    keep = voc_evaluate(THREE, _coco(voc_to_coco([one_image], class_names=["cat", "dog"], difficult="keep")), {1: 1, 2: 2})
    assert keep["per_class"]["dog"] == dog
    # "drop" removes it: the first detection becomes a false positive: FP, FP, TP -> precision 1/3 at recall 1
    drop = voc_evaluate(THREE, _coco(voc_to_coco([one_image], class_names=["cat", "dog"], difficult="drop")), {1: 1, 2: 2})
    assert drop["per_class"]["dog"]["AP_area"] == pytest.approx(1 / 3)
    assert drop["per_class"]["dog"]["AP_11point"] == pytest.approx(1 / 3)


def test_the_best_overlap_decides_even_when_it_is_difficult():
    # devkit rule: the detection takes the object of largest IoU; that one is difficult, so it is ignored
    # although it also overlaps the non-difficult object by more than 0.5
    gt = {7: (np.array([[0, 0, 10, 10], [0, 0, 10, 9]], dtype=float), np.array([False, True]))}
    tp, fp, n_pos = voc_class_counts([(7, 0.9, np.array([0, 0, 10, 9.0]))], gt)
    assert (tp.tolist(), fp.tolist(), n_pos) == ([0.0], [0.0], 1)


def test_eleven_point_and_area_differ_on_a_crafted_curve():
    # TP, FP, TP with 2 positives: recall 1/2, 1/2, 1; precision 1, 1/2, 2/3
    recall, precision = [0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]
    # area: envelope 1, 2/3, 2/3; steps 1/2, 0, 1/2 -> 1/2 + 1/3 = 5/6
    assert voc_ap(recall, precision, "area") == pytest.approx(5 / 6)
    # 11-point: t = 0 .. 0.5 (6 points) -> 1; t = 0.6 .. 1 (5 points) -> 2/3; (6 + 10/3) / 11 = 28/33
    assert voc_ap(recall, precision, "11point") == pytest.approx(28 / 33)
    # the same curve from detections: two images with one dog each
    coco = _coco({
        "info": {"source_format": "pascal_voc"},
        "images": [{"id": 1, "width": 40, "height": 40}, {"id": 2, "width": 40, "height": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
                        {"id": 2, "image_id": 2, "category_id": 5, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0}],
        "categories": [{"id": 5, "name": "dog"}],
    })
    preds = [_pred(1, [[0, 0, 10, 10], [30, 30, 40, 40]], [0.9, 0.8], [1, 1]), _pred(2, [[5, 5, 15, 15]], [0.7], [1])]
    result = voc_evaluate(preds, coco, {1: 5})
    assert result["mAP_area"] == pytest.approx(5 / 6) and result["mAP_11point"] == pytest.approx(28 / 33)
    assert result["per_class"]["dog"]["n_positives"] == 2


def test_iou_uses_the_converted_continuous_boxes_without_plus_one(tmp_path):
    # VOC (1,1,10,10) converts to (0,0,10,10), 100 pixels; the devkit's IoU of the VOC boxes (1,1,10,10) and
    # (1,1,10,5) is 10*5 / (100 + 50 - 50) = 0.5, and the continuous (0,0,10,5) is that same VOC box.
    # IoU 0.5 is not > 0.5: a false positive (adding 1 to the continuous widths would give 66/121 = 0.545, a TP).
    (tmp_path / "b.xml").write_text(_xml("b.jpg", (40, 40), [("dog", (1, 1, 10, 10), 0)]))
    coco = _coco(voc_to_coco([tmp_path / "b.xml"], class_names=["dog"]))
    half = voc_evaluate([_pred(1, [[0, 0, 10, 5]], [0.9], [1])], coco, {1: 1})
    assert half["per_class"]["dog"]["AP_area"] == 0.0
    above = voc_evaluate([_pred(1, [[0, 0, 10, 5.2]], [0.9], [1])], coco, {1: 1})  # IoU 52/100
    assert above["per_class"]["dog"]["AP_area"] == 1.0 and above["per_class"]["dog"]["AP_11point"] == 1.0


def test_ties_keep_the_input_order_and_duplicates_are_false_positives():
    gt = {1: (np.array([[0, 0, 10, 10]], dtype=float), np.array([False]))}
    box = np.array([0, 0, 10, 10.0])
    tp, fp, _ = voc_class_counts([(1, 0.5, box), (1, 0.5, box), (1, 0.9, np.array([20, 20, 30, 30.0]))], gt)
    assert tp.tolist() == [0, 1, 0] and fp.tolist() == [1, 0, 1]


def test_eleven_points_are_exact_tenths():
    # 7 true positives of 10 objects: recall reaches 0.7 exactly, so t = 0, 0.1, ..., 0.7 (8 points) count 1
    recall = np.cumsum(np.ones(7)) / 10
    assert voc_ap(recall, np.ones(7), "11point") == pytest.approx(8 / 11)
    assert voc_ap(recall, np.ones(7), "area") == pytest.approx(0.7)


def test_edge_cases_and_errors():
    assert voc_ap([], [], "11point") == 0.0 and voc_ap([], [], "area") == 0.0
    with pytest.raises(ValueError, match="method must be one of"):
        voc_ap([1.0], [1.0], "07")
    with pytest.raises(ValueError, match="same length"):
        voc_ap([1.0], [1.0, 0.5])
    with pytest.raises(ValueError, match="recall must hold numbers in"):
        voc_ap([1.5], [1.0])
    coco = _coco({"images": [{"id": 1, "width": 9, "height": 9}], "annotations": [],
                  "categories": [{"id": 1, "name": "dog"}]})
    assert not is_voc_conversion(coco)
    with pytest.raises(ValueError, match=r"predictions\[0\] \(image_id 1\) 'boxes'"):
        voc_evaluate([{"image_id": 1, "boxes": [[0, 0, 1]], "scores": [1.0], "labels": [1]}], coco, {1: 1})
    with pytest.raises(ValueError, match=r"image_id\(s\) \[3\]"):
        voc_evaluate([_pred(3, [], [], [])], coco, {1: 1})
    with pytest.raises(ValueError, match="iou_threshold"):
        voc_evaluate([], coco, {1: 1}, iou_threshold=1.5)
    empty = voc_evaluate([], coco, {1: 1})
    assert empty["mAP_area"] is None and empty["per_class"]["dog"]["AP_area"] is None


def test_metrics_gain_a_voc_section_only_for_voc_conversions(one_image):
    voc = _coco(voc_to_coco([one_image], class_names=["cat", "dog"]))
    assert is_voc_conversion(voc)
    metrics = evaluate_predictions(THREE, voc, {1: 1, 2: 2})
    assert set(metrics) == {"coco", "consistency", "voc"}
    assert metrics["voc"]["mAP_area"] == pytest.approx(0.5)
    # an older conversion without the explicit marker is recognized by the converter's description
    old = dict(voc.dataset, info={"description": "converted from PASCAL VOC XML by harmonic.data.voc"})
    assert is_voc_conversion(_coco(old))
    plain = dict(voc.dataset, info={"description": "COCO"})
    assert "voc" not in evaluate_predictions(THREE, _coco(plain), {1: 1, 2: 2})


class _FixedDetector(nn.Module):
    """Returns the same detections for every image (what `evaluate` needs of a detector)."""

    def __init__(self, prediction):
        super().__init__()
        self.record_candidates = False
        self.prediction = prediction

    def forward(self, images):
        return [{k: v.clone() for k, v in self.prediction.items()} for _ in images]


def test_engine_evaluate_reports_voc_beside_coco(one_image, tmp_path):
    from PIL import Image

    Image.new("RGB", (50, 20)).save(one_image.parent / "a.jpg")
    voc_to_coco([one_image], tmp_path / "voc.json", class_names=["cat", "dog"])
    dataset = CocoDetection(one_image.parent, tmp_path / "voc.json")
    pred = {k: v for k, v in THREE[0].items() if k != "image_id"}
    metrics = evaluate(_FixedDetector(pred), dataset, device="cpu", out_dir=tmp_path / "eval", progress=False)
    assert metrics["voc"]["mAP_area"] == pytest.approx(0.5) and metrics["voc"]["mAP_11point"] == pytest.approx(0.5)
    assert math.isfinite(metrics["coco"]["AP"])
    written = (tmp_path / "eval" / "metrics.json").read_text()
    assert '"voc"' in written and '"mAP_11point"' in written
