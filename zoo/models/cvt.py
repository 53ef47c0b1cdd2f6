"""CvT: Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021.
https://arxiv.org/abs/2103.15808 — official code: https://github.com/microsoft/CvT (lib/models/cls_cvt.py)

Built as the official code builds it, from the parts of the one backbone:

- each of the three stages opens with a convolutional token embedding (7x7/4 pad 2, then 3x3/2
  pad 1 twice; convolution with bias, then LayerNorm);
- token mixer ``conv_attention``: a 3x3 depthwise convolution without bias and BatchNorm for each
  of q, k, v (stride 1 for q, 2 for k and v), linear projections with bias, and -- as the
  official code -- logits scaled by ``dim ** -0.5`` rather than ``head_dim ** -0.5``;
- MLP of ratio 4 with QuickGELU (``x * sigmoid(1.702 x)``, the activation the official model
  factory passes), LayerNorm with torch's eps 1e-5 everywhere;
- no position embedding; a class token in the last stage only, which skips the convolutional
  projection and is what the final LayerNorm and the head see;
- stochastic depth in the last stage only, from 0 to ``drop_path_rate`` over its blocks (the
  official configs' DROP_PATH_RATE [0.0, 0.0, 0.1]).

Official checkpoints (``stage0.patch_embed.proj.weight``, ``stage2.cls_token``,
``stageN.blocks.i.attn.conv_proj_q.conv.weight``, ...) load with
``zoo.create_model(name, pretrained=<file>)``.
"""

from __future__ import annotations

from .pretrained import Layout, register_layout
from .registry import register
from .specs import EmbedSpec, ModelSpec, StageSpec

PAPER = "CvT, https://arxiv.org/abs/2103.15808"
NORM = "layernorm_eps1e-5"  # torch's default LayerNorm eps, as the official code

# The official model factory (get_cls_model) builds every CvT with QuickGELU: zoo.layers.mlp's
# "quick_gelu" activation ({"act": "quick_gelu"} in a channel mixer's options).
OFFICIAL_EMBEDS = (EmbedSpec(7, 4, 2, norm=NORM), EmbedSpec(3, 2, 1, norm=NORM), EmbedSpec(3, 2, 1, norm=NORM))


def cvt(
    depths: tuple[int, ...],
    dims: tuple[int, ...],
    heads: tuple[int, ...],
    *,
    embeds: tuple[EmbedSpec, ...] = OFFICIAL_EMBEDS,
    img_size: int = 224,
    crop_pct: float = 0.875,
) -> ModelSpec:
    last = len(depths) - 1
    stages = tuple(
        StageSpec(
            depth=d,
            dim=c,
            embed=e,
            token_mixer="conv_attention",
            mixer_options={
                "num_heads": h,
                "groups": "depthwise",
                "kernel": 3,
                "stride_q": 1,
                "stride_kv": 2,
                "qkv_bias": True,
                "scale": "dim",
            },
            channel_mixer="mlp",
            mlp_ratio=4.0,
            channel_options={"act": "quick_gelu"},
            norm=NORM,
            class_token=i == last,
        )
        for i, (d, c, h, e) in enumerate(zip(depths, dims, heads, embeds, strict=True))
    )
    # Stochastic depth in the last stage only, ramping over its blocks (official DROP_PATH_RATE [0, 0, rate]).
    drop_path_stages = (0.0,) * last + (1.0,)
    return ModelSpec(
        stages=stages,
        img_size=img_size,
        global_pool="token",
        head_norm=NORM,
        head_norm_on="map",
        drop_path_stages=drop_path_stages,
        crop_pct=crop_pct,
        paper=PAPER,
    )


VARIANTS = {
    "zoo_cvt_13": cvt((1, 2, 10), (64, 192, 384), (1, 3, 6)),
    "zoo_cvt_21": cvt((1, 4, 16), (64, 192, 384), (1, 3, 6)),
    "zoo_cvt_w24": cvt((2, 2, 20), (192, 768, 1024), (3, 12, 16)),
    # 32x32 inputs: three 3x3/2 embeddings give 16x16, 8x8 and 4x4 token grids (keys/values 2x2 last).
    "zoo_cvt_mini_32": cvt(
        (1, 1, 3), (32, 64, 128), (1, 2, 4), embeds=(EmbedSpec(3, 2, 1, norm=NORM),) * 3, img_size=32, crop_pct=1.0
    ),
}
for _name, _spec in VARIANTS.items():
    register(_name, _spec, __name__)

# The official microsoft/CvT layout: stage{i}.patch_embed, stage{i}.blocks.{j}.attn / .mlp, norm, head.
register_layout(
    Layout(
        name="official-cvt",
        detect=lambda sd: "stage0.patch_embed.proj.weight" in sd,
        rules=(
            (r"^stage(\d+)\.patch_embed\.", r"stages.\1.embed."),
            (r"^stage(\d+)\.cls_token$", r"stages.\1.cls_token"),
            (r"^stage(\d+)\.blocks\.(\d+)\.attn\.", r"stages.\1.blocks.\2.token_mixer."),
            (r"^stage(\d+)\.blocks\.(\d+)\.mlp\.", r"stages.\1.blocks.\2.channel_mixer."),
            (r"^stage(\d+)\.blocks\.", r"stages.\1.blocks."),
        ),
    )
)
