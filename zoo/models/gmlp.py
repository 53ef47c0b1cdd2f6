"""gMLP: Liu et al., "Pay Attention to MLPs", NeurIPS 2021. https://arxiv.org/abs/2105.08050

One isotropic stage over 16x16 patches whose blocks are ONE pre-norm residual branch each: the
token mixer ``spatial_gating`` is the whole gated unit (fc1 to ``6 * dim``, GELU, split, LayerNorm
of one half, a token-by-token projection initialised near zero with bias one, product, fc2), so
the stage has ``channel_mixer="none"``. LayerNorm eps 1e-6 for the block and final norms and
1e-5 inside the gate, global average of the normed tokens, linear head: timm's ``gmlp_*16_224``
(``timm/models/mlp_mixer.py``), whose checkpoints load with ``zoo.create_model(name,
pretrained=<file>)``. The token projection fixes the token count: create the model with the
``img_size`` you feed it.
"""

from __future__ import annotations

from .pretrained import Layout, register_layout
from .registry import register
from .specs import EmbedSpec, ModelSpec, StageSpec

PAPER = "gMLP, https://arxiv.org/abs/2105.08050"


def gmlp(
    dim: int, depth: int = 30, *, patch: int = 16, ffn_ratio: float = 6.0, img_size: int = 224, crop_pct: float = 0.875
) -> ModelSpec:
    stage = StageSpec(
        depth=depth,
        dim=dim,
        embed=EmbedSpec(patch, patch, 0),
        token_mixer="spatial_gating",
        mixer_options={"ffn_ratio": ffn_ratio},
        channel_mixer="none",
        norm="layernorm",
    )
    return ModelSpec(
        stages=(stage,),
        img_size=img_size,
        global_pool="avg",
        head_norm="layernorm",
        head_norm_on="map",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        crop_pct=crop_pct,
        paper=PAPER,
    )


VARIANTS = {
    "zoo_gmlp_ti16_224": gmlp(128),
    "zoo_gmlp_s16_224": gmlp(256),
    "zoo_gmlp_b16_224": gmlp(512),
    # 32x32 inputs: 4x4 patches give 64 tokens.
    "zoo_gmlp_mini_32": gmlp(128, 6, patch=4, img_size=32, crop_pct=1.0),
}
for _name, _spec in VARIANTS.items():
    register(_name, _spec, __name__)

# timm's MlpMixer with SpatialGatingBlock: stem.proj, blocks.i.norm, blocks.i.mlp_channels.{fc1, gate.norm,
# gate.proj, fc2}, norm, head.
register_layout(
    Layout(
        name="timm-gmlp",
        detect=lambda sd: "stem.proj.weight" in sd and any(".mlp_channels.gate.proj." in k for k in sd),
        rules=(
            (r"^stem\.proj\.", "stages.0.embed.proj."),
            (r"^blocks\.(\d+)\.norm\.", r"stages.0.blocks.\1.norm1."),
            (r"^blocks\.(\d+)\.mlp_channels\.gate\.", r"stages.0.blocks.\1.token_mixer."),
            (r"^blocks\.(\d+)\.mlp_channels\.", r"stages.0.blocks.\1.token_mixer."),
        ),
    )
)
