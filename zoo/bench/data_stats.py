"""``python -m zoo.bench data-stats``: the embedded data sets' mean and std as the zoo serves them.

For each data set (``--data``), the per-pixel mean and standard deviation of its images after the
zoo's own loading (MNIST-5k: 28x28 digits zero-padded to 32x32; ELPV: area-averaged to 64x64;
values / 255, the three channels equal), over all its images and over its training split, beside
the normalisation constants ``zoo/data/config.py`` declares for it (what the configs and the
shipped weights use). Writes ``results/data_stats.{md,csv,json}``; the comments beside the
constants point here instead of quoting a measurement.

    python -m zoo.bench data-stats
    python -m zoo.bench data-stats --data mnist5k --results /tmp/res
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from zoo.bench.report import RESULTS, command_line, environment, machine_line, markdown_table, write_results

PROG = "python -m zoo.bench data-stats"
COLUMNS = ["dataset", "split", "images", "mean", "std", "constant_mean", "constant_std"]


def constants() -> dict[str, tuple[float, float]]:
    """Data set -> the (mean, std) zoo.data.config declares for it (one grey value, three channels)."""
    from zoo.data.config import ELPV_MEAN, ELPV_STD, MNIST_MEAN, MNIST_STD

    return {"mnist5k": (MNIST_MEAN[0], MNIST_STD[0]), "elpv": (ELPV_MEAN[0], ELPV_STD[0])}


def served_images(dataset: str, split: str) -> np.ndarray:
    """The images of ``split`` ('train', 'val' or 'all') as uint8 (N, H, W, 3), as the zoo loads them."""
    from zoo.data import datasets

    load = {"mnist5k": datasets.load_mnist5k, "elpv": datasets.load_elpv}[dataset]
    if split == "all":
        return np.concatenate([load("train")[0], load("val")[0]])
    return load(split)[0]


def mean_std(images: np.ndarray) -> tuple[float, float]:
    """Mean and (population) std over every pixel and channel, of values / 255; float64 sums."""
    x = images.astype(np.float64) / 255.0
    return float(x.mean()), float(x.std())


def measure(datasets: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in datasets:
        const_mean, const_std = constants()[name]
        for split in ("all", "train"):
            images = served_images(name, split)
            mean, std = mean_std(images)
            rows.append(
                {
                    "dataset": name,
                    "split": split,
                    "images": len(images),
                    "mean": mean,
                    "std": std,
                    "constant_mean": const_mean,
                    "constant_std": const_std,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist5k,elpv", help="comma-separated: mnist5k, elpv (default: %(default)s)")
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    p.add_argument("--name", default="data_stats", help="results file stem (default: %(default)s)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.data.split(",") if n.strip()]
    unknown = [n for n in names if n not in constants()]
    if unknown or not names:
        print(f"{PROG}: --data {args.data!r}: expected names from {sorted(constants())}", file=sys.stderr)
        return 2
    try:
        rows = measure(names)
    except (ImportError, FileNotFoundError) as e:  # ELPV's package not installed: its loader's one-line message
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    table = markdown_table(
        ["data set", "split", "images", "mean", "std", "constant mean", "constant std"],
        [[r["dataset"], r["split"], r["images"], *(f"{r[k]:.4f}" for k in COLUMNS[3:])] for r in rows],
        [False, False, True, True, True, True, True],
    )
    prog = command_line(PROG, argv)
    env = {**environment(), "command": prog}
    text = (
        f"{table}\n\nPixels / 255 of the images as the zoo serves them; the constants are zoo/data/config.py's "
        "(what the configs and the shipped weights normalise with).\n"
        f"`{prog}`\n{machine_line(env)}\n"
    )
    print(text, end="")
    paths = write_results(args.results, args.name, text, rows, COLUMNS, env)
    print(f"wrote {paths[0].with_suffix('')}.{{md,csv,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
