"""The one backbone every zoo family is assembled from: Block, Stage and ZooModel.

A ``ModelSpec`` (see specs.py) says what to build; this file says how. A block is the MetaFormer
block (https://arxiv.org/abs/2111.11418) with its token mixer and channel mixer injected::

    x = x + drop_path(ls1 * token_mixer(norm1(x)))
    x = x + drop_path(ls2 * channel_mixer(norm2(x)))    # absent for channel_mixer="none" (gMLP)

A stage opens with a strided convolution (stem, downsampling or patch embedding) and runs its
blocks in the layout its token mixer declares: channels-first maps (kept in channels_last memory
so the channel mixer is a plain matmul, no copy) or token sequences with optional class /
distillation tokens and a learned position embedding. The model speaks timm's interface.
"""
from __future__ import annotations

import math
from collections.abc import Container, Sequence

import torch
from timm.layers import DropPath, resample_abs_pos_embed
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.embed import ConvEmbed
from ..layers.init import trunc_normal_init_
from ..layers.mixers import create_token_mixer, token_mixer_layout
from ..layers.mlp import create_channel_mixer
from ..layers.moe import moe_modules, reset_aux_loss
from ..layers.norm import create_norm
from .specs import NO_CHANNEL_MIXER, ModelSpec, StageSpec


class LayerScale(nn.Module):
    """Learned per-channel scale of a residual branch (CaiT, https://arxiv.org/abs/2103.17239)."""

    def __init__(self, dim: int, init: float, layout: str):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.gamma.view(-1, 1, 1) if self.layout == "nchw" else self.gamma)


class Block(nn.Module):
    """Token mixer then channel mixer, each pre-normed, scaled and added to the residual.

    ``token_mixer`` and ``channel_mixer`` are built by the stage and may be shared with other
    blocks (weight sharing); norms and layer scales always belong to this block. A block without
    a channel mixer (``None``: gMLP, whose token mixer is the whole gated unit) is one residual
    branch and has no second norm.
    """

    def __init__(self, dim: int, *, token_mixer: nn.Module, channel_mixer: nn.Module | None, norm: str,
                 layout: str, layer_scale: float | None, drop_path: float):
        super().__init__()
        self.layout = layout
        self.norm1 = create_norm(norm, dim, layout)
        self.token_mixer = token_mixer
        self.ls1 = LayerScale(dim, layer_scale, layout) if layer_scale is not None else nn.Identity()
        self.norm2 = self.channel_mixer = self.ls2 = None
        if channel_mixer is not None:
            self.norm2 = create_norm(norm, dim, layout)
            self.channel_mixer = channel_mixer
            self.ls2 = LayerScale(dim, layer_scale, layout) if layer_scale is not None else nn.Identity()
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
        x = x + self.drop_path(self.ls1(self.token_mixer(self.norm1(x), grid)))
        if self.channel_mixer is not None:
            x = x + self.drop_path(self.ls2(self._mix_channels(self.norm2(x))))
        return x


class Stage(nn.Module):
    """An embedding convolution, optional prefix tokens and position embedding, then blocks."""

    def __init__(self, spec: StageSpec, in_dim: int, *, in_size: int, drop_path: Sequence[float]):
        super().__init__()
        self.spec = spec
        dim = spec.dim
        self.embed = ConvEmbed(in_dim, dim, kernel=spec.embed.kernel, stride=spec.embed.stride,
                               padding=spec.embed.padding, norm=spec.embed.norm)
        layout = token_mixer_layout(spec.token_mixer)
        has_tokens = spec.num_prefix_tokens > 0 or spec.pos_embed
        if layout == "any":
            layout = "nlc" if has_tokens else "nchw"
        if layout == "nchw" and has_tokens:
            raise ValueError(f"token mixer {spec.token_mixer!r} works on maps; it cannot run in a stage "
                             "with class tokens or a position embedding")
        self.layout = layout
        self.num_prefix_tokens = spec.num_prefix_tokens
        self.grid = (self.embed.out_size(in_size),) * 2  # the grid the position embedding is built for
        num_tokens = self.grid[0] * self.grid[1] + self.num_prefix_tokens

        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if spec.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if spec.dist_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim)) if spec.pos_embed else None

        context = {"num_tokens": num_tokens, "num_prefix_tokens": self.num_prefix_tokens, "grid": self.grid}
        hidden = int(dim * spec.mlp_ratio)
        groups = math.ceil(spec.depth / spec.share_group)
        token_mixers = [create_token_mixer(spec.token_mixer, dim, dict(spec.mixer_options), context)
                        for _ in range(groups)]
        if spec.channel_mixer == NO_CHANNEL_MIXER:
            if spec.channel_options:
                raise ValueError(f"channel_mixer 'none' takes no channel_options, got {dict(spec.channel_options)}")
            channel_mixers = [None] * groups
        else:
            channel_mixers = [create_channel_mixer(spec.channel_mixer, dim, hidden_dim=hidden,
                                                   options=dict(spec.channel_options)) for _ in range(groups)]
        self.blocks = nn.ModuleList(
            Block(dim, token_mixer=token_mixers[i // spec.share_group],
                  channel_mixer=channel_mixers[i // spec.share_group], norm=spec.norm, layout=layout,
                  layer_scale=spec.layer_scale, drop_path=drop_path[i])
            for i in range(spec.depth))
        self.grad_checkpointing = False

    def embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Map in, stage input out: a channels_last map, or tokens with prefix and positions."""
        x = self.embed(x)
        B, _, H, W = x.shape
        if self.layout == "nchw":
            # channels_last on the CPU: oneDNN's pooling and 1x1 convolutions run natively on it,
            # with no reorder between layers; on a GPU cuDNN's kernels are the faster ones in NCHW,
            # so maps stay as they come there. Both are timed in the README's speed tables
            # (zoo_poolformer_s12 on the CPU; the H100 table and the note under it).
            if x.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            return x, (H, W)
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)  # (B, prefix + H*W, C)
        if self.pos_embed is not None:
            if (H, W) != self.grid:
                raise ValueError(f"this model's position embedding is built for a {self.grid[0]}x{self.grid[1]} "
                                 f"token grid, the input gives {H}x{W}: create the model with the img_size "
                                 "you feed it (its position embedding is then interpolated)")
            x = x + self.pos_embed
        return x, (H, W)

    def to_map(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Stage output as an NCHW map of the patch tokens (prefix tokens dropped)."""
        if self.layout == "nchw":
            return x
        x = x[:, self.num_prefix_tokens:]
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
    return [r for s, f in zip(spec.stages, spec.drop_path_stages, strict=True) for r in ramp(spec.drop_path_rate * f, s.depth)]


class ZooModel(nn.Module):
    """Every zoo model: stages from a ``ModelSpec``, a norm and a classifier head.

    Speaks timm's interface (``forward_features``, ``forward_head``, ``forward_intermediates``,
    ``reset_classifier``, ``feature_info``, ``pretrained_cfg``, ...). Feature taps are the stages of a
    hierarchical model and the blocks of an isotropic (single-stage) one, as in timm.
    """

    def __init__(self, spec: ModelSpec, *, name: str = "zoo_model"):
        super().__init__()
        self.spec, self.name = spec, name
        self.num_classes = spec.num_classes
        self.in_chans = spec.in_chans
        self.global_pool = spec.global_pool
        self.distilled_training = False
        last = spec.stages[-1]
        if spec.global_pool == "token" and not last.class_token:
            raise ValueError(f"{name}: global_pool='token' needs a class token in the last stage")
        if spec.distilled and not last.dist_token:
            raise ValueError(f"{name}: distilled=True needs a distillation token in the last stage")

        rates = drop_path_rates(spec)
        stages, feature_info = [], []
        in_dim, size, reduction, start = spec.in_chans, spec.img_size, 1, 0
        for i, s in enumerate(spec.stages):
            try:
                stage = Stage(s, in_dim, in_size=size, drop_path=rates[start:start + s.depth])
            except (ValueError, TypeError, KeyError) as e:
                prefixed = _prefixed(e, f"{name}: stages[{i}]: ")
                if prefixed is e:
                    raise
                raise prefixed from None
            stages.append(stage)
            reduction *= s.embed.stride
            size, in_dim, start = stage.grid[0], s.dim, start + s.depth
            if len(spec.stages) > 1:
                feature_info.append({"num_chs": s.dim, "reduction": reduction, "module": f"stages.{i}"})
        if len(spec.stages) == 1:
            feature_info = [{"num_chs": last.dim, "reduction": reduction, "module": f"stages.0.blocks.{j}"}
                            for j in range(last.depth)]
        self.stages = nn.ModuleList(stages)
        self.feature_info = feature_info
        self.num_features = self.head_hidden_size = last.dim
        self.min_input_size = self._min_input_size()

        final_layout = self.stages[-1].layout if spec.head_norm_on == "map" else "nlc"
        self.norm = create_norm(spec.head_norm, last.dim, final_layout)
        self._norm_stage: int | None = len(spec.stages) - 1  # the stage self.norm applies to; None: pruned
        self.head_drop = nn.Dropout(spec.drop_rate)
        self.head = nn.Linear(last.dim, spec.num_classes) if spec.num_classes > 0 else nn.Identity()
        self.head_dist = None
        if spec.distilled:
            self.head_dist = nn.Linear(last.dim, spec.num_classes) if spec.num_classes > 0 else nn.Identity()
        self.pretrained_cfg = {
            "architecture": name, "input_size": (spec.in_chans, spec.img_size, spec.img_size),
            "num_classes": spec.num_classes, "mean": spec.mean, "std": spec.std, "crop_pct": spec.crop_pct,
            "interpolation": spec.interpolation, "first_conv": "stages.0.embed.proj",
            "classifier": ("head", "head_dist") if spec.distilled else "head", "paper": spec.paper}
        if any(st.pos_embed is not None or "num_tokens" in getattr(st.blocks[0].token_mixer, "stage_context", ())
               for st in self.stages):
            # built for one input size (a position embedding, or per-token weights): timm's flag for it
            self.pretrained_cfg["fixed_input_size"] = True
        self.default_cfg = self.pretrained_cfg
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
            for t in (stage.cls_token, stage.dist_token, stage.pos_embed):
                if t is not None:
                    trunc_normal_init_(t)
        self._has_moe = bool(moe_modules(self))

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
        if x.ndim != 4:
            raise ValueError(f"{self.name} expects a 4-d batch (B, {self.in_chans}, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"{self.name} expects {self.in_chans} input channels, got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)}); create it with in_chans={x.shape[1]}")
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f"{self.name} needs images of at least {self.min_input_size}x{self.min_input_size}, "
                             f"got {x.shape[-2]}x{x.shape[-1]}")

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
    def get_classifier(self) -> nn.Module | tuple[nn.Module, nn.Module]:
        return self.head if self.head_dist is None else (self.head, self.head_dist)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head of ``num_classes`` outputs (0: none, the model returns pooled features).

        ``global_pool``: ``"avg"`` or ``"token"`` changes the pooling; ``None`` or ``""`` keeps
        the current one (timm passes ``""`` for "no pooling change" in ``reset_classifier(0, "")``).
        """
        if global_pool:
            if global_pool not in ("avg", "token"):
                raise ValueError(f"global_pool must be 'avg' or 'token', got {global_pool!r}")
            if global_pool == "token" and self.stages[-1].num_prefix_tokens == 0:
                raise ValueError(f"{self.name} has no class token to pool")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if self.head_dist is not None:
            self.head_dist = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for head in (self.head, self.head_dist):
            if isinstance(head, nn.Linear):
                _init_weights(head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage's output: tokens (B, N, C) or a map (B, C, H, W); normed when the norm
        sits on the map."""
        self._check_input(x)
        self._reset_aux_loss()
        x, _ = self._run_stages(x)
        return self.norm(x) if self.spec.head_norm_on == "map" else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        stage = self.stages[-1]
        if self.head_dist is not None:  # DeiT: class token -> head, distillation token -> head_dist
            x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
            if pre_logits:
                return (x + x_dist) / 2
            x, x_dist = self.head(x), self.head_dist(x_dist)
            if self.distilled_training and self.training and not torch.jit.is_scripting():
                return x, x_dist
            return (x + x_dist) / 2
        if stage.layout == "nchw":
            x = x.mean((2, 3))  # (B, C, H, W) -> (B, C)
        elif self.global_pool == "token":
            x = x[:, 0]
        else:
            x = x[:, stage.num_prefix_tokens:].mean(1)  # (B, N, C) -> (B, C), patch tokens only
        if self.spec.head_norm_on == "pooled":
            x = self.norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _taps(self) -> list[tuple[int, int]]:
        """(stage, last block) of every feature tap, in feature_info order."""
        if len(self.spec.stages) == 1:
            return [(0, j) for j in range(len(self.stages[0].blocks))]
        return [(i, len(s.blocks) - 1) for i, s in enumerate(self.stages)]

    def _run_stages(self, x: torch.Tensor, taps: Container[tuple[int, int]] = (), *, norm_taps: bool = False,
                    stop: tuple[int, int | None] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The stage walk: each stage embeds the previous one's output (as an NCHW map) and runs its
        blocks. Returns the last block's output and, at each (stage, block) of ``taps``, that block's
        output as a map (through the final norm where ``norm_taps`` and the norm's stage). ``stop``:
        the (stage, block) to end at, ``block`` None for the whole stage; None runs everything."""
        last_stage, last_block = (len(self.stages) - 1, None) if stop is None else stop
        intermediates = []
        grid = self.stages[0].grid  # each stage's output grid, set by the loop before it is read
        for i, stage in enumerate(self.stages[:last_stage + 1]):
            if i:
                x = self.stages[i - 1].to_map(x, grid)
            x, grid = stage.embed_tokens(x)
            blocks = stage.blocks if i < last_stage or last_block is None else stage.blocks[:last_block + 1]
            for j, block in enumerate(blocks):
                x = stage.run_blocks(x, grid, [block])
                if (i, j) in taps:
                    y = self.norm(x) if norm_taps and i == self._norm_stage else x
                    intermediates.append(stage.to_map(y, grid))
        return x, intermediates

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's feature API: maps (B, C, H, W) at the taps selected by ``indices``."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
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
        x, intermediates = self._run_stages(x, wanted, norm_taps=norm and map_norm, stop=(last_stage, last_block))
        if intermediates_only:
            return intermediates
        if map_norm and last_stage == self._norm_stage:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages/blocks after the last wanted tap (timm's features_only uses this)."""
        taps = self._taps()
        take, max_index = feature_take_indices(len(taps), indices)
        stage_idx, block_idx = taps[max_index]
        self.stages = self.stages[:stage_idx + 1]
        self.stages[-1].blocks = self.stages[-1].blocks[:block_idx + 1]
        self.num_features = self.head_hidden_size = self.stages[-1].spec.dim
        if self._norm_stage is not None and stage_idx < self._norm_stage:
            # the final norm belongs to a removed stage (another width): nothing is left for it to norm
            prune_norm = True
        if prune_norm:
            self.norm = nn.Identity()
            self._norm_stage = None
        if prune_head:
            self.head_dist = None
            self.reset_classifier(0)
        return take


def _prefixed(error: Exception, prefix: str) -> Exception:
    """``error`` again, same type, its message prefixed (to say which model and stage failed)."""
    message = str(error)
    try:
        new = type(error)(prefix + message)
    except Exception:  # noqa: BLE001 - an exception type with another constructor: keep it as is
        return error
    return new


def _init_weights(m: nn.Module) -> None:
    """timm's ViT / PoolFormer init (``zoo.layers.init``) of every linear and convolution."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        trunc_normal_init_(m.weight, m.bias)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """Interpolate a (1, prefix + H*W, C) position embedding to another grid (bicubic, as timm)."""
    return resample_abs_pos_embed(pos_embed, list(new_grid), num_prefix_tokens=num_prefix_tokens)


__all__ = ["Block", "LayerScale", "Stage", "ZooModel", "resize_pos_embed"]
