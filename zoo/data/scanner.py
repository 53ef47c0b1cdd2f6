"""Find every bad image file of a folder without training (the CLI is `zoo.data.scan`).

    python -m zoo.data.scan DIR [--max-pixels N] [--jobs J]

Decodes every file with an image extension under DIR (recursively) exactly as training would,
prints one line a bad file (`path: reason`) and a summary; exit code 0 when all are readable, 1
when bad files were found, 2 when DIR is not a folder.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from zoo.data.image_io import DEFAULT_MAX_PIXELS, BadImageError, find_images, load_image

__all__ = ["BadFile", "ScanReport", "main", "scan_folder"]


@dataclass(frozen=True)
class BadFile:
    """A file that training would skip, and why."""

    path: str
    reason: str


@dataclass
class ScanReport:
    """What `scan_folder` found: `total` image files, the `bad` ones in path order."""

    root: str
    total: int
    bad: list[BadFile] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when no file is bad."""
        return not self.bad

    def format(self) -> str:
        """One line a bad file, then the summary line."""
        lines = [f"{b.path}: {b.reason}" for b in self.bad]
        lines.append(f"{self.root}: {len(self.bad)} bad of {self.total} image files")
        return "\n".join(lines)


def _check(path: str, max_pixels: int) -> BadFile | None:
    try:
        load_image(path, max_pixels=max_pixels)
    except BadImageError as e:
        return BadFile(path, e.reason)
    return None


def scan_folder(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, jobs: int = 1) -> ScanReport:
    """Decode every image file under `path` (recursive) and report the bad ones. `jobs` > 1
    decodes in threads (the decoders release the GIL)."""
    root = Path(path)
    if not root.is_dir():
        raise NotADirectoryError(f"{path}: not a folder")
    files = find_images(root)
    if jobs > 1:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda p: _check(p, max_pixels), files))
    else:
        results = [_check(p, max_pixels) for p in files]
    return ScanReport(root=str(root), total=len(files), bad=[r for r in results if r is not None])


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 clean, 1 bad files found, 2 usage error)."""
    parser = argparse.ArgumentParser(prog="python -m zoo.data.scan", description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="folder to scan (recursively)")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="decompression-bomb limit",
    )
    parser.add_argument("--jobs", type=int, default=1, help="decoding threads")
    args = parser.parse_args(argv)
    try:
        report = scan_folder(args.folder, max_pixels=args.max_pixels, jobs=args.jobs)
    except NotADirectoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.clean else 1
