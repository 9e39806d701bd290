"""The COCO profile's plumbing, on a small generated folder in COCO 2017 layout (no GPU, no COCO)."""

import json
import shutil

import pytest

from harmonic.data.shapes import generate_dataset
from harmonic.experiments import notebooks as reproduce
from harmonic.experiments import run as experiment
from harmonic.utils.runlog import read_log


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    """shapes-tiny rearranged as annotations/instances_{train,val}2017.json + train2017/ + val2017/."""
    generated = generate_dataset(tmp_path_factory.mktemp("gen") / "shapes", "shapes-tiny", seed=0)
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    for split in ("train", "val"):
        image_dir, ann_file = generated[split]
        shutil.copytree(image_dir, root / f"{split}2017")
        shutil.copy(ann_file, root / "annotations" / f"instances_{split}2017.json")
    return root


def test_profile_lists_training_runs_with_all_gpus():
    entries = reproduce.PROFILES["coco"]["03_train_eval"]
    assert {params["variant"] for _, params in entries} == {"baseline", "harmonic_hiou"}
    assert all(params["preset"] == "coco-1x" and params["nproc_per_node"] == "auto" for _, params in entries)


def test_dry_run_checks_layout_and_trains_a_few_iterations(coco_root, tmp_path):
    out = experiment.run_experiment(dict(
        run_name="coco-plumbing", preset="shapes-tiny", coco_root=coco_root, dry_run=True, dry_run_iters=2,
        device="cpu", results_dir=tmp_path, progress=False,
    ))
    run_dir = out["run_dir"]
    assert run_dir.name == "coco-plumbing-dryrun" and out["metrics"] == {}
    log = read_log(run_dir)
    assert [r["iter"] for r in log] == [1, 2]
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["dataset"].endswith("instances_train2017.json") and config["image_dir"].endswith("train2017")
    assert not (run_dir / "metrics.json").exists()


def test_missing_coco_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        experiment.run_experiment(dict(run_name="x", preset="shapes-tiny", coco_root=tmp_path, results_dir=tmp_path))


def test_coco_preset_spreads_sixteen_images_over_the_processes(tmp_path, monkeypatch):
    seen = {}

    def fake_launch(cfg, nproc, args):
        seen.update(batch=cfg.batch_size, nproc=nproc, args=args)
        raise RuntimeError("stop after launch")

    monkeypatch.setattr(experiment, "launch_torchrun", fake_launch)
    with pytest.raises(RuntimeError, match="stop after launch"):
        experiment.run_experiment(dict(run_name="c", preset="coco-1x", nproc_per_node=4, results_dir=tmp_path,
                                  detector_overrides={"pretrained_backbone": None, "norm": "bn",
                                                      "trainable_backbone_layers": None}))
    assert seen == {"batch": 4, "nproc": 4, "args": []}
    with pytest.raises(ValueError, match="does not split"):
        experiment.run_experiment(dict(run_name="c", preset="coco-1x", nproc_per_node=3, results_dir=tmp_path))
    assert experiment._nnodes(["--nnodes", "2"]) == 2 and experiment._nnodes(["--nnodes=1:4"]) == 4
    cmd = experiment.torchrun_command("cfg.json", 2, ["--nnodes", "2"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert cmd[-5:] == ["-m", "harmonic", "train", "--config", "cfg.json"]


@pytest.mark.slow
def test_torchrun_launch_trains_with_two_processes(coco_root, tmp_path):
    out = experiment.run_experiment(dict(
        run_name="coco-ddp", preset="shapes-tiny", coco_root=coco_root, dry_run=True, dry_run_iters=2,
        nproc_per_node=2, device="cpu", results_dir=tmp_path, progress=False,
        train_overrides={"num_threads": 1},
    ))
    log = read_log(out["run_dir"])
    assert [r["iter"] for r in log] == [1, 2]
    assert (out["run_dir"] / "checkpoints" / "final.pt").is_file()
    resolved = json.loads((out["run_dir"] / "config.json").read_text())["resolved"]
    assert resolved["world_size"] == 2
