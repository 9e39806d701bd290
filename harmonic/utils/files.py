"""Result files that never end half-written: written beside the target, fsynced, then renamed over it."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Any


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
    """JSON with sorted keys; NaN/inf are refused (``allow_nan=False``) rather than written silently. A
    path ending in ``.gz`` is written gzip-compressed (compact JSON, reproducible bytes: no timestamp)."""
    if Path(path).suffix == ".gz":
        text = json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False, default=_json_default)
        return atomic_write_bytes(path, gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, default=_json_default)
    return atomic_write_text(path, text + "\n")


def read_json(path: str | Path) -> Any:
    """A JSON file written by :func:`atomic_write_json`, gzip-compressed when its name ends in ``.gz``."""
    path = Path(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return json.loads(data.decode("utf-8"))


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    import torch

    return _atomic_write(path, lambda h: torch.save(obj, h))


def _json_default(value: Any):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy / torch arrays and scalars
        return value.tolist()
    raise TypeError(f"object of type {type(value).__name__} is not JSON serializable")


@contextlib.contextmanager
def exclusive_lock(path: str | Path):
    """An exclusive advisory lock on the file ``.<name>.lock`` beside ``path`` (POSIX), so that concurrent
    processes (``torchrun``, parallel runs) build a cached file or folder once. Where the platform has no
    advisory locks (Windows) the block runs unlocked: the writes it protects are atomic anyway, so the
    work may only be done twice."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl  # POSIX only: the stdlib module is absent on Windows
    except ImportError:
        yield
        return
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

