"""Test-bed measurements: short RetinaNet runs over the levers of the study's difficulty and budget.

One run = a shapes dataset (generator parameters given as JSON, cached under the data root by their hash),
a detector (the ``shapes-cpu`` preset with overrides), a schedule (iterations, lr; the preset's step
decays scaled to the length), a seed. It trains one process with one thread, evaluates COCO AP on the
dataset's validation split, and measures what the log does not hold for the baseline loss:

* ``pos_iou``: the mean IoU of the positives' decoded boxes with their targets (anchors matched as in
  training, IoU >= 0.5 or the best anchor of each object), on the validation images, model in eval mode;
* ``share_above_05``: the share of matched detections (the consistency metric's matching) scoring > 0.5.

Every run writes a small JSON record to ``results/testbed/runs/<name>.json``; ``frontier`` collects them
into ``results/testbed/frontier.json``. Checkpoints and detections stay under ``data/testbed-runs/``.

    python tools/testbed.py run NAME [--data JSON] [--detector JSON] [--train JSON] [--iters N] [--lr X] [--seed S]
    python tools/testbed.py frontier
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "results" / "testbed" / "runs"


def dataset_folder(data: dict[str, Any], root: Path | None = None) -> Path:
    """The cached dataset of generator overrides ``data`` (over the ``shapes`` preset): ``data/testbed/<hash>``."""
    from harmonic.data.shapes import PRESETS, ShapesParams, default_data_root, ensure_dataset

    params = ShapesParams(**{**dataclasses.asdict(PRESETS["shapes"]), **data}).validate()
    key = hashlib.sha256(json.dumps(dataclasses.asdict(params), sort_keys=True).encode()).hexdigest()[:12]
    folder = (root or default_data_root()) / "testbed" / f"shapes-{key}"
    ensure_dataset(folder, params, 0)
    return folder


def scaled_schedule(iters: int) -> dict[str, Any]:
    """The ``shapes-cpu`` schedule (warmup 200, decays at 77% and 93%) at another length."""
    return {"max_iters": iters, "warmup_iters": min(200, iters // 5), "lr_steps": [round(0.767 * iters), round(0.933 * iters)]}


def positive_iou(model, dataset, batch_size: int = 8) -> dict[str, float]:
    """Mean IoU of the decoded boxes of the positive anchors with their matched objects (eval mode)."""
    import torch
    from torchvision.ops import box_iou

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            images = [img for img, _ in items]
            targets = [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in items]
            batch, targets = model.transform(images, targets)
            features = list(model.backbone(batch.tensors).values())
            head = model.head(features)
            anchors = model.anchor_generator(batch, features)
            for i, target in enumerate(targets):
                if target["boxes"].numel() == 0:
                    continue
                matched = model.proposal_matcher(box_iou(target["boxes"], anchors[i]))
                pos = torch.where(matched >= 0)[0]
                pred = model.box_coder.decode_single(head["bbox_regression"][i][pos].float(), anchors[i][pos])
                gt = target["boxes"][matched[pos]]
                ious = box_iou(pred, gt).diagonal()
                total += float(ious.sum())
                count += int(pos.numel())
    return {"pos_iou": total / max(1, count), "num_positives": count}


def portable_backbone(value: str | None) -> str | None:
    """A pretrained-backbone setting as a result file records it: a named source ("imagenet", "shapes")
    as it is, a weights file by its name under the data root, never this machine's absolute path."""
    if value is None or "/" not in value:
        return value
    return f"<data root>/pretrained/{Path(value).name}"


def run(name: str, data: dict, detector: dict, train: dict, iters: int, lr: float, seed: int) -> dict[str, Any]:
    import torch

    from harmonic.data import build_dataset
    from harmonic.engine import TrainConfig
    from harmonic.engine.checkpoints import load_model
    from harmonic.engine.predict import evaluate
    from harmonic.engine.training import train as train_run
    from harmonic.utils.files import atomic_write_json
    from harmonic.utils.runlog import read_log

    torch.set_num_threads(1)
    folder = dataset_folder(data)
    run_dir = ROOT / "data" / "testbed-runs" / name
    changes = {"dataset": str(folder), "output_dir": str(run_dir), "seed": seed, "lr": lr, "amp": "bf16",
               "channels_last": True, "num_threads": 1, "resume": True, "checkpoint_every": 10**6,
               "log_every": 500, **scaled_schedule(iters), **train}
    if detector:
        changes["detector"] = detector
    cfg = TrainConfig.preset("shapes-cpu", **changes)
    start = time.perf_counter()
    train_run(cfg, progress=False)
    train_minutes = (time.perf_counter() - start) / 60
    metrics = evaluate(run_dir, out_dir=run_dir, device="cpu", progress=False)
    model, _ = load_model(run_dir / "checkpoints" / "final.pt")
    val = build_dataset(str(folder), "val", train=False)
    piou = positive_iou(model, val)
    scores = json.loads((run_dir / "score_iou.json").read_text())["scores"]
    log = read_log(run_dir)  # log.jsonl.gz once the run is finished
    record = {
        "name": name, "data": data,
        "detector": {k: portable_backbone(v) if k == "pretrained_backbone" else v for k, v in detector.items()},
        "train": train, "iters": iters, "lr": lr, "seed": seed,
        "batch_size": cfg.batch_size, "min_size": cfg.detector.get("min_size"),
        "pretrained_backbone": portable_backbone(cfg.detector.get("pretrained_backbone")),
        "train_minutes": round(train_minutes, 2),
        "sec_per_iter": round(sum(r["time"] for r in log) / len(log), 4),
        "AP": round(100 * metrics["coco"]["AP"], 2), "AP50": round(100 * metrics["coco"]["AP50"], 2),
        "AP75": round(100 * metrics["coco"]["AP75"], 2),
        "pos_iou": round(piou["pos_iou"], 4), "num_positives_val": piou["num_positives"],
        "n_matched": len(scores), "n_matched_above_05": sum(s > 0.5 for s in scores),
        "share_above_05": round(sum(s > 0.5 for s in scores) / max(1, len(scores)), 4),
        "n_objects": metrics["consistency"]["n_objects"],
        "spearman": metrics["consistency"]["spearman"],
        "final_loss": round(sum(r["loss"] for r in log[-100:]) / min(100, len(log)), 4),
    }
    atomic_write_json(RECORDS / f"{name}.json", record)
    print(json.dumps(record), flush=True)
    return record


def frontier() -> Path:
    from harmonic.utils.files import atomic_write_json

    records = [json.loads(p.read_text()) for p in sorted(RECORDS.glob("*.json"))]
    path = ROOT / "results" / "testbed" / "frontier.json"
    atomic_write_json(path, {"note": "every test-bed run [D]: 1 torch thread, bf16, channels_last, 2-core CPU shared "
                                     "with one other run", "runs": records})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("name")
    r.add_argument("--data", default="{}")
    r.add_argument("--detector", default="{}")
    r.add_argument("--train", default="{}")
    r.add_argument("--iters", type=int, default=1200)
    r.add_argument("--lr", type=float, default=0.02)
    r.add_argument("--seed", type=int, default=0)
    sub.add_parser("frontier")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.name, json.loads(args.data), json.loads(args.detector), json.loads(args.train), args.iters, args.lr,
            args.seed)
    else:
        print(frontier())
    return 0


if __name__ == "__main__":
    sys.exit(main())
