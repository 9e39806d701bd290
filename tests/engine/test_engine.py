"""harmonic.engine: configuration, schedule, deterministic data order, resumable training, NaN guard,
checkpoints, evaluation and the train / evaluate command lines (tiny RetinaNet on shapes-tiny)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from harmonic import engine
from harmonic.cli import main
from harmonic.engine import (
    EpochBatchSampler,
    NonFiniteLossError,
    SeededSamples,
    TrainConfig,
    load_checkpoint,
    lr_at,
    read_log,
    train,
)
from harmonic.utils.files import read_json

ITERS = 4


def tiny_config(output_dir, **overrides) -> TrainConfig:
    """4 iterations of a 32-channel RetinaNet R18-FPN on 64 px images, checkpoints at 2 and 4."""
    settings = dict(output_dir=str(output_dir), max_iters=ITERS, checkpoint_every=2, deterministic=True, num_threads=1)
    settings.update(overrides)
    return TrainConfig.preset("shapes-tiny", **settings)


@pytest.fixture(scope="module")
def straight_run(data_root, tmp_path_factory):
    """A run trained through the command line, uninterrupted, then evaluated on shapes-tiny's val split."""
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    argv = ["train", "--preset", "shapes-tiny", "--output-dir", str(run_dir), "--max-iters", str(ITERS),
            "--checkpoint-every", "2", "--keep-checkpoints", "--deterministic", "--num-threads", "1", "--no-progress"]
    assert main(argv) == 0
    return run_dir


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
def test_config_json_round_trip(tmp_path):
    cfg = TrainConfig.preset("shapes-cpu", detector={"loss": "harmonic", "hiou_gamma": 0.6}, seed=3, grad_clip=None)
    assert cfg.detector["loss"] == "harmonic" and cfg.detector["backbone"] == "resnet18_fpn"  # merged, not replaced
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    path = cfg.save_json(tmp_path / "cfg.json")
    assert TrainConfig.load_json(path) == cfg
    assert TrainConfig.preset("shapes-cpu", epochs=2).max_iters is None  # epochs replaces max_iters


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"unknown TrainConfig key\(s\) \['bogus'\]"):
        TrainConfig.from_dict({**TrainConfig.preset("shapes-tiny").to_dict(), "bogus": 1})
    (tmp_path / "bad.json").write_text(json.dumps({"max_iters": 5, "lr_step": [3]}))
    with pytest.raises(ValueError, match=r"bad\.json: unknown TrainConfig key\(s\) \['lr_step'\]"):
        TrainConfig.load_json(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json: malformed JSON at line 1"):
        TrainConfig.load_json(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="TrainConfig.batch_size must be an integer >= 1"):
        TrainConfig(max_iters=5, batch_size=0)
    with pytest.raises(ValueError, match="exactly one of epochs or max_iters"):
        TrainConfig(max_iters=5, epochs=2)
    with pytest.raises(ValueError, match="TrainConfig.lr_steps"):
        TrainConfig(max_iters=5, lr_steps=[4, 2])
    with pytest.raises(ValueError, match="TrainConfig.amp"):
        TrainConfig(max_iters=5, amp="fp8")
    with pytest.raises(ValueError, match=r"TrainConfig.detector: unknown key\(s\) \['fpn_width'\]"):
        TrainConfig(max_iters=5, detector={"arch": "retinanet", "fpn_width": 8})
    with pytest.raises(ValueError, match="TrainConfig.detector: DetectorConfig.loss"):
        TrainConfig(max_iters=5, detector={"arch": "retinanet", "loss": "harmonc"})
    with pytest.raises(ValueError, match="unknown training preset 'nope'"):
        TrainConfig.preset("nope")


def test_lr_warmup_and_steps():
    cfg = TrainConfig(max_iters=10, lr=0.1, warmup_iters=4, warmup_factor=0.2, lr_steps=[6, 8], lr_gamma=0.5)
    expected = {1: 0.02, 2: 0.04, 3: 0.06, 4: 0.08, 5: 0.1, 6: 0.1, 7: 0.05, 8: 0.05, 9: 0.025, 10: 0.025}
    for iteration, lr in expected.items():
        assert lr_at(cfg, iteration) == pytest.approx(lr, rel=1e-12), iteration
    assert lr_at(cfg.replace(warmup_iters=0), 1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="iteration must be an integer >= 1"):
        lr_at(cfg, 0)


# ------------------------------------------------------------------------------------------------
# data order
# ------------------------------------------------------------------------------------------------
def test_sampler_is_a_function_of_seed_and_epoch():
    def batches(**kw):
        return [[i for i, _ in b] for b in EpochBatchSampler(23, 3, seed=kw.pop("seed", 0), epoch=kw.pop("epoch", 0), **kw)]

    full = batches()
    assert len(full) == 7 and len({i for b in full for i in b}) == 21  # drop the last partial batch, no repeats
    assert batches() == full
    assert batches(epoch=1) != full and batches(seed=1) != full
    assert batches(start=4) == full[4:]  # a resumed epoch skips exactly the batches already used
    assert batches(start=2, num_batches=3) == full[2:5]
    ranks = [batches(world_size=2, rank=r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 23 // (3 * 2)
    assert ranks[0][1] + ranks[1][1] == EpochBatchSampler(23, 6, seed=0, epoch=0).permutation().tolist()[6:12]
    seeds = [s for b in EpochBatchSampler(23, 3, seed=0, epoch=0) for _, s in b]
    assert len(set(seeds)) == len(seeds)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatchSampler(5, 3, seed=0, epoch=0, world_size=2)


def test_seeded_samples_fix_the_augmentation_and_keep_the_global_rng():
    class Random(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.rand(3)

    data = SeededSamples(Random())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first, second, other = data[(1, 123)], data[(1, 123)], data[(1, 124)]
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------------------------------------
# training runs
# ------------------------------------------------------------------------------------------------
def test_run_folder_content(straight_run):
    records = read_log(straight_run)
    assert [r["iter"] for r in records] == list(range(1, ITERS + 1))
    cfg = TrainConfig.load_json(straight_run / "config.json")
    for record in records:
        for key in ("epoch", "lr", "loss", "loss/classification", "loss/bbox_regression", "grad_norm", "time", "data_time"):
            assert key in record and math.isfinite(record[key]), key
        assert record["lr"] == pytest.approx(lr_at(cfg, record["iter"]))
        assert record["loss"] == pytest.approx(record["loss/classification"] + record["loss/bbox_regression"], rel=1e-5)
        assert record["epoch"] == (record["iter"] - 1) // 12  # 24 images, batch 2
    saved = json.loads((straight_run / "config.json").read_text())
    assert saved["resolved"]["total_iters"] == ITERS and saved["resolved"]["num_classes"] == 5
    assert saved["provenance"]["seed"] == 0 and "versions" in saved["provenance"]
    names = sorted(p.name for p in (straight_run / "checkpoints").iterdir())
    assert names == ["final.pt", "iter_0000002.pt", "iter_0000004.pt", "last.pt"]  # no temporary files left


def test_log_records_the_watch_statistics_and_the_samples(straight_run):
    """The baseline run logs the Harmonic loss's x and y as counterfactuals every iteration with positives,
    and writes the positives' (x, y, score) at iterations ceil(k * 4 / 3) = 2, 3, 4."""
    from harmonic.engine import read_samples
    from harmonic.losses import WATCH_KEYS

    watched = [r for r in read_log(straight_run) if "watch/reversed_share" in r]
    assert watched
    for record in watched:
        assert set(WATCH_KEYS) <= set(record) and record["watch/counterfactual"] == 1.0
        assert "beta_r" not in record  # no harmonic factors in a baseline run
        assert 0.0 <= record["watch/reversed_share"] <= record["watch/y_over_threshold_share"] <= 1.0
        assert record["watch/x_p10"] <= record["watch/x_p50"] <= record["watch/x_p90"]
    samples = read_samples(straight_run)
    assert samples["definition"] == "focal" and [s["iter"] for s in samples["snapshots"]] == [2, 3, 4]
    for snap in samples["snapshots"]:
        assert 0 < len(snap["y"]) == len(snap["score"]) == len(snap["x"]) <= min(512, snap["num_positives"])


def test_checkpoint_loads_with_weights_only(straight_run):
    raw = torch.load(straight_run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert raw["format"] == engine.CHECKPOINT_FORMAT and raw["iteration"] == ITERS and raw["world_size"] == 1
    assert set(raw) >= {"model", "optimizer", "scaler", "rng", "config", "detector", "label_to_cat_id"}
    assert raw["rng"]["torch"][0].dtype == torch.uint8
    assert TrainConfig.from_dict(raw["config"]).max_iters == ITERS
    final = load_checkpoint(straight_run)  # a run folder means its final.pt
    assert final["kind"] == "final" and "optimizer" not in final
    assert state_dicts_equal(final["model"], raw["model"])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        (straight_run / "junk.pt").write_bytes(b"not a checkpoint")
        load_checkpoint(straight_run / "junk.pt")


def test_resume_equals_uninterrupted(straight_run, tmp_path):
    cfg = tiny_config(tmp_path / "run")

    def crash_at_3(state):
        if state.iteration == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, on_iteration=crash_at_3)
    assert [r["iter"] for r in read_log(tmp_path / "run")] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"] == 2

    with pytest.raises(FileExistsError, match="already holds a training run"):
        train(cfg, progress=False)
    with pytest.raises(ValueError, match=r"differs in \['lr'\]"):
        train(cfg.replace(resume=True, lr=0.5), progress=False)

    train(cfg.replace(resume=True), progress=False)
    resumed, straight = read_log(tmp_path / "run"), read_log(straight_run)
    assert [r["iter"] for r in resumed] == list(range(1, ITERS + 1))  # iteration 3 logged once
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")
    assert state_dicts_equal(final["model"], load_checkpoint(straight_run)["model"])
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    reference = load_checkpoint(straight_run / "checkpoints" / "last.pt")
    momentum = [s["momentum_buffer"] for s in last["optimizer"]["state"].values()]
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, reference["optimizer"]["state"].values()))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(straight_run, tmp_path, monkeypatch):
    import harmonic.engine.training

    real_build = harmonic.engine.training.build_detector

    def build_with_nan(cfg):
        model = real_build(cfg)
        original, calls = model.forward, [0]

        def forward(images, targets=None):
            out = original(images, targets)
            if model.training:
                calls[0] += 1
                if calls[0] == 3:
                    out = {**out, "bbox_regression": out["bbox_regression"] * float("nan")}
            return out

        model.forward = forward
        return model

    monkeypatch.setattr(harmonic.engine.training, "build_detector", build_with_nan)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at iteration 3: .*bbox_regression=nan") as info:
        train(tiny_config(tmp_path / "run"), progress=False)
    assert info.value.iteration == 3 and "bbox_regression" in info.value.terms
    assert [r["iter"] for r in read_log(tmp_path / "run")] == [1, 2]
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["iteration"] == 2
    reference = load_checkpoint(straight_run / "checkpoints" / "iter_0000002.pt")
    assert state_dicts_equal(last["model"], reference["model"])
    assert not (tmp_path / "run" / "checkpoints" / "final.pt").exists()


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def test_evaluate_writes_metrics_detections_and_figure(straight_run):
    from harmonic.evaluation import STAT_NAMES

    metrics = json.loads((straight_run / "metrics.json").read_text())  # written by the train command
    assert set(STAT_NAMES) <= set(metrics["coco"])
    assert all(v is None or 0 <= v <= 1 for v in (metrics["coco"][k] for k in STAT_NAMES))
    assert metrics["coco"]["AP"] is not None
    assert isinstance(metrics["consistency"], dict) and metrics["consistency"]
    assert metrics["provenance"]["parameters"]["iteration"] == ITERS
    assert metrics["provenance"]["parameters"]["split"] == "val"
    assert {"git", "versions", "device"} <= set(metrics["provenance"])
    detections = read_json(straight_run / "detections.json.gz")
    assert isinstance(detections, list)
    for det in detections[:20]:
        assert set(det) >= {"image_id", "category_id", "bbox", "score"} and 1 <= det["category_id"] <= 5
    assert (straight_run / "figures" / "score_vs_iou.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_command(straight_run, tmp_path):
    out = tmp_path / "eval"
    argv = ["evaluate", "--checkpoint", str(straight_run / "checkpoints" / "final.pt"), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    again = json.loads((out / "metrics.json").read_text())
    first = json.loads((straight_run / "metrics.json").read_text())
    assert again["coco"] == first["coco"]  # the same checkpoint and data give the same numbers
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)]) == 1


def test_evaluate_refuses_other_categories(straight_run, tmp_path):
    from harmonic.data import ensure_default_dataset

    image_dir, ann_file = ensure_default_dataset("shapes-tiny")["val"]
    data = json.loads(ann_file.read_text())
    for cat in data["categories"]:
        cat["id"] += 10
    for ann in data["annotations"]:
        ann["category_id"] += 10
    (tmp_path / "val.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not those the checkpoint"):
        engine.evaluate(straight_run, str(tmp_path / "val.json"), image_dir=image_dir, progress=False)


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def test_train_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--train-ann", "--val-images", "--lr-steps", "--max-iters", "--loss", "--hiou-gamma",
                   "--resume", "--config", "torchrun", "examples:"):
        assert needle in text, needle


def test_train_bad_flags_give_clear_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--lr", "fast"])
    assert info.value.code == 2 and "argument --lr: invalid float value: 'fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", "--batch-size", "0", "--print-config"])
    assert info.value.code == 2 and "TrainConfig.batch_size must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", "--loss", "harmonc"])
    assert info.value.code == 2 and "invalid choice: 'harmonc'" in capsys.readouterr().err


def test_print_config_and_config_file_with_overrides(tmp_path, capsys):
    assert main(["train", "--preset", "shapes-cpu", "--loss", "harmonic", "--lr-steps", "100,200",
                 "--grad-clip", "none", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = TrainConfig.preset("shapes-cpu", detector={"loss": "harmonic"}, lr_steps=[100, 200], grad_clip=None)
    assert TrainConfig.from_dict(printed) == expected
    (tmp_path / "cfg.json").write_text(json.dumps(printed))
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--seed", "7", "--epochs", "2", "--print-config"]) == 0
    again = TrainConfig.from_dict(json.loads(capsys.readouterr().out))
    assert again == expected.replace(seed=7, epochs=2) and again.max_iters is None


def test_two_stage_sampling_flags_reach_the_detector_config(capsys):
    assert main(["train", "--preset", "shapes-study", "--arch", "faster_rcnn", "--box-batch-size-per-image", "128",
                 "--rpn-post-nms-top-n-train", "500", "--anchor-sizes", "[[8],[16],[32],[64],[128]]", "--print-config"]) == 0
    detector = json.loads(capsys.readouterr().out)["detector"]
    assert (detector["box_batch_size_per_image"], detector["rpn_post_nms_top_n_train"]) == (128, 500)
    assert detector.get("rpn_pre_nms_top_n_train") is None  # torchvision's
    with pytest.raises(SystemExit) as info:  # RetinaNet has no RoI sampling
        main(["train", "--preset", "shapes-study", "--box-batch-size-per-image", "128", "--print-config"])
    assert info.value.code == 2 and "box_batch_size_per_image applies to arch in" in capsys.readouterr().err


def test_head_norm_flag_takes_the_values_its_help_names(capsys):
    for text, value in (("gn", "gn"), ("none", None)):
        assert main(["train", "--preset", "shapes-study", "--head-norm", text, "--print-config"]) == 0
        assert json.loads(capsys.readouterr().out)["detector"].get("head_norm") == value
    with pytest.raises(SystemExit) as info:
        main(["train", "--preset", "shapes-study", "--head-norm", "bn", "--print-config"])
    assert info.value.code == 2 and "head_norm" in capsys.readouterr().err


def test_precision_resolution(monkeypatch):
    from harmonic.engine import precision as prec

    cpu = torch.device("cpu")
    monkeypatch.setattr(prec, "native_bf16", lambda device: True)
    auto = prec.resolve_precision("auto", None, cpu)
    assert (auto.dtype, auto.scaler, auto.channels_last) == (torch.bfloat16, False, True)
    assert prec.resolve_precision("auto", False, cpu).channels_last is False
    assert prec.resolve_precision("on", None, cpu).dtype == torch.bfloat16
    monkeypatch.setattr(prec, "native_bf16", lambda device: False)
    plain = prec.resolve_precision("auto", None, cpu)
    assert (plain.dtype, plain.scaler, plain.channels_last) == (None, False, False)
    assert prec.resolve_precision("bf16", None, cpu).dtype == torch.bfloat16  # asked for: emulated, but given
    with pytest.raises(ValueError, match="'on' but cpu has no native bfloat16"):
        prec.resolve_precision("on", None, cpu)
    with pytest.raises(ValueError, match="float16 autocast is for CUDA"):
        prec.resolve_precision("fp16", None, cpu)
    assert prec.resolve_precision("off", True, cpu).describe() == {
        "autocast_dtype": "float32", "grad_scaler": False, "channels_last": True}
    with pytest.raises(ValueError, match="channels_last"):
        TrainConfig.preset("shapes-tiny", channels_last="yes")


def test_bf16_run_records_its_precision_and_stays_close_to_float32(tmp_path, data_root):
    fp32 = train(tiny_config(tmp_path / "fp32", amp="off", max_iters=2), progress=False)
    bf16 = train(tiny_config(tmp_path / "bf16", amp="bf16", channels_last=True, max_iters=2), progress=False)
    resolved = json.loads((bf16 / "config.json").read_text())["resolved"]
    assert resolved["autocast_dtype"] == "bfloat16" and resolved["channels_last"] is True
    assert json.loads((fp32 / "config.json").read_text())["resolved"]["autocast_dtype"] == "float32"
    first_fp32, first_bf16 = read_log(fp32)[0], read_log(bf16)[0]
    # same weights and batch: the first loss differs only by the network's bfloat16 rounding
    assert first_bf16["loss"] == pytest.approx(first_fp32["loss"], rel=0.05)
    assert first_bf16["loss"] != first_fp32["loss"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_run(tmp_path, data_root):
    run_dir = train(tiny_config(tmp_path / "run", device="cuda", amp="auto", deterministic=False), progress=False)
    records = read_log(run_dir)
    assert [r["iter"] for r in records] == list(range(1, ITERS + 1))
    assert all(math.isfinite(r["loss"]) and r["amp_scale"] > 0 for r in records)
    assert load_checkpoint(run_dir)["model"]["head.classification_head.cls_logits.weight"].device.type == "cpu"



def test_compile_network_keeps_the_weights_and_the_outputs():
    from harmonic.engine.precision import compile_network
    from harmonic.models import DetectorConfig, build_detector

    cfg = DetectorConfig(arch="retinanet", backbone="resnet18_fpn", num_classes=3, fpn_channels=16,
                         min_size=64, max_size=64, anchor_sizes="auto")
    torch.manual_seed(0)
    eager = build_detector(cfg).eval()
    compiled = build_detector(cfg).eval()
    compiled.load_state_dict(eager.state_dict())
    compile_network(compiled, backend="eager")  # the eager backend: the wiring, without inductor's minutes
    assert list(compiled.state_dict()) == list(eager.state_dict())
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        a, b = eager(images)[0], compiled(images)[0]
    torch.testing.assert_close(a["scores"], b["scores"])
    with pytest.raises(ValueError, match="compile"):
        TrainConfig.preset("shapes-tiny", compile="yes")


def test_fused_sgd_trains_as_the_loop_and_a_resume_takes_the_configured_kernel(straight_run, tmp_path):
    from harmonic.engine.training import build_optimizer

    # the default on the CPU is SGD's loop (the fused kernel measured no faster there); the fused kernel
    # gives the same iterations
    assert read_json(straight_run / "config.json")["resolved"]["fused_optimizer"] is False
    fused = train(tiny_config(tmp_path / "fused", max_iters=2, fused_optimizer=True), progress=False)
    assert read_json(fused / "config.json")["resolved"]["fused_optimizer"] is True
    assert load_checkpoint(fused / "checkpoints" / "last.pt")["optimizer"]["param_groups"][0]["fused"] is True
    losses = [r["loss"] for r in read_log(fused)]
    torch.testing.assert_close(losses, [r["loss"] for r in read_log(straight_run)][:2], rtol=1e-5, atol=0)
    straight_at_2 = load_checkpoint(straight_run / "checkpoints" / "iter_0000002.pt")
    torch.testing.assert_close(load_checkpoint(fused / "checkpoints" / "last.pt")["model"], straight_at_2["model"],
                               rtol=1e-5, atol=1e-7)
    # resumed with the default, the run goes on with the loop, whatever the checkpoint's groups say
    train(tiny_config(tmp_path / "fused", resume=True), progress=False)
    groups = load_checkpoint(fused / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    assert all(not group["fused"] for group in groups)
    assert [r["iter"] for r in read_log(fused)] == list(range(1, ITERS + 1))

    params = [torch.nn.Parameter(torch.zeros(3))]
    assert not build_optimizer(params, tiny_config(tmp_path / "x"), "cpu").defaults["fused"]
    assert build_optimizer(params, tiny_config(tmp_path / "x", fused_optimizer=True), "cpu").defaults["fused"] is True
    with pytest.raises(ValueError, match="TrainConfig.fused_optimizer"):
        tiny_config(tmp_path / "x", fused_optimizer="yes")


def test_fused_sgd_asked_for_where_torch_lacks_it_or_with_a_gradient_scaler_is_an_error(tmp_path, monkeypatch):
    from harmonic.engine import training

    assert training.fused_sgd_available("cpu") and not training.fused_sgd_available("meta")  # meta: no kernel
    params = [torch.nn.Parameter(torch.zeros(3))]
    # float16's scaler can skip a first step, which would leave the fused kernel's momentum uninitialized
    with pytest.raises(ValueError, match="fused_optimizer is True but the run uses float16 with a gradient scaler"):
        training.build_optimizer(params, tiny_config(tmp_path / "x", fused_optimizer=True), "cpu", grad_scaler=True)
    assert not training.build_optimizer(params, tiny_config(tmp_path / "x"), "cpu", grad_scaler=True).defaults["fused"]
    monkeypatch.setattr(training, "fused_sgd_available", lambda device: False)
    assert not training.build_optimizer(params, tiny_config(tmp_path / "x"), "cpu").defaults["fused"]
    assert not training.build_optimizer(params, tiny_config(tmp_path / "x", fused_optimizer=False), "cpu").defaults["fused"]
    with pytest.raises(ValueError, match="fused_optimizer is True but torch has no fused SGD for cpu"):
        training.build_optimizer(params, tiny_config(tmp_path / "x", fused_optimizer=True), "cpu")


def test_resume_keeps_the_precision_a_run_was_trained_with(tmp_path, data_root, monkeypatch):
    from harmonic.engine import precision as prec

    # amp="auto" resolves by the machine: here first to float32, then (another machine) to bfloat16
    monkeypatch.setattr(prec, "native_bf16", lambda device: False)
    run = train(tiny_config(tmp_path / "run", max_iters=2), progress=False)
    before = (run / "config.json").read_text()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["precision"]["autocast_dtype"] == "float32"
    monkeypatch.setattr(prec, "native_bf16", lambda device: True)
    # a finished run is only reopened (evaluation): its config.json still says how it was trained
    train(tiny_config(tmp_path / "run", max_iters=2, resume=True), progress=False)
    assert (run / "config.json").read_text() == before
    # continuing it in another precision would mix two trainings in one run
    with pytest.raises(ValueError, match="trained with .*float32.* resolves to .*bfloat16"):
        train(tiny_config(tmp_path / "run", max_iters=4, resume=True), progress=False)
    monkeypatch.setattr(prec, "native_bf16", lambda device: False)
    train(tiny_config(tmp_path / "run", max_iters=4, resume=True), progress=False)
    assert [r["iter"] for r in read_log(run)] == [1, 2, 3, 4]


def test_a_finished_run_keeps_its_log_compressed_and_can_continue(tmp_path, data_root):
    from harmonic.utils.runlog import find_log

    run = train(tiny_config(tmp_path / "run", max_iters=2), progress=False)
    assert find_log(run).name == "log.jsonl.gz" and not (run / "log.jsonl").exists()
    records = read_log(run)
    assert [r["iter"] for r in records] == [1, 2]
    packed = (run / "log.jsonl.gz").read_bytes()
    train(tiny_config(tmp_path / "run", max_iters=2, resume=True), progress=False)  # reopened: untouched
    assert (run / "log.jsonl.gz").read_bytes() == packed and not (run / "log.jsonl").exists()
    train(tiny_config(tmp_path / "run", max_iters=3, resume=True), progress=False)  # continued: appended
    assert [r["iter"] for r in read_log(run)] == [1, 2, 3] and find_log(run).name == "log.jsonl.gz"
    assert read_log(run)[:2] == records


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_default_sgd_on_cuda_is_the_fused_kernel(tmp_path):
    from harmonic.engine.training import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(3, device="cuda"))]
    assert build_optimizer(params, tiny_config(tmp_path / "x"), "cuda").defaults["fused"] is True
    assert not build_optimizer(params, tiny_config(tmp_path / "x", fused_optimizer=False), "cuda").defaults["fused"]
    # float16 with its gradient scaler: torch's default implementation
    assert not build_optimizer(params, tiny_config(tmp_path / "x"), "cuda", grad_scaler=True).defaults["fused"]


@pytest.mark.parametrize("max_norm", [None, 1e3, 0.5])
def test_clip_gradients_gives_clip_grad_norm_s_numbers(max_norm, monkeypatch):
    from harmonic.engine.training import clip_gradients

    torch.manual_seed(0)
    shapes = [(4, 3), (7,), (2, 2, 3)]
    grads = [torch.randn(shape) for shape in shapes]
    ours = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    theirs = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    for p, q, g in zip(ours, theirs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    ours.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient: left out, as clip_grad_norm_ does
    clipped = max_norm == 0.5
    scale = torch.nn.utils.clip_grads_with_norm_
    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", lambda *a, **k: calls.append(1) or scale(*a, **k))
    norm = clip_gradients(ours, max_norm)
    assert len(calls) == clipped  # the gradients are scaled only where the norm exceeds the limit
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", scale)
    expected = float(torch.nn.utils.clip_grad_norm_(theirs, float("inf") if max_norm is None else max_norm))
    assert norm == expected
    assert norm == pytest.approx(float(torch.cat([g.flatten() for g in grads]).norm()), rel=1e-6)
    for p, q in zip(ours, theirs):
        assert torch.equal(p.grad, q.grad)
    if clipped:
        assert float(torch.cat([p.grad.flatten() for p in ours[:3]]).norm()) == pytest.approx(0.5, rel=1e-5)
    assert clip_gradients([torch.nn.Parameter(torch.zeros(2))], 1.0) == 0.0


def test_clip_gradients_at_the_limit_rounds_as_clip_grad_norm_does():
    # a norm just below max_norm in float64 whose float32 coefficient rounds below 1: clip_grad_norm_
    # scales by 0.99999994, and so must clip_gradients
    from harmonic.engine.training import clip_gradients

    ours, theirs = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    ours.grad, theirs.grad = torch.tensor([26.088497]), torch.tensor([26.088497])
    assert clip_gradients([ours], 26.0885) == float(torch.nn.utils.clip_grad_norm_([theirs], 26.0885))
    assert torch.equal(ours.grad, theirs.grad) and theirs.grad[0] < 26.088497


@pytest.mark.skipif(not hasattr(torch.nn.utils, "get_total_norm"), reason="torch < 2.6 clips with clip_grad_norm_")
def test_clip_gradients_reports_a_non_finite_norm_and_leaves_the_gradients():
    from harmonic.engine.training import clip_gradients

    bad = torch.nn.Parameter(torch.zeros(2))
    bad.grad = torch.tensor([1.0, float("nan")])
    assert math.isnan(clip_gradients([bad], 1.0))  # for train_step's check
    assert bad.grad[0] == 1.0
