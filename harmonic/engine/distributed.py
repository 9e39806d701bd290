"""Distributed context: torchrun's environment, the process group, the device of each process and the
collectives (all-reduce of the losses, gather of the RNG states) the training loop uses."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("TrainConfig.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup_context(requested_device: str) -> Context:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and start the process group if needed
    (NCCL on CUDA, Gloo on CPU). Without those variables: one process."""
    world_size = env_int("WORLD_SIZE", 1)
    rank, local_rank = env_int("RANK", 0), env_int("LOCAL_RANK", 0)
    device = resolve_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            if dist.get_world_size() != world_size:
                raise RuntimeError(f"a process group of size {dist.get_world_size()} exists, but WORLD_SIZE={world_size}")
        else:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            ctx.owns_group = True
    return ctx


def all_reduce_mean(values: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.distributed:
        torch.distributed.all_reduce(values)
        values = values / ctx.world_size
    return values


def gather(obj: Any, ctx: Context) -> list[Any]:
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(out, obj)
    return out
