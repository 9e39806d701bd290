import json

import pytest

from harmonic.experiments.sweeps import (
    SWEEPS,
    TEST_BED,
    TEST_BED_SEEDS,
    VARIANTS,
    Sweep,
    failed_runs,
    run_sweep,
)
from harmonic.models import DetectorConfig


def test_every_sweep_names_known_variants_and_unique_runs():
    for sweep in SWEEPS.values():
        names = [name for name, _ in sweep.runs()]
        assert len(names) == len(set(names)), sweep.name
        for _, params in sweep.runs():
            assert params["variant"] in VARIANTS
            assert params["loss_options"] == VARIANTS[params["variant"]]
    assert len(SWEEPS["detectors"].runs()) == 6 * 2 * 3


def test_every_variant_is_a_valid_detector_config_for_its_sweeps_archs():
    for sweep in SWEEPS.values():
        for arch in sweep.archs:
            for variant in sweep.variants:
                cfg = DetectorConfig(arch=arch, num_classes=2, **VARIANTS[variant])
                assert cfg.loss == VARIANTS[variant]["loss"], (sweep.name, arch, variant)


def test_comparison_sweep_swaps_only_the_loss_on_retinanet():
    sweep = SWEEPS["comparison"]
    assert sweep.variants == ("qfl", "varifocal", "iou_balanced")
    assert sweep.archs == ("retinanet",)
    for kind in ("qfl", "varifocal", "iou_balanced"):
        assert VARIANTS[kind] == {"loss": kind}
    assert len(sweep.runs()) == 3 * 4


def test_ablation_rows_are_cumulative():
    rows = [VARIANTS[v] for v in SWEEPS["faster_rcnn_ablation"].variants]
    assert rows[0] == {"loss": "baseline"} and rows[1] == {"loss": "harmonic", "hiou": False}
    assert rows[2]["tc_weight"] > 0 and rows[3]["hiou_gamma"] == 0.0 and rows[4]["hiou_gamma"] == 0.8
    # on RetinaNet the first two rows are the default study's baseline and the attribution's harmonic
    assert SWEEPS["ablation"].variants == SWEEPS["faster_rcnn_ablation"].variants[2:]
    assert "baseline" in SWEEPS["default"].variants and "harmonic" in SWEEPS["attribution"].variants


def test_the_retinanet_sweeps_on_the_test_bed_pair_by_seed_and_run_each_variant_once():
    on_bed = [s for s in SWEEPS.values() if s.parameters == TEST_BED and s.archs == ("retinanet",)]
    assert {s.name for s in on_bed} == {"default", "attribution", "head_norm", "factor_terms", "alpha", "gamma", "ablation", "beta_c",
                                        "comparison"}
    seen: dict[str, str] = {}
    for sweep in on_bed:
        assert sweep.seeds == TEST_BED_SEEDS
        for variant in sweep.variants:
            assert variant not in seen, f"{variant} in both {seen.get(variant)} and {sweep.name}"
            seen[variant] = sweep.name
    # the attribution's controls: the IoU-type term without the factors, HIoU and torchvision's GIoU
    assert VARIANTS["baseline_hiou"] == {"loss": "harmonic", "hiou": True, "factors": False}
    assert VARIANTS["baseline_giou"] == {"loss": "harmonic", "hiou": True, "iou_loss": "giou", "factors": False}


def test_faster_rcnn_ablation_builds_valid_configs_on_the_test_bed():
    from harmonic.experiments.run import RunSpec, build_run_config  # the engine pulls in torch

    runs = SWEEPS["faster_rcnn_ablation"].runs()
    assert len(runs) == 5 * 4
    for _, params in runs:
        config = build_run_config(RunSpec.from_dict(params))
        assert config.detector["arch"] == "faster_rcnn" and config.detector["pretrained_backbone"] == "shapes"
        assert config.detector["anchor_sizes"] == [[8], [16], [32], [64], [128]]
        # the sampling sized to the test bed reaches torchvision's RPN and RoI heads
        assert (config.detector["rpn_pre_nms_top_n_train"], config.detector["rpn_post_nms_top_n_train"],
                config.detector["box_batch_size_per_image"]) == (1000, 500, 128)


def test_run_sweep_skips_finished_and_survives_failures(tmp_path):
    sweep = Sweep("t", ("baseline", "harmonic"), seeds=(0, 1))
    done = tmp_path / "runs" / "t-baseline-s0"
    done.mkdir(parents=True)
    (done / "metrics.json").write_text("{}")
    calls = []

    def fake_run(stem, params, output):
        calls.append(params["run_name"])
        assert stem == "03_train_eval" and params["results_dir"] == str(tmp_path)
        if params["run_name"] == "t-harmonic-s0":
            raise RuntimeError("boom")
        (tmp_path / "runs" / params["run_name"]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs" / params["run_name"] / "metrics.json").write_text("{}")

    status = run_sweep(sweep, tmp_path, run_notebook=fake_run)
    assert calls == ["t-harmonic-s0", "t-baseline-s1", "t-harmonic-s1"]  # seed-major: pairs complete together
    assert status["runs"]["t-baseline-s0"]["status"].startswith("skipped")
    assert failed_runs(status) == ["t-harmonic-s0"]
    assert "boom" in status["runs"]["t-harmonic-s0"]["error"]
    on_disk = json.loads((tmp_path / "sweeps" / "t.json").read_text())
    assert on_disk == json.loads(json.dumps(status))
    # a second pass re-runs only the failed one
    calls.clear()
    status = run_sweep(sweep, tmp_path, run_notebook=lambda stem, params, out: calls.append(params["run_name"]))
    assert calls == ["t-harmonic-s0"]
    assert failed_runs(status) == []


def test_run_sweep_runs_jobs_at_once_with_their_threads(tmp_path):
    import threading
    import time

    sweep = Sweep("t", ("baseline", "harmonic"), seeds=(0, 1, 2))
    running, most, seen = [0], [0], {}
    lock = threading.Lock()

    def fake_run(stem, params, output):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            seen[params["run_name"]] = params["train_overrides"]
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        if params["run_name"] == "t-harmonic-s1":
            raise RuntimeError("boom")

    status = run_sweep(sweep, tmp_path, fake_run, jobs=2, threads=1)
    assert most[0] == 2 and len(seen) == 6
    assert all(overrides == {"num_threads": 1} for overrides in seen.values())
    assert failed_runs(status) == ["t-harmonic-s1"] and len(status["runs"]) == 6
    assert json.loads((tmp_path / "sweeps" / "t.json").read_text()) == json.loads(json.dumps(status))
    with pytest.raises(ValueError, match="jobs"):
        run_sweep(sweep, tmp_path, fake_run, jobs=0)


def test_detectors_sweep_gives_every_architecture_a_valid_detector():
    from harmonic.experiments.run import RunSpec, build_run_config  # the engine pulls in torch

    archs = set()
    for _, params in SWEEPS["detectors"].runs():
        config = build_run_config(RunSpec.from_dict(params))  # raises on an invalid DetectorConfig
        archs.add(config.detector["arch"])
        assert config.detector["loss"] == params["loss_options"]["loss"]
    assert archs == {"retinanet", "fcos", "faster_rcnn", "mask_rcnn", "ssd", "refinedet"}
    refinedet = dict(SWEEPS["detectors"].runs())["detectors-refinedet-baseline-s0"]
    assert refinedet["detector_overrides"] == {"anchor_sizes": [[16], [32], [64], [128]]}


def test_long_sweep_is_the_default_study_at_twice_the_length():
    from harmonic.engine.config import PRESETS

    long, default = SWEEPS["long"], SWEEPS["default"]
    assert long.variants == default.variants and long.seeds == default.seeds
    overrides = long.parameters["train_overrides"]
    study = PRESETS[long.parameters["preset"]]
    assert overrides["max_iters"] == 2 * study["max_iters"]
    assert overrides["lr_steps"] == [2 * step for step in study["lr_steps"]]  # the decays at the same fractions
    names = {name for name, _ in long.runs()}
    assert not names & {name for name, _ in default.runs()}  # its own runs, never mixed with the default's
