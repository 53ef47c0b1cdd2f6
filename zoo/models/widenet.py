"""WideNet: Xue et al., "Go Wider Instead of Deeper", AAAI 2022. https://arxiv.org/abs/2107.11817

A ViT whose blocks all share ONE attention and ONE mixture-of-experts FFN while every block keeps
its own two LayerNorms: weight sharing (``share_group = depth``) plus the ``moe`` channel mixer,
nothing else new. The MoE is the paper's: 4 experts, top-2 routing, capacity factor 1.2,
load-balancing loss weight 0.01 (collect it with ``zoo.layers.collect_aux_loss(model)`` after
each forward). Patch 16, class token and learned position embedding, LayerNorm eps 1e-6 as ViT.

Sizes: WideNet-B is ViT-B's width (768, 12 heads) with experts of hidden width 4096 (the
co-author's re-implementation, github.com/yuxuan-lou/WideNet, ``d_ff=4096``), WideNet-L and -H
are ViT-L/H's widths (1024 and 1280) with experts of ratio 4; depths 12 / 24 / 32 as ViT-B/L/H.
Parameters (zoo counts every shared tensor once): 29.1M / 39.9M / 61.7M against the paper's
29M / 40M / 63M (Table 1).
"""

from __future__ import annotations

import dataclasses

from .registry import register
from .specs import ModelSpec
from .vit import vit

PAPER = "WideNet, https://arxiv.org/abs/2107.11817"
MOE_OPTIONS = {"num_experts": 4, "top_k": 2, "capacity_factor": 1.2, "balance_loss_weight": 0.01}


def widenet(
    dim: int,
    depth: int,
    num_heads: int,
    expert_hidden: int,
    *,
    patch: int = 16,
    img_size: int = 224,
    crop_pct: float = 0.875,
) -> ModelSpec:
    """ViT's spec with the MoE as channel mixer and one attention + one MoE shared by every block."""
    spec = vit(dim, depth, num_heads, patch=patch, img_size=img_size, crop_pct=crop_pct)
    stage = dataclasses.replace(
        spec.stages[0],
        channel_mixer="moe",
        mlp_ratio=expert_hidden / dim,
        channel_options=MOE_OPTIONS,
        share_group=depth,
    )
    return dataclasses.replace(spec, stages=(stage,), paper=PAPER)


VARIANTS = {
    "zoo_widenet_b": widenet(768, 12, 12, 4096),
    "zoo_widenet_l": widenet(1024, 24, 16, 4096),
    "zoo_widenet_h": widenet(1280, 32, 16, 5120),
    # 32x32 inputs: 4x4 patches give an 8x8 token grid.
    "zoo_widenet_mini_32": widenet(128, 6, 4, 512, patch=4, img_size=32, crop_pct=1.0),
}
for _name, _spec in VARIANTS.items():
    register(_name, _spec, __name__)
