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

from ..names import suggest

# Values the string-choice fields of ModelSpec accept.
# timm's ViT pools, less "map" (an attention-pooling head zoo models do not have); "" = no pooling
GLOBAL_POOLS = ("avg", "token", "max", "avgmax", "")
HEAD_NORM_PLACES = ("map", "pooled")


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
    """The strided convolution that opens a stage (stem, downsampling or patch embedding)."""

    kernel: int
    stride: int
    padding: int = 0
    norm: str = "identity"  # norm after the convolution (CvT: layernorm; MetaFormer-v2's stem)
    # norm of the incoming map before the convolution (MetaFormer-v2's downsampling: layernorm_nobias)
    pre_norm: str = "identity"

    def __post_init__(self) -> None:
        _check_int("EmbedSpec", "kernel", self.kernel, 1)
        _check_int("EmbedSpec", "stride", self.stride, 1)
        _check_int("EmbedSpec", "padding", self.padding, 0)


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
    pos_embed: bool = False  # learned absolute position embedding (covers the prefix tokens too)
    # Blocks per weight-sharing group (ALBERT, WideNet): consecutive blocks of a group reuse one
    # token mixer and one channel mixer and keep their own norms. 1 = no sharing; depth = all share.
    share_group: int = 1

    def __post_init__(self) -> None:
        _check_int("StageSpec", "depth", self.depth, 1)
        _check_int("StageSpec", "dim", self.dim, 1)
        _check_int("StageSpec", "share_group", self.share_group, 1)
        _check_float("StageSpec", "mlp_ratio", self.mlp_ratio, 0.0, None, low_open=True)
        if not isinstance(self.mlp_bias, bool):
            raise ValueError(f"StageSpec.mlp_bias={self.mlp_bias!r}: expected True or False")
        if not isinstance(self.embed, EmbedSpec):
            raise ValueError(f"StageSpec.embed={self.embed!r}: expected an EmbedSpec")

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
    global_pool: Literal["avg", "token", "max", "avgmax", ""] = "avg"
    head_norm: str = "layernorm"
    # Where the final norm sits: on the feature map / all tokens before pooling (official PoolFormer,
    # ViT, DeiT), or on the pooled vector (timm's MetaFormer port of PoolFormer).
    head_norm_on: Literal["map", "pooled"] = "map"
    # None: a linear classifier. A number r: MetaFormer-v2's MLP head (ConvFormer, CAFormer): fc1 to
    # r x num_features, squared ReLU, the norm named by head_mlp_norm, dropout (drop_rate), fc2.
    head_mlp_ratio: float | None = None
    head_mlp_norm: str = "layernorm_eps1e-5"  # the official nn.LayerNorm; timm's port: "layernorm" (eps 1e-6)
    distilled: bool = False  # DeiT: a second head on the distillation token
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
