"""Token mixers: the part of a block that mixes information across positions.

Each mixer is registered by name (``TOKEN_MIXERS``), so a model spec or a YAML file swaps one
for another. A mixer takes ``(dim, *, options...)`` — keyword options only, no catch-all — and
declares:

- ``layout``: ``"nchw"`` (channels-first maps), ``"nlc"`` (token sequences, prefix tokens such
  as the class token first) or ``"any"``. The stage converts between layouts; nothing guesses.
- ``stage_context``: names of facts only the stage knows (``num_tokens``, ``num_prefix_tokens``)
  that the stage passes to the constructor.

Every mixer's forward is ``forward(x, grid)`` where ``grid = (H, W)`` is the spatial size of the
patch tokens (needed by mixers that see space through a token sequence).
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

TOKEN_MIXERS: dict[str, type[nn.Module]] = {}


def register_token_mixer(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a token mixer selectable by ``name`` in specs and configs."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        assert getattr(cls, "layout", None) in ("nchw", "nlc", "any"), f"{cls.__name__} must declare its layout"
        TOKEN_MIXERS[name] = cls
        return cls

    return add


def token_mixer_layout(name: str) -> str:
    return _mixer_class(name).layout


def _mixer_class(name: str) -> type[nn.Module]:
    if name not in TOKEN_MIXERS:
        near = difflib.get_close_matches(name, TOKEN_MIXERS, n=3)
        raise ValueError(f"unknown token mixer {name!r}; expected one of {sorted(TOKEN_MIXERS)}"
                         + (f" (did you mean {near[0]!r}?)" if near else ""))
    return TOKEN_MIXERS[name]


def create_token_mixer(name: str, dim: int, options: dict, context: dict) -> nn.Module:
    """Build mixer ``name`` with the spec's ``options``; ``context`` holds what the stage knows."""
    cls = _mixer_class(name)
    accepted = set(inspect.signature(cls).parameters) - {"dim"}
    unknown = set(options) - accepted
    if unknown:
        bad = sorted(unknown)[0]
        near = difflib.get_close_matches(bad, accepted, n=1)
        raise TypeError(f"token mixer {name!r} has no option {bad!r}; it accepts {sorted(accepted)}"
                        + (f" (did you mean {near[0]!r}?)" if near else ""))
    needed = {k: context[k] for k in getattr(cls, "stage_context", ())}
    return cls(dim, **options, **needed)


@register_token_mixer("pooling")
class Pooling(nn.Module):
    """PoolFormer's token mixer: average pooling minus the input.

    Yu et al., "MetaFormer Is Actually What You Need for Vision", https://arxiv.org/abs/2111.11418.
    ``count_include_pad=False`` as the official code, so borders average only real pixels; the
    ``- x`` is there because the block adds the input back through its residual.
    """

    layout = "nchw"

    def __init__(self, dim: int, *, pool_size: int = 3):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.pool(x) - x


@register_token_mixer("attention")
class Attention(nn.Module):
    """Multi-head self-attention over a token sequence.

    Vaswani et al., https://arxiv.org/abs/1706.03762, as used by ViT
    (https://arxiv.org/abs/2010.11929) and DeiT (https://arxiv.org/abs/2012.12877). Parameter
    names (``qkv``, ``proj``) match timm's so its checkpoints load unchanged. Runs on
    ``F.scaled_dot_product_attention`` so the fused kernel is used wherever torch has one.
    """

    layout = "nlc"

    def __init__(self, dim: int, *, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)  # (B, N, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, hd)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, heads, N, hd) -> (B, N, C)
        return self.proj_drop(self.proj(x))


@register_token_mixer("identity")
class IdentityMixer(nn.Module):
    """No token mixing: MetaFormer's IdentityFormer mixer (Yu et al., "MetaFormer Baselines for
    Vision", https://arxiv.org/abs/2210.13452). Returns its input, so each block reduces to a
    per-token residual of the norm plus its channel mixer: the ablation floor for any mixer.
    Works in either layout; the stage picks the one its neighbours need."""

    layout = "any"

    def __init__(self, dim: int):
        super().__init__()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return x
