"""Smoke test of the data benchmark (no timing assertions: figures are the benchmark's job)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zoo.bench.data import main, make_photo_jpegs, timm_train_transform


def test_bench_runs_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(2):
        Image.fromarray(np.full((75, 100, 3), 60 * i + 40, dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
    assert (
        main(
            [
                "--images",
                str(tmp_path),
                "--repeats",
                "1",
                "--min-images",
                "4",
                "--img-size",
                "32",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "img/s/core" in out and "zoo / timm DeiT train pipeline, per core:" in out
    assert "timm train (PIL)" in out and "zoo train" in out
    assert main(["--images", str(tmp_path / "empty")]) == 2


def test_photo_jpegs_are_photo_sized(tmp_path: Path) -> None:
    paths = make_photo_jpegs(tmp_path)
    assert len(paths) >= 16
    assert {Image.open(p).size for p in paths} == {(500, 375)}


def test_timm_wrapper_survives_posterize_zero_bits() -> None:
    _, safe = timm_train_transform(32)
    black = safe(Image.new("RGB", (4, 4), (200, 100, 50)), 0)
    assert np.asarray(black).max() == 0 and safe.zero_bit_calls == 1
