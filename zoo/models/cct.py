"""Compact transformers: CCT, ViT-Lite and CVT (the compact one, not Microsoft's CvT).

Hassani et al., "Escaping the Big Data Paradigm with Compact Transformers",
https://arxiv.org/abs/2104.05704 — official code: https://github.com/SHI-Labs/Compact-Transformers
(``src/cct.py``, ``src/vit.py``, ``src/cvt.py``, ``src/utils/tokenizer.py``, ``src/utils/transformers.py``).

One isotropic stage of attention blocks, small enough to train from scratch on small data. The
three models are the paper's ablation ladder, one change at a time:

- **ViT-Lite-L/P**: a P x P patch embedding (convolution with bias), a class token, learned
  positions; the class token after the final LayerNorm goes to the classifier (``zoo_vitlite_*``).
- **CVT-L/P** (compact vision transformer): the same, with *sequence pooling* instead of the class
  token: a learned score per token, softmax over the tokens, the weighted sum
  (``global_pool="seqpool"``; ``zoo_compactcvt_*``, so that the name does not collide with CvT).
- **CCT-L/KxC** (compact convolutional transformer): sequence pooling, and a *convolutional
  tokenizer* in place of the patches: C times (K x K convolution without bias, ReLU, 3x3/2
  max-pool), the convolutions 64 wide but the last, stride max(1, K // 2 - 1), padding
  max(1, K // 2) (``zoo_cct_*``).

Their blocks (the official ``TransformerEncoderLayer``): LayerNorm (torch's eps 1e-5), attention
without a qkv bias and with attention dropout 0.1, then the *residual stream itself* normalised
(``channel_norm="residual"``), then an exact-GELU MLP without a norm of its own:
``x = norm2(x + attn(norm1(x))); x = x + mlp(x)``. Stochastic depth 0.1, linear over the blocks.
The constructors' defaults (attention dropout 0.1, stochastic depth 0.1, no other dropout, learned
positions) are the specs' defaults here. The official code adds dropout (default 0) after the
positions; this backbone has no such layer. Position embeddings: ``pos_embed="learned"`` (the
official ``learnable``, its default), ``"sine"`` (the official fixed table) or ``"none"``.
Inits, as the official code: the tokenizer's convolutions Kaiming-normal (``EmbedSpec.init``; a
patch convolution's bias as torch's default leaves it), the learned positions truncated normal std
.2 (``StageSpec.pos_embed_std``), the class token zero (``cls_token_std``), linear layers std .02.

Sizes (layers / width / heads / MLP ratio), as the official factories: 2 and 4: 128 wide, 2 heads,
ratio 1; 6 and 7: 256, 4 heads, ratio 2; 14: 384, 6 heads, ratio 3. The CIFAR sizes (``_32``)
default to 10 classes and CIFAR-10's normalisation, as the official factories and configs.

``*_mini_32`` (MNIST-5k and 32x32 data): the three models on one transformer (6 layers, 128
wide, 4 heads, MLP ratio 2), so that the tokenizer and the pooling are the only changes between
them; the CCT mini's tokenizer gives the 8x8 token grid of ViT-mini's 4x4 patches.

Official checkpoints (``tokenizer.conv_layers.i.0.weight``, ``classifier.blocks.j.pre_norm``,
``classifier.attention_pool``, ``classifier.fc``, ...) load with
``zoo.create_model(name, pretrained=<file>)``; a checkpoint of another depth, width or tokenizer
is refused in one line naming both architectures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .pretrained import Layout, StateDict, register_layout
from .registry import register
from .specs import EmbedSpec, ModelSpec, StageSpec

PAPER = "CCT, https://arxiv.org/abs/2104.05704"
NORM = "layernorm_eps1e-5"  # torch's nn.LayerNorm, as the official code
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # configs/datasets/cifar10.yml


@dataclass(frozen=True)
class Size:
    """The transformer of one size: its layers, width, heads and MLP ratio."""

    depth: int
    dim: int
    heads: int
    mlp_ratio: float


SIZES = {
    2: Size(2, 128, 2, 1.0),
    4: Size(4, 128, 2, 1.0),
    6: Size(6, 256, 4, 2.0),
    7: Size(7, 256, 4, 2.0),
    14: Size(14, 384, 6, 3.0),
}
MINI = Size(6, 128, 4, 2.0)


def conv_tokenizer(kernel: int, layers: int) -> EmbedSpec:
    """CCT's tokenizer: ``layers`` x (K x K conv without bias, ReLU, 3x3/2 max-pool), 64 wide but
    the last, with the official stride and padding for the kernel."""
    return EmbedSpec(
        kernel=kernel,
        stride=max(1, kernel // 2 - 1),
        padding=max(1, kernel // 2),
        bias=False,
        layers=layers,
        hidden_dim=64 if layers > 1 else None,
        act="relu",
        pool_kernel=3,
        pool_stride=2,
        pool_padding=1,
        init="kaiming_normal",
    )


def patch_tokenizer(patch: int) -> EmbedSpec:
    """ViT-Lite's and CVT's: one P x P / P convolution with bias (the official Tokenizer, no pooling)."""
    return EmbedSpec(kernel=patch, stride=patch, padding=0, init="kaiming_normal")


def compact(
    size: Size,
    tokenizer: EmbedSpec,
    *,
    pooling: str = "seqpool",
    img_size: int = 32,
    num_classes: int = 10,
    cifar: bool = True,
) -> ModelSpec:
    """A compact transformer: ``pooling`` "seqpool" (CVT, CCT) or "token" (ViT-Lite's class token)."""
    stage = StageSpec(
        depth=size.depth,
        dim=size.dim,
        embed=tokenizer,
        token_mixer="attention",
        mixer_options={"num_heads": size.heads, "qkv_bias": False, "attn_drop": 0.1},
        channel_mixer="mlp",
        mlp_ratio=size.mlp_ratio,
        norm=NORM,
        channel_norm="residual",
        class_token=pooling == "token",
        pos_embed="learned",
        pos_embed_std=0.2,  # the official learned positions: truncated normal std .2
        cls_token_std=0.0,  # the official class token (ViT-Lite) starts at zero
    )
    return ModelSpec(
        stages=(stage,),
        img_size=img_size,
        num_classes=num_classes,
        global_pool=pooling,
        head_norm=NORM,
        head_norm_on="map",  # the final LayerNorm over all tokens, then the pooling, then fc
        drop_path_rate=0.1,
        mean=CIFAR_MEAN if cifar else (0.485, 0.456, 0.406),
        std=CIFAR_STD if cifar else (0.229, 0.224, 0.225),
        crop_pct=1.0 if cifar else 0.9,
        interpolation="bicubic",
        paper=PAPER,
    )


VARIANTS = {
    "zoo_cct_2_3x2_32": compact(SIZES[2], conv_tokenizer(3, 2)),
    "zoo_cct_4_3x2_32": compact(SIZES[4], conv_tokenizer(3, 2)),
    "zoo_cct_6_3x1_32": compact(SIZES[6], conv_tokenizer(3, 1)),
    "zoo_cct_6_3x2_32": compact(SIZES[6], conv_tokenizer(3, 2)),
    "zoo_cct_7_3x1_32": compact(SIZES[7], conv_tokenizer(3, 1)),
    "zoo_cct_7_3x2_32": compact(SIZES[7], conv_tokenizer(3, 2)),
    "zoo_cct_14_7x2_224": compact(SIZES[14], conv_tokenizer(7, 2), img_size=224, num_classes=1000, cifar=False),
    "zoo_cct_mini_32": compact(MINI, conv_tokenizer(3, 2), num_classes=1000),
    "zoo_vitlite_6_4_32": compact(SIZES[6], patch_tokenizer(4), pooling="token"),
    "zoo_vitlite_7_4_32": compact(SIZES[7], patch_tokenizer(4), pooling="token"),
    "zoo_vitlite_mini_32": compact(MINI, patch_tokenizer(4), pooling="token", num_classes=1000),
    "zoo_compactcvt_6_4_32": compact(SIZES[6], patch_tokenizer(4)),
    "zoo_compactcvt_7_4_32": compact(SIZES[7], patch_tokenizer(4)),
    "zoo_compactcvt_mini_32": compact(MINI, patch_tokenizer(4), num_classes=1000),
}
for _name, _spec in VARIANTS.items():
    register(_name, _spec, __name__)


def describe(state: StateDict) -> str:
    """The architecture a CCT / ViT-Lite / CVT state dict in zoo's key layout holds, in the paper's
    ``L/KxC`` notation with the width: "CCT-7/3x1 (256 wide)"."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"stages\.0\.blocks\.(\d+)\.", k))}
    conv = state.get("stages.0.embed.proj.weight")
    if conv is None or not blocks:
        return "an unknown compact transformer"
    convs = 1 + len({k for k in state if re.match(r"stages\.0\.embed\.layers\.\d+\.weight$", k)})
    width = state["norm.weight"].shape[0] if "norm.weight" in state else "?"
    kernel = conv.shape[-1]
    if "stages.0.cls_token" in state:
        kind = f"ViT-Lite-{len(blocks)}/{kernel}"
    elif "stages.0.embed.proj.bias" in state:
        kind = f"CVT-{len(blocks)}/{kernel}"
    else:
        kind = f"CCT-{len(blocks)}/{kernel}x{convs}"
    return f"{kind} ({width} wide)"


# The official layout: tokenizer.conv_layers.i.0 (conv), classifier.{class_emb, positional_emb,
# attention_pool, blocks.j.{pre_norm, self_attn, norm1, linear1, linear2}, norm, fc}. The block's
# pre_norm is our norm1 and its norm1 (on the residual stream) our norm2: renamed in that order.
register_layout(
    Layout(
        name="official-cct",
        detect=lambda sd: "tokenizer.conv_layers.0.0.weight" in sd and "classifier.norm.weight" in sd,
        rules=(
            (r"^tokenizer\.conv_layers\.0\.0\.", "stages.0.embed.proj."),
            (r"^tokenizer\.conv_layers\.(\d+)\.0\.", r"stages.0.embed.layers.\1."),
            (r"^classifier\.class_emb$", "stages.0.cls_token"),
            (r"^classifier\.positional_emb$", "stages.0.pos_embed"),
            (r"^classifier\.attention_pool\.", "seq_pool.attention."),
            (r"^classifier\.blocks\.(\d+)\.norm1\.", r"stages.0.blocks.\1.norm2."),
            (r"^classifier\.blocks\.(\d+)\.pre_norm\.", r"stages.0.blocks.\1.norm1."),
            (r"^classifier\.blocks\.(\d+)\.self_attn\.", r"stages.0.blocks.\1.token_mixer."),
            (r"^classifier\.blocks\.(\d+)\.linear1\.", r"stages.0.blocks.\1.channel_mixer.fc1."),
            (r"^classifier\.blocks\.(\d+)\.linear2\.", r"stages.0.blocks.\1.channel_mixer.fc2."),
            (r"^classifier\.norm\.", "norm."),
            (r"^classifier\.fc\.", "head."),
        ),
        describe=describe,
    )
)
