"""Checkpoints and logs: the checkpoint format, RNG state capture and restore, :func:`load_checkpoint`,
:func:`load_model`, :func:`read_log` and the helpers that keep ``log.jsonl`` consistent on resume."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harmonic.models import DetectorConfig, build_detector
from harmonic.utils.checks import is_int
from harmonic.utils.files import atomic_write_text
from harmonic.utils.runlog import read_log

CHECKPOINT_FORMAT = "harmonic.checkpoint"
CHECKPOINT_VERSION = 1


def rng_state(device: torch.device) -> dict[str, Any]:
    """The torch (and, on CUDA, the device's) random-number state, for a checkpoint."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    state["cuda"] = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore a state saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` with ``torch.load(weights_only=True)`` (tensors and plain
    Python types only). ``path`` may also be a run folder (its ``final.pt``, else ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "final.pt", path / "checkpoints" / "last.pt", path / "final.pt",
                          path / "last.pt"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise FileNotFoundError(f"{path}: no checkpoints/final.pt or checkpoints/last.pt in this run folder")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - every unreadable file gets the same clear message
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a harmonic checkpoint (no format {CHECKPOINT_FORMAT!r})")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')!r}, this code reads {CHECKPOINT_VERSION}")
    ckpt["path"] = str(path)
    return ckpt


def load_model(checkpoint: str | os.PathLike | Mapping[str, Any], device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """``(model in eval mode on device, checkpoint dict)`` from a checkpoint file, run folder or dict."""
    ckpt = dict(checkpoint) if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint)
    model = build_detector(DetectorConfig.from_dict(ckpt["detector"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def truncate_log(path: Path, iteration: int) -> None:
    """Keep the records of iterations ``<= iteration`` (a resumed run re-logs the ones after it)."""
    if not path.is_file():
        return
    kept = [r for r in read_log(path) if is_int(r.get("iter")) and r["iter"] <= iteration]
    atomic_write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))


def json_float(value: float) -> float | None:
    """``value``, or None where it is not finite (JSON has no NaN)."""
    return value if math.isfinite(value) else None
