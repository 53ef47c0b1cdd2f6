"""Smoke test of the data benchmark (no timing assertions: figures are the benchmark's job)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zoo.bench.data import main, make_photo_jpegs, timm_train_transform
from zoo.bench.machines import machine_slug
from zoo.machine import describe


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
    # the results files, named for the machine kind: the Markdown is what was printed, the CSV and JSON hold its rows
    stem = f"data_pipeline_{machine_slug(describe().record())}"
    md = (res / f"{stem}.md").read_text()
    assert md.rstrip("\n") in out and md.startswith("| pipeline ")
    table = [[c.strip() for c in line.strip("|").split(" | ")] for line in md.splitlines()[2:6]]
    with open(res / f"{stem}.csv") as f:
        rows = list(csv.DictReader(f))
    data = json.loads((res / f"{stem}.json").read_text())
    assert [r["pipeline"] for r in rows] == [c[0] for c in table] == [r["pipeline"] for r in data["rows"]]
    for cells, r in zip(table, data["rows"]):
        assert cells[1:] == [f"{r[k]:.1f}" for k in ("img_per_s_core", "min", "max")] + [f"{r['ratio']:.2f}"]
        assert len(r["rates"]) == 1 and r["img_per_s_core"] == r["rates"][0]
    assert [r["ratio"] for r in data["rows"]][::2] == [1.0, 1.0]  # each timm row is its pair's reference
    command = f"python -m zoo.bench data {' '.join(argv)}"
    assert data["command"] == command and f"`{command}`" in md and "median of 1 repeats x 4 images" in md
    assert data["threads"] == 1 and data["cpu_model"] and data["cpu_capability"] and data["commit"]
    assert {"torch", "timm"} <= set(data["versions"]) and f"Machine: {data['cpu_model']}" in md
    # the spread across machine kinds: this machine's row, the two zoo / timm ratios
    spread = (res / "data_pipeline_machines.md").read_text().splitlines()
    header, cells = _cells(spread[2]), _cells(spread[4])
    assert header[3:] == ["zoo train (OpenCV/albumentations)", "zoo decode only: load_image"] and len(spread) == 7
    assert cells[3:] == [f"{data['rows'][i]['ratio']:.2f}x" for i in (1, 3)]
    assert cells[0].startswith(data["cpu_model"]) and cells[1] == data["date"][:10]
    assert main(["--images", str(tmp_path / "empty"), "--out", str(res)]) == 2


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_the_committed_results_read_into_a_spread(tmp_path: Path) -> None:
    """The repository's data-pipeline results (renamed for their machine) are found and read."""
    from zoo.bench.report import RESULTS

    committed = sorted(RESULTS.glob("data_pipeline_*.json"))
    assert committed, "zoo/bench/results/data_pipeline_<machine>.json is missing"
    for path in committed:
        (tmp_path / path.name).write_text(path.read_text())
    assert main(["--spread-only", "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "data_pipeline_machines.md").read_text().splitlines()
    assert len(lines) == 6 + len(committed)  # title, blank, header, rule, one row a machine kind, blank, the files


def test_photo_jpegs_are_photo_sized(tmp_path: Path) -> None:
    paths = make_photo_jpegs(tmp_path)
    assert len(paths) >= 16
    assert {Image.open(p).size for p in paths} == {(500, 375)}


def test_timm_wrapper_survives_posterize_zero_bits() -> None:
    _, safe = timm_train_transform(32)
    black = safe(Image.new("RGB", (4, 4), (200, 100, 50)), 0)
    assert np.asarray(black).max() == 0 and safe.zero_bit_calls == 1
