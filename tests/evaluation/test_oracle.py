"""The oracle chain: the same detections re-scored inside each object, with background last, and in the
ideal order, and the split of AP it gives."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO

from harmonic.evaluation import coco_evaluate
from harmonic.evaluation.oracle import GAPS, MAX_DETS, capped, oracle_scores, owners, ranking_decomposition


def truth(objects, n_images=2):
    """Ground truth from ``(image_id, category_id, [x, y, w, h], iscrowd)``, categories 1 and 2."""
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.png"} for i in range(1, n_images + 1)],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [{"id": k, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3],
                         "iscrowd": crowd} for k, (img, cat, box, crowd) in enumerate(objects, start=1)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_the_owner_is_the_best_same_category_non_crowd_overlap_above_the_minimum():
    gt = truth([(1, 1, [0, 0, 10, 10], 0), (1, 1, [20, 0, 10, 10], 0), (1, 2, [0, 0, 10, 10], 0),
                (2, 1, [50, 50, 20, 20], 1)])
    dets = [det(1, 1, [0, 0, 10, 5], 0.9),   # half of the first object: 0.5
            det(1, 1, [25, 0, 10, 10], 0.8),  # half-shifted over the second: 50 / 150
            det(np.int64(1), 2, [0, 0, 10, 10], 0.1),  # exactly category 2's object (a numpy image id)
            det(1, 2, [20, 0, 10, 10], 0.7),  # on a category-1 object only: 0
            det(2, 1, [50, 50, 20, 20], 0.6),  # on a crowd region only: 0
            det(1, 1, [9, 0, 10, 10], 0.5)]  # touches the first object: IoU 10 / 190, below the minimum
    ious, owner = owners(gt, dets)
    np.testing.assert_allclose(ious, [0.5, 50 / 150, 1.0, 0.0, 0.0, 10 / 190])
    assert owner.tolist() == [1, 2, 3, -1, -1, -1]
    assert owners(gt, dets, min_iou=0.05)[1].tolist() == [1, 2, 3, -1, -1, 1]


def test_the_chain_permutes_inside_objects_then_drops_background_then_puts_best_boxes_first():
    gt = truth([(1, 1, [0, 0, 40, 40], 0), (2, 1, [100, 100, 40, 40], 0)])
    dets = [det(1, 1, [100, 100, 40, 40], 0.95),  # background (no object there in image 1)
            det(1, 1, [8, 0, 40, 40], 0.9),  # IoU 32 / 48 with object 1
            det(1, 1, [0, 0, 40, 40], 0.5),  # exact: object 1's best box
            det(1, 1, [2, 0, 40, 40], 0.6),  # IoU 1520 / 1680: a duplicate
            det(2, 1, [100, 100, 40, 40], 0.3)]  # exact: object 2's only box
    scores = oracle_scores(gt, dets)
    assert scores["within"].tolist() == [0.95, 0.5, 0.9, 0.6, 0.3]  # object 1's scores follow IoU, the rest stay
    assert np.argsort(-scores["background"]).tolist() == [2, 3, 1, 4, 0]  # the same order with background last
    assert np.argsort(-scores["ideal"]).tolist() == [2, 4, 3, 1, 0]  # best boxes, then the rest by IoU, background
    split = ranking_decomposition(gt, dets)
    assert split["AP"] < split["AP_within"] < split["AP_background"] < split["AP_ideal"] == 1.0
    for m in ("AP", "AP50", "AP75"):  # the gaps are the steps of the chain and add up to the whole
        gaps = [split[f"{m}_{g}_gap"] for g in GAPS]
        assert all(g >= -1e-12 for g in gaps[1:]) and sum(gaps) == pytest.approx(split[f"{m}_ideal"] - split[m])
    assert split["AP"] == pytest.approx(coco_evaluate(gt, dets)["AP"], abs=1e-6)


def test_the_ideal_order_keeps_a_duplicate_below_another_objects_best_box():
    gt = truth([(1, 1, [0, 0, 40, 40], 0), (1, 1, [100, 100, 40, 40], 0)], n_images=1)
    dets = [det(1, 1, [0, 0, 40, 40], 0.9), det(1, 1, [0, 0, 40, 39], 0.1), det(1, 1, [100, 100, 40, 24], 0.8)]
    split = ranking_decomposition(gt, dets)  # ranking by IoU alone would put the duplicate (0.975) above b (0.6)
    assert split["AP50"] == split["AP50_ideal"] == 1.0 and split["AP50_across_gap"] == 0.0


def test_ties_in_iou_keep_the_detectors_order_and_boxes_ranked_by_iou_have_no_gap():
    gt = truth([(1, 1, [0, 0, 40, 40], 0), (1, 2, [60, 60, 40, 40], 0), (2, 1, [100, 100, 40, 40], 0)])
    dets = [det(1, 1, [0, 0, 40, 40], 0.9), det(1, 1, [0, 0, 40, 40], 0.7), det(1, 2, [64, 60, 40, 40], 0.7),
            det(1, 1, [120, 0, 30, 30], 0.2)]
    scores = oracle_scores(gt, dets)
    assert scores["within"][:2].tolist() == [0.9, 0.7] and scores["ideal"][0] > scores["ideal"][1]
    split = ranking_decomposition(gt, dets)
    for m in ("AP", "AP50", "AP75"):
        assert all(split[f"{m}_{g}_gap"] == pytest.approx(0.0, abs=1e-12) for g in GAPS)
    assert split["AP50"] < 1.0  # image 2's object was never detected: no ranking brings it back
    assert ranking_decomposition(gt, dets, img_ids=[1])["AP50"] == pytest.approx(1.0)


def test_only_the_detections_cocoeval_would_keep_are_ranked():
    gt = truth([(1, 1, [0, 0, 40, 40], 0)], n_images=1)
    # 101 boxes on background scored above the object's exact box: COCOeval cuts that box (the 102nd)
    dets = [det(1, 1, [150, 150, 10, 10], 0.9)] * 101 + [det(1, 1, [0, 0, 40, 40], 0.1)]
    kept = capped(gt, dets)
    assert len(kept) == MAX_DETS and all(d["score"] == 0.9 for d in kept)
    split = ranking_decomposition(gt, dets)
    assert split["AP"] == split["AP_ideal"] == 0.0  # the cut box is not brought back by re-scoring
    assert split["AP"] == coco_evaluate(gt, dets)["AP"]


def test_bad_detections_are_refused_by_index_and_key():
    gt = truth([(1, 1, [0, 0, 10, 10], 0)])
    with pytest.raises(ValueError, match=r"coco_results\[1\]: missing key 'score'"):
        owners(gt, [det(1, 1, [0, 0, 1, 1], 0.5), {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match=r"coco_results\[0\]: image_id 9 is not an image"):
        owners(gt, [det(9, 1, [0, 0, 1, 1], 0.5)])
    assert ranking_decomposition(gt, [])["AP_ideal"] == 0.0
