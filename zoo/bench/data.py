"""Data pipeline benchmark: the zoo's DeiT train pipeline against timm's, per core.

    python -m zoo.bench data [--images DIR] [--repeats 7] [--min-images 200] [--img-size 224]
                             [--out zoo/bench/results] [--name data_pipeline]

Both pipelines go from a JPEG file on disk to a normalised CHW tensor, in one process with one
thread (OpenCV and torch limited to 1; PIL is single-threaded), over the same files, alternating
after a warm-up pass; the figure is the median of the repeats, in images per second per core.

* zoo: `zoo.data.load_image` (PIL header + OpenCV decode) -> `create_transform(AugmentConfig(),
  is_training=True)` with a per-sample generator, as the datasets run it (random erasing in
  DeiT's "pixel" mode, which does more work than timm's default "const" mode used below).
* timm: `Image.open(f).convert("RGB")` (timm's ImageDataset loader) -> `timm.data.create_transform(
  img_size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
  interpolation="bicubic")`. Its PosterizeIncreasing asks `ImageOps.posterize` for 0 bits at
  magnitude 10, which Pillow >= 10 refuses; the wrapper replaces that op's function with PIL's
  own posterize LUT extended to 0 bits (black), so every image runs the whole pipeline.

Without --images, the colour photographs of `skimage.data` (and some grey ones), cropped to 4:3,
resized to 500x375, and their mirror images are written as JPEG (quality 90) to a temp folder.

The table, with notes under it (files, repeats, the ratio, the command, the machine), is printed
and written to ``--out`` (default ``zoo/bench/results``) as ``NAME_<machine>.md`` (exactly what is
printed), ``.csv`` (the rows) and ``.json`` (rows with every repeat's rate, command, commit, CPU,
threads, versions), one set per machine kind (``zoo.bench.machines``), and then
``NAME_machines.md``: the zoo / timm ratios on every machine kind met, newest first, the block the
README shows (``python -m zoo.bench readme`` copies ``NAME.md`` files between
``<!-- results:NAME -->`` markers). NAME is ``--name``, default ``data_pipeline``;
``--spread-only`` rewrites ``NAME_machines.md`` from the files there and measures nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from zoo.bench.machines import add_spread_only, rewrite_spreads, write_machine_results
from zoo.bench.report import RESULTS, command_line, environment, machine_line, markdown_table

__all__ = ["main", "make_photo_jpegs", "timm_train_transform", "zoo_train_transform"]

PROG = "python -m zoo.bench data"
COLUMNS = ["pipeline", "img_per_s_core", "min", "max", "ratio", "vs"]  # the CSV's; the JSON adds every rate

PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field", "immunohistochemistry",
    "stereo_motorcycle", "camera", "coins", "moon", "clock",
)  # fmt: skip


def make_photo_jpegs(folder: Path, size: tuple[int, int] = (500, 375)) -> list[Path]:
    """Write skimage's photographs (and their mirror images) as `size` (w, h) JPEGs."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
            img = img[0]
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
        img = img[:, :, :3].astype(np.uint8)
        h, w = img.shape[:2]
        tw, th = size
        if w * th > h * tw:  # too wide: crop the width to the target aspect
            cw = h * tw // th
            img = img[:, (w - cw) // 2 : (w - cw) // 2 + cw]
        else:
            ch = w * th // tw
            img = img[(h - ch) // 2 : (h - ch) // 2 + ch]
        im = Image.fromarray(np.ascontiguousarray(img)).resize(size, Image.Resampling.BICUBIC)
        for suffix, pic in (
            ("", im),
            ("_mirror", im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        ):
            path = folder / f"{name}{suffix}.jpg"
            pic.save(path, quality=90)
            paths.append(path)
    return paths


class _SafePosterize:
    """timm's posterize with 0 bits allowed (black), as PIL < 10 did; counts its uses."""

    def __init__(self) -> None:
        self.zero_bit_calls = 0

    def __call__(self, img: object, bits_to_keep: int, **_: object) -> object:
        from PIL import ImageOps

        if bits_to_keep >= 8:
            return img
        if bits_to_keep <= 0:
            self.zero_bit_calls += 1
            return img.point([0] * 256 * len(img.getbands()))  # type: ignore[attr-defined]
        return ImageOps.posterize(img, bits_to_keep)  # type: ignore[arg-type]


def timm_train_transform(img_size: int = 224) -> tuple[Callable, _SafePosterize]:
    """timm's DeiT train transform (as the issue names it) with posterize made safe."""
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment as TimmRandAugment

    tf = create_transform(
        img_size,
        is_training=True,
        auto_augment="rand-m9-mstd0.5-inc1",
        re_prob=0.25,
        interpolation="bicubic",
    )
    safe = _SafePosterize()
    patched = 0
    for t in tf.transforms:
        if isinstance(t, TimmRandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = safe
                    patched += 1
    if patched == 0:
        raise RuntimeError("timm's transform has no RandAugment posterize op to wrap; did timm change?")
    return tf, safe


def zoo_train_transform(img_size: int = 224) -> Callable:
    """The zoo's DeiT train transform."""
    from zoo.data import AugmentConfig, create_transform

    return create_transform(AugmentConfig(img_size=img_size), is_training=True)


def _time_pass(fn: Callable[[int, Path], object], files: list[Path], count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        fn(i, files[i % len(files)])
    return count / (time.perf_counter() - start)


def _pipelines(img_size: int) -> tuple[dict[str, Callable[[int, Path], object]], _SafePosterize]:
    """The four timed functions, each (index, path) -> output: timm's and the zoo's train pipeline,
    then each one's decode alone (a timm row before its zoo row: the ratios are to it)."""
    from PIL import Image

    from zoo.data.image_io import load_image
    from zoo.data.sampler import sample_rng

    zoo_tf = zoo_train_transform(img_size)
    timm_tf, safe = timm_train_transform(img_size)

    def run_zoo(i: int, path: Path) -> torch.Tensor:
        return zoo_tf(load_image(path), sample_rng(0, 0, i))

    def run_timm(i: int, path: Path) -> torch.Tensor:
        with open(path, "rb") as f:
            return timm_tf(Image.open(f).convert("RGB"))

    def decode_zoo(i: int, path: Path) -> np.ndarray:
        return load_image(path)

    def decode_timm(i: int, path: Path) -> Image.Image:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")

    pipelines = {
        "timm train (PIL)": run_timm,
        "zoo train (OpenCV/albumentations)": run_zoo,
        "timm decode only: PIL open+convert": decode_timm,
        "zoo decode only: load_image": decode_zoo,
    }
    return pipelines, safe


def measure(pipelines: dict[str, Callable], files: list[Path], count: int, repeats: int) -> dict[str, list[float]]:
    """Images/s of every pass of every pipeline: a warm-up pass over every file, then ``repeats``
    passes of ``count`` images each, the order alternating against drift."""
    for fn in pipelines.values():
        _time_pass(fn, files, len(files))
    rates: dict[str, list[float]] = {k: [] for k in pipelines}
    names = list(pipelines)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            rates[name].append(_time_pass(pipelines[name], files, count))
    return rates


def table_rows(rates: dict[str, list[float]]) -> list[dict]:
    """One row a pipeline (median, min, max images/s), its ratio to the timm row of its pair."""
    med = {k: statistics.median(v) for k, v in rates.items()}
    names, rows = list(rates), []
    for base, other in zip(names[::2], names[1::2]):
        for name in (base, other):
            row = {"pipeline": name, "img_per_s_core": med[name], "min": min(rates[name]), "max": max(rates[name])}
            rows.append({**row, "ratio": med[name] / med[base], "vs": base, "rates": rates[name]})
    return rows


def markdown(rows: list[dict], notes: list[str]) -> str:
    """The table as printed and as the results file holds it, the notes under it."""
    cells = [
        [r["pipeline"], *(f"{r[k]:.1f}" for k in ("img_per_s_core", "min", "max")), f"{r['ratio']:.2f}"] for r in rows
    ]
    header = ["pipeline", "img/s/core (median)", "min", "max", "vs timm"]
    return markdown_table(header, cells, [False, True, True, True, True]) + "\n\n" + "\n".join(notes)


def _notes(
    files: list[Path], source: str, shape: tuple, args: argparse.Namespace, rows: list[dict], zero_bits: int
) -> list[str]:
    """The lines under the table saying what was measured (the command and machine follow)."""
    from PIL import Image

    sizes = sorted({Image.open(f).size for f in files})
    size_text = ", ".join(f"{w}x{h}" for w, h in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
    count = max(args.min_images, len(files))
    ratio = rows[1]["ratio"]  # the zoo train pipeline over timm's
    return [
        f"{len(files)} files from {source} ({size_text}) to a {tuple(shape)} tensor, 1 thread; after a warm-up "
        f"pass over every file, median of {args.repeats} repeats x {count} images, the pipelines alternating.",
        f"zoo / timm DeiT train pipeline, per core: {ratio:.2f}x "
        f"(target >= 2.0: {'met' if ratio >= 2.0 else 'NOT met'}).",
        f"timm posterize calls with 0 bits (would have raised under Pillow 13): {zero_bits}.",
    ]


SPREAD_TITLE = "DeiT train pipeline, zoo / timm images per second per core, on every machine kind met:"


def spread_cells(result: dict) -> dict[str, str]:
    """A results file's row of the spread across machines: each zoo pipeline's ratio to timm's."""
    return {r["pipeline"]: f"{r['ratio']:.2f}x" for r in result["rows"] if r["pipeline"] != r["vs"]}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and write it; returns 0 (2 when no image files are found)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=None, help="folder of images (default: skimage photos)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of each pipeline (median)")
    parser.add_argument("--min-images", type=int, default=200, help="images a timed pass (files cycle)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    parser.add_argument(
        "--name", default="data_pipeline", help="results name (default: %(default)s; files NAME_<machine>)"
    )
    add_spread_only(parser)
    args = parser.parse_args(argv)
    if args.spread_only:
        return rewrite_spreads(args.out, {args.name: SPREAD_TITLE}, spread_cells)

    from zoo.data.image_io import find_images

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="zoo_bench_data_") as tmp:
        if args.images is None:
            files, source = make_photo_jpegs(Path(tmp)), "skimage.data photos as JPEG, quality 90"
        else:
            files, source = [Path(p) for p in find_images(args.images)], str(args.images)
        if not files:
            print(f"error: no image files under {args.images}", file=sys.stderr)
            return 2
        pipelines, safe = _pipelines(args.img_size)
        shapes = {tuple(pipelines[k](0, files[0]).shape) for k in list(pipelines)[:2]}
        if len(shapes) != 1:
            raise RuntimeError(f"the pipelines disagree on the output shape: {shapes}")
        rows = table_rows(measure(pipelines, files, max(args.min_images, len(files)), args.repeats))
        notes = _notes(files, source, shapes.pop(), args, rows, safe.zero_bit_calls)
    command, env = command_line(PROG, argv), environment(1)
    notes += [f"`{command}`", machine_line(env)]
    text = markdown(rows, notes)
    print(text)
    settings = {k: getattr(args, k) for k in ("repeats", "min_images", "img_size")}
    meta = {"command": command, **env, "settings": {**settings, "images": source, "files": len(files)}}
    paths = write_machine_results(args.out, args.name, env, text, rows, COLUMNS, meta, (SPREAD_TITLE, spread_cells))
    print(f"results: {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
