"""Mask R-CNN through the engine: a tiny model trains on shapes-tiny's instance masks and its evaluation
adds COCO segm AP beside the box AP (two iterations, CPU, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from harmonic.engine import TrainConfig, evaluate, predict, train
from harmonic.evaluation import STAT_NAMES
from harmonic.utils.files import read_json
from harmonic.utils.runlog import read_log


@pytest.fixture(scope="module")
def mask_run(data_root, tmp_path_factory):
    """Two iterations of a tiny Mask R-CNN (Harmonic + HIoU on the box head) on shapes-tiny."""
    cfg = TrainConfig.preset(
        "shapes-tiny", output_dir=str(tmp_path_factory.mktemp("runs") / "mask"), max_iters=2, checkpoint_every=2,
        deterministic=True, num_threads=1, detector={"arch": "mask_rcnn", "loss": "harmonic"},
    )
    return train(cfg, progress=False)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_train_command_takes_arch_mask_rcnn_and_prints_segm_ap(data_root, tmp_path, capsys):
    from harmonic.cli import main

    argv = ["train", "--preset", "shapes-tiny", "--arch", "mask_rcnn", "--output-dir", str(tmp_path / "run"),
            "--max-iters", "1", "--checkpoint-every", "1", "--deterministic", "--num-threads", "1", "--no-progress"]
    assert main(argv) == 0
    assert "segm AP" in capsys.readouterr().out
    assert "coco_segm" in json.loads((tmp_path / "run" / "metrics.json").read_text())


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_mask_rcnn_trains_on_shapes_masks_and_reports_segm_ap(mask_run, tmp_path):
    log = read_log(mask_run)
    mask_losses = [entry["loss/loss_mask"] for entry in log if "iter" in entry]
    assert len(mask_losses) == 2 and all(0 < loss < 100 for loss in mask_losses)  # the mask branch trained
    metrics = evaluate(mask_run, out_dir=tmp_path / "eval", progress=False, device="cpu")
    assert set(STAT_NAMES) <= set(metrics["coco"]) and set(STAT_NAMES) <= set(metrics["coco_segm"])
    assert all(v is None or 0 <= v <= 1 for v in metrics["coco_segm"].values())
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["coco_segm"] == metrics["coco_segm"]
    segmentations = read_json(tmp_path / "eval" / "segmentations.json.gz")
    detections = read_json(tmp_path / "eval" / "detections.json.gz")
    assert len(segmentations) == len(detections) > 0
    assert set(segmentations[0]) == {"image_id", "category_id", "segmentation", "score"}
    assert segmentations[0]["segmentation"]["size"] == [96, 96]


def test_predict_gives_one_rle_per_box_in_the_stored_images_pixels(mask_run):
    from harmonic.data import build_dataset
    from harmonic.engine import load_model

    model, _ = load_model(mask_run, "cpu")
    dataset = build_dataset("shapes-tiny", "val", train=False, min_size=48, max_size=64)  # images resized to 48 px
    predictions = predict(model, torch.utils.data.Subset(dataset, [0, 1]), progress=False)
    for pred in predictions:
        assert len(pred["masks"]) == len(pred["boxes"])
        assert all(rle["size"] == [96, 96] and isinstance(rle["counts"], str) for rle in pred["masks"])
