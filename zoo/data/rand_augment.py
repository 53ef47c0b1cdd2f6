"""RandAugment with timm's semantics on OpenCV / albumentations ops (uint8 HWC RGB numpy arrays).

albumentations 2.0.8 (its last MIT release) has no RandAugment, and timm 1.0.31's PIL RandAugment
raises in posterize under Pillow >= 10 (`ImageOps.posterize` now refuses 0 bits, which
`PosterizeIncreasing` asks for at magnitude 10). This module reimplements timm's
`rand_augment_transform`:

* the config string (`rand-m9-mstd0.5-inc1` = 2 ops an image, magnitude 9 of 10, Gaussian
  magnitude noise of std 0.5 per op draw clipped to [0, 10], the increasing-severity op set),
* the same op lists, the same level -> argument mappings (`level_to_args`, the sign draws made
  explicit), each op applied with probability `p` (0.5),
* each op with PIL's definition of it (`ImageOps`, `ImageEnhance`, `Image.transform`); the
  point ops (Invert, Posterize, Solarize, SolarizeAdd, AutoContrast, Equalize, Brightness,
  Contrast) give PIL's pixels exactly, the blends (Color, Sharpness) and the translations within
  1 level of rounding; Rotate and Shear, on OpenCV's `warpAffine`, differ in the interpolation
  kernel (OpenCV's bicubic is a = -0.75, PIL's affine one a = -1) and at the image edges.
  Posterize with 0 bits gives black, as PIL < 10 (and so timm's design) did.

All randomness comes from the `numpy.random.Generator` passed in, so a seeded generator gives the
same augmentation in any process.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

# albumentations' import checks PyPI for a newer version; nothing may go to the network at run time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
from albumentations.augmentations.geometric import functional as fgeometric
from albumentations.augmentations.pixel import functional as fpixel

__all__ = [
    "OPS",
    "RAND_INCREASING_TRANSFORMS",
    "RAND_TRANSFORMS",
    "RandAugment",
    "RandAugmentSpec",
    "apply_op",
    "level_to_args",
    "parse_rand_augment",
]

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude 10 is the maximum of each op's range
DEFAULT_FILL = (128, 128, 128)  # timm's _FILL when no image mean is given

# timm.data.auto_augment._RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS / _RAND_3A / weights.
RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
RAND_3A = ("SolarizeIncreasing", "Desaturate", "GaussianBlur")
RAND_WEIGHTED_3A = {
    "SolarizeIncreasing": 6, "Desaturate": 6, "GaussianBlur": 6, "Rotate": 3, "ShearX": 2, "ShearY": 2,
    "PosterizeIncreasing": 1, "AutoContrast": 1, "ColorIncreasing": 1, "SharpnessIncreasing": 1,
    "ContrastIncreasing": 1, "BrightnessIncreasing": 1, "Equalize": 1, "Invert": 1,
}  # fmt: skip
RAND_WEIGHTED_0 = {
    "Rotate": 3, "ShearX": 2, "ShearY": 2, "TranslateXRel": 1, "TranslateYRel": 1, "ColorIncreasing": 0.25,
    "SharpnessIncreasing": 0.25, "AutoContrast": 0.25, "SolarizeIncreasing": 0.05, "SolarizeAdd": 0.05,
    "ContrastIncreasing": 0.05, "BrightnessIncreasing": 0.05, "Equalize": 0.05, "PosterizeIncreasing": 0.05,
    "Invert": 0.05,
}  # fmt: skip

INTERP_CV2 = {
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}
RANDOM_INTERP = (cv2.INTER_LINEAR, cv2.INTER_CUBIC)  # timm's _RANDOM_INTERPOLATION


# ----------------------------------------------------------------------------------------------
# level -> argument mappings (timm's LEVEL_TO_ARG with the random sign made an argument)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpParams:
    """timm's `hparams` that change op arguments: `translate_const` (absolute translate at
    magnitude 10, timm sets it to 45% of the image size) and `translate_pct` (relative)."""

    translate_const: int = 250
    translate_pct: float = 0.45


def _signed(value: float, negate: bool) -> float:
    # timm's _randomly_negate: `-v if random.random() > 0.5 else v`
    return -value if negate else value


def _enhance_increasing(level: float, negate: bool) -> float:
    return max(0.1, 1.0 + _signed(level / LEVEL_DENOM * 0.9, negate))


def _minmax(level: float, low: float, high: float) -> float:
    # the same float operations, in the same order, as timm's _minmax_level_to_arg
    level = level / LEVEL_DENOM
    return max(low, min(high, low + (high - low) * level))


def _solarize_level(level: float) -> int:
    return min(256, int(level / LEVEL_DENOM * 256))


_LEVEL_FNS: dict[str, Callable[[float, bool, OpParams], tuple]] = {
    "AutoContrast": lambda lv, ng, hp: (),
    "Equalize": lambda lv, ng, hp: (),
    "Invert": lambda lv, ng, hp: (),
    "Rotate": lambda lv, ng, hp: (_signed(lv / LEVEL_DENOM * 30.0, ng),),
    "Posterize": lambda lv, ng, hp: (int(lv / LEVEL_DENOM * 4),),
    "PosterizeIncreasing": lambda lv, ng, hp: (4 - int(lv / LEVEL_DENOM * 4),),
    "PosterizeOriginal": lambda lv, ng, hp: (int(lv / LEVEL_DENOM * 4) + 4,),
    "Solarize": lambda lv, ng, hp: (_solarize_level(lv),),
    "SolarizeIncreasing": lambda lv, ng, hp: (256 - _solarize_level(lv),),
    "SolarizeAdd": lambda lv, ng, hp: (min(128, int(lv / LEVEL_DENOM * 110)),),
    "Color": lambda lv, ng, hp: (lv / LEVEL_DENOM * 1.8 + 0.1,),
    "ColorIncreasing": lambda lv, ng, hp: (_enhance_increasing(lv, ng),),
    "Contrast": lambda lv, ng, hp: (lv / LEVEL_DENOM * 1.8 + 0.1,),
    "ContrastIncreasing": lambda lv, ng, hp: (_enhance_increasing(lv, ng),),
    "Brightness": lambda lv, ng, hp: (lv / LEVEL_DENOM * 1.8 + 0.1,),
    "BrightnessIncreasing": lambda lv, ng, hp: (_enhance_increasing(lv, ng),),
    "Sharpness": lambda lv, ng, hp: (lv / LEVEL_DENOM * 1.8 + 0.1,),
    "SharpnessIncreasing": lambda lv, ng, hp: (_enhance_increasing(lv, ng),),
    "ShearX": lambda lv, ng, hp: (_signed(lv / LEVEL_DENOM * 0.3, ng),),
    "ShearY": lambda lv, ng, hp: (_signed(lv / LEVEL_DENOM * 0.3, ng),),
    "TranslateX": lambda lv, ng, hp: (_signed(lv / LEVEL_DENOM * float(hp.translate_const), ng),),
    "TranslateY": lambda lv, ng, hp: (_signed(lv / LEVEL_DENOM * float(hp.translate_const), ng),),
    "TranslateXRel": lambda lv, ng, hp: (_signed(lv / LEVEL_DENOM * hp.translate_pct, ng),),
    "TranslateYRel": lambda lv, ng, hp: (_signed(lv / LEVEL_DENOM * hp.translate_pct, ng),),
    "Desaturate": lambda lv, ng, hp: (_minmax(lv, 0.5, 1.0),),
    "GaussianBlur": lambda lv, ng, hp: (_minmax(lv, 0.1, 2.0),),
}


def level_to_args(name: str, magnitude: float, negate: bool, params: OpParams = OpParams()) -> tuple:
    """Arguments of op `name` at `magnitude` (0-10 scale), as timm's LEVEL_TO_ARG computes them;
    `negate` is the outcome of timm's random sign draw (`random.random() > 0.5`) for the ops that
    make one (Rotate, Shear*, Translate*, *Increasing enhancements), ignored by the others."""
    try:
        fn = _LEVEL_FNS[name]
    except KeyError:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {sorted(_LEVEL_FNS)}") from None
    return fn(magnitude, negate, params)


# ----------------------------------------------------------------------------------------------
# ops: uint8 HWC RGB in, uint8 HWC RGB out; (img, *args, fill=, interp=)
# ----------------------------------------------------------------------------------------------

_IDENTITY_LUT = np.arange(256, dtype=np.uint8)
_RAMP_F32 = np.arange(256, dtype=np.float32)
# PIL's ImageFilter.SMOOTH
_SMOOTH_KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0


def _lut(img: np.ndarray, lut: np.ndarray) -> np.ndarray:
    return cv2.LUT(img, lut)


def _per_channel_lut(img: np.ndarray, luts: list[np.ndarray]) -> np.ndarray:
    # cv2.LUT with a (1, 256, C) table maps channel c through table c.
    table = np.stack(luts, axis=-1)  # C x (256,) -> (256, C)
    table = table.reshape(1, 256, len(luts))  # (256, C) -> (1, 256, C)
    return cv2.LUT(img, table)


def _channel_hists(img: np.ndarray) -> list[np.ndarray]:
    return [cv2.calcHist([img], [c], None, [256], (0, 256)).ravel() for c in range(img.shape[2])]


def _blend_lut(degenerate: float, factor: float) -> np.ndarray:
    # PIL's Image.blend(degenerate, image, factor) in 8 bits: float32 `d + f * (x - d)`, truncated
    # toward zero, clipped to [0, 255]. Exact for a constant degenerate image (Brightness, Contrast).
    d, f = np.float32(degenerate), np.float32(factor)
    values = d + f * (_RAMP_F32 - d)
    return np.clip(np.trunc(values), 0, 255).astype(np.uint8)


def auto_contrast(img: np.ndarray, fill: tuple = DEFAULT_FILL, interp: int = cv2.INTER_CUBIC) -> np.ndarray:
    """PIL `ImageOps.autocontrast(img)` (cutoff 0): stretch each channel's [min, max] to [0, 255].
    Own LUT: albumentations' `auto_contrast(method="pil")` rounds where PIL truncates."""
    luts = []
    for c in range(img.shape[2]):
        lo, hi, _, _ = cv2.minMaxLoc(img[:, :, c] if img.shape[2] == 1 else cv2.extractChannel(img, c))
        if hi <= lo:
            luts.append(_IDENTITY_LUT)
            continue
        scale = 255.0 / (hi - lo)
        offset = -lo * scale
        luts.append(np.clip(np.trunc(np.arange(256) * scale + offset), 0, 255).astype(np.uint8))
    return _per_channel_lut(img, luts)


def equalize(img: np.ndarray, fill: tuple = DEFAULT_FILL, interp: int = cv2.INTER_CUBIC) -> np.ndarray:
    """PIL `ImageOps.equalize(img)`, per channel. Own LUT: albumentations' `equalize(mode="pil")`
    indexes the cumulative histogram one bin later than PIL does."""
    luts = []
    for h in _channel_hists(img):
        nonzero = h[h > 0]
        if len(nonzero) <= 1:
            luts.append(_IDENTITY_LUT)
            continue
        step = int(nonzero.sum() - nonzero[-1]) // 255
        if not step:
            luts.append(_IDENTITY_LUT)
            continue
        # pixels below each level
        before = np.concatenate(([0], np.cumsum(h, dtype=np.int64)[:-1]))
        luts.append(np.clip((step // 2 + before) // step, 0, 255).astype(np.uint8))
    return _per_channel_lut(img, luts)


def invert(img: np.ndarray, fill: tuple = DEFAULT_FILL, interp: int = cv2.INTER_CUBIC) -> np.ndarray:
    """PIL `ImageOps.invert`: 255 - x (albumentations)."""
    return fpixel.invert(img)


def posterize(
    img: np.ndarray,
    bits: int,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """Keep the `bits` high bits of each channel; >= 8 is a no-op, 0 gives black (PIL < 10 and
    TF semantics; Pillow >= 10 raises for 0, which is what breaks timm's RandAugment)."""
    if bits >= 8:
        return img
    if bits <= 0:
        return np.zeros_like(img)
    # albumentations: `x & ~(2**(8-bits) - 1)` via a LUT
    return fpixel.posterize(img, int(bits))


def solarize(
    img: np.ndarray,
    thresh: int,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """PIL `ImageOps.solarize(img, thresh)`: x >= thresh -> 255 - x. Own LUT: albumentations'
    `solarize` takes a threshold in [0, 1] and compares with `thresh / 255 * 255` in floats."""
    lut = np.where(_IDENTITY_LUT < thresh, _IDENTITY_LUT, 255 - _IDENTITY_LUT).astype(np.uint8)
    return _lut(img, lut)


def solarize_add(
    img: np.ndarray,
    add: int,
    thresh: int = 128,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """timm's `solarize_add`: x < thresh -> min(255, x + add)."""
    ramp = _IDENTITY_LUT.astype(np.int32)
    lut = np.where(ramp < thresh, np.minimum(255, ramp + add), ramp).astype(np.uint8)
    return _lut(img, lut)


def color(
    img: np.ndarray,
    factor: float,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """PIL `ImageEnhance.Color`: blend with the grey image (albumentations' torchvision-style
    saturation, the same blend; it rounds where PIL truncates)."""
    return fpixel.adjust_saturation_torchvision(img, factor)


def contrast(
    img: np.ndarray,
    factor: float,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """PIL `ImageEnhance.Contrast`: blend with the constant image of the rounded grey mean."""
    mean = int(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).mean() + 0.5)
    return _lut(img, _blend_lut(mean, factor))


def brightness(
    img: np.ndarray,
    factor: float,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """PIL `ImageEnhance.Brightness`: blend with black."""
    return _lut(img, _blend_lut(0.0, factor))


def sharpness(
    img: np.ndarray,
    factor: float,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """PIL `ImageEnhance.Sharpness`: blend with PIL's SMOOTH-filtered image (3x3 kernel, border
    pixels left as they are)."""
    degenerate = cv2.filter2D(img, -1, _SMOOTH_KERNEL, borderType=cv2.BORDER_REPLICATE)
    degenerate[0, :] = img[0, :]
    degenerate[-1, :] = img[-1, :]
    degenerate[:, 0] = img[:, 0]
    degenerate[:, -1] = img[:, -1]
    return cv2.addWeighted(img, factor, degenerate, 1.0 - factor, 0.0)


def desaturate(
    img: np.ndarray,
    factor: float,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """timm's `desaturate`: Color with factor 1 - factor, clamped to [0, 1]."""
    return color(img, min(1.0, max(0.0, 1.0 - factor)))


def gaussian_blur(
    img: np.ndarray,
    radius: float,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """PIL `GaussianBlur(radius)` (PIL approximates it with box blurs; here a true Gaussian)."""
    return cv2.GaussianBlur(img, (0, 0), sigmaX=radius, borderType=cv2.BORDER_REPLICATE)


def _affine(img: np.ndarray, matrix: tuple, fill: tuple, interp: int) -> np.ndarray:
    """PIL `img.transform(size, AFFINE, matrix)`: `matrix` = (a, b, c, d, e, f) maps an output
    point (x, y) to the input point (a x + b y + c, d x + e y + f), in PIL's continuous coordinates
    where pixel centres sit at +0.5. OpenCV puts pixel centres at integer coordinates, so the
    offsets move by A (0.5, 0.5) - 0.5; the map is inverse (output -> input), hence WARP_INVERSE_MAP."""
    a, b, c, d, e, f = matrix
    h, w = img.shape[:2]
    m = np.array(
        [
            [a, b, c + 0.5 * (a + b) - 0.5],
            [d, e, f + 0.5 * (d + e) - 0.5],
            [0.0, 0.0, 1.0],
        ],
        dtype=np.float64,
    )
    return fgeometric.warp_affine(
        img,
        m,
        interpolation=interp | cv2.WARP_INVERSE_MAP,
        fill=tuple(float(v) for v in fill),
        border_mode=cv2.BORDER_CONSTANT,
        output_shape=(h, w),
    )


def rotate(
    img: np.ndarray,
    degrees: float,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """PIL `img.rotate(degrees)`: counter-clockwise about the image centre, same size, the same
    inverse matrix as PIL builds."""
    h, w = img.shape[:2]
    angle = -math.radians(degrees % 360.0)
    m = [
        round(math.cos(angle), 15), round(math.sin(angle), 15), 0.0,
        round(-math.sin(angle), 15), round(math.cos(angle), 15), 0.0,
    ]  # fmt: skip
    cx, cy = w / 2.0, h / 2.0
    m[2] = m[0] * -cx + m[1] * -cy + cx
    m[5] = m[3] * -cx + m[4] * -cy + cy
    return _affine(img, tuple(m), fill, interp)


def shear_x(
    img: np.ndarray,
    factor: float,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """timm's `shear_x`: affine (1, factor, 0, 0, 1, 0)."""
    return _affine(img, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill, interp)


def shear_y(
    img: np.ndarray,
    factor: float,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """timm's `shear_y`: affine (1, 0, 0, factor, 1, 0)."""
    return _affine(img, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill, interp)


def _cubic_weights(f: float, a: float = -1.0) -> np.ndarray:
    """The cubic convolution kernel of PIL's `Image.transform` (a = -1; PIL's resize uses -0.5,
    OpenCV's INTER_CUBIC -0.75) for the four taps at offsets -1, 0, 1, 2 from the sample point's
    floor, f = its fractional part."""
    d = np.array([f + 1.0, f, 1.0 - f, 2.0 - f])
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    far = ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
    return np.where(d <= 1.0, near, far).astype(np.float32)


def _translate(img: np.ndarray, pixels: float, axis: int, fill: tuple, interp: int) -> np.ndarray:
    """Content moves by -`pixels` along `axis` (1 = x, 0 = y): out[i] = in[i + pixels],
    interpolated along that axis only, `fill` where the sample point falls outside the image.

    A translation is separable, so instead of a 2-D warp (OpenCV's cubic remap is scalar code and
    costs ~3x its bilinear one) this is one 4-tap (bicubic) or 2-tap (bilinear) 1-D filter on the
    whole image and a shift by the integer part; the taps are PIL's affine bicubic kernel, so it
    also matches timm to +-1 level where `warpAffine` differs by its kernel. PIL samples the input at
    i + pixels (pixel-index coordinates, centres at integers), clamps the taps to the image (edge replication) and fills
    where that point lies outside [-0.5, size - 0.5)."""
    size = img.shape[axis]
    base = math.floor(pixels)
    f = pixels - base
    if interp == cv2.INTER_NEAREST:
        base, taps, anchor = math.floor(pixels + 0.5), None, 0
    elif interp == cv2.INTER_LINEAR:
        taps, anchor = np.array([1.0 - f, f], dtype=np.float32), 0
    else:
        taps, anchor = _cubic_weights(f), 1
    # Output index i reads filtered index i + base; valid where -0.5 <= i + pixels < size - 0.5.
    lo = max(0, math.ceil(-0.5 - pixels))
    hi = min(size, math.ceil(size - 0.5 - pixels))
    out = np.empty_like(img)
    out[...] = np.asarray(fill, dtype=np.uint8)
    if hi <= lo:
        return out
    src, pad = img, 0
    if lo + base < 0 or hi + base > size:
        # The first / last valid sample point is within half a pixel outside the image: its
        # floor is index -1 (or size); pad by edge replication, as PIL clamps its taps.
        pad = 2
        src = cv2.copyMakeBorder(
            img,
            *((0, 0, pad, pad) if axis == 1 else (pad, pad, 0, 0)),
            cv2.BORDER_REPLICATE,
        )
    if taps is not None and f != 0.0:
        # (1, k) along x, (k, 1) along y
        kernel = taps.reshape(1, -1) if axis == 1 else taps.reshape(-1, 1)
        point = (anchor, 0) if axis == 1 else (0, anchor)
        src = cv2.filter2D(src, -1, kernel, anchor=point, borderType=cv2.BORDER_REPLICATE)
    a, b = lo + base + pad, hi + base + pad
    if axis == 1:
        out[:, lo:hi] = src[:, a:b]
    else:
        out[lo:hi] = src[a:b]
    return out


def translate_x_abs(
    img: np.ndarray,
    pixels: float,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """timm's `translate_x_abs` (affine (1, 0, pixels, 0, 1, 0)): content moves left by `pixels`."""
    return _translate(img, pixels, 1, fill, interp)


def translate_y_abs(
    img: np.ndarray,
    pixels: float,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """timm's `translate_y_abs` (affine (1, 0, 0, 0, 1, pixels)): content moves up by `pixels`."""
    return _translate(img, pixels, 0, fill, interp)


def translate_x_rel(
    img: np.ndarray,
    pct: float,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """timm's `translate_x_rel`: by `pct` of the width."""
    return translate_x_abs(img, pct * img.shape[1], fill, interp)


def translate_y_rel(
    img: np.ndarray,
    pct: float,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """timm's `translate_y_rel`: by `pct` of the height."""
    return translate_y_abs(img, pct * img.shape[0], fill, interp)


OPS: dict[str, Callable[..., np.ndarray]] = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "Rotate": rotate,
    "Posterize": posterize,
    "PosterizeIncreasing": posterize,
    "PosterizeOriginal": posterize,
    "Solarize": solarize,
    "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    "Color": color,
    "ColorIncreasing": color,
    "Contrast": contrast,
    "ContrastIncreasing": contrast,
    "Brightness": brightness,
    "BrightnessIncreasing": brightness,
    "Sharpness": sharpness,
    "SharpnessIncreasing": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x_abs,
    "TranslateY": translate_y_abs,
    "TranslateXRel": translate_x_rel,
    "TranslateYRel": translate_y_rel,
    "Desaturate": desaturate,
    "GaussianBlur": gaussian_blur,
}


def apply_op(
    name: str,
    img: np.ndarray,
    args: tuple,
    fill: tuple = DEFAULT_FILL,
    interp: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """Apply op `name` with the arguments from `level_to_args` to a uint8 HWC RGB image."""
    return OPS[name](img, *args, fill=fill, interp=interp)


# ----------------------------------------------------------------------------------------------
# the config string and the transform
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment config string."""

    ops: tuple[str, ...]
    # normalised choice weights (choice without replacement) or None
    weights: tuple[float, ...] | None
    num_layers: int = 2
    magnitude: float = 10.0
    magnitude_std: float = 0.0  # inf: uniform in [0, magnitude]
    magnitude_max: float = LEVEL_DENOM
    prob: float = 0.5


def parse_rand_augment(config_str: str) -> RandAugmentSpec:
    """Parse timm's RandAugment string, e.g. ``rand-m9-mstd0.5-inc1``: sections m (magnitude,
    int), n (ops an image), p (probability of each op), mstd (magnitude std; > 100 = uniform),
    mmax (magnitude clip), inc (increasing-severity op set), t (op set: weights, 3a, 3aw).
    Unlike timm, an unknown section is an error, not silently ignored."""
    parts = config_str.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment config must start with 'rand', got {config_str!r}")
    magnitude, num_layers, prob, mstd, mmax, increasing, choice = (
        LEVEL_DENOM,
        2,
        0.5,
        0.0,
        0.0,
        False,
        "",
    )
    for section in parts[1:]:
        if section.startswith("t"):
            choice = section[1:]
            if choice not in ("weights", "3a", "3aw"):
                raise ValueError(f"unknown RandAugment op set {section!r} in {config_str!r}")
            continue
        split = re.split(r"(\d.*)", section)
        if len(split) < 2:
            raise ValueError(f"RandAugment section {section!r} of {config_str!r} has no value")
        key, val = split[:2]
        try:
            if key == "mstd":
                mstd = float(val)
                if mstd > 100:
                    mstd = math.inf
            elif key == "mmax":
                mmax = int(val)
            elif key == "inc":
                increasing = bool(int(val))
            elif key == "m":
                magnitude = int(val)
            elif key == "n":
                num_layers = int(val)
            elif key == "p":
                prob = float(val)
            else:
                raise ValueError(f"unknown RandAugment section {section!r} in {config_str!r}")
        except ValueError as e:
            if "unknown" in str(e):
                raise
            raise ValueError(f"bad value in RandAugment section {section!r} of {config_str!r}") from None
    if num_layers < 0 or not (0.0 <= prob <= 1.0) or magnitude < 0 or mstd < 0:
        raise ValueError(f"RandAugment values out of range in {config_str!r}")
    weights = None
    if choice == "weights" or choice == "3aw":
        table = RAND_WEIGHTED_0 if choice == "weights" else RAND_WEIGHTED_3A
        ops = tuple(table)
        total = float(sum(table.values()))
        weights = tuple(v / total for v in table.values())
        if num_layers > len(ops):
            raise ValueError(f"weighted RandAugment draws without replacement; n={num_layers} > {len(ops)} ops")
    elif choice == "3a":
        ops = RAND_3A
    else:
        ops = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
    return RandAugmentSpec(
        ops=ops,
        weights=weights,
        num_layers=num_layers,
        magnitude=float(magnitude),
        magnitude_std=mstd,
        magnitude_max=float(mmax or LEVEL_DENOM),  # timm: `self.magnitude_max or _LEVEL_DENOM`
        prob=prob,
    )


class RandAugment:
    """timm's RandAugment on uint8 HWC RGB arrays: `num_layers` ops drawn (with replacement,
    or weighted without), each applied with probability `prob` at a magnitude drawn per op
    (Gaussian noise, clipped to [0, magnitude_max]). `interpolation` "random" picks bilinear or
    bicubic per op as timm does; otherwise timm (and this) uses the configured one for every op."""

    def __init__(
        self,
        config_str: str,
        *,
        img_size: int = 224,
        fill: tuple[int, int, int] = DEFAULT_FILL,
        interpolation: str = "bicubic",
    ) -> None:
        self.config_str = config_str
        self.spec = parse_rand_augment(config_str)
        # timm's create_transform: translate_const = 45% of the image size (used by TranslateX/Y).
        self.params = OpParams(translate_const=int(img_size * 0.45))
        self.fill = tuple(int(v) for v in fill)
        if interpolation != "random" and interpolation not in INTERP_CV2:
            raise ValueError(f"interpolation: unknown {interpolation!r}")
        self.interp = None if interpolation == "random" else INTERP_CV2[interpolation]
        self._weights = None if self.spec.weights is None else np.asarray(self.spec.weights)

    def sample_magnitude(self, rng: np.random.Generator) -> float:
        """One op's magnitude, as timm's AugmentOp draws it."""
        s = self.spec
        m = s.magnitude
        if s.magnitude_std == math.inf:
            m = rng.uniform(0.0, m)
        elif s.magnitude_std > 0:
            m = rng.normal(m, s.magnitude_std)
        return max(0.0, min(m, s.magnitude_max))

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augment a uint8 HWC RGB array with randomness from `rng`."""
        s = self.spec
        n_ops = len(s.ops)
        if self._weights is None:
            chosen = rng.integers(0, n_ops, size=s.num_layers)
        else:
            chosen = rng.choice(n_ops, size=s.num_layers, replace=False, p=self._weights)
        for i in chosen:
            if s.prob < 1.0 and rng.random() > s.prob:
                continue
            name = s.ops[i]
            magnitude = self.sample_magnitude(rng)
            args = level_to_args(name, magnitude, bool(rng.random() > 0.5), self.params)
            interp = self.interp if self.interp is not None else RANDOM_INTERP[int(rng.integers(0, 2))]
            img = OPS[name](img, *args, fill=self.fill, interp=interp)
        return img

    def __repr__(self) -> str:
        return f"RandAugment({self.config_str!r}, ops={len(self.spec.ops)}, fill={self.fill})"
