"""The provenance every result file carries: parameters, seed, git commit, package versions, device."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "torchvision", "numpy", "pycocotools", "sympy", "matplotlib")

def git_commit(root: str | Path | None = None) -> dict[str, Any]:
    """The git commit of the project and whether the tree had uncommitted changes (None outside git)."""
    root = Path(root) if root else Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root, capture_output=True, text=True, check=True, timeout=10,
            ).stdout.strip()
        )
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    from harmonic import __version__  # the package's own version; harmonic/__init__ imports no utils

    versions["harmonic"] = __version__
    return versions


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what the platform module reports)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: str | None = None, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The machine a result was computed on; ``details`` adds fields a caller knows (the loss backend)."""
    import torch  # kept out of module import: the provenance of a sympy-only result needs no torch

    from harmonic.utils.devices import native_bf16  # imports torch, kept out of module import likewise

    info: dict[str, Any] = {
        "device": str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        # what decides the CPU's speed and precision: its vector instruction set as torch sees it, and
        # whether it computes bfloat16 natively (else the engine's amp="auto" trains in float32)
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": native_bf16(torch.device("cpu")),
    }
    if torch.cuda.is_available():
        info["cuda_device_name"] = torch.cuda.get_device_name(0)
        info["cuda_device_count"] = torch.cuda.device_count()
    info.update(details or {})
    return info


def _portable(arg: str) -> str:
    """Command-line words without this machine's absolute paths (results are shared)."""
    path = Path(arg)
    if not path.is_absolute():
        return arg
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def provenance(
    parameters: dict[str, Any] | None = None,
    *,
    seed: int | None = None,
    device: str | None = None,
    device_details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to trace a result file back to how it was made."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parameters": parameters or {},
        "seed": seed,
        "git": git_commit(),
        "versions": package_versions(),
        "device": device_description(device, device_details),
        "argv": [_portable(a) for a in sys.argv],
    }
