"""The one weight init every zoo layer starts from: timm's ViT / PoolFormer init.

Truncated normal with std .02 (timm's ``trunc_normal_``: cut at the absolute values -2 and 2, so
at std .02 nothing is cut in practice) and zero biases, as timm's ``VisionTransformer.init_weights``
and the official PoolFormer code. Layers call it in ``reset_parameters``; the backbone calls it on
every linear and convolution, then lets a mixer with an init of its own (``init_weights``) redo it.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

__all__ = ["STD", "trunc_normal_init_"]

STD = 0.02


def trunc_normal_init_(weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """In place: ``weight`` truncated normal std :data:`STD`, ``bias`` (if given) zero."""
    trunc_normal_(weight, std=STD)
    if bias is not None:
        nn.init.zeros_(bias)
