"""Specs: a model is data. Frozen dataclasses, one per stage, that the one backbone assembles.

A family file (poolformer.py, vit.py, ...) is a handful of these specs and one-line registered
entry points; swapping any component for an ablation is ``dataclasses.replace`` on a spec, or a
``key=value`` override through ``zoo.create_model`` / a YAML config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..layers.embed import EMBED_INITS, embed_out_size
from ..names import suggest

# Values the string-choice fields of ModelSpec accept.
# timm's ViT pools, less "map" (an attention-pooling head zoo models do not have); "" = no pooling; "seqpool": CCT's
# sequence pooling (learned attention weights over the tokens, https://arxiv.org/abs/2104.05704)
GLOBAL_POOLS = ("avg", "token", "max", "avgmax", "", "seqpool")
HEAD_NORM_PLACES = ("map", "pooled")
# Position embeddings: none, learned, or CCT's fixed sinusoidal table (a buffer, not a parameter)
POS_EMBEDS = ("none", "learned", "sine")
# Where a block's second norm sits: before the channel mixer (pre-norm), or on the residual stream
# itself after the token mixer's branch, the channel mixer then taking it unnormed (CCT's
# TransformerEncoderLayer: x = norm(x + attn(pre_norm(x))); x = x + mlp(x))
CHANNEL_NORMS = ("pre", "residual")


def _check_int(owner: str, field_name: str, value: Any, minimum: int) -> None:
    """``value`` must be an int (not a bool) of at least ``minimum``; else a one-line ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{field_name}={value!r}: expected an int >= {minimum}")


def _check_float(
    owner: str, field_name: str, value: Any, low: float, high: float | None, *, low_open: bool = False
) -> None:
    """``value`` must be a real number in [low, high) (or (low, ...) when ``low_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        lo = f"> {low}" if low_open else f">= {low}"
        span = f"a number {lo}" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"{owner}.{field_name}={value!r}: expected {span}")


@dataclass(frozen=True)
class EmbedSpec:
    """The convolution(s) that open a stage: stem, downsampling, patch embedding, or CCT's
    convolutional tokenizer (``layers`` x conv, activation, max-pool; https://arxiv.org/abs/2104.05704)."""

    kernel: int
    stride: int
    padding: int = 0
    norm: str = "identity"  # norm after the convolution(s) (CvT: layernorm; MetaFormer-v2's stem)
    # norm of the incoming map before the convolution (MetaFormer-v2's downsampling: layernorm_nobias)
    pre_norm: str = "identity"
    bias: bool = True  # convolution biases (CCT's tokenizer has none)
    layers: int = 1  # convolutions in a row, each followed by act and max-pool (CCT: 1 or 2)
    hidden_dim: int | None = None  # width of every convolution but the last (CCT: 64); only with layers > 1
    act: str | None = None  # activation after each convolution (CCT: "relu"); None: none
    pool_kernel: int = 0  # max-pool after each activation (CCT: 3, stride 2, padding 1); 0: none
    pool_stride: int = 1
    pool_padding: int = 0
    # init of the convolutions: the backbone's truncated normal, or "kaiming_normal" (CCT's tokenizer)
    init: str = "trunc_normal"

    def __post_init__(self) -> None:
        _check_int("EmbedSpec", "kernel", self.kernel, 1)
        _check_int("EmbedSpec", "stride", self.stride, 1)
        _check_int("EmbedSpec", "padding", self.padding, 0)
        _check_int("EmbedSpec", "layers", self.layers, 1)
        if not isinstance(self.bias, bool):
            raise ValueError(f"EmbedSpec.bias={self.bias!r}: expected True or False")
        if self.layers > 1:
            _check_int("EmbedSpec", "hidden_dim", self.hidden_dim, 1)
        elif self.hidden_dim is not None:
            raise ValueError(
                f"EmbedSpec.hidden_dim={self.hidden_dim!r}: only a tokenizer of layers > 1 has hidden widths"
            )
        if self.act is not None and not (isinstance(self.act, str) and self.act):
            raise ValueError(f"EmbedSpec.act={self.act!r}: expected an activation name or None")
        _check_int("EmbedSpec", "pool_kernel", self.pool_kernel, 0)
        if self.pool_kernel:
            _check_int("EmbedSpec", "pool_stride", self.pool_stride, 1)
            _check_int("EmbedSpec", "pool_padding", self.pool_padding, 0)
            if self.pool_padding > self.pool_kernel // 2:  # torch's MaxPool2d refuses more
                raise ValueError(
                    f"EmbedSpec.pool_padding={self.pool_padding!r}: expected at most half of "
                    f"pool_kernel={self.pool_kernel}"
                )
        elif (self.pool_stride, self.pool_padding) != (1, 0):
            raise ValueError(
                f"EmbedSpec.pool_stride={self.pool_stride!r}, pool_padding={self.pool_padding!r}: "
                "given without a pool_kernel (0: no max-pool)"
            )
        if self.init not in EMBED_INITS:
            raise ValueError(f"EmbedSpec.init={self.init!r}: expected one of {list(EMBED_INITS)}")

    def out_size(self, size: int) -> int:
        """Side of the map this embedding makes of ``size`` pixels (< 1: no position left)."""
        return embed_out_size(
            size,
            kernel=self.kernel,
            stride=self.stride,
            padding=self.padding,
            layers=self.layers,
            pool_kernel=self.pool_kernel,
            pool_stride=self.pool_stride,
            pool_padding=self.pool_padding,
        )

    @property
    def reduction(self) -> int:
        """Total stride: the factor by which the map shrinks (timm's feature_info reduction)."""
        return (self.stride * (self.pool_stride if self.pool_kernel else 1)) ** self.layers

    def describe(self) -> str:
        """``7x7/4`` for one convolution; CCT's tokenizer as ``3x3/1 conv + 3x3/2 max-pool, x2``."""
        text = f"{self.kernel}x{self.kernel}/{self.stride} conv"
        if self.pool_kernel:
            text += f" + {self.pool_kernel}x{self.pool_kernel}/{self.pool_stride} max-pool"
        return text + (f", x{self.layers}" if self.layers > 1 else "")


@dataclass(frozen=True)
class StageSpec:
    """One stage: an embedding, then ``depth`` blocks of (token mixer, channel mixer)."""

    depth: int
    dim: int
    embed: EmbedSpec
    token_mixer: str = "attention"
    mixer_options: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"num_heads": 6}
    channel_mixer: str = "mlp"  # a name in zoo.layers.CHANNEL_MIXERS, or "none": no second branch (gMLP)
    mlp_ratio: float = 4.0
    mlp_bias: bool = True  # biases in the channel mixer's linears (MetaFormer-v2: none)
    channel_options: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"num_experts": 4}
    norm: str = "layernorm"
    layer_scale: float | None = None  # init of per-channel scales of each branch; None = no layer scale
    # init of per-channel scales of the residual path itself (ResScale, MetaFormer-v2's last two
    # stages: x = res_scale * x + branch); None = the plain residual
    res_scale: float | None = None
    class_token: bool = False  # prepend a learned class token at this stage
    dist_token: bool = False  # and a distillation token after it (DeiT)
    # Absolute position embedding over the tokens (covering the prefix tokens too): False / "none";
    # True / "learned" (ViT); "sine" (CCT's fixed sinusoidal table over the token index, a buffer).
    # Stored as False, True or "sine", so that ``if stage.pos_embed`` asks whether there is one.
    pos_embed: bool | str = False
    # Inits (truncated normal, cut at +-2) of the learned position embedding and the class token: the
    # backbone's std .02 (timm's ViT); CCT's official code draws its positions at std .2 and leaves
    # its class token at zero (std 0: zeros).
    pos_embed_std: float = 0.02
    cls_token_std: float = 0.02
    channel_norm: str = "pre"  # one of CHANNEL_NORMS: "pre" (pre-norm), "residual" (CCT)
    # Blocks per weight-sharing group (ALBERT, WideNet): consecutive blocks of a group reuse one
    # token mixer and one channel mixer and keep their own norms. 1 = no sharing; depth = all share.
    share_group: int = 1

    def __post_init__(self) -> None:
        _check_int("StageSpec", "depth", self.depth, 1)
        _check_int("StageSpec", "dim", self.dim, 1)
        _check_int("StageSpec", "share_group", self.share_group, 1)
        _check_float("StageSpec", "mlp_ratio", self.mlp_ratio, 0.0, None, low_open=True)
        _check_float("StageSpec", "pos_embed_std", self.pos_embed_std, 0.0, None)
        _check_float("StageSpec", "cls_token_std", self.cls_token_std, 0.0, None)
        if not isinstance(self.mlp_bias, bool):
            raise ValueError(f"StageSpec.mlp_bias={self.mlp_bias!r}: expected True or False")
        if not isinstance(self.embed, EmbedSpec):
            raise ValueError(f"StageSpec.embed={self.embed!r}: expected an EmbedSpec")
        if isinstance(self.pos_embed, str) and self.pos_embed in POS_EMBEDS:
            # frozen: the one normalisation of a field, so that equal specs compare equal
            object.__setattr__(self, "pos_embed", {"none": False, "learned": True, "sine": "sine"}[self.pos_embed])
        elif not isinstance(self.pos_embed, bool):
            raise ValueError(f"StageSpec.pos_embed={self.pos_embed!r}: expected one of {list(POS_EMBEDS)} or a bool")
        if self.channel_norm not in CHANNEL_NORMS:
            raise ValueError(f"StageSpec.channel_norm={self.channel_norm!r}: expected one of {list(CHANNEL_NORMS)}")
        if self.channel_norm == "residual" and self.channel_mixer == NO_CHANNEL_MIXER:
            raise ValueError(
                "StageSpec.channel_norm='residual' needs a channel mixer (channel_mixer='none' has no second norm)"
            )

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.dist_token)


@dataclass(frozen=True)
class ModelSpec:
    """A whole model: stages, classifier head and the defaults a user may override."""

    stages: tuple[StageSpec, ...]
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: Literal["avg", "token", "max", "avgmax", "", "seqpool"] = "avg"
    head_norm: str = "layernorm"
    # Where the final norm sits: on the feature map / all tokens before pooling (official PoolFormer,
    # ViT, DeiT), or on the pooled vector (timm's MetaFormer port of PoolFormer).
    head_norm_on: Literal["map", "pooled"] = "map"
    # None: a linear classifier. A number r: MetaFormer-v2's MLP head (ConvFormer, CAFormer): fc1 to
    # r x num_features, squared ReLU, the norm named by head_mlp_norm, dropout (drop_rate), fc2.
    head_mlp_ratio: float | None = None
    head_mlp_norm: str = "layernorm_eps1e-5"  # the official nn.LayerNorm; timm's port: "layernorm" (eps 1e-6)
    distilled: bool = False  # DeiT: a second head on the distillation token
    # forward_features (and forward_intermediates' final output) as a (B, C, H, W) map even where the
    # last stage runs on tokens, as timm's CAFormer returns; needs a last stage without prefix tokens
    # and the final norm on the pooled vector
    features_as_map: bool = False
    # timm's ViT flag: interpolate the position embedding to each input's token grid (any img_size)
    dynamic_img_size: bool = False
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth, linear from 0 over all blocks (timm, DeiT, PoolFormer)
    # Or one ramp per stage, from 0 to drop_path_rate x this stage's factor over its own blocks: the
    # official CvT's schedule (DROP_PATH_RATE [0, 0, rate], lib/models/cls_cvt.py), factors (0, 0, 1).
    drop_path_stages: tuple[float, ...] | None = None
    # Preprocessing the model was defined with (timm's pretrained_cfg fields).
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    paper: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.stages, tuple) or not self.stages:
            raise ValueError(f"ModelSpec.stages={self.stages!r}: expected a non-empty tuple of StageSpec")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, StageSpec):
                raise ValueError(f"ModelSpec.stages[{i}]={stage!r}: expected a StageSpec")
        _check_int("ModelSpec", "num_classes", self.num_classes, 0)
        _check_int("ModelSpec", "in_chans", self.in_chans, 1)
        _check_int("ModelSpec", "img_size", self.img_size, 1)
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"ModelSpec.global_pool={self.global_pool!r}: expected one of {list(GLOBAL_POOLS)}")
        last = self.stages[-1]
        if self.global_pool == "seqpool" and last.num_prefix_tokens:
            raise ValueError(
                "ModelSpec.global_pool='seqpool' pools all tokens with learned weights, but the last stage has a "
                "class/distillation token: use one or the other (CCT: seqpool, no class token; ViT-Lite: 'token')"
            )
        if self.features_as_map and (last.num_prefix_tokens or self.head_norm_on != "pooled"):
            raise ValueError(
                "ModelSpec.features_as_map=True needs a last stage without class/distillation tokens and "
                f"head_norm_on='pooled', got {last.num_prefix_tokens} prefix token(s), "
                f"head_norm_on={self.head_norm_on!r}"
            )
        _check_tokens_left(self)
        if self.head_norm_on not in HEAD_NORM_PLACES:
            raise ValueError(f"ModelSpec.head_norm_on={self.head_norm_on!r}: expected one of {list(HEAD_NORM_PLACES)}")
        _check_float("ModelSpec", "drop_rate", self.drop_rate, 0.0, 1.0)
        if self.head_mlp_ratio is not None:
            _check_float("ModelSpec", "head_mlp_ratio", self.head_mlp_ratio, 0.0, None, low_open=True)
        _check_float("ModelSpec", "drop_path_rate", self.drop_path_rate, 0.0, 1.0)
        if self.drop_path_stages is not None:
            if not isinstance(self.drop_path_stages, tuple) or len(self.drop_path_stages) != len(self.stages):
                raise ValueError(
                    f"ModelSpec.drop_path_stages={self.drop_path_stages!r}: expected a tuple of "
                    f"{len(self.stages)} factors, one per stage, or None"
                )
            for i, factor in enumerate(self.drop_path_stages):
                _check_float("ModelSpec", f"drop_path_stages[{i}]", factor, 0.0, None)
                _check_float(
                    "ModelSpec", f"drop_path_stages[{i}] x drop_path_rate", factor * self.drop_path_rate, 0.0, 1.0
                )


def _check_tokens_left(spec: ModelSpec) -> None:
    """Every stage's embedding must leave at least one position of ``img_size`` pixels: a one-line
    error naming the stage, its embedding and the smallest size it takes, before anything is built."""
    size = spec.img_size
    for i, stage in enumerate(spec.stages):
        out = stage.embed.out_size(size)
        if out < 1:
            smallest = next(n for n in range(1, 1 << 16) if _side_after(spec.stages, n) >= 1)
            raise ValueError(
                f"ModelSpec.img_size={spec.img_size}: stages[{i}].embed ({stage.embed.describe()}) leaves no "
                f"tokens of its {size}x{size} input; this model needs img_size >= {smallest}"
            )
        size = out


def _side_after(stages: tuple[StageSpec, ...], size: int) -> int:
    for stage in stages:
        size = stage.embed.out_size(size)
        if size < 1:
            return size
    return size


# channel_mixer value for blocks that are one residual branch (gMLP: the token mixer is the whole unit).
NO_CHANNEL_MIXER = "none"

# Stage fields that an override applies to every stage at once (e.g. token_mixer="attention").
STAGE_WIDE_FIELDS = tuple(f.name for f in dataclasses.fields(StageSpec) if f.name not in ("depth", "dim", "embed"))
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelSpec))


def apply_overrides(spec: ModelSpec, overrides: Mapping[str, Any], *, model_name: str) -> ModelSpec:
    """Return ``spec`` with ``overrides`` applied; an unknown key is an error naming the nearest.

    Model fields replace the model's value; stage fields (``token_mixer``, ``channel_mixer``,
    ``mlp_ratio``, ``norm``, ...) replace that field in every stage. Swapping a mixer without new
    options drops the old mixer's options (``pool_size`` means nothing to attention).
    """
    valid = set(MODEL_FIELDS) | set(STAGE_WIDE_FIELDS)
    for key in overrides:
        if key not in valid:
            raise TypeError(
                f"{model_name}: unknown model argument {key!r}{suggest(key, valid)}; valid: {sorted(valid)}"
            )
    model_kw = {k: v for k, v in overrides.items() if k in MODEL_FIELDS}
    stage_kw = {k: v for k, v in overrides.items() if k in STAGE_WIDE_FIELDS}
    if "token_mixer" in stage_kw:
        stage_kw.setdefault("mixer_options", {})
    if "channel_mixer" in stage_kw:
        stage_kw.setdefault("channel_options", {})
    if isinstance(model_kw.get("drop_path_stages"), list):  # from a YAML config
        model_kw["drop_path_stages"] = tuple(model_kw["drop_path_stages"])
    if "stages" in model_kw:
        model_kw["stages"] = tuple(
            s if isinstance(s, StageSpec) else stage_from_dict(s, where=f"stages[{i}]")
            for i, s in enumerate(model_kw["stages"])
        )
    try:
        spec = dataclasses.replace(spec, **model_kw)
    except ValueError as e:
        raise ValueError(f"{model_name}: {e}") from None
    if stage_kw:
        stages = []
        for i, s in enumerate(spec.stages):
            try:
                stages.append(dataclasses.replace(s, **stage_kw))
            except ValueError as e:
                raise ValueError(f"{model_name}: stages[{i}]: {e}") from None
        spec = dataclasses.replace(spec, stages=tuple(stages))
    return spec


def _strict_kwargs(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise TypeError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise TypeError(
                f"{where}: unknown {cls.__name__} field {key!r}" + (suggest(key, names) or f"; valid: {names}")
            )
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data
    ]
    if missing:
        raise TypeError(f"{where}: {cls.__name__} needs {', '.join(missing)}")
    return dict(data)


def stage_from_dict(data: Mapping[str, Any], *, where: str = "stage") -> StageSpec:
    """A ``StageSpec`` from plain YAML data; unknown or missing fields are errors naming them."""
    kw = _strict_kwargs(StageSpec, data, where)
    embed = kw["embed"]
    try:
        kw["embed"] = (
            embed if isinstance(embed, EmbedSpec) else EmbedSpec(**_strict_kwargs(EmbedSpec, embed, f"{where}.embed"))
        )
        return StageSpec(**kw)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
