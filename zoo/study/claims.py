"""The field's claims the verdict table answers (issue 27 item 6), as data.

Each claim is one study of the sweep (``python -m zoo.study verdicts`` runs it as
``verdict_<name>``): its arms are ``MODEL:OPTIMIZER[:FIELD=VALUE]`` strings the sweep parses,
one spec change of one cheap base model (``zoo_cct_mini_32``, CCT's small-data transformer)
wherever the claim allows; model or optimizer arms where the claim is about those (WideNet, RSB,
Shampoo). The map token mixers (token-shift, convolutions) cannot run in CCT's stage, which has a
position embedding, so the token-mixer claims (and MetaFormer's own) change the PoolFormer mini,
whose attention arm is their reference. Every arm is checked to build by
``tests/test_study_verdicts.py`` (the sweep's input check on each claim's plan).

A ``Pair`` is one row of the verdict table: ``arm`` against ``versus`` and the direction the
claim gives: ``"lower"`` (the arm's error is lower), or for ``measure="spread"`` the arm's seed
standard deviation is lower, or for ``measure="robustness"`` (``claim="higher"``) the arm's
share of first-rung configurations under the study's bar is higher.

``missing`` names the arms a claim asks for that the arm syntax cannot express yet: a spec
change is one scalar ``FIELD=VALUE`` (``:`` and ``,`` separate arms and parts), so a mixer
swapped together with its options (conv-attention with ``groups: 1``, the sparse FFN at another
``block_size``) has no arm string. The table prints them, so a gap is never silent.
"""

from __future__ import annotations

from dataclasses import dataclass

BASE = "zoo_cct_mini_32:adamw"  # CCT, https://arxiv.org/abs/2104.05704: a transformer that learns on 5k images


@dataclass(frozen=True)
class Pair:
    arm: str  # an arm label of the claim
    versus: str  # another arm label of the claim
    claim: str = "lower"  # the direction the claim gives the arm: "lower" (error, spread) or "higher" (robustness)
    measure: str = "error"  # "error" (final error), "spread" (seed SD of it), "robustness" (share under the bar)


@dataclass(frozen=True)
class Claim:
    name: str
    statement: str  # one line, with its citation
    arms: tuple[str, ...]  # MODEL:OPTIMIZER[:FIELD=VALUE], the reference among them
    reference: str  # the sweep's --baseline
    pairs: tuple[Pair, ...]
    missing: tuple[str, ...] = ()  # arms the claim names that no arm string expresses yet


def _arm(change: str) -> str:
    return f"{BASE}:{change}"


SQRELU, GEGLU, SQGLU = (
    _arm("channel_mixer=mlp_squared_relu"),
    _arm("channel_mixer=geglu"),
    _arm("channel_mixer=squared_relu_glu"),
)
L1 = _arm("norm=l1_layernorm")
VIT, WIDENET, VIT_SHARED = "zoo_vit_mini_32:adamw", "zoo_widenet_mini_32:adamw", "zoo_vit_mini_32:adamw:share_group=6"
POOL = "zoo_poolformer_mini_32:adamw"
POOL_ATTN, POOL_ID, POOL_RAND = (f"{POOL}:token_mixer={m}" for m in ("attention", "identity", "random_mixing"))
# the map mixers cannot run in CCT's stage (it has a position embedding): their claims use the PoolFormer mini
SHIFT, DCONV = f"{POOL}:token_mixer=token_shift", f"{POOL}:token_mixer=conv_attention"
CONV, CONV_ATTN = f"{POOL}:token_mixer=conformer_conv", f"{POOL}:token_mixer=attention_conformer_conv"
SPARSE = _arm("channel_mixer=sparse_ffn")
RESNET = "resnet10t:adamw"
SHAMPOO, SM3 = "zoo_cct_mini_32:shampoo", "zoo_cct_mini_32:sm3"

CLAIMS: tuple[Claim, ...] = (
    Claim(
        "channel_mixer",
        "Squared ReLU beats GELU (Primer, So et al. 2021, https://arxiv.org/abs/2109.08668), and loses to GEGLU "
        "and squared-ReLU-GLU (GLU variants, Shazeer 2020, https://arxiv.org/abs/2002.05202)",
        (BASE, SQRELU, GEGLU, SQGLU),
        SQRELU,
        (Pair(SQRELU, BASE), Pair(GEGLU, SQRELU), Pair(SQGLU, SQRELU)),
    ),
    Claim(
        "token_mixer",
        "Per-head depthwise convolution of q, k, v beats plain attention (Primer, https://arxiv.org/abs/2109.08668; "
        "CvT, https://arxiv.org/abs/2103.15808), and token-shift beats it (ShiftViT, https://arxiv.org/abs/2201.10801)",
        (POOL_ATTN, SHIFT, DCONV),
        POOL_ATTN,
        (Pair(DCONV, POOL_ATTN), Pair(SHIFT, DCONV)),
        missing=("full convolutional projection: conv_attention with mixer_options groups: 1",),
    ),
    Claim(
        "conv_plus_attention",
        "Convolution plus attention beats either alone (Conformer, Gulati et al. 2020, "
        "https://arxiv.org/abs/2005.08100; CvT, https://arxiv.org/abs/2103.15808)",
        (POOL_ATTN, CONV, CONV_ATTN),
        POOL_ATTN,
        (Pair(CONV_ATTN, POOL_ATTN), Pair(CONV_ATTN, CONV)),
    ),
    Claim(
        "l1_norm",
        "L1 normalisation gives lower error and a smaller seed spread than L2: more stable (Hoffer et al. 2018, https://arxiv.org/abs/1802.09769)",
        (BASE, L1),
        BASE,
        (Pair(L1, BASE), Pair(L1, BASE, measure="spread")),
    ),
    Claim(
        "widenet",
        "Weight sharing with MoE beats a dense unshared ViT with fewer parameters (WideNet, Xue et al. 2021, "
        "https://arxiv.org/abs/2107.11817), and the MoE is what recovers what sharing alone loses",
        (VIT, WIDENET, VIT_SHARED),
        VIT,
        (Pair(WIDENET, VIT), Pair(WIDENET, VIT_SHARED)),
        missing=("equal active FLOPs: WideNet's top-2 routing runs two experts a token (twice the dense MLP's FLOPs)",),
    ),
    Claim(
        "metaformer",
        "A pooling mixer matches attention and beats identity and random mixing: the MetaFormer structure does the "
        "work (PoolFormer, Yu et al. 2022, https://arxiv.org/abs/2111.11418; https://arxiv.org/abs/2210.13452)",
        (POOL, POOL_ATTN, POOL_ID, POOL_RAND),
        POOL,
        (Pair(POOL, POOL_ATTN), Pair(POOL, POOL_ID), Pair(POOL, POOL_RAND)),
    ),
    Claim(
        "sparse_ffn",
        "The doubt on a sparse feed-forward (one unit of 32 a block) that Sparse is Enough (Jaszczur et al. 2021, "
        "https://arxiv.org/abs/2111.12763) reports no worse: the dense one beats it",
        (BASE, SPARSE),
        BASE,
        (Pair(BASE, SPARSE),),
        missing=(
            "sparse_ffn at block_size 16 and 64 (channel_options)",
            "dense at equal parameters (mlp_ratio with the controller's parameters)",
        ),
    ),
    Claim(
        "rsb",
        "A tuned ResNet matches or beats the new architectures (ResNet strikes back, Wightman et al. 2021, "
        "https://arxiv.org/abs/2110.00476)",
        (BASE, RESNET),
        BASE,
        (Pair(RESNET, BASE),),
    ),
    Claim(
        "shampoo",
        "Shampoo widens the region of good hyper-parameters: more configurations under a loss bar than SM3 or AdamW "
        "(Anil et al. 2020, https://arxiv.org/abs/2002.09018)",
        (BASE, SHAMPOO, SM3),
        BASE,
        (Pair(SHAMPOO, SM3, "higher", "robustness"), Pair(SHAMPOO, BASE, "higher", "robustness")),
    ),
)

BY_NAME = {c.name: c for c in CLAIMS}
