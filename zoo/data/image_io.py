"""Reading image files into uint8 HWC RGB arrays, fast where possible and strict about bad files.

`load_image(path)` returns the pixels or raises `BadImageError` with one of `REASONS`:

* empty (zero-byte) files, files no decoder recognises (a text file named `.jpg`), truncated or
  corrupt data, images whose header claims more than `max_pixels` pixels (decompression bombs:
  refused from the header, before any pixel is allocated), unreadable files (permissions).
* Odd but valid images are converted to RGB: grayscale L / LA, RGBA (alpha dropped, as PIL's
  `convert("RGB")` does), palette P / PA, CMYK (PIL's conversion), 16-bit I;16 / I (the high
  byte: x >> 8), 1-bit, YCbCr / LAB / HSV, float F (clipped to [0, 255]).

Speed: PIL parses the header only (tens of microseconds: format, mode, size); common 8-bit
JPEG / PNG / BMP / WebP files are then decoded by OpenCV straight to RGB (`IMREAD_COLOR_RGB`), the
rest by PIL. OpenCV's JPEG decoder returns a grey-padded image for a truncated file instead of an
error, so a JPEG goes the OpenCV way only when it ends with the EOI marker and a PNG only when it
ends with its IEND chunk; anything else is decoded by PIL, which raises on truncation. EXIF
orientation is ignored, as PIL (and so timm and torchvision) ignores it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS default
# OpenCV's own pixel limit, read once at its first decode; keep it no larger than ours for the
# formats only OpenCV reads (PIL's header check covers the rest). Set before cv2 decodes anything.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))

import cv2  # noqa: E402 (after the environment variable it reads at import)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMG_EXTENSIONS",
    "REASONS",
    "BadImageError",
    "decode_image",
    "find_images",
    "is_image_file",
    "load_image",
]

IMG_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif",
    ".jfif", ".jp2", ".tga",
)  # fmt: skip

# Reason codes (index into REASONS) are what the datasets keep, one byte a file, in shared memory.
REASONS = (
    "ok",
    "empty file (0 bytes)",
    "not an image (no decoder recognises it)",
    "truncated or corrupt image data",
    "too many pixels (decompression bomb)",
    "unsupported image mode",
    "unreadable file",
)
EMPTY, NOT_IMAGE, CORRUPT, TOO_LARGE, UNSUPPORTED, UNREADABLE = range(1, 7)

_CV2_FORMATS = {"JPEG", "PNG", "BMP", "WEBP"}
_CV2_MODES = {"RGB", "L", "RGBA", "LA", "P"}
_CV2_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION


class BadImageError(Exception):
    """A file that cannot be used as an image; `code` indexes `REASONS`, `detail` says more."""

    def __init__(self, code: int, detail: str, path: str = "") -> None:
        self.code, self.detail, self.path = code, detail, path
        super().__init__(f"{path}: {REASONS[code]}: {detail}" if path else f"{REASONS[code]}: {detail}")

    @property
    def reason(self) -> str:
        """`REASONS[code]` with the detail, e.g. 'too many pixels (decompression bomb): 10^10 > ...'."""
        return f"{REASONS[self.code]}: {self.detail}"


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a name with one of `IMG_EXTENSIONS` (case-insensitive) that is not hidden."""
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def find_images(folder: str | os.PathLike) -> list[str]:
    """Image files under `folder` (recursive, following links, hidden entries skipped), by
    `is_image_file`, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in filenames if is_image_file(f)]
    return sorted(found)


def _looks_complete(fmt: str, data: bytes) -> bool:
    """Whether a JPEG ends with EOI (FF D9) / a PNG with its IEND chunk (trailing NULs or
    whitespace allowed); other formats are not checked here."""
    if fmt == "JPEG":
        return data.rstrip(b"\x00\r\n \t").endswith(b"\xff\xd9")
    if fmt == "PNG":
        return b"IEND" in data[-32:]
    return True


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Decode a PIL image fully and convert it to uint8 (H, W, 3) RGB."""
    mode = im.mode
    if mode == "RGB":
        arr = np.asarray(im)
    elif mode.startswith("I;16") or mode == "I":
        # 16-bit (or 32-bit int) grey: PIL's convert("RGB") would clip to 255; keep the high byte.
        a = np.asarray(im)
        a = np.asarray(a, dtype=np.int64)
        a = (np.clip(a, 0, 65535) >> 8) if (mode != "I" or a.max(initial=0) > 255) else np.clip(a, 0, 255)
        # (H, W) -> (H, W, 3)
        arr = np.repeat(a.astype(np.uint8)[:, :, None], 3, axis=2)
    elif mode == "F":
        a = np.clip(np.nan_to_num(np.asarray(im, dtype=np.float32)), 0, 255).round().astype(np.uint8)
        arr = np.repeat(a[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
    elif mode in ("P", "PA") and "transparency" in im.info:
        # via RGBA: PIL warns when a palette image with transparency goes straight to RGB
        arr = np.asarray(im.convert("RGBA").convert("RGB"))
    else:
        try:
            arr = np.asarray(im.convert("RGB"))
        except ValueError as e:  # a mode PIL cannot convert to RGB
            raise BadImageError(UNSUPPORTED, f"mode {mode}: {e}") from None
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise BadImageError(UNSUPPORTED, f"mode {mode} gave {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to a uint8 (H, W, 3) RGB array, or raise `BadImageError`."""
    if len(data) == 0:
        raise BadImageError(EMPTY, "0 bytes")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        im = Image.open(io.BytesIO(data))  # parses the header only
    except Image.DecompressionBombError as e:
        raise BadImageError(TOO_LARGE, str(e)) from None
    except Image.UnidentifiedImageError:
        # Not a format PIL knows; OpenCV may (e.g. EXR, HDR, PFM). It enforces its own
        # OPENCV_IO_MAX_IMAGE_PIXELS; the size check below catches the rest.
        arr = cv2.imdecode(buf, _CV2_FLAGS)
        if arr is None:
            raise BadImageError(NOT_IMAGE, f"{len(data)} bytes, starting {data[:8]!r}") from None
        if arr.shape[0] * arr.shape[1] > max_pixels:
            raise BadImageError(TOO_LARGE, f"{arr.shape[1]}x{arr.shape[0]} > {max_pixels} pixels") from None
        if arr.dtype != np.uint8:  # e.g. 16-bit / float formats OpenCV decodes as such
            raise BadImageError(UNSUPPORTED, f"OpenCV decoded {arr.dtype}") from None
        return arr
    except Exception as e:
        raise BadImageError(CORRUPT, f"header: {type(e).__name__}: {e}") from None
    width, height = im.size
    if width < 1 or height < 1:
        raise BadImageError(CORRUPT, f"header says {width}x{height}")
    if width * height > max_pixels:
        raise BadImageError(
            TOO_LARGE,
            f"header says {width}x{height} = {width * height} > {max_pixels} pixels",
        )
    if im.format in _CV2_FORMATS and im.mode in _CV2_MODES and _looks_complete(im.format, data):
        arr = cv2.imdecode(buf, _CV2_FLAGS)
        if arr is not None and arr.shape[:2] == (height, width) and arr.dtype == np.uint8 and arr.ndim == 3:
            return arr
    try:
        im.load()  # full decode; raises on truncated data (ImageFile.LOAD_TRUNCATED_IMAGES is False)
        return _to_rgb(im)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(TOO_LARGE, str(e)) from None
    except Exception as e:
        # ValueError, struct.error, EOFError, IndexError, ...: each makes the file a bad file
        raise BadImageError(CORRUPT, f"{type(e).__name__}: {e}") from None


def load_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode an image file to a uint8 (H, W, 3) RGB array, or raise `BadImageError`
    (with `.path` set) naming why it cannot be used."""
    path = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImageError(UNREADABLE, f"{type(e).__name__}: {e.strerror or e}", path) from None
    try:
        return decode_image(data, max_pixels=max_pixels)
    except BadImageError as e:
        e.path = path
        e.args = (f"{path}: {e.reason}",)
        raise
