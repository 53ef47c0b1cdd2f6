"""The one backbone every zoo family is assembled from: Block, Stage and ZooModel.

A ``ModelSpec`` (see specs.py) says what to build; this file says how. A block is the MetaFormer
block (https://arxiv.org/abs/2111.11418) with its token mixer and channel mixer injected::

    x = rs1 * x + drop_path(ls1 * token_mixer(norm1(x)))
    x = rs2 * x + drop_path(ls2 * channel_mixer(norm2(x)))    # absent for channel_mixer="none" (gMLP)

or, with ``channel_norm="residual"`` (CCT), ``x = norm2(x)`` first and the channel mixer on it unnormed:
``x = rs2 * x + drop_path(ls2 * channel_mixer(x))``.

where ``ls`` (layer scale) and ``rs`` (res scale, MetaFormer-v2: https://arxiv.org/abs/2210.13452)
are learned per-channel scales, or ones where the stage has none.

A stage opens with a strided convolution (stem, downsampling or patch embedding) and runs its
blocks in the layout its token mixer declares: channels-first maps (kept in channels_last memory
so the channel mixer is a plain matmul, no copy) or token sequences with optional class /
distillation tokens and a learned or fixed (sine) position embedding. The head pools by timm's
global pools or CCT's sequence pooling (https://arxiv.org/abs/2104.05704). The model speaks timm's
interface.
"""

# No ``from __future__ import annotations`` here: an FX trace of ZooModel (torchvision's feature
# extraction, timm's fx tests) copies forward's annotations into its generated code, and a string
# annotation there is a name TorchScript cannot resolve when that GraphModule is scripted.
import contextlib
import dataclasses
import math
from collections.abc import Container, Sequence

import torch
from timm.layers import DropPath, resample_abs_pos_embed, trunc_normal_
from timm.models import register_notrace_function, register_notrace_module
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.embed import ConvEmbed, sine_position_table
from ..layers.init import STD, trunc_normal_init_
from ..layers.mixers import TOKEN_MIXERS, RandomMixing, SpatialGating, create_token_mixer, token_mixer_layout
from ..layers.mlp import MlpHead, create_channel_mixer
from ..layers.moe import MoE, moe_modules, reset_aux_loss
from ..layers.norm import create_norm
from .specs import NO_CHANNEL_MIXER, ModelSpec, StageSpec

# FX (torchvision's feature extraction, timm's fx tests) traces with timm's leaf modules: these
# branch on the token count / route tokens by value, which a symbolic trace cannot follow.
register_notrace_module(SpatialGating)
register_notrace_module(RandomMixing)
register_notrace_module(MoE)


def feature_take_indices(num_features: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """timm's convention (its private ``feature_take_indices``, kept here so that a timm release
    cannot move it from under us): an int n takes the last n taps, a sequence those indices
    (negative from the end), None all. Returns the indices and the largest."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"indices={indices}: expected 1 to {num_features} taps")
        take = [num_features - indices + i for i in range(indices)]
    else:
        take = []
        for i in indices:
            j = num_features + i if i < 0 else i
            if not 0 <= j < num_features:
                raise ValueError(f"indices: {i} is out of range for {num_features} taps")
            take.append(j)
    return take, max(take)


@register_notrace_function
def channels_last_on_cpu(x: torch.Tensor) -> torch.Tensor:
    # channels_last on the CPU: oneDNN's pooling and 1x1 convolutions run natively on it,
    # with no reorder between layers; on a GPU cuDNN's kernels are the faster ones in NCHW,
    # so maps stay as they come there. The CPU side is timed in the README's speed table
    # (zoo_poolformer_s12).
    # (A function timm's FX tracer wraps: the branch reads the tensor's device.)
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


@register_notrace_function
def pos_embed_at(
    pos_embed: torch.Tensor,
    grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    dynamic: bool,
    sine: bool = False,
) -> torch.Tensor:
    """The position embedding for a ``new_grid`` of patch tokens: as built, or for a model created
    with ``dynamic_img_size=True`` interpolated (learned) or recomputed for the new token count (a
    sine table). (FX-wrapped: it compares sizes of the input.)"""
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if new_grid == tuple(grid):
        return pos_embed
    if not dynamic:
        raise ValueError(
            f"this model's position embedding is built for a {grid[0]}x{grid[1]} token grid, the input "
            f"gives {new_grid[0]}x{new_grid[1]}: create the model with the img_size you feed it, or "
            "with dynamic_img_size=True (the embedding is then interpolated per input)"
        )
    if sine:
        table = sine_position_table(
            num_prefix_tokens + new_grid[0] * new_grid[1], pos_embed.shape[-1], pos_embed.device
        )
        return table.to(pos_embed.dtype)
    return resample_abs_pos_embed(pos_embed, list(new_grid), num_prefix_tokens=num_prefix_tokens)


@register_notrace_function
def check_input(x: torch.Tensor, name: str, in_chans: int, min_size: int) -> None:
    """A one-line error for a batch of the wrong rank, channels or size. (FX-wrapped: it reads shapes.)"""
    if x.ndim != 4:
        raise ValueError(f"{name} expects a 4-d batch (B, {in_chans}, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"{name} expects {in_chans} input channels, got {x.shape[1]} "
            f"(input shape {tuple(x.shape)}); create it with in_chans={x.shape[1]}"
        )
    if min(x.shape[-2:]) < min_size:
        raise ValueError(f"{name} needs images of at least {min_size}x{min_size}, got {x.shape[-2]}x{x.shape[-1]}")


class SequencePool(nn.Module):
    """Sequence pooling (Hassani et al., "Escaping the Big Data Paradigm with Compact Transformers",
    https://arxiv.org/abs/2104.05704): a learned score per token, softmax over the tokens, and the
    score-weighted sum of the tokens, in place of a class token. ``attention`` is the official
    ``attention_pool`` linear layer."""

    def __init__(self, dim: int):
        super().__init__()
        self.attention = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.attention(x).softmax(dim=1)  # (B, N, C) -> (B, N, 1), summing to 1 over N
        return (weights.transpose(1, 2) @ x).squeeze(1)  # (B, 1, N) @ (B, N, C) -> (B, C)


class LayerScale(nn.Module):
    """Learned per-channel scale: of a residual branch (layer scale, CaiT,
    https://arxiv.org/abs/2103.17239) or of the residual path (res scale, MetaFormer-v2)."""

    def __init__(self, dim: int, init: float, layout: str):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.gamma.view(-1, 1, 1) if self.layout == "nchw" else self.gamma)


class Block(nn.Module):
    """Token mixer then channel mixer, each pre-normed, scaled and added to the residual (or, with
    ``channel_norm="residual"``, the second norm applied to the residual stream itself: CCT).

    ``token_mixer`` and ``channel_mixer`` are built by the stage and may be shared with other
    blocks (weight sharing); norms and layer scales always belong to this block. A block without
    a channel mixer (``None``: gMLP, whose token mixer is the whole gated unit) is one residual
    branch and has no second norm.
    """

    def __init__(
        self,
        dim: int,
        *,
        token_mixer: nn.Module,
        channel_mixer: nn.Module | None,
        norm: str,
        layout: str,
        layer_scale: float | None,
        drop_path: float,
        res_scale: float | None = None,
        channel_norm: str = "pre",
    ):
        super().__init__()
        self.layout = layout
        # CCT's block normalises the residual stream itself before the channel mixer's branch
        self.norm_residual = channel_norm == "residual"

        def scale(init: float | None) -> nn.Module:
            return LayerScale(dim, init, layout) if init is not None else nn.Identity()

        self.norm1 = create_norm(norm, dim, layout)
        self.token_mixer = token_mixer
        self.ls1, self.res_scale1 = scale(layer_scale), scale(res_scale)
        self.norm2 = self.channel_mixer = self.ls2 = self.res_scale2 = None
        if channel_mixer is not None:
            self.norm2 = create_norm(norm, dim, layout)
            self.channel_mixer = channel_mixer
            self.ls2, self.res_scale2 = scale(layer_scale), scale(res_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _mix_channels(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "nlc":
            return self.channel_mixer(x)
        if hasattr(self.channel_mixer, "forward_nchw"):  # the mixer computes on maps itself (1x1 convs)
            return self.channel_mixer.forward_nchw(x)
        # Channel mixers work channels-last; on a channels_last map both permutes are free views.
        x = self.channel_mixer(x.permute(0, 2, 3, 1))  # (B, C, H, W) -> (B, H, W, C)
        return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        # a mixer may compute its whole residual branch in one Function (Pooling); None: it cannot here
        fused = getattr(self.token_mixer, "residual", None)
        y = fused(x, self.norm1, self.ls1, self.res_scale1, self.drop_path) if fused is not None else None
        x = y if y is not None else self.res_scale1(x) + self.drop_path(self.ls1(self.token_mixer(self.norm1(x), grid)))
        if self.channel_mixer is not None:
            if self.norm_residual:  # CCT: x = norm2(x); x = x + mlp(x)
                x = self.norm2(x)
                x = self.res_scale2(x) + self.drop_path(self.ls2(self._mix_channels(x)))
            else:
                x = self.res_scale2(x) + self.drop_path(self.ls2(self._mix_channels(self.norm2(x))))
        return x


class Stage(nn.Module):
    """An embedding convolution, optional prefix tokens and position embedding, then blocks."""

    def __init__(
        self,
        spec: StageSpec,
        in_dim: int,
        *,
        in_size: tuple[int, int],
        drop_path: Sequence[float],
        dynamic_img_size: bool = False,
    ):
        super().__init__()
        self.spec = spec
        dim = spec.dim
        # MetaFormer-v2 normalises the previous stage's map before downsampling it
        self.embed_pre_norm = create_norm(spec.embed.pre_norm, in_dim, "nchw")
        e = spec.embed
        self.embed = ConvEmbed(
            in_dim,
            dim,
            kernel=e.kernel,
            stride=e.stride,
            padding=e.padding,
            norm=e.norm,
            bias=e.bias,
            layers=e.layers,
            hidden_dim=e.hidden_dim,
            act=e.act,
            pool_kernel=e.pool_kernel,
            pool_stride=e.pool_stride,
            pool_padding=e.pool_padding,
            init=e.init,
        )
        layout = token_mixer_layout(spec.token_mixer)
        has_tokens = spec.num_prefix_tokens > 0 or spec.pos_embed
        if layout == "any":
            layout = "nlc" if has_tokens else "nchw"
        if layout == "nchw" and has_tokens:
            raise ValueError(
                f"token mixer {spec.token_mixer!r} works on maps; it cannot run in a stage "
                "with class tokens or a position embedding"
            )
        self.layout = layout
        self.num_prefix_tokens = spec.num_prefix_tokens
        self.grid = (self.embed.out_size(in_size[0]), self.embed.out_size(in_size[1]))  # the position embedding's
        self.dynamic_img_size = dynamic_img_size  # interpolate the position embedding to each input's grid
        num_tokens = self.grid[0] * self.grid[1] + self.num_prefix_tokens

        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if spec.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if spec.dist_token else None
        self.sine_pos_embed = spec.pos_embed == "sine"
        if self.sine_pos_embed:  # fixed: a buffer, in the state dict as CCT's checkpoints hold it
            self.register_buffer("pos_embed", sine_position_table(num_tokens, dim))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim)) if spec.pos_embed else None

        context = {"num_tokens": num_tokens, "num_prefix_tokens": self.num_prefix_tokens, "grid": self.grid}
        hidden = int(dim * spec.mlp_ratio)
        groups = math.ceil(spec.depth / spec.share_group)
        token_mixers = [
            create_token_mixer(spec.token_mixer, dim, dict(spec.mixer_options), context) for _ in range(groups)
        ]
        if spec.channel_mixer == NO_CHANNEL_MIXER:
            if spec.channel_options:
                raise ValueError(f"channel_mixer 'none' takes no channel_options, got {dict(spec.channel_options)}")
            channel_mixers = [None] * groups
        else:
            channel_mixers = [
                create_channel_mixer(
                    spec.channel_mixer, dim, hidden_dim=hidden, bias=spec.mlp_bias, options=dict(spec.channel_options)
                )
                for _ in range(groups)
            ]
        self.blocks = nn.ModuleList(
            Block(
                dim,
                token_mixer=token_mixers[i // spec.share_group],
                channel_mixer=channel_mixers[i // spec.share_group],
                norm=spec.norm,
                layout=layout,
                layer_scale=spec.layer_scale,
                res_scale=spec.res_scale,
                drop_path=drop_path[i],
                channel_norm=spec.channel_norm,
            )
            for i in range(spec.depth)
        )
        self.grad_checkpointing = False

    def embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Map in, stage input out: a channels_last map, or tokens with prefix and positions."""
        x = self.embed(self.embed_pre_norm(x))
        B, _, H, W = x.shape
        if self.layout == "nchw":
            return channels_last_on_cpu(x), (H, W)
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)  # (B, prefix + H*W, C)
        if self.pos_embed is not None:
            x = x + pos_embed_at(
                self.pos_embed, self.grid, (H, W), self.num_prefix_tokens, self.dynamic_img_size, self.sine_pos_embed
            )
        return x, (H, W)

    def to_map(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Stage output as an NCHW map of the patch tokens (prefix tokens dropped)."""
        if self.layout == "nchw":
            return x
        x = x[:, self.num_prefix_tokens :]
        return x.transpose(1, 2).reshape(x.shape[0], -1, *grid)  # (B, H*W, C) -> (B, C, H, W)

    def run_blocks(self, x: torch.Tensor, grid: tuple[int, int], blocks: Sequence[Block] | None = None):
        for block in self.blocks if blocks is None else blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(block, x, grid, use_reentrant=False)
            else:
                x = block(x, grid)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x, grid = self.embed_tokens(x)
        return self.run_blocks(x, grid), grid


def drop_path_rates(spec: ModelSpec) -> list[float]:
    """Each block's stochastic-depth rate: one linear ramp over all blocks, or one per stage."""

    def ramp(end: float, n: int) -> list[float]:
        return torch.linspace(0, end, n, device="cpu").tolist()  # device: also under a meta default device

    if spec.drop_path_stages is None:
        return ramp(spec.drop_path_rate, sum(s.depth for s in spec.stages))
    return [
        r
        for s, f in zip(spec.stages, spec.drop_path_stages, strict=True)
        for r in ramp(spec.drop_path_rate * f, s.depth)
    ]


class ZooModel(nn.Module):
    """Every zoo model: stages from a ``ModelSpec``, a norm and a classifier head.

    Speaks timm's interface (``forward_features``, ``forward_head``, ``forward_intermediates``,
    ``reset_classifier``, ``feature_info``, ``pretrained_cfg``, ``group_matcher``,
    ``set_input_size``, ...). Feature taps are the stages of a hierarchical model and the blocks of
    an isotropic (single-stage) one, as in timm.
    """

    def __init__(self, spec: ModelSpec, *, name: str = "zoo_model"):
        super().__init__()
        self.spec, self.name = spec, name
        self.num_classes = spec.num_classes
        self.in_chans = spec.in_chans
        self.global_pool = spec.global_pool
        self.distilled_training = False
        last = spec.stages[-1]
        _check_pool(name, spec.global_pool, last.num_prefix_tokens > 0)
        if spec.distilled and not last.dist_token:
            raise ValueError(f"{name}: distilled=True needs a distillation token in the last stage")
        if spec.dynamic_img_size and any(_per_token_weights(s) for s in spec.stages):
            raise ValueError(
                f"{name}: dynamic_img_size=True, but its token mixer has weights per token "
                "position (built for one token count): create it with the img_size you feed it"
            )

        rates = drop_path_rates(spec)
        stages, feature_info = [], []
        in_dim, size, reduction, start = spec.in_chans, (spec.img_size, spec.img_size), 1, 0
        for i, s in enumerate(spec.stages):
            try:
                stage = Stage(
                    s,
                    in_dim,
                    in_size=size,
                    drop_path=rates[start : start + s.depth],
                    dynamic_img_size=spec.dynamic_img_size,
                )
            except (ValueError, TypeError, KeyError) as e:
                prefixed = _prefixed(e, f"{name}: stages[{i}]: ")
                if prefixed is e:
                    raise
                raise prefixed from None
            stages.append(stage)
            reduction *= s.embed.reduction
            size, in_dim, start = stage.grid, s.dim, start + s.depth
            if len(spec.stages) > 1:
                feature_info.append({"num_chs": s.dim, "reduction": reduction, "module": f"stages.{i}"})
        if len(spec.stages) == 1:
            feature_info = [
                {"num_chs": last.dim, "reduction": reduction, "module": f"stages.0.blocks.{j}"}
                for j in range(last.depth)
            ]
        self.stages = nn.ModuleList(stages)
        self.feature_info = feature_info
        self.num_features = self.head_hidden_size = last.dim
        self.num_prefix_tokens = self.stages[-1].num_prefix_tokens
        self.min_input_size = self._min_input_size()

        final_layout = self.stages[-1].layout if spec.head_norm_on == "map" else "nlc"
        self.norm = create_norm(spec.head_norm, last.dim, final_layout)
        self._norm_stage: int | None = len(spec.stages) - 1  # the stage self.norm applies to; None: pruned
        if spec.head_mlp_ratio is not None and spec.distilled:
            raise ValueError(f"{name}: an MLP head (head_mlp_ratio) and distilled=True do not combine")
        # The MLP head drops out between its norm and fc2 (official MetaFormer-v2); a linear head before it.
        self.head_drop = nn.Dropout(spec.drop_rate if spec.head_mlp_ratio is None else 0.0)
        # CCT's sequence pooling: its weights belong to the head, built when the pooling asks for them
        self.seq_pool = SequencePool(last.dim) if spec.global_pool == "seqpool" else None
        self.head = self._new_head(spec.num_classes)
        self.head_dist = self._new_head(spec.num_classes) if spec.distilled else None
        self.pretrained_cfg = self.default_cfg = spec_pretrained_cfg(spec, name)
        seen: set[int] = set()  # apply() revisits modules that blocks share: initialise each once

        def init_once(m: nn.Module) -> None:
            if id(m) not in seen:
                seen.add(id(m))
                _init_weights(m)

        self.apply(init_once)
        for m in self.modules():  # then the parts with an init of their own (gMLP's token projection)
            if m is not self and callable(getattr(m, "init_weights", None)):
                m.init_weights()
        for stage in self.stages:
            stds = ((stage.cls_token, stage.spec.cls_token_std), (stage.dist_token, STD))
            for t, std in (*stds, (stage.pos_embed, stage.spec.pos_embed_std)):
                # (a sine position table is a fixed buffer; std 0: the zeros it was made with)
                if isinstance(t, nn.Parameter) and std > 0:
                    trunc_normal_(t, std=std)
        self._has_moe = bool(moe_modules(self))

    @property
    def pretrained_cfg(self) -> dict:
        return self._pretrained_cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict) -> None:
        # one dict under both names, as timm's models: a loader that sets either sets both
        self._pretrained_cfg = cfg

    default_cfg = pretrained_cfg

    def _new_head(
        self, num_classes: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        """The classifier for ``num_classes`` (0: none): a linear layer, or MetaFormer-v2's MLP head."""
        if num_classes <= 0:
            return nn.Identity()
        with torch.device(device) if device is not None else contextlib.nullcontext():
            if self.spec.head_mlp_ratio is None:
                return nn.Linear(self.num_features, num_classes, dtype=dtype)
            else:
                head = MlpHead(
                    self.num_features,
                    num_classes,
                    hidden_ratio=self.spec.head_mlp_ratio,
                    norm=self.spec.head_mlp_norm,
                    drop=self.spec.drop_rate,
                )
        return head if dtype is None else head.to(dtype=dtype)

    # ---- input checks -------------------------------------------------------------------
    def _min_input_size(self) -> int:
        size = 1  # smallest input side for which every stage still has at least one position
        while True:
            s = size
            for stage in self.stages:
                s = stage.embed.out_size(s)
            if s >= 1:
                return size
            size += 1

    def _check_input(self, x: torch.Tensor) -> None:
        check_input(x, self.name, self.in_chans, self.min_input_size)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` calls this first (on every submodule): refuse in one line, before
        TorchScript fails somewhere deep in a layer with a page of compiler output."""
        raise RuntimeError(script_refusal(self.name))

    def _reset_aux_loss(self) -> None:
        """A forward starts with no pending MoE losses (see ``zoo.layers.moe.collect_aux_loss``), so
        an uncollected eval or benchmark forward never leaks into the next training step."""
        if self._has_moe:
            reset_aux_loss(self)

    # ---- timm interface -------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith(("cls_token", "dist_token", "pos_embed"))}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """DeiT: in training, return (class logits, distillation logits) instead of their mean."""
        if self.head_dist is None:
            raise ValueError(f"{self.name} has no distillation head")
        self.distilled_training = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (layer-wise lr decay, ``timm.optim.param_groups_layer_decay``):
        the stem (first embedding and the first stage's tokens), then each block of each stage
        (coarse: each stage), a later stage's embedding with its first block, the final norm last;
        the head matches nothing and timm puts it after everything."""
        tokens = r"(?:embed|cls_token|dist_token|pos_embed)"
        return {
            "stem": rf"^stages\.0\.{tokens}",
            "blocks": [(r"^stages\.(\d+)", None)]
            if coarse
            else [
                (rf"^stages\.(\d+)\.{tokens}", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm\.", (99999,)),
            ],
        }

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module | tuple[nn.Module, nn.Module]:
        return self.head if self.head_dist is None else (self.head, self.head_dist)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head of ``num_classes`` outputs (0: none, the model returns pooled features).

        ``global_pool``: None keeps the current pooling; ``"avg"``, ``"max"``, ``"avgmax"``,
        ``"token"`` (class token) change it; ``""`` turns pooling off, as in timm: the model then
        returns the unpooled map or tokens. The new head is made on the model's device and dtype.
        """
        if global_pool is not None:
            _check_pool(self.name, global_pool, self.stages[-1].num_prefix_tokens > 0)
            self.global_pool = global_pool
        ref = next(self.parameters())
        dd = {"device": ref.device, "dtype": ref.dtype}
        if self.global_pool == "seqpool" and self.seq_pool is None:  # switched to sequence pooling: new weights
            with torch.device(ref.device):
                self.seq_pool = SequencePool(self.num_features).to(dtype=ref.dtype)
            self.seq_pool.apply(_init_weights)
            self.seq_pool.train(self.training)
        elif self.global_pool != "seqpool":  # switched away: its weights go, as timm's ViT drops its attn_pool
            self.seq_pool = None
        self.num_classes = num_classes
        self.head = self._new_head(num_classes, **dd)
        if self.head_dist is not None:
            self.head_dist = self._new_head(num_classes, **dd)
        for head in (self.head, self.head_dist):
            if head is not None:
                head.apply(_init_weights)
                head.train(self.training)

    @property
    def set_input_size(self):
        """timm's ``set_input_size(img_size=None, patch_size=None)``, on the models that can change
        size. A model with weights per token position (gMLP's spatial gating) has none, as timm's
        gMLP has none: timm's tests and tools call the method wherever it exists and expect it to
        work, so ``hasattr(model, "set_input_size")`` is how a model says it can resize."""
        if any(_per_token_weights(st.spec) for st in self.stages):
            # (nn.Module.__getattr__ then raises "'ZooModel' object has no attribute 'set_input_size'")
            raise AttributeError(
                f"{self.name}: its token mixer has weights per token position (built for "
                "one token count), so it has no set_input_size: create it with the img_size you need"
            )
        return self._set_input_size

    def _set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: None = None) -> None:
        """Rebuild for another input size (timm's ``set_input_size``): position embeddings are
        resampled to the new grid, keeping their ``requires_grad``; ``patch_size`` is not
        supported (patches are convolutions here)."""
        if patch_size is not None:
            raise ValueError(f"{self.name}: set_input_size(patch_size=...) is not supported; create another model")
        if img_size is None:
            return
        size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        for stage in self.stages:
            grid = (stage.embed.out_size(size[0]), stage.embed.out_size(size[1]))
            if stage.sine_pos_embed and grid != stage.grid:  # a fixed table: recomputed for the new token count
                n = stage.num_prefix_tokens + grid[0] * grid[1]
                table = sine_position_table(n, stage.spec.dim, stage.pos_embed.device)
                stage.pos_embed = table.to(stage.pos_embed)  # (assigning a tensor replaces the buffer)
            elif stage.pos_embed is not None and grid != stage.grid:
                with torch.no_grad():
                    new = resize_pos_embed(stage.pos_embed.data, grid, stage.num_prefix_tokens)
                stage.pos_embed = nn.Parameter(new, requires_grad=stage.pos_embed.requires_grad)
            stage.grid, size = grid, grid
        in_size = (self.in_chans, *((img_size, img_size) if isinstance(img_size, int) else img_size))
        self.pretrained_cfg = {**self.pretrained_cfg, "input_size": tuple(in_size), "pool_size": self.stages[-1].grid}
        if in_size[1] == in_size[2]:
            self.spec = dataclasses.replace(self.spec, img_size=in_size[1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage's output: tokens (B, N, C) or a map (B, C, H, W) (always a map with
        ``features_as_map``); normed when the norm sits on the map."""
        self._check_input(x)
        self._reset_aux_loss()
        x, grid, _ = self._run_stages(x)
        if self.spec.features_as_map:  # timm's CAFormer layout: maps, whatever the last stage ran on
            x = self.stages[-1].to_map(x, grid)
        return self.norm(x) if self.spec.head_norm_on == "map" else x

    def _maps_out(self) -> bool:
        """Whether forward_features gives maps (B, C, H, W) rather than tokens (B, N, C)."""
        return self.stages[-1].layout == "nchw" or self.spec.features_as_map

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """timm's global pools: over the map's positions, or the patch tokens ("token": the class
        token); "seqpool": CCT's learned weights over all tokens (a map's positions flattened first)."""
        pool = self.global_pool
        if not pool:
            return x
        if pool == "seqpool":  # no prefix tokens here: the spec and reset_classifier refuse them
            if self._maps_out():
                x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
            return self.seq_pool(x)
        if self._maps_out():
            dims: tuple[int, ...] = (2, 3)  # (B, C, H, W) -> (B, C)
        else:
            if pool == "token":
                return x[:, 0]
            x, dims = x[:, self.num_prefix_tokens :], (1,)  # (B, N, C) -> (B, C), patch tokens only
        if pool == "avg":
            return x.mean(dims)
        if pool == "max":
            return x.amax(dims)
        return 0.5 * (x.mean(dims) + x.amax(dims))  # avgmax, as timm's

    def _channels(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A layer over the channels: the last axis, or axis 1 of an unpooled map (decided by the
        model's state, not the tensor's rank, so that FX can trace it)."""
        if not self.global_pool and self._maps_out():
            return layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, H, W) <-> (B, H, W, C)
        return layer(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.head_dist is not None:  # DeiT: class token -> head, distillation token -> head_dist
            x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
            if pre_logits:
                return (x + x_dist) / 2
            x, x_dist = self.head(x), self.head_dist(x_dist)
            if self.distilled_training and self.training and not torch.jit.is_scripting():
                return x, x_dist
            return (x + x_dist) / 2
        x = self._pool(x)
        if self.spec.head_norm_on == "pooled":
            x = self._channels(self.norm, x)
        x = self.head_drop(x)
        return x if pre_logits else self._channels(self.head, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _taps(self) -> list[tuple[int, int]]:
        """(stage, last block) of every feature tap, in feature_info order."""
        if len(self.spec.stages) == 1:
            return [(0, j) for j in range(len(self.stages[0].blocks))]
        return [(i, len(s.blocks) - 1) for i, s in enumerate(self.stages)]

    def _run_stages(
        self,
        x: torch.Tensor,
        taps: Container[tuple[int, int]] = (),
        *,
        norm_taps: bool = False,
        stop: tuple[int, int | None] | None = None,
    ) -> tuple[torch.Tensor, tuple[int, int], list[tuple[torch.Tensor, int, tuple[int, int]]]]:
        """The stage walk: each stage embeds the previous one's output (as an NCHW map) and runs its
        blocks. Returns the last block's output and, at each (stage, block) of ``taps``, that block's
        output as it is (tokens or map; through the final norm where ``norm_taps`` and the norm's
        stage) with its stage index and grid; the last block's grid comes second. ``stop``: the
        (stage, block) to end at, ``block`` None for the whole stage; None runs everything."""
        last_stage, last_block = (len(self.stages) - 1, None) if stop is None else stop
        intermediates = []
        grid = self.stages[0].grid  # each stage's output grid, set by the loop before it is read
        for i, stage in enumerate(self.stages[: last_stage + 1]):
            if i:
                x = self.stages[i - 1].to_map(x, grid)
            x, grid = stage.embed_tokens(x)
            blocks = stage.blocks if i < last_stage or last_block is None else stage.blocks[: last_block + 1]
            for j, block in enumerate(blocks):
                x = stage.run_blocks(x, grid, [block])
                if (i, j) in taps:
                    y = self.norm(x) if norm_taps and i == self._norm_stage else x
                    intermediates.append((y, i, grid))
        return x, grid, intermediates

    def _tap(self, y: torch.Tensor, i: int, grid: tuple[int, int], output_fmt: str, return_prefix_tokens: bool):
        """A tap in timm's ``output_fmt``: NCHW maps or NLC tokens (patch tokens only), with the
        stage's prefix tokens (B, prefix, C) beside it when ``return_prefix_tokens``."""
        stage = self.stages[i]
        prefix = y[:, : stage.num_prefix_tokens] if stage.layout == "nlc" else y.new_zeros(y.shape[0], 0, y.shape[1])
        if output_fmt == "NCHW":
            out = stage.to_map(y, grid)
        elif stage.layout == "nlc":
            out = y[:, stage.num_prefix_tokens :]
        else:
            out = y.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        return (out, prefix) if return_prefix_tokens else out

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's feature API: the taps selected by ``indices`` as maps (B, C, H, W) or, with
        ``output_fmt="NLC"``, tokens (B, H*W, C); ``return_prefix_tokens`` pairs each with the class /
        distillation tokens of its stage (an empty (B, 0, C) where the stage has none)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        self._check_input(x)
        self._reset_aux_loss()
        taps = self._taps()
        take, max_index = feature_take_indices(len(taps), indices)
        wanted = {taps[i] for i in take}
        # stop_early: run up to the last wanted tap (a stage of a hierarchical model, a block of an
        # isotropic one) and no further; otherwise run every block that is left.
        last_stage, last_block = taps[max_index] if stop_early else (len(self.stages) - 1, None)
        # The final norm is built for the last stage of the spec; it never applies to another stage.
        map_norm = self.spec.head_norm_on == "map" and self._norm_stage is not None
        x, grid, found = self._run_stages(x, wanted, norm_taps=norm and map_norm, stop=(last_stage, last_block))
        intermediates = [self._tap(y, i, g, output_fmt, return_prefix_tokens) for y, i, g in found]
        if intermediates_only:
            return intermediates
        if self.spec.features_as_map:  # as forward_features: a map
            x = self.stages[last_stage].to_map(x, grid)
        if map_norm and last_stage == self._norm_stage:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages/blocks after the last wanted tap (timm's features_only uses this)."""
        taps = self._taps()
        take, max_index = feature_take_indices(len(taps), indices)
        stage_idx, block_idx = taps[max_index]
        self.stages = self.stages[: stage_idx + 1]
        self.stages[-1].blocks = self.stages[-1].blocks[: block_idx + 1]
        self.num_features = self.head_hidden_size = self.stages[-1].spec.dim
        if self._norm_stage is not None and stage_idx < self._norm_stage:
            # the final norm belongs to a removed stage (another width): nothing is left for it to norm
            prune_norm = True
        if prune_norm:
            self.norm = nn.Identity()
            self._norm_stage = None
        if prune_head:
            self.head_dist = None
            # sequence pooling's weights belong to the head: they go with it, the output unpooled
            # (timm's ViT: reset_classifier(0, "") drops its attention pool)
            self.reset_classifier(0, "" if self.seq_pool is not None else None)
        return take


def _prefixed(error: Exception, prefix: str) -> Exception:
    """``error`` again, same type, its message prefixed (to say which model and stage failed)."""
    message = str(error)
    try:
        new = type(error)(prefix + message)
    except Exception:  # an exception type with another constructor: keep it as is
        return error
    return new


def script_refusal(name: str) -> str:
    """Why a zoo model cannot be ``torch.jit.script``-ed, and what to use instead (one line).

    The blocks train through ``torch.autograd.Function`` subclasses (``zoo/layers/fused.py``, the
    GELU MLP and gMLP's gated unit), which TorchScript cannot compile, and their forward reads the
    model's ``ModelSpec`` and the FX-wrapped shape helpers, Python objects it cannot type; torch
    itself deprecates ``torch.jit.script`` for ``torch.export``. Tracing records the ops one input
    runs (the fused Functions fall back to plain ops under tracing/export), which is every op here:
    no zoo forward branches on tensor values. timm's own suite excludes zoo models from its
    ``test_model_forward_torchscript`` for this reason (``tests/timm_suite/patch_suite.py``). An FX
    trace of the model (timm's leaf modules and wrapped functions, no ZooModel left in it) does
    script, for every family but WideNet, whose MoE stays a leaf (``tests/test_timm_habits.py``)."""
    return (
        f"{name}: torch.jit.script is not supported for zoo models (their blocks train through "
        "torch.autograd.Function and read Python spec objects, which TorchScript cannot compile); use "
        "torch.jit.trace(model.eval(), example), torch.export.export(model, (example,)) or "
        f"`python -m zoo.export {name} --format torchscript|exported|onnx` (checked against eager)"
    )


def _init_weights(m: nn.Module) -> None:
    """timm's ViT / PoolFormer init (``zoo.layers.init``) of every linear and convolution."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        trunc_normal_init_(m.weight, m.bias)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """Interpolate a (1, prefix + H*W, C) position embedding to another grid (bicubic, as timm)."""
    return resample_abs_pos_embed(pos_embed, list(new_grid), num_prefix_tokens=num_prefix_tokens)


def _per_token_weights(stage: StageSpec) -> bool:
    """A token mixer with weights per token position (gMLP's spatial gating): one input size only."""
    return "num_tokens" in getattr(TOKEN_MIXERS.get(stage.token_mixer), "stage_context", ())


def _check_pool(name: str, pool: str, has_class_token: bool) -> None:
    """``pool`` is one of timm's (or seqpool) and fits the last stage's prefix tokens."""
    from .specs import GLOBAL_POOLS

    if pool not in GLOBAL_POOLS:
        hint = "; 'map' (attention pooling) needs a pooling head zoo models do not have" if pool == "map" else ""
        raise ValueError(f"{name}: global_pool={pool!r}: expected one of {list(GLOBAL_POOLS)}{hint}")
    if pool == "token" and not has_class_token:
        raise ValueError(f"{name}: global_pool='token' needs a class token in the last stage")
    if pool == "seqpool" and has_class_token:
        raise ValueError(
            f"{name}: global_pool='seqpool' pools all tokens with learned weights; the last stage has a class "
            "token (use 'token', or a model without one)"
        )


def spec_pretrained_cfg(spec: ModelSpec, name: str) -> dict:
    """timm's ``pretrained_cfg`` fields for a model built from ``spec`` without weights (a shipped
    checkpoint's tag overlays file, tag, preprocessing and class count; see registry.py)."""
    size = (spec.img_size, spec.img_size)
    for s in spec.stages:
        size = (s.embed.out_size(size[0]), s.embed.out_size(size[1]))
    fixed = (any(s.pos_embed for s in spec.stages) and not spec.dynamic_img_size) or any(
        _per_token_weights(s) for s in spec.stages
    )
    # the layer that holds the classes (timm's convention): of an MLP head, its last linear
    classifier = ("head", "head_dist") if spec.distilled else "head" if spec.head_mlp_ratio is None else "head.fc2"
    return {
        "url": None,
        "file": None,
        "hf_hub_id": None,
        "source": None,
        "architecture": name,
        "tag": None,
        "custom_load": False,
        "input_size": (spec.in_chans, spec.img_size, spec.img_size),
        "test_input_size": None,
        "min_input_size": None,
        "fixed_input_size": bool(fixed),
        "interpolation": spec.interpolation,
        "crop_pct": spec.crop_pct,
        "test_crop_pct": None,
        "crop_mode": "center",
        "mean": tuple(spec.mean),
        "std": tuple(spec.std),
        "num_classes": spec.num_classes,
        "label_offset": None,
        "label_names": None,
        "pool_size": size,
        "first_conv": "stages.0.embed.proj",
        "classifier": classifier,
        "license": "apache-2.0",
        "description": None,
        "origin_url": next((w for w in spec.paper.split() if w.startswith("https://")), None),
        "paper_name": None,
        "paper_ids": spec.paper or None,
        "notes": None,
        "paper": spec.paper,
    }


__all__ = ["Block", "LayerScale", "Stage", "ZooModel", "resize_pos_embed"]
