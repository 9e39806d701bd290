"""The test-bed tool's schedule scaling and its positive-IoU measurement."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
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


def _record(name, seed, ap, *, iters=2400, loss=None, preset=None, **extra):
    record = {"name": name, "seed": seed, "AP": ap, "AP50": 2 * ap, "AP75": ap / 2, "iters": iters, "lr": 0.02,
              "min_size": 160, "train_minutes": 5.0 + seed, "pos_iou": 0.7, "n_matched": 100,
              "n_matched_above_05": seed, "train": {"checkpoint_every": 400}, "pretrained_backbone": "shapes", **extra}
    if preset:
        record.update(preset=preset, data={}, detector={"loss": loss, "hiou": True} if loss else {})
    else:
        record.update(data={"max_object_size": 0.7, "max_objects": 3, "max_occlusion": 0.4, "min_object_size": 0.25,
                            "overlap_prob": 0.3}, detector={"pretrained_backbone": "shapes"})
    return record


def test_watch_tail_averages_the_last_tenth_of_the_log():
    log = [{"iter": i, "watch/reversed_share": 0.0 if i <= 90 else 1.0, "watch/iou_p50": i / 100} for i in range(1, 101)]
    tail = testbed.watch_tail(log)
    assert tail["watch_reversed_share"] == 1.0  # iterations 91-100 only
    assert tail["watch_iou_p50"] == pytest.approx(0.955)
    assert "watch_score_p50" not in tail  # not logged: left out, not zero
    assert testbed.watch_tail([]) == {}


def test_frontier_groups_pool_seeds_and_read_the_study_preset_as_d3():
    records = [_record("a-s0", 0, 10.0), _record("a-s1", 1, 12.0),  # D3 + shapes backbone, given as overrides
               _record("b-s2", 2, 14.0, preset="shapes-study"),  # the same setting, given as the preset
               _record("c-s0", 0, 3.0, preset="shapes-study", loss="harmonic"),
               _record("d-s0", 0, 20.0, iters=4800)]
    groups = {(g["loss"], g["iters"]): g for g in testbed.frontier_groups(records)}
    assert set(groups) == {("baseline", 2400), ("harmonic_hiou", 2400), ("baseline", 4800)}
    pooled = groups[("baseline", 2400)]
    assert pooled["data"] == "D3" and pooled["backbone"] == "shapes" and pooled["seeds"] == [0, 1, 2]
    assert pooled["AP"] == 12.0 and pooled["AP_sd"] == 2.0 and pooled["AP50"] == 24.0
    assert pooled["minutes"] == [5.0, 7.0] and pooled["matched_above_05"] == 3 and pooled["matched"] == 300
    assert groups[("baseline", 4800)]["AP_sd"] is None  # one seed: no spread claimed


def test_paired_loss_contrasts_pair_by_seed_with_an_interval_and_the_detectable_effect():
    from scipy import stats

    from harmonic.experiments.report import minimum_detectable_effect

    base = [_record(f"b{s}", s, ap, preset="shapes-study") for s, ap in enumerate((10.0, 12.0, 11.0, 13.0))]
    method = [_record(f"h{s}", s, ap, preset="shapes-study", loss="harmonic") for s, ap in enumerate((8.0, 11.0, 8.0, 12.0))]
    unpaired = [_record("h9", 9, 0.0, preset="shapes-study", loss="harmonic")]  # no baseline of seed 9
    (contrast,) = testbed.paired_loss_contrasts(base + method + unpaired)
    diffs = [-2.0, -1.0, -3.0, -1.0]
    sd = float(np.std(diffs, ddof=1))
    half = stats.t.ppf(0.975, 3) * sd / 2
    assert contrast["loss"] == "harmonic_hiou" and contrast["seeds"] == [0, 1, 2, 3] and contrast["iters"] == 2400
    assert contrast["diff"] == -1.75
    assert contrast["low"] == pytest.approx(-1.75 - half, abs=0.01) and contrast["high"] == pytest.approx(-1.75 + half, abs=0.01)
    assert contrast["mde"] == pytest.approx(minimum_detectable_effect(sd, 4), abs=0.01)
    assert testbed.paired_loss_contrasts(base + method[:1]) == []  # one pair: no interval


def test_frontier_rewrites_only_its_block_of_the_doc_and_refuses_a_doc_without_one(tmp_path):
    records_dir = tmp_path / "runs"
    records_dir.mkdir()
    for record in (_record("x-s0", 0, 10.0), _record("x-s1", 1, 12.0)):
        (records_dir / f"{record['name']}.json").write_text(json.dumps(record))
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{testbed.BEGIN}\nstale\n{testbed.END}\nafter\n")
    out = testbed.frontier(doc, records_dir=records_dir, out=tmp_path / "frontier.json", runs_dir=tmp_path / "none")
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith(f"{testbed.END}\nafter\n") and "stale" not in text
    assert "| baseline | 2400 | 2 | 5.0-6.0 | 11.00 ± 1.41 |" in text
    assert json.loads(out.read_text())["groups"][0]["runs"] == ["x-s0", "x-s1"]
    assert out.with_suffix(".png").stat().st_size > 0
    bare = tmp_path / "bare.md"
    bare.write_text("no block\n")
    with pytest.raises(ValueError, match="bare.md"):
        testbed.frontier(bare, records_dir=records_dir, out=tmp_path / "other.json", runs_dir=tmp_path / "none")
    assert not (tmp_path / "other.json").exists()  # nothing written when the doc cannot take the table


def test_pos_iou_of_run_folders_merges_by_name_and_names_a_missing_model(tmp_path, monkeypatch):
    import harmonic.data
    import harmonic.engine.checkpoints

    out = tmp_path / "pos_iou.json"
    out.write_text(json.dumps({"earlier-run": {"pos_iou": 0.5, "num_positives": 7}}))
    run_dir = tmp_path / "default-baseline-s0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "final.pt").write_bytes(b"")
    (run_dir / "config.json").write_text(json.dumps({"config": {"dataset": "shapes-study"}}))
    seen = {}
    monkeypatch.setattr(harmonic.engine.checkpoints, "load_model", lambda path: (f"model of {path.name}", None))
    monkeypatch.setattr(harmonic.data, "build_dataset", lambda name, split, train: seen.setdefault("data", (name, split, train)))
    monkeypatch.setattr(testbed, "positive_iou", lambda model, data: {"pos_iou": 0.123456, "num_positives": 3})
    table = testbed.run_pos_iou([run_dir], out)
    assert seen["data"] == ("shapes-study", "val", False)
    assert table == json.loads(out.read_text()) == {"default-baseline-s0": {"pos_iou": 0.1235, "num_positives": 3},
                                                     "earlier-run": {"pos_iou": 0.5, "num_positives": 7}}
    (run_dir / "checkpoints" / "final.pt").unlink()
    with pytest.raises(FileNotFoundError, match="default-baseline-s0"):
        testbed.run_pos_iou([run_dir], out)


def test_subset_ap_scores_a_run_on_the_images_it_shares_with_another_data_set(tmp_path):
    import gzip

    from harmonic.data.shapes import generate_dataset

    base = dict(image_size=48, min_objects=1, max_objects=2, min_object_size=0.3, max_object_size=0.6)
    small = generate_dataset(tmp_path / "small", {**base, "num_train": 1, "num_val": 2})["root"]
    large = generate_dataset(tmp_path / "large", {**base, "num_train": 1, "num_val": 5})["root"]
    run_dir = tmp_path / "runs" / "big-baseline-s0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"config": {"dataset": str(large), "val_dataset": None}}))
    gt = json.loads((Path(large) / "val.json").read_text())
    # exact boxes on the two shared images, nothing on the other three: AP 1 there, less on all five
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
                  for a in gt["annotations"] if a["image_id"] <= 2]
    with gzip.open(run_dir / "detections.json.gz", "wt") as f:
        json.dump(detections, f)
    out = tmp_path / "subset_ap.json"
    table = testbed.run_subset_ap([run_dir], str(small), out)
    row = table["big-baseline-s0"]
    assert row["images"] == 2 and row["AP"] == row["AP50"] == row["AP75"] == 1.0 and json.loads(out.read_text()) == table
    assert testbed.run_subset_ap([run_dir], str(large), out)["big-baseline-s0"]["AP"] < 0.9
    other = generate_dataset(tmp_path / "other", {**base, "num_train": 1, "num_val": 2}, seed=1)["root"]
    with pytest.raises(ValueError, match="not the same in both"):
        testbed.run_subset_ap([run_dir], str(other), tmp_path / "never.json")
    (run_dir / "detections.json.gz").unlink()
    with pytest.raises(FileNotFoundError, match="big-baseline-s0"):
        testbed.run_subset_ap([run_dir], str(small), tmp_path / "never.json")
    assert not (tmp_path / "never.json").exists()


def test_data_lever_compares_the_sweeps_unpaired_on_shared_images_and_pairs_within_the_larger(tmp_path):
    from scipy import stats

    runs_dir = tmp_path / "runs"
    small_ap = {("baseline", 0): 0.30, ("baseline", 1): 0.32, ("m", 0): 0.29, ("m", 1): 0.31}
    # the larger sweep: AP on all its validation images, and (subset table) on the shared ones
    large_ap = {("baseline", 0): 0.35, ("baseline", 1): 0.34, ("m", 0): 0.32, ("m", 1): 0.30}
    shared_ap = {("baseline", 0): 0.36, ("baseline", 1): 0.33, ("m", 0): 0.31, ("m", 1): 0.30}
    subset = {}
    for sweep, table in (("small", small_ap), ("large", large_ap)):
        for (variant, seed), ap in table.items():
            run_dir = runs_dir / f"{sweep}-{variant}-s{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "run.json").write_text(json.dumps({"variant": variant, "seed": seed, "sweep": sweep}))
            (run_dir / "metrics.json").write_text(json.dumps({"coco": {"AP": ap}}))
            if sweep == "large":
                subset[run_dir.name] = {"subset": "x", "images": 150, "AP": shared_ap[variant, seed]}
    (tmp_path / "subset.json").write_text(json.dumps(subset))
    out = tmp_path / "lever.json"
    result = testbed.data_lever(runs_dir, tmp_path / "subset.json", out, small="small", large="large")
    assert json.loads(out.read_text()) == result and result["shared_images"] == [150]
    base = result["by_variant"]["baseline"]
    assert base["small"]["mean"] == pytest.approx(31.0) and base["large"]["mean"] == pytest.approx(34.5)
    welch = stats.ttest_ind([36, 33], [30, 32], equal_var=False).confidence_interval(0.95)
    assert base["difference"]["mean"] == pytest.approx(3.5)
    assert (base["difference"]["low"], base["difference"]["high"]) == pytest.approx((welch.low, welch.high))
    paired = result["large_paired"]["m"]
    assert paired["shared_images"]["mean"] == pytest.approx(-4.0) and paired["all_images"]["mean"] == pytest.approx(-3.5)
    assert paired["shared_images"]["sd"] == pytest.approx(1.4142, abs=1e-3)  # differences -5, -3
    assert paired["all_images"]["sd"] == pytest.approx(0.7071, abs=1e-3)  # differences -3, -4
    assert result["large_paired"]["baseline"]["sd_shared_images"] == pytest.approx(2.1213, abs=1e-3)
    assert result["large_paired"]["baseline"]["sd_all_images"] == pytest.approx(0.7071, abs=1e-3)
    del subset["large-m-s1"]
    (tmp_path / "subset.json").write_text(json.dumps(subset))
    with pytest.raises(ValueError, match="large-m-s1"):
        testbed.data_lever(runs_dir, tmp_path / "subset.json", None, small="small", large="large")


def test_study_groups_read_committed_runs_and_their_measured_iou(tmp_path):
    runs_dir = tmp_path / "runs"
    for seed, ap in ((0, 0.10), (1, 0.12)):
        run_dir = runs_dir / f"default-baseline-s{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps({"variant": "baseline", "seed": seed, "sweep": "default"}))
        (run_dir / "config.json").write_text(json.dumps({"config": {
            "dataset": "shapes-study", "max_iters": 200, "lr": 0.02,
            "detector": {"min_size": 160, "pretrained_backbone": "shapes"}}}))
        (run_dir / "metrics.json").write_text(json.dumps({"coco": {"AP": ap, "AP50": 0.2, "AP75": 0.05}}))
        (run_dir / "score_iou.json").write_text(json.dumps({"scores": [0.9, 0.4, 0.6]}))
        log = [{"iter": i, "time": 0.6, "watch/reversed_share": 0.5} for i in range(1, 201)]
        (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    pos_iou = tmp_path / "pos_iou.json"
    pos_iou.write_text(json.dumps({"default-baseline-s0": {"pos_iou": 0.7}, "default-baseline-s1": {"pos_iou": 0.8}}))
    (group,) = testbed.study_groups(runs_dir, pos_iou=pos_iou)
    assert group["loss"].startswith("baseline (") and group["iters"] == 200 and group["seeds"] == [0, 1]
    assert group["variant"] == "baseline"  # what the figure joins by, not the label
    assert (group["data"], group["backbone"], group["px"], group["lr"]) == ("D3", "shapes", 160, 0.02)
    assert group["AP"] == 11.0 and group["AP_sd"] == pytest.approx(1.41, abs=0.01)
    assert group["minutes"] == [2.0, 2.0] and group["matched_above_05"] == 4 and group["matched"] == 6
    assert group["pos_iou"] == 0.75 and group["watch_reversed_share"] == 0.5
    assert testbed.study_groups(runs_dir, pos_iou=tmp_path / "absent.json")[0]["pos_iou"] is None
    assert testbed.study_groups(runs_dir, pos_iou=pos_iou, variants=("harmonic_hiou",)) == []
    # another detector's runs name it and carry it, so the figure never joins them to RetinaNet's line
    for seed in (0, 1):
        config_path = runs_dir / f"default-baseline-s{seed}" / "config.json"
        config = json.loads(config_path.read_text())
        config["config"]["detector"]["arch"] = "faster_rcnn"
        config_path.write_text(json.dumps(config))
    (group,) = testbed.study_groups(runs_dir, pos_iou=pos_iou, variants=("baseline",))
    assert group["arch"] == "faster_rcnn" and group["loss"].startswith("Faster R-CNN baseline (")


def test_setting_names_the_loss_as_the_sweeps_do_and_keeps_the_trained_backbone():
    detached = _record("d", 0, 1.0, preset="shapes-study", loss="harmonic")
    detached["detector"]["detach_factors"] = True
    assert testbed.setting_of(detached)["loss"] == "harmonic_hiou_detached" and testbed.setting_of(detached)["other"] == ""
    odd = _record("o", 0, 1.0, preset="shapes-study")
    odd["detector"] = {"loss": "harmonic", "hiou": True, "hiou_weight": 0.7, "fpn_channels": 32}
    setting = testbed.setting_of(odd)  # no sweep variant has alpha 0.7: named by its options; the rest stays apart
    assert json.loads(setting["loss"]) == {"loss": "harmonic", "hiou": True, "hiou_weight": 0.7}
    assert json.loads(setting["other"]) == {"fpn_channels": 32}
    overridden = _record("p", 0, 1.0, preset="shapes-study")
    overridden["data"] = {"max_objects": 2}  # --preset shapes-study --data ...: still the shapes backbone
    assert testbed.setting_of(overridden)["backbone"] == "shapes"
    assert testbed.setting_of(overridden)["data"] == json.dumps({"max_objects": 2})
    # how a run was executed is not what it computes: bookkeeping and the tool's own thread count stay out
    executed = _record("e", 0, 1.0, preset="shapes-study")
    executed["train"] = {"checkpoint_every": 400, "log_every": 10, "num_threads": testbed.TOOL_RUNTIME["num_threads"]}
    assert testbed.setting_of(executed)["other"] == ""
    executed["train"] = {"num_threads": 2, "warmup_iters": 50}  # another thread count, another schedule: kept apart
    assert json.loads(testbed.setting_of(executed)["other"]) == {"num_threads": 2, "warmup_iters": 50}


def test_a_detached_run_pairs_with_the_baseline_of_its_setting():
    base = [_record(f"b{s}", s, 10.0 + s, preset="shapes-study") for s in (0, 1)]
    detached = [_record(f"d{s}", s, 5.0 + 2 * s, preset="shapes-study", loss="harmonic") for s in (0, 1)]
    for record in detached:
        record["detector"]["detach_factors"] = True
    (contrast,) = testbed.paired_loss_contrasts(base + detached)
    assert contrast["loss"] == "harmonic_hiou_detached" and contrast["diff"] == -4.5 and contrast["seeds"] == [0, 1]


def test_a_loss_on_another_network_pairs_with_the_baseline_on_that_network():
    def gn(name, seed, ap, loss=None):
        record = _record(name, seed, ap, preset="shapes-study", loss=loss)
        record["detector"]["head_norm"] = "gn"
        return record

    base = [_record(f"b{s}", s, 10.0 + s, preset="shapes-study") for s in (0, 1)]
    method = [_record(f"h{s}", s, 4.0, preset="shapes-study", loss="harmonic") for s in (0, 1)]
    base_gn = [gn(f"bg{s}", s, 11.0 + 2 * s) for s in (0, 1)]
    method_gn = [gn(f"hg{s}", s, 9.0 + s, loss="harmonic") for s in (0, 1)]
    assert testbed.reference_variant("harmonic_hiou_gn") == "baseline_gn"
    assert testbed.reference_variant("harmonic_hiou") == testbed.reference_variant("nothing known") == "baseline"
    contrasts = {c["loss"]: c for c in testbed.paired_loss_contrasts(base + method + base_gn + method_gn)}
    assert set(contrasts) == {"harmonic_hiou", "baseline_gn", "harmonic_hiou_gn"}
    assert (contrasts["harmonic_hiou_gn"]["reference"], contrasts["harmonic_hiou_gn"]["diff"]) == ("baseline_gn", -2.5)
    assert (contrasts["baseline_gn"]["reference"], contrasts["baseline_gn"]["diff"]) == ("baseline", 1.5)
    assert (contrasts["harmonic_hiou"]["reference"], contrasts["harmonic_hiou"]["diff"]) == ("baseline", -6.5)
    assert "| harmonic_hiou_gn − baseline_gn |" in testbed.markdown_frontier([], list(contrasts.values()))


def test_the_same_setting_and_seed_twice_is_refused_by_name():
    twice = [_record("first", 0, 10.0), _record("again", 0, 11.0)]
    with pytest.raises(ValueError, match="'first' and 'again'"):
        testbed.frontier_groups(twice)
    with pytest.raises(ValueError, match="'first' and 'again'"):
        testbed.paired_loss_contrasts(twice)


def test_a_broken_record_is_named_and_frontier_writes_nothing(tmp_path):
    records_dir = tmp_path / "runs"
    records_dir.mkdir()
    good = _record("x-s0", 0, 10.0)
    (records_dir / "x-s0.json").write_text(json.dumps(good))
    (records_dir / "y-s0.json").write_text(json.dumps({k: v for k, v in good.items() if k != "train_minutes"}))
    doc = tmp_path / "doc.md"
    doc.write_text(f"{testbed.BEGIN}\nstale\n{testbed.END}\n")
    with pytest.raises(ValueError, match=r"y-s0.json: record without the field\(s\) \['train_minutes'\]"):
        testbed.frontier(doc, records_dir=records_dir, out=tmp_path / "frontier.json", runs_dir=tmp_path / "none")
    (records_dir / "y-s0.json").write_text("{not json")
    with pytest.raises(ValueError, match="y-s0.json: not a JSON record"):
        testbed.frontier(doc, records_dir=records_dir, out=tmp_path / "frontier.json", runs_dir=tmp_path / "none")
    assert "stale" in doc.read_text() and not (tmp_path / "frontier.json").exists()


def test_rewatch_replaces_the_watch_fields_from_the_log(tmp_path):
    records_dir, runs_dir = tmp_path / "records", tmp_path / "runs"
    records_dir.mkdir()
    (runs_dir / "r").mkdir(parents=True)
    (records_dir / "r.json").write_text(json.dumps(_record("r", 0, 10.0, watch_score_p90=0.9)))
    log = [{"iter": i, "watch/reversed_share": 0.25} for i in range(1, 11)]
    (runs_dir / "r" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    record = testbed.rewatch("r", records_dir, runs_dir)
    assert record["watch_reversed_share"] == 0.25 and "watch_score_p90" not in record  # stale field gone
    assert json.loads((records_dir / "r.json").read_text()) == record
    (runs_dir / "r" / "log.jsonl").write_text(json.dumps({"iter": 1, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no watch statistics"):
        testbed.rewatch("r", records_dir, runs_dir)


@pytest.mark.parametrize("preset", ["shapes-cpu", "shapes-study"])
def test_run_keeps_the_study_presets_own_data_and_records_the_preset(tmp_path, monkeypatch, preset):
    import importlib

    import harmonic.data

    # the modules themselves (harmonic.engine re-exports functions of the same names)
    checkpoints, predict, training = (importlib.import_module(f"harmonic.engine.{name}")
                                      for name in ("checkpoints", "predict", "training"))
    monkeypatch.setattr(testbed, "ROOT", tmp_path)
    monkeypatch.setattr(testbed, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(testbed, "dataset_folder", lambda data: tmp_path / "generated")
    seen = {}

    def fake_train(cfg, progress):
        seen["cfg"] = cfg
        run_dir = Path(cfg.output_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "score_iou.json").write_text(json.dumps({"scores": [0.7, 0.2]}))
        log = [{"iter": i, "loss": 1.0, "time": 0.1, "watch/reversed_share": 0.5} for i in range(1, 11)]
        (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(predict, "evaluate", lambda *a, **k: {
        "coco": {"AP": 0.2, "AP50": 0.4, "AP75": 0.1}, "consistency": {"n_objects": 3, "spearman": 0.5}})
    monkeypatch.setattr(checkpoints, "load_model", lambda path: ("model", None))
    monkeypatch.setattr(harmonic.data, "build_dataset", lambda name, split, train: seen.setdefault("val", name))
    monkeypatch.setattr(testbed, "positive_iou", lambda model, data: {"pos_iou": 0.75, "num_positives": 9})
    record = testbed.run("r", {}, {"loss": "harmonic", "hiou": True}, {}, 100, 0.02, 1, preset)
    cfg = seen["cfg"]
    if preset == "shapes-study":  # its own data set, and the record says which preset
        assert cfg.dataset == "shapes-study" and seen["val"] == "shapes-study" and record["preset"] == "shapes-study"
        assert cfg.detector["pretrained_backbone"] == "shapes"
    else:  # the shapes generator's data with the overrides, as the first lever runs; no preset field
        assert cfg.dataset == str(tmp_path / "generated") == seen["val"] and "preset" not in record
    assert cfg.detector["loss"] == "harmonic" and cfg.max_iters == 100 and cfg.seed == 1
    assert record["AP"] == 20.0 and record["n_matched_above_05"] == 1 and record["watch_reversed_share"] == 0.5
    assert json.loads((tmp_path / "records" / "r.json").read_text()) == record
    assert testbed.load_record(tmp_path / "records" / "r.json") == record  # every required field is there


def test_frontier_figure_joins_a_study_variant_to_its_losss_line_where_that_length_is_free():
    def group(loss, iters, pos_iou=0.7):
        study = {"variant": loss.split(" (", 1)[0]} if " (" in loss else {}  # as study_groups names them
        return {"data": "D3", "backbone": "shapes", "px": 160, "lr": 0.02, "other": "", "loss": loss,
                "iters": iters, "AP": 5.0, "AP_sd": 0.5, "seeds": [0, 1], "pos_iou": pos_iou, **study}

    groups = [group("baseline", 2400), group("harmonic_hiou", 4800),
              group("harmonic_hiou (`make sweep SWEEP=default`)", 2400),  # joins: the line has no 2400 point
              group("baseline (`make sweep SWEEP=default`)", 2400)]  # stays apart: the line has one there
    fig = testbed.plot_frontier(groups)
    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert labels == ["baseline, seeds: 2", "harmonic_hiou, seeds: 2, 2",
                      "baseline (make sweep SWEEP=default), seeds: 2"]
    # another detector's baseline at a free length joins its own detector's line, not RetinaNet's
    frcnn = [{**group(f"Faster R-CNN baseline (`make sweep SWEEP={sweep}`)", iters), "variant": "baseline",
              "arch": "faster_rcnn"} for sweep, iters in (("a", 4800), ("b", 9600))]
    fig = testbed.plot_frontier(groups + frcnn)
    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert labels[-1] == "Faster R-CNN baseline, seeds: 2, 2" and labels[0] == "baseline, seeds: 2"
    assert "Faster R-CNN" in fig.texts[-1].get_text()  # the caption names both detectors
    # a study on the larger split is its own line and named, in the label and the caption
    large = {**group("Faster R-CNN baseline on D3-large (`make sweep SWEEP=c`)", 2400), "variant": "baseline",
             "arch": "faster_rcnn", "data": "D3-large"}
    fig = testbed.plot_frontier(groups + frcnn + [large])
    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert "Faster R-CNN baseline on D3-large, seeds: 2" in labels and len(labels) == 5
    assert "Faster R-CNN baseline, seeds: 2, 2" in labels and "D3-large: 10x the training images" in fig.texts[-1].get_text()
    assert testbed._frontier_rows([{**large, "data": "D5"}]) == []  # only the named larger splits


def test_the_d3_name_is_the_study_presets_data():
    import dataclasses

    from harmonic.data.shapes import PRESETS

    shapes, study = (dataclasses.asdict(PRESETS[name]) for name in ("shapes", "shapes-study"))
    overrides = {key: value for key, value in study.items() if shapes[key] != value}
    assert testbed.DATA_NAMES[json.dumps(overrides, sort_keys=True)] == "D3" == testbed.PRESET_DATA["shapes-study"]


def test_ranking_splits_each_study_from_committed_detections_and_writes_its_block(tmp_path):
    import gzip

    from pycocotools.coco import COCO

    from harmonic.data.shapes import generate_dataset
    from harmonic.evaluation.coco import coco_evaluate

    data = generate_dataset(tmp_path / "data", dict(image_size=48, min_objects=1, max_objects=2, min_object_size=0.3,
                                                    max_object_size=0.6, num_train=1, num_val=4))["root"]
    gt_json = json.loads((Path(data) / "val.json").read_text())
    gt = COCO(str(Path(data) / "val.json"))
    runs_dir = tmp_path / "runs"
    for variant in ("baseline", "m"):
        for seed in (0, 1):
            detections = []
            for a in gt_json["annotations"]:
                x, y, w, h = a["bbox"]
                shift = 0.3 * w if variant == "m" else 0.1 * w * seed  # the variant's boxes are worse
                detections += [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x + shift, y, w, h],
                                "score": 0.6},
                               {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x, y, w, h],
                                "score": 0.5}]  # the exact box scored below a shifted one: inconsistent
            run_dir = runs_dir / f"s-{variant}-s{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "run.json").write_text(json.dumps({"variant": variant, "seed": seed, "sweep": "s"}))
            (run_dir / "config.json").write_text(json.dumps({"config": {"dataset": str(data), "val_dataset": None,
                                                                        "max_iters": 10, "detector": {}}}))
            (run_dir / "metrics.json").write_text(json.dumps({"coco": coco_evaluate(gt, detections)}))
            with gzip.open(run_dir / "detections.json.gz", "wt") as f:
                json.dump(detections, f)
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{testbed.RANKING_BEGIN}\nstale\n{testbed.RANKING_END}\nafter\n")
    out = tmp_path / "ranking.json"
    result = testbed.run_ranking(runs_dir, {"s": ("m",)}, out, doc)
    again = testbed.run_ranking(runs_dir, {"s": ("m",)}, out, doc)  # cached: the same numbers, nothing measured
    assert again == result and json.loads(out.read_text()) == result and out.with_suffix(".png").stat().st_size > 0
    assert sorted(result["runs"]) == ["s-baseline-s0", "s-baseline-s1", "s-m-s0", "s-m-s1"]
    (study,) = result["studies"]
    assert study["setting"] == f"RetinaNet, 10 iterations, {data}"
    row = study["variants"]["m"]
    parts = row["parts"]["AP"]
    assert sum(p["mean"] for p in parts.values()) == pytest.approx(row["difference"]["AP"]["mean"], abs=1e-9)
    for run in result["runs"].values():  # every run holds the exact boxes: in the ideal order, AP 1
        assert run["AP_ideal"] == 1.0 and run["AP"] <= run["AP_within"] <= 1.0
    assert parts["boxes"]["mean"] == 0.0 and row["difference"]["AP"]["mean"] < 0
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith(f"{testbed.RANKING_END}\nafter\n") and "stale" not in text
    assert "(`s`) | `m` | 2 |" in text
    bare = tmp_path / "bare.md"
    bare.write_text("no block\n")
    with pytest.raises(ValueError, match="bare.md"):
        testbed.run_ranking(runs_dir, {"s": ("m",)}, tmp_path / "other.json", bare)
    assert not (tmp_path / "other.json").exists()
