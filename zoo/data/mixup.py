"""Batch-level Mixup / CutMix with label smoothing through timm's `Mixup`."""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from zoo.data.config import AugmentConfig

__all__ = ["ZooMixup", "create_mixup"]


class ZooMixup(Mixup):
    """timm's `Mixup` that also takes odd batches: timm asserts an even batch (it mixes sample i
    with sample n-1-i); here an odd batch mixes its first n-1 samples and keeps the last one
    unmixed (label-smoothed one-hot target). Randomness is timm's: numpy's global generator."""

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a (B, C, H, W) batch in place; returns it with (B, num_classes) soft targets."""
        if len(x) % 2 == 0:
            return super().__call__(x, target)
        if len(x) == 1:
            return x, mixup_target(target, self.num_classes, 1.0, self.label_smoothing)
        # x[:-1] is a view of x: timm mixes it in place
        _, head = super().__call__(x[:-1], target[:-1])
        tail = mixup_target(target[-1:], self.num_classes, 1.0, self.label_smoothing)
        return x, torch.cat([head, tail.to(head.dtype)])


def create_mixup(aug: AugmentConfig, num_classes: int) -> ZooMixup | None:
    """timm Mixup / CutMix (alphas `aug.mixup`, `aug.cutmix`, probability `mixup_prob`, switch
    probability `mixup_switch_prob`, mode `mixup_mode`) with `label_smoothing` folded into the
    soft targets; None when both alphas are 0 (then apply label smoothing in the loss)."""
    aug.validate()
    if num_classes < 2:
        raise ValueError(f"num_classes: must be >= 2 for Mixup, got {num_classes}")
    if aug.mixup <= 0 and aug.cutmix <= 0:
        return None
    return ZooMixup(
        mixup_alpha=aug.mixup,
        cutmix_alpha=aug.cutmix,
        cutmix_minmax=None,
        prob=aug.mixup_prob,
        switch_prob=aug.mixup_switch_prob,
        mode=aug.mixup_mode,
        label_smoothing=aug.label_smoothing,
        num_classes=num_classes,
    )
