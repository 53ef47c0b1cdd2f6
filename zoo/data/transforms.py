"""The DeiT train and eval pipelines on OpenCV / albumentations ops.

Input: a uint8 HWC RGB numpy array. Output: a normalised CHW float32 torch tensor. Everything
stays uint8 until the last step, which normalises through one lookup table a channel and writes
the channel planes straight into the CHW output (normalise + HWC -> CHW in one pass); random
erasing then works on that float array.

Randomness: each call takes a `numpy.random.Generator`. The datasets of `zoo.data` make one a
sample from (seed, epoch, position in the epoch) so the augmentation of a sample never depends on
which worker or process draws it; without one, the transform falls back to a per-process generator
seeded from `torch.initial_seed()` (distinct in each DataLoader worker).

Where this deviates from torchvision / timm on PIL (and why):
* Resizing is OpenCV's INTER_CUBIC (for "bicubic"), which, unlike PIL's bicubic, does not widen
  its kernel when it shrinks. Up to 2x shrink that aliases little; beyond it the image is first
  box-averaged by the integer factor (INTER_AREA, fast on integer ratios), as PIL's own
  `reducing_gap` does. INTER_AREA on fractional ratios would be the faithful antialiased shrink
  but costs about 4x INTER_CUBIC here, and the pipeline's point is speed.
* The crop box of RandomResizedCrop is computed first and only the crop is resized (one
  `cv2.resize` of a view, no copy of the full image).
"""

from __future__ import annotations

import math
import os

import cv2
import numpy as np
import torch

from zoo.data.config import AugmentConfig
from zoo.data.rand_augment import INTERP_CV2, RandAugment, brightness, color, contrast

# no PyPI version check on import
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
from albumentations.augmentations.geometric import functional as fgeometric

__all__ = [
    "ColorJitter",
    "EvalTransform",
    "RandomErasing",
    "TrainTransform",
    "create_transform",
    "normalize_to_chw",
    "random_resized_crop_box",
]


_FALLBACK: dict[str, object] = {}  # {"pid": ..., "rng": ...} of this process


def _fallback_rng() -> np.random.Generator:
    """A generator for calls without one: per process, seeded from torch's seed (which the
    DataLoader makes distinct per worker), re-made after a fork."""
    pid = os.getpid()
    if _FALLBACK.get("pid") != pid:
        _FALLBACK["pid"] = pid
        _FALLBACK["rng"] = np.random.default_rng(torch.initial_seed())
    return _FALLBACK["rng"]  # type: ignore[return-value]


def _resize(img: np.ndarray, width: int, height: int, interpolation: str) -> np.ndarray:
    """Resize to (height, width) with the named kernel; a shrink by 2x or more first box-averages
    by the integer factor (antialiasing, as PIL's `reducing_gap` does)."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    flag = INTERP_CV2.get(interpolation, cv2.INTER_CUBIC)
    k = min(w // width, h // height)
    if k >= 2 and flag != cv2.INTER_NEAREST:
        # Trim to multiples of k (< k pixels, split between the two sides) so INTER_AREA takes
        # its fast exact-integer path; it averages k x k blocks.
        dh, dw = h % k, w % k
        img = img[dh // 2 : h - (dh - dh // 2), dw // 2 : w - (dw - dw // 2)]
        img = fgeometric.resize(img, (img.shape[0] // k, img.shape[1] // k), cv2.INTER_AREA)
    return fgeometric.resize(img, (height, width), flag)


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` (as timm uses it): (top, left, h, w) of a crop
    of area fraction in `scale` and aspect ratio (log-uniform) in `ratio`; 10 tries, then a
    centre crop clamped to `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ColorJitter:
    """torchvision's ColorJitter(b, c, s) on PIL semantics: factors uniform in [max(0, 1 - x),
    1 + x], applied in random order, with ImageEnhance's Brightness, Contrast and Color (hue is
    not jittered, as in DeiT / timm with a scalar colour jitter).

    Own implementation rather than albumentations' ColorJitter: that one has other defaults
    (hue 0.5, p 0.5) and its own random generator, which would bypass the per-sample seeding.
    """

    def __init__(self, strength: float) -> None:
        self.strength = float(strength)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Jitter a uint8 HWC RGB array."""
        low, high = max(0.0, 1.0 - self.strength), 1.0 + self.strength
        for op in rng.permutation(3):
            factor = rng.uniform(low, high)
            if op == 0:
                img = brightness(img, factor)
            elif op == 1:
                img = contrast(img, factor)
            else:
                img = color(img, factor)
        return img


def normalize_to_chw(img: np.ndarray, luts: np.ndarray) -> np.ndarray:
    """(x / 255 - mean) / std through one float32 lookup table a channel, written straight into a
    CHW array: uint8 (H, W, C) -> float32 (C, H, W). `luts` is (C, 256) float32."""
    h, w, c = img.shape
    out = np.empty((c, h, w), dtype=np.float32)  # (C, H, W)
    for i, plane in enumerate(cv2.split(img)):  # C contiguous (H, W) uint8 planes
        cv2.LUT(plane, luts[i], dst=out[i])
    return out


def _norm_luts(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    ramp = np.arange(256, dtype=np.float64) / 255.0
    # (C, 256)
    return np.stack([(ramp - m) / s for m, s in zip(mean, std)]).astype(np.float32)


class RandomErasing:
    """timm's RandomErasing (Zhong et al.) on a normalised CHW float32 array, in place: with
    probability `prob`, 1 to `count` boxes of area 2%-33% (split between the boxes) and aspect
    ratio log-uniform in [0.3, 1/0.3], filled with per-pixel normal noise ("pixel"), one normal
    colour a box ("rand") or zeros ("const")."""

    def __init__(
        self,
        prob: float,
        *,
        mode: str = "pixel",
        count: int = 1,
        min_area: float = 0.02,
        max_area: float = 1.0 / 3.0,
        min_aspect: float = 0.3,
    ) -> None:
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"re_mode: must be pixel, rand or const, got {mode!r}")
        self.prob, self.mode, self.count = prob, mode, count
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
        self._noise = torch.Generator()

    def __call__(self, chw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Erase boxes of a float32 (C, H, W) array in place and return it."""
        if rng.random() > self.prob:
            return chw
        c, img_h, img_w = chw.shape
        area = img_h * img_w
        count = 1 if self.count == 1 else int(rng.integers(1, self.count + 1))
        for _ in range(count):
            for _attempt in range(10):
                target_area = rng.uniform(self.min_area, self.max_area) * area / count
                aspect = math.exp(rng.uniform(*self.log_aspect))
                h = round(math.sqrt(target_area * aspect))
                w = round(math.sqrt(target_area / aspect))
                if w < img_w and h < img_h:
                    top = int(rng.integers(0, img_h - h + 1))
                    left = int(rng.integers(0, img_w - w + 1))
                    box = torch.from_numpy(chw[:, top : top + h, left : left + w])  # view
                    if self.mode == "const":
                        box.zero_()
                    else:
                        # torch's normal sampler is ~2x numpy's here; seeded from `rng`, so
                        # still a function of the sample's generator alone.
                        self._noise.manual_seed(int(rng.integers(0, 2**63 - 1)))
                        shape = (c, h, w) if self.mode == "pixel" else (c, 1, 1)
                        box.copy_(torch.randn(shape, generator=self._noise))
                    break
        return chw


class TrainTransform:
    """DeiT train pipeline: RandomResizedCrop -> hflip -> RandAugment | ColorJitter ->
    normalise + CHW -> RandomErasing. Call with a uint8 HWC RGB array (and a generator)."""

    takes_rng = True  # the datasets pass each sample's generator

    def __init__(self, aug: AugmentConfig) -> None:
        self.aug = aug
        self.size = aug.img_size
        self.rand_augment = (
            RandAugment(
                aug.rand_augment,
                img_size=aug.img_size,
                fill=aug.fill,
                interpolation=aug.interpolation,
            )
            if aug.rand_augment
            else None
        )
        # As timm: colour jitter only when RandAugment is off.
        self.color_jitter = ColorJitter(aug.color_jitter) if aug.color_jitter > 0 and not aug.rand_augment else None
        self.erasing = RandomErasing(aug.re_prob, mode=aug.re_mode, count=aug.re_count) if aug.re_prob > 0 else None
        self.luts = _norm_luts(aug.mean, aug.std)
        self.interpolation = aug.interpolation

    def _interp(self, rng: np.random.Generator) -> str:
        if self.interpolation == "random":
            return ("bilinear", "bicubic")[int(rng.integers(0, 2))]
        return self.interpolation

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        """uint8 (H, W, 3) RGB -> float32 (3, img_size, img_size) tensor."""
        rng = rng if rng is not None else _fallback_rng()
        a = self.aug
        top, left, h, w = random_resized_crop_box(img.shape[0], img.shape[1], a.scale, a.ratio, rng)
        img = _resize(img[top : top + h, left : left + w], self.size, self.size, self._interp(rng))
        if a.hflip > 0 and rng.random() < a.hflip:
            img = cv2.flip(img, 1)
        if self.rand_augment is not None:
            img = self.rand_augment(img, rng)
        elif self.color_jitter is not None:
            img = self.color_jitter(img, rng)
        chw = normalize_to_chw(np.ascontiguousarray(img), self.luts)
        if self.erasing is not None:
            chw = self.erasing(chw, rng)
        return torch.from_numpy(chw)

    def __repr__(self) -> str:
        return f"TrainTransform({self.aug})"


class EvalTransform:
    """Eval pipeline: resize the short side to floor(img_size / crop_pct) (the long side in
    proportion, as torchvision's Resize(int)), centre crop img_size, normalise + CHW."""

    takes_rng = True

    def __init__(self, aug: AugmentConfig) -> None:
        self.aug = aug
        self.size = aug.img_size
        self.scale_size = math.floor(aug.img_size / aug.crop_pct)
        self.luts = _norm_luts(aug.mean, aug.std)
        self.interpolation = "bicubic" if aug.interpolation == "random" else aug.interpolation

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        """uint8 (H, W, 3) RGB -> float32 (3, img_size, img_size) tensor; `rng` is unused."""
        h, w = img.shape[:2]
        s = self.scale_size
        if h <= w:
            new_h, new_w = s, int(s * w / h)
        else:
            new_h, new_w = int(s * h / w), s
        img = _resize(img, new_w, new_h, self.interpolation)
        t = self.size
        top = round((new_h - t) / 2.0)
        left = round((new_w - t) / 2.0)
        if top < 0 or left < 0:  # image smaller than the crop (crop_pct > 1 is refused; rounding)
            img = _resize(img, max(new_w, t), max(new_h, t), self.interpolation)
            top, left = max(top, 0), max(left, 0)
        img = img[top : top + t, left : left + t]
        return torch.from_numpy(normalize_to_chw(np.ascontiguousarray(img), self.luts))

    def __repr__(self) -> str:
        return f"EvalTransform(img_size={self.size}, resize={self.scale_size}, {self.interpolation})"


def create_transform(aug: AugmentConfig, is_training: bool) -> TrainTransform | EvalTransform:
    """The DeiT train pipeline (`is_training`) or the eval pipeline for `aug`; a callable
    `(img: uint8 HWC RGB ndarray, rng: numpy Generator | None = None) -> CHW float32 tensor`."""
    aug.validate()
    return TrainTransform(aug) if is_training else EvalTransform(aug)
