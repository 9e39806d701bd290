"""The oracle re-scorings: the same detections ranked by their IoU, inside each object or in all, and the
split of AP they give."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO

from harmonic.evaluation import coco_evaluate
from harmonic.evaluation.oracle import (
    TIE_BREAK,
    oracle_rescored,
    owners,
    ranking_decomposition,
    within_object_rescored,
)


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


def test_the_owner_is_the_best_same_category_non_crowd_overlap():
    gt = truth([(1, 1, [0, 0, 10, 10], 0), (1, 1, [20, 0, 10, 10], 0), (1, 2, [0, 0, 10, 10], 0),
                (2, 1, [50, 50, 20, 20], 1)])
    dets = [det(1, 1, [0, 0, 10, 5], 0.9),   # half of the first object: 0.5
            det(1, 1, [25, 0, 10, 10], 0.8),  # half-shifted over the second: 50 / 150
            det(1, 2, [0, 0, 10, 10], 0.1),  # exactly category 2's object
            det(1, 2, [20, 0, 10, 10], 0.7),  # on a category-1 object only: 0
            det(2, 1, [50, 50, 20, 20], 0.6)]  # on a crowd region only: 0
    ious, owner = owners(gt, dets)
    np.testing.assert_allclose(ious, [0.5, 50 / 150, 1.0, 0.0, 0.0])
    assert owner.tolist() == [1, 2, 3, -1, -1]


def test_the_rescored_copies_change_only_the_score_and_keep_the_order_among_equal_ious():
    gt = truth([(1, 1, [0, 0, 10, 10], 0)])
    dets = [det(1, 2, [0, 0, 10, 10], 0.3), det(1, 2, [0, 0, 10, 10], 0.9), det(1, 1, [0, 0, 10, 10], 0.05)]
    rescored = oracle_rescored(gt, dets)
    assert [{k: v for k, v in d.items() if k != "score"} for d in rescored] == [
        {k: v for k, v in d.items() if k != "score"} for d in dets]
    assert dets[0]["score"] == 0.3  # the input is not modified
    assert rescored[1]["score"] > rescored[0]["score"] > 0  # no overlap: the detector's own order
    assert rescored[1]["score"] <= TIE_BREAK
    assert rescored[2]["score"] == pytest.approx(1.0, abs=1e-5)  # the exact box first, whatever its own score


def test_a_poor_box_scored_above_a_good_one_costs_ap_that_the_oracle_recovers():
    gt = truth([(1, 1, [0, 0, 40, 40], 0), (2, 1, [100, 100, 40, 40], 0)])
    dets = [det(1, 1, [8, 0, 40, 40], 0.9),  # IoU 32 / 48 = 0.67: a match up to threshold 0.65 only
            det(1, 1, [0, 0, 40, 40], 0.5),  # exact: a duplicate of the first below 0.65
            det(2, 1, [100, 100, 40, 40], 0.8)]
    within = within_object_rescored(gt, dets)
    assert [d["score"] for d in within] == [0.5, 0.9, 0.8]  # object 1's two scores swapped, the rest kept
    split = ranking_decomposition(gt, dets)
    assert split["AP_oracle"] == pytest.approx(1.0)  # ranked by IoU, the exact boxes come first everywhere
    assert split["AP_within"] == pytest.approx(1.0)  # here the cost is all inside object 1's group
    assert split["AP"] < 0.95  # with its own scores the poor box wins above 0.65
    assert split["AP_gap"] == pytest.approx(split["AP_oracle"] - split["AP"])
    assert split["AP50_gap"] == pytest.approx(0.0)  # at IoU 0.5 both orders match both objects first
    assert split["AP"] == pytest.approx(coco_evaluate(gt, dets)["AP"])


def test_boxes_already_ranked_by_their_iou_have_no_ranking_gap_and_missed_objects_stay_missed():
    gt = truth([(1, 1, [0, 0, 40, 40], 0), (1, 2, [60, 60, 40, 40], 0), (2, 1, [100, 100, 40, 40], 0)])
    dets = [det(1, 1, [0, 0, 40, 40], 0.9), det(1, 2, [64, 60, 40, 40], 0.7), det(1, 1, [120, 0, 30, 30], 0.2)]
    split = ranking_decomposition(gt, dets)
    for m in ("AP", "AP50", "AP75"):
        assert split[f"{m}_gap"] == pytest.approx(0.0, abs=1e-12)
        assert split[f"{m}_within_gap"] == pytest.approx(0.0, abs=1e-12)
    assert split["AP50"] < 1.0  # image 2's object was never detected: no ranking brings it back
    only_first = ranking_decomposition(gt, dets, img_ids=[1])
    assert only_first["AP50"] == pytest.approx(1.0)


def test_a_confident_false_positive_is_what_only_the_full_oracle_removes():
    gt = truth([(1, 1, [0, 0, 40, 40], 0)])
    dets = [det(1, 1, [100, 100, 40, 40], 0.9), det(1, 1, [0, 0, 40, 40], 0.5), det(1, 1, [4, 0, 40, 40], 0.6)]
    within = within_object_rescored(gt, dets)
    assert sorted(d["score"] for d in within) == sorted(d["score"] for d in dets)  # a permutation of the scores
    assert [d["score"] for d in within] == [0.9, 0.6, 0.5]  # the exact box takes its group's best score
    split = ranking_decomposition(gt, dets)
    assert split["AP50_within_gap"] == pytest.approx(0.0)  # the background box still comes first
    assert split["AP50"] == pytest.approx(0.5, abs=0.01) and split["AP50_oracle"] == pytest.approx(1.0)
    assert split["AP_within_gap"] > 0  # above IoU 0.9 the exact box now wins its group
    assert split["AP_gap"] > split["AP_within_gap"]


def test_bad_detections_are_refused_by_index_and_key():
    gt = truth([(1, 1, [0, 0, 10, 10], 0)])
    with pytest.raises(ValueError, match=r"coco_results\[1\]: missing key 'score'"):
        owners(gt, [det(1, 1, [0, 0, 1, 1], 0.5), {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match=r"coco_results\[0\]: image_id 9 is not an image"):
        owners(gt, [det(9, 1, [0, 0, 1, 1], 0.5)])
