"""The VOC profile's plumbing, on a tiny generated VOCdevkit folder (no GPU, no VOC download)."""

import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from harmonic.cli import main as cli_main
from harmonic.data import CocoDetection
from harmonic.data.voc import VOC_CLASSES, prepare_voc0712
from harmonic.engine.config import TrainConfig
from harmonic.experiments import notebooks as reproduce
from harmonic.experiments import run as experiment
from harmonic.experiments.sweeps import SWEEPS
from harmonic.utils.runlog import read_log

ROOT = Path(__file__).resolve().parents[2]

# (year, image id, split, [(class, VOC box 1-based inclusive, difficult)])
IMAGES = [
    ("VOC2007", "000005", "trainval", [("dog", (5, 6, 30, 40), 0), ("cat", (35, 10, 60, 44), 1)]),
    ("VOC2007", "000007", "trainval", [("car", (2, 2, 50, 30), 0)]),
    ("VOC2007", "000001", "test", [("dog", (10, 8, 40, 40), 0)]),
    ("VOC2007", "000002", "test", [("person", (20, 1, 44, 48), 0)]),
    ("VOC2012", "2008_000003", "trainval", [("person", (12, 3, 40, 46), 0), ("dog", (40, 20, 62, 44), 0)]),
    ("VOC2012", "2008_000008", "trainval", [("horse", (3, 9, 60, 45), 0)]),
]


def _xml(filename, objects):
    objs = "".join(
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{box[0]}</xmin>"
        f"<ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
        for name, box, difficult in objects
    )
    return (f"<annotation><filename>{filename}</filename><size><width>64</width><height>48</height>"
            f"<depth>3</depth></size>{objs}</annotation>")


@pytest.fixture(scope="module")
def vocdevkit(tmp_path_factory):
    """VOCdevkit/VOC2007 (trainval + test) and VOCdevkit/VOC2012 (trainval), 64x48 images; one XML names a
    .png where the shipped image is a .jpg, as messy exports do."""
    root = tmp_path_factory.mktemp("voc") / "VOCdevkit"
    sets: dict[tuple[str, str], list[str]] = {}
    for year, image_id, split, objects in IMAGES:
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (root / year / sub).mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (64, 48), (30, 60, 90))
        draw = ImageDraw.Draw(image)
        for k, (_, box, _) in enumerate(objects):
            draw.rectangle([box[0] - 1, box[1] - 1, box[2] - 1, box[3] - 1], fill=(200, 40 + 80 * k, 20))
        image.save(root / year / "JPEGImages" / f"{image_id}.jpg")
        filename = f"{image_id}.png" if image_id == "000007" else f"{image_id}.jpg"
        (root / year / "Annotations" / f"{image_id}.xml").write_text(_xml(filename, objects))
        sets.setdefault((year, split), []).append(image_id)
    for (year, split), ids in sets.items():
        (root / year / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_profile_sweep_and_preset():
    entries = reproduce.PROFILES["voc"]["03_train_eval"]
    assert [params["variant"] for _, params in entries] == ["baseline", "harmonic_hiou"]
    assert all(p["preset"] == "voc" and p["seed"] == 0 and p["arch"] == "retinanet" for _, p in entries)
    assert SWEEPS["voc"].seeds == (0,) and reproduce.DEFAULT_RESULTS_DIRS["voc"] == "results/voc"
    cfg = TrainConfig.preset("voc")
    assert cfg.detector["backbone"] == "resnet50_fpn" and (cfg.detector["min_size"], cfg.detector["max_size"]) == (600, 1000)
    assert cfg.lr_steps == [9000] and cfg.max_iters == 12000


def test_voc0712_is_converted_once_with_shared_ids(vocdevkit, tmp_path):
    messages = []
    paths = prepare_voc0712(vocdevkit.parent, tmp_path / "cache", log=messages.append)  # the folder above works too
    assert paths["image_dir"] == paths["val_image_dir"] == str(vocdevkit)
    train = json.loads(Path(paths["dataset"]).read_text())
    test = json.loads(Path(paths["val_dataset"]).read_text())
    assert [i["file_name"] for i in train["images"]] == [
        "VOC2007/JPEGImages/000005.jpg", "VOC2007/JPEGImages/000007.jpg",  # 000007: .png in its XML, fixed
        "VOC2012/JPEGImages/2008_000003.jpg", "VOC2012/JPEGImages/2008_000008.jpg"]
    assert [i["id"] for i in train["images"]] == [1, 2, 3, 4] and [a["id"] for a in train["annotations"]] == list(range(1, 7))
    assert train["categories"] == test["categories"] and [c["name"] for c in test["categories"]] == list(VOC_CLASSES)
    assert train["info"]["source_format"] == "pascal_voc" and train["info"]["file_name_fixes"] == 1
    assert [i["voc_id"] for i in test["images"]] == ["000001", "000002"]
    assert "4 trainval and 2 test images" in messages[0] and "1 <filename> extension(s) fixed" in messages[0]
    # both load, image files checked, relative to the VOCdevkit folder; the difficult cat is an ignore region
    ds = CocoDetection(paths["image_dir"], paths["dataset"])
    assert len(ds) == 4 and ds.load_target(0)["crowd_boxes"].tolist() == [[34, 9, 60, 44]]
    assert len(CocoDetection(paths["val_image_dir"], paths["val_dataset"])) == 2
    prepare_voc0712(vocdevkit, tmp_path / "cache", log=messages.append)
    assert messages[1].startswith("VOC07+12: reusing the conversion")


def test_missing_voc_folders_are_named(tmp_path):
    (tmp_path / "VOC2007" / "Annotations").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"not a VOCdevkit folder .*VOC2007/ImageSets/Main/test\.txt.*VOC2012"):
        experiment.run_experiment(dict(run_name="x", preset="shapes-tiny", voc_root=str(tmp_path), results_dir=tmp_path))
    with pytest.raises(ValueError, match="coco_root and voc_root are alternatives"):
        experiment.RunSpec(run_name="x", coco_root="a", voc_root="b")


def test_dry_run_converts_and_trains_a_few_iterations(vocdevkit, tmp_path):
    out = experiment.run_experiment(dict(
        run_name="voc-plumbing", preset="shapes-tiny", voc_root=str(vocdevkit), dry_run=True, dry_run_iters=2,
        device="cpu", results_dir=str(tmp_path), progress=False, train_overrides={"num_threads": 1},
    ))
    run_dir = out["run_dir"]
    assert run_dir.name == "voc-plumbing-dryrun" and out["metrics"] == {}
    log = read_log(run_dir)
    assert [r["iter"] for r in log] == [1, 2]
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["dataset"] == str(tmp_path / "data" / "voc0712" / "voc0712_trainval.json")
    assert config["val_dataset"].endswith("voc07_test.json") and config["image_dir"] == str(vocdevkit)
    assert not (run_dir / "metrics.json").exists()


def test_reproduce_needs_voc_root_and_passes_it_to_the_training_notebooks(vocdevkit, tmp_path, monkeypatch, capsys):
    assert cli_main(["reproduce", "--profile", "voc", "--dry-run", "--results-dir", str(tmp_path)]) == 2
    assert "profile 'voc' needs --voc-root (make reproduce PROFILE=voc VOC_ROOT=...)" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(reproduce, "run_notebook", lambda stem, params, output, **kw: calls.append((stem, params, output)))
    status = cli_main(["reproduce", "--profile", "voc", "--dry-run", "--voc-root", str(vocdevkit),
                       "--results-dir", str(tmp_path), "--jobs", "1", "--no-progress"])
    assert status == 0
    assert [(stem, p["variant"], p["dry_run"]) for stem, p, _ in calls] == [
        ("03_train_eval", "baseline", True), ("03_train_eval", "harmonic_hiou", True)]
    assert all(p["voc_root"] == str(vocdevkit) and "coco_root" not in p for _, p, _ in calls)
    assert calls[0][2] == tmp_path / "runs" / "voc-baseline-s0" / "03_train_eval-dryrun.ipynb"


def test_make_passes_voc_root_and_dry_run():
    result = subprocess.run(["make", "-n", "reproduce", "PROFILE=voc", "VOC_ROOT=/data/VOCdevkit", "DRY_RUN=1"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    assert "-m harmonic reproduce --profile voc --voc-root /data/VOCdevkit --dry-run" in " ".join(result.stdout.split())


def test_run_summary_shows_the_voc_metric():
    text = experiment.metrics_markdown({"coco": {"AP": 0.5}, "consistency": {}, "voc": {"mAP_11point": 0.75, "mAP_area": 0.8}})
    assert "| VOC mAP (11-point) | VOC mAP (area) |" in text and "| 0.750 | 0.800 |" in text
    assert "VOC" not in experiment.metrics_markdown({"coco": {"AP": 0.5}, "consistency": {}})
