"""Patch / token embeddings: the strided convolution that opens every stage."""

from __future__ import annotations

import torch
from torch import nn

from .norm import create_norm


class ConvEmbed(nn.Module):
    """Strided convolution from a channels-first map to a smaller one, with an optional norm.

    One layer serves PoolFormer's stem (7x7/4) and downsampling (3x3/2), ViT's patch embedding
    (16x16/16) and CvT's convolutional token embedding (conv then LayerNorm). Output stays NCHW;
    the stage decides whether to flatten it into tokens.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        *,
        kernel: int,
        stride: int,
        padding: int,
        norm: str = "identity",
        bias: bool = True,
    ):
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.proj = nn.Conv2d(in_dim, dim, kernel_size=kernel, stride=stride, padding=padding, bias=bias)
        self.norm = create_norm(norm, dim, "nchw")

    def out_size(self, size: int) -> int:
        """Spatial size after this embedding for an input side of ``size`` pixels."""
        return (size + 2 * self.padding - self.kernel) // self.stride + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))
