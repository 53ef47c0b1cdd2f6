"""The epoch sampler: shuffling, repeated augmentation, sharding by rank, resume, and the
per-sample seeds that make augmentation independent of workers and processes.

One epoch has one global order (a function of seed and epoch only). With repeated augmentation
(`repeats` = 3 in DeiT), each shuffled index appears `repeats` times in a row and the order is cut
to the dataset's length, so an epoch still has len(dataset) samples (DeiT's RASampler without its
rounding to multiples of 256, which selects nothing below 256 images, the trap of timm's
RepeatAugSampler). With W processes, rank r takes global positions r, r + W, r + 2W, ...: the
union over ranks is the 1-process order, and local batch k of every rank together is global
batch k of one process with W times the batch size; the `repeats` copies of an image land on
different ranks, as in DeiT. The sampler shards itself, so the DataLoader built on it must not
be sharded again (do not let Accelerate's `prepare` wrap it).

Each item is a `SampleKey(index, seed, epoch, position)`; the datasets of `zoo.data` turn it into
`numpy.random.default_rng((seed, epoch, position))` for the augmentation of that sample, so a
sample is augmented identically whatever the number of workers or processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from torch.utils.data import Sampler

__all__ = [
    "DistributedEpochSampler",
    "EpochSampler",
    "RepeatSampler",
    "SampleKey",
    "epoch_order",
    "sample_rng",
]

_SEED_MASK = (1 << 64) - 1


class SampleKey(NamedTuple):
    """What the sampler yields: the dataset index and the coordinates of its augmentation seed."""

    index: int
    seed: int
    epoch: int
    position: int


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The generator for the sample at global `position` of `epoch` under `seed`."""
    return np.random.default_rng((seed & _SEED_MASK, epoch, position))


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool, repeats: int = 0) -> np.ndarray:
    """The global (1-process) order of dataset indices for one epoch, length n."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.random.default_rng((seed & _SEED_MASK, epoch)).permutation(n) if shuffle else np.arange(n)
    if repeats > 1:
        # each index `repeats` times in a row; the epoch stays n long
        order = np.repeat(order, repeats)[:n]
    return order.astype(np.int64, copy=False)


class EpochSampler(Sampler[SampleKey]):
    """Deterministic sampler for (seed, epoch, rank, num_replicas) that shards itself by rank.

    Args:
        data_source: the dataset (only its length is used) or the length itself.
        shuffle: shuffle each epoch (seeded by seed and epoch) or keep dataset order.
        seed: base seed of the order and of the per-sample augmentation seeds.
        epoch: the epoch; change it with `set_epoch` before each epoch.
        repeats: repeated augmentation count (0 or 1 = off, 3 = DeiT).
        num_replicas, rank: world size and this process's rank.
        drop_last: cut the epoch to a multiple of num_replicas instead of padding it by wrapping
            around to its start (padding keeps every sample; ranks then see a few twice).

    `set_start(n)` skips the first n samples of this rank's share of the current epoch (resume in
    the middle of an epoch: n = batches done x local batch size); `set_epoch` resets it to 0.
    """

    def __init__(
        self,
        data_source: object,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        repeats: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        n = data_source if isinstance(data_source, int) else len(data_source)  # type: ignore[arg-type]
        if num_replicas < 1:
            raise ValueError(f"num_replicas: must be >= 1, got {num_replicas}")
        if not (0 <= rank < num_replicas):
            raise ValueError(f"rank: must be in [0, {num_replicas}), got {rank}")
        if repeats < 0:
            raise ValueError(f"repeats: must be >= 0, got {repeats}")
        self.n, self.shuffle, self.seed, self.epoch = (
            int(n),
            shuffle,
            int(seed),
            int(epoch),
        )
        self.repeats, self.num_replicas, self.rank, self.drop_last = (
            repeats,
            num_replicas,
            rank,
            drop_last,
        )
        self.start = 0
        if drop_last:
            self.total_size = (self.n // num_replicas) * num_replicas
        else:
            self.total_size = math.ceil(self.n / num_replicas) * num_replicas
        # this rank's share of an epoch
        self.num_samples = self.total_size // num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its order and augmentation seeds) and reset `set_start` to 0."""
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first `start` samples of this rank's share of the current epoch."""
        if not (0 <= start <= self.num_samples):
            raise ValueError(f"start: must be in [0, {self.num_samples}], got {start}")
        self.start = int(start)

    def global_positions(self) -> np.ndarray:
        """Global positions (in the padded epoch order) this rank yields, after `start`."""
        return np.arange(self.rank, self.total_size, self.num_replicas)[self.start :]

    def __iter__(self) -> Iterator[SampleKey]:
        order = epoch_order(
            self.n,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.shuffle,
            repeats=self.repeats,
        )
        if self.total_size > self.n and self.n > 0:
            reps = math.ceil(self.total_size / self.n)
            order = np.tile(order, reps)[: self.total_size]  # pad by wrapping around
        else:
            order = order[: self.total_size]
        for pos in self.global_positions():
            yield SampleKey(int(order[pos]), self.seed, self.epoch, int(pos))

    def __len__(self) -> int:
        return self.num_samples - self.start

    def state_dict(self) -> dict[str, int]:
        """epoch and start, for a checkpoint."""
        return {"epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore what `state_dict` returned."""
        self.set_epoch(state["epoch"])
        self.set_start(state["start"])


# Other names the training side may look for: one sampler does shuffling, repeats and sharding.
RepeatSampler = EpochSampler
DistributedEpochSampler = EpochSampler
