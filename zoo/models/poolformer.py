"""PoolFormer: Yu et al., "MetaFormer Is Actually What You Need for Vision", CVPR 2022.
https://arxiv.org/abs/2111.11418 — official code: https://github.com/sail-sg/poolformer

Exactly the official architecture: 7x7/4 stem and 3x3/2 downsampling convolutions without norm,
pooling mixer (avg-pool 3x3, count_include_pad=False, minus input), GroupNorm with one group,
GELU MLP of ratio 4 as 1x1 convolutions, layer scale 1e-5 (S12/S24) or 1e-6 (S36/M36/M48), and a
GroupNorm on the final map before global average pooling. timm's MetaFormer port moves that last
norm after the pooling (a LayerNorm of the pooled vector); ``head_norm_on="pooled",
head_norm="layernorm"`` builds timm's variant, which its checkpoints need for identical logits.
"""

from __future__ import annotations

from .pretrained import Layout, exact_logits_hint, register_layout
from .registry import register
from .specs import EmbedSpec, ModelSpec, StageSpec

PAPER = "PoolFormer, https://arxiv.org/abs/2111.11418"


STEM = EmbedSpec(7, 4, 2)  # 7x7 stride-4 patch embedding of the ImageNet models
# The overrides that make a zoo PoolFormer compute timm's function: timm's MetaFormer port
# normalises the pooled vector with a LayerNorm where the official code normalises the map.
TIMM_HEAD = {"head_norm_on": "pooled", "head_norm": "layernorm"}


def poolformer(
    depths: tuple[int, ...],
    dims: tuple[int, ...],
    layer_scale: float,
    *,
    stem: EmbedSpec = STEM,
    crop_pct: float = 0.9,
    img_size: int = 224,
) -> ModelSpec:
    stages = tuple(
        StageSpec(
            depth=d,
            dim=c,
            embed=stem if i == 0 else EmbedSpec(3, 2, 1),
            token_mixer="pooling",
            mixer_options={"pool_size": 3},
            channel_mixer="mlp",
            mlp_ratio=4.0,
            norm="groupnorm1",
            layer_scale=layer_scale,
        )
        for i, (d, c) in enumerate(zip(depths, dims))
    )
    return ModelSpec(
        stages=stages,
        img_size=img_size,
        global_pool="avg",
        head_norm="groupnorm1",
        head_norm_on="map",
        crop_pct=crop_pct,
        paper=PAPER,
    )


VARIANTS = {
    "zoo_poolformer_s12": poolformer((2, 2, 6, 2), (64, 128, 320, 512), 1e-5),
    "zoo_poolformer_s24": poolformer((4, 4, 12, 4), (64, 128, 320, 512), 1e-5),
    "zoo_poolformer_s36": poolformer((6, 6, 18, 6), (64, 128, 320, 512), 1e-6),
    "zoo_poolformer_m36": poolformer((6, 6, 18, 6), (96, 192, 384, 768), 1e-6, crop_pct=0.95),
    "zoo_poolformer_m48": poolformer((8, 8, 24, 8), (96, 192, 384, 768), 1e-6, crop_pct=0.95),
    # 32x32 inputs (MNIST-5k, CIFAR): a 3x3/2 stem, so the four stages see 16, 8, 4 and 2 pixels.
    "zoo_poolformer_mini_32": poolformer(
        (1, 1, 3, 1), (32, 64, 128, 192), 1e-5, stem=EmbedSpec(3, 2, 1), crop_pct=1.0, img_size=32
    ),
}
for _name, _spec in VARIANTS.items():
    register(_name, _spec, __name__)

# Checkpoint layouts. timm's MetaFormer port: stem.conv / stages.i.downsample.conv / head.fc.
register_layout(
    Layout(
        name="timm-metaformer",
        detect=lambda sd: "stem.conv.weight" in sd and any(".blocks.0.mlp.fc1." in k for k in sd),
        rules=(
            (r"^stem\.conv\.", "stages.0.embed.proj."),
            (r"^stages\.(\d+)\.downsample\.conv\.", r"stages.\1.embed.proj."),
            (r"\.layer_scale(\d)\.scale$", r".ls\1.gamma"),
            (r"\.mlp\.", ".channel_mixer."),
            (r"^head\.norm\.", "norm."),
            (r"^head\.fc\.", "head."),
        ),
        note=lambda model: (
            None
            if model.spec.head_norm_on == "pooled"
            else exact_logits_hint(
                "timm's PoolFormer normalises the pooled vector, this model the feature map (as the official code)",
                TIMM_HEAD,
            )
        ),
    )
)
# The official sail-sg code: patch_embed, then network = [stage0, down1, stage1, down2, ...].
register_layout(
    Layout(
        name="official-poolformer",
        detect=lambda sd: "patch_embed.proj.weight" in sd and "network.0.0.mlp.fc1.weight" in sd,
        rules=(
            (r"^patch_embed\.proj\.", "stages.0.embed.proj."),
            (r"^network\.1\.proj\.", "stages.1.embed.proj."),
            (r"^network\.3\.proj\.", "stages.2.embed.proj."),
            (r"^network\.5\.proj\.", "stages.3.embed.proj."),
            (r"^network\.0\.(\d+)\.", r"stages.0.blocks.\1."),
            (r"^network\.2\.(\d+)\.", r"stages.1.blocks.\1."),
            (r"^network\.4\.(\d+)\.", r"stages.2.blocks.\1."),
            (r"^network\.6\.(\d+)\.", r"stages.3.blocks.\1."),
            (r"\.layer_scale_(\d)$", r".ls\1.gamma"),
            (r"\.mlp\.", ".channel_mixer."),
        ),
    )
)
