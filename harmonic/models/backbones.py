"""Backbones and default anchors, assembled from torchvision's public building blocks.

The ResNet-FPN layouts are torchvision's own (RetinaNet / FCOS: C3-C5 + P6P7 from P5, strides 8-128;
Faster / Mask R-CNN: C2-C5 + max-pool level, strides 4-64) with a configurable FPN width. Departures, [D]:

* ``mobilenet_v3_fpn`` takes the stride-8, -16 and -32 stages of MobileNetV3-Large, so that it has the same
  strides as the ResNet-FPN layouts and the same default anchors apply (torchvision's own MobileNet FPN
  uses two stride-32 outputs with five anchor sizes per level).
* SSD on an FPN backbone (the small SSD option) puts SSD default boxes on the RetinaNet-style levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv_models
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.ssd import SSDFeatureExtractorVGG
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from harmonic.models.config import TWO_STAGE_ARCHS, DetectorConfig

__all__ = ["build_backbone", "default_anchor_sizes", "group_norm", "level_strides"]

_IMAGENET_WEIGHTS = {
    "resnet50_fpn": ("resnet50", "ResNet50_Weights", "IMAGENET1K_V1"),
    "resnet18_fpn": ("resnet18", "ResNet18_Weights", "IMAGENET1K_V1"),
    "mobilenet_v3_fpn": ("mobilenet_v3_large", "MobileNet_V3_Large_Weights", "IMAGENET1K_V1"),
    "vgg16": ("vgg16", "VGG16_Weights", "IMAGENET1K_FEATURES"),
}
# MobileNetV3-Large stage indices (torchvision's "C_n" blocks) taken as FPN inputs: strides 8, 16, 32
_MOBILENET_STAGES = (2, 3, 5)


def group_norm(num_channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with ``gcd(32, C)`` groups, so any channel count works (32 groups when C % 32 == 0)."""
    return nn.GroupNorm(math.gcd(max_groups, num_channels), num_channels)


def _norm_layer(norm: str | None) -> Callable[..., nn.Module] | None:
    return {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "gn": group_norm, None: None}[norm]


def _classification_network(cfg: DetectorConfig) -> nn.Module:
    """The torchvision classification network of the backbone, with the requested weights loaded."""
    backbone = cfg.resolved("backbone")
    builder_name, weights_enum, weights_name = _IMAGENET_WEIGHTS[backbone]
    builder = getattr(tv_models, builder_name)
    weights = getattr(getattr(tv_models, weights_enum), weights_name) if cfg.pretrained_backbone == "imagenet" else None
    norm_layer = _norm_layer(cfg.resolved("norm"))
    net = builder(weights=weights) if backbone == "vgg16" else builder(weights=weights, norm_layer=norm_layer)
    if cfg.pretrained_backbone not in (None, "imagenet"):
        _load_local_state_dict(net, Path(cfg.pretrained_backbone), backbone)
    return net


def _load_local_state_dict(net: nn.Module, path: Path, backbone: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_backbone: no state_dict file at {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file gets the same clear message
        raise ValueError(f"pretrained_backbone: {str(path)!r} is not a readable torch state_dict file ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained_backbone: {str(path)!r} must hold a state_dict (a dict of tensors)")
    missing, unexpected = net.load_state_dict(state, strict=False)
    head_prefixes = ("fc.", "classifier.")  # the classification head is not part of a detection backbone
    missing = [k for k in missing if not k.startswith(head_prefixes)]
    if missing or unexpected:
        raise ValueError(
            f"pretrained_backbone: {str(path)!r} does not match torchvision's {backbone} network: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def _freeze_resnet(net: nn.Module, trainable_layers: int) -> None:
    """torchvision's rule: the last ``trainable_layers`` of (conv1, layer1, ..., layer4) train."""
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, parameter in net.named_parameters():
        if not any(name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)


def _freeze_stages(features: nn.Sequential, stage_indices: list[int], trainable_layers: int) -> None:
    """torchvision's rule for MobileNet / VGG feature stacks: freeze everything before the last stages."""
    num_stages = len(stage_indices)
    freeze_before = len(features) if trainable_layers == 0 else stage_indices[num_stages - trainable_layers]
    for block in features[:freeze_before]:
        for parameter in block.parameters():
            parameter.requires_grad_(False)


def _extra_blocks(arch: str, channels: int) -> nn.Module:
    return LastLevelMaxPool() if arch in TWO_STAGE_ARCHS else LastLevelP6P7(channels, channels)


def build_backbone(cfg: DetectorConfig) -> nn.Module:
    """The feature extractor of ``cfg``: a ``BackboneWithFPN`` (``out_channels = fpn_channels``), or
    torchvision's SSD300 VGG16 extractor for ``backbone="vgg16"``."""
    backbone = cfg.resolved("backbone")
    trainable = cfg.resolved("trainable_backbone_layers")
    net = _classification_network(cfg)
    if backbone == "vgg16":
        features = net.features
        stage_indices = [0] + [i for i, b in enumerate(features) if isinstance(b, nn.MaxPool2d)][:-1]
        _freeze_stages(features, stage_indices, trainable)
        return SSDFeatureExtractorVGG(features, highres=False)
    if backbone.startswith("resnet"):
        _freeze_resnet(net, trainable)
        returned = [1, 2, 3, 4] if cfg.arch in TWO_STAGE_ARCHS else [2, 3, 4]
        stage2_channels = net.inplanes // 8
        in_channels = [stage2_channels * 2 ** (i - 1) for i in returned]
        return_layers = {f"layer{k}": str(v) for v, k in enumerate(returned)}
        return BackboneWithFPN(net, return_layers, in_channels, cfg.fpn_channels, extra_blocks=_extra_blocks(cfg.arch, cfg.fpn_channels))
    features = net.features
    stage_indices = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    _freeze_stages(features, stage_indices, trainable)
    return_layers = {str(stage_indices[k]): str(v) for v, k in enumerate(_MOBILENET_STAGES)}
    in_channels = [features[stage_indices[k]].out_channels for k in _MOBILENET_STAGES]
    return BackboneWithFPN(features, return_layers, in_channels, cfg.fpn_channels, extra_blocks=_extra_blocks(cfg.arch, cfg.fpn_channels))


def level_strides(cfg: DetectorConfig) -> list[int]:
    """Strides of the feature levels that :func:`build_backbone` returns (FPN backbones)."""
    backbone = cfg.resolved("backbone")
    if backbone == "vgg16":
        return [8, 16, 32, 64, 100, 300]
    if cfg.arch in TWO_STAGE_ARCHS:
        return [4, 8, 16, 32, 64] if backbone.startswith("resnet") else [8, 16, 32, 64]
    return [8, 16, 32, 64, 128]


def default_anchor_sizes(cfg: DetectorConfig) -> tuple[tuple[float, ...], ...]:
    """Anchor sizes per level: ``cfg.anchor_sizes`` if given, else torchvision's, scaled for ``"auto"``.

    torchvision's defaults: RetinaNet ``(x, x 2^(1/3), x 2^(2/3))`` for x = 32 ... 512 (truncated to int as
    torchvision does); Faster / Mask R-CNN ``(32,) ... (512,)``, one per level; FCOS the level strides. ``"auto"``
    multiplies RetinaNet / Faster / Mask R-CNN sizes by ``min_size / 800`` [D]; FCOS points stay stride-sized.
    """
    if isinstance(cfg.anchor_sizes, tuple):
        return cfg.anchor_sizes
    strides = level_strides(cfg)
    if cfg.arch == "fcos":
        return tuple((float(s),) for s in strides)
    if cfg.arch == "retinanet":
        bases = [32 * 2**i for i in range(len(strides))]
        sizes = [(x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in bases]
    elif cfg.arch in TWO_STAGE_ARCHS:
        sizes = [(32 * 2**i,) for i in range(len(strides))]
    else:
        raise ValueError(f"default_anchor_sizes does not apply to arch {cfg.arch!r}")
    scale = cfg.resolved("min_size") / 800.0 if cfg.anchor_sizes == "auto" else 1.0
    return tuple(tuple(round(float(s) * scale, 3) for s in level) for level in sizes)


def fcos_head_norm(channels: int) -> Callable[[int], nn.Module]:
    """Norm for FCOS head convs: torchvision's GroupNorm(32) when possible, gcd groups otherwise."""
    return partial(nn.GroupNorm, math.gcd(32, channels))
