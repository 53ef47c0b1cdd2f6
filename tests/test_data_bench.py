"""Smoke test of the data benchmark (no timing assertions: figures are the benchmark's job)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zoo.bench.data import main, make_photo_jpegs, timm_train_transform


def test_bench_runs_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, res = tmp_path / "images", tmp_path / "results"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((75, 100, 3), 60 * i + 40, dtype=np.uint8)).save(images / f"{i}.jpg")
    argv = ["--images", str(images), "--repeats", "1", "--min-images", "4", "--img-size", "32", "--out", str(res)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "img/s/core" in out and "zoo / timm DeiT train pipeline, per core:" in out
    assert "timm train (PIL)" in out and "zoo train" in out
    # the results files: the Markdown is what was printed, the CSV and JSON hold its rows
    md = (res / "data_pipeline.md").read_text()
    assert md.rstrip("\n") in out and md.startswith("| pipeline ")
    table = [[c.strip() for c in line.strip("|").split(" | ")] for line in md.splitlines()[2:6]]
    with open(res / "data_pipeline.csv") as f:
        rows = list(csv.DictReader(f))
    data = json.loads((res / "data_pipeline.json").read_text())
    assert [r["pipeline"] for r in rows] == [c[0] for c in table] == [r["pipeline"] for r in data["rows"]]
    for cells, r in zip(table, data["rows"]):
        assert cells[1:] == [f"{r[k]:.1f}" for k in ("img_per_s_core", "min", "max")] + [f"{r['ratio']:.2f}"]
        assert len(r["rates"]) == 1 and r["img_per_s_core"] == r["rates"][0]
    assert [r["ratio"] for r in data["rows"]][::2] == [1.0, 1.0]  # each timm row is its pair's reference
    command = f"python -m zoo.bench data {' '.join(argv)}"
    assert data["command"] == command and f"`{command}`" in md and "median of 1 repeats x 4 images" in md
    assert data["threads"] == 1 and data["cpu_model"] and data["cpu_capability"] and data["commit"]
    assert {"torch", "timm"} <= set(data["versions"]) and f"Machine: {data['cpu_model']}" in md
    assert main(["--images", str(tmp_path / "empty"), "--out", str(res)]) == 2


def test_photo_jpegs_are_photo_sized(tmp_path: Path) -> None:
    paths = make_photo_jpegs(tmp_path)
    assert len(paths) >= 16
    assert {Image.open(p).size for p in paths} == {(500, 375)}


def test_timm_wrapper_survives_posterize_zero_bits() -> None:
    _, safe = timm_train_transform(32)
    black = safe(Image.new("RGB", (4, 4), (200, 100, 50)), 0)
    assert np.asarray(black).max() == 0 and safe.zero_bit_calls == 1
