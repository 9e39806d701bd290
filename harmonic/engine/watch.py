"""Per-positive samples of a run at three points of training, for the histograms of notebook 04.

Every iteration's log record carries the watch statistics of the positives (percentiles and shares, see
:func:`harmonic.losses.watch_statistics`); the per-positive pairs are too many to log each iteration. At
the iterations of :func:`sample_iterations` (``ceil(k * total / 3)``, k = 1, 2, 3) process 0 writes a
capped random subsample of the positives' ``(x, y, score)`` to ``watch_samples.json`` in the run folder::

    {"definition": "focal" | "ce", "cap": 512,
     "snapshots": [{"iter": 100, "num_positives": 812, "x": [...], "y": [...], "score": [...]}, ...]}

``definition`` says which classification loss ``x`` is (:func:`x_definition`): ``"focal"`` for a sigmoid
head whose ``beta_c`` comes from the focal loss (RetinaNet, FCOS with ``beta_c_source="loss"``), ``"ce"``
for the cross-entropy (softmax heads, and ``beta_c_source="gt_prob"``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from harmonic.engine.sampling import derive_seed
from harmonic.utils.files import atomic_write_json

__all__ = ["SAMPLE_CAP", "WATCH_SAMPLES_FILE", "read_samples", "sample_iterations", "snapshot",
           "truncate_samples", "write_snapshot", "x_definition"]

WATCH_SAMPLES_FILE = "watch_samples.json"
#: the most positives kept per snapshot
SAMPLE_CAP = 512


def sample_iterations(total: int, count: int = 3) -> list[int]:
    """The iterations ``ceil(k * total / count)`` for k = 1..count, ascending and distinct (1-based)."""
    if total < 1 or count < 1:
        return []
    return sorted({max(1, math.ceil(k * total / count)) for k in range(1, count + 1)})


def x_definition(arch: str, beta_c_source: str) -> str:
    """``"focal"`` when ``x`` is a sigmoid head's focal loss (RetinaNet / FCOS, ``beta_c_source="loss"``),
    else ``"ce"`` (softmax cross-entropy, or ``-log sigmoid(x_gt)`` with ``"gt_prob"``)."""
    return "focal" if arch in ("retinanet", "fcos") and beta_c_source == "loss" else "ce"


def snapshot(samples: dict[str, Tensor], *, iteration: int, seed: int, cap: int = SAMPLE_CAP) -> dict[str, Any] | None:
    """A random subsample of at most ``cap`` positives of ``samples`` (``{"x", "y", "score"}``, [P] each,
    from :func:`harmonic.models.get_samples`), drawn from a generator seeded by ``(seed, iteration)``; read
    from the device in one ``.tolist()``. None when there is no positive."""
    if not samples or samples["x"].numel() == 0:
        return None
    count = samples["x"].numel()
    generator = torch.Generator().manual_seed(derive_seed("watch", seed, iteration))
    index = torch.randperm(count, generator=generator)[:cap].sort().values.to(samples["x"].device)
    x, y, score = torch.stack([samples[k].float()[index] for k in ("x", "y", "score")]).tolist()
    return {"iter": int(iteration), "num_positives": int(count), "x": x, "y": y, "score": score}


def read_samples(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``watch_samples.json``, or None when it has none."""
    path = Path(run_dir) / WATCH_SAMPLES_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_snapshot(run_dir: str | Path, entry: dict[str, Any], *, definition: str, cap: int = SAMPLE_CAP) -> Path:
    """Add ``entry`` (from :func:`snapshot`) to the run's samples file, replacing any snapshot of the
    same or a later iteration (a resumed run writes them again); atomic."""
    data = read_samples(run_dir) or {}
    kept = [s for s in data.get("snapshots", []) if s["iter"] < entry["iter"]]
    return atomic_write_json(Path(run_dir) / WATCH_SAMPLES_FILE,
                             {"definition": definition, "cap": cap, "snapshots": [*kept, entry]})


def truncate_samples(run_dir: str | Path, iteration: int) -> None:
    """Keep the snapshots of iterations ``<= iteration`` (when a run resumes from that iteration)."""
    data = read_samples(run_dir)
    if data is not None:
        data["snapshots"] = [s for s in data.get("snapshots", []) if s["iter"] <= iteration]
        atomic_write_json(Path(run_dir) / WATCH_SAMPLES_FILE, data)
