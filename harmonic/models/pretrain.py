"""A backbone pretrained by the project on generated shapes: the stand-in for an ImageNet backbone.

The paper's detectors start from ImageNet-pretrained backbones [R]; a CPU study cannot download or train
on ImageNet, and a ResNet trained from scratch for a few thousand detection iterations stays far below
the paper's regime. This module trains the backbone's classification network (torchvision's ResNet-18
or ResNet-50, the same modules and ``state_dict`` keys the detector's backbone loads) once, for a few
minutes, to classify object crops of the shapes generator into the five shape categories plus a
sixth, "background" (crops of clutter with no object in them) [D].

The crops come from images rendered with a generator seed of their own (:attr:`PretrainParams.data_seed`,
1000 by default), never from the detection datasets' images (seed 0), so no validation image is seen.
Crops are squares around an object's box, enlarged 1.1-1.6x and shifted at random, resized to
``crop_size`` pixels, normalized with the ImageNet mean and standard deviation as the detector's
transform does. Training: SGD with momentum, a linear warmup and a cosine decay, bfloat16 autocast on the
CPU; a tenth of the crops is held out and the accuracy on it is written beside the weights.

The weights are cached under the data root (``$HARMONIC_DATA`` or ``data/``), in ``pretrained/``, named by
the backbone and a hash of every parameter (:func:`cache_key`); :func:`ensure_pretrained_backbone` builds
the file on first use (under a lock, so parallel runs build it once) and reuses it afterwards.
``DetectorConfig.pretrained_backbone = "shapes"`` resolves to that file with the default parameters.

Command line: ``python -m harmonic.models.pretrain`` builds (or finds) the default file and prints its path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import models as tv_models

from harmonic.data.shapes import CATEGORIES, PRESETS, ShapesParams, default_data_root, render_shapes_image
from harmonic.models.config import SHAPES_BACKBONES
from harmonic.utils.devices import native_bf16
from harmonic.utils.files import atomic_write_json, exclusive_lock

__all__ = ["PRETRAIN_VERSION", "SHAPES_BACKBONES", "PretrainParams", "build_crops", "cache_key", "cache_path", "ensure_pretrained_backbone",
           "pretrain_backbone"]

PRETRAIN_VERSION = 1
#: detection backbone name -> torchvision classification builder
_BUILDERS = {"resnet18_fpn": "resnet18", "resnet50_fpn": "resnet50"}
assert tuple(_BUILDERS) == SHAPES_BACKBONES
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
BACKGROUND = len(CATEGORIES)  # label of the "no object" crops


@dataclasses.dataclass(frozen=True)
class PretrainParams:
    """What the pretrained file is a function of (all of it goes into :func:`cache_key`)."""

    backbone: str = "resnet18_fpn"
    data: str = "shapes"  # the shapes preset whose generator renders the crops' images
    data_seed: int = 1000  # generator seed of the pretraining images (the detection data uses 0)
    num_images: int = 2500
    crop_size: int = 64
    min_visible: float = 0.0  # objects less visible than this (occluded) give no crop
    steps: int = 500
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 1e-4
    warmup: int = 50
    seed: int = 0

    def validate(self) -> PretrainParams:
        if self.backbone not in _BUILDERS:
            raise ValueError(f"PretrainParams.backbone must be one of {sorted(_BUILDERS)}, got {self.backbone!r}")
        if self.data not in PRESETS:
            raise ValueError(f"PretrainParams.data must be a shapes preset ({sorted(PRESETS)}), got {self.data!r}")
        for name, low in (("data_seed", 0), ("num_images", 1), ("crop_size", 16), ("steps", 1), ("batch_size", 2),
                          ("warmup", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"PretrainParams.{name} must be an integer >= {low}, got {value!r}")
        if not 0.0 <= self.min_visible <= 1.0:
            raise ValueError(f"PretrainParams.min_visible must be in [0, 1], got {self.min_visible!r}")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError(f"PretrainParams: lr must be > 0 and weight_decay >= 0, got {self.lr!r}, {self.weight_decay!r}")
        return self


def pretrain_autocast() -> torch.dtype | None:
    """The autocast dtype of the pretraining on the CPU: bfloat16 where the CPU computes it natively
    (AVX-512 BF16 or AMX; :func:`harmonic.utils.devices.native_bf16`), else None (float32). Emulated
    bfloat16 on other CPUs is several times slower than float32."""
    return torch.bfloat16 if native_bf16(torch.device("cpu")) else None


def cache_key(params: PretrainParams) -> str:
    """A hash of the parameters, the shapes generator's own parameters, this module's version and the
    precision the weights are trained in on this machine (:func:`pretrain_autocast`): a cache built in
    bfloat16 is not taken for a float32 one."""
    shapes = dataclasses.asdict(PRESETS[params.data])
    key = {"version": PRETRAIN_VERSION, "params": dataclasses.asdict(params), "shapes": shapes}
    if pretrain_autocast() is None:
        key["precision"] = "float32"  # absent for bfloat16, the precision the earlier caches were built in
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_path(params: PretrainParams, root: str | os.PathLike | None = None) -> Path:
    """``<root>/pretrained/<backbone>-shapes-<first 16 hex digits of the key>.pt`` (root: the data root)."""
    root = Path(root) if root is not None else default_data_root()
    return root / "pretrained" / f"{params.backbone}-shapes-{cache_key(params)[:16]}.pt"


def _square_crop(image: np.ndarray, center: tuple[float, float], side: float, size: int) -> np.ndarray:
    """A ``side``-pixel square around ``center``, moved inside the image where it crosses an edge, resized to ``size``."""
    pil = Image.fromarray(image)
    w, h = pil.size
    # clamp the square into the image (PIL would pad with black outside it): the object stays inside, the
    # square only moves
    side = min(side, w, h)
    x0 = min(max(center[0] - side / 2.0, 0.0), w - side)
    y0 = min(max(center[1] - side / 2.0, 0.0), h - side)
    box = (x0, y0, x0 + side, y0 + side)
    return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)


def build_crops(params: PretrainParams) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 crops [N, 3, S, S], labels [N])``: one crop per object (labels 0..4) and one background crop
    per image (label 5, a square whose IoU with every object box is below 0.1, when one is found)."""
    shapes: ShapesParams = PRESETS[params.data]
    crops, labels = [], []
    for index in range(params.num_images):
        rng = np.random.default_rng([params.data_seed, 7, index])
        image, objects = render_shapes_image(rng, shapes)
        size = image.shape[0]
        boxes = []
        for obj in objects:
            x, y, w, h = obj["box"]
            boxes.append((x, y, x + w, y + h))
            if obj["visible_fraction"] < params.min_visible:
                continue
            side = max(w, h) * rng.uniform(1.1, 1.6)
            shift = rng.uniform(-0.1, 0.1, 2) * side
            crops.append(_square_crop(image, (x + w / 2 + shift[0], y + h / 2 + shift[1]), side, params.crop_size))
            labels.append(obj["category"])
        for _try in range(10):
            side = rng.uniform(0.1, 0.5) * size
            cx, cy = rng.uniform(side / 2, size - side / 2, 2)
            cand = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
            if all(_iou(cand, b) < 0.1 for b in boxes):
                crops.append(_square_crop(image, (cx, cy), side, params.crop_size))
                labels.append(BACKGROUND)
                break
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels, dtype=torch.long)


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _normalize(crops: torch.Tensor) -> torch.Tensor:
    return (crops.float() / 255.0 - _MEAN) / _STD


def pretrain_backbone(params: PretrainParams, *, log=None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the classification network; ``(state_dict without the fc layer, summary)``. Deterministic for
    given parameters on one machine; the global torch RNG is left as it was."""
    params.validate()
    start = time.perf_counter()
    crops, labels = build_crops(params)
    gen = torch.Generator().manual_seed(params.seed)
    order = torch.randperm(len(labels), generator=gen)
    n_val = max(1, len(labels) // 10)
    val_idx, train_idx = order[:n_val], order[n_val:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        net = getattr(tv_models, _BUILDERS[params.backbone])(weights=None, num_classes=BACKGROUND + 1)
    autocast = pretrain_autocast()
    layout = torch.channels_last if autocast is not None else torch.contiguous_format
    net = net.to(memory_format=layout)
    optimizer = torch.optim.SGD(net.parameters(), lr=params.lr, momentum=0.9, weight_decay=params.weight_decay)
    net.train()
    losses = []
    for step in range(params.steps):
        if step < params.warmup:
            lr = params.lr * (0.1 + 0.9 * step / params.warmup)
        else:
            lr = 0.5 * params.lr * (1.0 + math.cos(math.pi * (step - params.warmup) / max(1, params.steps - params.warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = train_idx[torch.randint(len(train_idx), (params.batch_size,), generator=gen)]
        x = _normalize(crops[batch])
        flip = torch.rand(len(batch), generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        x = x.contiguous(memory_format=layout)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % 100 == 0:
            log(f"pretrain step {step + 1}/{params.steps}: loss {np.mean(losses[-100:]):.3f}")
    net.eval()
    correct = 0
    with torch.no_grad():
        for chunk in val_idx.split(256):
            x = _normalize(crops[chunk]).contiguous(memory_format=layout)
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                correct += int((net(x).argmax(1) == labels[chunk]).sum())
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items() if not k.startswith("fc.")}
    summary = {
        "params": dataclasses.asdict(params), "key": cache_key(params), "num_crops": len(labels),
        "num_val": n_val, "val_accuracy": correct / n_val, "final_loss": float(np.mean(losses[-50:])),
        "seconds": round(time.perf_counter() - start, 1), "torch_threads": torch.get_num_threads(),
        "autocast": "bfloat16" if autocast is not None else "float32",
        "classes": list(CATEGORIES) + ["background"],
    }
    return state, summary


def ensure_pretrained_backbone(
    params: PretrainParams | str | None = None, root: str | os.PathLike | None = None, *, log=print
) -> Path:
    """The cached weights file of ``params`` (default :class:`PretrainParams`; a backbone name gives that
    backbone with the other defaults): reused when present, trained and written (atomically, with a
    ``.json`` summary beside it) otherwise."""
    if params is None:
        params = PretrainParams()
    elif isinstance(params, str):
        params = PretrainParams(backbone=params)
    params.validate()
    path = cache_path(params, root)
    if path.is_file():
        return path
    with exclusive_lock(path):
        if path.is_file():  # another process built it meanwhile
            return path
        if log is not None:
            log(f"pretraining the {params.backbone} backbone on shapes crops into {path} (once)")
        # every core: the processes that need this file wait for it (their training has not started yet)
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads, os.cpu_count() or 1))
        try:
            state, summary = pretrain_backbone(params, log=log)
        finally:
            torch.set_num_threads(threads)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(state, tmp)
        atomic_write_json(path.with_suffix(".json"), summary)
        os.replace(tmp, path)
    return path


if __name__ == "__main__":
    print(ensure_pretrained_backbone())
