"""MetaFormer baselines: Yu et al., "MetaFormer Baselines for Vision", TPAMI 2023.
https://arxiv.org/abs/2210.13452 — official code: https://github.com/sail-sg/metaformer
(``metaformer_baselines.py``)

Five families on one MetaFormer-v2 skeleton, which differs from PoolFormer (v1) in:

- a norm in every downsampling: after the 7x7/4 stem convolution, and before each 3x3/2
  downsampling convolution (a channel LayerNorm without bias, eps 1e-6);
- bias-free norms in the blocks: a channel LayerNorm (ConvFormer, CAFormer) or a one-group
  GroupNorm (IdentityFormer, RandFormer, PoolFormerV2), a scale and no shift, eps 1e-6;
- no layer scale; instead ResScale in the last two stages (``x = res_scale * x + branch``,
  scales starting at 1), plain residuals in the first two;
- channel MLPs of ratio 4 without biases, with StarReLU (``s * relu(x) ** 2 + b``);
- the final LayerNorm (with bias, eps 1e-6) on the pooled vector, then a linear classifier, or for
  ConvFormer and CAFormer an MLP head (fc1 to 4x, squared ReLU, LayerNorm, fc2).

Token mixers per stage: IdentityFormer ``identity``; RandFormer ``identity`` twice then
``random_mixing`` (a frozen random token-mixing matrix, built for 224x224 input: 196 and 49
tokens); PoolFormerV2 ``pooling``; ConvFormer ``sepconv``; CAFormer ``sepconv`` twice then
``attention`` (heads of 32 channels, no biases).

Features: ``forward_features`` and ``forward_intermediates`` return maps (B, C, H, W) for every
family, CAFormer's token stages included, as timm's ``MetaFormer`` does (``features_as_map``).

Checkpoints: timm's ports of PoolFormerV2, ConvFormer and CAFormer (``stem.conv``,
``stages.i.downsample``, ``head.fc``) and the official layout (``downsample_layers``,
``stages.i.j``) load with ``zoo.create_model(name, pretrained=<file>)``. timm's MLP head normalises
with eps 1e-6 where the official code uses torch's default 1e-5: ``TIMM_HEAD`` builds timm's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .pretrained import Layout, exact_logits_hint, register_layout
from .registry import register
from .specs import EmbedSpec, ModelSpec, StageSpec

PAPER = "MetaFormer Baselines for Vision, https://arxiv.org/abs/2210.13452"

NORM = "layernorm_nobias"  # the official LayerNormGeneral(bias=False, eps=1e-6) over channels
STEM = EmbedSpec(7, 4, 2, norm=NORM)
DOWNSAMPLE = EmbedSpec(3, 2, 1, pre_norm=NORM)
RES_SCALES = (None, None, 1.0, 1.0)  # the official res_scale_init_values
# CAFormer's attention: heads of 32 channels (num_heads = dim // 32), no biases in qkv or proj
ATTENTION = {"head_dim": 32, "qkv_bias": False, "proj_bias": False}
# The override that makes a ConvFormer / CAFormer compute timm's function (its MLP head's LayerNorm
# has eps 1e-6; the official one has torch's default 1e-5).
TIMM_HEAD = {"head_mlp_norm": "layernorm"}


@dataclass(frozen=True)
class Family:
    """What a MetaFormer-v2 family fixes: each stage's token mixer (and its options), the block norm
    and the head."""

    mixers: tuple[str, str, str, str]
    norm: str
    mlp_head: bool
    mixer_options: tuple[Mapping[str, Any], ...] = field(default=({}, {}, {}, {}))


IDENTITYFORMER = Family(("identity",) * 4, "groupnorm1_nobias", mlp_head=False)
RANDFORMER = Family(("identity", "identity", "random_mixing", "random_mixing"), "groupnorm1_nobias", mlp_head=False)
POOLFORMERV2 = Family(("pooling",) * 4, "groupnorm1_nobias", mlp_head=False, mixer_options=({"pool_size": 3},) * 4)
CONVFORMER = Family(("sepconv",) * 4, NORM, mlp_head=True)
CAFORMER = Family(
    ("sepconv", "sepconv", "attention", "attention"), NORM, mlp_head=True, mixer_options=({}, {}, ATTENTION, ATTENTION)
)


def metaformer_v2(
    family: Family,
    depths: tuple[int, int, int, int],
    dims: tuple[int, int, int, int],
    *,
    stem: EmbedSpec = STEM,
    img_size: int = 224,
) -> ModelSpec:
    """The spec of one MetaFormer-v2 model: ``family``'s mixers, norm and head at the given depths
    and widths, with the skeleton every family shares (see the module docstring)."""
    stages = tuple(
        StageSpec(
            depth=depth,
            dim=dim,
            embed=stem if i == 0 else DOWNSAMPLE,
            token_mixer=family.mixers[i],
            mixer_options=dict(family.mixer_options[i]),
            channel_mixer="mlp",
            mlp_ratio=4.0,
            mlp_bias=False,
            channel_options={"act": "star_relu"},
            norm=family.norm,
            layer_scale=None,
            res_scale=RES_SCALES[i],
        )
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True))
    )
    return ModelSpec(
        stages=stages,
        img_size=img_size,
        global_pool="avg",
        head_norm="layernorm",  # the official output_norm: nn.LayerNorm(eps=1e-6), with bias
        head_norm_on="pooled",
        head_mlp_ratio=4.0 if family.mlp_head else None,
        crop_pct=1.0,  # the official and timm's eval crop for every MetaFormer-v2 model
        # features as maps (B, C, H, W), as timm's MetaFormer returns them: CAFormer's attention stages
        # run on tokens here, and forward_features / forward_intermediates give them back as maps
        features_as_map=True,
        paper=PAPER,
    )


# Sizes, as the official model definitions: S12-M48 have PoolFormer's depths and widths, S18-B36
# ConvFormer's and CAFormer's.
S12, S24, S36, M36, M48 = (2, 2, 6, 2), (4, 4, 12, 4), (6, 6, 18, 6), (6, 6, 18, 6), (8, 8, 24, 8)
S18, X36 = (3, 3, 9, 3), (3, 12, 18, 3)
S_DIMS, M_DIMS = (64, 128, 320, 512), (96, 192, 384, 768)
CONV_M_DIMS, CONV_B_DIMS = (96, 192, 384, 576), (128, 256, 512, 768)
# 32x32 inputs (MNIST-5k, CIFAR): zoo_poolformer_mini_32's depths, narrower so that the five minis
# fit weights/' 30 MB beside the others (0.7-0.9 M parameters at 10 classes), a 3x3/2 stem (with
# the v2 stem norm), so the four stages see 16, 8, 4 and 2 pixels (RandFormer mixes 16 and 4 tokens).
# ConvFormer's and CAFormer's mixers and MLP head weigh more, so their second and last stages are
# narrower still (CAFormer's attention: 3 and 4 heads of 32 channels).
MINI, MINI_DIMS, MINI_STEM = (1, 1, 3, 1), (32, 64, 96, 160), EmbedSpec(3, 2, 1, norm=NORM)
CONV_MINI_DIMS = (32, 48, 96, 128)

VARIANTS = {
    "zoo_identityformer_s12": metaformer_v2(IDENTITYFORMER, S12, S_DIMS),
    "zoo_identityformer_s24": metaformer_v2(IDENTITYFORMER, S24, S_DIMS),
    "zoo_identityformer_s36": metaformer_v2(IDENTITYFORMER, S36, S_DIMS),
    "zoo_identityformer_m36": metaformer_v2(IDENTITYFORMER, M36, M_DIMS),
    "zoo_identityformer_m48": metaformer_v2(IDENTITYFORMER, M48, M_DIMS),
    "zoo_identityformer_mini_32": metaformer_v2(IDENTITYFORMER, MINI, MINI_DIMS, stem=MINI_STEM, img_size=32),
    "zoo_randformer_s12": metaformer_v2(RANDFORMER, S12, S_DIMS),
    "zoo_randformer_s24": metaformer_v2(RANDFORMER, S24, S_DIMS),
    "zoo_randformer_s36": metaformer_v2(RANDFORMER, S36, S_DIMS),
    "zoo_randformer_m36": metaformer_v2(RANDFORMER, M36, M_DIMS),
    "zoo_randformer_m48": metaformer_v2(RANDFORMER, M48, M_DIMS),
    "zoo_randformer_mini_32": metaformer_v2(RANDFORMER, MINI, MINI_DIMS, stem=MINI_STEM, img_size=32),
    "zoo_poolformerv2_s12": metaformer_v2(POOLFORMERV2, S12, S_DIMS),
    "zoo_poolformerv2_s24": metaformer_v2(POOLFORMERV2, S24, S_DIMS),
    "zoo_poolformerv2_s36": metaformer_v2(POOLFORMERV2, S36, S_DIMS),
    "zoo_poolformerv2_m36": metaformer_v2(POOLFORMERV2, M36, M_DIMS),
    "zoo_poolformerv2_m48": metaformer_v2(POOLFORMERV2, M48, M_DIMS),
    "zoo_poolformerv2_mini_32": metaformer_v2(POOLFORMERV2, MINI, MINI_DIMS, stem=MINI_STEM, img_size=32),
    "zoo_convformer_s18": metaformer_v2(CONVFORMER, S18, S_DIMS),
    "zoo_convformer_s36": metaformer_v2(CONVFORMER, X36, S_DIMS),
    "zoo_convformer_m36": metaformer_v2(CONVFORMER, X36, CONV_M_DIMS),
    "zoo_convformer_b36": metaformer_v2(CONVFORMER, X36, CONV_B_DIMS),
    "zoo_convformer_mini_32": metaformer_v2(CONVFORMER, MINI, CONV_MINI_DIMS, stem=MINI_STEM, img_size=32),
    "zoo_caformer_s18": metaformer_v2(CAFORMER, S18, S_DIMS),
    "zoo_caformer_s36": metaformer_v2(CAFORMER, X36, S_DIMS),
    "zoo_caformer_m36": metaformer_v2(CAFORMER, X36, CONV_M_DIMS),
    "zoo_caformer_b36": metaformer_v2(CAFORMER, X36, CONV_B_DIMS),
    "zoo_caformer_mini_32": metaformer_v2(CAFORMER, MINI, CONV_MINI_DIMS, stem=MINI_STEM, img_size=32),
}
for _name, _spec in VARIANTS.items():
    register(_name, _spec, __name__)


def _timm_head_note(model) -> str | None:
    if model.spec.head_mlp_ratio is None or model.spec.head_mlp_norm == TIMM_HEAD["head_mlp_norm"]:
        return None
    return exact_logits_hint(
        "timm's ConvFormer/CAFormer MLP head normalises with eps 1e-6, this model with the official 1e-5", TIMM_HEAD
    )


# Checkpoint layouts. timm's port: stem.conv/.norm, stages.i.downsample.norm/.conv, head.norm, head.fc.
# PoolFormer (v1)'s timm layout (poolformer.py) has the same stem.conv / blocks.0.mlp keys but no
# stem norm; this layout registers first (zoo.models imports metaformer before poolformer) and
# claims only checkpoints with a stem norm, so v1 checkpoints still reach poolformer's.
register_layout(
    Layout(
        name="timm-metaformer-v2",
        detect=lambda sd: "stem.conv.weight" in sd and "stem.norm.weight" in sd,
        rules=(
            (r"^stem\.conv\.", "stages.0.embed.proj."),
            (r"^stem\.norm\.", "stages.0.embed.norm."),
            (r"^stages\.(\d+)\.downsample\.conv\.", r"stages.\1.embed.proj."),
            (r"^stages\.(\d+)\.downsample\.norm\.", r"stages.\1.embed_pre_norm."),
            (r"\.layer_scale(\d)\.scale$", r".ls\1.gamma"),
            (r"\.res_scale(\d)\.scale$", r".res_scale\1.gamma"),
            (r"\.mlp\.", ".channel_mixer."),
            (r"^head\.norm\.", "norm."),
            (r"^head\.fc\.", "head."),
        ),
        note=_timm_head_note,
    )
)
# The official sail-sg/metaformer layout: downsample_layers.i (conv, post_norm / pre_norm), then
# stages.i.j blocks (stages are plain Sequentials of blocks), norm, head.
register_layout(
    Layout(
        name="official-metaformer",
        detect=lambda sd: "downsample_layers.0.conv.weight" in sd,
        rules=(
            (r"^downsample_layers\.(\d+)\.conv\.", r"stages.\1.embed.proj."),
            (r"^downsample_layers\.(\d+)\.post_norm\.", r"stages.\1.embed.norm."),
            (r"^downsample_layers\.(\d+)\.pre_norm\.", r"stages.\1.embed_pre_norm."),
            (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
            (r"\.layer_scale(\d)\.scale$", r".ls\1.gamma"),
            (r"\.res_scale(\d)\.scale$", r".res_scale\1.gamma"),
            (r"\.mlp\.", ".channel_mixer."),
        ),
    )
)
