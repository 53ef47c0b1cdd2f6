"""Normalisation layers, named by string so a spec or YAML file can swap them.

Every norm declares the layout it works in: ``"nchw"`` for channels-first maps, ``"nlc"`` for
token sequences (normalising the last axis). ``create_norm(name, dim, layout)`` builds the right
one for the stage's layout, so a block never guesses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..names import suggest

LAYOUTS = ("nchw", "nlc")


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group: normalise over (C, H, W) per sample, affine per channel.

    PoolFormer's norm (https://arxiv.org/abs/2111.11418); eps 1e-5 as nn.GroupNorm and the
    official code. Works on any memory format, channels_last included.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__(1, dim, eps=eps)


class GroupNorm1Tokens(GroupNorm1):
    """GroupNorm1 on a (B, N, C) sequence: normalise over all tokens and channels of a sample."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)  # (B, N, C) <-> (B, C, N)


class GroupNorm1NoBias(nn.Module):
    """GroupNorm with one group and a per-channel scale but no bias: MetaFormer-v2's norm.

    Yu et al., "MetaFormer Baselines for Vision", https://arxiv.org/abs/2210.13452: the official
    ``LayerNormGeneral(normalized_dim=(1, 2, 3), bias=False, eps=1e-6)`` of IdentityFormer,
    RandFormer and PoolFormerV2 normalises each sample over (C, H, W) and scales per channel,
    which is a one-group GroupNorm without its bias. nn.GroupNorm has no switch for the bias, so
    this holds the weight alone (the state-dict key is ``weight``, as in the official code and timm).
    """

    def __init__(self, dim: int, *, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, 1, self.weight, None, self.eps)  # (B, C, ...) -> same shape


class GroupNorm1NoBiasTokens(GroupNorm1NoBias):
    """GroupNorm1NoBias on a (B, N, C) sequence: normalise over all tokens and channels of a sample."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)  # (B, N, C) <-> (B, C, N)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW map (as timm's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


class BatchNormTokens(nn.BatchNorm1d):
    """BatchNorm over the channel axis of a (B, N, C) token sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)  # (B, N, C) <-> (B, C, N)


def _layernorm(dim: int, layout: str, eps: float) -> nn.Module:
    return LayerNorm2d(dim, eps=eps) if layout == "nchw" else nn.LayerNorm(dim, eps=eps)


def _groupnorm1(dim: int, layout: str, eps: float) -> nn.Module:
    return GroupNorm1(dim, eps=eps) if layout == "nchw" else GroupNorm1Tokens(dim, eps=eps)


def _layernorm_nobias(dim: int, layout: str, eps: float) -> nn.Module:
    # MetaFormer-v2's LayerNormGeneral(bias=False): a per-channel scale, no shift
    return LayerNorm2d(dim, eps=eps, bias=False) if layout == "nchw" else nn.LayerNorm(dim, eps=eps, bias=False)


def _groupnorm1_nobias(dim: int, layout: str, eps: float) -> nn.Module:
    return GroupNorm1NoBias(dim, eps=eps) if layout == "nchw" else GroupNorm1NoBiasTokens(dim, eps=eps)


def _batchnorm(dim: int, layout: str, eps: float) -> nn.Module:
    return nn.BatchNorm2d(dim, eps=eps) if layout == "nchw" else BatchNormTokens(dim, eps=eps)


# name -> (constructor, default eps). LayerNorm eps 1e-6 as ViT/DeiT; GroupNorm/BatchNorm 1e-5 as torch.
# "layernorm_eps1e-5" is torch's default LayerNorm, which the official CvT code uses throughout.
# The "_nobias" norms are MetaFormer-v2's (https://arxiv.org/abs/2210.13452): a scale and no bias, eps 1e-6.
NORMS = {
    "layernorm": (_layernorm, 1e-6),
    "layernorm_eps1e-5": (_layernorm, 1e-5),
    "layernorm_nobias": (_layernorm_nobias, 1e-6),
    "groupnorm1": (_groupnorm1, 1e-5),
    "groupnorm1_nobias": (_groupnorm1_nobias, 1e-6),
    "batchnorm": (_batchnorm, 1e-5),
}


def create_norm(name: str, dim: int, layout: str, *, eps: float | None = None) -> nn.Module:
    """Build the norm called ``name`` for ``dim`` channels in ``layout`` ('nchw' or 'nlc')."""
    if name == "identity":
        return nn.Identity()
    if name not in NORMS:
        raise ValueError(
            f"unknown norm {name!r}; expected one of {sorted([*NORMS, 'identity'])}"
            + suggest(name, [*NORMS, "identity"])
        )
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    build, default_eps = NORMS[name]
    return build(dim, layout, default_eps if eps is None else eps)
