"""The project's shapes-pretrained backbone: its cache key, its reuse, its crops, and its use by the detector."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from harmonic.data.shapes import PRESETS, render_shapes_image
from harmonic.models import DetectorConfig, build_detector
from harmonic.models import pretrain as pt

from tiny_detectors import tiny

TINY = pt.PretrainParams(num_images=6, crop_size=32, steps=3, batch_size=4, warmup=1)


def test_cache_key_names_every_parameter(tmp_path):
    base = pt.cache_key(TINY)
    assert base == pt.cache_key(pt.PretrainParams(**dataclasses.asdict(TINY)))  # a function of the values
    changed = {pt.cache_key(dataclasses.replace(TINY, **{f.name: v}))
               for f, v in zip(dataclasses.fields(TINY), ("resnet50_fpn", "shapes-tiny", 1001, 7, 48, 0.5, 4, 8, 0.05, 0.0, 2, 1))}
    assert len(changed) == len(dataclasses.fields(TINY)) and base not in changed
    path = pt.cache_path(TINY, tmp_path)
    assert path == tmp_path / "pretrained" / f"resnet18_fpn-shapes-{base[:16]}.pt"


def test_crops_one_per_object_plus_background():
    crops, labels = pt.build_crops(TINY)
    objects = [render_shapes_image(np.random.default_rng([TINY.data_seed, 7, i]), PRESETS["shapes"])[1]
               for i in range(TINY.num_images)]
    expected = [o["category"] for objs in objects for o in objs]
    assert crops.shape[1:] == (3, 32, 32) and crops.dtype == torch.uint8
    object_labels = labels[labels != pt.BACKGROUND].tolist()
    assert sorted(object_labels) == sorted(expected)
    assert 1 <= int((labels == pt.BACKGROUND).sum()) <= TINY.num_images
    assert pt._iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)


def test_ensure_builds_once_then_reuses(tmp_path, monkeypatch):
    rng_before = torch.random.get_rng_state()
    path = pt.ensure_pretrained_backbone(TINY, tmp_path, log=None)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's seed is left alone
    assert path == pt.cache_path(TINY, tmp_path) and path.is_file() and path.with_suffix(".json").is_file()
    state = torch.load(path, weights_only=True)
    assert not any(k.startswith("fc.") for k in state) and "layer4.1.bn2.running_var" in state
    summary = pt.json.loads(path.with_suffix(".json").read_text())
    assert summary["key"] == pt.cache_key(TINY) and 0.0 <= summary["val_accuracy"] <= 1.0

    def refuse(*args, **kwargs):
        raise AssertionError("a cached backbone was trained again")

    monkeypatch.setattr(pt, "pretrain_backbone", refuse)
    mtime = path.stat().st_mtime_ns
    assert pt.ensure_pretrained_backbone(TINY, tmp_path, log=None) == path
    assert path.stat().st_mtime_ns == mtime


def test_shapes_backbone_loads_into_the_detector(tmp_path, monkeypatch):
    monkeypatch.setenv("HARMONIC_DATA", str(tmp_path))
    torch.manual_seed(5)
    weights = {k: v for k, v in resnet18().state_dict().items() if not k.startswith("fc.")}
    weights["layer4.0.conv1.weight"].fill_(0.25)
    path = pt.cache_path(pt.PretrainParams(), tmp_path)  # "shapes" = the default parameters, under the data root
    path.parent.mkdir(parents=True)
    torch.save(weights, path)
    model = build_detector(tiny("retinanet", pretrained_backbone="shapes"))
    body = model.backbone.body
    assert torch.all(body.layer4[0].conv1.weight == 0.25)
    torch.testing.assert_close(body.layer2[1].bn2.running_mean, weights["layer2.1.bn2.running_mean"])
    assert not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad


def test_shapes_backbone_needs_a_resnet():
    with pytest.raises(ValueError, match='pretrained_backbone="shapes"'):
        DetectorConfig(arch="retinanet", num_classes=3, backbone="mobilenet_v3_fpn", pretrained_backbone="shapes")
    with pytest.raises(ValueError, match="backbone"):
        pt.PretrainParams(backbone="vgg16").validate()


def test_square_crop_moves_inside_the_image():
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    image[:10, :10] = 200  # a bright corner
    crop = pt._square_crop(image, (-5.0, -5.0), 20.0, 20)  # centred outside: moved to the corner square
    assert crop.shape == (20, 20, 3)
    assert crop[:9, :9].min() == 200 and crop[11:, 11:].max() == 0
    whole = pt._square_crop(image, (20.0, 20.0), 100.0, 40)  # larger than the image: the whole image
    np.testing.assert_array_equal(whole, image)


def test_study_preset_is_opt_in_and_keeps_the_premise():
    from harmonic.data.shapes import ShapesParams
    from harmonic.engine import TrainConfig
    from harmonic.experiments.sweeps import SWEEPS

    study = TrainConfig.preset("shapes-study")
    assert study.dataset == "shapes-study" and study.detector["pretrained_backbone"] == "shapes"
    assert DetectorConfig.from_dict({"num_classes": 5, **study.detector}).resolved("norm") == "frozen_bn"
    assert study.lr_steps == [round(0.767 * study.max_iters), round(0.933 * study.max_iters)]
    data = PRESETS["shapes-study"]
    assert data.max_occlusion > 0 and data.overlap_prob > 0 and data.max_objects >= 2  # occlusion stays
    assert data.image_size == ShapesParams().image_size and data.min_object_size > ShapesParams().min_object_size
    scratch = TrainConfig.preset("shapes-cpu")  # the former default study, from scratch, is kept
    assert scratch.dataset == "shapes" and scratch.max_iters == 3000 and "pretrained_backbone" not in scratch.detector
    assert SWEEPS["scratch"].parameters == {"preset": "shapes-cpu"}
    # make reproduce runs the test bed: three variants, four seeds, seed-major so pairs complete first
    runs = SWEEPS["default"].runs()
    assert {p["preset"] for _, p in runs} == {"shapes-study"} and len(runs) == 12
    assert [p["variant"] for _, p in runs[:3]] == ["baseline", "harmonic_hiou", "harmonic_hiou_detached"]
    assert {p["seed"] for _, p in runs} == {0, 1, 2, 3}
    # the attribution and dose sweeps share the test bed and the seeds, so their runs pair with the default's
    for name in ("attribution", "head_norm", "factor_terms", "alpha", "gamma", "beta_c", "comparison", "ablation"):
        assert SWEEPS[name].parameters == SWEEPS["default"].parameters and SWEEPS[name].seeds == SWEEPS["default"].seeds


def test_the_pretraining_precision_follows_the_cpu_and_keys_the_cache(monkeypatch):
    monkeypatch.setattr(pt, "native_bf16", lambda device: True)
    assert pt.pretrain_autocast() == torch.bfloat16
    bf16_key = pt.cache_key(TINY)
    monkeypatch.setattr(pt, "native_bf16", lambda device: False)
    assert pt.pretrain_autocast() is None  # emulated bfloat16 would be several times slower: float32
    assert pt.cache_key(TINY) != bf16_key  # weights trained in float32 are not taken for bfloat16 ones
