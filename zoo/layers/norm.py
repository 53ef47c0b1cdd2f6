"""Normalisation layers, named by string so a spec or YAML file can swap them.

Every norm declares the layout it works in: ``"nchw"`` for channels-first maps, ``"nlc"`` for
token sequences (normalising the last axis). ``create_norm(name, dim, layout)`` builds the right
one for the stage's layout, so a block never guesses.

The ``l1_*`` norms are Hoffer et al.'s L1 normalisation ("Norm matters: efficient and accurate
normalization schemes in deep networks", https://arxiv.org/abs/1802.09769): the
standard deviation is replaced by ``sqrt(pi / 2)`` times the mean absolute deviation, which equals
it for Gaussian data and needs no squares (the paper's case for low precision; the measured
comparison is ``python -m zoo.bench norm-precision``, results in ``zoo/bench/results/norm_precision.md``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models import register_notrace_module
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


# Hoffer et al.'s C_L1: sqrt(pi / 2) * E|x - mu| = sigma for a Gaussian.
L1_SCALE = math.sqrt(math.pi / 2)


def l1_scale(centered: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``sqrt(pi / 2) * mean(|x - mu|)`` over ``dims`` (kept as size-1 axes): the L1 estimate of sigma."""
    return L1_SCALE * centered.abs().mean(dim=dims, keepdim=True)


# A leaf of timm's FX trace (feature extraction), as are torch's norms: the L1 norms read their
# input's rank to find the axes, which a symbolic trace cannot.
@register_notrace_module
class _L1Norm(nn.Module):
    """What the L1 norms share: the layout's channel axis and the per-channel affine.

    ``layout="nchw"``: channels on axis 1 of a (B, C, ...) map; ``"nlc"``: channels on the last
    axis of a (B, ..., C) tensor (tokens, or a pooled (B, C) vector). The scale divides with
    ``eps`` added to it (``(x - mu) / (scale + eps)``): the L1 scale is an estimate of sigma, not
    of a variance, so eps is added where torch's norms add it under their square root, as the
    authors' ``L1BatchNorm2d`` does (eladhoffer/convNet.pytorch, ``models/modules/lp_norm.py``).
    """

    def __init__(self, dim: int, *, layout: str, eps: float, affine: bool = True):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"{type(self).__name__}: unknown layout {layout!r}; expected one of {LAYOUTS}")
        self.dim, self.layout, self.eps = dim, layout, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def channel_axis(self, x: torch.Tensor) -> int:
        return 1 if self.layout == "nchw" else x.ndim - 1

    def per_channel(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A (C,) vector shaped to broadcast along ``x``'s channel axis."""
        shape = [1] * x.ndim
        shape[self.channel_axis(x)] = -1
        return v.view(shape)  # (C,) -> (1, C, 1, 1) on maps, (1, 1, C) on tokens

    def stat_axes(self, x: torch.Tensor) -> tuple[int, ...]:
        """The axes of ``x`` the norm takes its mean and scale over."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = self.stat_axes(x)
        mean = x.mean(dim=axes, keepdim=True)
        return self.normalise(x, mean, l1_scale(x - mean, axes))

    def normalise(self, x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        y = (x - mean) / (scale + self.eps)
        if self.weight is None:
            return y
        return y * self.per_channel(self.weight, x) + self.per_channel(self.bias, x)

    def extra_repr(self) -> str:
        return f"{self.dim}, layout={self.layout!r}, eps={self.eps}, affine={self.weight is not None}"


class L1LayerNorm(_L1Norm):
    """L1 layer norm: each token (each pixel of a map) over its channels, scale by mean |x - mu|.

    Hoffer et al. 2018, https://arxiv.org/abs/1802.09769 (their L1 batch norm's statistic, applied
    over the channels as a LayerNorm does): ``y = (x - mu) / (sqrt(pi/2) * mean|x - mu| + eps) * w + b``.
    """

    def stat_axes(self, x: torch.Tensor) -> tuple[int, ...]:
        return (self.channel_axis(x),)


class L1GroupNorm1(_L1Norm):
    """L1 group norm with one group: each sample over all its channels and positions.

    Hoffer et al. 2018, https://arxiv.org/abs/1802.09769 (the L1 statistic, over what PoolFormer's
    one-group GroupNorm normalises): ``y = (x - mu) / (sqrt(pi/2) * mean|x - mu| + eps) * w + b``,
    ``mu`` and the mean over every axis but the batch's.
    """

    def stat_axes(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(range(1, x.ndim))


class L1BatchNorm(_L1Norm):
    """L1 batch norm: each channel over the batch and positions, scale by mean |x - mu|.

    Hoffer et al. 2018, "Norm matters", https://arxiv.org/abs/1802.09769 (L1 batch norm):
    ``y = (x - mu) / (sqrt(pi/2) * mean|x - mu| + eps) * w + b``, statistics per channel over every
    other axis. Running statistics as torch's BatchNorm keeps them: in training each batch's mean
    and scale update ``running_mean`` / ``running_scale`` by ``momentum`` (None: a cumulative
    average over ``num_batches_tracked``), and eval normalises with them;
    ``track_running_stats=False`` keeps none and uses the batch's statistics in eval too. The
    running scale averages the batch scales as they were used (no n/(n-1) factor: BatchNorm's
    unbiased variance has one, but the mean absolute deviation's bias depends on the distribution).
    The authors' code averages ``1 / (scale + eps)`` instead, with the momentum on the old value
    (their ``running.mul_(momentum).add_(batch * (1 - momentum))``); ours follows torch's convention.
    """

    def __init__(
        self,
        dim: int,
        *,
        layout: str,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ):
        super().__init__(dim, layout=layout, eps=eps, affine=affine)
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(dim))
            self.register_buffer("running_scale", torch.ones(dim))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:  # as torch's BatchNorm: the names exist, holding None
            for name in ("running_mean", "running_scale", "num_batches_tracked"):
                self.register_buffer(name, None)

    def stat_axes(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(a for a in range(x.ndim) if a != self.channel_axis(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.track_running_stats:
            return self.normalise(x, self.per_channel(self.running_mean, x), self.per_channel(self.running_scale, x))
        axes = self.stat_axes(x)
        mean = x.mean(dim=axes, keepdim=True)
        scale = l1_scale(x - mean, axes)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach().flatten(), scale.detach().flatten())  # (1, C, 1, 1) -> (C,)
        return self.normalise(x, mean, scale)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # torch's BatchNorm: momentum None is the cumulative average 1 / (batches seen)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_scale.lerp_(scale.to(self.running_scale.dtype), factor)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, momentum={self.momentum}, track_running_stats={self.track_running_stats}"


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


def _l1_layernorm(dim: int, layout: str, eps: float) -> nn.Module:
    return L1LayerNorm(dim, layout=layout, eps=eps)


def _l1_groupnorm1(dim: int, layout: str, eps: float) -> nn.Module:
    return L1GroupNorm1(dim, layout=layout, eps=eps)


def _l1_batchnorm(dim: int, layout: str, eps: float) -> nn.Module:
    return L1BatchNorm(dim, layout=layout, eps=eps)


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
    # Hoffer et al.'s L1 norms (https://arxiv.org/abs/1802.09769), each with its L2 twin's eps
    "l1_layernorm": (_l1_layernorm, 1e-6),
    "l1_groupnorm1": (_l1_groupnorm1, 1e-5),
    "l1_batchnorm": (_l1_batchnorm, 1e-5),
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
        raise ValueError(f"norm {name!r}: unknown layout {layout!r}; expected one of {LAYOUTS}")
    build, default_eps = NORMS[name]
    return build(dim, layout, default_eps if eps is None else eps)
