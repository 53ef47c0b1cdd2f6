"""EpochSampler and create_loader: determinism, sharding, repeated augmentation, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import write_image_folder

from zoo.data import (
    AugmentConfig,
    DataConfig,
    EpochSampler,
    SampleKey,
    create_dataset,
    create_loader,
    create_transform,
)
from zoo.data.sampler import epoch_order


def keys(sampler: EpochSampler) -> list[SampleKey]:
    return list(iter(sampler))


def test_order_is_a_function_of_seed_and_epoch() -> None:
    a = [k.index for k in keys(EpochSampler(50, seed=3, epoch=2))]
    assert a == [k.index for k in keys(EpochSampler(50, seed=3, epoch=2))]
    assert sorted(a) == list(range(50))
    assert a != [k.index for k in keys(EpochSampler(50, seed=3, epoch=3))]
    assert a != [k.index for k in keys(EpochSampler(50, seed=4, epoch=2))]
    assert [k.index for k in keys(EpochSampler(7, shuffle=False))] == list(range(7))
    s = EpochSampler(50, seed=3)
    s.set_epoch(2)
    assert [k.index for k in keys(s)] == a


@pytest.mark.parametrize("n", [12, 13, 50])
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("repeats", [0, 3])
def test_ranks_interleave_to_the_one_process_order(n: int, world: int, repeats: int) -> None:
    single = keys(EpochSampler(n, seed=1, epoch=5, repeats=repeats))
    shards = [keys(EpochSampler(n, seed=1, epoch=5, repeats=repeats, num_replicas=world, rank=r)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank the same number of samples
    merged = [shards[pos % world][pos // world] for pos in range(world * len(shards[0]))]
    # union over ranks, interleaved, is the 1-process order (keys and seeds)
    assert merged[:n] == single
    padded = merged[n:]
    # wrap-around padding
    assert [k.index for k in padded] == [k.index for k in single[: len(padded)]]
    dropped = [
        keys(
            EpochSampler(
                n,
                seed=1,
                epoch=5,
                repeats=repeats,
                num_replicas=world,
                rank=r,
                drop_last=True,
            )
        )
        for r in range(world)
    ]
    merged = [dropped[p % world][p // world] for p in range(world * len(dropped[0]))]
    assert merged == single[: (n // world) * world]


def test_repeated_augmentation_on_small_datasets() -> None:
    for n in (5, 30, 255):
        order = epoch_order(n, seed=0, epoch=0, shuffle=True, repeats=3)
        # an epoch keeps the dataset's length (timm's sampler gives 0 below 256)
        assert len(order) == n
        runs = order[: (n // 3) * 3].reshape(-1, 3)
        assert np.all(runs == runs[:, :1])  # each index 3 times in a row
        assert len(np.unique(order)) == -(-n // 3)
    # with 3 ranks, the 3 copies of an image go to 3 different ranks, at the same local step
    shards = [keys(EpochSampler(30, seed=0, repeats=3, num_replicas=3, rank=r)) for r in range(3)]
    for step in range(10):
        assert len({shards[r][step].index for r in range(3)}) == 1
        # but distinct augmentations
        assert len({shards[r][step].position for r in range(3)}) == 3


def test_set_start_resumes_mid_epoch() -> None:
    full = keys(EpochSampler(40, seed=2, epoch=1, num_replicas=2, rank=1))
    s = EpochSampler(40, seed=2, epoch=0, num_replicas=2, rank=1)
    s.set_epoch(1)
    s.set_start(8)
    assert len(s) == len(full) - 8 and keys(s) == full[8:]
    state = s.state_dict()
    t = EpochSampler(40, seed=2, num_replicas=2, rank=1)
    t.load_state_dict(state)
    assert keys(t) == full[8:]
    s.set_epoch(2)
    assert s.start == 0
    with pytest.raises(ValueError, match="start"):
        s.set_start(1000)
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(10, num_replicas=2, rank=2)


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory: pytest.TempPathFactory) -> object:
    root = tmp_path_factory.mktemp("imgs")
    write_image_folder(root, classes=("a", "b", "c"), per_class=8, size=(40, 56))
    # the full DeiT train pipeline: RRC, flip, RandAugment, erasing
    aug = AugmentConfig(img_size=32)
    return create_dataset(
        DataConfig(dataset=str(root), val_fraction=0.0),
        "train",
        create_transform(aug, True),
    )


def batches(
    loader: torch.utils.data.DataLoader,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_with_workers_is_deterministic(folder_dataset: object) -> None:
    def run(epoch: int, workers: int) -> list:
        return batches(
            create_loader(
                folder_dataset,
                batch_size=6,
                shuffle=True,
                seed=11,
                epoch=epoch,
                num_workers=workers,
            )
        )

    first = run(epoch=3, workers=2)
    assert_same(first, run(epoch=3, workers=2))  # same seed and epoch: the same batches
    assert_same(first, run(epoch=3, workers=0))  # whatever the number of workers
    other = run(epoch=4, workers=2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    # set_epoch on a persistent-worker loader gives the same as a fresh loader for that epoch
    loader = create_loader(folder_dataset, batch_size=6, shuffle=True, seed=11, epoch=0, num_workers=2)
    batches(loader)
    loader.sampler.set_epoch(3)
    assert_same(first, batches(loader))


def test_two_processes_see_the_one_process_batches(folder_dataset: object) -> None:
    """World size 2 with batch 4 each = world size 1 with batch 8, sample for sample."""
    one = batches(create_loader(folder_dataset, batch_size=8, shuffle=True, seed=5, epoch=1, repeats=3))
    ranks = [
        batches(
            create_loader(
                folder_dataset,
                batch_size=4,
                shuffle=True,
                seed=5,
                epoch=1,
                repeats=3,
                num_replicas=2,
                rank=r,
                num_workers=1,
            )
        )
        for r in range(2)
    ]
    assert len(one) == len(ranks[0]) == len(ranks[1])
    for k, (x, y) in enumerate(one):
        x0, y0 = ranks[0][k]
        x1, y1 = ranks[1][k]
        # global position p on rank p % 2
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


def _rank_main(dataset: object, rank: int, out: str) -> None:
    loader = create_loader(
        dataset,
        batch_size=3,
        shuffle=True,
        seed=9,
        epoch=2,
        num_workers=2,
        num_replicas=2,
        rank=rank,
    )
    torch.save(batches(loader), out)


def test_real_processes_with_workers_match_one_process(folder_dataset: object, tmp_path: Path) -> None:
    """Two OS processes (ranks 0 and 1), each with 2 DataLoader workers, against one process."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    procs = [ctx.Process(target=_rank_main, args=(folder_dataset, r, outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    ranks = [torch.load(o) for o in outs]
    one = batches(create_loader(folder_dataset, batch_size=6, shuffle=True, seed=9, epoch=2, num_workers=2))
    for k, (x, y) in enumerate(one):
        assert torch.equal(x[0::2], ranks[0][k][0]) and torch.equal(x[1::2], ranks[1][k][0])
        assert torch.equal(y[0::2], ranks[0][k][1]) and torch.equal(y[1::2], ranks[1][k][1])
