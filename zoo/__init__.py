"""zoo: vision token mixers behind one backbone, trained with the DeiT recipe, benchmarked honestly.

import zoo, timm
model = zoo.create_model("zoo_poolformer_s12", num_classes=10)
feats = zoo.create_model("zoo_poolformer_s12", features_only=True, out_indices=(0, 1, 2, 3))
zoo.list_models("zoo_*")
timm.create_model("zoo_vit_small_patch16_224")  # works after `import zoo`
"""

from .hub import from_pretrained, save_pretrained
from .layers.moe import collect_aux_loss
from .models import create_model, get_spec, list_models

__version__ = "0.1.0"
__all__ = ["collect_aux_loss", "create_model", "from_pretrained", "get_spec", "list_models", "save_pretrained"]
