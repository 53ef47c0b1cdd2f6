"""Bad and odd image files: conversion, skipping, logging, the threshold, the scan command."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import (
    bomb_png,
    photo,
    write_bad_files,
    write_image_folder,
    write_odd_images,
)
from PIL import Image

from zoo.data import (
    AugmentConfig,
    BadDataError,
    BadImageError,
    DataConfig,
    create_dataset,
    create_loader,
    create_transform,
    load_image,
    scan_folder,
)
from zoo.data.image_io import CORRUPT, EMPTY, NOT_IMAGE, TOO_LARGE, UNREADABLE
from zoo.data.scanner import main as scan_main

REPO = Path(__file__).resolve().parents[1]


def test_odd_formats_load_as_rgb(tmp_path: Path) -> None:
    files = write_odd_images(tmp_path)
    for name, path in files.items():
        arr = load_image(path)
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape == (40, 50, 3), name
        assert arr.flags.c_contiguous
    gray = load_image(files["gray_L.png"])
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    # the conversions PIL defines (CMYK, palette, alpha dropped) give PIL's pixels
    for name in (
        "cmyk.jpg",
        "palette_P.png",
        "rgba.png",
        "gray_alpha_LA.png",
        "bilevel_1.png",
    ):
        ref = np.asarray(Image.open(files[name]).convert("RGB"))
        assert np.abs(load_image(files[name]).astype(int) - ref).max() <= 1, name
    # 16-bit: the high byte (PIL's convert("RGB") would clip everything above 255 to white)
    sixteen = np.asarray(Image.open(files["sixteen_I16.png"]), dtype=np.uint16)
    np.testing.assert_array_equal(load_image(files["sixteen_I16.png"])[..., 0], (sixteen >> 8).astype(np.uint8))


def test_jpeg_fast_path_matches_pil(tmp_path: Path) -> None:
    path = tmp_path / "p.jpg"
    Image.fromarray(photo(60, 80)).save(path, quality=92)
    ours = load_image(path).astype(int)
    ref = np.asarray(Image.open(path).convert("RGB")).astype(int)
    # both libjpeg; upsampling of chroma may differ by a level
    assert np.abs(ours - ref).mean() < 1.0


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("truncated.jpg", CORRUPT),
        ("truncated.png", CORRUPT),
        ("zero.jpg", EMPTY),
        ("text.jpg", NOT_IMAGE),
        ("bomb.png", TOO_LARGE),
    ],
)
def test_bad_files_raise_with_reason(tmp_path: Path, name: str, code: int) -> None:
    path = write_bad_files(tmp_path)[name]
    with pytest.raises(BadImageError) as info:
        load_image(path)
    assert info.value.code == code and info.value.path == str(path)
    assert name in str(info.value)


def test_pixel_limit_guards_the_opencv_path(tmp_path: Path) -> None:
    """A legitimate 100x100 JPEG (OpenCV fast path) is refused from its header by a low limit."""
    path = tmp_path / "big.jpg"
    Image.fromarray(photo(100, 100)).save(path)
    assert load_image(path, max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(BadImageError) as info:
        load_image(path, max_pixels=9_999)
    assert info.value.code == TOO_LARGE
    small_bomb = tmp_path / "b.png"
    # 25 MP: under PIL's own limit, over ours
    small_bomb.write_bytes(bomb_png(5000, 5000))
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(small_bomb, max_pixels=1_000_000)


def test_unreadable_and_missing(tmp_path: Path) -> None:
    with pytest.raises(BadImageError) as info:
        load_image(tmp_path / "missing.jpg")
    assert info.value.code == UNREADABLE
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(BadImageError):
        load_image(tmp_path / "dir.jpg")


def make_dirty_folder(root: Path, per_class: int = 10) -> tuple[list[Path], dict[str, Path]]:
    good = write_image_folder(root, per_class=per_class)
    bad = write_bad_files(root / "cat")
    return good, bad


def test_dataset_skips_logs_and_summarises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good, bad = make_dirty_folder(tmp_path)
    odd = write_odd_images(tmp_path / "dog")
    cfg = DataConfig(dataset=str(tmp_path), val_fraction=0.0, max_bad_fraction=0.5)
    ds = create_dataset(cfg, "train", create_transform(AugmentConfig.mnist(), is_training=False))
    assert len(ds) == len(good) + len(bad) + len(odd)
    with caplog.at_level(logging.WARNING, logger="zoo.data"):
        items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.float32 for x, _ in items)
    found = dict(ds.bad_files())
    assert set(found) == {str(p) for p in bad.values()}
    for path in bad.values():
        assert str(path) in caplog.text  # logged by name
    summary = ds.bad_summary()
    assert f"{len(bad)} bad image files" in summary and all(str(p) in summary for p in bad.values())
    # a bad index is replaced by the next readable one, deterministically
    bad_index = ds.paths.index(str(bad["zero.jpg"]))
    following = next(i for i in range(bad_index + 1, len(ds)) if ds.paths[i] not in found)
    assert ds[bad_index][1] == ds[following][1]
    torch.testing.assert_close(ds[bad_index][0], ds[following][0])


def test_too_many_bad_files_stop_at_once(tmp_path: Path) -> None:
    _, bad = make_dirty_folder(tmp_path, per_class=10)  # 20 good + 5 bad
    # 2.5 allowed
    cfg = DataConfig(dataset=str(tmp_path), val_fraction=0.0, max_bad_fraction=0.1)
    ds = create_dataset(cfg, "train", None)
    with pytest.raises(BadDataError) as info:
        for i in range(len(ds)):
            ds[i]
    message = str(info.value)
    assert "3 bad image files of 25" in message and "max_bad_fraction=0.1" in message
    assert sum(str(p) in message for p in bad.values()) == 3  # it names the ones found
    assert len(ds.bad_files()) == 3  # it stopped at the first file over the limit


def test_bad_files_seen_by_workers_reach_the_main_process(tmp_path: Path) -> None:
    _, bad = make_dirty_folder(tmp_path, per_class=8)
    cfg = DataConfig(dataset=str(tmp_path), val_fraction=0.0, max_bad_fraction=0.5)
    ds = create_dataset(cfg, "train", create_transform(AugmentConfig.mnist(), is_training=True))
    loader = create_loader(ds, batch_size=4, shuffle=True, seed=0, num_workers=2)
    seen = sum(len(y) for _, y in loader)
    assert seen == len(ds)  # the epoch went on: bad samples replaced
    assert {p for p, _ in ds.bad_files()} == {str(p) for p in bad.values()}

    strict = create_dataset(
        cfg.__class__(dataset=str(tmp_path), val_fraction=0.0, max_bad_fraction=0.05),
        "train",
        None,
    )
    loader = create_loader(strict, batch_size=4, shuffle=False, seed=0, num_workers=2)
    with pytest.raises(BadDataError, match=r"bad image files of 21"):
        for _ in loader:
            pass


def test_scan_folder_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = make_dirty_folder(tmp_path / "data", per_class=3)
    write_odd_images(tmp_path / "data" / "dog")
    (tmp_path / "data" / "notes.txt").write_text("not an image and not named like one")
    report = scan_folder(tmp_path / "data", jobs=2)
    assert {b.path for b in report.bad} == {str(p) for p in bad.values()}
    assert report.total == len(good) + len(bad) + 12 and not report.clean
    assert scan_main([str(tmp_path / "data")]) == 1
    out = capsys.readouterr().out
    assert all(str(p) in out for p in bad.values()) and "5 bad of" in out
    clean = tmp_path / "clean"
    write_image_folder(clean, per_class=2)
    assert scan_main([str(clean)]) == 0
    assert scan_main([str(tmp_path / "nope")]) == 2
    proc = subprocess.run(
        [sys.executable, "-m", "zoo.data.scan", str(tmp_path / "data")],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "bomb.png: too many pixels" in proc.stdout and "RuntimeWarning" not in proc.stderr
