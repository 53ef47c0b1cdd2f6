"""RandAugment on OpenCV / albumentations ops against timm's PIL RandAugment."""

from __future__ import annotations

import random

import cv2
import numpy as np
import PIL
import pytest
from data_helpers import photo
from PIL import Image
from timm.data import auto_augment as taa

from zoo.data import rand_augment as ra

FILL = (124, 116, 104)  # timm's img_mean for ImageNet's mean
IMG = photo(112, 128, seed=3)
PIL_IMG = Image.fromarray(IMG)

EXACT = {
    "AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "PosterizeOriginal", "Solarize",
    "SolarizeIncreasing", "SolarizeAdd", "Contrast", "ContrastIncreasing", "Brightness", "BrightnessIncreasing",
}  # fmt: skip
BLENDS = {
    "Color",
    "ColorIncreasing",
    "Sharpness",
    "SharpnessIncreasing",
    "Desaturate",
}  # +-1 rounding
TRANSLATES = {"TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}
WARPS = {
    "Rotate",
    "ShearX",
    "ShearY",
}  # OpenCV's cubic kernel and edges differ from PIL's
ALL_OPS = sorted(EXACT | BLENDS | TRANSLATES | WARPS | {"GaussianBlur"})
MAGNITUDES = (0.0, 2.0, 5.0, 7.3, 9.0, 9.6, 10.0)


def timm_args(name: str, magnitude: float, negate: bool, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """timm's level -> args for `name`, its sign draw forced (`random.random() > 0.5` negates)."""
    monkeypatch.setattr(taa.random, "random", lambda: 0.9 if negate else 0.1)
    fn = taa.LEVEL_TO_ARG[name]
    args = fn(magnitude, taa._HPARAMS_DEFAULT) if fn is not None else ()
    monkeypatch.setattr(taa.random, "random", random.random)
    return tuple(args)


def timm_op(name: str, args: tuple, resample: int) -> np.ndarray:
    return np.asarray(taa.NAME_TO_OP[name](PIL_IMG, *args, fillcolor=FILL, resample=resample))


@pytest.mark.parametrize("name", ALL_OPS)
def test_level_to_args_matches_timm(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for magnitude in MAGNITUDES:
        for negate in (False, True):
            # default hparams = timm's defaults
            ours = ra.level_to_args(name, magnitude, negate)
            assert ours == timm_args(name, magnitude, negate, monkeypatch), (
                name,
                magnitude,
                negate,
            )


@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
def test_op_output_matches_timm(name: str, interp: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cv_interp = ra.INTERP_CV2[interp]
    pil_interp = Image.Resampling.BICUBIC if interp == "bicubic" else Image.Resampling.BILINEAR
    for magnitude in (0.0, 5.0, 9.0, 10.0):
        for negate in (False, True):
            args = ra.level_to_args(name, magnitude, negate)
            if name.startswith("Posterize") and args[0] == 0:
                continue  # timm raises under Pillow >= 10: see test_posterize_matches_pil_definition
            ours = ra.apply_op(name, IMG, args, fill=FILL, interp=cv_interp)
            ref = timm_op(name, args, pil_interp)
            assert ours.shape == ref.shape and ours.dtype == np.uint8
            diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
            where = f"{name} m={magnitude} negate={negate} {interp}: max {diff.max()} mean {diff.mean():.3f}"
            if name in EXACT:
                assert diff.max() == 0, where
            elif name in BLENDS:
                assert diff.max() <= 2 and diff.mean() < 0.6, where
            elif name in TRANSLATES:
                assert diff.max() <= 1, where
            elif name in WARPS:
                # interpolation kernels differ (OpenCV cubic a=-0.75, PIL affine a=-1) and so do
                # the blends of the fill into the edges: small on average, large only at edges.
                assert diff.mean() < 1.6 and np.percentile(diff, 97) <= 10, where
            else:  # GaussianBlur: a true Gaussian against PIL's box-blur approximation
                assert diff.mean() < 1.5, where


def numpy_pil_posterize(img: np.ndarray, bits: int) -> np.ndarray:
    """PIL's definition of posterize (`ImageOps.posterize`: lut = i & ~(2**(8 - bits) - 1)),
    extended to bits = 0 (mask 0: black), which Pillow >= 10 refuses."""
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return img & np.uint8(mask)


def test_posterize_matches_pil_definition() -> None:
    # timm's posterize breaks under Pillow 13 at 0 bits (PosterizeIncreasing at magnitude 10):
    # compare against a numpy reimplementation of PIL's definition for every bit count, and
    # against PIL itself where it works.
    for bits in range(9):
        ours = ra.posterize(IMG, bits)
        np.testing.assert_array_equal(ours, numpy_pil_posterize(IMG, bits), err_msg=f"bits={bits}")
        if bits >= 1:
            np.testing.assert_array_equal(ours, np.asarray(taa.posterize(PIL_IMG, bits)))
    assert not ra.posterize(IMG, 0).any()
    if tuple(int(v) for v in PIL.__version__.split(".")[:2]) >= (10, 0):
        with pytest.raises(ValueError):
            taa.posterize(PIL_IMG, 0)  # the trap the zoo's implementation avoids


def test_parse_matches_timm() -> None:
    for config in (
        "rand-m9-mstd0.5-inc1",
        "rand-m7-n3-mstd0.5",
        "rand-m10-p0.7-mstd101-inc1",
        "rand-m9-mmax15-inc1",
    ):
        ours = ra.parse_rand_augment(config)
        theirs = taa.rand_augment_transform(config, {"translate_const": 100, "img_mean": FILL})
        assert list(ours.ops) == [op.name for op in theirs.ops], config
        assert ours.num_layers == theirs.num_layers
        op = theirs.ops[0]
        assert ours.prob == op.prob and ours.magnitude == op.magnitude
        assert ours.magnitude_std == op.magnitude_std
        assert ours.magnitude_max == (op.magnitude_max or ra.LEVEL_DENOM)
    spec = ra.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert spec.ops == ra.RAND_INCREASING_TRANSFORMS and spec.num_layers == 2 and spec.prob == 0.5


@pytest.mark.parametrize("bad", ["rnd-m9", "rand-m9-x3", "rand-mfoo", "rand-m9-tnope", "rand-n-1"])
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        ra.parse_rand_augment(bad)


def test_magnitude_noise_like_timm() -> None:
    """mstd0.5: a Gaussian around 9 per op draw, clipped to [0, 10]."""
    aug = ra.RandAugment("rand-m9-mstd0.5-inc1")
    rng = np.random.default_rng(0)
    m = np.array([aug.sample_magnitude(rng) for _ in range(20_000)])
    assert m.max() == 10.0 and m.min() >= 0.0
    # clipping at 10 pulls the mean below 9 by ~0.01
    assert abs(np.mean(m) - 9.0) < 0.03
    assert 0.47 < np.std(m) < 0.52
    assert 0.015 < np.mean(m == 10.0) < 0.03  # P(N(9, 0.5) >= 10) = 2.3%
    fixed = ra.RandAugment("rand-m9-inc1")
    assert {fixed.sample_magnitude(rng) for _ in range(100)} == {9.0}
    uniform = ra.RandAugment("rand-m9-mstd101-inc1")
    u = np.array([uniform.sample_magnitude(rng) for _ in range(5000)])
    assert u.min() >= 0 and u.max() <= 9 and abs(u.mean() - 4.5) < 0.2


def test_op_choice_and_probability() -> None:
    """2 ops an image with replacement from the 15 inc ops, each applied with p = 0.5."""
    aug = ra.RandAugment("rand-m9-mstd0.5-inc1")
    applied: list[str] = []
    calls = {name: fn for name, fn in ra.OPS.items()}
    try:
        for name in aug.spec.ops:
            ra.OPS[name] = lambda img, *a, _n=name, **k: (applied.append(_n), img)[1]
        rng = np.random.default_rng(1)
        for _ in range(3000):
            aug(IMG, rng)
    finally:
        ra.OPS.update(calls)
    assert abs(len(applied) / 3000 - 1.0) < 0.06  # 2 draws x p 0.5
    counts = np.array([applied.count(n) for n in aug.spec.ops])
    assert counts.min() > 0.6 * counts.mean()


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5-inc1", "rand-m10-mstd0.5-inc1", "rand-m10-n3-p1.0-inc1"])
def test_ten_thousand_draws_raise_nothing(config: str) -> None:
    aug = ra.RandAugment(config, img_size=40, fill=FILL, interpolation="random")
    rng = np.random.default_rng(0)
    img = cv2.resize(IMG, (40, 36), interpolation=cv2.INTER_AREA)
    for _ in range(10_000):
        out = aug(img, rng)
        assert out.dtype == np.uint8 and out.shape == img.shape


def test_every_op_at_extremes_and_tiny_images() -> None:
    for shape in ((1, 1, 3), (2, 3, 3), (7, 5, 3)):
        img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        for name in ra.OPS:
            for magnitude in (0.0, 10.0, 30.0):
                for negate in (False, True):
                    for interp in (
                        cv2.INTER_NEAREST,
                        cv2.INTER_LINEAR,
                        cv2.INTER_CUBIC,
                    ):
                        args = ra.level_to_args(name, magnitude, negate, ra.OpParams(translate_const=3))
                        out = ra.apply_op(name, img, args, fill=FILL, interp=interp)
                        assert out.shape == shape and out.dtype == np.uint8, name


def test_same_generator_same_result() -> None:
    aug = ra.RandAugment("rand-m9-mstd0.5-inc1")
    outs = [aug(IMG, np.random.default_rng(42)) for _ in range(2)]
    np.testing.assert_array_equal(outs[0], outs[1])
    others = [aug(IMG, np.random.default_rng(s)) for s in range(1, 8)]
    assert any(not np.array_equal(outs[0], o) for o in others)
