"""Tiny detector configurations, one fixed two-image batch and a gradient check, shared by the model
tests (CPU, seconds).

Imported by the test modules as ``tiny_detectors`` (pytest puts ``tests/`` on ``sys.path``; it is not a
test module itself; ``conftest.py`` registers it for pytest's assertion rewriting).
"""

from __future__ import annotations

import torch
from torch import nn

from harmonic.models import DetectorConfig

K = 3


def tiny(arch: str, **overrides) -> DetectorConfig:
    """A ResNet-18 FPN detector of ``arch`` with K classes on 64-96 pixel images; ``overrides`` win."""
    settings = dict(
        arch=arch, num_classes=K, backbone="resnet18_fpn", min_size=64, max_size=96, fpn_channels=32,
        anchor_sizes=None if arch == "ssd" else "auto",
    )
    settings.update(overrides)
    return DetectorConfig(**settings)


def batch(empty: tuple[int, ...] = ()):
    """Two images (64x80, 72x64) with three boxes; the images numbered in ``empty`` get no boxes."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = [
        {
            "boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0], [30.0, 20.0, 62.0, 60.0]]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.tensor([[10.0, 10.0, 34.0, 44.0]]), "labels": torch.tensor([2])},
    ]
    for i in empty:
        targets[i] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    return images, targets


def with_masks(targets):
    """``targets`` with ``masks`` (uint8 [N, H, W]): each box's lower-left triangle, on images of
    :func:`batch`'s sizes (64x80, 72x64)."""
    sizes = [(64, 80), (72, 64)]
    out = []
    for target, (height, width) in zip(targets, sizes):
        masks = torch.zeros(len(target["boxes"]), height, width, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, target["boxes"].long().tolist()):
            mask[y1:y2, x1:x2] = torch.ones(y2 - y1, x2 - x1, dtype=torch.uint8).tril(diagonal=(x2 - x1) - (y2 - y1))
        out.append({**target, "masks": masks})
    return out


def assert_finite_losses_and_gradients(model: nn.Module, losses: dict[str, torch.Tensor]) -> None:
    """Every loss is finite and, after ``backward`` of their sum, every trainable parameter has a finite
    gradient."""
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, name
            assert torch.isfinite(parameter.grad).all(), name


def assert_cuda_matches_cpu(model: nn.Module, images, targets, train_losses, *, compare: bool = True) -> None:
    """``model``'s training losses on CUDA against the CPU's (``compare``: two-stage detectors sample RoIs
    at random, differently per device), finite under float16 autocast with a backward pass, and eval
    outputs on CUDA with pre-NMS candidates. ``train_losses(model, images, targets)`` computes the losses."""
    from harmonic.models import set_record_candidates

    cpu = train_losses(model, images, targets)
    model.cuda()
    images_gpu = [i.cuda() for i in images]
    targets_gpu = [{k: v.cuda() for k, v in t.items()} for t in targets]
    gpu = train_losses(model, images_gpu, targets_gpu)
    if compare:
        for key in cpu:
            torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.float16):
        amp = train_losses(model, images_gpu, targets_gpu)
    assert all(torch.isfinite(v) for v in amp.values())
    sum(amp.values()).backward()
    model.eval()
    set_record_candidates(model, True)
    with torch.no_grad():
        out = model(images_gpu)
    assert out[0]["boxes"].device.type == "cuda" and "candidate_boxes" in out[0]

