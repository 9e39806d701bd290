"""COCO metrics and prediction-consistency metrics on tiny ground truths built in memory."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from harmonic.evaluation import (
    STAT_NAMES,
    coco_evaluate,
    consistency_metrics,
    detections_to_coco,
    encode_masks,
    evaluate_predictions,
    match_detections,
    score_iou_pairs,
    segmentations_to_coco,
    write_metrics,
)
from harmonic.ops.focal import backend_record

CATS = (3, 7, 11)  # non-contiguous COCO category ids
LABEL_TO_CAT = {1: 3, 2: 7, 3: 11}


def make_gt(annotations, n_images=1, cats=CATS, size=400):
    """A COCO ground truth from ``(image_id, category_id, [x1, y1, x2, y2], iscrowd)`` tuples."""
    anns = []
    for index, (image_id, cat, (x1, y1, x2, y2), crowd) in enumerate(annotations, start=1):
        w, h = x2 - x1, y2 - y1
        anns.append({"id": index, "image_id": image_id, "category_id": cat, "bbox": [x1, y1, w, h],
                     "area": w * h, "iscrowd": crowd})
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": size, "height": size, "file_name": f"{i}.png"} for i in range(1, n_images + 1)],
        "categories": [{"id": c, "name": f"c{c}"} for c in cats],
        "annotations": anns,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def pred(image_id, boxes, scores, labels, **extra):
    return {"image_id": image_id, "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64),
            **extra}


def empty_pred(image_id):
    return pred(image_id, [], [], [])


# Three medium-sized objects (50 x 50: area 2500 lies in COCO's medium range) of three categories.
OBJECTS = [(1, 3, [10, 10, 60, 60], 0), (1, 7, [100, 100, 150, 150], 0), (2, 11, [200, 50, 250, 100], 0)]


def perfect_predictions():
    return [pred(1, [[10, 10, 60, 60], [100, 100, 150, 150]], [0.9, 0.8], [1, 2]),
            pred(2, [[200, 50, 250, 100]], [0.7], [3])]


# --------------------------------------------------------------------------------------------------
# detections_to_coco
# --------------------------------------------------------------------------------------------------


def test_detections_to_coco_converts_boxes_and_maps_labels():
    results = detections_to_coco([pred(5, [[1, 2, 11, 22], [0, 0, 4, 3]], [0.5, 0.25], [3, 1])], LABEL_TO_CAT)
    assert results == [
        {"image_id": 5, "category_id": 11, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5},
        {"image_id": 5, "category_id": 3, "bbox": [0.0, 0.0, 4.0, 3.0], "score": 0.25},
    ]
    assert all(type(v) is float for r in results for v in r["bbox"]) and type(results[0]["category_id"]) is int
    json.dumps(results)  # plain Python types


def test_detections_to_coco_accepts_arrays_half_tensors_and_json_keys():
    mapping = {"1": 3, "2": 7}  # the keys a JSON round trip leaves
    preds = [{"image_id": np.int64(2), "boxes": np.array([[0.0, 0.0, 2.0, 2.0]]), "scores": [0.5], "labels": [2]},
             {"image_id": torch.tensor(3), "boxes": torch.tensor([[1.0, 1.0, 3.0, 5.0]], dtype=torch.float16),
              "scores": torch.tensor([0.75], dtype=torch.float16), "labels": torch.tensor([1])}]
    results = detections_to_coco(preds, mapping)
    assert [(r["image_id"], r["category_id"], r["bbox"], r["score"]) for r in results] == [
        (2, 7, [0.0, 0.0, 2.0, 2.0], 0.5), (3, 3, [1.0, 1.0, 2.0, 4.0], 0.75)]


@pytest.mark.parametrize(
    ("prediction", "message"),
    [
        ({"image_id": 1, "boxes": [[0, 0, 1, 1]], "labels": [1]}, "missing key 'scores'"),
        ({"boxes": [[0, 0, 1, 1]], "scores": [0.5], "labels": [1]}, "missing key 'image_id'"),
        ({"image_id": 1, "boxes": [[0, 0, 1]], "scores": [0.5], "labels": [1]}, r"'boxes'.*shape \[n, 4\]"),
        ({"image_id": 1, "boxes": [[0, 0, 1, 1]], "scores": [0.5, 0.2], "labels": [1]}, r"'scores'.*shape \[1\]"),
        ({"image_id": 1, "boxes": [[0, 0, float("nan"), 1]], "scores": [0.5], "labels": [1]}, "NaN"),
        ({"image_id": 1, "boxes": [[0, 0, 1, 1]], "scores": [float("nan")], "labels": [1]}, "NaN"),
        ({"image_id": 1, "boxes": [[5, 0, 1, 1]], "scores": [0.5], "labels": [1]}, "x2 >= x1"),
        ({"image_id": 1, "boxes": [[0, 0, 1, 1]], "scores": [0.5], "labels": [9]}, r"label\(s\) \[9\] not in label_to_cat_id"),
        ({"image_id": 1, "boxes": [[0, 0, 1, 1]], "scores": [0.5], "labels": [1.5]}, "labels must be integers"),
        ({"image_id": 1.5, "boxes": [[0, 0, 1, 1]], "scores": [0.5], "labels": [1]}, "'image_id': expected an integer"),
    ],
)
def test_bad_predictions_get_an_error_naming_the_field(prediction, message):
    with pytest.raises(ValueError, match=message):
        detections_to_coco([prediction], LABEL_TO_CAT)


def test_duplicate_image_and_bad_mapping_are_refused():
    with pytest.raises(ValueError, match="appears more than once"):
        detections_to_coco([empty_pred(1), empty_pred(1)], LABEL_TO_CAT)
    with pytest.raises(ValueError, match="label_to_cat_id"):
        detections_to_coco([empty_pred(1)], {})
    with pytest.raises(ValueError, match="same category id"):
        detections_to_coco([empty_pred(1)], {1: 3, 2: 3})


# --------------------------------------------------------------------------------------------------
# coco_evaluate
# --------------------------------------------------------------------------------------------------


def test_perfect_detections_give_ap_one_and_none_for_absent_sizes():
    gt = make_gt(OBJECTS, n_images=2)
    stats = coco_evaluate(gt, detections_to_coco(perfect_predictions(), LABEL_TO_CAT))
    assert tuple(stats) == STAT_NAMES
    # COCOeval's means over 10 IoU thresholds carry float round-off: 1.0 up to 1e-12
    for name in ("AP", "AP50", "AP75", "APm", "AR1", "AR100"):
        assert stats[name] == pytest.approx(1.0, abs=1e-12), name
    # no small or large objects: COCOeval's -1 becomes None, not 0
    assert stats["APs"] is None and stats["APl"] is None and stats["ARs"] is None and stats["ARl"] is None


def test_one_of_two_objects_found_gives_the_101_point_ap():
    gt = make_gt([(1, 3, [10, 10, 60, 60], 0), (1, 3, [100, 100, 150, 150], 0)], cats=(3,))
    stats = coco_evaluate(gt, detections_to_coco([pred(1, [[10, 10, 60, 60]], [0.9], [1])], {1: 3}))
    # precision 1 at recall 0, 0.01, ..., 0.50 (51 of COCO's 101 recall points), 0 beyond
    assert stats["AP"] == pytest.approx(51 / 101) and stats["AR100"] == pytest.approx(0.5)


def test_empty_results_give_zero_without_crashing():
    gt = make_gt(OBJECTS, n_images=2)
    stats = coco_evaluate(gt, [])
    assert stats["AP"] == 0.0 and stats["AP50"] == 0.0 and stats["AR100"] == 0.0 and stats["APm"] == 0.0
    assert stats["APs"] is None
    for predictions in ([empty_pred(1), empty_pred(2)], []):
        metrics = evaluate_predictions(predictions, gt, LABEL_TO_CAT)
        assert metrics["coco"]["AP"] == 0.0
        c = metrics["consistency"]
        assert (c["n_detections"], c["n_matched"]) == (0, 0)
        assert c["pearson"] is None and c["inconsistent_share"] is None and c["nms_best_box_rate"] is None
    assert evaluate_predictions([empty_pred(1), empty_pred(2)], gt, LABEL_TO_CAT)["consistency"]["n_objects"] == 3


def test_coco_evaluate_is_silent_unless_verbose(capsys):
    gt = make_gt(OBJECTS, n_images=2)
    results = detections_to_coco(perfect_predictions(), LABEL_TO_CAT)
    capsys.readouterr()
    coco_evaluate(gt, results)
    assert capsys.readouterr().out == ""
    coco_evaluate(gt, results, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_coco_evaluate_leaves_the_results_unmodified_and_checks_them():
    gt = make_gt(OBJECTS, n_images=2)
    results = detections_to_coco(perfect_predictions(), LABEL_TO_CAT)
    before = json.dumps(results)
    coco_evaluate(gt, results)
    assert json.dumps(results) == before  # loadRes would have added "id", "area", "segmentation"
    with pytest.raises(ValueError, match=r"coco_results\[0\] 'image_id'"):
        coco_evaluate(gt, [{**results[0], "image_id": 99}])
    with pytest.raises(ValueError, match=r"coco_results\[0\] 'category_id'"):
        coco_evaluate(gt, [{**results[0], "category_id": 1}])
    with pytest.raises(ValueError, match=r"'bbox'"):
        coco_evaluate(gt, [{**results[0], "bbox": [0, 0, -1, 2]}])
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluate(gt, results, iou_type="keypoints")


def test_evaluation_is_restricted_to_the_predicted_images():
    gt = make_gt(OBJECTS, n_images=2)
    only_first = [perfect_predictions()[0]]  # image 2 not predicted: not evaluated
    assert evaluate_predictions(only_first, gt, LABEL_TO_CAT)["coco"]["AP"] == pytest.approx(1.0)
    assert coco_evaluate(gt, detections_to_coco(only_first, LABEL_TO_CAT))["AP"] < 1.0  # every image


def test_label_mapping_is_applied_with_noncontiguous_category_ids():
    gt = make_gt(OBJECTS, n_images=2)
    permuted = {1: 7, 2: 11, 3: 3}  # labels of this model: 1 -> cat 7, 2 -> cat 11, 3 -> cat 3
    preds = [pred(1, [[10, 10, 60, 60], [100, 100, 150, 150]], [0.9, 0.8], [3, 1]),
             pred(2, [[200, 50, 250, 100]], [0.7], [2])]
    assert evaluate_predictions(preds, gt, permuted)["coco"]["AP"] == pytest.approx(1.0)
    wrong = evaluate_predictions(preds, gt, LABEL_TO_CAT)
    assert wrong["coco"]["AP"] == 0.0 and wrong["consistency"]["n_matched"] == 0
    with pytest.raises(ValueError, match=r"category id\(s\) \[99\]"):
        match_detections(preds, gt, {1: 7, 2: 11, 3: 99})
    with pytest.raises(ValueError, match=r"image_id\(s\) \[5\]"):
        match_detections([empty_pred(5)], gt, LABEL_TO_CAT)


# --------------------------------------------------------------------------------------------------
# match_detections
# --------------------------------------------------------------------------------------------------


def test_shifted_boxes_have_the_expected_iou_and_greedy_matching():
    gt = make_gt([(1, 3, [0, 0, 10, 10], 0)])
    # shift by 2: IoU 80 / 120 = 2/3; shift by 5: 50 / 150 = 1/3; another class: 0
    m = match_detections([pred(1, [[5, 0, 15, 10], [2, 0, 12, 10], [0, 0, 10, 10]], [0.8, 0.9, 0.95], [1, 1, 2])],
                         gt, LABEL_TO_CAT)
    np.testing.assert_allclose(m.ious, [1 / 3, 2 / 3, 0.0])
    assert m.matched.tolist() == [False, True, False] and m.gt_ann_ids.tolist() == [-1, 1, -1]
    assert len(m) == 3 and m.n_objects == 1 and m.n_images == 1
    assert m.labels.tolist() == [1, 1, 2] and m.image_ids.tolist() == [1, 1, 1]


def test_greedy_matching_follows_the_score_and_matches_each_object_once():
    gt = make_gt([(1, 3, [0, 0, 10, 10], 0)])
    # the better box has the lower score: the higher-scored box takes the object
    m = match_detections([pred(1, [[0, 0, 10, 9], [0, 0, 10, 6]], [0.3, 0.9], [1, 1])], gt, LABEL_TO_CAT)
    np.testing.assert_allclose(m.ious, [0.9, 0.6])
    assert m.matched.tolist() == [False, True]
    # two objects: the second detection on the first object falls back to the other one (IoU 0.8)
    gt2 = make_gt([(1, 3, [0, 0, 10, 10], 0), (1, 3, [0, 0, 10, 8], 0)])
    m2 = match_detections([pred(1, [[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [1, 1])], gt2, LABEL_TO_CAT)
    assert m2.matched.tolist() == [True, True] and m2.gt_ann_ids.tolist() == [1, 2]
    np.testing.assert_allclose(m2.ious, [1.0, 1.0])  # the IoU is with the best object, not the matched one
    strict = match_detections([pred(1, [[2, 0, 12, 10]], [0.9], [1])], gt, LABEL_TO_CAT, iou_threshold=0.7)
    assert not strict.matched[0]  # 2/3 < 0.7


def test_crowd_regions_are_never_matched_and_their_detections_are_ignored():
    gt = make_gt([(1, 3, [0, 0, 10, 10], 0), (1, 3, [100, 100, 200, 200], 1)])
    preds = [pred(1, [[0, 0, 10, 10], [110, 110, 150, 150], [300, 300, 310, 310]], [0.9, 0.8, 0.7], [1, 1, 1])]
    m = match_detections(preds, gt, LABEL_TO_CAT)
    assert m.matched.tolist() == [True, False, False]
    assert m.ignored.tolist() == [False, True, False]  # inside the crowd box (overlap / own area = 1)
    assert m.ious.tolist() == [1.0, 0.0, 0.0] and m.n_objects == 1
    c = consistency_metrics(preds, gt, LABEL_TO_CAT)
    assert (c["n_detections"], c["n_ignored"], c["n_matched"], c["n_objects"]) == (3, 1, 1, 1)
    assert c["n_inconsistency_population"] == 1  # the crowd detection is no "high score, poor box"


def test_match_agrees_with_cocoeval_at_iou_half():
    rng = np.random.default_rng(0)
    annotations, preds = [], []
    n_images = 30
    for image_id in range(1, n_images + 1):
        xy = rng.uniform(0, 300, size=(8, 2))
        wh = rng.uniform(20, 80, size=(8, 2))
        cats = rng.choice(CATS, size=8)
        for (x, y), (w, h), cat in zip(xy, wh, cats):
            annotations.append((image_id, int(cat), [float(x), float(y), float(x + w), float(y + h)], 0))
        # 60 detections per image: jittered copies of the objects plus clutter
        source = rng.integers(0, 8, size=60)
        centers = xy[source] + wh[source] / 2 + rng.normal(0, 12, size=(60, 2))
        sizes = wh[source] * rng.uniform(0.6, 1.4, size=(60, 2))
        boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1)
        labels = np.where(rng.random(60) < 0.8, np.searchsorted(CATS, cats[source]) + 1, rng.integers(1, 4, 60))
        preds.append({"image_id": image_id, "boxes": boxes, "scores": rng.random(60), "labels": labels})
    gt = make_gt(annotations, n_images=n_images)
    m = match_detections(preds, gt, LABEL_TO_CAT)
    assert len(m) == 1800 and 0 < m.matched.sum() <= m.n_objects == 240

    results = detections_to_coco(preds, LABEL_TO_CAT)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
    reference = np.zeros(len(results), dtype=bool)
    for entry in evaluator.evalImgs:
        if entry is not None and entry["aRng"] == [0, 1e10]:
            for dt_id, gt_id in zip(entry["dtIds"], entry["dtMatches"][0]):  # IoU threshold 0.50
                reference[dt_id - 1] = gt_id > 0
    np.testing.assert_array_equal(m.matched, reference)


# --------------------------------------------------------------------------------------------------
# consistency_metrics
# --------------------------------------------------------------------------------------------------


def separated(ious, scores, labels=None):
    """One image, one 10 x 10 object per detection, 100 px apart; detection i has IoU ``ious[i]``
    with object i (its height is 10 * IoU) and none with the others. IoU 0: a box far from all."""
    annotations, boxes = [], []
    for i, iou in enumerate(ious):
        annotations.append((1, 3, [100 * i, 0, 100 * i + 10, 10], 0))
        boxes.append([100 * i, 0, 100 * i + 10, 10 * iou] if iou > 0 else [100 * i, 200, 100 * i + 10, 210])
    labels = [1] * len(ious) if labels is None else labels
    return make_gt(annotations, size=100 * len(ious) + 300), [pred(1, boxes, scores, labels)]


def test_correlation_is_plus_one_minus_one_or_none():
    ious = np.array([1.0, 0.9, 0.8, 0.7, 0.6])
    gt, preds = separated(ious, 0.1 + 0.5 * ious)
    c = consistency_metrics(preds, gt, LABEL_TO_CAT)
    assert c["pearson"] == pytest.approx(1.0) and c["spearman"] == pytest.approx(1.0) and c["n_correlation"] == 5
    assert c["pearson_all"] == pytest.approx(1.0)
    gt, preds = separated(ious, 1.0 - 0.5 * ious)
    c = consistency_metrics(preds, gt, LABEL_TO_CAT)
    assert c["pearson"] == pytest.approx(-1.0) and c["spearman"] == pytest.approx(-1.0)
    gt, preds = separated(ious[:2], [0.9, 0.2])
    assert consistency_metrics(preds, gt, LABEL_TO_CAT)["pearson"] is None  # two points
    gt, preds = separated(ious, [0.5] * 5)
    c = consistency_metrics(preds, gt, LABEL_TO_CAT)
    assert c["pearson"] is None and c["spearman"] is None  # constant scores
    # monotone but not linear: Spearman +1, Pearson below 1
    gt, preds = separated(ious, ious**8)
    c = consistency_metrics(preds, gt, LABEL_TO_CAT)
    assert c["spearman"] == pytest.approx(1.0) and 0.8 < c["pearson"] < 0.999


def test_correlations_use_matched_detections_and_all_overlapping_ones():
    # IoU 0.3 is not matched (< 0.5): it enters only the "_all" numbers; IoU 0 enters neither
    gt, preds = separated([0.9, 0.7, 0.6, 0.3, 0.0], [0.9, 0.7, 0.6, 0.95, 0.99])
    c = consistency_metrics(preds, gt, LABEL_TO_CAT)
    assert (c["n_correlation"], c["n_correlation_all"]) == (3, 4)
    # ranks of the four overlapping: scores 3, 2, 1, 4; IoUs 4, 3, 2, 1: rho = 1 - 6 * 12 / (4 * 15) = -0.2
    assert c["spearman"] == pytest.approx(1.0) and c["spearman_all"] == pytest.approx(-0.2)
    scores, ious = score_iou_pairs(preds, gt, LABEL_TO_CAT)
    np.testing.assert_allclose(ious, [0.9, 0.7, 0.6])
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.6], rtol=1e-6)


def test_inconsistent_share_equals_the_hand_count():
    ious = [0.9, 0.3, 0.8, 0.6, 0.0, 0.4]
    scores = [0.9, 0.8, 0.1, 0.4, 0.9, 0.2]
    # 0.9/0.9 consistent; 0.3/0.8 high score + poor box; 0.8/0.1 low score + good box; 0.6/0.4 neither;
    # IoU 0 is background, outside the population; 0.4/0.2 low score + poor box is consistent.
    gt, preds = separated(ious, scores)
    c = consistency_metrics(preds, gt, LABEL_TO_CAT)
    assert c["n_inconsistency_population"] == 5
    assert c["high_score_poor_iou_share"] == pytest.approx(1 / 5)
    assert c["low_score_good_iou_share"] == pytest.approx(1 / 5)
    assert c["inconsistent_share"] == pytest.approx(2 / 5)
    assert c["thresholds"] == {"iou_threshold": 0.5, "high_score": 0.5, "low_score": 0.3, "good_iou": 0.75,
                               "poor_iou": 0.5, "min_iou": 0.1, "nms_tolerance": 1e-6}
    stricter = consistency_metrics(preds, gt, LABEL_TO_CAT, high_score=0.85, min_iou=0.35)
    assert stricter["n_inconsistency_population"] == 4 and stricter["inconsistent_share"] == pytest.approx(1 / 4)
    assert stricter["thresholds"]["high_score"] == 0.85
    assert (c["n_detections"], c["n_matched"], c["n_objects"]) == (6, 3, 6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"iou_threshold": 0.0}, "iou_threshold"), ({"low_score": 0.6}, "low_score"),
     ({"poor_iou": 0.9}, "poor_iou"), ({"high_score": float("nan")}, "high_score"), ({"min_iou": 1.5}, "min_iou")],
)
def test_bad_thresholds_are_refused(kwargs, message):
    gt, preds = separated([0.9], [0.9])
    with pytest.raises(ValueError, match=message):
        consistency_metrics(preds, gt, LABEL_TO_CAT, **kwargs)


# Two objects; candidates per object: A: IoU 0.9 (score 0.6) and 0.7 (score 0.8); B: 1.0 (0.9), 0.8 (0.5).
NMS_GT = [(1, 3, [0, 0, 10, 10], 0), (1, 3, [100, 0, 110, 10], 0)]
CANDIDATES = {"candidate_boxes": torch.tensor([[0, 0, 10, 9], [0, 0, 10, 7], [100, 0, 110, 10], [100, 0, 110, 8]],
                                              dtype=torch.float32),
              "candidate_scores": torch.tensor([0.6, 0.8, 0.9, 0.5]),
              "candidate_labels": torch.tensor([1, 1, 1, 1])}
BOX = {"a_best": [0, 0, 10, 9], "a_worse": [0, 0, 10, 7], "b_best": [100, 0, 110, 10]}


def nms_metrics(kept, scores, **kwargs):
    gt = make_gt(NMS_GT)
    return consistency_metrics([pred(1, [BOX[k] for k in kept], scores, [1] * len(kept), **CANDIDATES)],
                               gt, LABEL_TO_CAT, **kwargs)


def test_nms_best_box_rate_and_gap():
    best = nms_metrics(["a_best", "b_best"], [0.6, 0.9])
    assert best["nms_best_box_rate"] == 1.0 and best["nms_mean_iou_gap"] == pytest.approx(0.0)
    # score-ranked NMS kept the worse box of A (IoU 0.7 instead of 0.9)
    half = nms_metrics(["a_worse", "b_best"], [0.8, 0.9])
    assert half["nms_best_box_rate"] == 0.5 and half["nms_mean_iou_gap"] == pytest.approx(0.1)
    assert (half["nms_n_objects"], half["nms_n_covered"]) == (2, 2)
    assert nms_metrics(["a_worse", "b_best"], [0.8, 0.9], nms_tolerance=0.25)["nms_best_box_rate"] == 1.0
    # both boxes of A survive: the covering detection is the higher-scored one (the worse box)
    both = nms_metrics(["a_worse", "a_best", "b_best"], [0.8, 0.6, 0.9])
    assert both["nms_best_box_rate"] == 0.5 and both["nms_mean_iou_gap"] == pytest.approx(0.1)
    # A lost entirely: eligible but uncovered counts as a failure; the gap is over covered objects
    lost = nms_metrics(["b_best"], [0.9])
    assert lost["nms_best_box_rate"] == 0.5 and lost["nms_mean_iou_gap"] == pytest.approx(0.0)
    assert (lost["nms_n_objects"], lost["nms_n_covered"]) == (2, 1)


def test_nms_rate_needs_candidates_on_every_image():
    gt = make_gt(NMS_GT, n_images=2)
    no_candidates = consistency_metrics([pred(1, [BOX["a_best"]], [0.6], [1])], gt, LABEL_TO_CAT)
    assert no_candidates["nms_best_box_rate"] is None and no_candidates["nms_n_objects"] == 0
    mixed = [pred(1, [BOX["a_best"]], [0.6], [1], **CANDIDATES), empty_pred(2)]
    with pytest.raises(ValueError, match="image_id 2 has no pre-NMS candidates"):
        consistency_metrics(mixed, gt, LABEL_TO_CAT)
    with pytest.raises(ValueError, match="missing key 'candidate_labels'"):
        consistency_metrics([pred(1, [], [], [], candidate_boxes=torch.zeros(0, 4), candidate_scores=torch.zeros(0))],
                            gt, LABEL_TO_CAT)


def test_many_detections_with_candidates_give_bounded_metrics():
    rng = np.random.default_rng(1)
    annotations, preds = [], []
    for image_id in range(1, 41):
        xy = rng.uniform(0, 300, size=(5, 2))
        for x, y in xy:
            annotations.append((image_id, 3, [float(x), float(y), float(x) + 40, float(y) + 40], 0))
        cand = np.concatenate([xy[rng.integers(0, 5, 200)] + rng.normal(0, 6, (200, 2))] * 2, axis=1)
        cand[:, 2:] += 40
        scores = rng.random(200)
        keep = np.argsort(-scores)[:100]
        preds.append({"image_id": image_id, "boxes": cand[keep], "scores": scores[keep], "labels": np.ones(100, int),
                      "candidate_boxes": cand, "candidate_scores": scores, "candidate_labels": np.ones(200, int)})
    gt = make_gt(annotations, n_images=40)
    c = consistency_metrics(preds, gt, LABEL_TO_CAT)
    assert c["n_detections"] == 4000 and c["n_objects"] == 200 and c["n_matched"] <= 200
    assert 0.0 <= c["nms_best_box_rate"] <= 1.0 and c["nms_mean_iou_gap"] >= 0.0
    assert -1.0 <= c["spearman"] <= 1.0 and 0.0 <= c["inconsistent_share"] <= 1.0
    json.dumps(c, allow_nan=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_predictions_give_the_same_metrics():
    gt = make_gt(NMS_GT)
    cpu = [pred(1, [BOX["a_worse"], BOX["b_best"]], [0.8, 0.9], [1, 1], **CANDIDATES)]
    cuda = [{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in cpu[0].items()}]
    assert evaluate_predictions(cuda, gt, LABEL_TO_CAT) == evaluate_predictions(cpu, gt, LABEL_TO_CAT)


# --------------------------------------------------------------------------------------------------
# write_metrics
# --------------------------------------------------------------------------------------------------


def test_write_metrics_writes_metrics_with_provenance(tmp_path):
    gt = make_gt(OBJECTS, n_images=2)
    metrics = evaluate_predictions(perfect_predictions(), gt, LABEL_TO_CAT)
    path = write_metrics(tmp_path / "run" / "metrics.json", metrics, {"variant": "harmonic"}, seed=3, device="cpu",
                         device_details=backend_record("cpu"))
    written = json.loads(path.read_text())
    assert written["coco"]["AP"] == pytest.approx(1.0) and written["coco"]["APs"] is None
    assert written["consistency"]["n_matched"] == 3
    assert written["provenance"]["parameters"] == {"variant": "harmonic"} and written["provenance"]["seed"] == 3
    assert written["provenance"]["device"]["device"] == "cpu"
    assert written["provenance"]["device"]["fused_focal_backend"] in ("native", "eager")
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temporary file left


def test_write_metrics_refuses_nan_and_leaves_no_file(tmp_path):
    with pytest.raises(ValueError):
        write_metrics(tmp_path / "m.json", {"coco": {"AP": math.nan}}, {}, seed=0, device="cpu")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="provenance"):
        write_metrics(tmp_path / "m.json", {"provenance": {}}, {}, seed=0, device="cpu")


def test_segm_evaluation_uses_the_masks():
    gt = make_gt(OBJECTS, n_images=2)
    for ann in gt.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    results = detections_to_coco(perfect_predictions(), LABEL_TO_CAT)
    with pytest.raises(ValueError, match="missing key 'segmentation'"):
        coco_evaluate(gt, results, iou_type="segm")
    for res in results:  # masks: the lower 60 % of each box only, mask IoU 0.6
        x, y, w, h = res["bbox"]
        res["segmentation"] = [[x, y + 0.4 * h, x + w, y + 0.4 * h, x + w, y + h, x, y + h]]
    stats = coco_evaluate(gt, results, iou_type="segm")
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP75"] == 0.0
    assert coco_evaluate(gt, results)["AP75"] == pytest.approx(1.0)  # the boxes themselves are perfect


# --------------------------------------------------------------------------------------------------
# segm AP of predicted masks
# --------------------------------------------------------------------------------------------------
def _object_masks(size=400):
    """Non-rectangular masks of OBJECTS: a triangle in each object's box (image 1: two, image 2: one)."""
    masks = {}
    for image_id, _, (x1, y1, x2, y2), _ in OBJECTS:
        mask = np.zeros((size, size), np.uint8)
        mask[y1:y2, x1:x2] = np.tril(np.ones((y2 - y1, x2 - x1), np.uint8))
        masks.setdefault(image_id, []).append(mask)
    return {image_id: np.stack(m) for image_id, m in masks.items()}


def make_gt_with_masks():
    from pycocotools import mask as mask_utils

    gt = make_gt(OBJECTS, n_images=2)
    masks = _object_masks()
    for ann in gt.dataset["annotations"]:
        index = [a["id"] for a in gt.dataset["annotations"] if a["image_id"] == ann["image_id"]].index(ann["id"])
        rle = mask_utils.encode(np.asfortranarray(masks[ann["image_id"]][index]))
        ann["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
        ann["area"] = float(mask_utils.area(rle))
    gt.createIndex()
    return gt, masks


def test_perfect_masks_give_segm_ap_one_beside_bbox_ap():
    gt, masks = make_gt_with_masks()
    predictions = perfect_predictions()
    for p in predictions:  # probabilities [n, 1, H, W] as Mask R-CNN gives them: 0.9 inside, 0.1 outside
        p["masks"] = torch.from_numpy(masks[p["image_id"]]).float()[:, None] * 0.8 + 0.1
    metrics = evaluate_predictions(predictions, gt, LABEL_TO_CAT)
    assert set(metrics) == {"coco", "coco_segm", "consistency"}
    for section in ("coco", "coco_segm"):
        assert metrics[section]["AP"] == pytest.approx(1.0, abs=1e-12), section
    assert "coco_segm" not in evaluate_predictions(perfect_predictions(), gt, LABEL_TO_CAT)  # boxes only
    rles = [{**p, "masks": encode_masks(p["masks"])} for p in predictions]  # RLE lists, as predict() gives
    assert evaluate_predictions(rles, gt, LABEL_TO_CAT)["coco_segm"]["AP"] == pytest.approx(1.0, abs=1e-12)
    results = segmentations_to_coco(rles, gt, LABEL_TO_CAT)
    assert [r["category_id"] for r in results] == [3, 7, 11] and "bbox" not in results[0]
    json.dumps(results)  # RLE counts are strings


def test_half_masks_lower_segm_ap_not_bbox_ap():
    gt, masks = make_gt_with_masks()
    predictions = perfect_predictions()
    for p in predictions:  # the upper half of each triangle only: mask IoU about 1/4 ... 1/2
        half = masks[p["image_id"]].copy()
        for m, (_, y1, _, y2) in zip(half, p["boxes"].int().tolist()):
            m[(y1 + y2) // 2:] = 0
        p["masks"] = torch.from_numpy(half).bool()
    metrics = evaluate_predictions(predictions, gt, LABEL_TO_CAT)
    assert metrics["coco"]["AP"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["coco_segm"]["AP50"] == 0.0


def test_masks_errors_name_the_image_and_field():
    gt, masks = make_gt_with_masks()
    predictions = perfect_predictions()
    predictions[0]["masks"] = torch.from_numpy(masks[1])
    with pytest.raises(ValueError, match=r"predictions\[1\] \(image_id 2\): missing key 'masks'"):
        evaluate_predictions(predictions, gt, LABEL_TO_CAT)
    predictions[1]["masks"] = torch.zeros(1, 1, 40, 40)
    with pytest.raises(ValueError, match=r"image_id 2\) 'masks': mask 0 is \[40, 40\] \(H, W\) but the image is \[400, 400\]"):
        evaluate_predictions(predictions, gt, LABEL_TO_CAT)
    predictions[1]["masks"] = torch.zeros(2, 400, 400)
    with pytest.raises(ValueError, match="expected 1 masks"):
        evaluate_predictions(predictions, gt, LABEL_TO_CAT)
    with pytest.raises(ValueError, match="shape"):
        encode_masks(torch.zeros(400, 400))
    predictions[1]["masks"] = torch.from_numpy(masks[2])
    boxes_only = make_gt(OBJECTS, n_images=2)
    with pytest.raises(ValueError, match="missing key 'segmentation'"):
        evaluate_predictions(predictions, boxes_only, LABEL_TO_CAT)
