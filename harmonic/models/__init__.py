"""torchvision detectors with the Harmonic loss and Harmonic IoU loss swapped in.

The swap subclasses each host's loss step (never patching torchvision): RetinaNet's and FCOS's heads
(``compute_loss``), Faster R-CNN's ``RoIHeads`` (its ``fastrcnn_loss`` step; Mask R-CNN reuses it and
keeps torchvision's mask loss) and ``SSD.compute_loss``. RefineDet, which torchvision lacks, is built here
from torchvision parts (:mod:`harmonic.models.refinedet`).
``loss="baseline"`` runs torchvision's own loss code unchanged. RetinaNet also takes the comparison
losses ``"qfl"``, ``"varifocal"`` and ``"iou_balanced"`` (:func:`harmonic.models.head_loss.dense_comparison_loss`),
loss-only swaps in the same detector.

* :mod:`harmonic.models.head_loss`    the Harmonic loss composed on a head's own per-sample losses
* :mod:`harmonic.models.config`       ``DetectorConfig`` and the option-to-source table
* :mod:`harmonic.models.backbones`    ResNet / MobileNet FPN and VGG16 backbones (SSD300's, RefineDet512's), default anchors
* :mod:`harmonic.models.retinanet`, :mod:`~harmonic.models.fcos`, :mod:`~harmonic.models.faster_rcnn`,
  :mod:`~harmonic.models.mask_rcnn`, :mod:`~harmonic.models.ssd`, :mod:`~harmonic.models.refinedet`
                                       the six detectors
* :mod:`harmonic.models.build`        ``build_detector``, ``get_stats``, ``get_samples``, ``set_record_candidates``
"""

from harmonic.models.build import build_detector, get_samples, get_stats, set_record_candidates
from harmonic.models.common import CANDIDATE_KEYS
from harmonic.models.config import ARCHS, BACKBONES, MASK_ARCHS, DetectorConfig

__all__ = [
    "ARCHS",
    "BACKBONES",
    "CANDIDATE_KEYS",
    "MASK_ARCHS",
    "DetectorConfig",
    "build_detector",
    "get_samples",
    "get_stats",
    "set_record_candidates",
]
