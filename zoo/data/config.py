"""Configuration dataclasses of the data side: what to load (`DataConfig`) and how to augment it
(`AugmentConfig`).

Both are frozen; every field has a type and a default. The defaults of `AugmentConfig` are DeiT's
(facebookresearch/deit `main.py` and `datasets.build_transform`), so `AugmentConfig()` *is* the DeiT
recipe; `AugmentConfig.mnist()` is the mild recipe for the embedded MNIST-5k digits.

The training side fills them from YAML with a strict generic loader and then calls `validate()`,
which raises ``ValueError("field: message")`` on the first out-of-range value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from zoo.data.rand_augment import parse_rand_augment

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# MNIST-5k's normalisation: the one source of the values configs/mnist5k_poolformer.yaml (and so every
# MNIST-5k config, by `base:`) and every shipped MNIST-5k weight file were trained with. A recipe
# constant, not a measurement: the served images' own statistics (28x28 digits zero-padded to 32x32,
# values / 255) are close to it and are measured by `python -m zoo.bench data-stats`
# (zoo/bench/results/data_stats.md). Changing it changes the recipe the shipped weights were
# trained with (tests/test_shipped_weights.py would say so); tests/test_data_stats.py holds the
# default config to it and it to the measured statistics.
MNIST_MEAN: tuple[float, float, float] = (0.1014, 0.1014, 0.1014)
MNIST_STD: tuple[float, float, float] = (0.2816, 0.2816, 0.2816)
# ELPV's normalisation: the mean / std of all its images as the zoo serves them (300x300 solar cells
# area-averaged to 64x64, values / 255), as `python -m zoo.bench data-stats` measures them
# (zoo/bench/results/data_stats.md); tests/test_data_embedded.py checks them against the images.
ELPV_MEAN: tuple[float, float, float] = (0.5968, 0.5968, 0.5968)
ELPV_STD: tuple[float, float, float] = (0.1571, 0.1571, 0.1571)

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "random")
RE_MODES = ("const", "rand", "pixel")
MIXUP_MODES = ("batch", "pair", "elem")


def _check_pair(name: str, value: tuple[float, float], low: float, high: float) -> None:
    if len(value) != 2:
        raise ValueError(f"{name}: expected two numbers (min, max), got {value!r}")
    a, b = value
    if not (low <= a <= b <= high):
        raise ValueError(f"{name}: need {low} <= min <= max <= {high}, got {value!r}")


def _check_prob(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name}: must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class AugmentConfig:
    """Train and eval image pipeline; defaults are DeiT's.

    Train: RandomResizedCrop(img_size, scale, ratio, interpolation) -> horizontal flip (hflip) ->
    RandAugment (rand_augment, timm's config string; "" = off) or, when it is off, colour jitter
    (color_jitter for brightness, contrast and saturation; 0 = off) -> normalise (mean, std) ->
    random erasing (re_prob, re_mode, re_count). Eval: resize the short side to
    floor(img_size / crop_pct), centre crop img_size. Batch level: Mixup / CutMix with label
    smoothing through timm's `Mixup` (see `zoo.data.create_mixup`).
    """

    img_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    crop_pct: float = 0.875
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"

    @classmethod
    def mnist(cls) -> AugmentConfig:
        """Mild recipe for MNIST-5k / digits at 32x32: no flips (a flipped 2 is no digit), a
        gentle crop (scale 0.6-1, near-square), no RandAugment, colour jitter, erasing, Mixup or
        CutMix, label smoothing 0.1, MNIST mean/std, and eval on the whole image (crop_pct 1)."""
        return cls(
            img_size=32,
            scale=(0.6, 1.0),
            ratio=(0.85, 1.0 / 0.85),
            hflip=0.0,
            rand_augment="",
            color_jitter=0.0,
            interpolation="bilinear",
            mean=MNIST_MEAN,
            std=MNIST_STD,
            re_prob=0.0,
            crop_pct=1.0,
            mixup=0.0,
            cutmix=0.0,
            label_smoothing=0.1,
        )

    @property
    def fill(self) -> tuple[int, int, int]:
        """Fill colour of RandAugment's geometric ops: the mean as 8-bit RGB, as timm does."""
        return tuple(min(255, round(255 * m)) for m in self.mean)  # type: ignore[return-value]

    def validate(self) -> None:
        """Raise ``ValueError("field: message")`` for the first value out of range."""
        if self.img_size < 1:
            raise ValueError(f"img_size: must be >= 1, got {self.img_size!r}")
        _check_pair("scale", self.scale, 0.0, 1.0)
        if self.scale[1] <= 0:
            raise ValueError(f"scale: max must be > 0, got {self.scale!r}")
        _check_pair("ratio", self.ratio, 1e-6, math.inf)
        _check_prob("hflip", self.hflip)
        if self.rand_augment:
            try:
                parse_rand_augment(self.rand_augment)
            except ValueError as e:
                raise ValueError(f"rand_augment: {e}") from None
        if not (0.0 <= self.color_jitter <= 1.0):
            raise ValueError(f"color_jitter: must be in [0, 1], got {self.color_jitter!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation: must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if len(self.mean) != 3 or not all(0.0 <= m <= 1.0 for m in self.mean):
            raise ValueError(f"mean: expected three values in [0, 1], got {self.mean!r}")
        if len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise ValueError(f"std: expected three values > 0, got {self.std!r}")
        _check_prob("re_prob", self.re_prob)
        if self.re_mode not in RE_MODES:
            raise ValueError(f"re_mode: must be one of {RE_MODES}, got {self.re_mode!r}")
        if self.re_count < 1:
            raise ValueError(f"re_count: must be >= 1, got {self.re_count!r}")
        if not (0.0 < self.crop_pct <= 1.0):
            raise ValueError(f"crop_pct: must be in (0, 1], got {self.crop_pct!r}")
        if self.mixup < 0:
            raise ValueError(f"mixup: alpha must be >= 0, got {self.mixup!r}")
        if self.cutmix < 0:
            raise ValueError(f"cutmix: alpha must be >= 0, got {self.cutmix!r}")
        if not (0.0 <= self.label_smoothing < 1.0):
            raise ValueError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing!r}")
        _check_prob("mixup_prob", self.mixup_prob)
        _check_prob("mixup_switch_prob", self.mixup_switch_prob)
        if self.mixup_mode not in MIXUP_MODES:
            raise ValueError(f"mixup_mode: must be one of {MIXUP_MODES}, got {self.mixup_mode!r}")


@dataclass(frozen=True)
class DataConfig:
    """What to load.

    dataset: "mnist5k" (embedded, fixed seeded 4,000 / 1,000 split), "elpv" (2,624 solar-cell
    electroluminescence images inside the `elpv-dataset` package, pip extra `elpv`: 64x64, four
    defect grades, fixed seeded 1,970 / 654 split; see `zoo.data.datasets.load_elpv`), "digits"
    (scikit-learn's 8x8 digits, seeded split by val_fraction), or a path: an image folder
    (ImageNet layout, with `train_split` / `val_split` sub-folders or one folder a class, split by
    val_fraction) or a CIFAR-style folder of python pickles (data_batch_* / test_batch, or train /
    test). val_fraction applies to "digits" and image folders only (mnist5k and elpv have fixed
    fractions); split_seed to all of them.

    num_workers: loader processes; None sizes them from the cores this process may use
    (zoo.train.hardware.plan_threads). holdout: when > 0, a seeded stratified share of the
    *training* images becomes the validation split and the dataset's own validation images are
    not read at all: the split a hyper-parameter search tunes on (zoo.study), so that the
    split it reports stays unseen.
    """

    dataset: str = "mnist5k"
    val_fraction: float = 0.1
    split_seed: int = 0
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int | None = None
    holdout: float = 0.0
    max_bad_fraction: float = 0.01
    max_image_pixels: int = 89_478_485  # PIL's own default limit (Image.MAX_IMAGE_PIXELS)
    repeated_aug: int = 0

    def validate(self) -> None:
        """Raise ``ValueError("field: message")`` for the first value out of range."""
        if not self.dataset:
            raise ValueError("dataset: must be 'mnist5k', 'elpv', 'digits' or a folder path, got ''")
        if not (0.0 <= self.val_fraction < 1.0):
            raise ValueError(f"val_fraction: must be in [0, 1), got {self.val_fraction!r}")
        if not self.train_split or not self.val_split or self.train_split == self.val_split:
            raise ValueError(
                f"train_split: train_split and val_split must be two different non-empty names, "
                f"got {self.train_split!r} and {self.val_split!r}"
            )
        if not (0.0 <= self.holdout < 1.0):
            raise ValueError(f"holdout: must be in [0, 1), got {self.holdout!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers!r}")
        if not (0.0 <= self.max_bad_fraction <= 1.0):
            raise ValueError(f"max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction!r}")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels: must be >= 1, got {self.max_image_pixels!r}")
        if self.repeated_aug < 0:
            raise ValueError(f"repeated_aug: must be >= 0 (0/1 = off, 3 = DeiT), got {self.repeated_aug!r}")
