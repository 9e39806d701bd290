"""One training run and its evaluation, as notebook 03 runs it: a :class:`RunSpec` in, a run folder out."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmonic.utils.files import atomic_write_json


def coco_paths(coco_root: str | Path) -> dict[str, str]:
    """Annotation files and image folders of a COCO 2017 folder; a clear error naming what is missing."""
    root = Path(coco_root)
    paths = {
        "dataset": root / "annotations" / "instances_train2017.json",
        "image_dir": root / "train2017",
        "val_dataset": root / "annotations" / "instances_val2017.json",
        "val_image_dir": root / "val2017",
    }
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"{root} is not a COCO 2017 folder: missing {missing} (expected annotations/instances_train2017.json, "
            "annotations/instances_val2017.json, train2017/ and val2017/)"
        )
    return {k: str(v) for k, v in paths.items()}


def voc_paths(voc_root: str | Path, results_dir: str | Path) -> dict[str, str]:
    """Training and evaluation data of the VOC07+12 protocol: VOC2007 + VOC2012 trainval for training,
    VOC2007 test for evaluation, converted once into ``<results_dir>/data/voc0712`` (see
    :func:`harmonic.data.voc.prepare_voc0712`); a clear error naming what is missing under ``voc_root``."""
    from harmonic.data.voc import prepare_voc0712  # the data package pulls in torchvision

    return prepare_voc0712(voc_root, Path(results_dir) / "data" / "voc0712")


# Presets whose recipe is defined by its global batch of 16 images, spread over the processes.
GLOBAL_BATCH_PRESETS = {"coco-1x": 16, "voc": 16}


@dataclass(frozen=True)
class RunSpec:
    """What one run is: the detector and its loss, the data, the seed, where it goes and how it is launched.

    ``preset`` names a :data:`harmonic.engine.PRESETS` training recipe; ``loss_options`` are the
    :class:`harmonic.models.DetectorConfig` fields that define the loss, ``detector_overrides`` and
    ``train_overrides`` any other fields. ``dataset`` / ``image_dir`` / ``val_*``: None keeps the preset's.
    ``coco_root``: a COCO 2017 folder, which sets all four; ``voc_root``: a ``VOCdevkit`` folder, converted
    to VOC07+12 trainval / VOC07 test (:func:`voc_paths`), which sets all four. ``nproc_per_node`` > 1 (``"auto"``: one per
    visible GPU) or ``torchrun_args`` (e.g. ``["--nnodes", "2", "--node_rank", "0", "--master_addr",
    "host0"]``) train through ``torch.distributed.run``. ``dry_run``: check the data layout, then train
    ``dry_run_iters`` iterations into ``<run_name>-dryrun`` (no evaluation).
    """

    run_name: str
    preset: str = "shapes-cpu"
    arch: str = "retinanet"
    variant: str = "custom"
    loss_options: dict[str, Any] = field(default_factory=dict)
    detector_overrides: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    image_dir: str | None = None
    val_dataset: str | None = None
    val_image_dir: str | None = None
    seed: int = 0
    device: str = "auto"
    sweep: str | None = None
    resume: bool = True
    results_dir: str = "results"
    coco_root: str | None = None
    voc_root: str | None = None
    nproc_per_node: int | str = 1
    torchrun_args: list[str] = field(default_factory=list)
    dry_run: bool = False
    dry_run_iters: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.run_name, str) and re.fullmatch(r"[A-Za-z0-9._+-]+", self.run_name)):
            raise ValueError(f"run_name must be a plain folder name (letters, digits, . _ + -), got {self.run_name!r}")
        for name in ("loss_options", "detector_overrides", "train_overrides"):
            if not isinstance(getattr(self, name), Mapping):
                raise TypeError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.torchrun_args, (list, tuple)):
            raise TypeError(f"torchrun_args must be a list of strings, got {type(self.torchrun_args).__name__}")
        if self.coco_root is not None and self.voc_root is not None:
            raise ValueError("coco_root and voc_root are alternatives; give one")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunSpec:
        """A spec from a dict of its fields (notebook 03's parameters); an unknown key is an error that
        names it, and ``None`` for a dict or list field means empty."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown run parameter(s) {unknown}; known: {sorted(names)}")
        values = dict(values)
        for name in ("loss_options", "detector_overrides", "train_overrides", "torchrun_args"):
            if name in values and values[name] is None:
                values.pop(name)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_run_config(spec: RunSpec):
    """The :class:`harmonic.engine.TrainConfig` of one run: the preset, then the loss, then overrides."""
    from harmonic.engine.config import TrainConfig  # engine pulls in torch and torchvision

    base = TrainConfig.preset(spec.preset)
    detector = {**base.detector, "arch": spec.arch, **spec.loss_options, **spec.detector_overrides}
    changes: dict[str, Any] = {
        "detector": detector,
        "seed": spec.seed,
        "device": spec.device,
        "resume": spec.resume,
        "output_dir": str(Path(spec.results_dir) / "runs" / spec.run_name),
    }
    if spec.coco_root is not None:
        changes.update(coco_paths(spec.coco_root))
    if spec.voc_root is not None:
        changes.update(voc_paths(spec.voc_root, spec.results_dir))
    for key in ("dataset", "image_dir", "val_dataset", "val_image_dir"):
        if getattr(spec, key) is not None:
            changes[key] = getattr(spec, key)
    changes.update(spec.train_overrides)
    return base.replace(**changes)


def run_experiment(spec: RunSpec | Mapping[str, Any]) -> dict[str, Any]:
    """Train (or resume, or skip when finished) and evaluate one run into ``results_dir/runs/run_name``.

    ``spec``: a :class:`RunSpec`, or a dict of its fields. Writes ``run.json`` first (what the run is:
    variant, seed, sweep), then training output, then ``metrics.json`` last, so a folder with
    ``metrics.json`` is a finished run. Returns ``{"run_dir", "metrics", "config"}``. With a preset of
    :data:`GLOBAL_BATCH_PRESETS` (``coco-1x``, ``voc``) the global batch of 16 images is spread over the
    processes (``batch_size`` per process = 16 / processes, unless ``train_overrides`` sets it).
    """
    from harmonic.engine.predict import evaluate  # engine pulls in torch and torchvision
    from harmonic.engine.training import train  # engine pulls in torchvision

    if not isinstance(spec, RunSpec):
        spec = RunSpec.from_dict(spec)
    nproc = resolve_nproc(spec.nproc_per_node)
    train_overrides = dict(spec.train_overrides)
    if spec.preset in GLOBAL_BATCH_PRESETS and "batch_size" not in train_overrides:
        world = nproc * _nnodes(spec.torchrun_args)
        batch = GLOBAL_BATCH_PRESETS[spec.preset]
        if batch % world:
            raise ValueError(f"the {spec.preset} recipe's batch of {batch} images does not split over {world} "
                             "processes; set train_overrides['batch_size']")
        train_overrides["batch_size"] = batch // world
    run_name = spec.run_name
    if spec.dry_run:
        run_name = f"{run_name}-dryrun"
        iters = spec.dry_run_iters
        train_overrides.update(max_iters=iters, epochs=None, lr_steps=[], warmup_iters=min(5, iters),
                               checkpoint_every=iters)
    spec = dataclasses.replace(spec, run_name=run_name, train_overrides=train_overrides)
    cfg = build_run_config(spec)
    run_dir = Path(cfg.output_dir)
    atomic_write_json(run_dir / "run.json", {
        "run_name": run_name, "variant": spec.variant, "seed": spec.seed, "sweep": spec.sweep, "arch": spec.arch,
        "preset": spec.preset, "loss_options": spec.loss_options,
    })
    if nproc > 1 or spec.torchrun_args:
        launch_torchrun(cfg, nproc, list(spec.torchrun_args))
    else:
        train(cfg, progress=spec.progress)
    if spec.dry_run:
        print(f"dry run finished: {spec.dry_run_iters} iterations in {run_dir}; the data layout and training work")
        return {"run_dir": run_dir, "metrics": {}, "config": cfg.to_dict()}
    metrics = evaluate(run_dir, out_dir=run_dir, device=spec.device, label=spec.variant, progress=spec.progress)
    return {"run_dir": run_dir, "metrics": metrics, "config": cfg.to_dict()}


def resolve_nproc(nproc_per_node: int | str) -> int:
    """Processes per node: an integer >= 1, or ``"auto"`` (one per visible CUDA device, else 1)."""
    if nproc_per_node == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    if isinstance(nproc_per_node, bool) or not isinstance(nproc_per_node, int) or nproc_per_node < 1:
        raise ValueError(f'nproc_per_node must be an integer >= 1 or "auto", got {nproc_per_node!r}')
    return nproc_per_node


def _nnodes(torchrun_args: list[str] | None) -> int:
    args = list(torchrun_args or [])
    for i, arg in enumerate(args):
        if arg.startswith("--nnodes="):
            return int(arg.split("=", 1)[1].split(":")[-1])
        if arg == "--nnodes" and i + 1 < len(args):
            return int(args[i + 1].split(":")[-1])
    return 1


def torchrun_command(config_path: str | Path, nproc: int, torchrun_args: list[str]) -> list[str]:
    """The command line that trains ``config_path`` on ``nproc`` processes per node."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *torchrun_args,
            "-m", "harmonic", "train", "--config", str(config_path)]


def launch_torchrun(cfg, nproc: int, torchrun_args: list[str]) -> None:
    """Write the run's configuration and train it through ``torch.distributed.run``; raise if it fails."""
    config_path = Path(cfg.output_dir) / "train_config.json"
    atomic_write_json(config_path, cfg.to_dict())
    command = torchrun_command(config_path, nproc, torchrun_args)
    print("launching:", " ".join(command), flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"distributed training exited with status {result.returncode}: {' '.join(command)}")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def metrics_markdown(metrics: dict[str, Any]) -> str:
    """Two small Markdown tables: the 12 COCO stats, and the consistency metrics."""
    coco = metrics.get("coco", {})
    cons = metrics.get("consistency", {})
    lines = ["| " + " | ".join(coco) + " |", "|" + "---|" * len(coco), "| " + " | ".join(_fmt(v) for v in coco.values()) + " |", ""]
    voc = metrics.get("voc")
    if voc:
        lines += ["| VOC mAP (11-point) | VOC mAP (area) |", "|---|---|",
                  f"| {_fmt(voc.get('mAP_11point'))} | {_fmt(voc.get('mAP_area'))} |", ""]
    keys = [k for k in ("pearson", "spearman", "inconsistent_share", "high_score_poor_iou_share",
                        "low_score_good_iou_share", "nms_best_box_rate", "nms_mean_iou_gap", "n_detections",
                        "n_matched", "n_objects") if k in cons]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys), "| " + " | ".join(_fmt(cons[k]) for k in keys) + " |"]
    return "\n".join(lines)
