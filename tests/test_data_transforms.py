"""The DeiT train / eval pipelines and the configuration dataclasses."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from data_helpers import photo
from PIL import Image

from zoo.data import AugmentConfig, DataConfig, create_transform
from zoo.data.transforms import (
    ColorJitter,
    RandomErasing,
    TrainTransform,
    random_resized_crop_box,
)

IMG = photo(96, 128, seed=4)


def test_augment_config_defaults_are_deit() -> None:
    a = AugmentConfig()
    assert (a.img_size, a.scale, a.hflip, a.interpolation) == (
        224,
        (0.08, 1.0),
        0.5,
        "bicubic",
    )
    assert a.ratio == pytest.approx((3 / 4, 4 / 3))
    assert a.rand_augment == "rand-m9-mstd0.5-inc1" and a.color_jitter == 0.3
    assert (a.re_prob, a.re_mode, a.re_count, a.crop_pct) == (0.25, "pixel", 1, 0.875)
    assert (a.mixup, a.cutmix, a.label_smoothing, a.mixup_prob, a.mixup_switch_prob, a.mixup_mode) == (
        0.8, 1.0, 0.1, 1.0, 0.5, "batch",
    )  # fmt: skip
    assert a.mean == pytest.approx((0.485, 0.456, 0.406)) and a.std == pytest.approx((0.229, 0.224, 0.225))
    assert a.fill == (124, 116, 104)
    for cls in (AugmentConfig, DataConfig):
        for f in dataclasses.fields(cls):
            assert f.type not in ("Any", "object"), f.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.img_size = 3  # type: ignore[misc]
    AugmentConfig().validate()
    DataConfig().validate()


def test_mnist_recipe() -> None:
    m = AugmentConfig.mnist()
    m.validate()
    assert m.img_size == 32 and m.hflip == 0.0 and m.rand_augment == "" and m.re_prob == 0.0
    assert m.mixup == 0.0 and m.cutmix == 0.0 and m.crop_pct == 1.0 and m.scale[0] >= 0.35


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (AugmentConfig, "scale", (0.9, 0.1)),
        (AugmentConfig, "hflip", 1.5),
        (AugmentConfig, "rand_augment", "rand-m9-zz1"),
        (AugmentConfig, "interpolation", "lanczos9"),
        (AugmentConfig, "re_mode", "noise"),
        (AugmentConfig, "crop_pct", 0.0),
        (AugmentConfig, "mixup_mode", "pairs"),
        (AugmentConfig, "std", (0.2, 0.0, 0.2)),
        (DataConfig, "val_fraction", 1.0),
        (DataConfig, "max_bad_fraction", -0.1),
        (DataConfig, "repeated_aug", -1),
        (DataConfig, "num_workers", -2),
    ],
)
def test_validate_names_the_field(cls: type, field: str, value: object) -> None:
    cfg = cls(**{field: value})
    with pytest.raises(ValueError, match=rf"^{field}: "):
        cfg.validate()


def test_train_output() -> None:
    tf = create_transform(AugmentConfig(), is_training=True)
    out = tf(IMG, np.random.default_rng(0))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (3, 224, 224)
    assert out.is_contiguous()
    again = tf(IMG, np.random.default_rng(0))
    torch.testing.assert_close(out, again, rtol=0, atol=0)
    assert not torch.equal(out, tf(IMG, np.random.default_rng(1)))
    assert tf(IMG).shape == (3, 224, 224)  # no generator: the per-process fallback


def test_eval_matches_timm_eval_pipeline() -> None:
    from timm.data import create_transform as timm_create_transform

    aug = AugmentConfig(img_size=64)
    ours = create_transform(aug, is_training=False)(IMG)
    theirs = timm_create_transform(64, is_training=False, interpolation="bicubic", crop_pct=0.875)(Image.fromarray(IMG))
    assert ours.shape == theirs.shape == (3, 64, 64)
    # same geometry (resize short side to 73, centre crop 64); kernels differ slightly
    assert (ours - theirs).abs().mean() < 0.05


def test_normalisation_and_layout() -> None:
    aug = AugmentConfig(img_size=8, crop_pct=1.0)
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 128, 0
    img[0, 1] = (10, 20, 30)
    out = create_transform(aug, is_training=False)(img)
    mean, std = np.array(aug.mean), np.array(aug.std)
    expected = (np.array([255, 128, 0]) / 255.0 - mean) / std
    np.testing.assert_allclose(out[:, 4, 4].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(out[:, 0, 1].numpy(), (np.array([10, 20, 30]) / 255.0 - mean) / std, rtol=1e-5)


def test_random_resized_crop_box_semantics() -> None:
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = random_resized_crop_box(375, 500, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500 and h > 0 and w > 0
        areas.append(h * w / (375 * 500))
        ratios.append(w / h)
    assert min(areas) > 0.07 and max(areas) <= 1.0
    assert min(ratios) > 0.7 and max(ratios) < 1.4
    # impossible request -> torchvision's fallback: centre crop clamped to the ratio range
    assert random_resized_crop_box(10, 100, (0.99, 1.0), (1.0, 1.0), rng) == (
        0,
        45,
        10,
        10,
    )


def test_hflip_and_no_flip() -> None:
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[:, :16] = 255  # left half white
    base = AugmentConfig(
        img_size=32,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        rand_augment="",
        color_jitter=0.0,
        re_prob=0.0,
    )
    flip_always = create_transform(dataclasses.replace(base, hflip=1.0), is_training=True)
    never = create_transform(dataclasses.replace(base, hflip=0.0), is_training=True)
    rng = np.random.default_rng(0)
    assert flip_always(img, rng)[0, 16, 2] < 0 < flip_always(img, rng)[0, 16, 29]
    assert never(img, rng)[0, 16, 2] > 0 > never(img, rng)[0, 16, 29]


def test_color_jitter_only_without_rand_augment() -> None:
    assert TrainTransform(AugmentConfig()).color_jitter is None
    t = TrainTransform(AugmentConfig(rand_augment=""))
    assert t.color_jitter is not None and t.rand_augment is None
    jitter = ColorJitter(0.3)
    rng = np.random.default_rng(0)
    changed = [not np.array_equal(jitter(IMG, rng), IMG) for _ in range(20)]
    assert all(changed)


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_random_erasing_modes(mode: str) -> None:
    erase = RandomErasing(1.0, mode=mode)
    x = np.full((3, 64, 64), 7.0, dtype=np.float32)
    erase(x, np.random.default_rng(0))
    hit = x != 7.0
    frac = hit.any(axis=0).mean()
    assert 0.015 < frac < 0.34
    ys, xs = np.nonzero(hit.any(axis=0))
    box = x[:, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    if mode == "const":
        assert np.all(box == 0)
    elif mode == "rand":
        assert all(len(np.unique(box[c])) == 1 for c in range(3))
    else:
        assert len(np.unique(box)) > 100 and abs(box.mean()) < 0.3
    none = RandomErasing(0.0, mode=mode)
    y = np.full((3, 64, 64), 7.0, dtype=np.float32)
    assert np.all(none(y, np.random.default_rng(0)) == 7.0)


def test_erasing_probability() -> None:
    erase = RandomErasing(0.25, mode="pixel")
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(800):
        x = np.zeros((3, 16, 16), dtype=np.float32)
        hits += bool(erase(x, rng).any())
    assert abs(hits / 800 - 0.25) < 0.05


def test_resize_paths() -> None:
    """Shrinks by 2x or more (integer box pre-reduction) and enlargements give sane images."""
    big = np.kron(IMG, np.ones((4, 4, 1), dtype=np.uint8))  # (384, 512, 3)
    aug = AugmentConfig(img_size=64, crop_pct=1.0)
    small = create_transform(aug, is_training=False)(big)
    ref = create_transform(aug, is_training=False)(IMG)
    assert small.shape == (3, 64, 64)
    assert (small - ref).abs().mean() < 0.1
    tiny = np.full((3, 2, 3), 200, dtype=np.uint8)
    out = create_transform(AugmentConfig(img_size=16), is_training=True)(tiny, np.random.default_rng(0))
    assert out.shape == (3, 16, 16) and math.isfinite(float(out.sum()))
