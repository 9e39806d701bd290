"""Deterministic data order: each epoch's batches and each image's augmentation are pure functions of
``(seed, epoch, image index)`` (:class:`EpochBatchSampler`, :class:`SeededSamples`)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class EpochBatchSampler:
    """The batches of one epoch for one process: a sampler whose order depends only on ``(seed, epoch)``.

    The epoch's permutation of ``range(dataset_size)`` is drawn from a ``torch.Generator`` seeded with
    ``(seed, epoch)`` and cut to ``iters_per_epoch * batch_size * world_size`` images (the remainder of
    the epoch is dropped so that every process runs the same number of iterations). Global batch ``j``
    is ``perm[j B W : (j + 1) B W]``; process ``rank`` gets its ``rank``-th slice of ``B`` images, as
    ``DistributedSampler`` does. ``start`` skips the first batches (a resumed epoch) and ``num_batches``
    stops early. Each item is ``(index, sample_seed)`` for :class:`SeededSamples`.
    """

    def __init__(self, dataset_size: int, batch_size: int, *, seed: int, epoch: int, world_size: int = 1,
                 rank: int = 0, start: int = 0, num_batches: int | None = None) -> None:
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.seed, self.epoch, self.world_size, self.rank = seed, epoch, world_size, rank
        self.iters_per_epoch = iters_per_epoch(dataset_size, batch_size, world_size)
        if not 0 <= start <= self.iters_per_epoch:
            raise ValueError(f"start must be in [0, {self.iters_per_epoch}], got {start}")
        self.start = start
        remaining = self.iters_per_epoch - start
        self.num_batches = remaining if num_batches is None else max(0, min(num_batches, remaining))

    def permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed("order", self.seed, self.epoch))
        return torch.randperm(self.dataset_size, generator=generator)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = self.permutation().tolist()
        width = self.batch_size * self.world_size
        for j in range(self.start, self.start + self.num_batches):
            begin = j * width + self.rank * self.batch_size
            yield [(i, derive_seed("augment", self.seed, self.epoch, i)) for i in perm[begin : begin + self.batch_size]]


def iters_per_epoch(dataset_size: int, batch_size: int, world_size: int = 1) -> int:
    """Whole global batches in one pass over the data; a clear error when there is not even one."""
    count = dataset_size // (batch_size * world_size)
    if count < 1:
        raise ValueError(
            f"the training set has {dataset_size} images, fewer than one global batch of "
            f"batch_size {batch_size} x {world_size} process(es); lower batch_size"
        )
    return count


class SeededSamples(torch.utils.data.Dataset):
    """``dataset[(index, seed)]``: ``dataset[index]`` with its random transforms drawn from a CPU generator
    seeded with ``seed``; the caller's global RNG state is left as it was."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)  # the CPU generator only (not CUDA's)
            return self.dataset[index]
