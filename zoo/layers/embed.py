"""Patch / token embeddings: the convolutions that open every stage, and fixed position tables."""

from __future__ import annotations

import math

import torch
from torch import nn

from .activations import get_act
from .norm import create_norm

EMBED_INITS = ("trunc_normal", "kaiming_normal")


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output side of a convolution or max-pool (floor mode) over ``size`` pixels."""
    return (size + 2 * padding - kernel) // stride + 1


def embed_out_size(
    size: int,
    *,
    kernel: int,
    stride: int,
    padding: int,
    layers: int = 1,
    pool_kernel: int = 0,
    pool_stride: int = 1,
    pool_padding: int = 0,
) -> int:
    """Side of the map a ``ConvEmbed`` (``layers`` x conv, then max-pool if ``pool_kernel``) makes
    of ``size`` pixels; 0 or less where the input is too small to leave a position. The one place
    this arithmetic lives: ``EmbedSpec.out_size`` (checked before a model is built) and
    ``ConvEmbed.out_size`` both call it."""
    for _ in range(layers):
        size = conv_out_size(size, kernel, stride, padding)
        if pool_kernel and size >= 1:
            size = conv_out_size(size, pool_kernel, pool_stride, pool_padding)
    return size


class ConvEmbed(nn.Module):
    """Strided convolution(s) from a channels-first map to a smaller one, with an optional norm.

    One layer serves PoolFormer's stem (7x7/4) and downsampling (3x3/2), ViT's patch embedding
    (16x16/16) and CvT's convolutional token embedding (conv then LayerNorm). With ``layers``,
    ``act`` and ``pool_kernel`` it is CCT's convolutional tokenizer (Hassani et al., "Escaping the
    Big Data Paradigm with Compact Transformers", https://arxiv.org/abs/2104.05704): ``layers``
    times conv (``hidden_dim`` wide but the last), activation, max-pool, so neighbouring patches
    overlap and positions are partly encoded by the convolutions themselves. Output stays NCHW;
    the stage decides whether to flatten it into tokens.

    Module names: ``proj`` is the first convolution (the one that sees the image: timm's
    ``first_conv``), ``layers["1"]``, ``layers["2"]``, ... the later ones, keyed by their position
    in the tokenizer as the official CCT checkpoints number them (``conv_layers.1.0``).
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
        layers: int = 1,
        hidden_dim: int | None = None,
        act: str | None = None,
        pool_kernel: int = 0,
        pool_stride: int = 1,
        pool_padding: int = 0,
        init: str = "trunc_normal",
    ):
        super().__init__()
        if init not in EMBED_INITS:
            raise ValueError(f"ConvEmbed: init={init!r}: expected one of {list(EMBED_INITS)}")
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.num_layers, self.init = layers, init
        self.pool_kernel, self.pool_stride, self.pool_padding = pool_kernel, pool_stride, pool_padding
        widths = [in_dim, *[hidden_dim] * (layers - 1), dim]

        def conv(i: int) -> nn.Conv2d:
            return nn.Conv2d(widths[i], widths[i + 1], kernel_size=kernel, stride=stride, padding=padding, bias=bias)

        self.proj = conv(0)
        self.layers = nn.ModuleDict({str(i): conv(i) for i in range(1, layers)})
        self.act = get_act(act) if act else nn.Identity()
        self.pool = nn.MaxPool2d(pool_kernel, pool_stride, pool_padding) if pool_kernel else nn.Identity()
        self.norm = create_norm(norm, dim, "nchw")

    def out_size(self, size: int) -> int:
        """Spatial size after this embedding for an input side of ``size`` pixels."""
        return embed_out_size(
            size,
            kernel=self.kernel,
            stride=self.stride,
            padding=self.padding,
            layers=self.num_layers,
            pool_kernel=self.pool_kernel,
            pool_stride=self.pool_stride,
            pool_padding=self.pool_padding,
        )

    def init_weights(self) -> None:
        """CCT's tokenizer init (``kaiming_normal``: He et al., https://arxiv.org/abs/1502.01852, the
        init made for the ReLU that follows), where asked; otherwise the backbone's generic one stays."""
        if self.init == "kaiming_normal":
            for conv in (self.proj, *self.layers.values()):
                nn.init.kaiming_normal_(conv.weight)
                if conv.bias is not None:  # the official Tokenizer leaves torch's Conv2d default here
                    bound = 1 / math.sqrt(conv.weight[0].numel())  # 1 / sqrt(fan_in)
                    nn.init.uniform_(conv.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.proj(x)))
        for conv in self.layers.values():
            x = self.pool(self.act(conv(x)))
        return self.norm(x)


def sine_position_table(num_tokens: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(1, num_tokens, dim): the fixed sinusoidal position embedding of "Attention Is All You Need"
    (https://arxiv.org/abs/1706.03762) over the token index, as CCT uses it: token p, channel i
    holds sin (even i) or cos (odd i) of p / 10000 ** (2 * (i // 2) / dim). The angles are formed in
    float64 and rounded to float32 before the sine, as the official CCT table is."""
    pos = torch.arange(num_tokens, dtype=torch.float64, device=device)[:, None]
    channel = torch.arange(dim, device=device)
    exponent = 2 * torch.div(channel, 2, rounding_mode="floor").double() / dim
    angle = (pos / 10000**exponent).float()  # (N, 1) / (dim,) -> (N, dim)
    return torch.where(channel % 2 == 0, angle.sin(), angle.cos()).unsqueeze(0)  # (N, dim) -> (1, N, dim)
