"""The Harmonic loss (Eq. 1), the Harmonic IoU loss (Eq. 11), the task-contrasting term [R], the
comparison losses and the statistics that watch the supplement's assumptions during training (watch.py),
one file each; everything is functional and device agnostic, with ``nn.Module`` wrappers that add
``reduction``, ``loss_weight``, ``weight`` and ``avg_factor``.

Notation follows the supplementary material (Wang and Zhang, ICCV 2021).
"""

from harmonic.losses.comparison import iou_balanced_weights, quality_focal_loss, soft_targets, varifocal_loss
from harmonic.losses.harmonic import HarmonicLoss, harmonic_factors, harmonic_loss
from harmonic.losses.hiou import (
    HarmonicIoULoss,
    aligned_box_iou,
    check_gamma,
    harmonic_iou_loss,
    hiou_from_iou,
)
from harmonic.losses.reduction import (
    REDUCTIONS,
    WeightedLoss,
    check_reduction,
    reduce_loss,
    weight_reduce_loss,
)
from harmonic.losses.task_contrasting import TaskContrastingLoss, class_entropy, task_contrasting_loss
from harmonic.losses.watch import WATCH_KEYS, Y_REVERSAL, watch_statistics

__all__ = [
    "REDUCTIONS",
    "reduce_loss",
    "weight_reduce_loss",
    "check_reduction",
    "WeightedLoss",
    "harmonic_factors",
    "harmonic_loss",
    "HarmonicLoss",
    "aligned_box_iou",
    "hiou_from_iou",
    "harmonic_iou_loss",
    "check_gamma",
    "HarmonicIoULoss",
    "class_entropy",
    "task_contrasting_loss",
    "TaskContrastingLoss",
    "soft_targets",
    "quality_focal_loss",
    "varifocal_loss",
    "iou_balanced_weights",
    "WATCH_KEYS",
    "Y_REVERSAL",
    "watch_statistics",
]
