"""Channel mixers: the per-token feed-forward half of a block.

Every channel mixer here works on channels-LAST input ``(..., dim)`` -- a token sequence
``(B, N, C)`` or a map viewed as ``(B, H, W, C)`` -- mixes along the last axis only and
returns the same shape. Constructors share one keyword-only signature,
``(dim, *, hidden_dim, bias=True, drop=0.0)`` plus the class's own options, so that a
YAML file can swap one for another by name through :data:`CHANNEL_MIXERS` /
:func:`create_channel_mixer`.

Names in the registry:

========================  ===================================================================
``mlp``                   :class:`Mlp`, activation chosen by the ``act`` option: exact (erf) GELU by
                          default -- ViT / DeiT / timm ``Mlp``; alias ``mlp_gelu``
``mlp_squared_relu``      :class:`Mlp` with squared ReLU (Primer)
``geglu``                 :class:`GluMlp` with GELU gate (Shazeer 2020)
``reglu``                 :class:`GluMlp` with ReLU gate (Shazeer 2020)
``squared_relu_glu``      :class:`GluMlp` with squared-ReLU gate (Primer's activation, GLU form)
``moe``                   :class:`zoo.layers.moe.MoE` (routed mixture of experts: token or expert choice,
                          routing groups of one image by default)
``soft_moe``              :class:`zoo.layers.soft_moe.SoftMoE` (Soft MoE: soft slots, nothing dropped)
``sparse_ffn``            :class:`zoo.layers.sparse_ffn.SparseFFN` ("Sparse is Enough": one unit a block
                          of ``block_size``, picked by a low-rank controller)
``identity``              :class:`IdentityChannelMixer` (no channel mixing, no parameters)
========================  ===================================================================

Aliases (:data:`CHANNEL_MIXER_ALIASES`) are other names of an entry, not entries: ``mlp_gelu`` builds
exactly what ``mlp`` builds. Activations are named in :mod:`zoo.layers.activations`.

``identity`` versus the backbone's ``channel_mixer="none"`` (``zoo.models.specs.NO_CHANNEL_MIXER``,
not an entry of this registry) -- they are NOT the same block:

- ``"identity"`` keeps the second residual branch with the mixer replaced by the identity, so the
  block computes ``x = x + drop_path(ls2 * norm2(x))``: a per-token, per-channel affine of
  ``x`` (the norm's weight and bias, and layer scale if any) is still added, and ``norm2`` (and
  ``ls2``) keep their parameters. This mirrors MetaFormer's IdentityFormer convention (Yu et al.,
  https://arxiv.org/abs/2210.13452), where the *token* mixer is the identity; for a channel mixer
  it means "remove the feed-forward layers but keep the branch's norm and residual", the
  ablation that isolates the MLP's weights.
- ``"none"`` removes the second branch altogether: no ``norm2``, no ``ls2``, no addition; the
  block is ``x = x + drop_path(ls1 * token_mixer(norm1(x)))`` only (gMLP, whose token mixer is
  the whole gated unit). Use it to remove the branch itself.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..names import unknown_component
from .activations import get_act
from .fused import GeluMlpFunction, conv1x1, fused_backward_allowed
from .init import trunc_normal_init_
from .moe import MoE
from .norm import create_norm
from .soft_moe import SoftMoE
from .sparse_ffn import SparseFFN

__all__ = [
    "CHANNEL_MIXERS",
    "CHANNEL_MIXER_ALIASES",
    "GluMlp",
    "IdentityChannelMixer",
    "Mlp",
    "MlpHead",
    "create_channel_mixer",
]


class Mlp(nn.Module):
    """Two-layer feed-forward: ``fc2(drop(act(fc1(x))))``, as in ViT / DeiT / MLP-Mixer.

    Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words", https://arxiv.org/abs/2010.11929.
    With ``act="squared_relu"`` it is Primer's feed-forward (https://arxiv.org/abs/2109.08668).

    Submodule names (``fc1``, ``act``, ``drop1``, ``fc2``, ``drop2``) and so the state-dict keys
    (``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias``) are those of
    ``timm.layers.Mlp``, so a timm checkpoint loads unchanged; timm's ``norm`` slot is an
    Identity there and holds no parameters. Weights start truncated-normal std .02 with zero
    biases (the ViT init); a backbone may re-initialise.

    Shapes: ``(..., dim) -> (..., dim)``, channels last.
    """

    def __init__(
        self,
        dim: int,
        *,
        hidden_dim: int,
        act: str = "gelu",
        bias: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, self.fc1_branches * hidden_dim, bias=bias)
        self.act = get_act(act)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)
        self.reset_parameters()

    fc1_branches = 1  # fc1 computes this many hidden_dim-wide branches in one matmul (GLU: 2)

    def reset_parameters(self) -> None:
        trunc_normal_init_(self.fc1.weight, self.fc1.bias)
        trunc_normal_init_(self.fc2.weight, self.fc2.bias)

    def activate(self, h: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """fc1's output -> fc2's input; ``channel_dim`` is -1 on tokens, 1 on maps."""
        return self.act(h)

    def _can_fuse(self, x: torch.Tensor) -> bool:
        """Whether this forward (on tokens or on maps) may take ``GeluMlpFunction``: a GELU MLP
        without dropout between its layers (or in eval), where ``fused_backward_allowed`` says the
        plain ops need not run."""
        return (
            type(self.act) is nn.GELU
            and self.fc1_branches == 1
            and (self.drop1.p == 0 or not self.training)
            and fused_backward_allowed(x, self.fc1, self.act, self.drop1, self.fc2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._can_fuse(x):
            x = GeluMlpFunction.apply(
                x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.act.approximate, False
            )  # on tokens: (..., dim) -> (..., dim)
            return self.drop2(x)
        x = self.fc1(x)  # (..., dim) -> (..., branches * hidden_dim)
        x = self.drop1(self.activate(x, -1))
        x = self.fc2(x)  # (..., hidden_dim) -> (..., dim)
        return self.drop2(x)

    def forward_nchw(self, x: torch.Tensor) -> torch.Tensor:
        """The same function on a (B, C, H, W) map, as 1x1 convolutions with the linear weights.

        On a channels_last map oneDNN runs these natively, reading and writing the map in place,
        where a matmul would need the map permuted to (B, H, W, C) and back. The PoolFormer train
        step this serves is timed against timm's in the README's CPU speed table
        (``zoo_poolformer_s12`` row).
        """
        if self._can_fuse(x):
            x = GeluMlpFunction.apply(
                x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.act.approximate, True
            )  # on_map: (B, dim, H, W) -> (B, dim, H, W)
            return self.drop2(x)
        x = conv1x1(x, self.fc1.weight, self.fc1.bias)  # (B, dim, H, W) -> (B, br*hidden, H, W)
        x = self.drop1(self.activate(x, 1))
        x = conv1x1(x, self.fc2.weight, self.fc2.bias)  # (B, hidden, H, W) -> (B, dim, H, W)
        return self.drop2(x)


class GluMlp(Mlp):
    """Gated linear unit feed-forward: ``fc2(act(a) * b)`` with ``a, b = fc1(x).chunk(2)``.

    Shazeer 2020, "GLU Variants Improve Transformer", https://arxiv.org/abs/2002.05202:
    ``act="gelu"`` is GEGLU, ``act="relu"`` is ReGLU; ``act="squared_relu"`` gates with Primer's
    squared ReLU (https://arxiv.org/abs/2109.08668).

    ``hidden_dim`` is the width of EACH branch: ``fc1`` maps ``dim -> 2 * hidden_dim`` in one
    matmul (value and gate packed), ``fc2`` maps ``hidden_dim -> dim``. Shazeer shrinks the
    hidden width by 2/3 to keep parameters equal to a plain MLP; that choice is the config's.
    Note the gate is the FIRST half (``act(a) * b``), like timm's ``GluMlp(gate_last=False)``;
    timm's default ``gate_last=True`` activates the second half.

    Shapes: ``(..., dim) -> (..., dim)``, channels last.
    """

    fc1_branches = 2  # gate and value packed in one matmul

    def activate(self, h: torch.Tensor, channel_dim: int) -> torch.Tensor:
        gate, value = h.chunk(2, dim=channel_dim)  # two hidden_dim-wide views, no copy
        return self.act(gate) * value


class IdentityChannelMixer(nn.Module):
    """No channel mixing: returns its input. For ablations that remove the feed-forward layers
    of a block while keeping its second branch: the block still adds ``ls2 * norm2(x)`` to its
    residual (see the module docstring; ``channel_mixer="none"`` removes the branch instead).

    Takes the common channel-mixer signature so it is swappable by name; ``hidden_dim``,
    ``bias`` and ``drop`` are accepted and ignored. Holds no parameters.
    """

    def __init__(self, dim: int, *, hidden_dim: int, bias: bool = True, drop: float = 0.0) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class MlpHead(nn.Module):
    """MetaFormer-v2's classifier: ``fc2(drop(norm(act(fc1(x)))))`` on the pooled features.

    Yu et al., "MetaFormer Baselines for Vision", https://arxiv.org/abs/2210.13452 (ConvFormer and
    CAFormer; official code ``MlpHead``): ``fc1`` widens ``dim`` to ``hidden_ratio * dim`` (4),
    squared ReLU (not StarReLU: the official head takes ``SquaredReLU``), a LayerNorm with its
    bias, dropout, and ``fc2`` to the classes; both linears have biases. The official norm is
    torch's ``nn.LayerNorm`` (eps 1e-5, ``norm="layernorm_eps1e-5"``); timm's port uses its own
    LayerNorm with eps 1e-6 (``norm="layernorm"``). Names (``fc1``, ``norm``, ``fc2``) are the
    official ones and timm's (under its ``head.fc``).

    Shapes: ``(..., dim) -> (..., num_classes)``, channels last.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        hidden_ratio: float = 4.0,
        act: str = "squared_relu",
        norm: str = "layernorm_eps1e-5",
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = int(hidden_ratio * dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = get_act(act)
        self.norm = create_norm(norm, hidden, "nlc")
        self.head_drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, num_classes)
        trunc_normal_init_(self.fc1.weight, self.fc1.bias)
        trunc_normal_init_(self.fc2.weight, self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.act(self.fc1(x)))  # (..., dim) -> (..., hidden)
        return self.fc2(self.head_drop(x))  # (..., hidden) -> (..., num_classes)


# Name -> constructor. ``functools.partial`` entries fix an option (e.g. the activation); those
# fixed options cannot be overridden through ``options``.
CHANNEL_MIXERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": Mlp,
    "mlp_squared_relu": functools.partial(Mlp, act="squared_relu"),
    "geglu": functools.partial(GluMlp, act="gelu"),
    "reglu": functools.partial(GluMlp, act="relu"),
    "squared_relu_glu": functools.partial(GluMlp, act="squared_relu"),
    "moe": MoE,
    "soft_moe": SoftMoE,
    "sparse_ffn": SparseFFN,
    "identity": IdentityChannelMixer,
}
# Alias -> the entry it names. An alias is resolved before anything else, so it takes the same
# options as its entry.
CHANNEL_MIXER_ALIASES: dict[str, str] = {"mlp_gelu": "mlp"}

# Arguments every channel mixer takes directly; they are not "options".
_COMMON_ARGS = ("dim", "hidden_dim", "bias", "drop")


def _options_of(ctor: Callable[..., nn.Module]) -> list[str]:
    """Keyword options a registered constructor accepts beyond the common arguments."""
    fixed = set(ctor.keywords) if isinstance(ctor, functools.partial) else set()
    target = ctor.func if isinstance(ctor, functools.partial) else ctor
    params = inspect.signature(target).parameters.values()
    return [
        p.name
        for p in params
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in _COMMON_ARGS and p.name not in fixed
    ]


def create_channel_mixer(
    name: str,
    dim: int,
    *,
    hidden_dim: int,
    bias: bool = True,
    drop: float = 0.0,
    options: Mapping[str, object] | None = None,
) -> nn.Module:
    """Build the channel mixer registered as ``name``.

    ``options`` are the class's own keyword options (e.g. ``{"num_experts": 8}`` for ``moe``,
    ``{"act": "relu"}`` for ``mlp``). An unknown name raises :class:`zoo.names.UnknownComponentError`
    (a ``KeyError`` and ``ValueError``) naming the nearest registered name; an unknown option
    raises ``TypeError`` naming it and the valid ones.
    """
    try:
        ctor = CHANNEL_MIXERS[CHANNEL_MIXER_ALIASES.get(name, name)]
    except KeyError:
        raise unknown_component("channel mixer", name, CHANNEL_MIXERS, CHANNEL_MIXER_ALIASES) from None
    options = dict(options or {})
    valid = _options_of(ctor)
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise TypeError(
            f"channel mixer {name!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid) if valid else '(none)'}"
            + (
                "; dim, hidden_dim, bias and drop are arguments, not options"
                if any(k in _COMMON_ARGS for k in unknown)
                else ""
            )
        )
    return ctor(dim, hidden_dim=hidden_dim, bias=bias, drop=drop, **options)
