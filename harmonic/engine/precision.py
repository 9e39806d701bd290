"""Mixed precision and memory layout of a training step: which autocast dtype, whether a gradient scaler
is needed, whether the model runs in ``channels_last``.

``TrainConfig.amp``:

* ``"auto"`` (default): bfloat16 autocast where the device computes it natively (a CUDA device that
  supports it; a CPU with AVX-512 BF16 or AMX), float16 with a gradient scaler on other CUDA devices,
  float32 elsewhere;
* ``"bf16"`` / ``"fp16"``: that dtype (``"fp16"`` on CUDA only, with a gradient scaler);
* ``"on"``: what ``"auto"`` picks, and an error where that is float32;
* ``"off"``: float32.

``TrainConfig.channels_last``: ``None`` (default) puts the model in ``channels_last`` exactly when autocast
is on (the layout mixed-precision convolutions are fastest in), ``True`` / ``False`` force it.

Only the network runs in the low precision: every detector computes its losses, box IoU and the Harmonic
factors in float32 with autocast disabled (see :func:`harmonic.models.common.float32_losses`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harmonic.utils.devices import native_bf16

AMP_MODES = ("auto", "on", "off", "bf16", "fp16")
__all__ = ["AMP_MODES", "Precision", "compile_network", "native_bf16", "resolve_precision"]


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a run: ``dtype`` of autocast (None: float32, autocast off), whether a
    gradient ``scaler`` is used, and whether the model is ``channels_last``."""

    dtype: torch.dtype | None
    scaler: bool
    channels_last: bool

    @property
    def autocast(self) -> bool:
        return self.dtype is not None

    def describe(self) -> dict[str, object]:
        """JSON-friendly fields for a run's resolved configuration and provenance."""
        name = {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.dtype]
        return {"autocast_dtype": name, "grad_scaler": self.scaler, "channels_last": self.channels_last}


def resolve_precision(amp: str, channels_last: bool | None, device: torch.device) -> Precision:
    """The :class:`Precision` of ``TrainConfig.amp`` / ``channels_last`` on ``device``; a ``ValueError``
    naming the field where the device cannot do what was asked."""
    if amp not in AMP_MODES:
        raise ValueError(f"TrainConfig.amp must be one of {AMP_MODES}, got {amp!r}")
    if amp == "off":
        dtype = None
    elif amp == "bf16":
        dtype = torch.bfloat16
    elif amp == "fp16":
        if device.type != "cuda":
            raise ValueError(f"TrainConfig.amp is 'fp16' but the device is {device.type}: float16 autocast is for CUDA")
        dtype = torch.float16
    else:  # auto / on
        if native_bf16(device):
            dtype = torch.bfloat16
        elif device.type == "cuda":
            dtype = torch.float16
        else:
            dtype = None
        if amp == "on" and dtype is None:
            raise ValueError(f"TrainConfig.amp is 'on' but {device.type} has no native bfloat16; use 'auto' or 'off'")
    layout = dtype is not None if channels_last is None else bool(channels_last)
    return Precision(dtype=dtype, scaler=dtype == torch.float16, channels_last=layout)


def compile_network(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """``torch.compile`` the parts of a detector that are pure tensor code, in place (``Module.compile``, so
    the state_dict keys are unchanged): its ``backbone`` and, where the detector has them, the
    classification and regression sub-heads (the loss and post-processing code, which branch on the data,
    stay eager). ``backend``: torch.compile's backend. Returns ``model``."""
    model.backbone.compile(dynamic=False, backend=backend)
    head = getattr(model, "head", None)
    for name in ("classification_head", "regression_head"):
        if head is not None and hasattr(head, name):
            getattr(head, name).compile(dynamic=False, backend=backend)
    return model
