"""Command line: ``python -m harmonic <command>``, every subcommand.

Each command has an ``_<name>_arguments(parser)`` and an ``_<name>(args) -> int``; the modules that do the
work are imported inside them, so ``python -m harmonic verify`` never loads torchvision and ``--help``
stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from harmonic.utils.checks import positive_int


# ----------------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------------
def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-points", type=positive_int, default=64,
                        help="random points per autograd comparison (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random points (default 0)")
    parser.add_argument("--device", default=None, help="torch device of the autograd checks (default cpu)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the checks to this JSON file")


def _verify(args: argparse.Namespace) -> int:
    from harmonic.theory.derivations import checks, format_rows, write_checks_json  # sympy and torch

    """Print one row per check; exit status 1 if any check fails, 2 for bad arguments."""
    try:
        results = checks(n_points=args.n_points, seed=args.seed, device=args.device)
    except ValueError as exc:
        print(f"error: --n-points/--seed/--device: {exc}", file=sys.stderr)
        return 2
    print(format_rows(results))
    n_failed = sum(not c.passed for c in results)
    print(f"\n{len(results) - n_failed}/{len(results)} checks passed")
    for c in results:
        if not c.passed:
            print(f"FAILED {c.equation}: {c.statement} ({c.detail})", file=sys.stderr)
    if args.json:
        parameters = {"n_points": args.n_points, "seed": args.seed, "device": args.device}
        try:
            path = write_checks_json(args.json, results, parameters, seed=args.seed)
        except OSError as exc:
            print(f"error: --json {args.json}: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {path}")
    return 1 if n_failed else 0


# ----------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------
def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    from harmonic.data.shapes import PRESETS  # loaded when the command runs

    """Options of ``python -m harmonic generate``."""
    parser.add_argument("--preset", default="shapes", choices=sorted(PRESETS), help="dataset preset (default: shapes)")
    parser.add_argument(
        "--out", default=None,
        help="folder to write (default: $HARMONIC_DATA/<preset>, or data/<preset> when HARMONIC_DATA is unset)",
    )
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    parser.add_argument("--force", action="store_true", help="regenerate even if an identical dataset is there")


def _generate(args: argparse.Namespace) -> int:
    from harmonic.data.coco import DatasetError  # loaded when the command runs
    from harmonic.data.shapes import (  # loaded when the command runs
        CATEGORIES,
        default_data_root,
        ensure_dataset,
        is_up_to_date,
        read_manifest,
    )

    """``python -m harmonic generate``: write (or reuse) a preset; 0 on success, 1 with a message on error."""
    folder = Path(args.out) if args.out else default_data_root() / args.preset
    reused = not args.force and is_up_to_date(folder, args.preset, args.seed)
    try:
        layout = ensure_dataset(folder, args.preset, args.seed, force=args.force)
    except (DatasetError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    manifest = read_manifest(folder)
    params = manifest["params"]
    print(
        f"{args.preset} (seed {args.seed}) in {layout['root']}: {params['num_train']} train + {params['num_val']} val "
        f"images of {params['image_size']}x{params['image_size']}, categories {', '.join(CATEGORIES)}; "
        + ("reused, already up to date" if reused else f"generated in {manifest['generation_seconds']:.1f} s")
    )
    return 0


# ----------------------------------------------------------------------------------------------------
# voc2coco
# ----------------------------------------------------------------------------------------------------
def _voc2coco_arguments(parser: argparse.ArgumentParser) -> None:
    from harmonic.data.voc import DIFFICULT_MODES  # loaded when the command runs

    src = parser.add_argument_group("input (either --voc-root and --split, or --ann-dir [--image-set])")
    src.add_argument("--voc-root", help="a VOC year folder, e.g. VOCdevkit/VOC2007 (holds Annotations/, ImageSets/)")
    src.add_argument("--split", help="with --voc-root: the image set, e.g. trainval or test")
    src.add_argument("--ann-dir", help="a folder of VOC .xml files")
    src.add_argument("--image-set", help="with --ann-dir: a file listing the image ids to convert")
    src.add_argument("--image-dir", default=None,
                     help="folder of the images, to fix <filename>s whose extension differs from the shipped file "
                          "(default: JPEGImages/ of --voc-root when it exists; none with --ann-dir)")
    parser.add_argument("--out", required=True, help="COCO JSON file to write")
    classes = parser.add_mutually_exclusive_group()
    classes.add_argument(
        "--classes", default=None,
        help="comma-separated class names in label order (default: the 20 VOC classes); 'auto': from the files",
    )
    classes.add_argument("--classes-from", default=None, metavar="COCO.json",
                         help="the class list (and so the category ids) of an earlier conversion, e.g. the "
                              "trainval file when converting test")
    parser.add_argument("--difficult", choices=DIFFICULT_MODES, default="crowd",
                        help="difficult objects: crowd = ignore regions (default), keep, or drop")


def _voc2coco_source(args: argparse.Namespace) -> tuple[Path, Path | None, Path | None]:
    """``(annotations folder, image set file or None, image folder or None)`` of the voc2coco flags;
    a ``ValueError`` whose message names the flag at fault."""
    if args.voc_root and args.ann_dir:
        raise ValueError("give either --voc-root or --ann-dir, not both")
    image_dir = Path(args.image_dir) if args.image_dir else None
    if image_dir is not None and not image_dir.is_dir():
        raise ValueError(f"--image-dir {image_dir}: no such folder")
    if args.voc_root:
        root = Path(args.voc_root)
        if not args.split:
            raise ValueError("--voc-root needs --split (e.g. trainval, test)")
        if args.image_set:
            raise ValueError("--image-set goes with --ann-dir; with --voc-root, name the image set with --split")
        if not (root / "Annotations").is_dir():
            raise ValueError(f"--voc-root {root}: no Annotations/ folder there (expected a VOC year folder such as "
                             "VOCdevkit/VOC2007)")
        image_set = root / "ImageSets" / "Main" / f"{args.split}.txt"
        if not image_set.is_file():
            known = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
            raise ValueError(f"--split {args.split}: no image set {image_set} (image sets there: {known})")
        if image_dir is None and (root / "JPEGImages").is_dir():
            image_dir = root / "JPEGImages"
        return root / "Annotations", image_set, image_dir
    if args.ann_dir:
        if args.split:
            raise ValueError("--split goes with --voc-root; with --ann-dir, give an --image-set file")
        if not Path(args.ann_dir).is_dir():
            raise ValueError(f"--ann-dir {args.ann_dir}: no such folder")
        if args.image_set and not Path(args.image_set).is_file():
            raise ValueError(f"--image-set {args.image_set}: no such file")
        return Path(args.ann_dir), Path(args.image_set) if args.image_set else None, image_dir
    raise ValueError("give --voc-root with --split, or --ann-dir")


def _voc2coco(args: argparse.Namespace) -> int:
    """``python -m harmonic voc2coco``: 0 on success, 1 for data that cannot be converted, 2 for bad flags;
    every message names the flag or the file at fault."""
    # loaded when the command runs
    from harmonic.data.voc import VOC_CLASSES, UnknownClassError, VocError, class_names_from_coco, voc_to_coco

    try:
        source, image_set, image_dir = _voc2coco_source(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.classes_from:
        try:
            class_names: list[str] | tuple[str, ...] | None = class_names_from_coco(args.classes_from)
        except VocError as exc:
            print(f"error: --classes-from: {exc}", file=sys.stderr)
            return 2
    elif args.classes is None:
        class_names = VOC_CLASSES
    elif args.classes == "auto":
        class_names = None
    else:
        class_names = [c.strip() for c in args.classes.split(",") if c.strip()]
        duplicates = sorted({c for c in class_names if class_names.count(c) > 1})
        if not class_names or duplicates:
            print(f"error: --classes {args.classes!r}: " + (f"duplicate names {duplicates}" if duplicates
                  else "no class names"), file=sys.stderr)
            return 2
    try:
        coco = voc_to_coco(source, args.out, image_set=image_set, class_names=class_names, difficult=args.difficult,
                           image_dir=image_dir)
    except UnknownClassError as exc:
        where = f"--classes-from {args.classes_from}" if args.classes_from else "--classes"
        print(f"error: {exc}; add it to {where}, or pass --classes auto to take the classes from the files",
              file=sys.stderr)
        return 1
    except VocError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: --out {args.out}: {exc}", file=sys.stderr)
        return 1
    crowd = sum(a["iscrowd"] for a in coco["annotations"])
    fixes = coco["info"]["file_name_fixes"]
    print(
        f"wrote {args.out}: {len(coco['images'])} images, {len(coco['annotations'])} annotations "
        f"({crowd} difficult as ignore regions), {len(coco['categories'])} categories, "
        f"{fixes} <filename>(s) fixed to the image shipped with the same stem"
    )
    return 0


# ----------------------------------------------------------------------------------------------------
# reproduce
# ----------------------------------------------------------------------------------------------------
def _reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    from harmonic.experiments.notebooks import PROFILES  # loaded when the command runs

    parser.add_argument("--profile", default="default", choices=sorted(PROFILES),
                        help="which parameter table to run (default: %(default)s)")
    parser.add_argument("--only", nargs="+", metavar="NAMES",
                        help="run only these notebook stems or output names (space or comma separated)")
    parser.add_argument("--results-dir", default=None,
                        help="where executed notebooks and results go (default: results; results/smoke "
                             "for the smoke profile)")
    parser.add_argument("--coco-root", default=None,
                        help="COCO-format dataset root, passed to the notebooks that take coco_root")
    parser.add_argument("--voc-root", default=None,
                        help="a VOCdevkit folder (VOC2007/ and VOC2012/), for --profile voc: passed to the notebooks "
                             "that take voc_root")
    parser.add_argument("--sweep", default=None, metavar="NAME",
                        help="run a named grid of training runs (harmonic.experiments.sweeps) instead of a profile")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the data and train a few iterations of each run (no evaluation or report)")
    parser.add_argument("--jobs", default="auto", type=lambda v: v if v == "auto" else int(v),
                        help='training runs executed at once ("auto": one per CPU core, at most 4, without '
                             "CUDA; default: %(default)s)")
    parser.add_argument("--keep-going", action="store_true", help="run the remaining notebooks after a failure")
    parser.add_argument("--no-progress", action="store_true", help="no papermill progress bar")
    parser.add_argument("--list", action="store_true", help="print the profiles and exit")
    parser.add_argument("--started-at", type=float, default=None, metavar="EPOCH",
                        help="when the whole command began (Unix seconds; make passes the moment it started, so "
                             "the timing written to reproduce_timing.json includes setting up the environment)")


def _reproduce(args: argparse.Namespace) -> int:
    # loaded when the command runs
    from harmonic.experiments.notebooks import PROFILES, reproduce, run_named_sweep

    if args.list:
        for profile, table in PROFILES.items():
            print(f"{profile}:")
            for stem, entries in table.items():
                for name, params in entries:
                    print(f"  {stem} -> {name}.ipynb {params}")
        return 0
    if args.sweep is not None:
        return run_named_sweep(args.sweep, args.results_dir or "results", jobs=args.jobs)
    try:
        return reproduce(args.profile, only=args.only, results_dir=args.results_dir, coco_root=args.coco_root,
                         voc_root=args.voc_root, keep_going=args.keep_going, progress_bar=not args.no_progress, dry_run=args.dry_run, jobs=args.jobs,
                         started_at=args.started_at)
    except ValueError as err:
        print(f"[reproduce] {err}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------
_EVALUATE_EPILOG = """\
examples:
  # the final model of a run, on the validation data it was configured with; results into the run folder
  python -m harmonic evaluate --checkpoint results/runs/baseline

  # a given checkpoint on another split or dataset
  python -m harmonic evaluate --checkpoint results/runs/baseline/checkpoints/last.pt --split train --out eval/train
  python -m harmonic evaluate --checkpoint RUN/checkpoints/final.pt \\
      --dataset coco/annotations/instances_val2017.json --image-dir coco/val2017 --out eval/coco-val
"""


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EVALUATE_EPILOG
    parser.set_defaults(_parser=parser)
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint file (checkpoints/final.pt or last.pt) or a run folder (its final.pt)")
    parser.add_argument("--dataset", default=None,
                        help="a preset (shapes, shapes-tiny), a COCO annotation JSON or a folder with <split>.json "
                             "(default: the evaluation data of the checkpoint's training config)")
    parser.add_argument("--split", default="val", help="split of a preset or folder dataset (default: val)")
    parser.add_argument("--image-dir", default=None, help="folder of the images of --dataset")
    parser.add_argument("--out", default=None,
                        help="folder for metrics.json, detections.json.gz, figures/ (default: the run folder of the "
                             "checkpoint when evaluating its own validation data, else required)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--num-workers", type=int, default=0, help="data loading processes (default: 0)")
    parser.add_argument("--no-candidates", action="store_true",
                        help="do not record the pre-NMS candidates (the NMS-related consistency numbers are then absent)")
    parser.add_argument("--label", default=None, help="name of the run in the figure (default: the run folder's name)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_folder(checkpoint: Path) -> Path:
    """The run folder of a checkpoint path (``RUN/checkpoints/x.pt`` -> ``RUN``; a folder is itself)."""
    if checkpoint.is_dir():
        return checkpoint
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def _evaluate(args: argparse.Namespace) -> int:
    from harmonic.engine.predict import evaluate  # torch and torchvision

    checkpoint = Path(args.checkpoint)
    out = args.out
    if out is None:
        if args.dataset is not None or args.split != "val":
            message = "--out is required when evaluating on a --dataset or --split other than the run's own"
            parser = getattr(args, "_parser", None)
            if parser is not None:
                parser.error(message)
            print(f"error: {message}", file=sys.stderr)
            return 2
        out = _run_folder(checkpoint)
    try:
        metrics = evaluate(
            checkpoint, args.dataset, split=args.split, image_dir=args.image_dir, batch_size=args.batch_size,
            device=args.device, out_dir=out, record_candidates=not args.no_candidates, label=args.label,
            num_workers=args.num_workers, progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    coco = metrics["coco"]
    summary = {k: coco.get(k) for k in ("AP", "AP50", "AP75")}
    if "voc" in metrics:  # the data came from PASCAL VOC: its metric beside COCO AP
        summary.update(VOC_mAP_11point=metrics["voc"]["mAP_11point"], VOC_mAP_area=metrics["voc"]["mAP_area"])
    if "coco_segm" in metrics:  # a model that predicts masks: the mask AP beside the box AP
        summary.update({f"segm_{k}": metrics["coco_segm"].get(k) for k in ("AP", "AP50", "AP75")})
    print(json.dumps(summary), f"-> {Path(out) / 'metrics.json'}")
    return 0


# ----------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------
_TRAIN_EPILOG = """\
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
    "amp": "autocast dtype: auto (bfloat16 where the device has it natively, float16 on other GPUs, else "
           "float32), bf16, fp16 (CUDA), on (auto, required), off (float32); losses stay float32",
    "channels_last": "model memory layout channels_last: auto (with autocast), on, off",
    "compile": "torch.compile the backbone and the heads' convolutions (default off: no faster on the CPU)",
    "fused_optimizer": "SGD's fused kernel: auto (on CUDA without float16's gradient scaler; on the CPU it measured no faster), on, off",
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
    "refinedet_harmonic_arm": "RefineDet with --loss harmonic: the Harmonic loss on the anchor refinement module too [D]",
    "head_norm": "RetinaNet head towers: 'none' (torchvision's v1 head) or 'gn' (GroupNorm, its v2 head)",
    "rpn_pre_nms_top_n_train": "Faster / Mask R-CNN: proposals per level before the RPN's NMS in training (torchvision: 2000)",
    "rpn_post_nms_top_n_train": "Faster / Mask R-CNN: proposals per image after the RPN's NMS in training (torchvision: 2000)",
    "box_batch_size_per_image": "Faster / Mask R-CNN: RoIs sampled per image for the box head's loss (torchvision: 512)",
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
    from harmonic.models import DetectorConfig  # loaded when the command runs
    from harmonic.models.config import ARCHS, BACKBONES, LOSSES, NORMS  # loaded when the command runs
    from harmonic.models.head_loss import BETA_C_SOURCES, TC_FORMS  # loaded when the command runs

    choices = {"arch": ARCHS, "backbone": BACKBONES, "norm": NORMS, "loss": LOSSES, "tc_form": TC_FORMS,
               "beta_c_source": BETA_C_SOURCES}
    types = {"num_classes": int, "trainable_backbone_layers": _parse_optional_int, "min_size": _parse_optional_int,
             "max_size": _parse_optional_int, "fpn_channels": int, "anchor_sizes": _parse_anchor_sizes,
             "hiou_weight": float, "hiou_gamma": float, "tc_weight": float, "tc_margin": float,
             "fused": _parse_tristate, "detections_per_img": _parse_optional_int,
             "score_thresh": _parse_optional_float, "crowd_iof_thresh": float,
             "pretrained_backbone": _parse_optional_str, "rpn_pre_nms_top_n_train": _parse_optional_int,
             "rpn_post_nms_top_n_train": _parse_optional_int, "box_batch_size_per_image": _parse_optional_int,
             "head_norm": _parse_optional_str}
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


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` command's flags: one per :class:`TrainConfig` field and per detector field."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _TRAIN_EPILOG
    parser.description = (
        "Train a detector (RetinaNet, FCOS, Faster R-CNN, SSD, RefineDet) with its own losses or the Harmonic loss,\n"
        "writing a resumable run folder; then evaluate it on the validation data."
    )
    from harmonic.engine.config import AMP_MODES, DEVICES, PRESETS, TrainConfig  # torch and torchvision

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
        if f.name in ("keep_checkpoints", "resume", "deterministic", "sync_bn", "compile"):
            train_group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name == "amp":
            train_group.add_argument(*flags, choices=AMP_MODES, **kwargs)
        elif f.name in ("channels_last", "fused_optimizer"):
            train_group.add_argument(*flags, type=_parse_tristate, metavar="{auto,on,off}", **kwargs)
        elif f.name == "device":
            train_group.add_argument(*flags, choices=DEVICES, **kwargs)
        else:
            train_group.add_argument(*flags, type=types.get(f.name, str), metavar=f.name.upper(), **kwargs)
    _add_detector_flags(parser.add_argument_group("detector (DetectorConfig fields)"))


def config_from_args(args: argparse.Namespace):
    """The :class:`harmonic.engine.TrainConfig` of parsed ``train`` arguments: the --config file or
    --preset, then the flags."""
    from harmonic.engine.config import TrainConfig  # torch and torchvision

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


def _train(args: argparse.Namespace) -> int:
    from harmonic.engine.distributed import env_int  # torch and torchvision
    from harmonic.engine.predict import evaluate  # loaded when the command runs

    # loaded when the command runs
    from harmonic.engine.training import NonFiniteLossError, torch_threads, train

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
    if env_int("RANK", 0) != 0:
        return 0
    print(f"run folder: {run_dir}")
    if args.no_eval:
        return 0
    try:
        with torch_threads(cfg.num_threads):
            metrics = evaluate(run_dir, device=cfg.device, out_dir=run_dir, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: evaluation failed: {err}", file=sys.stderr)
        return 1
    coco = metrics["coco"]
    voc = metrics.get("voc")  # the data came from PASCAL VOC: its metric beside COCO AP
    voc_text = f"  VOC mAP {voc['mAP_11point']:.4f} (11-point) {voc['mAP_area']:.4f} (area)" if voc and voc["mAP_area"] is not None else ""
    masks = f"  segm AP {metrics['coco_segm']['AP']:.4f}" if "coco_segm" in metrics else ""
    print(f"AP {coco['AP']:.4f}  AP50 {coco['AP50']:.4f}  AP75 {coco['AP75']:.4f}{masks}{voc_text}  -> {run_dir / 'metrics.json'}")
    return 0


# ----------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------
# command -> (one-line help, add its arguments, run it)
COMMANDS = {
    "verify": ("check every equation of the supplement (sympy + autograd)", _verify_arguments, _verify),
    "generate": ("write the embedded default dataset (COCO format) to a folder", _generate_arguments, _generate),
    "voc2coco": ("convert PASCAL VOC XML annotations to one COCO JSON file", _voc2coco_arguments, _voc2coco),
    "reproduce": ("execute the notebooks into results/ (what `make reproduce` runs)", _reproduce_arguments, _reproduce),
    "train": ("train a detector on a COCO-format dataset", _train_arguments, _train),
    "evaluate": ("evaluate a checkpoint: COCO AP and prediction consistency", _evaluate_arguments, _evaluate),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("command", nargs="?")
    known, _ = parser.parse_known_args(argv)
    full = argparse.ArgumentParser(
        prog="python -m harmonic",
        description="Harmonic loss and Harmonic IoU loss for object detection (Wang and Zhang, ICCV 2021).",
    )
    sub = full.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == known.command:
            add_arguments(p)
    args = full.parse_args(argv)
    if args.command is None:
        full.print_help()
        return 2
    return int(COMMANDS[args.command][2](args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
