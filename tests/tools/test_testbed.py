"""The test-bed tool's schedule scaling and its positive-IoU measurement."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "models"))

import testbed  # noqa: E402

from harmonic.models import build_detector  # noqa: E402

from tiny_detectors import tiny  # noqa: E402


def test_scaled_schedule_keeps_the_default_shape():
    assert testbed.scaled_schedule(2400) == {"max_iters": 2400, "warmup_iters": 200, "lr_steps": [1841, 2239]}
    assert testbed.scaled_schedule(500) == {"max_iters": 500, "warmup_iters": 100, "lr_steps": [384, 466]}


def test_positive_iou_reads_the_regression():
    torch.manual_seed(0)
    anchors = [[16, 20, 25], [32, 40, 50], [64, 80, 101], [128, 161, 203], [256, 322, 406]]  # shapes-cpu's
    model = build_detector(tiny("retinanet", min_size=64, max_size=64, anchor_sizes=anchors))
    boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0], [20.0, 30.0, 60.0, 60.0]])
    data = [(torch.rand(3, 64, 64), {"boxes": boxes, "labels": torch.tensor([1, 2])})]
    pred = model.head.regression_head.bbox_reg
    with torch.no_grad():
        pred.weight.zero_()
        pred.bias.zero_()  # decoded boxes = the anchors: the matched anchors' own IoU
    at_anchors = testbed.positive_iou(model, data)
    assert at_anchors["num_positives"] > 0 and 0.4 <= at_anchors["pos_iou"] <= 1.0
    with torch.no_grad():
        pred.bias.view(-1, 4)[:, 0] = 5.0  # every box moved 5 widths to the right: no overlap left
    assert testbed.positive_iou(model, data)["pos_iou"] == pytest.approx(0.0, abs=1e-6)


def test_results_record_a_weights_file_without_this_machines_path():
    from testbed import portable_backbone

    assert portable_backbone("/somewhere/data/pretrained/resnet18_fpn-shapes-1.pt") == (
        "<data root>/pretrained/resnet18_fpn-shapes-1.pt")
    assert portable_backbone("shapes") == "shapes" and portable_backbone(None) is None
