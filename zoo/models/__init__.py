"""Zoo models: the one backbone, the family specs, and the factory.

Importing this package registers every family (``zoo_*``) here and in timm's registry.
"""

# metaformer before poolformer: its timm layout (MetaFormer-v2 keys) must be tried before PoolFormer v1's.
from . import cct, cvt, gmlp, metaformer, poolformer, vit, widenet  # noqa: F401  (registers the families)
from .backbone import Block, Stage, ZooModel
from .pretrained import CheckpointError, load_state_into, read_state_dict
from .registry import BASELINES, create_model, get_spec, list_models
from .specs import EmbedSpec, ModelSpec, StageSpec

__all__ = [
    "BASELINES",
    "Block",
    "CheckpointError",
    "EmbedSpec",
    "ModelSpec",
    "Stage",
    "StageSpec",
    "ZooModel",
    "create_model",
    "get_spec",
    "list_models",
    "load_state_into",
    "read_state_dict",
]
