"""DataLoader construction over `EpochSampler`."""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.data.sampler import EpochSampler

__all__ = ["ZooDataLoader", "create_loader", "worker_init"]


def worker_init(worker_id: int) -> None:
    """DataLoader worker setup: one OpenCV and one torch thread a worker (the workers are the
    parallelism; nested thread pools only oversubscribe the cores)."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


class ZooDataLoader(DataLoader):
    """A DataLoader that shuts its workers down as soon as iterating it raises (a worker's
    `BadDataError`, say). torch otherwise leaves that to the garbage collector, whose order of
    finalisation makes each worker wait out a 5 s join timeout: the process then hangs ~5 s a
    worker before it can exit."""

    def __iter__(self) -> Iterator:
        it = super().__iter__()
        try:
            yield from it
        except Exception:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
                self._iterator = None  # persistent workers: start fresh ones if iterated again
            raise


def create_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    repeats: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over `dataset` with an `EpochSampler` (`loader.sampler`): deterministic for
    (seed, epoch, rank, num_replicas) whatever `num_workers`, sharded by rank (so do not let
    Accelerate's `prepare` shard it again), `repeats` = repeated augmentation (3 = DeiT).
    `batch_size` is the per-process batch. Call `loader.sampler.set_epoch(e)` before each epoch
    and `loader.sampler.set_start(k * batch_size)` to resume after k batches of it.
    `drop_last` drops the last incomplete batch (and cuts the epoch to a multiple of
    num_replicas instead of padding it)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    sampler = EpochSampler(
        dataset,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        repeats=repeats,
        num_replicas=num_replicas,
        rank=rank,
        drop_last=drop_last,
    )
    return ZooDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        worker_init_fn=worker_init if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )
