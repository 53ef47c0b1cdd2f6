"""One MNIST-5k normalisation (zoo.data.MNIST_MEAN / MNIST_STD), used by the configs, close to the
served images' own statistics, which ``python -m zoo.bench data-stats`` measures into results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from zoo.bench import data_stats
from zoo.data import MNIST_MEAN, MNIST_STD
from zoo.data.datasets import load_mnist5k

REPO = Path(__file__).resolve().parents[1]


def test_every_mnist5k_config_normalises_with_the_one_constant():
    from zoo.train import load_config

    configs = sorted((REPO / "configs").glob("mnist5k_*.yaml"))
    assert configs
    for path in configs:
        aug = load_config(path).aug
        assert (tuple(aug.mean), tuple(aug.std)) == (MNIST_MEAN, MNIST_STD), path.name


def test_the_constant_is_close_to_the_served_images():
    """A recipe constant, not a measurement: within a small margin of what the images are."""
    images = np.concatenate([load_mnist5k("train")[0], load_mnist5k("val")[0]])
    pixels = images[..., 0].astype(np.int64)  # the three channels are equal
    n = pixels.size
    mean = pixels.sum() / (255 * n)  # integer sums: a different path from data_stats.mean_std
    std = np.sqrt((pixels**2).sum() / (255**2 * n) - mean**2)
    assert abs(MNIST_MEAN[0] - mean) < 0.002 and abs(MNIST_STD[0] / std - 1) < 0.03


def test_data_stats_writes_the_served_statistics(tmp_path):
    assert data_stats.main(["--data", "mnist5k", "--results", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "data_stats.json").read_text())
    rows = {r["split"]: r for r in data["rows"]}
    train = load_mnist5k("train")[0][..., 0].astype(np.int64)
    assert rows["train"]["images"] == len(train) and rows["all"]["images"] == 5000
    assert rows["train"]["mean"] == pytest.approx(train.sum() / (255 * train.size), abs=1e-9)
    assert rows["all"]["constant_mean"] == MNIST_MEAN[0] and rows["all"]["constant_std"] == MNIST_STD[0]
    md = (tmp_path / "data_stats.md").read_text()
    assert "| mnist5k" in md and f"Machine: {data['cpu_model']}" in md
    assert data_stats.main(["--data", "mnist5k,cifar", "--results", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
