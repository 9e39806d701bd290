"""Result files that never end half-written, and the provenance every result file carries."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "torchvision", "numpy", "pycocotools", "sympy", "matplotlib")


def _atomic_write(path: str | Path, write) -> Path:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; result files get the usual permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic_write(path, lambda h: h.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return _atomic_write(path, lambda h: h.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """JSON with sorted keys; NaN/inf are refused (``allow_nan=False``) rather than written silently."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, default=_json_default)
    return atomic_write_text(path, text + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    import torch

    return _atomic_write(path, lambda h: torch.save(obj, h))


def _json_default(value: Any):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy / torch arrays and scalars
        return value.tolist()
    raise TypeError(f"object of type {type(value).__name__} is not JSON serializable")


def git_commit(root: str | Path | None = None) -> dict[str, Any]:
    """The git commit of the project and whether the tree had uncommitted changes (None outside git)."""
    root = Path(root) if root else Path(__file__).resolve().parents[1]
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
    from harmonic import __version__

    versions["harmonic"] = __version__
    return versions


def device_description(device: str | None = None) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "device": str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda_device_name"] = torch.cuda.get_device_name(0)
        info["cuda_device_count"] = torch.cuda.device_count()
    try:  # which implementation computes the dense focal term (harmonic.fused) on this device
        from harmonic.fused import active_backend

        info["fused_focal_backend"] = active_backend(None, info["device"].split(":")[0])
    except (ImportError, ValueError, RuntimeError) as err:
        info["fused_focal_backend"] = f"unknown ({type(err).__name__}: {err})"
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


def provenance(parameters: dict[str, Any] | None = None, *, seed: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Everything needed to trace a result file back to how it was made."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parameters": parameters or {},
        "seed": seed,
        "git": git_commit(),
        "versions": package_versions(),
        "device": device_description(device),
        "argv": [_portable(a) for a in sys.argv],
    }
