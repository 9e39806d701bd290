"""How large, and which way, is the gradient an IoU-type term adds to RetinaNet's box regression?

The attribution controls of the default study ask whether adding an IoU-type term to L1 stalls the box
regression because of its *direction* (it disagrees with L1) or its *size* (L1 + alpha * IoU term is a
larger step on the regression head, like a larger learning rate there). This tool measures both on a
trained run's weights (and on the same detector before training: pretrained backbone, fresh heads), on
training images, with the run's own anchors, matcher and box coder:

* per positive anchor, the gradient of each term with respect to its 4 regression outputs: the norm ratio
  ``|g_term| / |g_L1|`` and the cosine between ``g_term`` and ``g_L1``;
* the share of dead ReLU channels in each layer of the two head towers (zero for every position and image);
* over the batch, the gradient of each normalized term (sum over positives / number of positives, as
  the loss) with respect to the regression head's parameters: its norm against L1's, and the norm of
  ``L1 + alpha * term`` against L1's (the factor the step on the regression head grows by).

Terms: ``alpha * L_HIoU(gamma)`` (the default study's 1.5 and 0.8 [R]), ``alpha * GIoU loss``
(torchvision's) and ``alpha * (1 - IoU)``, on the decoded boxes. The figures are ours [D].

    python tools/grad_scale.py RUN_DIR [RUN_DIR ...] [--images 64] [--out results/testbed/grad_scale.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _terms(alpha: float, gamma: float):
    from torchvision.ops import generalized_box_iou_loss

    from harmonic.losses import aligned_box_iou, hiou_from_iou

    return {
        "hiou": lambda pred, gt: alpha * hiou_from_iou(aligned_box_iou(pred, gt), gamma),
        "giou": lambda pred, gt: alpha * generalized_box_iou_loss(pred, gt, reduction="none"),
        "one_minus_iou": lambda pred, gt: alpha * (1.0 - aligned_box_iou(pred, gt)),
    }


def _matched(model, images, targets) -> dict[str, Any]:
    """The batch through the transform and the (frozen-graph) backbone once, with each image's positive
    anchors as training matches them: ``{"features", "rows" (per image: positive anchor indices or None),
    "encoded" [P, 4], "anchors" [P, 4], "gt" [P, 4]}``."""
    from torchvision.ops import box_iou

    batch, targets = model.transform(images, targets)
    with torch.no_grad():
        features = list(model.backbone(batch.tensors).values())
        anchors = model.anchor_generator(batch, features)
    rows, encoded, anchor_rows, gts = [], [], [], []
    for i, target in enumerate(targets):
        if target["boxes"].numel() == 0:
            rows.append(None)
            continue
        matched = model.proposal_matcher(box_iou(target["boxes"], anchors[i]))
        pos = torch.where(matched >= 0)[0]
        gt = target["boxes"][matched[pos]]
        rows.append(pos)
        encoded.append(model.box_coder.encode_single(gt, anchors[i][pos]))
        anchor_rows.append(anchors[i][pos])
        gts.append(gt)
    return {"features": features, "rows": rows, "encoded": torch.cat(encoded), "anchors": torch.cat(anchor_rows),
            "gt": torch.cat(gts)}


def _regression(model, matched: dict[str, Any]) -> torch.Tensor:
    """The regression head's outputs of the positives, [P, 4] float32, in the graph of the head's parameters."""
    out = model.head.regression_head(matched["features"])
    return torch.cat([out[i][pos].float() for i, pos in enumerate(matched["rows"]) if pos is not None])


def measure(model, images, targets, *, alpha: float, gamma: float) -> dict[str, Any]:
    """The per-positive and per-parameter gradient comparisons of one batch (see the module docstring)."""
    from harmonic.losses import aligned_box_iou

    model.eval()
    params = [p for p in model.head.regression_head.parameters() if p.requires_grad]
    matched = _matched(model, images, targets)
    encoded, anchors, gt = matched["encoded"], matched["anchors"], matched["gt"]
    reg = _regression(model, matched)
    count = reg.shape[0]
    decode = model.box_coder.decode_single
    out: dict[str, Any] = {"num_positives": count}
    with torch.no_grad():
        out["mean_iou"] = float(aligned_box_iou(decode(reg, anchors), gt).mean())

    def anchor_grad(loss_of) -> torch.Tensor:
        """d(sum of the per-anchor losses) / d(regression outputs), [P, 4]."""
        leaf = reg.detach().requires_grad_()
        (grad,) = torch.autograd.grad(loss_of(leaf).sum(), leaf)
        return grad

    def param_grad(loss_of) -> torch.Tensor:
        """d(sum over positives / P) / d(regression head parameters), flattened: the head alone again."""
        loss = loss_of(_regression(model, matched)).sum() / max(1, count)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    l1 = lambda r: (r - encoded).abs().sum(1)  # noqa: E731 - torchvision RetinaNet's L1 on encoded offsets
    g_l1 = anchor_grad(l1)
    p_l1 = param_grad(l1)
    out["terms"] = {}
    for name, term in _terms(alpha, gamma).items():
        loss_of = lambda r, term=term: term(decode(r, anchors), gt)  # noqa: E731
        g_term = anchor_grad(loss_of)
        ratio = (g_term.norm(dim=1) / g_l1.norm(dim=1).clamp_min(1e-12)).tolist()
        cosine = torch.nn.functional.cosine_similarity(g_term, g_l1, dim=1, eps=1e-12)
        p_term = param_grad(loss_of)
        quantiles = statistics.quantiles(ratio, n=10) if len(ratio) > 1 else ratio * 9
        out["terms"][name] = {
            "anchor_norm_ratio_p10": quantiles[0], "anchor_norm_ratio_median": statistics.median(ratio),
            "anchor_norm_ratio_p90": quantiles[-1],
            "anchor_cosine_mean": float(cosine.mean()), "anchor_cosine_negative_share": float((cosine < 0).float().mean()),
            "head_norm_ratio": float(p_term.norm() / p_l1.norm()),
            "head_cosine": float(torch.nn.functional.cosine_similarity(p_term, p_l1, dim=0)),
            "head_step_growth": float((p_l1 + p_term).norm() / p_l1.norm()),
        }
    return out


def dead_channels(model, images, targets) -> dict[str, list[float]]:
    """Per conv layer of the two head towers (each conv + ReLU), the share of its channels that are zero at
    every position of every FPN level of every image: ReLU units that no longer pass a gradient ("dead").
    A regression tower whose units died predicts the same offsets everywhere, the anchors' own boxes."""
    model.eval()
    towers = {"regression": model.head.regression_head.conv, "classification": model.head.classification_head.conv}
    peaks: dict[str, list[torch.Tensor | None]] = {name: [None] * len(tower) for name, tower in towers.items()}
    handles = []
    for name, tower in towers.items():
        for index, layer in enumerate(tower):
            def hook(_module, _inputs, output, name=name, index=index):
                peak = output.detach().float().amax(dim=(0, 2, 3))
                previous = peaks[name][index]
                peaks[name][index] = peak if previous is None else torch.maximum(previous, peak)
            handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            batch, _ = model.transform(images, targets)
            model.head(list(model.backbone(batch.tensors).values()))
    finally:
        for handle in handles:
            handle.remove()
    return {name: [float((peak <= 0).float().mean()) for peak in layers] for name, layers in peaks.items()}


def _batch(dataset, count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(dataset), generator=generator)[:count].tolist()
    items = [dataset[i] for i in rows]
    return [img for img, _ in items], [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in items]


def run_measurement(run_dir: Path, images: int, seed: int, *, dead_only: bool = False) -> dict[str, Any]:
    """The record of one run folder: both measurements before and after training, or with ``dead_only`` the
    trained model's dead channels and positives' IoU alone."""
    from harmonic.data import build_dataset
    from harmonic.engine.checkpoints import load_checkpoint, load_model
    from harmonic.models import DetectorConfig, build_detector

    ckpt = load_checkpoint(run_dir)
    detector = ckpt["detector"]
    alpha = float(detector.get("hiou_weight", 1.5))
    gamma = float(detector.get("hiou_gamma", 0.8))
    dataset = build_dataset(ckpt["config"]["dataset"], "train", ckpt["config"].get("image_dir"), train=False)
    imgs, targets = _batch(dataset, images, seed)
    trained, _ = load_model(ckpt)
    record = {"run": run_dir.name, "iteration": ckpt.get("iteration"), "alpha": alpha, "gamma": gamma, "images": images}
    if dead_only:
        from testbed import positive_iou  # tools/testbed.py, beside this script

        measured = positive_iou(trained, list(zip(imgs, targets)))
        record["after_training"] = {"num_positives": measured["num_positives"], "mean_iou": measured["pos_iou"],
                                    "dead_channels": dead_channels(trained, imgs, targets)}
        return record
    torch.manual_seed(int(ckpt["config"].get("seed", 0)))
    fresh = build_detector(DetectorConfig.from_dict(detector))
    for when, model in (("before_training", fresh), ("after_training", trained)):
        record[when] = measure(model, imgs, targets, alpha=alpha, gamma=gamma)
        record[when]["dead_channels"] = dead_channels(model, imgs, targets)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with checkpoints/final.pt")
    parser.add_argument("--images", type=int, default=64, help="training images in the batch (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="which images (default 0)")
    parser.add_argument("--dead-only", action="store_true",
                        help="only the trained model's dead head channels and positives' IoU (no gradients)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "testbed" / "grad_scale.json")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}")
    torch.set_num_threads(1)
    from harmonic.utils.files import atomic_write_json
    from harmonic.utils.provenance import provenance

    records = [run_measurement(run, args.images, args.seed, dead_only=args.dead_only) for run in args.runs]
    atomic_write_json(args.out, {"provenance": provenance(), "tag": "[D]", "runs": records})
    for record in records:
        for when in ("before_training", "after_training"):
            if when not in record:
                continue
            m = record[when]
            dead = m["dead_channels"]
            print(f"{record['run']} {when}: {m['num_positives']} positives, mean IoU {m['mean_iou']:.3f}, dead channels "
                  f"regression {[round(x, 2) for x in dead['regression']]} classification "
                  f"{[round(x, 2) for x in dead['classification']]}")
            for name, t in m.get("terms", {}).items():
                print(f"  {name:14s} anchor |g|/|g_L1| median {t['anchor_norm_ratio_median']:.2f}  cos {t['anchor_cosine_mean']:+.2f}"
                      f"  head |g|/|g_L1| {t['head_norm_ratio']:.2f}  cos {t['head_cosine']:+.2f}  step x{t['head_step_growth']:.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
