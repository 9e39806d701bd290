"""Training configuration: :class:`TrainConfig` (validated, JSON round-trippable), the named
:data:`PRESETS`, the learning-rate schedule :func:`lr_at` and the validation helpers they share."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmonic.engine.precision import AMP_MODES
from harmonic.models import ARCHS, DetectorConfig
from harmonic.utils.checks import is_int, is_number
from harmonic.utils.files import atomic_write_json

DEVICES = ("auto", "cpu", "cuda")
# fields that may differ between a run and its resumption: they do not change the iterations already done
RESUMABLE_CHANGES = frozenset(
    {"resume", "output_dir", "num_workers", "log_every", "checkpoint_every", "keep_checkpoints", "max_iters",
     "epochs", "device", "num_threads", "compile", "fused_optimizer"}
)




@dataclass
class TrainConfig:
    """Everything a training run needs, JSON round-trippable (:meth:`to_dict` / :meth:`from_dict`).

    Data: ``dataset`` is a preset name (``"shapes"``, ``"shapes-tiny"``), a COCO annotation JSON (images in
    ``image_dir``) or a folder with ``train.json`` and ``images/`` (see :func:`harmonic.data.resolve_dataset`).
    ``val_dataset`` / ``val_image_dir`` name the evaluation data; ``None`` means the ``"val"`` split of
    ``dataset`` (a preset or a folder). ``flip_prob``: random horizontal flip during training.

    ``detector``: :class:`harmonic.models.DetectorConfig` fields as a dict; ``num_classes`` may be left out
    (it is then taken from the training set).

    Schedule: exactly one of ``epochs`` or ``max_iters``. Optimizer: SGD(``lr``, ``momentum``,
    ``weight_decay``) on every trainable parameter; learning rate as :func:`lr_at`. ``grad_clip``: max
    global L2 norm of the gradients (``None``: no clipping). ``amp``: the autocast dtype, ``"auto"`` (bfloat16
    where the device computes it natively, float16 with a gradient scaler on other CUDA devices, else
    float32), ``"bf16"``, ``"fp16"``, ``"on"``, ``"off"``; ``channels_last``: the model's memory layout (None:
    with autocast); see :mod:`harmonic.engine.precision`. Losses are computed in float32 either way.
    ``compile``: ``torch.compile`` the backbone and the heads' convolutions (off by default: on the CPU it
    measured no faster than eager for the default study and costs about a minute of compiling; see
    ``make bench``). ``fused_optimizer``: SGD's fused kernel (one pass over each parameter for weight
    decay, momentum and the update; the same update rule as SGD's per-parameter loop): ``None`` (default) on
    CUDA without float16's gradient scaler only (on the CPU ``make bench`` measured no gain; see
    :func:`harmonic.engine.training.build_optimizer`), ``True`` (an error where it cannot be used) or ``False``.

    Runtime: ``seed``; ``device`` (``"auto"``: CUDA when available); ``output_dir`` (the run folder);
    ``checkpoint_every`` (iterations between writes of ``checkpoints/last.pt``); ``keep_checkpoints`` (also
    keep ``checkpoints/iter_<k>.pt`` at each of those); ``log_every`` (iterations between progress lines
    when the progress bar is off; the JSONL log always gets every iteration); ``num_workers`` (data
    loading processes); ``resume`` (continue the run in ``output_dir`` from ``checkpoints/last.pt``, or
    start it if there is none); ``deterministic`` (``torch.use_deterministic_algorithms`` during the run);
    ``num_threads`` (CPU threads of torch during the run; ``None``: torch's default. On a machine shared
    with other jobs, 1 thread per process avoids the slowdown of oversubscribed threads); ``sync_bn``
    (distributed CUDA runs: ``torch.nn.SyncBatchNorm``, BatchNorm statistics over the global batch).
    """

    dataset: str = "shapes"
    image_dir: str | None = None
    val_dataset: str | None = None
    val_image_dir: str | None = None
    flip_prob: float = 0.5
    detector: dict[str, Any] = field(default_factory=lambda: {"arch": "retinanet"})
    epochs: int | None = None
    max_iters: int | None = None
    batch_size: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    lr_steps: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    grad_clip: float | None = None
    amp: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    fused_optimizer: bool | None = None
    seed: int = 0
    device: str = "auto"
    output_dir: str = "results/runs/train"
    checkpoint_every: int = 500
    keep_checkpoints: bool = False
    log_every: int = 20
    num_workers: int = 0
    resume: bool = False
    deterministic: bool = False
    num_threads: int | None = None
    sync_bn: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ----------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Check every field; a bad value raises ``ValueError`` naming the field. Returns ``self``."""

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        for name in ("dataset", "output_dir"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, "a non-empty string")
        for name in ("image_dir", "val_dataset", "val_image_dir"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            if getattr(self, name) is not None and (not isinstance(getattr(self, name), str) or not getattr(self, name)):
                raise bad(name, "None or a non-empty string")
        if not (is_number(self.flip_prob) and 0 <= self.flip_prob <= 1):
            raise bad("flip_prob", "a number in [0, 1]")
        if (self.epochs is None) == (self.max_iters is None):
            raise ValueError(
                "TrainConfig: set exactly one of epochs or max_iters "
                f"(got epochs={self.epochs!r}, max_iters={self.max_iters!r}); e.g. TrainConfig.preset('shapes-cpu')"
            )
        for name in ("epochs", "max_iters"):
            value = getattr(self, name)
            if value is not None and not (is_int(value) and value >= 1):
                raise bad(name, "None or an integer >= 1")
        for name, low in (("batch_size", 1), ("warmup_iters", 0), ("checkpoint_every", 1), ("log_every", 1),
                          ("num_workers", 0), ("seed", 0)):
            if not (is_int(getattr(self, name)) and getattr(self, name) >= low):
                raise bad(name, f"an integer >= {low}")
        if not (is_number(self.lr) and self.lr > 0):
            raise bad("lr", "a number > 0")
        for name in ("momentum", "weight_decay"):
            if not (is_number(getattr(self, name)) and getattr(self, name) >= 0):
                raise bad(name, "a number >= 0")
        for name in ("warmup_factor", "lr_gamma"):
            if not (is_number(getattr(self, name)) and 0 < getattr(self, name) <= 1):
                raise bad(name, "a number in (0, 1]")
        if isinstance(self.lr_steps, tuple):
            self.lr_steps = list(self.lr_steps)
        if not (isinstance(self.lr_steps, list) and all(is_int(s) and s >= 1 for s in self.lr_steps)
                and self.lr_steps == sorted(set(self.lr_steps))):
            raise bad("lr_steps", "a list of increasing integers >= 1 (iteration counts)")
        if self.num_threads is not None and not (is_int(self.num_threads) and self.num_threads >= 1):
            raise bad("num_threads", "None or an integer >= 1")
        if self.grad_clip is not None and not (is_number(self.grad_clip) and self.grad_clip > 0):
            raise bad("grad_clip", "None or a number > 0")
        if self.amp is True or self.amp is False:
            self.amp = "on" if self.amp else "off"
        if self.amp not in AMP_MODES:
            raise bad("amp", f"one of {AMP_MODES}")
        if not isinstance(self.compile, bool):
            raise bad("compile", "a bool")
        if self.fused_optimizer is not None and not isinstance(self.fused_optimizer, bool):
            raise bad("fused_optimizer", "None (fused on CUDA without a gradient scaler), True or False")
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise bad("channels_last", "None (with autocast), True or False")
        if self.device not in DEVICES:
            raise bad("device", f"one of {DEVICES}")
        for name in ("keep_checkpoints", "resume", "deterministic", "sync_bn"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        self._validate_detector()
        return self

    def _validate_detector(self) -> None:
        if not isinstance(self.detector, Mapping):
            raise ValueError(f"TrainConfig.detector must be a dict of DetectorConfig fields, got {self.detector!r}")
        self.detector = dict(self.detector)
        names = [f.name for f in dataclasses.fields(DetectorConfig)]
        unknown = sorted(set(self.detector) - set(names))
        if unknown:
            raise ValueError(f"TrainConfig.detector: unknown key(s) {unknown}; DetectorConfig fields are {names}")
        if "arch" not in self.detector:
            raise ValueError(f"TrainConfig.detector needs an 'arch' (one of {', '.join(ARCHS)})")
        try:  # full validation now, with a placeholder class count when it comes from the dataset
            DetectorConfig.from_dict({"num_classes": 1, **self.detector})
        except (TypeError, ValueError) as err:
            raise ValueError(f"TrainConfig.detector: {err}") from err

    # -- conversions ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only; :meth:`from_dict` gives back an equal config."""
        data = dataclasses.asdict(self)
        data["detector"] = json.loads(json.dumps(self.detector, default=list))  # tuples -> lists
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        """A config from a dict (e.g. read from JSON). Unknown keys are an error naming them and ``source``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: a training config must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{source}: unknown TrainConfig key(s) {unknown}; valid keys are {names}")
        try:
            return cls(**dict(data))
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def save_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a config file written by :meth:`save_json` (or by hand); errors name the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"config file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
        if isinstance(data, Mapping) and "config" in data and "provenance" in data:
            data = data["config"]  # a run's config.json
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``; a ``detector`` dict is merged into the current one, not substituted."""
        data = self.to_dict()
        if "detector" in changes:
            data["detector"] = {**data["detector"], **dict(changes.pop("detector"))}
        unknown = sorted(set(changes) - set(data))
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        if "epochs" in changes and "max_iters" not in changes:
            data["max_iters"] = None
        if "max_iters" in changes and "epochs" not in changes:
            data["epochs"] = None
        data.update(changes)
        return type(self).from_dict(data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """A named configuration (:data:`PRESETS`) with ``overrides`` applied as :meth:`replace` does."""
        if name not in PRESETS:
            raise ValueError(f"unknown training preset {name!r}; presets: {sorted(PRESETS)}")
        return cls.from_dict(PRESETS[name], source=f"preset {name!r}").replace(**overrides)

    # -- resolved values -----------------------------------------------------------------------------
    def total_iters(self, iters_per_epoch: int) -> int:
        return self.max_iters if self.max_iters is not None else self.epochs * iters_per_epoch

    def val_spec(self) -> tuple[str, str, str | None]:
        """``(dataset, split, image_dir)`` of the evaluation data."""
        if self.val_dataset is not None:
            return self.val_dataset, "val", self.val_image_dir
        return self.dataset, "val", self.val_image_dir


#: Named training configurations. ``shapes-study``: the default of ``make reproduce`` (below).
#: ``shapes-cpu``: RetinaNet R18-FPN from scratch on the embedded dataset, sized to train in minutes on a
#: 2-core CPU (the former default study, ``make sweep SWEEP=scratch``).
#: ``shapes-tiny``: a few seconds, for tests. ``coco-1x``: the standard 1x COCO recipe (90k iterations of
#: 16 images, lr 0.01, steps at 60k and 80k, warmup 1000 iterations from 1/1000) for RetinaNet R50-FPN
#: with an ImageNet backbone, as 8 processes of 2 images; the paper's own settings were not recovered [R].
#: ``voc``: PASCAL VOC07+12 trainval (16551 images), evaluated on VOC07 test. The paper's VOC training
#: settings are not known [R]; this is a standard recipe chosen by this project [D]: torchvision-style
#: RetinaNet R50-FPN with an ImageNet backbone, images resized to 600 (shorter side) / 1000 (cap), the usual
#: VOC scale, 16 images per iteration, lr 0.01, 12000 iterations (about 11.6 epochs) with a 10x decay after
#: 9000, warmup 500 iterations from 1/1000.
PRESETS: dict[str, dict[str, Any]] = {
    # [D] Chosen by measurement on the shared 2-core CPU (160 px, 64 FPN channels, batch 2): about 0.19 s
    # per iteration with 1 thread, so 3000 iterations (10 epochs) take about 10 minutes; `make reproduce`
    # runs two such runs side by side. One thread because two threads on a busy 2-core machine were 10x
    # slower (oversubscribed OpenMP threads spin), and where nothing else runs, two runs side by side with
    # one thread each give more images per second than one run with both (`make bench`'s `levers`
    # section). Anchors are 2x the level stride with 3 scales per octave, because the images are used at
    # their native 160 px: torchvision's anchors scaled by 160/800 ("auto", 0.8x the stride) are smaller
    # than the smallest shapes and gave a 7x lower AP in the same budget. Per image seen, batch 2 beat
    # batch 4 (more updates); lr 0.05 diverged at batch 4 and lr 0.03 was no better than 0.02.
    "shapes-cpu": {
        "dataset": "shapes",
        "detector": {"arch": "retinanet", "backbone": "resnet18_fpn", "min_size": 160, "max_size": 160,
                     "fpn_channels": 64,
                     "anchor_sizes": [[16, 20, 25], [32, 40, 50], [64, 80, 101], [128, 161, 203], [256, 322, 406]]},
        "max_iters": 3000,
        "batch_size": 2,
        "lr": 0.02,
        "warmup_iters": 200,
        "warmup_factor": 0.01,
        "lr_steps": [2300, 2800],
        "grad_clip": 10.0,
        "checkpoint_every": 500,
        "log_every": 100,
        "num_threads": 1,
        "output_dir": "results/runs/shapes-cpu",
    },
    "shapes-tiny": {
        "dataset": "shapes-tiny",
        "detector": {"arch": "retinanet", "backbone": "resnet18_fpn", "min_size": 64, "max_size": 96,
                     "fpn_channels": 32, "anchor_sizes": "auto"},
        "max_iters": 4,
        "batch_size": 2,
        "lr": 0.01,
        "warmup_iters": 2,
        "warmup_factor": 0.1,
        "lr_steps": [3],
        "grad_clip": 10.0,
        "checkpoint_every": 2,
        "log_every": 1,
        "output_dir": "results/runs/shapes-tiny",
    },
    "coco-1x": {
        "dataset": "instances_train2017.json",
        "detector": {"arch": "retinanet", "backbone": "resnet50_fpn", "pretrained_backbone": "imagenet"},
        "max_iters": 90000,
        "batch_size": 2,
        "lr": 0.01,
        "warmup_iters": 1000,
        "warmup_factor": 0.001,
        "lr_steps": [60000, 80000],
        "checkpoint_every": 5000,
        "num_workers": 4,
        "output_dir": "results/runs/coco-1x",
    },
    "voc": {
        "dataset": "voc0712_trainval.json",
        "detector": {"arch": "retinanet", "backbone": "resnet50_fpn", "pretrained_backbone": "imagenet",
                     "min_size": 600, "max_size": 1000},
        "max_iters": 12000,
        "batch_size": 2,
        "lr": 0.01,
        "warmup_iters": 500,
        "warmup_factor": 0.001,
        "lr_steps": [9000],
        "checkpoint_every": 2000,
        "num_workers": 4,
        "output_dir": "results/runs/voc",
    },
}

# [D] `make reproduce PROFILE=quick`: the "shapes-cpu" recipe cut to 800 iterations (about 2 minutes with
# bfloat16 on one thread), a first look at the notebooks' outputs, not a study.
PRESETS["shapes-quick"] = {
    **copy.deepcopy(PRESETS["shapes-cpu"]), "max_iters": 800, "warmup_iters": 100, "lr_steps": [650], "checkpoint_every": 400,
    "output_dir": "results/runs/shapes-quick",
}
# [D] The test bed of the loss comparison and the default of `make reproduce` (docs/testbed.md, measurements
# in results/testbed/). The "shapes-study" data (larger objects, fewer of them, less occlusion,
# still irregular shapes on clutter), a ResNet-18 pretrained once by the project on shapes crops ("shapes",
# harmonic.models.pretrain; the stand-in for ImageNet, about 5 minutes, cached under the data root) with
# frozen BatchNorm and conv1 / layer1 frozen as torchvision does with ImageNet weights; the engine's precision
# (amp="auto": bfloat16 and channels_last where the CPU computes bfloat16 natively, float32 elsewhere). 2400
# iterations took about 0.17 s each in bfloat16 on one thread of a shared 2-core CPU with AVX-512 BF16 (about 7
# minutes a run); on a CPU without it, about 0.31 s in float32 (bfloat16 would be emulated, many times slower:
# the README's bench-avx2 block).
PRESETS["shapes-study"] = {
    **copy.deepcopy(PRESETS["shapes-cpu"]), "dataset": "shapes-study",
    "detector": {**copy.deepcopy(PRESETS["shapes-cpu"]["detector"]), "pretrained_backbone": "shapes"},
    "max_iters": 2400, "lr_steps": [1841, 2239],
    "output_dir": "results/runs/shapes-study",
}


def lr_at(cfg: TrainConfig, iteration: int) -> float:
    """Learning rate of iteration ``iteration`` (1-based: the ``iteration``-th optimizer step).

    ``lr * w(k) * lr_gamma ** #{s in lr_steps : s < k}`` with the linear warmup
    ``w(k) = warmup_factor + (1 - warmup_factor) * (k - 1) / warmup_iters`` for ``k <= warmup_iters``
    and ``w(k) = 1`` afterwards (torchvision's linear warmup; ``warmup_iters = 0``: none).
    """
    if not (is_int(iteration) and iteration >= 1):
        raise ValueError(f"iteration must be an integer >= 1, got {iteration!r}")
    warmup = 1.0
    if iteration <= cfg.warmup_iters:
        warmup = cfg.warmup_factor + (1.0 - cfg.warmup_factor) * (iteration - 1) / cfg.warmup_iters
    decays = sum(1 for step in cfg.lr_steps if step < iteration)
    return cfg.lr * warmup * cfg.lr_gamma**decays
