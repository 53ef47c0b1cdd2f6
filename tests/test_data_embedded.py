"""ELPV, the second embedded dataset: 2,624 solar-cell images inside the `elpv-dataset` package.

Sizes, class counts and the split are the documented ones and the same every time; train and val
are disjoint; `data.holdout` carves only from train; without the package the error is one line
naming the pip extra (also through the training loop's config error).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.data import (
    ELPV_MEAN,
    ELPV_STD,
    AugmentConfig,
    DataConfig,
    create_dataset,
    create_transform,
)
from zoo.data import datasets as ds_mod
from zoo.data.datasets import ELPV_CLASSES, load_elpv

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "elpv_poolformer.yaml"


@pytest.fixture(scope="module")
def elpv() -> None:
    pytest.importorskip("elpv_dataset")


def _rows(images: np.ndarray) -> np.ndarray:
    return images[..., 0].reshape(len(images), -1)


@pytest.mark.usefixtures("elpv")
def test_elpv_sizes_classes_and_fixed_split() -> None:
    cfg = DataConfig(dataset="elpv")
    train, val = create_dataset(cfg, "train", None), create_dataset(cfg, "val", None)
    assert (len(train), len(val)) == (1970, 654)
    assert train.classes == val.classes == ELPV_CLASSES == ["0.00", "0.33", "0.67", "1.00"]
    assert train.class_counts() == {"0.00": 1131, "0.33": 222, "0.67": 80, "1.00": 537}
    assert val.class_counts() == {"0.00": 377, "0.33": 73, "0.67": 26, "1.00": 178}
    assert train.images.shape == (1970, 64, 64, 3) and train.images.dtype == np.uint8
    assert np.array_equal(train.images[..., 0], train.images[..., 2])  # grayscale in 3 channels
    assert train.name == "elpv/train" and "654 images, 4 classes" in val.describe()
    # every image once: train and val disjoint, together the 2,624 distinct cells
    both = np.concatenate([_rows(train.images), _rows(val.images)])
    assert len(np.unique(both, axis=0)) == 2624
    # seeded: the same split every time, another seed another split of the same sizes
    again = create_dataset(cfg, "val", None)
    assert np.array_equal(again.images, val.images) and np.array_equal(again.targets, val.targets)
    other = create_dataset(DataConfig(dataset="elpv", split_seed=1), "val", None)
    assert len(other) == 654 and other.class_counts() == val.class_counts()
    assert not np.array_equal(other.images, val.images)
    # val_fraction is for digits and folders: ELPV's quarter is fixed
    assert len(create_dataset(DataConfig(dataset="elpv", val_fraction=0.5), "val", None)) == 654


@pytest.mark.usefixtures("elpv")
def test_elpv_split_is_stratified_by_cell_type_too() -> None:
    images, grades, poly = ds_mod._elpv_arrays()
    assert images.shape == (2624, 64, 64) and np.bincount(grades).tolist() == [1508, 295, 106, 715]
    assert int(poly.sum()) == 1550  # 1,074 mono, 1,550 poly
    train_idx, val_idx = ds_mod._stratified_split(grades * 2 + poly, 0.25, 0)
    assert np.intersect1d(train_idx, val_idx).size == 0 and len(train_idx) + len(val_idx) == 2624
    for g in range(4):
        for p in (0, 1):
            n = int(np.sum((grades == g) & (poly == p)))
            assert int(np.sum((grades[val_idx] == g) & (poly[val_idx] == p))) == round(n * 0.25)
    assert np.array_equal(load_elpv("val")[0][..., 0], images[val_idx])


@pytest.mark.usefixtures("elpv")
def test_elpv_mean_std_constants_and_config() -> None:
    images = ds_mod._elpv_arrays()[0] / 255.0
    assert ELPV_MEAN == (0.5968,) * 3 and ELPV_STD == (0.1571,) * 3
    assert abs(images.mean() - ELPV_MEAN[0]) < 5e-5 and abs(images.std() - ELPV_STD[0]) < 5e-5
    from zoo.train import load_config

    cfg = load_config(CONFIG)
    assert cfg.data.dataset == "elpv" and cfg.aug.img_size == cfg.model.img_size == 64
    assert tuple(cfg.aug.mean) == ELPV_MEAN and tuple(cfg.aug.std) == ELPV_STD


@pytest.mark.usefixtures("elpv")
def test_elpv_items_through_the_transforms() -> None:
    cfg = DataConfig(dataset="elpv")
    raw = create_dataset(cfg, "val", None)
    x, y = raw[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and isinstance(y, int)
    aug = AugmentConfig(img_size=64, mean=ELPV_MEAN, std=ELPV_STD, rand_augment="", crop_pct=1.0)
    train = create_dataset(cfg, "train", create_transform(aug, is_training=True))
    assert train[3][0].shape == (3, 64, 64)
    small = create_dataset(cfg, "val", create_transform(AugmentConfig(img_size=32, crop_pct=1.0), False))
    assert small[0][0].shape == (3, 32, 32)  # model.img_size / aug.img_size may differ from 64


@pytest.mark.usefixtures("elpv")
def test_elpv_holdout_carves_only_from_train() -> None:
    full_train = create_dataset(DataConfig(dataset="elpv"), "train", None)
    full_val = create_dataset(DataConfig(dataset="elpv"), "val", None)
    cfg = DataConfig(dataset="elpv", holdout=0.2)
    rest, held = create_dataset(cfg, "train", None), create_dataset(cfg, "val", None)
    assert len(rest) + len(held) == 1970 and len(held) == 393
    assert np.intersect1d(rest.indices, held.indices).size == 0
    assert held.class_counts() == {"0.00": 226, "0.33": 44, "0.67": 16, "1.00": 107}
    # the held-out images are training images; none of ELPV's own val split is read
    train_rows = {r.tobytes() for r in _rows(full_train.images)}
    val_rows = {r.tobytes() for r in _rows(full_val.images)}
    for i in range(0, len(held), 7):
        img = (held[i][0][0].numpy() * 255).round().astype(np.uint8).reshape(-1).tobytes()
        assert img in train_rows and img not in val_rows
    assert create_dataset(cfg, "val", None).indices.tolist() == held.indices.tolist()  # seeded


def test_elpv_missing_package_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # the package cannot be imported; the uncached loader stands in so the cache stays intact
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)
    monkeypatch.setitem(sys.modules, "elpv_dataset.utils", None)
    monkeypatch.setattr(ds_mod, "_elpv_arrays", ds_mod._elpv_arrays.__wrapped__)
    for split in ("train", "val"):
        with pytest.raises(FileNotFoundError) as e:
            create_dataset(DataConfig(dataset="elpv"), split, None)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("dataset: 'elpv'")
        assert 'pip install -e ".[elpv]"' in msg and "elpv-dataset" in msg
    with pytest.raises(FileNotFoundError, match=r"\[elpv\]"):
        create_dataset(DataConfig(dataset="elpv", holdout=0.1), "val", None)
    # the training loop reports it as a one-line config error under data.
    from zoo.train import ConfigError, load_config
    from zoo.train.loop import _build_datasets

    with pytest.raises(ConfigError, match=r"^data\.dataset: 'elpv' needs .*pip install -e \"\.\[elpv\]\""):
        _build_datasets(load_config(CONFIG))


def test_unknown_dataset_names_elpv_among_the_choices(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="'mnist5k', 'elpv', 'digits'"):
        create_dataset(DataConfig(dataset=str(tmp_path / "elpv2")), "train", None)
