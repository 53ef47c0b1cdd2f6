"""The twins the speed bench measures against: public implementations of the same function.

A twin is another library's model of the same architecture, holding the same weights as the zoo
model, so that a speed ratio compares two computations of one function (``twin_pair`` checks the
outputs before anything is timed).

- **timm** (``TWINS``): the zoo model is built from the timm model's state dict, loaded through
  the zoo's timm layout, with the overrides that make it compute exactly timm's function.
- **CvT** (``CVT_TWINS``): timm has no CvT. Hugging Face transformers' ``CvtForImageClassification``
  is the public one. Its ``CvtConfig`` is built here from the zoo spec (nothing is downloaded), the
  zoo model's weights are converted into it, and its MLP activation is swapped to QuickGELU
  (``x * sigmoid(1.702 x)``), which the official code (microsoft/CvT, ``get_cls_model``) and the zoo
  use and transformers replaces with ``nn.GELU``. transformers is optional: ``missing`` names
  what a twin needs when it is not installed.
"""

from __future__ import annotations

import importlib.util
import re
import tempfile
from pathlib import Path

import timm
import torch
from torch import nn

import zoo
from zoo.models.metaformer import TIMM_HEAD as TIMM_METAFORMER_HEAD
from zoo.models.poolformer import TIMM_HEAD as TIMM_POOLFORMER_HEAD
from zoo.models.registry import fixed_input_size

# zoo name -> (timm name, overrides that make the zoo model compute exactly timm's function)
TWINS: dict[str, tuple[str, dict]] = {
    **{f"zoo_poolformer_{s}": (f"poolformer_{s}", TIMM_POOLFORMER_HEAD) for s in ("s12", "s24", "s36", "m36", "m48")},
    **{f"zoo_vit_{s}_patch16_224": (f"vit_{s}_patch16_224", {}) for s in ("tiny", "small", "base")},
    **{
        f"zoo_deit_{s}_distilled_patch16_224": (f"deit_{s}_distilled_patch16_224", {})
        for s in ("tiny", "small", "base")
    },
    **{f"zoo_gmlp_{s}16_224": (f"gmlp_{s}16_224", {}) for s in ("ti", "s", "b")},
    **{f"zoo_poolformerv2_{s}": (f"poolformerv2_{s}", {}) for s in ("s12", "s24", "s36", "m36", "m48")},
    **{
        f"zoo_{f}_{s}": (f"{f}_{s}", TIMM_METAFORMER_HEAD)
        for f in ("convformer", "caformer")
        for s in ("s18", "s36", "m36", "b36")
    },
}
# zoo CvT names whose twin is transformers' CvtForImageClassification, its config read from the zoo spec
CVT_TWINS = ("zoo_cvt_13", "zoo_cvt_21", "zoo_cvt_w24", "zoo_cvt_mini_32")
CVT_TWIN_LABEL = "transformers CvtForImageClassification"
NEEDS_TRANSFORMERS = "the CvT twin needs transformers: pip install transformers"


def has_twin(name: str) -> bool:
    return name in TWINS or name in CVT_TWINS


def twin_label(name: str) -> str:
    """What the table calls ``name``'s twin ("" without one)."""
    if name in TWINS:
        return TWINS[name][0]
    return CVT_TWIN_LABEL if name in CVT_TWINS else ""


def missing(name: str) -> str | None:
    """One line naming the package ``name``'s twin needs, if it is not installed; else None."""
    if name in CVT_TWINS and importlib.util.find_spec("transformers") is None:
        return NEEDS_TRANSFORMERS
    return None


def twin_pair(name: str, img_size: int) -> tuple[nn.Module, nn.Module | None, float | None]:
    """The zoo model and its twin with the same weights (both in eval mode), and their max output
    difference on a random batch of two; ``(model, None, None)`` for a model without a twin."""
    kw = {"img_size": img_size} if fixed_input_size(name) else {}
    if name in CVT_TWINS:
        ours = zoo.create_model(name, **kw).eval()
        ref = cvt_twin(ours).eval()
    elif name in TWINS:
        timm_name, overrides = TWINS[name]
        ref = timm.create_model(timm_name, **kw).eval()
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "twin.pth"
            torch.save(ref.state_dict(), path)
            ours = zoo.create_model(name, pretrained=str(path), **overrides, **kw).eval()
    else:
        return zoo.create_model(name, **kw), None, None
    return ours, ref, max_output_diff(ours, ref, img_size)


def max_output_diff(ours: nn.Module, ref: nn.Module, img_size: int, batch: int = 2) -> float:
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.no_grad():
        return (ours(x) - ref(x)).abs().max().item()


# ---------------------------------------------------------------- CvT: transformers' CvtForImageClassification


class Logits(nn.Module):
    """A transformers image classifier as ``pixels -> logits``, the call the bench's steps make."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def cvt_config(spec):
    """The ``CvtConfig`` computing the function of a zoo CvT spec (``zoo.models.cvt.cvt``); a spec
    it cannot express (another activation, norm or scale) is a one-line ValueError."""
    from transformers import CvtConfig

    stages = spec.stages
    for i, s in enumerate(stages):
        o = s.mixer_options
        checks = {
            "token_mixer": (s.token_mixer, "conv_attention"),
            "channel_mixer": (s.channel_mixer, "mlp"),
            "act": (s.channel_options.get("act"), "quick_gelu"),
            "norm": (s.norm, "layernorm_eps1e-5"),
            "embed norm": (s.embed.norm, "layernorm_eps1e-5"),
            "scale": (o.get("scale"), "dim"),
            "groups": (o.get("groups"), "depthwise"),
            "class_token": (s.class_token, i == len(stages) - 1),
        }
        for what, (value, want) in checks.items():
            if value != want:
                raise ValueError(f"stage {i}: {what}={value!r}; transformers' CvT twin computes {want!r}")
    if spec.head_norm != "layernorm_eps1e-5" or spec.global_pool != "token":
        raise ValueError(
            f"head_norm={spec.head_norm!r}, global_pool={spec.global_pool!r}; transformers' CvT "
            "twin computes 'layernorm_eps1e-5' on the class token"
        )
    n = len(stages)
    k = [s.mixer_options.get("kernel", 3) for s in stages]
    return CvtConfig(
        num_channels=spec.in_chans,
        num_labels=spec.num_classes,
        patch_sizes=[s.embed.kernel for s in stages],
        patch_stride=[s.embed.stride for s in stages],
        patch_padding=[s.embed.padding for s in stages],
        embed_dim=[s.dim for s in stages],
        num_heads=[s.mixer_options["num_heads"] for s in stages],
        depth=[s.depth for s in stages],
        mlp_ratio=[s.mlp_ratio for s in stages],
        attention_drop_rate=[0.0] * n,
        drop_rate=[0.0] * n,
        drop_path_rate=[0.0] * n,
        qkv_bias=[bool(s.mixer_options.get("qkv_bias", False)) for s in stages],
        cls_token=[s.class_token for s in stages],
        qkv_projection_method=["dw_bn"] * n,
        kernel_qkv=k,
        padding_q=[kk // 2 for kk in k],
        padding_kv=[kk // 2 for kk in k],
        stride_q=[s.mixer_options.get("stride_q", 1) for s in stages],
        stride_kv=[s.mixer_options.get("stride_kv", 2) for s in stages],
    )


# zoo key -> transformers key (CvtForImageClassification), applied in order, first match wins
_CVT_KEYS = (
    (r"^stages\.(\d+)\.cls_token$", r"cvt.encoder.stages.\1.cls_token"),
    (r"^stages\.(\d+)\.embed\.proj\.", r"cvt.encoder.stages.\1.embedding.convolution_embeddings.projection."),
    (r"^stages\.(\d+)\.embed\.norm\.", r"cvt.encoder.stages.\1.embedding.convolution_embeddings.normalization."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm1\.", r"cvt.encoder.stages.\1.layers.\2.layernorm_before."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm2\.", r"cvt.encoder.stages.\1.layers.\2.layernorm_after."),
    *(
        (
            rf"^stages\.(\d+)\.blocks\.(\d+)\.token_mixer\.conv_proj_{c}\.conv\.",
            rf"cvt.encoder.stages.\1.layers.\2.attention.attention.convolution_projection_{w}.convolution_projection.convolution.",
        )
        for c, w in (("q", "query"), ("k", "key"), ("v", "value"))
    ),
    *(
        (
            rf"^stages\.(\d+)\.blocks\.(\d+)\.token_mixer\.conv_proj_{c}\.bn\.",
            rf"cvt.encoder.stages.\1.layers.\2.attention.attention.convolution_projection_{w}.convolution_projection.normalization.",
        )
        for c, w in (("q", "query"), ("k", "key"), ("v", "value"))
    ),
    *(
        (
            rf"^stages\.(\d+)\.blocks\.(\d+)\.token_mixer\.proj_{c}\.",
            rf"cvt.encoder.stages.\1.layers.\2.attention.attention.projection_{w}.",
        )
        for c, w in (("q", "query"), ("k", "key"), ("v", "value"))
    ),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.token_mixer\.proj\.", r"cvt.encoder.stages.\1.layers.\2.attention.output.dense."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.channel_mixer\.fc1\.", r"cvt.encoder.stages.\1.layers.\2.intermediate.dense."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.channel_mixer\.fc2\.", r"cvt.encoder.stages.\1.layers.\2.output.dense."),
    (r"^norm\.", "layernorm."),
    (r"^head\.", "classifier."),
)


def cvt_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A zoo CvT state dict under transformers' ``CvtForImageClassification`` keys."""
    out = {}
    for key, value in state.items():
        for pattern, repl in _CVT_KEYS:
            new, hits = re.subn(pattern, repl, key)
            if hits:
                out[new] = value
                break
        else:
            raise KeyError(f"no transformers CvT key for zoo key {key!r}")
    return out


def cvt_twin(ours: nn.Module) -> Logits:
    """transformers' ``CvtForImageClassification`` with the weights of the zoo CvT ``ours``, QuickGELU
    in its MLPs, called as ``pixels -> logits``.

    transformers (5.x) picks each layer's stochastic-depth rate as ``drop_path_rates[stage]`` of its
    stage's list, one entry per layer, so it cannot build a stage with fewer layers than its index
    (zoo_cvt_mini_32's 1-layer second stage). Every rate here is 0 (each layer's drop path is an
    Identity), so such a stage is built one layer deeper and cut back to its depth.
    """
    from transformers import CvtForImageClassification
    from transformers.activations import QuickGELUActivation

    config = cvt_config(ours.spec)
    depths = list(config.depth)
    config.depth = [max(d, i + 1) for i, d in enumerate(depths)]
    model = CvtForImageClassification(config)
    for stage, depth in zip(model.cvt.encoder.stages, depths, strict=True):
        stage.layers = stage.layers[:depth]
        for layer in stage.layers:
            layer.intermediate.activation = QuickGELUActivation()
    config.depth = depths
    model.load_state_dict(cvt_state_dict(ours.state_dict()), strict=True)
    return Logits(model)
