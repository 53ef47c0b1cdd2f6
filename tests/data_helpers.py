"""Files for the data tests, made in the test's own tmp_path: photos, odd formats, bad files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def photo(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A uint8 (H, W, 3) RGB crop of skimage's astronaut (a real photo), shifted by `seed`."""
    import skimage.data

    img = skimage.data.astronaut()
    top, left = (
        (seed * 37) % (img.shape[0] - 2 * height),
        (seed * 53) % (img.shape[1] - 2 * width),
    )
    crop = img[top : top + 2 * height, left : left + 2 * width]
    return np.ascontiguousarray(np.asarray(Image.fromarray(crop).resize((width, height), Image.Resampling.BILINEAR)))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height RGB pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def write_odd_images(folder: Path) -> dict[str, Path]:
    """Valid images in odd formats that must load as RGB: L, LA, RGBA, CMYK JPEG, palette P,
    palette with transparency, 16-bit I;16 PNG, 1-bit, BMP, WebP, GIF, TIFF."""
    folder.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(photo(40, 50, seed=1))
    out = {}

    def save(name: str, image: Image.Image) -> None:
        out[name] = folder / name
        image.save(out[name])

    save("gray_L.png", im.convert("L"))
    save("gray_alpha_LA.png", im.convert("LA"))
    save("rgba.png", im.convert("RGBA"))
    save("cmyk.jpg", im.convert("CMYK"))
    save("palette_P.png", im.convert("P"))
    pal = im.convert("P")
    pal.info["transparency"] = 0
    save("palette_transparent.png", pal)
    sixteen = (np.asarray(im.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)  # full 16-bit range
    save("sixteen_I16.png", Image.fromarray(sixteen))
    save("bilevel_1.png", im.convert("1"))
    save("plain.bmp", im)
    save("plain.webp", im)
    save("plain.gif", im)
    save("plain.tif", im)
    return out


def write_bad_files(folder: Path) -> dict[str, Path]:
    """Files with image extensions that cannot be used: truncated JPEG and PNG, zero-byte, text
    named .jpg, a decompression-bomb PNG header."""
    folder.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(photo(60, 80, seed=2))
    out = {
        name: folder / name
        for name in (
            "truncated.jpg",
            "truncated.png",
            "zero.jpg",
            "text.jpg",
            "bomb.png",
        )
    }
    full = folder / "_full.jpg"
    im.save(full, quality=90)
    data = full.read_bytes()
    full.unlink()
    out["truncated.jpg"].write_bytes(data[: len(data) // 2])
    full_png = folder / "_full.png"
    im.save(full_png)
    data = full_png.read_bytes()
    full_png.unlink()
    out["truncated.png"].write_bytes(data[: len(data) // 2])
    out["zero.jpg"].write_bytes(b"")
    out["text.jpg"].write_text("this is a text file, not a JPEG\n")
    out["bomb.png"].write_bytes(bomb_png())
    return out


def write_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog"),
    per_class: int = 6,
    size: tuple[int, int] = (48, 64),
) -> list[Path]:
    """root/<class>/<i>.jpg photos (ImageNet layout); returns the files in sorted order."""
    files = []
    for c_i, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / c / f"{i:03d}.jpg"
            Image.fromarray(photo(*size, seed=c_i * 100 + i)).save(path, quality=90)
            files.append(path)
    return sorted(files)
