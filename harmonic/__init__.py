"""harmonic: reference implementation of "Reconcile Prediction Consistency for Balanced Object Detection".

Importing the package never starts a computation. The folders name the concerns:

* :mod:`harmonic.losses`       the Harmonic loss, the Harmonic IoU loss, the task-contrasting term, the
                               comparison losses
* :mod:`harmonic.ops`          the fused per-anchor focal loss and its native CPU kernel
* :mod:`harmonic.models`       torchvision detectors with the losses swapped in
* :mod:`harmonic.data`         COCO-format datasets, the generated default dataset, PASCAL VOC conversion
* :mod:`harmonic.engine`       training (resumable, distributed) and prediction
* :mod:`harmonic.evaluation`   COCO metrics and prediction-consistency metrics
* :mod:`harmonic.theory`       the supplement's derivations, its figures, the paper's reported numbers
* :mod:`harmonic.experiments`  runs, sweeps, notebooks and the results report
* :mod:`harmonic.utils`        argument checks, atomic result files, provenance, figure files
* :mod:`harmonic.cli`          ``python -m harmonic <command>``
"""

from harmonic.losses import (
    HarmonicIoULoss,
    HarmonicLoss,
    TaskContrastingLoss,
    aligned_box_iou,
    harmonic_iou_loss,
    harmonic_loss,
    task_contrasting_loss,
)

__version__ = "0.1.0"

__all__ = [
    "HarmonicIoULoss",
    "HarmonicLoss",
    "TaskContrastingLoss",
    "aligned_box_iou",
    "harmonic_iou_loss",
    "harmonic_loss",
    "task_contrasting_loss",
    "__version__",
]
