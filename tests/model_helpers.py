"""Helpers for the model tests: weights and statistics that make every parameter visible."""

from __future__ import annotations

import torch
from torch import nn


def randomize_batchnorm_stats(module: nn.Module, *, mean_std: float) -> None:
    """Running means ~ N(0, mean_std), variances ~ U(0.5, 1.5): fresh statistics (0 and 1) would make
    an eval-mode BatchNorm close to an identity, and a wrong mapping of them could not show."""
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn_like(buffer) * mean_std)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand_like(buffer) + 0.5)
