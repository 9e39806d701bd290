"""Backbones and default anchors, assembled from torchvision's public building blocks.

The ResNet-FPN layouts are torchvision's own (RetinaNet / FCOS: C3-C5 + P6P7 from P5, strides 8-128;
Faster / Mask R-CNN: C2-C5 + max-pool level, strides 4-64) with a configurable FPN width. Departures, [D]:

* ``mobilenet_v3_fpn`` takes the stride-8, -16 and -32 stages of MobileNetV3-Large, so that it has the same
  strides as the ResNet-FPN layouts and the same default anchors apply (torchvision's own MobileNet FPN
  uses two stride-32 outputs with five anchor sizes per level).
* SSD on an FPN backbone (the small SSD option) puts SSD default boxes on the RetinaNet-style levels.
* RefineDet on an FPN backbone takes the stride 8-32 levels plus a max-pooled stride-64 level (the
  Faster R-CNN extra block) as its four source layers, the strides of RefineDet512's.

RefineDet's VGG16 (:class:`RefineDetVGG16`) follows Zhang et al., "Single-Shot Refinement Neural Network
for Object Detection" (CVPR 2018), Sec. 3 [R]: conv4_3 and conv5_3 (each with an L2Norm layer), fc6/fc7 as
convolutions (conv6/conv7) after pool5, and the extra conv6_1/conv6_2, at strides 8, 16, 32 and 64.
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
from harmonic.models.pretrain import ensure_pretrained_backbone


class Float32LastLevelP6P7(LastLevelP6P7):
    """torchvision's P6/P7 block (same parameters and state_dict keys), computed in float32 under autocast.

    P6 and P7 are the smallest maps of the pyramid (2 x 2 and 1 x 1 at 160 px), so float32 costs nothing
    there; and the oneDNN bfloat16 weight gradient of these stride-2 convolutions on maps that small
    returned NaN now and then (measured on an AVX-512 BF16 CPU, about 1 step in 40 at 96 px) [D].
    """

    def forward(self, p, c, names):
        with torch.autocast(device_type=p[-1].device.type, enabled=False):
            return super().forward([t.float() for t in p], [t.float() for t in c], names)


__all__ = ["Float32LastLevelP6P7", "L2Norm", "RefineDetVGG16", "build_backbone", "default_anchor_sizes", "group_norm", "level_strides"]

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
    if cfg.pretrained_backbone == "shapes":  # the project's own pretraining, built once and cached
        _load_local_state_dict(net, ensure_pretrained_backbone(backbone), backbone)
    elif cfg.pretrained_backbone not in (None, "imagenet"):
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
    return LastLevelMaxPool() if arch in TWO_STAGE_ARCHS + ("refinedet",) else Float32LastLevelP6P7(channels, channels)


class L2Norm(nn.Module):
    """Channel-wise L2 normalization with a learned per-channel scale (Liu et al., ParseNet; used by SSD and
    RefineDet on conv4_3 and conv5_3 [R]): ``y[:, c] = scale[c] * x[:, c] / ||x||_2`` over channels.

    ``initial_scale``: the scale's initial value (RefineDet's release: 10 on conv4_3, 8 on conv5_3, as we
    recall it, not confirmed [D]); ``eps`` keeps an all-zero position finite.
    """

    def __init__(self, channels: int, initial_scale: float, eps: float = 1e-10) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(initial_scale)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return self.weight.view(1, -1, 1, 1) * x / norm


class RefineDetVGG16(nn.Module):
    """RefineDet512's VGG16 [R]: returns ``{"0": conv4_3 (L2Norm), "1": conv5_3 (L2Norm), "2": fc7,
    "3": conv6_2}`` at strides 8, 16, 32, 64 with 512, 512, 1024, 512 channels (``out_channels``).

    ``features`` is torchvision's ``vgg16().features`` (ImageNet weights or not); fc6 / fc7 become a 3x3
    convolution of 1024 channels with dilation 3 and a 1x1 convolution, after a 2x2 stride-2 pool5 (the
    paper: fc6 and fc7 "converted" into convolutions, conv6_1 / conv6_2 added; dilation 3 is the
    authors' release as we recall it, not confirmed [R]). fc6 / fc7 start from torchvision's default
    initialization, not from subsampled ImageNet fc weights, as torchvision's SSD300 does [D].
    """

    out_channels = (512, 512, 1024, 512)

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        pools = [i for i, block in enumerate(features) if isinstance(block, nn.MaxPool2d)]
        if len(pools) != 5:
            raise ValueError(f"features must be torchvision's VGG16 feature stack (5 max-pool layers), got {len(pools)}")
        for index in pools[:4]:
            features[index].ceil_mode = True  # sizes that are not multiples of 64 keep every position [D]
        self.conv4_3 = features[: pools[3]]  # up to conv4_3's ReLU, stride 8
        self.conv5_3 = features[pools[3] : pools[4]]  # pool4 .. conv5_3's ReLU, stride 16
        self.norm4_3 = L2Norm(512, 10.0)
        self.norm5_3 = L2Norm(512, 8.0)
        self.fc7 = nn.Sequential(
            nn.MaxPool2d(2, 2, ceil_mode=True),  # pool5, stride 32
            nn.Conv2d(512, 1024, 3, padding=3, dilation=3),  # fc6 as conv6
            nn.ReLU(inplace=True),
            nn.Conv2d(1024, 1024, 1),  # fc7 as conv7
            nn.ReLU(inplace=True),
        )
        self.conv6_2 = nn.Sequential(
            nn.Conv2d(1024, 256, 1),  # conv6_1
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 512, 3, stride=2, padding=1),  # conv6_2, stride 64
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c4 = self.conv4_3(x)
        c5 = self.conv5_3(c4)
        c7 = self.fc7(c5)
        c6_2 = self.conv6_2(c7)
        return {"0": self.norm4_3(c4), "1": self.norm5_3(c5), "2": c7, "3": c6_2}


def build_backbone(cfg: DetectorConfig) -> nn.Module:
    """The feature extractor of ``cfg``: a ``BackboneWithFPN`` (``out_channels = fpn_channels``), or for
    ``backbone="vgg16"`` torchvision's SSD300 VGG16 extractor (SSD) or :class:`RefineDetVGG16` (RefineDet)."""
    backbone = cfg.resolved("backbone")
    trainable = cfg.resolved("trainable_backbone_layers")
    net = _classification_network(cfg)
    if backbone == "vgg16":
        features = net.features
        stage_indices = [0] + [i for i, b in enumerate(features) if isinstance(b, nn.MaxPool2d)][:-1]
        _freeze_stages(features, stage_indices, trainable)
        if cfg.arch == "refinedet":
            return RefineDetVGG16(features)
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
    if cfg.arch == "refinedet":
        return [8, 16, 32, 64]
    if backbone == "vgg16":
        return [8, 16, 32, 64, 100, 300]
    if cfg.arch in TWO_STAGE_ARCHS:
        return [4, 8, 16, 32, 64] if backbone.startswith("resnet") else [8, 16, 32, 64]
    return [8, 16, 32, 64, 128]


def default_anchor_sizes(cfg: DetectorConfig) -> tuple[tuple[float, ...], ...]:
    """Anchor sizes per level: ``cfg.anchor_sizes`` if given, else torchvision's, scaled for ``"auto"``.

    torchvision's defaults: RetinaNet ``(x, x 2^(1/3), x 2^(2/3))`` for x = 32 ... 512 (truncated to int as
    torchvision does); Faster / Mask R-CNN ``(32,) ... (512,)``, one per level; FCOS the level strides.
    ``"auto"`` multiplies RetinaNet / Faster / Mask R-CNN sizes by ``min_size / 800`` [D]; FCOS points stay
    stride-sized. RefineDet: one size per level, 4 x the level's stride (Zhang et al., CVPR 2018, Sec. 3 [R]),
    which ``"auto"`` multiplies by ``min_size / 512`` (RefineDet512's input) [D].
    """
    if isinstance(cfg.anchor_sizes, tuple):
        return cfg.anchor_sizes
    strides = level_strides(cfg)
    if cfg.arch == "fcos":
        return tuple((float(s),) for s in strides)
    if cfg.arch == "refinedet":
        scale = cfg.resolved("min_size") / 512.0 if cfg.anchor_sizes == "auto" else 1.0
        return tuple((round(4.0 * s * scale, 3),) for s in strides)
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
