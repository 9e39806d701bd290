"""Benchmarks: ``python tools/bench.py --out results/bench.json [--quick]`` (what ``make bench`` runs).

Each *section* is a function ``section(config) -> dict`` registered in :data:`SECTIONS`; every list of
flat records in a section's dict is printed as a table by :func:`format_tables`, whatever the section,
and the whole dict is written to the JSON file (atomically, with :func:`harmonic.utils.provenance.provenance`).

Timings are taken side by side in one process: every round runs each method once (in a rotating order),
after warm-up rounds, and the reported time is the median over rounds (with the quartiles). Medians of
interleaved rounds are the fairest comparison on a shared machine, but absolute numbers still move with
the machine's load: compare the ratios within one file, not across files. On Linux, part of the spread
between rounds is glibc's allocator returning the large blocks of one method to the system and the next
method faulting fresh pages in; ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set high in
the environment keep those blocks in the process and steady the medians (the committed results were
measured without them).

Sections:

* ``dense_loss``: the dense part of a one-stage detector's loss, forward + backward, at RetinaNet scale
  (100,000 anchors x 80 classes, 2,000 positives, on one 800-pixel image) and at 1/4 and 4 times that.
  ``harmonic_fused`` is the whole Harmonic + HIoU loss of a RetinaNet head (``harmonic.dense``: focal
  term over all anchors, L1 + HIoU on the positives, the harmonic factors, normalization) through the
  fused focal loss, ``harmonic_reference`` the same through the reference composition, both without the
  watch statistics (``HarmonicOptions(watch=False)``); ``harmonic_fused_watch`` is ``harmonic_fused`` with
  them, as the detectors compute it for the engine's log. The loss's targets are checked on
  ``harmonic_fused``; the watch statistics have their own budget in ``train_step``. The yardsticks are
  torchvision's stock path (its ``sigmoid_focal_loss`` over a one-hot target plus the generalized IoU loss
  of the positives' decoded boxes, as in its FCOS) and one ``torch.sigmoid`` pass over the logits. Beside
  them, each backend of :mod:`harmonic.fused` in place of torchvision's focal loss in the stock path
  (``fused_<backend>``), and the reference composition (``harmonic.dense.focal_loss_per_anchor_reference``)
  likewise.
  ``fused_eager_parallel_chunks`` is the eager backend with chunks above torch's parallel grain size,
  timed to show why the default chunk stays below it (``harmonic.fused.CHUNK_ELEMENTS``).
* ``train_step``: a whole training step (forward, loss, backward, SGD step) of RetinaNet with the
  baseline loss, the Harmonic + HIoU loss through the fused dense path, and the same through the
  reference dense path, from the same weights on the same batch: the "shapes-cpu" preset's ResNet-18-FPN
  detector at 160 px (batch 2 of shapes images) and ResNet-50-FPN at 512 px (80 classes, random boxes).
  Reports the median step time and the peak memory of each, and the harmonic/baseline ratios against
  the issue's targets (time at most 1.03 times, peak memory no higher). ``--quick``: the small detector
  at 64 px only.

* ``engine_step``, ``amp_modes``, ``precision_accuracy``: the engine's step against the plain float32 loop, the
  autocast modes each in both memory layouts side by side, and the full-run accuracy check of the fast path
  (see their functions).
* ``step_breakdown``: the engine's step and the plain loop profiled, their time split into convolutions, the
  SGD step, copies and the rest, with the engine/plain ratio that would remain if convolutions were free.
* ``levers``: the levers outside the engine's default step: compiling the network, the thread layout (runs
  side by side in separate processes against one run with every core), and the share of an iteration
  spent waiting for data in finished runs (what a decoded-image cache could save).
The machine's load average before and after each section is recorded beside its results: on a shared
machine it explains most of the spread between runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from harmonic.experiments.readme import replace_block
from harmonic.utils.checks import positive_int

__all__ = [
    "BenchConfig",
    "SECTIONS",
    "add_arguments",
    "dense_loss_section",
    "format_tables",
    "main",
    "peak_memory_bytes",
    "run",
    "saved_tensor_bytes",
    "time_interleaved",
    "train_step_section",
    "train_step_settings",
    "engine_step_section",
    "precision_accuracy_section",
    "step_breakdown_section",
    "levers_section",
]

#: the issue's targets for the fused path (forward + backward), reported beside the measured ratios
TARGET_FUSED_OVER_STOCK = 0.5
TARGET_FUSED_OVER_SIGMOID = 4.0


@dataclass(frozen=True)
class BenchConfig:
    """What a benchmark run measures. ``quick``: tiny sizes and 2 rounds (for tests)."""

    device: str = "cpu"
    quick: bool = False
    repeats: int = 7
    warmup: int = 2
    seed: int = 0
    compile: bool = True
    scales: tuple[float, ...] = (0.25, 1.0, 4.0)

    threads: int | None = None

    @classmethod
    def for_run(cls, *, device: str = "cpu", quick: bool = False, **overrides: Any) -> BenchConfig:
        """The defaults of a full run, or of a quick one (2 rounds, 1 warm-up, no compiling)."""
        base = {"repeats": 2, "warmup": 1, "compile": False} if quick else {}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(device=device, quick=quick, **base)


# ----------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    methods: dict[str, Callable[[], object]], *, repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of every method, measured in interleaved rounds.

    Each of ``warmup`` untimed rounds and ``repeats`` timed rounds calls every method once; the order
    rotates from round to round so that no method always follows the same one. Returns the list of
    per-round times of each method.
    """
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize(device)
            start = time.perf_counter()
            methods[name]()
            _synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _summary_ms(samples: list[float]) -> dict[str, float]:
    """Median, quartiles and minimum in milliseconds."""
    ordered = sorted(samples)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "median_ms": 1e3 * statistics.median(ordered),
        "q1_ms": 1e3 * q1,
        "q3_ms": 1e3 * q3,
        "min_ms": 1e3 * ordered[0],
    }


def saved_tensor_bytes(fn: Callable[[], Tensor]) -> tuple[int, int]:
    """``(count, bytes)`` of the tensors autograd saves for backward while ``fn()`` builds its graph.

    Exact (``torch.autograd.graph.saved_tensors_hooks``); a tensor saved twice is counted twice, and
    inputs that are saved count too (they are kept alive by the graph).
    """
    count = 0
    total = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal count, total
        count += 1
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return count, total


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Peak of the bytes allocated while ``fn()`` runs, above what was allocated before; and the method.

    CUDA: ``torch.cuda.max_memory_allocated`` (exact). CPU: from ``torch.profiler`` memory records at
    operator granularity (each operator's own allocations counted at its start, its frees at its end),
    so allocations freed inside one operator are not seen: an approximation, stated in the result.
    """
    if device.type == "cuda":
        _synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = []
    for event in prof.events():
        usage = event.self_cpu_memory_usage
        if usage > 0:
            changes.append((event.time_range.start, usage))
        elif usage < 0:
            changes.append((event.time_range.end, usage))
    current = peak = 0
    for _, usage in sorted(changes, key=lambda change: change[0]):
        current += usage
        peak = max(peak, current)
    return peak, "torch.profiler operator memory records (operator granularity)"


def _peak_bandwidth(device: torch.device) -> tuple[float | None, str]:
    """The device's theoretical memory bandwidth in bytes/s where its properties allow computing it."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        # double data rate: two transfers per clock
        return 2.0 * clock_khz * 1e3 * bus_bits / 8.0, "2 * memory_clock_rate * memory_bus_width / 8"
    return None, (
        "torch.cuda.get_device_properties has no memory clock / bus width here: look up the device's "
        "peak memory bandwidth to compare"
    )


# ----------------------------------------------------------------------------------------------------
# the dense loss section
# ----------------------------------------------------------------------------------------------------
#: RetinaNet on one 800-pixel image: about 100,000 anchors (ignored ones removed), 80 classes, 2,000
#: positives (the issue's numbers)
DENSE_FULL = {"anchors": 100_000, "classes": 80, "positives": 2_000}
DENSE_QUICK = {"anchors": 400, "classes": 8, "positives": 12}
#: chunk of the "fused_eager_parallel_chunks" method: 4 x torch's parallel grain size
PARALLEL_CHUNK = 1 << 17
#: the vs_sigmoid comparison runs this many times the configured rounds (its methods take milliseconds)
SIGMOID_GROUP_ROUNDS = 3
#: RetinaNet's classification-head prior: bias = -log((1 - 0.01) / 0.01)
PRIOR_LOGIT = -math.log((1 - 0.01) / 0.01)


def _dense_inputs(anchors: int, classes: int, positives: int, device: torch.device, seed: int) -> dict[str, Tensor]:
    """Synthetic head outputs: logits around RetinaNet's prior (positives' target logits raised), the
    anchors' classes (-1 negative), and decoded predicted / matched ground-truth boxes of the positives
    in an 800 x 800 image."""
    generator = torch.Generator().manual_seed(seed)
    logits = PRIOR_LOGIT + 1.5 * torch.randn(anchors, classes, generator=generator)
    gt_classes = torch.full((anchors,), -1, dtype=torch.int64)
    rows = torch.randperm(anchors, generator=generator)[:positives].sort().values
    classes_of_rows = torch.randint(0, classes, (positives,), generator=generator)
    gt_classes[rows] = classes_of_rows
    logits[rows, classes_of_rows] += 3.0
    xy = 700.0 * torch.rand(positives, 2, generator=generator)
    wh = 16.0 + 84.0 * torch.rand(positives, 2, generator=generator)
    target_boxes = torch.cat([xy, xy + wh], dim=1)
    pred_boxes = target_boxes + 8.0 * torch.randn(positives, 4, generator=generator)
    pred_boxes = torch.cat([pred_boxes[:, :2], torch.maximum(pred_boxes[:, 2:], pred_boxes[:, :2] + 1.0)], dim=1)
    tensors = {
        "logits": logits,
        "gt_classes": gt_classes,
        "rows": rows,
        "pred_boxes": pred_boxes,
        "target_boxes": target_boxes,
    }
    return {name: tensor.to(device) for name, tensor in tensors.items()}


#: RetinaNet's box loss stands in as an L1 on the boxes scaled by this (its encoded offsets are boxes
#: divided by anchor sizes of this order)
BOX_LOSS_SCALE = 1.0 / 100.0


def _dense_methods(
    inputs: dict[str, Tensor], backends: list[str]
) -> tuple[dict[str, Callable[[], Tensor]], dict[str, Callable[[], Tensor]]]:
    """``(forward + backward callables, forward-only callables returning the loss)`` of every method."""
    import torch.nn.functional as F
    from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

    from harmonic.models.head_loss import HarmonicOptions, dense_harmonic_loss
    from harmonic.ops.focal import focal_loss_per_anchor, focal_loss_per_anchor_reference

    logits, gt_classes, rows = inputs["logits"], inputs["gt_classes"], inputs["rows"]
    pred_boxes, target_boxes = inputs["pred_boxes"], inputs["target_boxes"]

    def leaves() -> tuple[Tensor, Tensor]:
        return logits.detach().requires_grad_(), pred_boxes.detach().requires_grad_()

    def box_term(boxes: Tensor) -> Tensor:
        return generalized_box_iou_loss(boxes, target_boxes, reduction="sum")

    def stock() -> Tensor:
        # torchvision's heads: a one-hot target over all anchors, focal loss summed, GIoU on positives
        x, boxes = leaves()
        target = torch.zeros_like(x)
        target[rows, gt_classes[rows]] = 1.0
        return sigmoid_focal_loss(x, target, reduction="sum") + box_term(boxes)

    def reference() -> Tensor:
        x, boxes = leaves()
        return focal_loss_per_anchor_reference(x, gt_classes).sum() + box_term(boxes)

    def fused(backend: str) -> Callable[[], Tensor]:
        def loss() -> Tensor:
            x, boxes = leaves()
            return focal_loss_per_anchor(x, gt_classes, backend=backend).sum() + box_term(boxes)

        return loss

    def harmonic(use_fused: bool, watch: bool = False) -> Callable[[], Tensor]:
        # the whole per-image Harmonic + HIoU loss of a RetinaNet head (harmonic.dense): focal term over
        # all anchors, L1 + HIoU on the positives, the harmonic factors, normalization; with ``watch``
        # also the watch statistics of the positives
        options = HarmonicOptions(hiou=True, fused=use_fused, watch=watch)

        def loss() -> Tensor:
            x, boxes = leaves()
            box_loss = F.l1_loss(boxes, target_boxes, reduction="none").sum(1) * BOX_LOSS_SCALE
            out = dense_harmonic_loss(x, gt_classes, box_loss, boxes, target_boxes, num_foreground=rows.numel(), options=options)
            return out["classification"] + out["bbox_regression"]

        return loss

    forward = {"stock": stock, "reference": reference}
    forward.update({f"fused_{backend}": fused(backend) for backend in backends})

    def fused_parallel_chunks() -> Tensor:
        # the eager backend with chunks above torch's parallel grain size (see fused.CHUNK_ELEMENTS)
        x, boxes = leaves()
        return focal_loss_per_anchor(x, gt_classes, backend="eager", chunk_elements=PARALLEL_CHUNK).sum() + box_term(boxes)

    forward["fused_eager_parallel_chunks"] = fused_parallel_chunks
    forward["harmonic_reference"] = harmonic(False)
    forward["harmonic_fused"] = harmonic(True)
    forward["harmonic_fused_watch"] = harmonic(True, watch=True)

    def with_backward(loss_fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
        def step() -> Tensor:
            loss = loss_fn()
            loss.backward()
            return loss

        return step

    timed: dict[str, Callable[[], Tensor]] = {"sigmoid": lambda: torch.sigmoid(logits)}
    timed.update({name: with_backward(fn) for name, fn in forward.items()})
    return timed, forward


def _check_agreement(forward: dict[str, Callable[[], Tensor]]) -> dict[str, float]:
    """Relative difference of each method's loss value from the one it must equal: the stock value for
    the focal + GIoU methods, the reference composition's for ``harmonic_fused``."""
    with torch.no_grad():
        values = {name: float(fn()) for name, fn in forward.items()}
    differences = {}
    for name, value in values.items():
        truth = values["harmonic_reference"] if name.startswith("harmonic") else values["stock"]
        if name not in ("stock", "harmonic_reference"):
            differences[name] = abs(value - truth) / max(abs(truth), 1e-30)
    return differences


def _compile_backend(inputs: dict[str, Tensor]) -> tuple[bool, float, str | None]:
    """Compile the fused kernel once (untimed in the comparisons): ``(works, seconds, failure)``."""
    import warnings

    from harmonic.ops import focal as fused

    x = inputs["logits"].detach().requires_grad_()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused.focal_loss_per_anchor(x, inputs["gt_classes"], backend="compile").sum().backward()
    seconds = time.perf_counter() - start
    failures = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return (not failures), seconds, (failures[0] if failures else None)


def dense_loss_section(config: BenchConfig) -> dict[str, Any]:
    """Forward + backward of the dense loss at each scale; see the module docstring.

    Returns ``{"title", "rows" (one per scale and method: times, ratios, memory), "summary" (one per
    scale: the fused/stock and fused/sigmoid ratios against the targets), "notes", "settings"}``.
    """
    from harmonic.ops.focal import active_backend

    device = torch.device(config.device)
    size = DENSE_QUICK if config.quick else DENSE_FULL
    rows_out: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    notes: list[str] = []
    default = active_backend(None, device)
    peak_method = ""
    for scale in config.scales:
        anchors = max(2, round(size["anchors"] * scale))
        positives = max(1, round(size["positives"] * scale))
        classes = size["classes"]
        inputs = _dense_inputs(anchors, classes, positives, device, config.seed)
        backends = ["native", "eager"] if active_backend("native", device) == "native" else ["eager"]
        compile_seconds = None
        if config.compile:
            works, compile_seconds, failure = _compile_backend(inputs)
            if works:
                backends.append("compile")
            elif failure and not any(failure in note for note in notes):
                notes.append(f"compile backend unavailable, not timed: {failure}")
        timed, forward = _dense_methods(inputs, backends)
        agreement = _check_agreement(forward)
        # two comparisons, each timed side by side in its own interleaved rounds: against the stock path
        # (every method but the sigmoid) and against one sigmoid pass (the small-memory methods only, so
        # that the stock path's gigabyte allocations do not disturb the caches and the allocator of the
        # yardstick's own rounds)
        default_name = f"fused_{default}"
        groups = {
            "vs_stock": [name for name in timed if name != "sigmoid"],
            "vs_sigmoid": ["sigmoid", "harmonic_fused", "harmonic_fused_watch", default_name],
        }
        stats: dict[str, dict[str, dict[str, float]]] = {}
        for group, names in groups.items():
            # the small-memory group's rounds are cheap: three times as many steady its medians
            repeats = config.repeats * (SIGMOID_GROUP_ROUNDS if group == "vs_sigmoid" else 1)
            samples = time_interleaved(
                {name: timed[name] for name in names}, repeats=repeats, warmup=config.warmup, device=device
            )
            stats[group] = {name: _summary_ms(times) for name, times in samples.items()}
        stock_ms = stats["vs_stock"]["stock"]["median_ms"]
        sigmoid_ms = stats["vs_sigmoid"]["sigmoid"]["median_ms"]
        peaks: dict[str, float] = {}
        for group, names in groups.items():
            for name in names:
                if name not in peaks:
                    peak, peak_method = peak_memory_bytes(timed[name], device)
                    peaks[name] = peak / 2**20
                median = stats[group][name]["median_ms"]
                row = {
                    "scale": scale,
                    "anchors": anchors,
                    "classes": classes,
                    "positives": positives,
                    "group": group,
                    "method": name,
                    **stats[group][name],
                    ("over_stock" if group == "vs_stock" else "over_sigmoid"): median
                    / (stock_ms if group == "vs_stock" else sigmoid_ms),
                    "peak_mb": peaks[name],
                }
                if name != "sigmoid":
                    count, saved = saved_tensor_bytes(forward[name])
                    row["saved_tensors"] = count
                    row["saved_mb"] = saved / 2**20
                    row["rel_diff"] = agreement.get(name, 0.0)
                if name.startswith("fused") and device.type == "cuda":
                    # the least traffic a fused forward + backward needs: read the logits and write the
                    # derivative (forward), read it and write the gradient (backward)
                    moved = 4 * inputs["logits"].numel() * inputs["logits"].element_size()
                    row["effective_gb_per_s"] = moved / (median * 1e-3) / 1e9
                rows_out.append(row)
        versus_stock = stats["vs_stock"]
        harmonic_over_stock = versus_stock["harmonic_fused"]["median_ms"] / stock_ms
        harmonic_over_sigmoid = stats["vs_sigmoid"]["harmonic_fused"]["median_ms"] / sigmoid_ms
        entry = {
            "scale": scale,
            "anchors": anchors,
            "fused_backend": default,
            "harmonic_fused_over_stock": harmonic_over_stock,
            "harmonic_fused_over_sigmoid": harmonic_over_sigmoid,
            "harmonic_reference_over_stock": versus_stock["harmonic_reference"]["median_ms"] / stock_ms,
            "harmonic_fused_watch_over_stock": versus_stock["harmonic_fused_watch"]["median_ms"] / stock_ms,
            "harmonic_fused_watch_over_sigmoid": stats["vs_sigmoid"]["harmonic_fused_watch"]["median_ms"] / sigmoid_ms,
            "reference_over_stock": versus_stock["reference"]["median_ms"] / stock_ms,
            "target_fused_over_stock": TARGET_FUSED_OVER_STOCK,
            "target_fused_over_sigmoid": TARGET_FUSED_OVER_SIGMOID,
            "meets_stock_target": harmonic_over_stock <= TARGET_FUSED_OVER_STOCK,
            "meets_sigmoid_target": harmonic_over_sigmoid <= TARGET_FUSED_OVER_SIGMOID,
            f"{default_name}_over_sigmoid": stats["vs_sigmoid"][default_name]["median_ms"] / sigmoid_ms,
        }
        for backend in backends:
            name = f"fused_{backend}"
            entry[f"{name}_over_stock"] = versus_stock[name]["median_ms"] / stock_ms
        if compile_seconds is not None:
            entry["compile_s"] = compile_seconds
        summary.append(entry)
        del inputs, timed, forward
    notes.append(f"memory: {peak_method}")
    notes.append(
        "stock = torchvision sigmoid_focal_loss(sum) over a one-hot target + generalized_box_iou_loss(sum); "
        "reference = harmonic.dense.focal_loss_per_anchor_reference(...).sum() + the same GIoU; "
        "fused_<backend> = harmonic.fused.focal_loss_per_anchor(..., backend).sum() + the same GIoU; "
        "harmonic_fused / harmonic_reference = the whole Harmonic + HIoU loss of a RetinaNet head "
        "(harmonic.dense.dense_harmonic_loss with fused=True / False, watch=False; box loss = L1 of the boxes / 100); "
        "harmonic_fused_watch = harmonic_fused with the watch statistics (watch=True, as the detectors run it); "
        "sigmoid = one torch.sigmoid pass over the logits (forward only)"
    )
    notes.append("targets (fused / stock <= 0.5, fused / sigmoid <= 4) are checked on harmonic_fused")
    notes.append(
        "group vs_stock: every method but the sigmoid, interleaved; group vs_sigmoid: the sigmoid, "
        f"harmonic_fused, harmonic_fused_watch and the default fused focal loss, interleaved in {SIGMOID_GROUP_ROUNDS} times as many "
        "rounds of their own"
    )
    notes.append(f"default fused backend on {device.type}: {default} (harmonic_fused uses it)")
    if device.type == "cpu":
        from harmonic.ops import native

        built = native.info()
        if built["available"]:
            notes.append(
                f"native kernel: {built['compiler']} {built['flags']}, "
                f"{'AVX-512 loop' if built['avx512'] else 'portable loop'}"
            )
        else:
            notes.append(f"native backend unavailable, not timed: {built['failure']}")
    if device.type == "cuda":
        peak_bw, how = _peak_bandwidth(device)
        if peak_bw is not None:
            for row in rows_out:
                if "effective_gb_per_s" in row:
                    row["fraction_of_peak_bandwidth"] = row["effective_gb_per_s"] * 1e9 / peak_bw
            notes.append(f"peak bandwidth {peak_bw / 1e9:.0f} GB/s from {how}")
        else:
            notes.append(how)
    notes.append(
        "fused_eager_parallel_chunks = the eager backend with chunk_elements = "
        f"{PARALLEL_CHUNK} (above torch's parallel grain size)"
    )
    return {
        "title": "dense loss, forward + backward (median of interleaved rounds)",
        "rows": rows_out,
        "summary": summary,
        "notes": notes,
        "settings": {"size_at_scale_1": size, "logit_prior": PRIOR_LOGIT, **asdict(config)},
    }


# ----------------------------------------------------------------------------------------------------
# the training-step section
# ----------------------------------------------------------------------------------------------------
#: the issue's targets for the Harmonic + HIoU loss against the baseline loss, whole training step
TARGET_STEP_TIME_RATIO = 1.03
TARGET_STEP_PEAK_RATIO = 1.0
#: slack of the memory flag: the Harmonic head keeps a few detached statistics (scalar tensors) after each
#: step, so its peak can exceed the baseline's by bytes where nothing else differs [D]
STEP_PEAK_SLACK = 0.005
#: the loss variants, as DetectorConfig fields: the host's own losses, and the Harmonic loss with the HIoU
#: term through the fused dense path and through the reference (non-fused) one
STEP_VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"loss": "baseline"},
    "harmonic_fused": {"loss": "harmonic", "hiou": True, "fused": True},
    "harmonic_reference": {"loss": "harmonic", "hiou": True, "fused": False},
}
#: the optimizer of a step: the training engine's defaults (SGD lr 0.01, momentum 0.9, weight decay 1e-4)
#: and the "shapes-cpu" preset's gradient clipping
STEP_SGD = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
STEP_GRAD_CLIP = 10.0
#: synthetic targets of the ResNet-50 setting: this many boxes per image, 80 classes (COCO's number)
R50_BOXES_PER_IMAGE = 5
R50_CLASSES = 80


def _shapes_batch(image_size: int, batch: int, seed: int) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """``batch`` images of the shapes dataset drawn in memory at ``image_size`` pixels (deterministic in
    ``seed``), with xyxy boxes and labels 1..5; an image that came out without objects is redrawn."""
    import numpy as np

    from harmonic.data.shapes import ShapesParams, render_shapes_image

    params = ShapesParams(image_size=image_size).validate()
    rng = np.random.default_rng(seed)
    images, targets = [], []
    while len(images) < batch:
        pixels, objects = render_shapes_image(rng, params)
        if not objects:
            continue
        xywh = torch.tensor([obj["box"] for obj in objects], dtype=torch.float32)
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).float().div(255.0))
        targets.append({
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "labels": torch.tensor([obj["category"] + 1 for obj in objects], dtype=torch.int64),
        })
    return images, targets


def _random_batch(
    image_size: int, batch: int, classes: int, boxes_per_image: int, seed: int
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Uniform-noise images with ``boxes_per_image`` random boxes (8 % to 30 % of the side) each, labels
    drawn from 1..``classes``; deterministic in ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, image_size, image_size, generator=generator))
        wh = image_size * (0.08 + 0.22 * torch.rand(boxes_per_image, 2, generator=generator))
        xy = (image_size - wh) * torch.rand(boxes_per_image, 2, generator=generator)
        labels = torch.randint(1, classes + 1, (boxes_per_image,), generator=generator)
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1), "labels": labels})
    return images, targets


def _setting_batch(
    setting: dict[str, Any], device: torch.device, seed: int
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """The batch of a :func:`train_step_settings` entry, on ``device``."""
    if setting["data"] == "shapes":
        images, targets = _shapes_batch(setting["image_size"], setting["batch"], seed)
    else:
        images, targets = _random_batch(
            setting["image_size"], setting["batch"], setting["detector"]["num_classes"], R50_BOXES_PER_IMAGE, seed
        )
    images = [image.to(device) for image in images]
    targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
    return images, targets


#: ``pretrained_backbone`` of a bench setting that loads a seeded, randomly initialized classification
#: network as its "pretrained" backbone (the layers freeze as with real weights; the timing is the same)
RANDOM_BACKBONE = "random-init"


def _random_backbone_file(backbone: str, seed: int) -> Path:
    """A state_dict file of torchvision's classification network of ``backbone`` (``resnet18_fpn`` ->
    ResNet-18), randomly initialized from ``seed``, in a temporary folder removed when the process exits."""
    import atexit
    import shutil
    import tempfile

    import torchvision

    folder = Path(tempfile.mkdtemp(prefix="harmonic-bench-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    torch.manual_seed(seed)
    network = getattr(torchvision.models, backbone.removesuffix("_fpn"))(weights=None)
    path = folder / f"{backbone}-random-{seed}.pt"
    torch.save(network.state_dict(), path)
    return path


def train_step_settings(config: BenchConfig) -> list[dict[str, Any]]:
    """The detectors and batches the training-step section times.

    * ``shapes_study`` (full runs only): the default study's detector, the "shapes-study" preset's (the
      ``shapes_cpu`` network with its backbone loaded as a pretrained one: BatchNorm frozen, conv1 and layer1
      frozen). The timing does not depend on the weights, so the backbone file it loads is a seeded,
      randomly initialized ResNet-18 (:data:`RANDOM_BACKBONE`) rather than the project's pretraining.
    * ``shapes_cpu``: the "shapes-cpu" training preset's detector (RetinaNet ResNet-18-FPN, 160 px, 64 FPN
      channels, its anchor sizes, trained from scratch), batch 2 of shapes images. Quick runs: 64 px, anchors
      scaled by 64/160.
    * ``r50_512`` (full runs only): RetinaNet ResNet-50-FPN, torchvision's 256 FPN channels and anchors,
      ``min_size = max_size = 512``, 80 classes, no pretrained weights; batch 2 on CUDA, 1 on the CPU (a
      step there takes seconds), of noise images with :data:`R50_BOXES_PER_IMAGE` random boxes each.

    Returns one dict per setting: ``name``, ``detector`` (DetectorConfig fields, loss options left out),
    ``image_size``, ``batch``, ``data`` ("shapes" or "random").
    """
    from harmonic.data.shapes import CATEGORIES
    from harmonic.engine import PRESETS

    preset = dict(PRESETS["shapes-cpu"]["detector"])
    preset_size = preset["min_size"]
    size = 64 if config.quick else preset_size
    detector = {**preset, "num_classes": len(CATEGORIES), "min_size": size, "max_size": size}
    if size != preset_size:
        detector["anchor_sizes"] = [[s * size / preset_size for s in level] for level in preset["anchor_sizes"]]
    settings = [{"name": "shapes_cpu", "detector": detector, "image_size": size, "batch": 2, "data": "shapes"}]
    if not config.quick:
        study = {**PRESETS["shapes-study"]["detector"], "num_classes": len(CATEGORIES), "pretrained_backbone": RANDOM_BACKBONE}
        settings.insert(0, {"name": "shapes_study", "detector": study, "image_size": preset_size, "batch": 2, "data": "shapes"})
        settings.append({
            "name": "r50_512",
            "detector": {"arch": "retinanet", "backbone": "resnet50_fpn", "num_classes": R50_CLASSES,
                         "min_size": 512, "max_size": 512},
            "image_size": 512,
            "batch": 2 if torch.device(config.device).type == "cuda" else 1,
            "data": "random",
        })
    return settings


def _step_models(
    detector: dict[str, Any], device: torch.device, seed: int, variants: dict[str, dict[str, Any]] | None = None
) -> dict[str, torch.nn.Module]:
    """One detector per loss variant (default :data:`STEP_VARIANTS`), all with the weights of the first
    (built from ``seed``)."""
    from harmonic.models import DetectorConfig, build_detector

    models: dict[str, torch.nn.Module] = {}
    state = None
    if detector.get("pretrained_backbone") == RANDOM_BACKBONE:
        detector = {**detector, "pretrained_backbone": str(_random_backbone_file(detector["backbone"], seed))}
    for name, loss_fields in (STEP_VARIANTS if variants is None else variants).items():
        torch.manual_seed(seed)
        model = build_detector(DetectorConfig(**detector, **loss_fields))
        if state is None:
            state = model.state_dict()
        else:
            model.load_state_dict(state, strict=True)
        models[name] = model.to(device).train()
    return models


def _step_function(
    model: torch.nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]], losses: list[float], where: str
) -> Callable[[], float]:
    """One training step of ``model`` on the batch, as the training engine takes it: forward (losses),
    backward of their sum, gradient clipping, an SGD step; the total loss is read back (as the engine does
    for its log) and appended to ``losses``. Gradients are set to None at the end of the step, so every
    step starts without them (and the CPU memory records see every allocation of the step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, **STEP_SGD)

    def step() -> float:
        loss_dict = model(images, targets)
        total = sum(loss_dict.values())
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, STEP_GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(total.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"train_step {where}: non-finite loss {value} at step {len(losses) + 1}")
        losses.append(value)
        return value

    return step


def _watch_ms(positives: int, device: torch.device, config: BenchConfig) -> float:
    """Median time of the watch statistics (:func:`harmonic.losses.watch_statistics`) of ``positives``
    positives and the one read-out of them, what a training step adds for watching the supplement's
    assumptions (no extra forward pass)."""
    from harmonic.losses.watch import watch_statistics

    generator = torch.Generator().manual_seed(config.seed)
    pieces = [torch.rand(max(1, positives), generator=generator).to(device) for _ in range(4)]

    def step() -> float:
        values = watch_statistics(*pieces)
        return float(torch.stack(list(values.values())).sum())

    samples = time_interleaved({"watch": step}, repeats=max(config.repeats, 20), warmup=config.warmup, device=device)
    return _summary_ms(samples["watch"])["median_ms"]


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def train_step_section(config: BenchConfig) -> dict[str, Any]:
    """A whole training step (forward, loss, backward, SGD step) with the baseline loss and with the
    Harmonic loss (supplement Eq. 1 [S]) plus the HIoU term (Eq. 11-13 [S]), fused and reference dense
    paths, side by side in one process; see :func:`train_step_settings` for the detectors.

    The variants start from the same weights (one state_dict) on the same batch and take their steps in
    interleaved rounds (:func:`time_interleaved`) after warm-up rounds; then one more step each is measured
    for peak memory (:func:`peak_memory_bytes`, the increase over the step's start). Returns ``{"title",
    "rows" (one per setting and variant: times, ratio to the baseline, peak memory, the first step's
    loss), "summary" (one per setting: harmonic/baseline ratios of time and peak memory against the
    targets, and the relative difference of the fused and reference first-step losses), "notes",
    "settings"}``.
    """
    import gc

    from harmonic.models import get_stats

    device = torch.device(config.device)
    rows_out: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    peak_method = ""
    settings = train_step_settings(config)
    for setting in settings:
        name, detector = setting["name"], setting["detector"]
        images, targets = _setting_batch(setting, device, config.seed)
        models = _step_models(detector, device, config.seed)
        losses: dict[str, list[float]] = {variant: [] for variant in models}
        steps = {
            variant: _step_function(model, images, targets, losses[variant], f"{name}/{variant}")
            for variant, model in models.items()
        }
        samples = time_interleaved(steps, repeats=config.repeats, warmup=config.warmup, device=device)
        stats = {variant: _summary_ms(times) for variant, times in samples.items()}
        peaks = {}
        for variant, step in steps.items():
            peaks[variant], peak_method = peak_memory_bytes(step, device)
        base_ms, base_peak = stats["baseline"]["median_ms"], peaks["baseline"]
        for variant in models:
            rows_out.append({
                "setting": name,
                "backbone": detector["backbone"],
                "image_size": setting["image_size"],
                "batch": setting["batch"],
                "classes": detector["num_classes"],
                "variant": variant,
                **stats[variant],
                "over_baseline": stats[variant]["median_ms"] / base_ms,
                "peak_mb": peaks[variant] / 2**20,
                "peak_over_baseline": _ratio(peaks[variant], base_peak),
                "first_loss": losses[variant][0],
            })
        fused_ratio = stats["harmonic_fused"]["median_ms"] / base_ms
        fused_peak_ratio = _ratio(peaks["harmonic_fused"], base_peak)
        first_fused, first_reference = losses["harmonic_fused"][0], losses["harmonic_reference"][0]
        entry = {
            "setting": name,
            "harmonic_fused_over_baseline": fused_ratio,
            "harmonic_reference_over_baseline": stats["harmonic_reference"]["median_ms"] / base_ms,
            "fused_over_reference": stats["harmonic_fused"]["median_ms"] / stats["harmonic_reference"]["median_ms"],
            "peak_harmonic_fused_over_baseline": fused_peak_ratio,
            "peak_harmonic_reference_over_baseline": _ratio(peaks["harmonic_reference"], base_peak),
            "target_time_ratio": TARGET_STEP_TIME_RATIO,
            "target_peak_ratio": TARGET_STEP_PEAK_RATIO,
            "meets_time_target": fused_ratio <= TARGET_STEP_TIME_RATIO,
            "meets_memory_target": (
                fused_peak_ratio is not None and fused_peak_ratio <= TARGET_STEP_PEAK_RATIO + STEP_PEAK_SLACK
            ),
            "peak_harmonic_fused_minus_baseline_mb": (peaks["harmonic_fused"] - base_peak) / 2**20,
            "first_loss_rel_diff_fused_vs_reference": abs(first_fused - first_reference) / max(abs(first_reference), 1e-30),
        }
        positives = get_stats(models["harmonic_fused"]).get("num_positives")
        if positives is not None:
            entry["positive_anchors"] = int(positives)
            entry["watch_ms"] = _watch_ms(int(positives), device, config)
            entry["watch_share_of_step"] = entry["watch_ms"] / stats["harmonic_fused"]["median_ms"]
        summary.append(entry)
        del models, steps, images, targets
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    notes = [
        "variants: baseline = DetectorConfig(loss='baseline') (torchvision's focal + L1 losses); "
        "harmonic_fused / harmonic_reference = DetectorConfig(loss='harmonic', hiou=True, fused=True / False)",
        "step = forward (losses), backward of their sum, clip_grad_norm_(10), SGD(lr 0.01, momentum 0.9, "
        "weight decay 1e-4) step, gradients set to None, total loss read back; all variants start from the "
        "same weights on the same batch",
        f"memory: {peak_method}; increase over the step's start (weights and momentum buffers excluded)"
        + ("" if device.type == "cuda" else "; approximate"),
        "watch_ms: the watch statistics of the step's positives and their read-out (in both variants, the "
        "baseline's as counterfactuals), timed apart; watch_share_of_step: over the Harmonic step (target <= 2%)",
        f"targets: harmonic_fused/baseline time <= {TARGET_STEP_TIME_RATIO}, peak memory <= "
        f"{TARGET_STEP_PEAK_RATIO} (the meets_* flags judge the fused path; the memory flag allows "
        f"{STEP_PEAK_SLACK:.1%}: the Harmonic head keeps a few scalar statistics after each step)",
    ]
    if not config.quick:
        notes.append("r50_512: noise images with random boxes, no pretrained weights; batch 1 on the CPU, 2 on CUDA")
    return {
        "title": "training step: forward, loss, backward, SGD step (median of interleaved rounds)",
        "rows": rows_out,
        "summary": summary,
        "notes": notes,
        "settings": {
            "detectors": {setting["name"]: setting["detector"] for setting in settings},
            "variants": STEP_VARIANTS,
            "sgd": STEP_SGD,
            "grad_clip": STEP_GRAD_CLIP,
            **asdict(config),
        },
    }


#: the engine's step against a plain float32 loop: images per second, engine over plain (targets of the issue)
TARGET_ENGINE_SPEEDUP = {"cpu": 2.0, "cuda": 3.0}
#: the engine_step section's variants: the plain loop, the engine's step, the engine's step with the other SGD
#: implementation (fused kernel / per-parameter loop) than its default
ENGINE_VARIANTS = ("plain", "engine", "engine_other_sgd")
#: the precision check's runs (``make sweep SWEEP=precision_fp32`` and ``precision_bf16``)
PRECISION_SWEEPS = ("precision_fp32", "precision_bf16")


def _engine_step_function(
    model, images, targets, device: torch.device, losses: list[float], amp: str = "auto",
    fused_optimizer: bool | None = None, channels_last: bool | None = None,
) -> Callable[[], float]:
    """The training engine's own step (:func:`harmonic.engine.training.train_step`) in the precision that
    ``TrainConfig(amp=amp, channels_last=channels_last)`` resolves to on ``device``, with the "shapes-cpu"
    preset's optimizer settings; ``model`` is put in that precision's memory layout here."""
    from harmonic.data import targets_to
    from harmonic.engine.config import TrainConfig
    from harmonic.engine.distributed import Context
    from harmonic.engine.precision import resolve_precision
    from harmonic.engine.training import build_optimizer, train_step
    from harmonic.models import get_stats

    cfg = TrainConfig.preset("shapes-cpu", warmup_iters=0, amp=amp, fused_optimizer=fused_optimizer,
                             channels_last=channels_last)
    precision = resolve_precision(cfg.amp, cfg.channels_last, device)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg, device, grad_scaler=precision.scaler)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
    ctx = Context(device=device)

    def step() -> float:
        record = train_step(model, model, optimizer, scaler, params, images, targets, cfg=cfg, ctx=ctx,
                            iteration=len(losses) + 1, epoch=0, precision=precision, targets_to=targets_to,
                            get_stats=get_stats, checkpoint_path=Path("unused"))
        losses.append(record["loss"])
        return record["loss"]

    step.precision = {**precision.describe(), "fused_optimizer": bool(optimizer.defaults.get("fused"))}  # type: ignore[attr-defined]
    return step


def _plain_step_function(model, images, targets, losses: list[float]) -> Callable[[], float]:
    """What a user would otherwise write, as torchvision's detection references do: float32, ``model(images,
    targets)``, the sum of the losses, backward, an SGD step (lr 0.01, momentum 0.9, weight decay 1e-4)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, **STEP_SGD)

    def step() -> float:
        loss_dict = model(images, targets)
        total = sum(loss for loss in loss_dict.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(float(total.detach()))
        return losses[-1]

    return step


def engine_step_section(config: BenchConfig) -> dict[str, Any]:
    """The training engine's step (baseline loss) against a plain float32 PyTorch loop over the same
    torchvision model, weights and batch, side by side in interleaved rounds after warm-up; peak memory of
    one more step each. Settings as :func:`train_step_settings`. Reports engine images/s over plain images/s
    and the engine's peak memory over the plain loop's, against the targets (at least 2x on the CPU, 3x on
    CUDA; memory no higher), with the precision the engine chose; beside them the engine's step with the
    other SGD implementation than its default (``TrainConfig.fused_optimizer``), whose ratio to it measures
    that lever."""
    import gc

    device = torch.device(config.device)
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    peak_method = ""
    target = TARGET_ENGINE_SPEEDUP.get(device.type, 2.0)
    for setting in train_step_settings(config):
        name, detector = setting["name"], setting["detector"]
        images, targets = _setting_batch(setting, device, config.seed)
        models = _step_models(detector, device, config.seed, variants={variant: {"loss": "baseline"} for variant in ENGINE_VARIANTS})
        losses: dict[str, list[float]] = {variant: [] for variant in ENGINE_VARIANTS}
        steps = {
            "plain": _plain_step_function(models["plain"], images, targets, losses["plain"]),
            "engine": _engine_step_function(models["engine"], images, targets, device, losses["engine"]),
        }
        # the same step with the other SGD implementation (fused kernel or torch's default) than the engine's
        # default on this device: the lever's measurement, where build_optimizer allows the other one
        engine_fused = steps["engine"].precision["fused_optimizer"]  # type: ignore[attr-defined]
        try:
            steps["engine_other_sgd"] = _engine_step_function(models["engine_other_sgd"], images, targets, device,
                                                              losses["engine_other_sgd"], fused_optimizer=not engine_fused)
        except ValueError:  # no fused kernel for the device, or float16's gradient scaler
            pass
        samples = time_interleaved(steps, repeats=config.repeats, warmup=config.warmup, device=device)
        stats = {variant: _summary_ms(times) for variant, times in samples.items()}
        peaks = {}
        for variant, step in steps.items():
            peaks[variant], peak_method = peak_memory_bytes(step, device)
        for variant in steps:
            rows.append({"setting": name, "variant": variant, **stats[variant],
                         "images_per_s": setting["batch"] * 1000.0 / stats[variant]["median_ms"],
                         "peak_mb": peaks[variant] / 2**20, "first_loss": losses[variant][0]})
        speedup = stats["plain"]["median_ms"] / stats["engine"]["median_ms"]
        fused_gain = None
        if "engine_other_sgd" in stats:  # torch's default SGD's time over the fused kernel's, whichever the engine takes
            loop, fused = ("engine_other_sgd", "engine") if engine_fused else ("engine", "engine_other_sgd")
            fused_gain = stats[loop]["median_ms"] / stats[fused]["median_ms"]
        peak_ratio = _ratio(peaks["engine"], peaks["plain"])
        summary.append({
            "setting": name, "engine_over_plain_images_per_s": speedup, "target_speedup": target,
            "fused_optimizer_gain": fused_gain,
            "meets_speed_target": speedup >= target,
            "peak_engine_over_plain": peak_ratio,
            "meets_memory_target": peak_ratio is not None and peak_ratio <= 1.0 + STEP_PEAK_SLACK,
            "first_loss_rel_diff": abs(losses["engine"][0] - losses["plain"][0]) / max(abs(losses["plain"][0]), 1e-30),
            **steps["engine"].precision,  # type: ignore[attr-defined]
        })
        del models, steps, images, targets
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "title": "engine step against a plain float32 loop (median of interleaved rounds)",
        "rows": rows,
        "summary": summary,
        "notes": [
            "plain = float32, model(images, targets), sum, backward, SGD step (torchvision's references); engine = "
            "harmonic.engine.training.train_step in the precision TrainConfig(amp='auto') resolves to, channels_last "
            "with autocast, losses in float32, gradient clipping, the loss read back for the log",
            f"memory: {peak_method}; increase over the step's start" + ("" if device.type == "cuda" else "; approximate"),
            "engine_other_sgd = the engine's step with the other SGD implementation than the engine's default on the "
            "device (TrainConfig.fused_optimizer: the fused kernel on CUDA without a gradient scaler, torch's default "
            "elsewhere, the per-parameter loop on the CPU); fused_optimizer_gain = torch's default implementation's "
            "median over the fused kernel's (on CUDA torch's default is its foreach implementation)",
            f"target: engine images/s >= {target} x plain, peak memory <= plain",
        ],
        "settings": {"detectors": {s["name"]: s["detector"] for s in train_step_settings(config)}, **asdict(config)},
    }


def precision_accuracy_section(config: BenchConfig, results_dir: Path = Path("results")) -> dict[str, Any]:
    """The accuracy check of the engine's fast path, read from finished runs (it trains nothing): COCO AP of
    the from-scratch study's baseline (shapes-cpu) in float32 (sweep ``precision_fp32``) and with bfloat16 autocast and
    channels_last (``precision_bf16``), seed by seed, the mean difference and the float32 seeds' spread."""
    import json
    import statistics

    runs: dict[str, dict[int, float]] = {}
    for sweep in PRECISION_SWEEPS:
        for metrics in sorted((results_dir / "runs").glob(f"{sweep}-baseline-s*/metrics.json")):
            seed = int(metrics.parent.name.rsplit("-s", 1)[1])
            runs.setdefault(sweep, {})[seed] = 100.0 * json.loads(metrics.read_text())["coco"]["AP"]
    fp32, bf16 = runs.get("precision_fp32", {}), runs.get("precision_bf16", {})
    seeds = sorted(set(fp32) & set(bf16))
    rows = [{"seed": s, "AP_fp32": fp32[s], "AP_bf16": bf16[s], "difference": bf16[s] - fp32[s]} for s in seeds]
    summary: list[dict[str, Any]] = []
    if seeds:
        diffs = [r["difference"] for r in rows]
        spread = statistics.stdev(fp32[s] for s in seeds) if len(seeds) > 1 else None
        summary.append({
            "seeds": len(seeds), "mean_AP_fp32": statistics.fmean(fp32[s] for s in seeds),
            "mean_AP_bf16": statistics.fmean(bf16[s] for s in seeds), "mean_difference": statistics.fmean(diffs),
            "sd_AP_fp32_over_seeds": spread,
            "within_seed_noise": None if spread is None else abs(statistics.fmean(diffs)) <= spread,
        })
    return {
        "title": "accuracy of the fast path: the from-scratch study's baseline (shapes-cpu), bfloat16 + channels_last against float32",
        "rows": rows,
        "summary": summary,
        "notes": ["AP in percent, from results/runs/precision_*-baseline-s*/metrics.json (make sweep "
                  "SWEEP=precision_fp32 and SWEEP=precision_bf16); same seeds, same data, same schedule",
                  "within_seed_noise: |mean difference| <= the float32 runs' standard deviation over seeds"],
        "settings": {"sweeps": list(PRECISION_SWEEPS)},
    }


#: the backend the levers section compiles the engine's network with (harmonic.engine.precision.compile_network)
LEVER_COMPILE_BACKEND = "inductor"
#: the sweep whose finished runs' logs give the data-loading share of an iteration
DATA_SWEEP_RUNS = "default-baseline-s*"
#: a worker of the thread-layout measurement: ``python -c LAYOUT_WORKER <tools folder> <json arguments>``
LAYOUT_WORKER = "import sys; sys.path.insert(0, sys.argv[1]); import bench; bench.layout_worker(sys.argv[2])"
#: seconds a thread layout's workers get to start, warm up and time their steps
LAYOUT_TIMEOUT_S = 900.0


def layout_worker(arguments: str) -> None:
    """One run of the thread-layout measurement, in its own process: the engine's step of the setting named
    in ``arguments`` (JSON: setting, threads, repeats, warmup, seed, quick) on the CPU with that many torch
    threads. It warms up, prints ``ready``, waits for a line on stdin (so that the runs of one layout time
    their steps side by side), then prints its step times in seconds as one JSON line."""
    args = json.loads(arguments)
    torch.set_num_threads(args["threads"])
    config = BenchConfig.for_run(device="cpu", quick=args["quick"], seed=args["seed"], compile=False)
    setting = next(s for s in train_step_settings(config) if s["name"] == args["setting"])
    device = torch.device("cpu")
    images, targets = _setting_batch(setting, device, config.seed)
    model = _step_models(setting["detector"], device, config.seed, variants={"engine": {"loss": "baseline"}})["engine"]
    step = _engine_step_function(model, images, targets, device, [])
    for _ in range(args["warmup"]):
        step()
    print("ready", flush=True)
    if not sys.stdin.readline():  # the parent is gone: nothing to time for
        sys.exit(1)
    times = []
    for _ in range(args["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"times": times}), flush=True)


def _time_layout(setting: str, runs: int, threads: int, config: BenchConfig) -> list[list[float]]:
    """Step times (seconds) of ``runs`` worker processes with ``threads`` torch threads each, started
    together and timed side by side (see :func:`layout_worker`); one list per run. A worker that fails,
    or does not answer within :data:`LAYOUT_TIMEOUT_S`, is a ``RuntimeError``; every worker is gone
    when this returns or raises."""
    import select
    import subprocess

    arguments = json.dumps({"setting": setting, "threads": threads, "repeats": config.repeats,
                            "warmup": config.warmup, "seed": config.seed, "quick": config.quick})
    command = [sys.executable, "-c", LAYOUT_WORKER, str(Path(__file__).resolve().parent), arguments]
    what = f"a thread-layout worker ({runs} x {threads} threads, setting {setting})"
    workers: list[subprocess.Popen] = []
    try:
        for _ in range(runs):
            workers.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        deadline = time.monotonic() + LAYOUT_TIMEOUT_S
        for worker in workers:
            ready, _, _ = select.select([worker.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = worker.stdout.readline() if ready else ""  # type: ignore[union-attr]
            if line.strip() != "ready":
                why = "did not get ready in time" if not ready else "failed before timing (its stderr is above)"
                raise RuntimeError(f"{what} {why}")
        for worker in workers:
            worker.stdin.write("go\n")  # type: ignore[union-attr]
            worker.stdin.flush()  # type: ignore[union-attr]
        outputs = []
        for worker in workers:
            try:
                output, _ = worker.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{what} did not finish its timed steps in time") from None
            if worker.returncode != 0 or not output.strip():
                raise RuntimeError(f"{what} exited with status {worker.returncode} while timing (its stderr is above)")
            outputs.append(json.loads(output.strip().splitlines()[-1])["times"])
    except BrokenPipeError:
        raise RuntimeError(f"{what} exited before timing (its stderr is above)") from None
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
            for stream in (worker.stdin, worker.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except BrokenPipeError:  # a buffered "go" to a worker that is gone
                        pass
    return outputs


def data_loading_share(results_dir: Path = Path("results")) -> list[dict[str, Any]]:
    """The share of an iteration the engine spent waiting for its batch (decoding the images, the
    transforms, collating), read from the logs of the default study's finished baseline runs (their
    ``data_time`` and ``time`` of every iteration): what a cache of decoded images could save at most."""
    from harmonic.utils.runlog import read_log

    rows = []
    for log in sorted((results_dir / "runs").glob(f"{DATA_SWEEP_RUNS}/log.jsonl.gz")):
        records = [record for record in read_log(log) if "data_time" in record and "time" in record]
        data, total = [r["data_time"] for r in records], [r["time"] for r in records]
        if total:
            rows.append({"run": log.parent.name, "iterations": len(total),
                         "median_data_ms": 1000.0 * statistics.median(data),
                         "median_iteration_ms": 1000.0 * statistics.median(total),
                         "data_share": sum(data) / sum(total)})
    return rows


def levers_section(config: BenchConfig) -> dict[str, Any]:
    """The levers of the engine's throughput that are not in its default step, each measured on the default
    study's detector (the first setting of :func:`train_step_settings`):

    * ``compile``: the engine's step with its network compiled (``TrainConfig(compile=True)``,
      :func:`harmonic.engine.precision.compile_network`) against the same step eager, in interleaved rounds,
      with the time the first compiled steps took (full runs with compiling on; CUDA or CPU);
    * ``thread_layout`` (CPU only): images per second of the whole machine when one run takes one thread,
      when one run takes every core, and when ``make sweep``'s runs share the machine side by side (its
      ``jobs="auto"`` runs with their share of the cores each, as
      :func:`harmonic.experiments.notebooks.resolve_jobs` and ``threads_per_job`` give them); each run is
      its own process;
    * ``data_loading``: the share of an iteration the engine waited for its batch in the default study's
      finished runs (what a decoded-image cache could save at most).
    """
    import gc
    import os

    from harmonic.engine.precision import compile_network
    from harmonic.experiments.notebooks import resolve_jobs, threads_per_job

    device = torch.device(config.device)
    setting = train_step_settings(config)[0]
    name = setting["name"]
    notes: list[str] = []
    compile_rows: list[dict[str, Any]] = []
    if config.compile:
        images, targets = _setting_batch(setting, device, config.seed)
        models = _step_models(setting["detector"], device, config.seed,
                              variants={variant: {"loss": "baseline"} for variant in ("eager", "compiled")})
        compile_network(models["compiled"], backend=LEVER_COMPILE_BACKEND)
        losses: dict[str, list[float]] = {"eager": [], "compiled": []}
        steps = {variant: _engine_step_function(models[variant], images, targets, device, losses[variant])
                 for variant in ("eager", "compiled")}
        start = time.perf_counter()
        steps["compiled"]()
        _synchronize(device)
        first_s = time.perf_counter() - start
        samples = time_interleaved(steps, repeats=config.repeats, warmup=config.warmup, device=device)
        stats = {variant: _summary_ms(times) for variant, times in samples.items()}
        compile_rows = [{"setting": name, "variant": variant, "backend": LEVER_COMPILE_BACKEND if variant == "compiled" else "eager",
                         **stats[variant]} for variant in ("eager", "compiled")]
        compile_rows[1]["first_step_s"] = first_s
        del models, steps
        gc.collect()
    else:
        notes.append("compile: not timed (--no-compile or --quick)")
    layout_rows: list[dict[str, Any]] = []
    if device.type == "cpu":
        cores, jobs = os.cpu_count() or 1, resolve_jobs("auto")
        layouts = [(1, 1)] + ([(1, cores), (jobs, threads_per_job(jobs))] if jobs > 1 else [])
        for runs, threads in layouts:
            per_run = [_summary_ms(times) for times in _time_layout(name, runs, threads, config)]
            layout_rows.append({"setting": name, "runs": runs, "threads_per_run": threads,
                                "median_ms_per_run": statistics.median(s["median_ms"] for s in per_run),
                                "images_per_s": sum(setting["batch"] * 1000.0 / s["median_ms"] for s in per_run)})
    else:
        notes.append(f"thread_layout: CPU only (the device is {device.type})")
    data_rows = data_loading_share()
    if not data_rows:
        notes.append(f"data_loading: no finished runs matching results/runs/{DATA_SWEEP_RUNS} (make reproduce)")
    summary: dict[str, Any] = {"setting": name}
    if compile_rows:
        summary["compiled_over_eager_images_per_s"] = compile_rows[0]["median_ms"] / compile_rows[1]["median_ms"]
        summary["compile_first_step_s"] = compile_rows[1]["first_step_s"]
    if len(layout_rows) == 3:
        one, wide, side = (row["images_per_s"] for row in layout_rows)
        summary.update({"cores": layout_rows[1]["threads_per_run"], "sweep_runs": layout_rows[2]["runs"],
                        "sweep_threads_per_run": layout_rows[2]["threads_per_run"],
                        "one_run_all_threads_over_one_thread": wide / one,
                        "runs_side_by_side_over_one_run_all_threads": side / wide,
                        "runs_side_by_side_over_one_thread": side / one})
    if data_rows:
        summary["data_share"] = statistics.fmean(row["data_share"] for row in data_rows)
    return {
        "title": "levers outside the engine's default step: compiling, the thread layout, a decoded-image cache",
        "compile": compile_rows,
        "thread_layout": layout_rows,
        "data_loading": data_rows,
        "summary": [summary],
        "notes": notes + [
            "compile: the engine's own step (as engine_step), network compiled by compile_network, median of "
            "interleaved rounds; first_step_s includes compiling, or loading the compiled code from torch's cache",
            "thread_layout: images/s of the machine summed over the runs, each run's median step time; runs are "
            "separate processes timed side by side after their warm-up",
            f"data_loading: from results/runs/{DATA_SWEEP_RUNS}/log.jsonl.gz (the runs' own machine, not this one)",
        ],
        "settings": {"detector": setting["detector"], "compile_backend": LEVER_COMPILE_BACKEND, **asdict(config)},
    }


#: the amp_modes section's modes: name -> (TrainConfig.amp, TrainConfig.channels_last); the names without a
#: layout are the layout ``channels_last=None`` resolves to (contiguous in float32, channels_last with autocast)
AMP_MODE_VARIANTS = {"off": ("off", None), "off_channels_last": ("off", True), "bf16": ("bf16", None),
                     "bf16_contiguous": ("bf16", False), "fp16": ("fp16", None)}


#: the README's words for the amp_modes section's modes
AMP_MODE_NAMES = {"off_channels_last": "float32 in channels_last", "bf16": "bf16 (channels_last)",
                  "bf16_contiguous": "bf16 contiguous", "fp16": "fp16 (channels_last, gradient scaler)"}


def amp_modes_section(config: BenchConfig) -> dict[str, Any]:
    """The engine's step in each autocast mode the device can run (``amp="off"``: float32; ``"bf16"``;
    ``"fp16"`` on CUDA), and float32 and bfloat16 each in the other memory layout than the one
    ``channels_last=None`` gives them, side by side on the first setting of :func:`train_step_settings` (the
    default study's detector in full runs): what ``amp="auto"`` and ``channels_last=None`` choose between on
    this machine, each lever on its own, and what it would cost to force bfloat16 where the device only
    emulates it."""
    from harmonic.utils.devices import native_bf16

    device = torch.device(config.device)
    setting = train_step_settings(config)[0]
    images, targets = _setting_batch(setting, device, config.seed)
    modes = ["off", "off_channels_last", "bf16", "bf16_contiguous"] + (["fp16"] if device.type == "cuda" else [])
    models = _step_models(setting["detector"], device, config.seed, variants={m: {"loss": "baseline"} for m in modes})
    losses: dict[str, list[float]] = {mode: [] for mode in modes}
    steps = {mode: _engine_step_function(models[mode], images, targets, device, losses[mode], amp=AMP_MODE_VARIANTS[mode][0],
                                         channels_last=AMP_MODE_VARIANTS[mode][1]) for mode in modes}
    samples = time_interleaved(steps, repeats=config.repeats, warmup=config.warmup, device=device)
    stats = {mode: _summary_ms(times) for mode, times in samples.items()}
    rows = [{"setting": setting["name"], "mode": mode, "amp": AMP_MODE_VARIANTS[mode][0],
             **steps[mode].precision, **stats[mode]}  # type: ignore[attr-defined]
            for mode in modes]
    summary = [{"setting": setting["name"], "native_bf16": native_bf16(device),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                **{f"{mode}_over_float32": stats[mode]["median_ms"] / stats["off"]["median_ms"] for mode in modes[1:]}}]
    return {
        "title": "the engine's step in each autocast mode and memory layout (median of interleaved rounds)",
        "rows": rows,
        "summary": summary,
        "notes": ["amp='auto' takes bfloat16 only where native_bf16 is true (harmonic.utils.devices); a ratio above 1 "
                  "is what forcing a mode would cost",
                  "off / bf16 / fp16: the layout channels_last=None gives (contiguous in float32, channels_last with "
                  "autocast); off_channels_last and bf16_contiguous: the other layout"],
        "settings": {"detector": setting["detector"], "modes": {m: AMP_MODE_VARIANTS[m] for m in modes}, **asdict(config)},
    }


#: the profiler's names of the convolution kernels (forward and backward, every CPU backend); what the
#: step breakdown counts as convolution time
CONV_OPS = frozenset({"aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
                      "aten::_slow_conv2d_backward", "aten::thnn_conv2d", "aten::_nnpack_spatial_convolution",
                      "aten::slow_conv_dilated2d", "aten::mkldnn_convolution_backward"})
#: copies between tensors: autocast's casts of the weights and activations (and their gradients back), the
#: images copied into the padded batch
COPY_OPS = frozenset({"aten::copy_", "aten::_to_copy"})
BREAKDOWN_PARTS = ("convolution", "optimizer", "copies", "other")


def breakdown_ms(events) -> dict[str, float]:
    """Partition the self CPU time of a profile's ``events`` (``torch.profiler.profile().events()``) into
    :data:`BREAKDOWN_PARTS`, in milliseconds: every op under an ``Optimizer.step`` record is "optimizer",
    else :data:`CONV_OPS` are "convolution", :data:`COPY_OPS` "copies", and the rest "other" (the loss, the
    heads' box coding and matching, elementwise ops, autograd and Python between ops, the profiler's own
    cost per op). The parts sum to the total self time."""
    parts = dict.fromkeys(BREAKDOWN_PARTS, 0.0)
    for event in events:
        node, in_optimizer = event, False
        while node is not None:
            if node.name.startswith("Optimizer.step"):
                in_optimizer = True
                break
            node = node.cpu_parent
        part = ("optimizer" if in_optimizer else "convolution" if event.name in CONV_OPS
                else "copies" if event.name in COPY_OPS else "other")
        parts[part] += event.self_cpu_time_total / 1000.0
    return parts


def rest_speedup_needed(row: dict[str, Any], target: float) -> float | None:
    """How many times faster everything but the convolutions would have to run in the engine's profiled
    step (a ``step_breakdown`` summary row) for engine / plain to reach ``target``, its convolutions as
    they are; None where the convolutions alone take longer than the target allows. In units of the
    engine's step: convolutions ``c``, the rest ``1 - c``, the plain step ``R`` (the profiled ratio), and
    the rest may take ``R / target - c``."""
    share = row["engine_convolution_share"]
    allowed = row["profiled_engine_over_plain_images_per_s"] / target - share
    return None if allowed <= 0 else (1.0 - share) / allowed


def step_breakdown_section(config: BenchConfig) -> dict[str, Any]:
    """Where the time of a training step goes, the engine's step against the plain float32 loop (the
    steps of :func:`engine_step_section`, baseline loss): each profiled with ``torch.profiler`` over
    ``repeats`` steps after warm-up, its self CPU time split by :func:`breakdown_ms`. The summary gives each
    part's share and the engine/plain ratio the engine could reach at most if its convolutions cost
    nothing (the plain step's profiled time over the engine's without its convolutions): the bound the
    other parts put on the throughput target. CPU only: on CUDA the CPU profile does not measure the
    kernels' time (the section is then empty, with a note)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(config.device)
    if device.type != "cpu":
        return {"title": "where a training step's time goes (CPU profile)", "rows": [], "summary": [],
                "notes": [f"skipped on {device.type}: the CPU profiler does not time the device's kernels"]}
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for setting in train_step_settings(config):
        name = setting["name"]
        images, targets = _setting_batch(setting, device, config.seed)
        models = _step_models(setting["detector"], device, config.seed,
                              variants={variant: {"loss": "baseline"} for variant in ("plain", "engine")})
        losses: dict[str, list[float]] = {"plain": [], "engine": []}
        steps = {"plain": _plain_step_function(models["plain"], images, targets, losses["plain"]),
                 "engine": _engine_step_function(models["engine"], images, targets, device, losses["engine"])}
        per_step: dict[str, dict[str, float]] = {}
        for variant, step in steps.items():
            for _ in range(config.warmup):
                step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(config.repeats):
                    step()
            per_step[variant] = {part: ms / config.repeats for part, ms in breakdown_ms(prof.events()).items()}
            total = sum(per_step[variant].values())
            rows.append({"setting": name, "variant": variant, "total_ms": total,
                         **{f"{part}_ms": per_step[variant][part] for part in BREAKDOWN_PARTS},
                         **{f"{part}_share": per_step[variant][part] / total for part in BREAKDOWN_PARTS}})
        plain_total, engine_total = (sum(per_step[v].values()) for v in ("plain", "engine"))
        summary.append({
            "setting": name, "profiled_engine_over_plain_images_per_s": plain_total / engine_total,
            **{f"engine_{part}_share": per_step["engine"][part] / engine_total for part in BREAKDOWN_PARTS},
            "plain_convolution_share": per_step["plain"]["convolution"] / plain_total,
            # how much faster each part runs in the engine's step: its convolutions, and everything else
            "convolution_plain_over_engine": per_step["plain"]["convolution"] / per_step["engine"]["convolution"],
            "rest_plain_over_engine": (plain_total - per_step["plain"]["convolution"])
            / (engine_total - per_step["engine"]["convolution"]),
            "engine_over_plain_bound_without_convolutions": plain_total / (engine_total - per_step["engine"]["convolution"]),
        })
        del models, steps, images, targets
    return {
        "title": "where a training step's time goes: the engine's step and the plain loop, profiled",
        "rows": rows,
        "summary": summary,
        "notes": ["self CPU time per step from torch.profiler, mean over the profiled steps; the profiler adds a "
                  "small cost per op (in 'other'), so its engine/plain ratio can differ from engine_step's timing",
                  "optimizer = everything under SGD's step (both steps use torch's per-parameter implementation on "
                  "the CPU); copies = aten::copy_ and aten::_to_copy outside it (autocast's casts among them)",
                  "bound without convolutions = plain time / (engine time - engine convolution time): the engine's "
                  "throughput over the plain loop's if its convolutions took no time at all"],
        "settings": {"detectors": {s["name"]: s["detector"] for s in train_step_settings(config)}, **asdict(config)},
    }


#: section name -> function(config) -> dict; every list of flat records in the dict is printed as a table
SECTIONS: dict[str, Callable[[BenchConfig], dict[str, Any]]] = {
    "dense_loss": dense_loss_section,
    "train_step": train_step_section,
    "engine_step": engine_step_section,
    "amp_modes": amp_modes_section,
    "precision_accuracy": precision_accuracy_section,
    "step_breakdown": step_breakdown_section,
    "levers": levers_section,
}


# ----------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------
def _format_value(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.2e}"
    return str(value)


def format_tables(name: str, section: dict[str, Any]) -> str:
    """Every list of flat records (dicts of scalars) in ``section`` as a text table, and every dict's
    scalar entries on one line: any section, whatever its keys."""
    lines = [f"== {name}: {section.get('title', '')}"]
    for key, value in section.items():
        if isinstance(value, dict):
            scalars = [f"{k}={_format_value(v)}" for k, v in value.items() if not isinstance(v, (dict, list))]
            if scalars:
                lines.append(f"-- {key}: " + " ".join(scalars))
            continue
        if not (isinstance(value, list) and value and all(isinstance(item, dict) for item in value)):
            continue
        columns: list[str] = []
        for record in value:
            columns.extend(column for column in record if column not in columns and not isinstance(record[column], (dict, list)))
        cells = [[_format_value(record.get(column, "")) for column in columns] for record in value]
        widths = [max(len(column), *(len(row[i]) for row in cells)) for i, column in enumerate(columns)]
        lines.append(f"-- {key}")
        lines.append("  ".join(column.rjust(width) for column, width in zip(columns, widths)))
        lines.extend("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells)
    for note in section.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _check_finite(obj: object, where: str = "") -> None:
    """Refuse to write a result with NaN or inf in it (name the field)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"benchmark result {where or '<root>'} is {obj}")
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_finite(value, f"{where}.{key}" if where else str(key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            _check_finite(value, f"{where}[{index}]")


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------
def _load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        import os

        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "bench") -> None:
    """The benchmark's options (shared by ``python tools/bench.py`` and a CLI command)."""
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write (atomically)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds, no compiling (for tests)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present, else cpu)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed rounds (default 7, quick 2)")
    parser.add_argument("--warmup", type=positive_int, default=None, help="untimed rounds (default 2, quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads for the run (default: torch's own choice)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other sections of an existing --out file and replace only the ones run "
                             "(each section records when it was measured)")
    parser.add_argument("--readme", type=Path, default=None,
                        help="also refresh the measured ratios in this README's bench block")
    parser.add_argument("--readme-block", default="bench",
                        help="the README block to refresh (default 'bench'; 'bench-avx2' for a CPU without native "
                             "bfloat16)")
    compile_group = parser.add_mutually_exclusive_group()
    compile_group.add_argument("--compile", dest="compile", action="store_true", default=None,
                               help="also time the torch.compile backend (default: yes unless --quick)")
    compile_group.add_argument("--no-compile", dest="compile", action="store_false")


def run(args: argparse.Namespace, command_name: str = "bench") -> int:
    """Run the selected sections, print their tables and write the JSON file; returns the exit code."""
    from harmonic.utils.files import atomic_write_json
    from harmonic.utils.provenance import provenance

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available here")
    names = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise SystemExit(f"--sections: unknown section(s) {unknown or names}; choose from {list(SECTIONS)}")
    config = BenchConfig.for_run(
        device=device, quick=args.quick, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
        compile=args.compile, threads=args.threads,
    )
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    sections = _previous_sections(args.out) if getattr(args, "merge", False) else {}
    record = provenance(asdict(config), seed=config.seed, device=device)
    for name in names:
        load_before = _load_average()
        sections[name] = SECTIONS[name](config)
        sections[name]["machine"] = {
            "torch_threads": torch.get_num_threads(),
            "load_average_1min_before": load_before,
            "load_average_1min_after": _load_average(),
            "measured": record["created"],
            "commit": record.get("git", {}).get("commit"),
            "cpu_model": record["device"].get("cpu_model"),
            "cpu_capability": record["device"].get("cpu_capability"),
            "cpu_native_bf16": record["device"].get("cpu_native_bf16"),
        }
        print(format_tables(name, sections[name]), flush=True)
    # ``python -m`` puts this file's absolute path in argv[0]: keep the machine's paths out of results
    record["argv"] = ["python tools/bench.py", *[str(arg) for arg in getattr(args, "argv", sys.argv[1:])]]
    result = {"provenance": record, "sections": sections}
    _check_finite(result)
    path = atomic_write_json(args.out, result)
    print(f"wrote {path}")
    if getattr(args, "readme", None) is not None:
        block = getattr(args, "readme_block", "bench")
        command = "make bench" if block == "bench" else (
            f"python tools/bench.py --out {Path(args.out).as_posix()} --readme {Path(args.readme).as_posix()} "
            f"--readme-block {block}" + (f" --threads {config.threads}" if config.threads is not None else ""))
        replace_block(args.readme, block, readme_markdown(result, Path(args.out), command))
        print(f"refreshed the {block} block of {args.readme}")
    return 0


def _previous_sections(path: Path) -> dict[str, Any]:
    """The sections of an earlier ``--out`` file (``--merge``), in the order of :data:`SECTIONS`."""
    if not Path(path).is_file():
        return {}
    try:
        sections = json.loads(Path(path).read_text())["sections"]
    except (ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"--merge: {path} is not a bench result ({err}); run without --merge to replace it") from err
    return {name: sections[name] for name in SECTIONS if name in sections}


def readme_markdown(result: dict, json_path: Path, command: str = "make bench") -> str:
    """The README's bench block: the ratios of each section's summary, as measured (never typed);
    ``command`` is the one named as having measured them."""
    machines = [section["machine"] for section in result["sections"].values()]
    threads = machines[0]["torch_threads"]
    # the levers section's own side-by-side worker processes raise the load it records after itself
    loads = [section["machine"].get(key) for name, section in result["sections"].items()
             for key in ("load_average_1min_before",) + (() if name == "levers" else ("load_average_1min_after",))]
    loads = [load for load in loads if load is not None]
    lines = [f"Measured by `{command}` ({json_path.as_posix()}); device: "
             f"{result['provenance']['device'].get('device')}, torch threads: {threads}."]
    if loads and max(loads) > threads + 0.5:
        lines[0] += (f" The machine was busy during this run (1-minute load average up to {max(loads):.1f} "
                     f"against {threads} thread(s)): ratios are measured side by side in interleaved rounds, "
                     f"but contention moves them; rerun `{command}` on a quiet machine before quoting them.")
    order = list(SECTIONS)  # the sections in their own order (a JSON file holds them sorted)
    measured = {name: result["sections"][name]["machine"].get("measured")
                for name in sorted(result["sections"], key=lambda n: order.index(n) if n in order else len(order))}

    def where(machine: dict) -> str:
        if machine.get("cpu_capability") is None:
            return "CPU not recorded"
        bf16 = "native bfloat16" if machine.get("cpu_native_bf16") else "no native bfloat16"
        return f"{machine.get('cpu_model')}, {machine['cpu_capability']}, {bf16}"

    if len(set(measured.values())) <= 1 and machines[0].get("cpu_capability") is not None:
        lines[0] += f" CPU: {where(machines[0])}."
    if len(set(measured.values())) > 1:
        lines[0] += (" The sections were measured in separate runs (`--merge`), possibly on different machines: "
                     + "; ".join(f"{name} at {when or 'an unrecorded time'} ({where(result['sections'][name]['machine'])})"
                                 for name, when in measured.items()) + ".")
    lines.append("")
    dense = result["sections"].get("dense_loss")
    if dense:
        lines += ["Dense loss, forward + backward: the whole Harmonic + HIoU loss of a RetinaNet head through the "
                  f"fused path ({dense['summary'][0]['fused_backend']} backend), against torchvision's stock "
                  "focal + GIoU and against one `torch.sigmoid` pass over the same logits.", "",
                  "| scale | anchors | Harmonic fused / stock (target <= 0.5) | Harmonic fused / one sigmoid pass "
                  "(target <= 4) | with the watch statistics / one sigmoid pass | Harmonic reference / stock |",
                  "|---|---|---|---|---|---|"]
        for row in dense["summary"]:
            watch = row.get("harmonic_fused_watch_over_sigmoid")
            watch_text = "n/a" if watch is None else f"{watch:.2f}"
            lines.append(f"| {row['scale']:g} | {row['anchors']} | {row['harmonic_fused_over_stock']:.2f} | "
                         f"{row['harmonic_fused_over_sigmoid']:.2f} | {watch_text} | {row['harmonic_reference_over_stock']:.2f} |")
        lines.append("")
    step = result["sections"].get("train_step")
    if step:
        lines += ["| training step | Harmonic+HIoU fused / baseline time (target <= 1.03) | reference / baseline | "
                  "peak memory fused / baseline (target <= 1) | watch statistics / step (target <= 0.02) |",
                  "|---|---|---|---|---|"]
        for row in step["summary"]:
            watch = "n/a" if row.get("watch_share_of_step") is None else f"{row['watch_share_of_step']:.4f}"
            lines.append(f"| {row.get('setting', row.get('name', '?'))} | {row['harmonic_fused_over_baseline']:.3f} | "
                         f"{row['harmonic_reference_over_baseline']:.3f} | {row['peak_harmonic_fused_over_baseline']:.3f} | "
                         f"{watch} |")
        lines.append("")
    engine = result["sections"].get("engine_step")
    if engine:
        lines += ["Training throughput: the engine's step (`harmonic.engine.training.train_step`, in the precision "
                  "`amp=\"auto\"` resolves to) against a plain float32 loop over the same model, weights and batch.", "",
                  "| setting | autocast | channels_last | fused SGD | engine / plain images per second (target >= "
                  f"{engine['summary'][0]['target_speedup']:g}) | SGD's default implementation / its fused kernel, step time | peak memory engine / "
                  "plain (target <= 1) |",
                  "|---|---|---|---|---|---|---|"]
        for row in engine["summary"]:
            peak = "n/a" if row["peak_engine_over_plain"] is None else f"{row['peak_engine_over_plain']:.3f}"
            gain = "n/a" if row.get("fused_optimizer_gain") is None else f"{row['fused_optimizer_gain']:.2f}"
            lines.append(f"| {row['setting']} | {row['autocast_dtype']} | {row['channels_last']} | "
                         f"{row.get('fused_optimizer', 'n/a')} | {row['engine_over_plain_images_per_s']:.2f} | {gain} | {peak} |")
        lines.append("")
    breakdown = result["sections"].get("step_breakdown")
    if breakdown and breakdown["summary"]:
        lines += ["Where a step's time goes (`step_breakdown`: each step profiled with `torch.profiler`, its self CPU "
                  "time split into parts): shares of the engine's step, the plain loop's convolution share, and the "
                  "speed-up of the convolutions and of everything else, and the engine/plain ratio the engine would "
                  "reach if its convolutions took no time at all.", "",
                  "| setting | engine: convolutions | SGD step | copies and casts | the rest | plain: convolutions | "
                  "convolutions, plain / engine time | all but convolutions, plain / engine time | engine / plain, "
                  "profiled | at most, convolutions free | all but convolutions: times faster for the target |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in breakdown["summary"]:
            needed = rest_speedup_needed(row, TARGET_ENGINE_SPEEDUP["cpu"])
            lines.append(f"| {row['setting']} | " + " | ".join(
                f"{row[f'engine_{part}_share']:.0%}" for part in BREAKDOWN_PARTS)
                + f" | {row['plain_convolution_share']:.0%} | {row['convolution_plain_over_engine']:.2f} | "
                f"{row['rest_plain_over_engine']:.2f} | {row['profiled_engine_over_plain_images_per_s']:.2f} | "
                f"{row['engine_over_plain_bound_without_convolutions']:.2f} | "
                + ("out of reach: the convolutions alone exceed it" if needed is None else f"{needed:.2f}") + " |")
        lines.append("")
    modes = result["sections"].get("amp_modes")
    if modes:
        for row in modes["summary"]:
            order = list(AMP_MODE_VARIANTS)  # the modes in their own order (a JSON file may hold them sorted)
            found = sorted((key.split("_over_")[0] for key in row if key.endswith("_over_float32")),
                           key=lambda mode: order.index(mode) if mode in order else len(order))
            ratios = ", ".join(f"{AMP_MODE_NAMES.get(mode, mode)} {row[f'{mode}_over_float32']:.2f}x" for mode in found)
            lines += [f"Autocast modes and memory layouts of the engine's step ({row['setting']}; CPU vector capability "
                      f"{row['cpu_capability']}, native bfloat16: {'yes' if row['native_bf16'] else 'no'}): time over "
                      f"float32: {ratios}. `amp=\"auto\"` takes bfloat16 only where it is native.", ""]
    levers = result["sections"].get("levers")
    if levers and levers["summary"]:
        row = levers["summary"][0]
        parts = []
        if "compiled_over_eager_images_per_s" in row:
            parts.append(f"compiling the network (`TrainConfig(compile=True)`) gives {row['compiled_over_eager_images_per_s']:.2f}x "
                         f"the eager step's images per second")
        if "cores" in row:
            parts.append(f"on {row['cores']} cores, one run with {row['cores']} threads gives "
                         f"{row['one_run_all_threads_over_one_thread']:.2f}x the images per second of one run with one thread, "
                         f"and {row['sweep_runs']} runs side by side with {row['sweep_threads_per_run']} thread(s) each "
                         "(as `make sweep` runs them) "
                         f"{row['runs_side_by_side_over_one_thread']:.2f}x, which is "
                         f"{row['runs_side_by_side_over_one_run_all_threads']:.2f}x the one run with every core")
        if "data_share" in row:
            parts.append(f"the default study's runs waited for their batch {row['data_share']:.1%} of an iteration, the most a "
                         "cache of decoded images could save")
        if parts:
            lines += [f"Levers outside the engine's default step (`levers`, {row['setting']}): " + "; ".join(parts) + ".", ""]
    accuracy = result["sections"].get("precision_accuracy")
    if accuracy and accuracy["summary"]:
        row = accuracy["summary"][0]
        spread = "n/a" if row["sd_AP_fp32_over_seeds"] is None else f"{row['sd_AP_fp32_over_seeds']:.2f}"
        lines += ["Accuracy of the fast path (the from-scratch study's baseline, shapes-cpu, full runs, same seeds) [D]: COCO AP "
                  f"{row['mean_AP_bf16']:.2f} with bfloat16 + channels_last against {row['mean_AP_fp32']:.2f} in "
                  f"float32 over {row['seeds']} seeds; mean difference {row['mean_difference']:+.2f} AP, float32 "
                  f"seed-to-seed sd {spread} AP."]
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/bench.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
