"""Layers: one concept a file. Token mixers, channel mixers, mixture of experts, norms, activations,
embeddings, the shared init and the fused-backward Functions."""

from .activations import ACTIVATIONS, get_act
from .embed import ConvEmbed
from .mixers import TOKEN_MIXERS, create_token_mixer, register_token_mixer
from .mlp import (
    CHANNEL_MIXER_ALIASES,
    CHANNEL_MIXERS,
    GluMlp,
    Mlp,
    create_channel_mixer,
)
from .moe import MoE, collect_aux_loss
from .norm import NORMS, create_norm

__all__ = [
    "ACTIVATIONS",
    "CHANNEL_MIXERS",
    "CHANNEL_MIXER_ALIASES",
    "NORMS",
    "TOKEN_MIXERS",
    "ConvEmbed",
    "GluMlp",
    "Mlp",
    "MoE",
    "collect_aux_loss",
    "create_channel_mixer",
    "create_norm",
    "create_token_mixer",
    "get_act",
    "register_token_mixer",
]
