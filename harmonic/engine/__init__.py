"""Training and evaluation: resumable, deterministic, single-process or distributed (``torchrun``).

The paper's training settings (learning rate, schedule, input size, GPUs) were not recovered: only its
detectors and datasets are reported, by secondary sources [R]. The engine implements the usual recipe of
torchvision's detection references instead: SGD with momentum and
weight decay, a linear warmup, step decay, optional gradient clipping and mixed precision on CUDA.

A run lives in one folder (``TrainConfig.output_dir``); ``docs/engine.md`` describes its files and the
conventions (iterations counted from 1, per-process batch size, lr steps in iterations, data order as a
pure function of seed, epoch and index).

Command line: ``python -m harmonic train --help``; evaluation: ``python -m harmonic evaluate --help``.

The package, one module per concern (everything public is re-exported here, so
``from harmonic.engine import train`` works):

* :mod:`harmonic.engine.config`       ``TrainConfig``, ``PRESETS``, the schedule ``lr_at`` and the
  validation helpers
* :mod:`harmonic.engine.sampling`     deterministic data order: ``derive_seed``, ``EpochBatchSampler``,
  ``iters_per_epoch``, ``SeededSamples``
* :mod:`harmonic.engine.distributed`  the process context (torchrun's environment, the device, the
  process group) and the collectives
* :mod:`harmonic.engine.checkpoints`  the checkpoint format, RNG state, ``load_checkpoint``,
  ``load_model``, ``read_log`` and the log helpers
* :mod:`harmonic.engine.training`     ``train``, the optimizer step, ``IterationState``,
  ``NonFiniteLossError``
* :mod:`harmonic.engine.predict`      ``predict`` and ``evaluate``
* :mod:`harmonic.engine.watch`        per-positive samples at three points of training
  (``watch_samples.json``)
"""

# Names imported ``as`` themselves are public but outside ``__all__`` (constants).
from harmonic.engine.checkpoints import CHECKPOINT_FORMAT, load_checkpoint, load_model
from harmonic.engine.checkpoints import CHECKPOINT_VERSION as CHECKPOINT_VERSION
from harmonic.engine.config import AMP_MODES as AMP_MODES
from harmonic.engine.config import DEVICES as DEVICES
from harmonic.engine.config import PRESETS, TrainConfig, lr_at
from harmonic.engine.config import RESUMABLE_CHANGES as RESUMABLE_CHANGES
from harmonic.engine.predict import evaluate, predict
from harmonic.engine.sampling import EpochBatchSampler, SeededSamples, derive_seed, iters_per_epoch
from harmonic.engine.training import IterationState, NonFiniteLossError, train
from harmonic.engine.watch import read_samples
from harmonic.utils.runlog import read_log

__all__ = [
    "CHECKPOINT_FORMAT",
    "PRESETS",
    "EpochBatchSampler",
    "IterationState",
    "NonFiniteLossError",
    "SeededSamples",
    "TrainConfig",
    "derive_seed",
    "evaluate",
    "read_samples",
    "iters_per_epoch",
    "load_checkpoint",
    "load_model",
    "lr_at",
    "predict",
    "read_log",
    "train",
]
