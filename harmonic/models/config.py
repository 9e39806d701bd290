"""``DetectorConfig``: everything needed to rebuild a detector, JSON-serializable.

``loss`` selects ``"baseline"`` (the host's stock torchvision losses, unchanged), ``"harmonic"`` (supplement
Eq. 1 on the host's per-sample losses, with the options of
:class:`harmonic.models.head_loss.HarmonicOptions`) or a comparison loss (``"qfl"``, ``"varifocal"``,
``"iou_balanced"``, RetinaNet only). ``docs/loss-options.md`` gives each option's source in the paper and
its provenance tag; architecture options (``arch``, ``backbone``, ``norm``, ``anchor_sizes``, ...) are
documented on :class:`DetectorConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from typing import Any

from harmonic.models.head_loss import (
    BETA_C_SOURCES,
    COMPARISON_LOSSES,
    TC_FORMS,
    ComparisonOptions,
    HarmonicOptions,
)
from harmonic.utils.checks import is_int, is_number

__all__ = ["ARCHS", "BACKBONES", "COMPARISON_ARCHS", "LOSSES", "MASK_ARCHS", "NORMS", "TWO_STAGE_ARCHS", "DetectorConfig"]

ARCHS = ("retinanet", "fcos", "faster_rcnn", "mask_rcnn", "ssd", "refinedet")
#: two-stage architectures: RPN + RoI heads on a stride-4..64 FPN (Mask R-CNN is Faster R-CNN plus a mask branch)
TWO_STAGE_ARCHS = ("faster_rcnn", "mask_rcnn")
#: DetectorConfig fields passed to torchvision's two-stage builders as the keyword arguments of the same names
TWO_STAGE_SAMPLING = ("rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "box_batch_size_per_image")
#: architectures that predict instance masks, and so train on targets with ``masks``
MASK_ARCHS = ("mask_rcnn",)
FPN_BACKBONES = ("resnet50_fpn", "resnet18_fpn", "mobilenet_v3_fpn")
BACKBONES = FPN_BACKBONES + ("vgg16",)
LOSSES = ("baseline", "harmonic") + COMPARISON_LOSSES
#: architectures each comparison loss is implemented for
COMPARISON_ARCHS = ("retinanet",)
#: backbones available to each architecture (vgg16 is the SSD300 / RefineDet512 network)
ARCH_BACKBONES = {arch: FPN_BACKBONES for arch in ARCHS} | {"ssd": BACKBONES, "refinedet": BACKBONES}
NORMS = ("frozen_bn", "bn", "gn")
#: RetinaNet head normalization: None (torchvision's v1 head) or "gn" (its v2 head's GroupNorm)
HEAD_NORMS = (None, "gn")
HEAD_GN_GROUPS = 32
#: backbones that ``pretrained_backbone="shapes"`` can pretrain (:mod:`harmonic.models.pretrain`)
SHAPES_BACKBONES = ("resnet18_fpn", "resnet50_fpn")

#: per-architecture defaults taken from torchvision's builders
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "retinanet": {"backbone": "resnet50_fpn", "min_size": 800, "max_size": 1333, "detections_per_img": 300, "score_thresh": 0.05},
    "fcos": {"backbone": "resnet50_fpn", "min_size": 800, "max_size": 1333, "detections_per_img": 100, "score_thresh": 0.2},
    "faster_rcnn": {"backbone": "resnet50_fpn", "min_size": 800, "max_size": 1333, "detections_per_img": 100, "score_thresh": 0.05},
    "mask_rcnn": {"backbone": "resnet50_fpn", "min_size": 800, "max_size": 1333, "detections_per_img": 100, "score_thresh": 0.05},
    "ssd": {"backbone": "vgg16", "min_size": 300, "max_size": 300, "detections_per_img": 200, "score_thresh": 0.01},
    # RefineDet512 (Zhang et al., CVPR 2018 [R]); detections_per_img and score_thresh: the test settings of
    # the authors' release as we recall them (keep_top_k 500, confidence 0.01), not confirmed [D]
    "refinedet": {"backbone": "vgg16", "min_size": 512, "max_size": 512, "detections_per_img": 500, "score_thresh": 0.01},
}
#: architectures resized to a fixed square of ``min_size`` (``max_size`` is ignored)
SQUARE_ARCHS = ("ssd", "refinedet")
#: number of backbone stages that can be unfrozen, and torchvision's default when pretrained
TRAINABLE_LAYERS = {"resnet50_fpn": (5, 3), "resnet18_fpn": (5, 3), "mobilenet_v3_fpn": (6, 3), "vgg16": (5, 4)}




@dataclass
class DetectorConfig:
    """A torchvision detector with the Harmonic losses swapped in (or not: ``loss="baseline"``).

    Fields (``None`` means "the architecture's torchvision default"):

    * ``arch``: ``"retinanet"`` | ``"fcos"`` | ``"faster_rcnn"`` | ``"mask_rcnn"`` | ``"ssd"`` | ``"refinedet"``.
      ``"mask_rcnn"`` is ``"faster_rcnn"`` plus torchvision's mask branch (same backbones and options; the
      Harmonic loss on the box head only, the mask loss unchanged); it trains on targets with ``masks``.
      ``"refinedet"``: Zhang et al., "Single-Shot Refinement Neural Network for Object Detection", CVPR
      2018 (:mod:`harmonic.models.refinedet`).
    * ``num_classes``: K, the number of object classes *without* background. Targets carry labels 1..K
      for every architecture; outputs use the same labels.
    * ``backbone``: ``"resnet50_fpn"`` (the paper's [R]), ``"resnet18_fpn"``, ``"mobilenet_v3_fpn"``
      (small, for CPU runs), or for SSD ``"vgg16"`` (torchvision's SSD300; the default for SSD). SSD on
      an FPN backbone is the small SSD option: default boxes on the FPN levels. RefineDet: ``"vgg16"``
      (RefineDet512, the default) or an FPN backbone, whose stride 8-64 levels are the four source layers.
    * ``pretrained_backbone``: ``None`` (random init), ``"imagenet"`` (torchvision's own ImageNet
      weights, downloaded by torchvision on first use), ``"shapes"`` (ResNet-18 / -50 only: the project's
      stand-in for ImageNet, a classifier of shapes crops trained once for a few minutes and cached under
      the data root, see :mod:`harmonic.models.pretrain`) or the path of a local ``state_dict`` file of the
      classification network (e.g. ``torchvision.models.resnet50().state_dict()``).
    * ``trainable_backbone_layers``: stages left trainable with a pretrained backbone (torchvision's
      meaning and defaults); must be ``None`` without one (everything then trains).
    * ``norm``: ``"frozen_bn"`` (default with a pretrained backbone), ``"bn"`` (default from scratch) or
      ``"gn"``; from-scratch runs need trainable norm layers, so ``"frozen_bn"`` needs a pretrained
      backbone. ``vgg16`` has no norm layers (leave ``None``).
    * ``min_size``, ``max_size``: image resizing as torchvision's transform (SSD and RefineDet: a fixed
      square of ``min_size``, ``max_size`` ignored; ``vgg16`` SSD is fixed at 300, ``vgg16`` RefineDet
      takes a multiple of 64, 512 by default).
    * ``fpn_channels``: FPN width (torchvision: 256; smaller for CPU runs). Mask R-CNN's mask head (four
      3x3 convs and the deconvolution) takes the same width [D]: at 256, torchvision's own layout.
    * ``anchor_sizes``: ``None`` (torchvision's), ``"auto"`` (torchvision's scaled by ``min_size / 800``,
      for small images; FCOS keeps its stride-sized points and SSD its image-relative default boxes,
      which already scale; RefineDet's 4 x stride anchors are scaled by ``min_size / 512``) or explicit
      sizes, one tuple per feature level.
    * ``loss`` and the loss options: see the module's table. ``loss="baseline"`` ignores them all, and
      so do the comparison losses ``"qfl"``, ``"varifocal"``, ``"iou_balanced"`` (RetinaNet only; they
      use ``fused`` alone).
    * ``detections_per_img``, ``score_thresh``: post-processing as torchvision.
    * ``crowd_iof_thresh``: RetinaNet / FCOS: a negative anchor whose box lies more than this fraction
      inside a target's ``crowd_boxes`` is ignored [D]. Faster R-CNN, Mask R-CNN, SSD and RefineDet
      ignore ``crowd_boxes``.
    * ``head_norm``: RetinaNet only: ``None`` (torchvision's ``retinanet_resnet50_fpn`` head: conv + ReLU, no
      normalization) or ``"gn"`` (GroupNorm of 32 groups after each head conv, as torchvision's
      ``retinanet_resnet50_fpn_v2``; the number of groups divides ``fpn_channels``).
    * ``rpn_pre_nms_top_n_train``, ``rpn_post_nms_top_n_train``, ``box_batch_size_per_image``: Faster R-CNN and
      Mask R-CNN only, torchvision's arguments of the same names for training (``None``: torchvision's 2000
      proposals per level before the RPN's NMS, 2000 per image after it, 512 RoIs sampled per image for the box
      head's loss). Small images with few objects need far fewer: the ``faster_rcnn_ablation`` sweep's values
      and the measurement behind them are in :mod:`harmonic.experiments.sweeps`.
    * ``refinedet_harmonic_arm``: RefineDet with ``loss="harmonic"``: also apply the Harmonic loss to the
      anchor refinement module's positives (its binary cross-entropy as a two-column softmax, so
      beta_c = objectness of the positive) [D]; off by default, when the Harmonic loss covers the object
      detection module only.
    """

    arch: str
    num_classes: int
    backbone: str | None = None
    pretrained_backbone: str | None = None
    trainable_backbone_layers: int | None = None
    norm: str | None = None
    min_size: int | None = None
    max_size: int | None = None
    fpn_channels: int = 256
    anchor_sizes: Any = None
    loss: str = "baseline"
    hiou: bool = True
    hiou_weight: float = 1.5
    hiou_gamma: float = 0.8
    tc_weight: float = 0.0
    tc_margin: float = 0.2
    tc_form: str = "margin"
    detach_factors: bool = False
    beta_c_source: str = "loss"
    iou_loss: str = "hiou"
    factors: bool = True
    box_weight: float = 1.0
    factor_terms: str = "both"
    fused: bool | None = None
    detections_per_img: int | None = None
    score_thresh: float | None = None
    crowd_iof_thresh: float = 0.5
    refinedet_harmonic_arm: bool = False
    head_norm: str | None = None
    rpn_pre_nms_top_n_train: int | None = None
    rpn_post_nms_top_n_train: int | None = None
    box_batch_size_per_image: int | None = None

    # ------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"DetectorConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        if not is_int(self.num_classes) or self.num_classes < 1:
            raise ValueError(f"DetectorConfig.num_classes must be an int >= 1 (without background), got {self.num_classes!r}")
        backbone = self.resolved("backbone")
        if backbone not in BACKBONES:
            raise ValueError(f"DetectorConfig.backbone must be one of {BACKBONES} or None, got {self.backbone!r}")
        if backbone not in ARCH_BACKBONES[self.arch]:
            raise ValueError(
                f"DetectorConfig.backbone={backbone!r} is not available for arch={self.arch!r}; choose one of "
                f"{ARCH_BACKBONES[self.arch]} (vgg16 only for arch in ('ssd', 'refinedet'))"
            )
        if self.pretrained_backbone is not None and (
            not isinstance(self.pretrained_backbone, str) or not self.pretrained_backbone
        ):
            raise ValueError(
                'DetectorConfig.pretrained_backbone must be None, "imagenet", "shapes" or the path of a state_dict file, '
                f"got {self.pretrained_backbone!r}"
            )
        if self.pretrained_backbone == "shapes" and backbone not in SHAPES_BACKBONES:
            raise ValueError(
                f'DetectorConfig.pretrained_backbone="shapes" is available for backbone in {SHAPES_BACKBONES}, got {backbone!r}'
            )
        self._check_backbone_training(backbone)
        self._check_sizes(backbone)
        if not is_int(self.fpn_channels) or self.fpn_channels < 1:
            raise ValueError(f"DetectorConfig.fpn_channels must be an int >= 1, got {self.fpn_channels!r}")
        self.anchor_sizes = self._normalized_anchor_sizes(self.anchor_sizes)
        if self.loss not in LOSSES:
            raise ValueError(f"DetectorConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss in COMPARISON_LOSSES and self.arch not in COMPARISON_ARCHS:
            raise ValueError(
                f"DetectorConfig.loss={self.loss!r} is a comparison loss implemented for arch in {COMPARISON_ARCHS} "
                f"only (a loss-only swap in the same RetinaNet), got arch={self.arch!r}"
            )
        if self.tc_form not in TC_FORMS:
            raise ValueError(f"DetectorConfig.tc_form must be one of {TC_FORMS}, got {self.tc_form!r}")
        if self.beta_c_source not in BETA_C_SOURCES:
            raise ValueError(f"DetectorConfig.beta_c_source must be one of {BETA_C_SOURCES}, got {self.beta_c_source!r}")
        try:
            self.harmonic_options()
        except (TypeError, ValueError) as err:
            raise ValueError(f"DetectorConfig: {err}") from err
        if self.detections_per_img is not None and (not is_int(self.detections_per_img) or self.detections_per_img < 1):
            raise ValueError(f"DetectorConfig.detections_per_img must be None or an int >= 1, got {self.detections_per_img!r}")
        if self.score_thresh is not None and (not is_number(self.score_thresh) or not 0 <= self.score_thresh < 1):
            raise ValueError(f"DetectorConfig.score_thresh must be None or a number in [0, 1), got {self.score_thresh!r}")
        if not is_number(self.crowd_iof_thresh) or not 0 < self.crowd_iof_thresh <= 1:
            raise ValueError(f"DetectorConfig.crowd_iof_thresh must be a number in (0, 1], got {self.crowd_iof_thresh!r}")
        self._check_refinedet_switch()
        self._check_two_stage_sampling()
        if self.head_norm not in HEAD_NORMS:
            raise ValueError(f"DetectorConfig.head_norm must be one of {HEAD_NORMS}, got {self.head_norm!r}")
        if self.head_norm is not None and self.arch != "retinanet":
            raise ValueError(f"DetectorConfig.head_norm applies to arch='retinanet' only (the others keep torchvision's "
                             f"heads), got arch={self.arch!r}")
        if self.head_norm == "gn" and self.fpn_channels % HEAD_GN_GROUPS:
            raise ValueError(f"DetectorConfig.head_norm='gn' uses {HEAD_GN_GROUPS} groups, which must divide "
                             f"fpn_channels, got {self.fpn_channels}")

    def _check_two_stage_sampling(self) -> None:
        for name in TWO_STAGE_SAMPLING:
            value = getattr(self, name)
            if value is None:
                continue
            if not is_int(value) or value < 1:
                raise ValueError(f"DetectorConfig.{name} must be None or an int >= 1, got {value!r}")
            if self.arch not in TWO_STAGE_ARCHS:
                raise ValueError(f"DetectorConfig.{name} applies to arch in {TWO_STAGE_ARCHS} only (their RPN and RoI "
                                 f"sampling), got arch={self.arch!r}")

    def _check_refinedet_switch(self) -> None:
        if not isinstance(self.refinedet_harmonic_arm, bool):
            raise ValueError(f"DetectorConfig.refinedet_harmonic_arm must be a bool, got {self.refinedet_harmonic_arm!r}")
        if self.refinedet_harmonic_arm and (self.arch != "refinedet" or self.loss != "harmonic"):
            raise ValueError(
                'DetectorConfig.refinedet_harmonic_arm=True needs arch="refinedet" and loss="harmonic" (it puts '
                f"the Harmonic loss on RefineDet's anchor refinement module), got arch={self.arch!r}, loss={self.loss!r}"
            )

    def _check_backbone_training(self, backbone: str) -> None:
        max_layers, _ = TRAINABLE_LAYERS[backbone]
        layers = self.trainable_backbone_layers
        if layers is not None:
            if not is_int(layers) or not 0 <= layers <= max_layers:
                raise ValueError(
                    f"DetectorConfig.trainable_backbone_layers must be None or an int in [0, {max_layers}] for "
                    f"{backbone}, got {layers!r}"
                )
            if self.pretrained_backbone is None:
                raise ValueError(
                    "DetectorConfig.trainable_backbone_layers only applies to a pretrained backbone; without "
                    "pretrained_backbone every layer trains, so leave it None"
                )
        if backbone == "vgg16":
            if self.norm is not None:
                raise ValueError(f"DetectorConfig.norm must be None for backbone vgg16 (it has no norm layers), got {self.norm!r}")
            return
        if self.norm is not None and self.norm not in NORMS:
            raise ValueError(f"DetectorConfig.norm must be one of {NORMS} or None, got {self.norm!r}")
        if self.norm == "frozen_bn" and self.pretrained_backbone is None:
            raise ValueError(
                'DetectorConfig.norm="frozen_bn" freezes the norm layers at their initial values, which only '
                'makes sense with a pretrained_backbone; from scratch use "bn" or "gn"'
            )

    def _check_sizes(self, backbone: str) -> None:
        for name in ("min_size", "max_size"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"DetectorConfig.{name} must be None or an int >= 1, got {value!r}")
        if backbone == "vgg16" and self.arch == "ssd" and self.min_size not in (None, 300):
            raise ValueError(f"DetectorConfig.min_size must be 300 (or None) for the vgg16 SSD300, got {self.min_size!r}")
        if backbone == "vgg16" and self.arch == "refinedet" and self.min_size is not None and self.min_size % 64:
            raise ValueError(
                "DetectorConfig.min_size must be a multiple of 64 (or None: 512) for the vgg16 RefineDet, so that its "
                f"four source layers have strides 8/16/32/64 exactly (the paper's 320 and 512), got {self.min_size!r}"
            )
        if self.arch not in SQUARE_ARCHS and self.resolved("max_size") < self.resolved("min_size"):
            raise ValueError(
                f"DetectorConfig.max_size ({self.resolved('max_size')}) must be >= min_size ({self.resolved('min_size')})"
            )

    def _normalized_anchor_sizes(self, value: Any) -> Any:
        if value is None or value == "auto":
            return value
        error = ValueError(
            'DetectorConfig.anchor_sizes must be None, "auto" or a list of lists of positive numbers (one '
            f"list per feature level), got {value!r}"
        )
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
            raise error
        levels = []
        for level in value:
            if isinstance(level, str) or not isinstance(level, (list, tuple)) or not level:
                raise error
            if not all(is_number(size) and size > 0 for size in level):
                raise error
            levels.append(tuple(float(size) for size in level))
        if self.arch == "ssd":
            raise ValueError(
                "DetectorConfig.anchor_sizes cannot be set for SSD: its default boxes are image-relative "
                "(torchvision's DefaultBoxGenerator); use None"
            )
        if self.arch == "fcos" and any(len(level) != 1 for level in levels):
            raise ValueError("DetectorConfig.anchor_sizes for FCOS needs exactly one size per level (its anchor points)")
        if len({len(level) for level in levels}) != 1:
            raise ValueError("DetectorConfig.anchor_sizes needs the same number of sizes on every level")
        return tuple(levels)

    # ------------------------------------------------------------------------------------------------
    def resolved(self, name: str) -> Any:
        """The value of field ``name`` with ``None`` replaced by the architecture's default."""
        value = getattr(self, name)
        if value is not None:
            return value
        if name == "max_size" and self.arch in SQUARE_ARCHS:
            return self.resolved("min_size")
        if name in ARCH_DEFAULTS[self.arch]:
            return ARCH_DEFAULTS[self.arch][name]
        if name == "norm":
            if self.resolved("backbone") == "vgg16":
                return None
            return "frozen_bn" if self.pretrained_backbone is not None else "bn"
        if name == "trainable_backbone_layers":
            max_layers, pretrained_default = TRAINABLE_LAYERS[self.resolved("backbone")]
            return pretrained_default if self.pretrained_backbone is not None else max_layers
        return None

    @property
    def needs_masks(self) -> bool:
        """True when the detector trains on instance masks (targets need ``masks``): ``arch`` in :data:`MASK_ARCHS`."""
        return self.arch in MASK_ARCHS

    def harmonic_options(self) -> HarmonicOptions | None:
        """The :class:`~harmonic.models.head_loss.HarmonicOptions` of this config, or None for the baseline loss."""
        options = HarmonicOptions(
            hiou=self.hiou,
            hiou_weight=self.hiou_weight,
            hiou_gamma=self.hiou_gamma,
            tc_weight=self.tc_weight,
            tc_margin=self.tc_margin,
            tc_form=self.tc_form,
            detach_factors=self.detach_factors,
            beta_c_source=self.beta_c_source,
            iou_loss=self.iou_loss,
            factors=self.factors,
            box_weight=self.box_weight,
            factor_terms=self.factor_terms,
            fused=self.fused,
        )
        return options if self.loss == "harmonic" else None

    def comparison_options(self) -> ComparisonOptions | None:
        """The :class:`~harmonic.models.head_loss.ComparisonOptions` of a comparison ``loss`` (the papers' parameter
        values), or None for ``"baseline"`` / ``"harmonic"``."""
        if self.loss not in COMPARISON_LOSSES:
            return None
        return ComparisonOptions(kind=self.loss, fused=self.fused)

    def to_dict(self) -> dict[str, Any]:
        """``dataclasses.asdict`` with anchor sizes as lists: JSON-serializable as it stands."""
        data = asdict(self)
        if isinstance(data["anchor_sizes"], tuple):
            data["anchor_sizes"] = [list(level) for level in data["anchor_sizes"]]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        """Rebuild a config from :meth:`to_dict` / ``dataclasses.asdict`` output (e.g. read from JSON).

        Unknown keys are an error (a typo must not silently fall back to a default).
        """
        if not isinstance(data, dict):
            raise TypeError(f"DetectorConfig.from_dict expects a dict, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"DetectorConfig.from_dict: unknown key(s) {unknown}; valid keys are {names}")
        missing = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ValueError(f"DetectorConfig.from_dict: missing required key(s) {missing}")
        return cls(**data)
