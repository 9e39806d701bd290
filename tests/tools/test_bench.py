"""The training-step benchmark section: what it writes and how its ratios are made. No timing assertions."""

from __future__ import annotations

import json
import math
import os

import bench
import pytest
import torch

from harmonic.engine import PRESETS

VARIANTS = {"baseline", "harmonic_fused", "harmonic_reference"}


@pytest.fixture
def keep_threads():
    """``bench.run`` sets torch's thread count for the process; put it back for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_settings_follow_the_cpu_preset_and_add_resnet50_at_512_only_in_full_runs():
    full = bench.train_step_settings(bench.BenchConfig.for_run(device="cpu"))
    assert [setting["name"] for setting in full] == ["shapes_study", "shapes_cpu", "r50_512"]
    study, small, r50 = full
    # the default study's detector: the shapes-study preset's, its backbone loaded as a pretrained one
    assert {key: study["detector"][key] for key in PRESETS["shapes-study"]["detector"] if key != "pretrained_backbone"} == {
        key: value for key, value in PRESETS["shapes-study"]["detector"].items() if key != "pretrained_backbone"}
    assert study["detector"]["pretrained_backbone"] == bench.RANDOM_BACKBONE
    preset = PRESETS["shapes-cpu"]["detector"]
    assert {key: small["detector"][key] for key in preset} == preset
    assert small["image_size"] == 160 and small["batch"] == 2 and small["detector"]["num_classes"] == 5
    assert r50["detector"] == {"arch": "retinanet", "backbone": "resnet50_fpn", "num_classes": 80,
                               "min_size": 512, "max_size": 512}
    assert r50["batch"] == 1 and r50["data"] == "random"

    (quick,) = bench.train_step_settings(bench.BenchConfig.for_run(device="cpu", quick=True))
    assert quick["image_size"] == 64 and quick["detector"]["min_size"] == quick["detector"]["max_size"] == 64
    # anchors scaled with the image: 16 px at 160 px -> 6.4 px at 64 px
    assert quick["detector"]["anchor_sizes"][0] == pytest.approx([16 * 0.4, 20 * 0.4, 25 * 0.4])


def test_batches_are_deterministic_and_well_formed():
    images, targets = bench._shapes_batch(64, 2, seed=3)
    again, targets_again = bench._shapes_batch(64, 2, seed=3)
    assert len(images) == 2 and images[0].shape == (3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(images, again))
    for target, same in zip(targets, targets_again):
        assert torch.equal(target["boxes"], same["boxes"]) and torch.equal(target["labels"], same["labels"])
        boxes = target["boxes"]
        assert len(boxes) >= 1 and bool((boxes[:, 2:] > boxes[:, :2]).all()) and float(boxes.max()) <= 64
        assert 1 <= int(target["labels"].min()) and int(target["labels"].max()) <= 5
    images, targets = bench._random_batch(96, 2, classes=80, boxes_per_image=5, seed=0)
    assert images[1].shape == (3, 96, 96)
    for target in targets:
        boxes = target["boxes"]
        assert boxes.shape == (5, 4) and bool((boxes[:, 2:] > boxes[:, :2]).all())
        assert float(boxes.min()) >= 0 and float(boxes.max()) <= 96
        assert 1 <= int(target["labels"].min()) and int(target["labels"].max()) <= 80


@pytest.mark.slow
def test_variants_start_from_the_same_weights_with_their_own_loss():
    (setting,) = bench.train_step_settings(bench.BenchConfig.for_run(device="cpu", quick=True))
    models = bench._step_models(setting["detector"], torch.device("cpu"), seed=0)
    assert set(models) == VARIANTS
    states = {name: model.state_dict() for name, model in models.items()}
    for name in ("harmonic_fused", "harmonic_reference"):
        assert states[name].keys() == states["baseline"].keys()
        assert all(torch.equal(states[name][key], value) for key, value in states["baseline"].items())
    heads = {name: model.head for name, model in models.items()}
    assert heads["baseline"].options is None
    assert heads["harmonic_fused"].options.fused is True and heads["harmonic_reference"].options.fused is False
    assert heads["harmonic_fused"].options.hiou is True


def test_the_study_setting_freezes_the_backbone_as_a_pretrained_one():
    from torchvision.ops.misc import FrozenBatchNorm2d

    study = bench.train_step_settings(bench.BenchConfig.for_run(device="cpu"))[0]
    (model,) = bench._step_models(study["detector"], torch.device("cpu"), seed=0, variants={"plain": {"loss": "baseline"}}).values()
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d) and not body.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer4.parameters() if p.dim() > 1)
    again = bench._step_models(study["detector"], torch.device("cpu"), seed=0, variants={"plain": {"loss": "baseline"}})
    assert torch.equal(again["plain"].backbone.body.layer4[0].conv1.weight, body.layer4[0].conv1.weight)  # seeded


@pytest.mark.slow
def test_quick_train_step_section_writes_times_memory_and_ratios(tmp_path, capsys, keep_threads):
    out = tmp_path / "bench.json"
    argv = ["--quick", "--sections", "train_step", "--out", str(out), "--device", "cpu", "--threads", "1",
            "--repeats", "1"]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert list(result["sections"]) == ["train_step"]
    section = result["sections"]["train_step"]
    rows = {row["variant"]: row for row in section["rows"]}
    assert set(rows) == VARIANTS and len(section["rows"]) == 3
    assert {row["setting"] for row in section["rows"]} == {"shapes_cpu"}
    for row in rows.values():
        assert row["image_size"] == 64 and row["batch"] == 2 and row["backbone"] == "resnet18_fpn"
        for key in ("median_ms", "q1_ms", "q3_ms", "min_ms", "peak_mb", "first_loss"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["variant"], key)
        assert row["q1_ms"] <= row["median_ms"] <= row["q3_ms"]
    base = rows["baseline"]
    for row in rows.values():
        assert row["over_baseline"] == pytest.approx(row["median_ms"] / base["median_ms"], rel=1e-12)
        assert row["peak_over_baseline"] == pytest.approx(row["peak_mb"] / base["peak_mb"], rel=1e-12)
    # same weights, same batch: the two Harmonic paths give one loss, the baseline another
    fused, reference = rows["harmonic_fused"], rows["harmonic_reference"]
    assert fused["first_loss"] == pytest.approx(reference["first_loss"], rel=1e-4)
    assert abs(fused["first_loss"] - base["first_loss"]) > 1e-3 * base["first_loss"]

    (summary,) = section["summary"]
    assert summary["harmonic_fused_over_baseline"] == pytest.approx(fused["median_ms"] / base["median_ms"], rel=1e-12)
    assert summary["harmonic_reference_over_baseline"] == pytest.approx(
        reference["median_ms"] / base["median_ms"], rel=1e-12
    )
    assert summary["fused_over_reference"] == pytest.approx(fused["median_ms"] / reference["median_ms"], rel=1e-12)
    assert summary["peak_harmonic_fused_over_baseline"] == pytest.approx(fused["peak_mb"] / base["peak_mb"], rel=1e-12)
    assert summary["peak_harmonic_reference_over_baseline"] == pytest.approx(
        reference["peak_mb"] / base["peak_mb"], rel=1e-12
    )
    assert summary["meets_time_target"] == (summary["harmonic_fused_over_baseline"] <= summary["target_time_ratio"])
    assert summary["target_time_ratio"] == bench.TARGET_STEP_TIME_RATIO == 1.03
    assert summary["target_peak_ratio"] == 1.0 and isinstance(summary["meets_memory_target"], bool)
    assert summary["first_loss_rel_diff_fused_vs_reference"] < 1e-4
    assert summary["positive_anchors"] >= 1
    assert section["machine"]["torch_threads"] == 1
    assert section["settings"]["detectors"]["shapes_cpu"]["fpn_channels"] == 64
    printed = capsys.readouterr().out
    assert "harmonic_reference" in printed and "harmonic_fused_over_baseline" in printed


def test_readme_block_shows_the_measured_ratios(tmp_path):
    from bench import readme_markdown

    from harmonic.experiments.readme import markers, replace_block

    bench_begin, bench_end = markers("bench")

    result = {
        "provenance": {"device": {"device": "cpu"}},
        "sections": {
            "dense_loss": {"machine": {"torch_threads": 1}, "summary": [
                {"scale": 1.0, "anchors": 100000, "fused_backend": "native", "harmonic_fused_over_stock": 0.1862,
                 "harmonic_fused_over_sigmoid": 8.139, "harmonic_fused_watch_over_sigmoid": 9.456,
                 "harmonic_reference_over_stock": 0.795}]},
            "train_step": {"machine": {"torch_threads": 1}, "summary": [
                {"setting": "shapes_cpu", "harmonic_fused_over_baseline": 1.0123,
                 "harmonic_reference_over_baseline": 1.05, "peak_harmonic_fused_over_baseline": 0.999}]},
        },
    }
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{bench_begin}\nold\n{bench_end}\nbottom\n")
    replace_block(readme, "bench", readme_markdown(result, tmp_path / "bench.json"))
    text = readme.read_text()
    assert "old" not in text and text.startswith("top\n") and text.endswith("bottom\n")
    assert "| 1 | 100000 | 0.19 | 8.14 | 9.46 | 0.80 |" in text and "(native backend)" in text
    assert "| shapes_cpu | 1.012 | 1.050 | 0.999 | n/a |" in text
    (tmp_path / "plain.md").write_text("no block")
    with pytest.raises(ValueError, match="bench:begin"):
        replace_block(tmp_path / "plain.md", "bench", "x")


def test_merge_replaces_only_the_sections_run_and_the_readme_says_when_each_was_measured(tmp_path, monkeypatch, keep_threads):
    from bench import readme_markdown

    out = tmp_path / "bench.json"
    old = {"provenance": {"device": {"device": "cpu"}}, "sections": {
        "dense_loss": {"machine": {"torch_threads": 1, "measured": "2026-01-01T00:00:00+00:00"}, "summary": [
            {"scale": 1.0, "anchors": 100000, "fused_backend": "native", "harmonic_fused_over_stock": 0.2,
             "harmonic_fused_over_sigmoid": 3.0, "harmonic_reference_over_stock": 0.8}]},
        "engine_step": {"machine": {"torch_threads": 1}, "summary": [{"stale": True}]}}}
    out.write_text(json.dumps(old))
    fresh = {"summary": [{"setting": "s", "target_speedup": 2.0, "autocast_dtype": "bfloat16", "channels_last": True,
                          "engine_over_plain_images_per_s": 2.5, "peak_engine_over_plain": 0.9, "fused_optimizer": True,
                          "fused_optimizer_gain": 1.125}]}
    monkeypatch.setitem(bench.SECTIONS, "engine_step", lambda config: json.loads(json.dumps(fresh)))
    assert bench.main(["--out", str(out), "--sections", "engine_step", "--quick", "--merge", "--threads", "1"]) == 0
    merged = json.loads(out.read_text())
    assert list(merged["sections"]) == ["dense_loss", "engine_step"]
    assert merged["sections"]["dense_loss"] == old["sections"]["dense_loss"]  # kept as it was
    assert merged["sections"]["engine_step"]["summary"] == fresh["summary"]
    assert merged["sections"]["engine_step"]["machine"]["measured"] == merged["provenance"]["created"]
    text = readme_markdown(merged, out)
    assert "measured in separate runs" in text and "dense_loss at 2026-01-01T00:00:00+00:00" in text
    assert "| s | bfloat16 | True | True | 2.50 | 1.12 | 0.900 |" in text
    # without --merge the file holds only the sections run
    assert bench.main(["--out", str(out), "--sections", "engine_step", "--quick", "--threads", "1"]) == 0
    assert list(json.loads(out.read_text())["sections"]) == ["engine_step"]
    out.write_text("not json")
    with pytest.raises(SystemExit, match="not a bench result"):
        bench.main(["--out", str(out), "--sections", "engine_step", "--quick", "--merge"])


def test_amp_modes_section_times_each_precision_and_layout_side_by_side(keep_threads):
    torch.set_num_threads(1)
    section = bench.amp_modes_section(bench.BenchConfig.for_run(device="cpu", quick=True))
    rows = {row["mode"]: row for row in section["rows"]}
    assert set(rows) == {"off", "off_channels_last", "bf16", "bf16_contiguous"}  # float16 autocast is for CUDA
    layouts = {mode: (row["autocast_dtype"], row["channels_last"]) for mode, row in rows.items()}
    assert layouts == {"off": ("float32", False), "off_channels_last": ("float32", True),
                       "bf16": ("bfloat16", True), "bf16_contiguous": ("bfloat16", False)}
    (summary,) = section["summary"]
    for mode in ("off_channels_last", "bf16", "bf16_contiguous"):
        assert summary[f"{mode}_over_float32"] == pytest.approx(rows[mode]["median_ms"] / rows["off"]["median_ms"], rel=1e-12)
    assert "off_over_float32" not in summary
    assert summary["native_bf16"] is bench_native_bf16()
    text = bench.readme_markdown({"provenance": {"device": {"device": "cpu"}}, "sections": {
        "amp_modes": {**section, "machine": {"torch_threads": 1}}}}, bench.Path("bench.json"))
    assert f"bf16 (channels_last) {summary['bf16_over_float32']:.2f}x" in text
    assert f"float32 in channels_last {summary['off_channels_last_over_float32']:.2f}x" in text


def bench_native_bf16() -> bool:
    from harmonic.utils.devices import native_bf16

    return native_bf16(torch.device("cpu"))


def test_breakdown_partitions_self_time_by_the_nearest_optimizer_step():
    from types import SimpleNamespace

    def event(name, ms, parent=None):
        return SimpleNamespace(name=name, self_cpu_time_total=ms * 1000.0, cpu_parent=parent)

    step = event("Optimizer.step#SGD.step", 1.0)
    inner = event("aten::add_", 4.0, step)
    events = [event("aten::mkldnn_convolution", 10.0), event("aten::convolution_backward", 5.0), step, inner,
              event("aten::copy_", 2.0, inner),  # a copy inside the optimizer is the optimizer's
              event("aten::_to_copy", 3.0), event("aten::sigmoid", 0.5)]
    parts = bench.breakdown_ms(events)
    assert parts == pytest.approx({"convolution": 15.0, "optimizer": 7.0, "copies": 3.0, "other": 0.5})
    assert list(parts) == list(bench.BREAKDOWN_PARTS)


def test_step_breakdown_section_profiles_both_steps_and_bounds_the_ratio(keep_threads):
    torch.set_num_threads(1)
    config = bench.BenchConfig.for_run(device="cpu", quick=True)
    section = bench.step_breakdown_section(config)
    rows = {row["variant"]: row for row in section["rows"]}
    assert set(rows) == {"plain", "engine"}
    for row in rows.values():
        assert row["total_ms"] == pytest.approx(sum(row[f"{part}_ms"] for part in bench.BREAKDOWN_PARTS))
        assert sum(row[f"{part}_share"] for part in bench.BREAKDOWN_PARTS) == pytest.approx(1.0)
        assert row["convolution_ms"] > 0 and row["optimizer_ms"] > 0  # a real step convolves and takes an SGD step
    (summary,) = section["summary"]
    plain, engine = rows["plain"]["total_ms"], rows["engine"]["total_ms"]
    assert summary["profiled_engine_over_plain_images_per_s"] == pytest.approx(plain / engine)
    assert summary["engine_over_plain_bound_without_convolutions"] == pytest.approx(
        plain / (engine - rows["engine"]["convolution_ms"]))
    assert summary["engine_over_plain_bound_without_convolutions"] > summary["profiled_engine_over_plain_images_per_s"]
    assert summary["convolution_plain_over_engine"] == pytest.approx(rows["plain"]["convolution_ms"] / rows["engine"]["convolution_ms"])
    assert summary["rest_plain_over_engine"] == pytest.approx(
        (plain - rows["plain"]["convolution_ms"]) / (engine - rows["engine"]["convolution_ms"]))
    text = bench.readme_markdown({"provenance": {"device": {"device": "cpu"}}, "sections": {
        "step_breakdown": {**section, "machine": {"torch_threads": 1}}}}, bench.Path("bench.json"))
    assert f"{summary['engine_over_plain_bound_without_convolutions']:.2f} |" in text and "| shapes_cpu |" in text
    assert bench.step_breakdown_section(bench.BenchConfig.for_run(device="meta", quick=True))["rows"] == []


def _write_log(path, records):
    import gzip

    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)


def test_levers_section_times_compiling_the_thread_layouts_and_reads_the_data_share(tmp_path, monkeypatch, keep_threads):
    # the data share of finished runs' logs: 10 ms of 100 ms, and 30 of 100 in another run (one record without times)
    _write_log(tmp_path / "results/runs/default-baseline-s0/log.jsonl.gz",
               [{"iter": k, "data_time": 0.01, "time": 0.1} for k in range(3)] + [{"iter": 9}])
    _write_log(tmp_path / "results/runs/default-baseline-s1/log.jsonl.gz",
               [{"iter": k, "data_time": 0.03, "time": 0.1} for k in range(2)])
    _write_log(tmp_path / "results/runs/long-baseline-s0/log.jsonl.gz", [{"data_time": 1.0, "time": 1.0}])  # another sweep
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "LEVER_COMPILE_BACKEND", "eager")  # torch.compile's tracing without code generation
    torch.set_num_threads(1)
    config = bench.BenchConfig.for_run(device="cpu", quick=True, compile=True)
    section = bench.levers_section(config)

    data = {row["run"]: row for row in section["data_loading"]}
    assert set(data) == {"default-baseline-s0", "default-baseline-s1"}
    assert data["default-baseline-s0"]["iterations"] == 3
    assert data["default-baseline-s0"]["data_share"] == pytest.approx(0.1)
    assert data["default-baseline-s1"]["median_data_ms"] == pytest.approx(30.0)
    (summary,) = section["summary"]
    assert summary["data_share"] == pytest.approx(0.2)

    eager, compiled = section["compile"]
    assert (eager["variant"], compiled["variant"], compiled["backend"]) == ("eager", "compiled", "eager")
    assert summary["compiled_over_eager_images_per_s"] == pytest.approx(eager["median_ms"] / compiled["median_ms"])
    assert compiled["first_step_s"] > 0

    from harmonic.experiments.notebooks import resolve_jobs, threads_per_job

    layouts = section["thread_layout"]
    cores, jobs = os.cpu_count() or 1, resolve_jobs("auto")  # make sweep's own layout
    assert [(row["runs"], row["threads_per_run"]) for row in layouts] == [(1, 1)] + (
        [(1, cores), (jobs, threads_per_job(jobs))] if jobs > 1 else [])
    batch = bench.train_step_settings(config)[0]["batch"]
    assert layouts[0]["images_per_s"] == pytest.approx(batch * 1000.0 / layouts[0]["median_ms_per_run"])
    if jobs > 1:
        side = layouts[2]
        assert (summary["sweep_runs"], summary["sweep_threads_per_run"]) == (jobs, threads_per_job(jobs))
        # each run's images per second, summed: near runs x one run's rate at their median step time
        assert side["images_per_s"] == pytest.approx(jobs * batch * 1000.0 / side["median_ms_per_run"], rel=0.5)
        assert summary["runs_side_by_side_over_one_thread"] == pytest.approx(side["images_per_s"] / layouts[0]["images_per_s"])
        assert summary["runs_side_by_side_over_one_run_all_threads"] == pytest.approx(
            side["images_per_s"] / layouts[1]["images_per_s"])

    text = bench.readme_markdown({"provenance": {"device": {"device": "cpu"}}, "sections": {
        "levers": {**section, "machine": {"torch_threads": 1}}}}, bench.Path("bench_avx2.json"), "python tools/bench.py x")
    assert text.startswith("Measured by `python tools/bench.py x` (bench_avx2.json)")
    assert f"gives {summary['compiled_over_eager_images_per_s']:.2f}x the eager step's" in text
    assert "waited for their batch 20.0% of an iteration" in text


def test_a_thread_layout_worker_that_fails_is_an_error(keep_threads):
    config = bench.BenchConfig.for_run(device="cpu", quick=True)
    with pytest.raises(RuntimeError, match="thread-layout worker .* failed before timing"):
        bench._time_layout("no_such_setting", 1, 1, config)


@pytest.mark.parametrize("worker, message", [
    ("import time; time.sleep(60)", "did not get ready in time"),
    ("import sys; print('ready', flush=True); sys.stdin.readline(); sys.exit(3)", "exited with status 3 while timing"),
    ("import sys, time; print('ready', flush=True); sys.stdin.readline(); time.sleep(60)", "did not finish its timed steps"),
])
def test_a_thread_layout_worker_that_hangs_or_dies_is_an_error_and_is_stopped(worker, message, monkeypatch):
    import subprocess

    started = []
    popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    monkeypatch.setattr(bench, "LAYOUT_WORKER", worker)
    monkeypatch.setattr(bench, "LAYOUT_TIMEOUT_S", 3.0)
    config = bench.BenchConfig.for_run(device="cpu", quick=True)
    with pytest.raises(RuntimeError, match=message):
        bench._time_layout("shapes_cpu", 2, 1, config)
    assert len(started) == 2 and all(worker.poll() is not None for worker in started)  # none left running


def test_the_speed_up_the_rest_of_the_step_needs_reaches_the_target_exactly():
    row = {"setting": "s", "engine_convolution_share": 0.6, "profiled_engine_over_plain_images_per_s": 1.5}
    needed = bench.rest_speedup_needed(row, 2.0)
    assert needed == pytest.approx(0.4 / 0.15)
    faster_step = 0.6 + 0.4 / needed  # the engine's step, in its own units, with the rest that much faster
    assert 1.5 / faster_step == pytest.approx(2.0)
    assert bench.rest_speedup_needed({**row, "engine_convolution_share": 0.8}, 2.0) is None  # 0.8 > 1.5 / 2
    assert bench.rest_speedup_needed({**row, "profiled_engine_over_plain_images_per_s": 2.5}, 2.0) < 1  # already met
    summary = {**row, "engine_optimizer_share": 0.1, "engine_copies_share": 0.1, "engine_other_share": 0.2,
               "plain_convolution_share": 0.8, "convolution_plain_over_engine": 2.0, "rest_plain_over_engine": 1.0,
               "engine_over_plain_bound_without_convolutions": 3.75}
    text = bench.readme_markdown({"provenance": {"device": {"device": "cpu"}}, "sections": {"step_breakdown": {
        "summary": [summary, {**summary, "setting": "t", "engine_convolution_share": 0.8}],
        "machine": {"torch_threads": 1}}}}, bench.Path("bench.json"))
    assert "| 3.75 | 2.67 |" in text and "| t |" in text and "out of reach" in text
