"""Optimizer (timm's factory, DeiT's weight-decay rule) and the learning rate as a pure function of the step.

Why no ``timm.scheduler`` object: a scheduler is state that has to be stepped the right number
of times, saved and restored -- and Accelerate steps a *prepared* scheduler once per process.
A pure function ``lr_at(step)`` of the optimizer step and the config has no state at all, so a
resumed run (or a run on N processes) cannot drift from an uninterrupted one. The formula is
timm's ``CosineLRScheduler`` (``warmup_prefix=False``, one cycle, the form DeiT uses), so
``schedule.update: epoch`` reproduces DeiT's per-epoch values exactly.
"""

from __future__ import annotations

import math

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from .config import TrainConfig

__all__ = ["create_optimizer", "lr_at", "peak_lr"]


def peak_lr(cfg: TrainConfig) -> float:
    """The configured learning rate, or DeiT's linear scaling rule ``base_lr * batch / lr_base_batch``."""
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    return cfg.optim.base_lr * cfg.train.batch_size / cfg.optim.lr_base_batch


def create_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's factory: with ``no_decay_on_1d`` no weight decay on 1-d params (norms, biases) and
    on the names ``model.no_weight_decay()`` lists (class/distillation tokens, position embeddings).
    """
    o = cfg.optim
    extra = {}
    if o.name in ("adamw", "lamb"):
        extra = {"betas": tuple(o.betas), "eps": o.eps}
    elif o.name == "sgd":
        extra = {"momentum": o.momentum, "nesterov": o.nesterov}
    return create_optimizer_v2(model, opt=o.name, lr=peak_lr(cfg), weight_decay=o.weight_decay,
                               filter_bias_and_bn=o.no_decay_on_1d, **extra)


def lr_at(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Learning rate for the update that follows ``step`` completed optimizer steps."""
    s, peak, epochs = cfg.schedule, peak_lr(cfg), cfg.train.epochs
    t = step / steps_per_epoch  # progress in epochs
    if s.update == "epoch":
        t = float(math.floor(t))  # DeiT steps timm's scheduler once per epoch
    if t < s.warmup_epochs:
        return s.warmup_lr + t * (peak - s.warmup_lr) / s.warmup_epochs
    if s.name == "constant":
        return peak
    if t >= epochs:
        return s.min_lr
    return s.min_lr + 0.5 * (peak - s.min_lr) * (1.0 + math.cos(math.pi * t / epochs))
