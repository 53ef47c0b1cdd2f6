"""ViT and DeiT: one isotropic stage of attention blocks over 16x16 patches.

Dosovitskiy et al., "An Image is Worth 16x16 Words", https://arxiv.org/abs/2010.11929;
Touvron et al., "Training data-efficient image transformers & distillation through attention"
(DeiT), https://arxiv.org/abs/2012.12877 — official code: https://github.com/facebookresearch/deit

The ``zoo_vit_*`` sizes are the DeiT-Ti/S/B architecture (class token, learned position embedding
that covers it, pre-norm blocks, LayerNorm eps 1e-6, exact-GELU MLP of ratio 4). The distilled
variants add DeiT's distillation token and a second head; in eval they return the mean of both
heads, in distilled training both (``set_distilled_training``). Official DeiT checkpoints use
timm's key layout, which loads directly.
"""

from __future__ import annotations

from .pretrained import Layout, register_layout
from .registry import register
from .specs import EmbedSpec, ModelSpec, StageSpec

PAPER = "ViT https://arxiv.org/abs/2010.11929 / DeiT https://arxiv.org/abs/2012.12877"


def vit(
    dim: int,
    depth: int,
    num_heads: int,
    *,
    patch: int = 16,
    img_size: int = 224,
    distilled: bool = False,
    crop_pct: float = 0.875,
) -> ModelSpec:
    stage = StageSpec(
        depth=depth,
        dim=dim,
        embed=EmbedSpec(patch, patch, 0),
        token_mixer="attention",
        mixer_options={"num_heads": num_heads},
        channel_mixer="mlp",
        mlp_ratio=4.0,
        norm="layernorm",
        class_token=True,
        dist_token=distilled,
        pos_embed=True,
    )
    return ModelSpec(
        stages=(stage,),
        img_size=img_size,
        global_pool="token",
        head_norm="layernorm",
        head_norm_on="map",
        distilled=distilled,
        crop_pct=crop_pct,
        paper=PAPER,
    )


VARIANTS = {
    "zoo_vit_tiny_patch16_224": vit(192, 12, 3),
    "zoo_vit_small_patch16_224": vit(384, 12, 6),
    "zoo_vit_base_patch16_224": vit(768, 12, 12),
    "zoo_deit_tiny_distilled_patch16_224": vit(192, 12, 3, distilled=True),
    "zoo_deit_small_distilled_patch16_224": vit(384, 12, 6, distilled=True),
    "zoo_deit_base_distilled_patch16_224": vit(768, 12, 12, distilled=True),
    # 32x32 inputs: 4x4 patches give an 8x8 token grid.
    "zoo_vit_mini_32": vit(128, 6, 4, patch=4, img_size=32, crop_pct=1.0),
    "zoo_deit_mini_distilled_32": vit(128, 6, 4, patch=4, img_size=32, distilled=True, crop_pct=1.0),
}
for _name, _spec in VARIANTS.items():
    register(_name, _spec, __name__)

# timm's VisionTransformer / VisionTransformerDistilled, and the official DeiT checkpoints.
register_layout(
    Layout(
        name="timm-vit",
        detect=lambda sd: "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd,
        rules=(
            (r"^(cls_token|dist_token|pos_embed)$", r"stages.0.\1"),
            (r"^patch_embed\.proj\.", "stages.0.embed.proj."),
            (r"^blocks\.(\d+)\.attn\.", r"stages.0.blocks.\1.token_mixer."),
            (r"^blocks\.(\d+)\.mlp\.", r"stages.0.blocks.\1.channel_mixer."),
            (r"^blocks\.(\d+)\.", r"stages.0.blocks.\1."),
        ),
    )
)
