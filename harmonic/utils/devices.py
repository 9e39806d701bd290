"""What a device computes natively, asked once by every part that chooses a precision (the training engine
in :mod:`harmonic.engine.precision`, the backbone pretraining in :mod:`harmonic.models.pretrain`)."""

from __future__ import annotations

import torch

__all__ = ["native_bf16"]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA: compute capability 8.0 or newer; CPU: the
    oneDNN bfloat16 kernels, which need AVX-512 BF16 or AMX). Elsewhere bfloat16 is emulated, and on a
    CPU several times slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False
