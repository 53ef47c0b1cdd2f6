"""Activations, named by string so a spec, an ``options`` dict or a YAML file picks one.

One module for the activation functions every layer uses (``mlp.py``'s MLPs and GLUs, ``moe.py``'s
experts, ``mixers.py``'s gated unit), so none of those imports another for them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from ..names import unknown_component

__all__ = ["ACTIVATIONS", "QuickGELU", "SquaredReLU", "StarReLU", "get_act"]


class SquaredReLU(nn.Module):
    """``relu(x) ** 2``, the activation found by Primer's search.

    So et al. 2021, "Primer: Searching for Efficient Transformers for Language Modeling",
    https://arxiv.org/abs/2109.08668 (section 3, "squared ReLU").
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(torch.relu(x))


class StarReLU(nn.Module):
    """``scale * relu(x) ** 2 + bias`` with a learnable scalar ``scale`` and ``bias``.

    Yu et al., "MetaFormer Baselines for Vision", https://arxiv.org/abs/2210.13452 (section 3.1):
    squared ReLU with a scale and a shift that remove its output's mean and fix its variance, so the
    activation needs no norm after it. Both start at the paper's values (1 and 0) and train;
    they are one number each, of shape (1,), named as the official code and timm name them.
    """

    def __init__(self, scale: float = 1.0, bias: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), float(scale)))
        self.bias = nn.Parameter(torch.full((1,), float(bias)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.square(torch.relu(x)) + self.bias


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the sigmoid approximation of GELU.

    Hendrycks & Gimpel, "Gaussian Error Linear Units", https://arxiv.org/abs/1606.08415
    (section 2); the activation of OpenAI's CLIP and of the official CvT models
    (microsoft/CvT ``lib/models/cls_cvt.py``), whose weights expect it rather than exact GELU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# Name -> activation module class. GELU is the exact erf form (nn.GELU() default), which is
# what timm's Mlp and the original ViT/DeiT checkpoints use; the tanh form would make loaded
# timm weights produce slightly different outputs.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "relu": nn.ReLU,
    "squared_relu": SquaredReLU,
    "silu": nn.SiLU,
    "quick_gelu": QuickGELU,  # CvT
    "star_relu": StarReLU,  # MetaFormer-v2 (learnable scale and bias)
}


def get_act(name: str) -> nn.Module:
    """A fresh activation module by name: ``gelu`` (exact erf), ``gelu_tanh``, ``relu``,
    ``squared_relu``, ``silu``, ``quick_gelu``, ``star_relu`` (the one with parameters)."""
    try:
        factory = ACTIVATIONS[name]
    except KeyError:
        raise unknown_component("activation", name, ACTIVATIONS) from None
    return factory()
