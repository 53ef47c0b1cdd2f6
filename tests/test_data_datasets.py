"""Datasets: MNIST-5k, digits, image folders (train/val or seeded split), CIFAR-style files; Mixup."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import write_image_folder
from timm.data import Mixup

from zoo.data import (
    AugmentConfig,
    DataConfig,
    ZooMixup,
    create_dataset,
    create_mixup,
    create_transform,
)


def test_mnist5k_fixed_split() -> None:
    cfg = DataConfig(dataset="mnist5k")
    train = create_dataset(cfg, "train", None)
    val = create_dataset(cfg, "val", None)
    assert (len(train), len(val)) == (4000, 1000)
    assert train.classes == [str(i) for i in range(10)]
    assert set(train.class_counts().values()) == {400} and set(val.class_counts().values()) == {100}
    assert train.images.shape == (4000, 32, 32, 3) and train.images.dtype == np.uint8
    assert np.array_equal(train.images[..., 0], train.images[..., 2])
    assert not train.images[:, :2].any()  # zero padding 28 -> 32
    # disjoint and seeded: the same split every time
    both = np.concatenate([train.images.reshape(4000, -1), val.images.reshape(1000, -1)])
    # (a few duplicate digits exist in MNIST itself)
    assert len(np.unique(both, axis=0)) >= 4990
    again = create_dataset(cfg, "val", None)
    assert np.array_equal(again.images, val.images)
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    t = create_dataset(cfg, "train", create_transform(AugmentConfig.mnist(), is_training=True))
    assert t[5][0].shape == (3, 32, 32)


def test_digits() -> None:
    cfg = DataConfig(dataset="digits", val_fraction=0.2)
    train, val = create_dataset(cfg, "train", None), create_dataset(cfg, "val", None)
    assert len(train) + len(val) == 1797 and abs(len(val) - 360) < 10
    assert train.images.shape[1:] == (8, 8, 3) and train.images.max() == 255
    out = create_dataset(cfg, "val", create_transform(AugmentConfig.mnist(), is_training=False))[0][0]
    assert out.shape == (3, 32, 32)


def test_image_folder_with_train_val(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_image_folder(tmp_path / "train", classes=("ant", "bee", "cat"), per_class=4)
    write_image_folder(tmp_path / "val", classes=("ant", "cat"), per_class=2)
    (tmp_path / "train" / "bee" / "README.txt").write_text("ignored: not an image name")
    cfg = DataConfig(dataset=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="zoo.data"):
        train = create_dataset(cfg, "train", create_transform(AugmentConfig(img_size=32), is_training=True))
    # class names and counts reported at start
    assert "ant: 4, bee: 4, cat: 4" in caplog.text
    val = create_dataset(cfg, "val", create_transform(AugmentConfig(img_size=32), is_training=False))
    assert train.classes == val.classes == ["ant", "bee", "cat"]
    assert len(train) == 12 and len(val) == 4
    assert val.class_counts() == {"ant": 2, "bee": 0, "cat": 2}
    assert [val[i][1] for i in range(4)] == [0, 0, 2, 2]
    assert train[0][0].shape == (3, 32, 32)


def test_image_folder_seeded_split(tmp_path: Path) -> None:
    write_image_folder(tmp_path, classes=("a", "b"), per_class=10)
    cfg = DataConfig(dataset=str(tmp_path), val_fraction=0.3, split_seed=7)
    train, val = create_dataset(cfg, "train", None), create_dataset(cfg, "val", None)
    assert len(train) == 14 and len(val) == 6
    assert set(train.paths).isdisjoint(val.paths)
    assert val.class_counts() == {"a": 3, "b": 3}
    assert create_dataset(cfg, "val", None).paths == val.paths  # seeded
    other = create_dataset(DataConfig(dataset=str(tmp_path), val_fraction=0.3, split_seed=8), "val", None)
    assert other.paths != val.paths


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither"):
        create_dataset(DataConfig(dataset=str(tmp_path / "missing")), "train", None)
    write_image_folder(tmp_path / "train", classes=("a",), per_class=2)
    write_image_folder(tmp_path / "val", classes=("zzz",), per_class=1)
    with pytest.raises(ValueError, match="zzz"):
        create_dataset(DataConfig(dataset=str(tmp_path)), "val", None)
    with pytest.raises(ValueError, match="split"):
        create_dataset(DataConfig(), "test", None)


def test_cifar_style_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def batch(n: int) -> dict:
        return {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 3, n)),
        }

    for i in range(1, 3):
        (tmp_path / f"data_batch_{i}").write_bytes(pickle.dumps(batch(5)))
    test = batch(4)
    (tmp_path / "test_batch").write_bytes(pickle.dumps(test))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x", b"y", b"z"]}))
    cfg = DataConfig(dataset=str(tmp_path))
    train, val = create_dataset(cfg, "train", None), create_dataset(cfg, "val", None)
    assert (len(train), len(val)) == (10, 4) and train.classes == ["x", "y", "z"]
    # CIFAR rows are channel planes (R 1024, G 1024, B 1024): pixel (0, 1) of image 0
    row = test[b"data"][0]
    np.testing.assert_array_equal(val.images[0, 0, 1], [row[1], row[1024 + 1], row[2048 + 1]])


class _Pwn:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.target}",))


def test_cifar_pickles_that_run_code_are_refused(tmp_path: Path) -> None:
    from zoo.data.datasets import CifarPickleError

    good = {b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251, b"labels": [0, 1]}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):  # python-2 era files and current ones
        (tmp_path / "data_batch_1").write_bytes(pickle.dumps(good, protocol=protocol))
        (tmp_path / "test_batch").write_bytes(pickle.dumps(good, protocol=protocol))
        ds = create_dataset(DataConfig(dataset=str(tmp_path)), "train", None)
        assert len(ds) == 2 and ds.classes == ["0", "1"]
    pwned = tmp_path / "pwned"
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Pwn(pwned)}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(evil))
    with pytest.raises(CifarPickleError, match=r"test_batch.*posix\.system|test_batch.*os\.system") as e:
        create_dataset(DataConfig(dataset=str(tmp_path)), "val", None)
    assert "\n" not in str(e.value)
    assert not pwned.exists()
    (tmp_path / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CifarPickleError, match="test_batch"):
        create_dataset(DataConfig(dataset=str(tmp_path)), "val", None)


def test_create_mixup() -> None:
    mix = create_mixup(AugmentConfig(), num_classes=10)
    assert isinstance(mix, Mixup) and isinstance(mix, ZooMixup)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.label_smoothing, mix.mix_prob, mix.switch_prob, mix.mode) == (
        0.8, 1.0, 0.1, 1.0, 0.5, "batch",
    )  # fmt: skip
    assert create_mixup(AugmentConfig.mnist(), num_classes=10) is None
    for batch in (8, 7, 1):
        x = torch.randn(batch, 3, 8, 8)
        y = torch.randint(0, 10, (batch,))
        xm, ym = mix(x.clone(), y)
        assert xm.shape == x.shape and ym.shape == (batch, 10)
        torch.testing.assert_close(ym.sum(1), torch.ones(batch))
    # odd batch: the last sample is not mixed, its target is the smoothed one-hot
    x = torch.randn(5, 3, 8, 8)
    y = torch.tensor([1, 2, 3, 4, 5])
    xm, ym = mix(x.clone(), y)
    torch.testing.assert_close(xm[-1], x[-1])
    assert ym[-1, 5] == pytest.approx(0.9 + 0.01) and ym[-1, 0] == pytest.approx(0.01)
