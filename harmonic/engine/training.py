"""The training loop: :func:`train` (resumable, deterministic, single-process or distributed), one
optimizer step, the :class:`IterationState` its callback sees and :class:`NonFiniteLossError`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harmonic.data import build_dataset, collate_fn, targets_to
from harmonic.engine.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    json_float,
    load_checkpoint,
    rng_state,
    set_rng_state,
    truncate_log,
)
from harmonic.engine.config import RESUMABLE_CHANGES, TrainConfig, lr_at
from harmonic.engine.distributed import Context, all_reduce_mean, gather, setup_context
from harmonic.engine.precision import compile_network, resolve_precision
from harmonic.engine.sampling import EpochBatchSampler, SeededSamples, derive_seed, iters_per_epoch
from harmonic.engine.watch import sample_iterations, snapshot, truncate_samples, write_snapshot, x_definition
from harmonic.models import MASK_ARCHS, DetectorConfig, build_detector, get_samples, get_stats
from harmonic.ops.focal import backend_record
from harmonic.utils.files import atomic_torch_save, atomic_write_json
from harmonic.utils.provenance import provenance
from harmonic.utils.runlog import find_log, pack_log, unpack_log


class NonFiniteLossError(RuntimeError):
    """A loss term (or the gradient norm) was NaN or infinite; the run stopped before that step."""

    def __init__(self, message: str, iteration: int, terms: dict[str, float]) -> None:
        super().__init__(message)
        self.iteration = iteration
        self.terms = terms


@dataclass
class IterationState:
    """What an ``on_iteration`` callback of :func:`train` sees after each step (on every process)."""

    iteration: int
    total_iters: int
    epoch: int
    record: dict[str, Any]
    model: nn.Module  # unwrapped from DistributedDataParallel
    rank: int
    world_size: int
    run_dir: Path


@contextlib.contextmanager
def torch_threads(num_threads: int | None):
    """Run the block with ``num_threads`` torch threads (None: leave the setting), then restore it."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        if num_threads is not None:
            torch.set_num_threads(previous)


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device):
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    previous_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous_benchmark


def _legacy_precision(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The precision of a checkpoint written before checkpoints recorded it: float16 autocast with a
    gradient scaler where its scaler state shows one was enabled, float32 otherwise; never channels_last."""
    scaler = checkpoint.get("scaler") or {}
    half = bool(scaler) and "scale" in scaler
    return {"autocast_dtype": "float16" if half else "float32", "grad_scaler": half, "channels_last": False}


def _existing_run(run_dir: Path) -> bool:
    log = find_log(run_dir)
    return (run_dir / "checkpoints" / "last.pt").is_file() or (log.is_file() and log.stat().st_size > 0)


def _check_resumable(saved: Mapping[str, Any], cfg: TrainConfig, path: Path) -> None:
    current = cfg.to_dict()
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ValueError(
            f"cannot resume {path}: the configuration differs in {changed} ({details}). Only "
            f"{sorted(RESUMABLE_CHANGES)} may change when resuming; start a new output_dir instead"
        )


def fused_sgd_available(device: torch.device | str) -> bool:
    """Whether torch's SGD runs its fused kernel for ``device``: one step of a probe parameter (the
    constructor does not check the device; a torch without ``fused=`` raises TypeError)."""
    probe = torch.zeros(1, device=device, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    try:
        torch.optim.SGD([probe], lr=0.1, momentum=0.9, fused=True).step()
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def clip_gradients(params: list[nn.Parameter], max_norm: float | None) -> float:
    """The total 2-norm of the gradients of ``params``; where it exceeds ``max_norm`` (None: never) the
    gradients are scaled down to it. For a finite norm, the numbers of ``torch.nn.utils.clip_grad_norm_``,
    which multiplies every gradient by its clamped coefficient (1.0 when no clipping is needed): here
    the multiplication runs only when that coefficient, computed as torch computes it, is below 1, which
    spares a read and a write of every gradient on most steps (clipping at 10 fired on under 1% of the
    default study's steps). A non-finite norm is returned and the gradients are left as they are
    (``clip_grad_norm_`` would make them NaN or 0); :func:`train_step` then stops, or the gradient scaler
    skips the step. The norm is read back to the host anyway, for the log and that check."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is None:  # torch < 2.6: the combined function
        limit = float("inf") if max_norm is None else max_norm
        return float(torch.nn.utils.clip_grad_norm_(params, limit))
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = get_total_norm(grads)
    norm = float(total)
    if max_norm is not None and math.isfinite(norm):
        coefficient = max_norm / (total + 1e-6)  # clip_grads_with_norm_'s own coefficient, in the norm's dtype
        if float(coefficient) < 1.0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return norm


def build_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, device: torch.device | str, *, grad_scaler: bool = False
) -> torch.optim.SGD:
    """SGD(``cfg.lr``, ``momentum``, ``weight_decay``) over ``params``, with torch's fused kernel as
    ``cfg.fused_optimizer`` says. ``None`` takes it on CUDA without a gradient scaler (bfloat16 or float32);
    elsewhere torch's default implementation (the per-parameter loop on the CPU, where ``make bench``
    measured the fused kernel no faster, within 1% of the step; foreach on CUDA). With float16's
    ``grad_scaler`` the fused kernel is refused: a first step skipped for an overflow would leave its
    momentum buffers allocated but never written (torch's ``_fused_sgd`` creates them with ``empty_like``).
    A ``ValueError`` names the field when ``True`` cannot be honoured."""
    fused = cfg.fused_optimizer
    kind = torch.device(device).type
    if fused is None:
        fused = kind == "cuda" and not grad_scaler and fused_sgd_available(device)
    elif fused and grad_scaler:
        raise ValueError("TrainConfig.fused_optimizer is True but the run uses float16 with a gradient scaler: a "
                         "skipped first step would leave the fused kernel's momentum uninitialized; use None or False")
    elif fused and not fused_sgd_available(device):
        raise ValueError(f"TrainConfig.fused_optimizer is True but torch has no fused SGD for {kind}")
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           fused=True if fused else None)


def train(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    on_iteration: Callable[[IterationState], None] | None = None,
) -> Path:
    """Train the detector of ``cfg``; returns the run folder (``cfg.output_dir``).

    Each iteration ``k`` (1-based): the learning rate :func:`lr_at` ``(cfg, k)``; the forward pass (under
    autocast in the run's precision, see :mod:`harmonic.engine.precision`); the loss dict of the detector
    summed; a check that every term is finite (else :class:`NonFiniteLossError` naming the iteration and the terms, before any update, so the
    last checkpoint is the last good state); backward (through the gradient scaler with float16); the global
    gradient norm, clipped to ``grad_clip`` when set (a non-finite norm without a scaler is also an error;
    with one the scaler skips that step); the SGD step. Then one JSON line in ``log.jsonl``, flushed::

        {"iter", "epoch", "lr", "loss", "loss/<term>" (each key of the loss dict), "grad_norm",
         "beta_r", "beta_c", "num_positives" (Harmonic loss, when there were positives),
         "watch/<...>" (the watch statistics of harmonic.losses.WATCH_KEYS, when there were positives:
         percentiles of x, y, IoU and score, the shares with dF/dx < 0 (Eq. 8-9) and with Eq. 5's bracket
         below zero, the mean dF/dx; a baseline logs them as counterfactuals, "watch/counterfactual" 1),
         "amp_scale" (with float16), "time" (s, the whole iteration), "data_time" (s, waiting for data)}

    At the iterations ``ceil(k * total / 3)``, k = 1, 2, 3, process 0 also writes a capped subsample of the
    positives' ``(x, y, score)`` to ``watch_samples.json`` (:mod:`harmonic.engine.watch`).
    :func:`train_step` is one iteration.

    Losses are averaged over processes; the harmonic factors are those of process 0. Distributed runs
    keep per-process BatchNorm statistics (DDP broadcasts process 0's buffers at every forward; the
    checkpoint holds process 0's) unless ``sync_bn`` (CUDA) computes them over the global batch.

    ``checkpoints/last.pt`` is written every ``checkpoint_every`` iterations and at the end, atomically,
    by process 0 only (all processes wait for it); ``checkpoints/final.pt`` holds the final model. With
    ``cfg.resume`` the run continues from ``last.pt`` (same world size, and a configuration that differs
    only in :data:`RESUMABLE_CHANGES`); the log is cut back to that iteration first. Without it, a folder
    that already holds a run is refused.

    ``on_iteration(state)`` is called on every process after each iteration (after the checkpoint, if
    any); raising from it stops the run (``KeyboardInterrupt`` included) with the last checkpoint intact.
    Sets the global torch seed (``cfg.seed``) before building the model.
    """
    cfg = cfg.validate()
    ctx = setup_context(cfg.device)
    try:
        with _deterministic(cfg.deterministic, ctx.device), torch_threads(cfg.num_threads):
            return _train(cfg, ctx, progress=progress, on_iteration=on_iteration)
    finally:
        if ctx.owns_group:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, ctx: Context, *, progress: bool, on_iteration) -> Path:
    run_dir = Path(cfg.output_dir)
    last_path = run_dir / "checkpoints" / "last.pt"
    log_path = run_dir / "log.jsonl"
    device = ctx.device
    precision = resolve_precision(cfg.amp, cfg.channels_last, device)

    checkpoint = None
    if cfg.resume and last_path.is_file():
        checkpoint = load_checkpoint(last_path, map_location=device)
        _check_resumable(checkpoint["config"], cfg, last_path)
        if checkpoint["world_size"] != ctx.world_size:
            raise ValueError(
                f"cannot resume {last_path}: it was written by {checkpoint['world_size']} process(es), this run has "
                f"{ctx.world_size}; resume with the same number of processes"
            )
    elif not cfg.resume and _existing_run(run_dir):
        raise FileExistsError(
            f"{run_dir} already holds a training run (log.jsonl or checkpoints/last.pt); pass resume=True "
            "(--resume) to continue it, or choose another output_dir"
        )
    ctx.barrier()  # every process has looked at the folder before process 0 writes to it

    masks = cfg.detector.get("arch") in MASK_ARCHS  # Mask R-CNN trains on instance masks
    if ctx.is_main:  # a preset dataset is generated once, by process 0
        dataset = build_dataset(cfg.dataset, "train", cfg.image_dir, train=True, flip_prob=cfg.flip_prob, masks=masks)
    ctx.barrier()
    if not ctx.is_main:
        dataset = build_dataset(cfg.dataset, "train", cfg.image_dir, train=True, flip_prob=cfg.flip_prob, masks=masks)
    num_classes = cfg.detector.get("num_classes", dataset.num_classes)
    if num_classes != dataset.num_classes:
        raise ValueError(
            f"TrainConfig.detector.num_classes is {num_classes} but the training set {cfg.dataset!r} has "
            f"{dataset.num_classes} categories; leave num_classes out to take it from the data"
        )
    detector_cfg = DetectorConfig.from_dict({**cfg.detector, "num_classes": num_classes})
    per_epoch = iters_per_epoch(len(dataset), cfg.batch_size, ctx.world_size)
    total = cfg.total_iters(per_epoch)

    torch.manual_seed(cfg.seed)
    model = build_detector(detector_cfg).to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        compile_network(model)
    if cfg.sync_bn and ctx.distributed:
        if device.type != "cuda":
            raise ValueError("TrainConfig.sync_bn needs CUDA (torch.nn.SyncBatchNorm has no CPU implementation)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg, device, grad_scaler=precision.scaler)
    fused_sgd = bool(optimizer.defaults["fused"])
    scaler = torch.amp.GradScaler("cuda", enabled=precision.scaler)
    start = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        for group in optimizer.param_groups:  # the saved groups carry the kernel choice of the run that saved them
            group["fused"] = optimizer.defaults["fused"]
        if precision.scaler and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        rng = checkpoint["rng"]
        set_rng_state({"torch": rng["torch"][ctx.rank], "cuda": rng["cuda"][ctx.rank]}, device)
        start = checkpoint["iteration"]
    model.train()
    net: nn.Module = model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    meta = {
        "num_classes": num_classes,
        "class_names": list(dataset.class_names),
        "label_to_cat_id": {int(k): int(v) for k, v in dataset.label_to_cat_id.items()},
        "train_images": len(dataset),
    }
    resolved = {
        "detector": detector_cfg.to_dict(), "device": str(device), "amp": precision.autocast, **precision.describe(),
        "fused_optimizer": fused_sgd,
        "world_size": ctx.world_size,
        "global_batch_size": cfg.batch_size * ctx.world_size, "iters_per_epoch": per_epoch, "total_iters": total,
        "resumed_at_iteration": start if checkpoint is not None else None, **meta,
    }
    if checkpoint is not None:
        trained_with = checkpoint.get("precision") or _legacy_precision(checkpoint)
        finished = start >= total and (run_dir / "config.json").is_file()
        if trained_with != precision.describe() and not finished:
            raise ValueError(
                f"cannot resume {last_path}: it was trained with {trained_with}, this configuration resolves to "
                f"{precision.describe()}; set TrainConfig.amp and channels_last to what the run used"
            )
    else:
        finished = False
    if ctx.is_main and not finished:  # a finished run's config.json keeps describing how it was trained
        atomic_write_json(run_dir / "config.json", {
            "config": cfg.to_dict(), "resolved": resolved,
            "provenance": provenance(cfg.to_dict(), seed=cfg.seed, device=str(device),
                                     device_details={**backend_record(device), **precision.describe(),
                                                     "fused_optimizer": fused_sgd}),
        })
        unpack_log(run_dir)  # a finished run continued (a larger max_iters) appends to its log again
        truncate_log(log_path, start)
        truncate_samples(run_dir, start)
    watch_iters = set(sample_iterations(total))
    definition = x_definition(detector_cfg.arch, detector_cfg.beta_c_source)

    def checkpoint_state(iteration: int, *, final: bool) -> dict[str, Any] | None:
        rng = gather(rng_state(device), ctx)  # a collective: every process takes part
        if not ctx.is_main:
            return None
        state = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": "final" if final else "resume",
            "iteration": iteration, "epoch": (iteration - 1) // per_epoch if iteration else 0,
            "total_iters": total, "iters_per_epoch": per_epoch, "world_size": ctx.world_size,
            "model": model.state_dict(), "config": cfg.to_dict(), "detector": detector_cfg.to_dict(),
            "precision": precision.describe(), **meta,
        }
        if not final:
            state.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                         rng={"torch": [r["torch"] for r in rng], "cuda": [r["cuda"] for r in rng]})
        return state

    def save(iteration: int) -> None:
        state = checkpoint_state(iteration, final=False)
        if state is not None:
            atomic_torch_save(last_path, state)
            if cfg.keep_checkpoints:
                atomic_torch_save(run_dir / "checkpoints" / f"iter_{iteration:07d}.pt", state)
        ctx.barrier()

    def save_final(iteration: int) -> None:
        state = checkpoint_state(iteration, final=True)
        if state is not None:
            atomic_torch_save(run_dir / "checkpoints" / "final.pt", state)
        ctx.barrier()

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, desc=f"train {run_dir.name}", dynamic_ncols=True,
               disable=not (progress and ctx.is_main))
    # only a run that trains appends to its log (a finished one keeps its packed log untouched)
    log_file = open(log_path, "a", encoding="utf-8") if ctx.is_main and start < total else None  # noqa: SIM115
    iteration = start
    try:
        while iteration < total:
            epoch, skip = divmod(iteration, per_epoch)
            sampler = EpochBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                        world_size=ctx.world_size, rank=ctx.rank, start=skip,
                                        num_batches=total - iteration)
            loader = torch.utils.data.DataLoader(
                SeededSamples(dataset), batch_sampler=sampler, collate_fn=collate_fn, num_workers=cfg.num_workers,
                pin_memory=device.type == "cuda",
                generator=torch.Generator().manual_seed(derive_seed("loader", cfg.seed, epoch, ctx.rank)),
            )
            tick = time.perf_counter()
            for images, targets in loader:
                iteration += 1
                data_time = time.perf_counter() - tick
                record = train_step(
                    net, model, optimizer, scaler, params, images, targets, cfg=cfg, ctx=ctx, iteration=iteration,
                    epoch=epoch, precision=precision, targets_to=targets_to, get_stats=get_stats,
                    checkpoint_path=last_path,
                )
                record["data_time"] = data_time
                record["time"] = time.perf_counter() - tick
                if log_file is not None:
                    log_file.write(json.dumps(record, allow_nan=False) + "\n")
                    log_file.flush()
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
                    if bar.disable and (iteration % cfg.log_every == 0 or iteration == total):
                        print(f"[{run_dir.name}] iter {iteration}/{total} loss {record['loss']:.4f} "
                              f"lr {record['lr']:.2e} {record['time']:.2f}s/it", flush=True)
                if ctx.is_main and iteration in watch_iters:
                    entry = snapshot(get_samples(model), iteration=iteration, seed=cfg.seed)
                    if entry is not None:
                        write_snapshot(run_dir, entry, definition=definition)
                if iteration % cfg.checkpoint_every == 0 or iteration == total:
                    save(iteration)
                if on_iteration is not None:
                    on_iteration(IterationState(iteration, total, epoch, record, model, ctx.rank, ctx.world_size, run_dir))
                tick = time.perf_counter()
        if start < total or not (run_dir / "checkpoints" / "final.pt").is_file():
            save_final(iteration)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    if log_file is not None:  # the run is complete: its log is kept compressed (see pack_log)
        pack_log(run_dir)
    return run_dir


def train_step(net, model, optimizer, scaler, params, images, targets, *, cfg, ctx, iteration, epoch, precision,
               targets_to, get_stats, checkpoint_path) -> dict[str, Any]:
    """One iteration of :func:`train` on one batch (see there): the learning rate, the forward pass under
    ``precision``'s autocast, the loss checks, backward (through ``scaler``), clipping and the optimizer
    step; returns the iteration's log record (without its times). ``net`` is ``model`` or its DDP wrapper;
    ``checkpoint_path`` is only named in the error of a non-finite loss. Public so that a benchmark times
    exactly this step."""
    device = ctx.device
    lr = lr_at(cfg, iteration)
    for group in optimizer.param_groups:
        group["lr"] = lr
    images = [image.to(device, non_blocking=True) for image in images]
    targets = targets_to(targets, device)
    with torch.autocast(device_type=device.type, dtype=precision.dtype, enabled=precision.autocast):
        loss_dict = net(images, targets)
    if not isinstance(loss_dict, Mapping) or not loss_dict:
        raise TypeError(f"the detector returned {type(loss_dict).__name__} in train mode; expected a dict of losses")
    names = list(loss_dict)
    total_loss = sum(loss_dict[k].float() for k in names)
    values = torch.stack([total_loss.detach()] + [loss_dict[k].detach().float() for k in names])
    values = all_reduce_mean(values, ctx).tolist()
    terms = dict(zip(["loss"] + names, values))
    bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
    if bad:
        listing = ", ".join(f"{k}={v}" for k, v in bad.items())
        where = f"the last good checkpoint is {checkpoint_path}" if checkpoint_path.is_file() else "no checkpoint was written yet"
        raise NonFiniteLossError(f"non-finite loss at iteration {iteration}: {listing} ({where})", iteration, bad)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total_loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = clip_gradients(params, cfg.grad_clip)
    if not math.isfinite(grad_norm) and not precision.scaler:
        raise NonFiniteLossError(
            f"non-finite gradient norm at iteration {iteration}: grad_norm={grad_norm} (losses were finite: "
            + ", ".join(f"{k}={v:.4g}" for k, v in terms.items()) + ")",
            iteration, {"grad_norm": grad_norm},
        )
    scaler.step(optimizer)
    scaler.update()
    record: dict[str, Any] = {"iter": iteration, "epoch": epoch, "lr": lr, "loss": terms["loss"]}
    record.update({f"loss/{k}": terms[k] for k in names})
    record["grad_norm"] = json_float(grad_norm)
    stats = get_stats(model)
    for key, value in stats.items():
        if (key in ("beta_r", "beta_c", "num_positives") or key.startswith("watch/")) and math.isfinite(value):
            record[key] = value
    if precision.scaler:
        record["amp_scale"] = float(scaler.get_scale())
    return record
