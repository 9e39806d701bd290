"""Command line: ``python -m harmonic train`` (:func:`add_arguments`, :func:`config_from_args`,
:func:`run`); one flag per :class:`TrainConfig` field and per detector field."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from harmonic.engine.config import AMP_MODES, DEVICES, PRESETS, TrainConfig
from harmonic.engine.distributed import _env_int
from harmonic.engine.evaluation import evaluate
from harmonic.engine.training import NonFiniteLossError, _threads, train

_EPILOG = """\
examples:
  # train on the embedded default dataset (generated on first use), then evaluate on its val split
  python -m harmonic train --output-dir runs/baseline
  python -m harmonic train --loss harmonic --output-dir runs/harmonic

  # your own COCO-format data
  python -m harmonic train --train-ann ann/train.json --train-images images/train \\
      --val-ann ann/val.json --val-images images/val --arch retinanet --backbone resnet50_fpn \\
      --min-size 512 --max-size 853 --epochs 12 --lr-steps 8000,11000 --output-dir runs/mydata

  # a saved configuration, with a flag overriding it; continue an interrupted run
  python -m harmonic train --print-config --preset shapes-cpu > cfg.json
  python -m harmonic train --config cfg.json --seed 1 --output-dir runs/seed1
  python -m harmonic train --config cfg.json --seed 1 --output-dir runs/seed1 --resume

  # several GPUs on one machine (batch size is per process)
  torchrun --nproc_per_node 4 -m harmonic train --preset coco-1x \\
      --train-ann coco/annotations/instances_train2017.json --train-images coco/train2017 \\
      --val-ann coco/annotations/instances_val2017.json --val-images coco/val2017

Values come from --preset (default shapes-cpu) or --config, then from the flags given.
lr_steps are iteration counts; the lr is multiplied by lr_gamma after each.
"""

# flag help for each TrainConfig field
_TRAIN_HELP = {
    "dataset": "training data: a preset (shapes, shapes-tiny), a COCO annotation JSON, or a folder with train.json and images/",
    "image_dir": "folder of the training images (default: images/ beside the annotation file)",
    "val_dataset": "evaluation data, as --dataset (default: the val split of --dataset)",
    "val_image_dir": "folder of the evaluation images",
    "flip_prob": "probability of a random horizontal flip of a training image",
    "epochs": "train for this many passes over the data (instead of --max-iters)",
    "max_iters": "train for this many iterations (instead of --epochs)",
    "batch_size": "images per iteration and per process",
    "lr": "base learning rate of SGD (not scaled with the number of processes)",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay (L2), on every trainable parameter",
    "warmup_iters": "iterations of linear warmup (0: none)",
    "warmup_factor": "learning-rate factor at the first warmup iteration",
    "lr_steps": "comma-separated iteration counts after which the lr is multiplied by --lr-gamma, e.g. 450,550",
    "lr_gamma": "learning-rate decay factor at each of --lr-steps",
    "grad_clip": "clip the global gradient norm to this value ('none': no clipping)",
    "amp": "mixed precision: auto (on for CUDA), on (CUDA only), off",
    "seed": "seed of the model initialization, data order and augmentation",
    "device": "auto (CUDA when available), cpu or cuda",
    "output_dir": "the run folder: config.json, log.jsonl, checkpoints/, metrics",
    "checkpoint_every": "write checkpoints/last.pt every this many iterations (and at the end)",
    "keep_checkpoints": "also keep checkpoints/iter_<k>.pt at each of those",
    "log_every": "print a progress line every this many iterations when --no-progress",
    "num_workers": "data loading processes (0: in the training process)",
    "resume": "continue the run in --output-dir from checkpoints/last.pt (starts it when there is none)",
    "deterministic": "use deterministic algorithms (torch.use_deterministic_algorithms) during the run",
    "sync_bn": "distributed CUDA runs: BatchNorm statistics over the global batch (SyncBatchNorm)",
    "num_threads": "CPU threads per process ('none': torch's default; 1 is faster on a busy shared machine)",
}
_TRAIN_ALIASES = {
    "dataset": ["--train-ann"], "image_dir": ["--train-images"], "val_dataset": ["--val-ann"],
    "val_image_dir": ["--val-images"], "output_dir": ["--out"],
}
_DETECTOR_HELP = {
    "arch": "detector family",
    "num_classes": "object classes without background (default: from the training set)",
    "backbone": "feature extractor",
    "pretrained_backbone": "'imagenet' (downloaded by torchvision) or a state_dict file of the classification network",
    "trainable_backbone_layers": "backbone stages that train, with a pretrained backbone",
    "norm": "norm layers of the backbone (default: bn from scratch, frozen_bn when pretrained)",
    "min_size": "shorter image side after the detector's resize",
    "max_size": "cap on the longer image side",
    "fpn_channels": "FPN width (torchvision: 256)",
    "anchor_sizes": "'auto' (torchvision's scaled by min_size/800), 'none' (torchvision's) or JSON, e.g. '[[16],[32]]'",
    "loss": "baseline (the detector's own losses) or harmonic (Harmonic loss, Eq. 1 of the supplement [S])",
    "hiou": "add the Harmonic IoU loss to the localization term (Eq. 11 [S])",
    "hiou_weight": "alpha, weight of the HIoU term (1.5 reported [R])",
    "hiou_gamma": "gamma of the HIoU loss, <= 1 (0.8 reported [R])",
    "tc_weight": "weight of the task-contrasting term (0: off) [R]",
    "tc_margin": "margin m of the task-contrasting term [R]",
    "tc_form": "task-contrasting form: margin or gate [R]",
    "detach_factors": "treat the harmonic factors as constants (ablation; the supplement differentiates them [S])",
    "beta_c_source": "sigmoid heads: beta_c from the focal loss (loss) or the ground-truth probability (gt_prob) [R]",
    "fused": "fused loss kernels: auto, on, off (same values)",
    "detections_per_img": "detections kept per image after NMS",
    "score_thresh": "score threshold before NMS",
    "crowd_iof_thresh": "ignore negatives lying more than this fraction inside a crowd box",
}


def _parse_int_list(text: str) -> list[int]:
    text = text.strip()
    if text.lower() in ("", "none"):
        return []
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 450,550), got {text!r}") from None


def _parse_optional_float(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _parse_optional_int(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _parse_optional_str(text: str) -> str | None:
    return None if text.strip().lower() == "none" else text


def _parse_anchor_sizes(text: str):
    if text.strip().lower() in ("none", ""):
        return None
    if text.strip() == "auto":
        return "auto"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'none' or JSON like [[16],[32]], got {text!r}") from None


def _parse_tristate(text: str) -> bool | None:
    value = text.strip().lower()
    if value in ("auto", "none"):
        return None
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")


def _parse_json_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _add_detector_flags(group) -> None:
    from harmonic.dense import BETA_C_SOURCES, TC_FORMS
    from harmonic.models import DetectorConfig
    from harmonic.models.config import ARCHS, BACKBONES, LOSSES, NORMS

    choices = {"arch": ARCHS, "backbone": BACKBONES, "norm": NORMS, "loss": LOSSES, "tc_form": TC_FORMS,
               "beta_c_source": BETA_C_SOURCES}
    types = {"num_classes": int, "trainable_backbone_layers": _parse_optional_int, "min_size": _parse_optional_int,
             "max_size": _parse_optional_int, "fpn_channels": int, "anchor_sizes": _parse_anchor_sizes,
             "hiou_weight": float, "hiou_gamma": float, "tc_weight": float, "tc_margin": float,
             "fused": _parse_tristate, "detections_per_img": _parse_optional_int,
             "score_thresh": _parse_optional_float, "crowd_iof_thresh": float,
             "pretrained_backbone": _parse_optional_str}
    for f in dataclasses.fields(DetectorConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = _DETECTOR_HELP.get(f.name, "DetectorConfig field (JSON value)")
        kwargs: dict[str, Any] = {"dest": f"detector.{f.name}", "default": argparse.SUPPRESS, "help": help_text}
        if f.name in choices:
            group.add_argument(flag, choices=choices[f.name], **kwargs)
        elif f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            metavar = "{auto,on,off}" if types.get(f.name) is _parse_tristate else f.name.upper()
            group.add_argument(flag, type=types.get(f.name, _parse_json_value), metavar=metavar, **kwargs)


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "train") -> None:
    """The ``train`` command's flags: one per :class:`TrainConfig` field and per detector field."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.description = (
        "Train a detector (RetinaNet, FCOS, Faster R-CNN, SSD) with its own losses or the Harmonic loss,\n"
        "writing a resumable run folder; then evaluate it on the validation data."
    )
    parser.set_defaults(_parser=parser)
    base = parser.add_argument_group("configuration")
    base.add_argument("--config", metavar="FILE.json", help="read a TrainConfig (or a run's config.json); flags override it")
    base.add_argument("--preset", choices=sorted(PRESETS), help="start from a named configuration (default: shapes-cpu)")
    base.add_argument("--print-config", action="store_true", help="print the resulting configuration as JSON and exit")
    base.add_argument("--no-eval", action="store_true", help="do not evaluate on the validation data after training")
    base.add_argument("--no-progress", action="store_true", help="print a line every --log-every iterations instead of a progress bar")
    train_group = parser.add_argument_group("training (TrainConfig fields)")
    types = {"epochs": _parse_optional_int, "max_iters": _parse_optional_int, "batch_size": int, "lr": float,
             "momentum": float, "weight_decay": float, "warmup_iters": int, "warmup_factor": float,
             "lr_steps": _parse_int_list, "lr_gamma": float, "grad_clip": _parse_optional_float, "seed": int,
             "checkpoint_every": int, "log_every": int, "num_workers": int, "flip_prob": float,
             "image_dir": _parse_optional_str, "val_dataset": _parse_optional_str,
             "val_image_dir": _parse_optional_str, "num_threads": _parse_optional_int}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "detector":
            continue
        flags = ["--" + f.name.replace("_", "-")] + _TRAIN_ALIASES.get(f.name, [])
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": _TRAIN_HELP[f.name]}
        if f.name in ("keep_checkpoints", "resume", "deterministic", "sync_bn"):
            train_group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name == "amp":
            train_group.add_argument(*flags, choices=AMP_MODES, **kwargs)
        elif f.name == "device":
            train_group.add_argument(*flags, choices=DEVICES, **kwargs)
        else:
            train_group.add_argument(*flags, type=types.get(f.name, str), metavar=f.name.upper(), **kwargs)
    _add_detector_flags(parser.add_argument_group("detector (DetectorConfig fields)"))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``train`` arguments: the --config file or --preset, then the flags."""
    given = vars(args)
    if given.get("config") and given.get("preset"):
        raise ValueError("--config and --preset are alternatives; give one")
    base = TrainConfig.load_json(given["config"]) if given.get("config") else TrainConfig.preset(given.get("preset") or "shapes-cpu")
    field_names = {f.name for f in dataclasses.fields(TrainConfig)}
    changes = {k: v for k, v in given.items() if k in field_names}
    detector = {k.split(".", 1)[1]: v for k, v in given.items() if k.startswith("detector.")}
    if detector:
        changes["detector"] = detector
    return base.replace(**changes)


def run(args: argparse.Namespace, command_name: str = "train") -> int:
    parser = getattr(args, "_parser", None)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        if parser is not None:
            parser.error(str(err))  # exits with status 2 and the usage line
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        return 0
    try:
        run_dir = train(cfg, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with --resume --output-dir {cfg.output_dir}", file=sys.stderr)
        return 130
    except (NonFiniteLossError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if _env_int("RANK", 0) != 0:
        return 0
    print(f"run folder: {run_dir}")
    if args.no_eval:
        return 0
    try:
        with _threads(cfg.num_threads):
            metrics = evaluate(run_dir, device=cfg.device, out_dir=run_dir, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: evaluation failed: {err}", file=sys.stderr)
        return 1
    coco = metrics["coco"]
    print(f"AP {coco['AP']:.4f}  AP50 {coco['AP50']:.4f}  AP75 {coco['AP75']:.4f}  -> {run_dir / 'metrics.json'}")
    return 0
