import pytest

from harmonic.experiments.run import RunSpec, build_run_config, coco_paths, metrics_markdown


def test_build_run_config_layers_preset_loss_and_overrides(tmp_path):
    cfg = build_run_config(RunSpec(
        run_name="r1", preset="shapes-tiny", arch="retinanet",
        loss_options={"loss": "harmonic", "hiou": True, "hiou_gamma": 0.5},
        detector_overrides={"fpn_channels": 16}, train_overrides={"max_iters": 3},
        seed=7, device="cpu", results_dir=str(tmp_path),
    ))
    assert cfg.detector["loss"] == "harmonic" and cfg.detector["hiou_gamma"] == 0.5
    assert cfg.detector["fpn_channels"] == 16
    assert cfg.detector["backbone"] == "resnet18_fpn"  # from the preset
    assert cfg.max_iters == 3 and cfg.seed == 7 and cfg.resume is True
    assert cfg.output_dir == str(tmp_path / "runs" / "r1")


def test_build_run_config_rejects_paths_as_run_names(tmp_path):
    with pytest.raises(ValueError, match="run_name"):
        RunSpec(run_name="../escape", preset="shapes-tiny", results_dir=str(tmp_path))


def test_run_spec_from_dict_names_unknown_parameters():
    spec = RunSpec.from_dict({"run_name": "r", "seed": 3, "loss_options": None, "torchrun_args": None})
    assert spec.seed == 3 and spec.loss_options == {} and spec.torchrun_args == []
    with pytest.raises(ValueError, match=r"unknown run parameter\(s\) \['sed'\]"):
        RunSpec.from_dict({"run_name": "r", "sed": 3})
    with pytest.raises(TypeError, match="loss_options must be a dict"):
        RunSpec(run_name="r", loss_options=["loss"])


def test_coco_paths_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        coco_paths(tmp_path)
    (tmp_path / "annotations").mkdir()
    for name in ("instances_train2017.json", "instances_val2017.json"):
        (tmp_path / "annotations" / name).write_text("{}")
    (tmp_path / "train2017").mkdir()
    (tmp_path / "val2017").mkdir()
    paths = coco_paths(tmp_path)
    assert paths["val_image_dir"].endswith("val2017")
    cfg = build_run_config(RunSpec(run_name="c", preset="shapes-tiny", coco_root=str(tmp_path), results_dir=str(tmp_path)))
    assert cfg.dataset.endswith("instances_train2017.json") and cfg.image_dir.endswith("train2017")


def test_metrics_markdown_shows_values_and_missing():
    text = metrics_markdown({"coco": {"AP": 0.5, "APs": None}, "consistency": {"spearman": 0.25, "n_objects": 3}})
    assert "0.500" in text and "n/a" in text and "0.250" in text and "| 3 |" in text


