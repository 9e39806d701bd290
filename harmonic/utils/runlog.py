"""A run's log, ``log.jsonl``: one JSON record per training iteration, appended while the run trains and
kept gzip-compressed (``log.jsonl.gz``) once it is finished, so that committed run folders stay small."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

from harmonic.utils.files import atomic_write_bytes

__all__ = ["LOG_NAME", "PACKED_LOG_NAME", "SIGNIFICANT_DIGITS", "find_log", "pack_log", "read_log", "tail_means",
           "unpack_log"]

#: a run's log while it trains, and the compressed form a finished run keeps (see :func:`pack_log`)
LOG_NAME = "log.jsonl"
PACKED_LOG_NAME = "log.jsonl.gz"
#: significant digits a packed log keeps of each float: enough for every float32 value (the logged losses
#: and statistics) to come back as the same float32; their 17-digit float64 repr adds digits that only cost space.
#: Float64 values (learning rate, timings) keep 9 significant digits.
SIGNIFICANT_DIGITS = 9


def _rounded(value: Any) -> Any:
    """``value`` with every float rounded to :data:`SIGNIFICANT_DIGITS` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def find_log(run_dir: str | os.PathLike) -> Path:
    """The log of a run folder: ``log.jsonl`` while it trains, ``log.jsonl.gz`` once finished (the plain
    file when both exist); the plain name when neither does."""
    run_dir = Path(run_dir)
    plain, packed = run_dir / LOG_NAME, run_dir / PACKED_LOG_NAME
    return packed if packed.is_file() and not plain.is_file() else plain


def pack_log(run_dir: str | os.PathLike) -> Path | None:
    """Compress a finished run's ``log.jsonl`` into ``log.jsonl.gz`` (atomically, reproducible bytes) and
    remove the plain file. Floats are kept to :data:`SIGNIFICANT_DIGITS` significant digits (a float32
    value reads back as the same float32), records are written without spaces, and an unfinished last line is dropped (as
    :func:`read_log` does): the packed log is about 8x smaller than the plain one. Returns the packed path (None when there is no plain log)."""
    plain = Path(run_dir) / LOG_NAME
    if not plain.is_file():
        return None
    lines = [json.dumps(_rounded(record), separators=(",", ":"), allow_nan=False) + "\n" for record in read_log(plain)]
    packed = atomic_write_bytes(plain.with_name(PACKED_LOG_NAME), gzip.compress("".join(lines).encode(), 9, mtime=0))
    plain.unlink()
    return packed


def unpack_log(run_dir: str | os.PathLike) -> None:
    """Undo :func:`pack_log` before a finished run is continued (its log is appended to again)."""
    run_dir = Path(run_dir)
    plain, packed = run_dir / LOG_NAME, run_dir / PACKED_LOG_NAME
    if packed.is_file() and not plain.is_file():
        atomic_write_bytes(plain, gzip.decompress(packed.read_bytes()))
        packed.unlink()


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's log (a run folder is accepted, see :func:`find_log`; ``.gz`` files are
    read compressed); an unfinished last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = find_log(path)
    records = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if handle.readline():  # only the last line may be cut short (a crash mid-write)
                    raise ValueError(f"{path}: line {number} is not JSON") from None
    return records


def tail_means(records: list[dict[str, Any]], keys, tail: float) -> dict[str, float | None]:
    """Per key of ``keys``: the mean of its values over the last ``tail`` (a fraction, at least one
    record) of the ``records`` that carry it (not None), None where none do. How the tools summarise the
    end of a run's log."""
    if not 0 < tail <= 1:
        raise ValueError(f"tail must be a fraction in (0, 1], got {tail!r}")
    out: dict[str, float | None] = {}
    for key in keys:
        values = [float(r[key]) for r in records if r.get(key) is not None]
        last = values[-max(1, round(tail * len(values))):] if values else []
        out[key] = sum(last) / len(last) if last else None
    return out
