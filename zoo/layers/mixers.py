"""Token mixers: the part of a block that mixes information across positions.

Each mixer is registered by name (``TOKEN_MIXERS``), so a model spec or a YAML file swaps one
for another. A mixer takes ``(dim, *, options...)`` — keyword options only, no catch-all — and
declares:

- ``layout``: ``"nchw"`` (channels-first maps), ``"nlc"`` (token sequences, prefix tokens such
  as the class token first) or ``"any"``. The stage converts between layouts; nothing guesses.
- ``stage_context``: names of facts only the stage knows (``num_tokens``, ``num_prefix_tokens``)
  that the stage passes to the constructor.

Every mixer's forward is ``forward(x, grid)`` where ``grid = (H, W)`` is the spatial size of the
patch tokens (needed by mixers that see space through a token sequence). A mixer whose
parameters need an init other than the backbone's generic one (truncated normal .02, zero bias)
defines ``init_weights()``, which the model calls after the generic init.

Registered: ``pooling`` (PoolFormer), ``attention`` (ViT/DeiT; CAFormer without biases),
``conv_attention`` (CvT's convolutional projection; depthwise or per-head groups), ``token_shift``
(ShiftViT), ``spatial_gating`` (gMLP's whole gated unit), ``sepconv`` (ConvFormer's inverted
separable convolution), ``random_mixing`` (RandFormer's frozen random token mixing), ``identity``,
``conformer_conv`` (Conformer's convolution module) and ``attention_conformer_conv`` (attention then
that module in one block, Conformer's order).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, use_fused_attn
from torch import nn

from ..names import suggest
from .activations import get_act
from .fused import (
    PoolingResidualFunction,
    SpatialGatingFunction,
    conv1x1,
    fused_backward_allowed,
    fused_forward_allowed,
    has_global_hooks,
    has_hooks,
)
from .norm import GroupNorm1, GroupNorm1NoBias, create_norm

TOKEN_MIXERS: dict[str, type[nn.Module]] = {}


def register_token_mixer(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a token mixer selectable by ``name`` in specs and configs."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        layout = getattr(cls, "layout", None)
        if layout not in ("nchw", "nlc", "any"):
            raise TypeError(
                f"token mixer {name!r} ({cls.__name__}) must declare a class attribute layout = "
                f"'nchw', 'nlc' or 'any', got {layout!r}"
            )
        TOKEN_MIXERS[name] = cls
        return cls

    return add


def token_mixer_layout(name: str) -> str:
    return _mixer_class(name).layout


def _mixer_class(name: str) -> type[nn.Module]:
    if name not in TOKEN_MIXERS:
        raise ValueError(
            f"unknown token mixer {name!r}; expected one of {sorted(TOKEN_MIXERS)}" + suggest(name, TOKEN_MIXERS)
        )
    return TOKEN_MIXERS[name]


def create_token_mixer(name: str, dim: int, options: dict, context: dict) -> nn.Module:
    """Build mixer ``name`` with the spec's ``options``; ``context`` holds what the stage knows."""
    cls = _mixer_class(name)
    from_stage = set(getattr(cls, "stage_context", ()))
    accepted = set(inspect.signature(cls).parameters) - {"dim"} - from_stage
    unknown = set(options) - accepted
    if unknown:
        bad = min(unknown)
        raise TypeError(
            f"token mixer {name!r} has no option {bad!r}; it accepts {sorted(accepted)}" + suggest(bad, accepted)
        )
    needed = {k: context[k] for k in getattr(cls, "stage_context", ())}
    return cls(dim, **options, **needed)


def resolve_num_heads(mixer: str, dim: int, num_heads: int | None, head_dim: int) -> int:
    """``num_heads``, or when it is None ``max(1, dim // head_dim)``; either must divide ``dim``.

    Lets an attention mixer be swapped into a model that gives it no options (an ablation of a
    PoolFormer with ``token_mixer="attention"``): heads of ``head_dim`` channels, as many as fit.
    """
    if num_heads is None:
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"{mixer}: head_dim must be a positive int, got {head_dim!r}")
        num_heads = max(1, dim // head_dim)
        if dim % num_heads:
            raise ValueError(
                f"{mixer}: dim {dim} is not divisible by the {num_heads} heads that head_dim "
                f"{head_dim} gives; pass num_heads (a divisor of {dim})"
            )
        return num_heads
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"{mixer}: num_heads must be a positive int, got {num_heads!r}")
    if dim % num_heads:
        raise ValueError(f"{mixer}: dim {dim} is not divisible by num_heads {num_heads}")
    return num_heads


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

    def residual(
        self, x: torch.Tensor, norm: nn.Module, layer_scale: nn.Module, res_scale: nn.Module, drop_path: nn.Module
    ) -> torch.Tensor | None:
        """The block's whole token-mixer branch, ``res_scale(x) + drop_path(layer_scale(self(norm(x))))``,
        in one ``PoolingResidualFunction`` (fewer passes over the map; see its docstring), or None
        where that Function does not compute the same thing and the block runs the plain ops."""
        if type(self) is not Pooling:  # a subclass may compute something else in forward
            return None
        if not fused_forward_allowed(x, norm, self, self.pool, layer_scale, res_scale, drop_path):  # first: FX
            return None
        gn = _one_group_norm(norm)
        ls, rs = _channel_scale(layer_scale), _channel_scale(res_scale)
        drop_prob = _drop_prob(drop_path)
        if gn is None or ls is False or rs is False or drop_prob is None or x.ndim != 4 or self.pool.ceil_mode:
            return None
        keep = None
        if drop_prob > 0 and drop_path.training:  # timm's drop_path, drawn in the same order and shape
            keep_prob = 1 - drop_prob
            keep = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep_prob)  # (B, 1, 1, 1)
            if keep_prob > 0 and drop_path.scale_by_keep:
                keep.div_(keep_prob)
            keep = keep.view(-1)  # (B, 1, 1, 1) -> (B,)
        weight, bias, eps = gn
        size = self.pool.kernel_size
        return PoolingResidualFunction.apply(x, weight, bias, ls, rs, keep, eps, size)


def _one_group_norm(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float] | None:
    """(weight, bias or None, eps) of a one-group GroupNorm on maps, with or without its bias; else None."""
    if type(norm) is GroupNorm1 and norm.affine:
        return norm.weight, norm.bias, norm.eps
    if type(norm) is GroupNorm1NoBias:
        return norm.weight, None, norm.eps
    return None


def _channel_scale(module: nn.Module) -> torch.Tensor | bool | None:
    """A block's per-channel scale on maps (layer scale or res scale): its gamma, None when the
    block has none (``nn.Identity``), False for anything else."""
    if type(module) is nn.Identity:
        return None
    gamma = getattr(module, "gamma", None)
    return gamma if isinstance(gamma, nn.Parameter) and getattr(module, "layout", None) == "nchw" else False


def _drop_prob(module: nn.Module) -> float | None:
    """The drop probability of a block's drop path (0 for none), or None for a module it cannot read."""
    if type(module) is nn.Identity:
        return 0.0
    return float(module.drop_prob) if isinstance(module, DropPath) else None


@register_token_mixer("attention")
class Attention(nn.Module):
    """Multi-head self-attention over a token sequence.

    Vaswani et al., https://arxiv.org/abs/1706.03762, as used by ViT
    (https://arxiv.org/abs/2010.11929) and DeiT (https://arxiv.org/abs/2012.12877). Parameter
    names (``qkv``, ``proj``) match timm's so its checkpoints load unchanged. Runs on
    ``F.scaled_dot_product_attention`` so the fused kernel is used wherever torch has one.

    ``num_heads`` defaults to ``max(1, dim // head_dim)`` (heads of 32 channels), so the mixer can
    be swapped into any stage without options; ViT/DeiT pass it explicitly, CAFormer relies on it
    (https://arxiv.org/abs/2210.13452: heads of 32 channels, and ``qkv_bias=False, proj_bias=False``).

    ``fused_attn``: None follows timm's switch (``TIMM_FUSED_ATTN=0`` or ``timm.layers.set_fused_attn``);
    False computes softmax(q k^T / sqrt(hd)) v with explicit ops, the path on which hooks see the
    attention map (as timm's ``Attention.fused_attn``; the attribute can be flipped on a built model).
    """

    layout = "nlc"

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int = 32,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attn: bool | None = None,
    ):
        super().__init__()
        num_heads = resolve_num_heads("attention", dim, num_heads, head_dim)
        self.num_heads = num_heads
        self.fused_attn = use_fused_attn() if fused_attn is None else bool(fused_attn)
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)  # (B, N, 3C) -> (B, N, 3, heads, hd)
        # Unbinding dim 2 (not timm's permute to (3, B, heads, N, hd) then unbind) makes autograd's
        # backward stack the three gradients straight into qkv's (B, N, 3, heads, hd) layout: one
        # copy of 3*B*N*C floats per block instead of a stack and a second, reshaping copy. Same
        # values and gradients bit for bit; the README's CPU speed table (ViT / DeiT rows) times the step.
        q, k, v = qkv.unbind(2)  # 3 x (B, N, heads, hd); unpacked, not iterated, so that FX can trace it
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # -> (B, heads, N, hd)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        else:
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, N, N)
            attn = F.dropout(attn.softmax(dim=-1), self.attn_drop, self.training)
            x = attn @ v  # (B, heads, N, hd)
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


@register_token_mixer("sepconv")
class SepConv(nn.Module):
    """ConvFormer's token mixer: an inverted separable convolution (MobileNetV2's block without its
    residual): ``pwconv2(dwconv(act1(pwconv1(x))))``.

    Yu et al., "MetaFormer Baselines for Vision", https://arxiv.org/abs/2210.13452 (section 3.2;
    official code ``SepConv`` in sail-sg/metaformer's ``metaformer_baselines.py``). A pointwise
    layer widens ``dim`` to ``expansion_ratio * dim`` channels (2 in the paper), StarReLU, a
    ``kernel_size`` x ``kernel_size`` depthwise convolution (7, padding 3) and a pointwise layer back
    to ``dim``; no biases, and no activation after the depthwise convolution (the official
    ``act2`` is an identity). The pointwise layers are ``nn.Linear`` on channels-last views, as in
    the official code; timm stores them as 1x1 convolutions, which the checkpoint loader reshapes.
    Names (``pwconv1``, ``act1``, ``dwconv``, ``pwconv2``) are the official ones and timm's.
    """

    layout = "nchw"

    def __init__(
        self,
        dim: int,
        *,
        expansion_ratio: float = 2.0,
        kernel_size: int = 7,
        act: str = "star_relu",
        bias: bool = False,
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"sepconv: kernel_size must be odd (the map keeps its size), got {kernel_size}")
        hidden = int(expansion_ratio * dim)
        self.pwconv1 = nn.Linear(dim, hidden, bias=bias)
        self.act1 = get_act(act)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=bias)
        self.pwconv2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if not self._pointwise_as_conv():  # hooked or wrapped layers (e.g. LoRA): call them
            x = self.act1(self.pwconv1(x.permute(0, 2, 3, 1)))  # (B, C, H, W) -> (B, H, W, hidden)
            x = self.dwconv(x.permute(0, 3, 1, 2))  # (B, H, W, hidden) -> (B, hidden, H, W)
            return self.pwconv2(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        # The pointwise layers run as 1x1 convolutions with the linear weights, on the map as it
        # comes (NCHW or channels_last): oneDNN's convolution beats the matmul of nn.Linear on the
        # (B, H, W, C) view on the CPU, and needs no copy when the map is NCHW.
        x = self.act1(conv1x1(x, self.pwconv1.weight, self.pwconv1.bias))  # (B, C, H, W) -> (B, hidden, H, W)
        x = self.dwconv(x)  # depthwise: (B, hidden, H, W)
        return conv1x1(x, self.pwconv2.weight, self.pwconv2.bias)  # (B, hidden, H, W) -> (B, C, H, W)

    def _pointwise_as_conv(self) -> bool:
        """Whether the pointwise layers are plain ``nn.Linear`` without hooks, so that reading their
        weights computes what calling them would."""
        layers = (self.pwconv1, self.pwconv2)
        return all(type(m) is nn.Linear for m in layers) and not has_hooks(*layers) and not has_global_hooks()


@register_token_mixer("random_mixing")
class RandomMixing(nn.Module):
    """RandFormer's token mixer: every output token is a fixed random convex combination of all
    input tokens, ``x_m = sum_n R[m, n] x_n``, the same for every channel.

    Yu et al., "MetaFormer Baselines for Vision", https://arxiv.org/abs/2210.13452 (section 3.1;
    official code ``RandomMixing``). ``R = softmax(U, dim=-1)`` with ``U`` uniform in [0, 1), drawn
    once at construction and never trained. The official code keeps it as an ``nn.Parameter`` with
    ``requires_grad=False``; here it is a buffer under the same name (``random_matrix``), so it is
    saved and loaded with the weights but is not a parameter: optimizers, weight decay and
    parameter counts never see it (the paper counts it apart: RandFormer-S12 "11.9M + 0.2M").

    The matrix is ``num_tokens x num_tokens`` (the stage passes its token count), so a model built
    with it takes one input size only.
    """

    layout = "nchw"
    stage_context = ("num_tokens",)

    def __init__(self, dim: int, *, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.register_buffer("random_matrix", torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, C, H, W = x.shape
        if H * W != self.num_tokens:
            raise ValueError(
                f"random_mixing is built for {self.num_tokens} tokens, the input has {H}x{W}: "
                "create the model with the img_size you feed it"
            )
        tokens = x.reshape(B, C, H * W)  # (B, C, H, W) -> (B, C, N), tokens in row-major order as the official
        mixed = tokens @ self.random_matrix.t()  # (B, C, N) x (N, N) -> (B, C, N): out[.., m] = sum_n R[m, n] x[.., n]
        return mixed.reshape(B, C, H, W)  # (B, C, N) -> (B, C, H, W)


class ConvProjection(nn.Module):
    """CvT's ``dw_bn`` projection: a (grouped) convolution without bias, then BatchNorm.

    Submodule names ``conv`` and ``bn`` are the official code's, so its keys map one to one.
    """

    def __init__(self, dim: int, *, kernel: int, stride: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(
            dim, dim, kernel_size=kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))  # (B, C, H, W) -> (B, C, H', W')
        return x.flatten(2).transpose(1, 2)  # (B, C, H', W') -> (B, H'*W', C)


@register_token_mixer("conv_attention")
class ConvAttention(nn.Module):
    """Multi-head attention whose queries, keys and values come through a convolutional projection.

    CvT: Wu et al., "CvT: Introducing Convolutions to Vision Transformers",
    https://arxiv.org/abs/2103.15808 (official code: https://github.com/microsoft/CvT,
    ``lib/models/cls_cvt.py``). The patch tokens are laid out as a map, each of q, k, v gets its
    own ``kernel`` x ``kernel`` convolution (no bias) and BatchNorm -- stride ``stride_q`` for q,
    ``stride_kv`` for k and v (CvT: 1 and 2, so keys and values are 4x fewer) -- and then the
    usual linear projections ``proj_q/k/v``, attention and output ``proj``. Prefix tokens (CvT's
    class token in its last stage) skip the convolution and are concatenated back in front, as
    the official code does.

    ``groups`` of the convolution: ``"depthwise"`` (one channel a group: CvT), ``"heads"`` (one
    group a head, so a head's channels mix only among themselves: the per-head convolution in the
    spirit of Primer's multi-dconv-head attention, So et al., https://arxiv.org/abs/2109.08668 --
    Primer itself convolves each channel along the sequence after the projections), or an int.

    ``scale``: ``"head_dim"`` scales the logits by ``head_dim ** -0.5`` (standard attention);
    ``"dim"`` by ``dim ** -0.5``, which is what the official CvT code does (its CvT specs set it,
    for identical logits with official weights).

    ``num_heads`` defaults to ``max(1, dim // head_dim)``, as for ``attention``.

    Parameter names (``conv_proj_q.conv``, ``conv_proj_q.bn``, ``proj_q``, ..., ``proj``) are the
    official ones.
    """

    layout = "nlc"
    stage_context = ("num_prefix_tokens",)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int = 32,
        groups: Literal["depthwise", "heads"] | int = "depthwise",
        kernel: int = 3,
        stride_q: int = 1,
        stride_kv: int = 2,
        qkv_bias: bool = True,
        scale: Literal["head_dim", "dim"] = "head_dim",
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        num_prefix_tokens: int = 0,
    ):
        super().__init__()
        num_heads = resolve_num_heads("conv_attention", dim, num_heads, head_dim)
        if stride_q != 1:
            raise ValueError(
                f"conv_attention: stride_q must be 1 (got {stride_q}): a block adds the mixer's "
                "output to its input, so the queries must keep every token"
            )
        if groups == "depthwise":
            n_groups = dim
        elif groups == "heads":
            n_groups = num_heads
        elif isinstance(groups, int) and not isinstance(groups, bool) and groups > 0 and dim % groups == 0:
            n_groups = groups
        else:
            raise ValueError(
                f"conv_attention: groups must be 'depthwise', 'heads' or a positive divisor of "
                f"dim {dim}, got {groups!r}"
            )
        if scale not in ("head_dim", "dim"):
            raise ValueError(f"conv_attention: scale must be 'head_dim' or 'dim', got {scale!r}")
        self.num_heads = num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.scale = (dim if scale == "dim" else dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.conv_proj_q = ConvProjection(dim, kernel=kernel, stride=stride_q, groups=n_groups)
        self.conv_proj_k = ConvProjection(dim, kernel=kernel, stride=stride_kv, groups=n_groups)
        self.conv_proj_v = ConvProjection(dim, kernel=kernel, stride=stride_kv, groups=n_groups)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return x.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, N, C) -> (B, heads, N, hd)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        p = self.num_prefix_tokens
        prefix = x[:, :p]  # (B, p, C): class / distillation tokens, not convolved
        fmap = x[:, p:].transpose(1, 2).reshape(B, C, *grid)  # (B, H*W, C) -> (B, C, H, W)
        q, k, v = (proj(fmap) for proj in (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v))  # (B, N', C)
        if p:
            q, k, v = (torch.cat([prefix, t], dim=1) for t in (q, k, v))  # (B, p + N', C)
        q = self._heads(self.proj_q(q))  # (B, heads, N, hd)
        k = self._heads(self.proj_k(k))  # (B, heads, Nkv, hd)
        v = self._heads(self.proj_v(v))  # (B, heads, Nkv, hd)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )  # (B, heads, N, hd)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, heads, N, hd) -> (B, N, C)
        return self.proj_drop(self.proj(x))


@register_token_mixer("token_shift")
class TokenShift(nn.Module):
    """Shift a fraction of the channels by one pixel in each of the four directions; no parameters.

    ShiftViT: Wang et al., "When Shift Operation Meets Vision Transformer: An Extremely Simple
    Alternative to Attention Mechanism", https://arxiv.org/abs/2201.10801. As its official code
    (``shift_feat`` in microsoft/SPACH): with ``g = dim // n_div``, the first ``g`` channels move
    one pixel left, the next ``g`` right, the next ``g`` up, the next ``g`` down (vacated border
    pixels are zero), the rest stay; ShiftViT uses ``n_div = 12`` (gamma = 1/12 per direction).
    ShiftViT replaces attention by the shift outright; in this backbone's pre-norm residual block
    the mixer returns ``shift(x) - x``, as PoolFormer's pooling returns ``pool(x) - x``, so that
    the block adds the input back.
    """

    layout = "nchw"

    def __init__(self, dim: int, *, n_div: int = 12):
        super().__init__()
        if n_div < 4 or dim // n_div < 1:
            raise ValueError(f"token_shift: n_div must be >= 4 and at most dim ({dim}), got {n_div}")
        self.g = dim // n_div

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        g = self.g
        left, right, up, down, rest = x.split([g, g, g, g, x.shape[1] - 4 * g], dim=1)  # (B, g, H, W) each
        left = F.pad(left[..., 1:], (0, 1))  # content moves one column left, zero column on the right
        right = F.pad(right[..., :-1], (1, 0))  # one column right
        up = F.pad(up[..., 1:, :], (0, 0, 0, 1))  # one row up, zero row at the bottom
        down = F.pad(down[..., :-1, :], (0, 0, 1, 0))  # one row down
        shifted = torch.cat([left, right, up, down, rest], dim=1)  # (B, C, H, W)
        return shifted - x


@register_token_mixer("spatial_gating")
class SpatialGating(nn.Module):
    """gMLP's whole gated unit: ``fc2(u * proj_tokens(norm(v)))`` with ``u, v = split(act(fc1(x)))``.

    Liu et al., "Pay Attention to MLPs", https://arxiv.org/abs/2105.08050 (section 2, the
    spatial gating unit). ``fc1`` widens to ``ffn_ratio * dim`` channels, the second half of them
    is normalised (LayerNorm, eps 1e-5 as timm and the paper's code) and projected ACROSS TOKENS by
    a ``num_tokens x num_tokens`` linear layer whose weights start near zero (std 1e-6) and bias at
    one, so the unit starts as a plain MLP of the first half; the product goes through ``fc2``.

    A gMLP block is one residual branch, so a gMLP stage pairs this mixer with
    ``channel_mixer="none"``. The token projection fixes the sequence length: the model must be
    created with the ``img_size`` it is fed. Names (``fc1``, ``norm``, ``proj``, ``fc2``) map
    one to one onto timm's ``mlp_channels.fc1``, ``mlp_channels.gate.norm``, ... .
    """

    layout = "nlc"
    stage_context = ("num_tokens",)

    def __init__(
        self,
        dim: int,
        *,
        num_tokens: int,
        ffn_ratio: float = 6.0,
        act: str = "gelu",
        gate_norm_eps: float = 1e-5,
        drop: float = 0.0,
    ):
        super().__init__()
        hidden = int(dim * ffn_ratio)
        if hidden % 2:
            raise ValueError(f"spatial_gating: dim * ffn_ratio = {hidden} must be even (it is split in two halves)")
        self.num_tokens = num_tokens
        self.fc1 = nn.Linear(dim, hidden)
        self.act = get_act(act)
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.LayerNorm(hidden // 2, eps=gate_norm_eps)
        self.proj = nn.Linear(num_tokens, num_tokens)
        self.fc2 = nn.Linear(hidden // 2, dim)
        self.drop2 = nn.Dropout(drop)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.proj.weight, std=1e-6)
        nn.init.ones_(self.proj.bias)

    def _can_fuse(self, x: torch.Tensor) -> bool:
        return (
            type(self.act) is nn.GELU
            and (self.drop1.p == 0 or not self.training)
            and fused_backward_allowed(x, self.fc1, self.act, self.drop1, self.norm, self.proj, self.fc2)
        )

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if x.shape[1] != self.num_tokens:
            raise ValueError(
                f"spatial_gating is built for {self.num_tokens} tokens, the input has {x.shape[1]}: "
                "create the model with the img_size you feed it"
            )
        # Training: the same ops, a backward that reuses their memory. TorchScript (this module is a
        # leaf of timm's FX trace, which may then be scripted) cannot compile the Function and skips
        # the branch only when torch.jit.is_scripting() is its whole condition, hence two ifs.
        if not torch.jit.is_scripting():
            if self._can_fuse(x):
                x = SpatialGatingFunction.apply(
                    x,
                    self.fc1.weight,
                    self.fc1.bias,
                    self.norm.weight,
                    self.norm.bias,
                    self.proj.weight,
                    self.proj.bias,
                    self.fc2.weight,
                    self.fc2.bias,
                    self.norm.eps,
                    self.act.approximate,
                )  # (B, N, C) -> (B, N, C)
                return self.drop2(x)
        x = self.drop1(self.act(self.fc1(x)))  # (B, N, C) -> (B, N, hidden)
        u, v = x.chunk(2, dim=-1)  # 2 x (B, N, hidden/2)
        v = self.norm(v)
        v = self.proj(v.transpose(1, 2)).transpose(1, 2)  # mix tokens: (B, hidden/2, N) -> (B, N, hidden/2)
        return self.drop2(self.fc2(u * v))  # (B, N, hidden/2) -> (B, N, C)


@register_token_mixer("conformer_conv")
class ConformerConv(nn.Module):
    """Conformer's convolution module on a map: pointwise conv to ``2 * dim`` channels, GLU,
    depthwise conv, BatchNorm, Swish, pointwise conv, dropout.

    Gulati et al. 2020, "Conformer: Convolution-augmented Transformer for Speech Recognition",
    https://arxiv.org/abs/2005.08100, figure 2: the module's LayerNorm is the block's ``norm1``
    here (pre-norm), and its residual the block's. The first pointwise convolution has expansion
    factor 2, which the GLU (``a * sigmoid(b)``, ``a, b`` the two halves) halves back to ``dim``;
    Swish is SiLU. The paper convolves a 1-D sequence of audio frames (kernel 32); on an image
    the depthwise convolution is 2-D, ``kernel_size`` x ``kernel_size`` (default 7, the depthwise
    kernel of ConvFormer's ``sepconv`` in this zoo; odd, so the map keeps its size). Biases as
    torchaudio's ``Conformer`` (``bias=True``).
    """

    layout = "nchw"

    def __init__(self, dim: int, *, kernel_size: int = 7, bias: bool = True, drop: float = 0.0):
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(
                f"conformer_conv: kernel_size must be an odd positive int (the map keeps its size), got {kernel_size!r}"
            )
        self.pointwise_conv1 = nn.Conv2d(dim, 2 * dim, 1, bias=bias)
        self.glu = nn.GLU(dim=1)
        self.depthwise_conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias)
        self.batch_norm = nn.BatchNorm2d(dim)
        self.activation = nn.SiLU()
        self.pointwise_conv2 = nn.Conv2d(dim, dim, 1, bias=bias)
        self.dropout = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.glu(self.pointwise_conv1(x))  # (B, C, H, W) -> (B, 2C, H, W) -> (B, C, H, W)
        x = self.activation(self.batch_norm(self.depthwise_conv(x)))  # depthwise: (B, C, H, W)
        return self.dropout(self.pointwise_conv2(x))  # (B, C, H, W)


@register_token_mixer("attention_conformer_conv")
class AttentionConformerConv(nn.Module):
    """Multi-head self-attention, then Conformer's convolution module, in one token-mixer branch.

    Gulati et al. 2020, https://arxiv.org/abs/2005.08100, figure 1: a Conformer block runs
    attention, then the convolution module, each a pre-normed residual. Here both sit in one
    block's token-mixer branch (the channel mixer follows, as Conformer's second feed-forward)::

        a = attention(z)                                   # z = the block's norm1(x)
        c = conformer_conv(conv_norm(z + a))               # conv_norm: LayerNorm over channels
        return a + c                                       # the block adds it: x + ls1 * (a + c)

    One difference from the paper: a block hands its mixer ``norm1(x)``, never ``x``, so the
    convolution module sees the attention's residual sum on the normalised stream (``z + a``)
    where Conformer's sees it on the raw one (``x + a``). Prefix tokens (a class token) take part
    in attention and skip the convolution (it runs on the patch tokens laid out as the map),
    as CvT's convolutional projection treats them. Options: those of ``attention`` and
    ``conformer_conv`` (its ``drop`` as ``conv_drop``).
    """

    layout = "nlc"
    stage_context = ("num_prefix_tokens",)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int | None = None,
        head_dim: int = 32,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        kernel_size: int = 7,
        conv_drop: float = 0.0,
        num_prefix_tokens: int = 0,
    ):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.attention = Attention(
            dim, num_heads=num_heads, head_dim=head_dim, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.conv_norm = create_norm("layernorm", dim, "nchw")
        self.conv = ConformerConv(dim, kernel_size=kernel_size, drop=conv_drop)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, _, C = x.shape
        p = self.num_prefix_tokens
        a = self.attention(x, grid)  # (B, N, C)
        fmap = (x + a)[:, p:].transpose(1, 2).reshape(B, C, *grid)  # patch tokens: (B, H*W, C) -> (B, C, H, W)
        c = self.conv(self.conv_norm(fmap), grid).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        return a + F.pad(c, (0, 0, p, 0))  # prefix tokens get no convolution: (B, p + H*W, C)
