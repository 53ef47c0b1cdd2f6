"""Registry and factory: ``zoo.create_model(name, ...)`` for zoo families and timm's ResNets.

Each zoo model is registered twice from one spec: in our table (for ``zoo.list_models`` and
strict overrides) and in timm's registry (so ``timm.create_model('zoo_...')`` works after
``import zoo``). ResNet baselines are timm's own models, created unchanged.
"""
from __future__ import annotations

import fnmatch
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models._features import FeatureGetterNet
from torch import nn

from ..names import close_names
from .backbone import ZooModel
from .specs import ModelSpec, apply_overrides

_SPECS: dict[str, ModelSpec] = {}
# timm models that zoo treats as baselines: created by zoo.create_model, never modified.
# resnet10t (timm's tiered-stem ResNet-10, 4.9 M parameters) is the baseline whose MNIST-5k weights
# weights/ ships: resnet18's 11.2 M parameters alone would take 22 MB of weights/' 30 MB in fp16
# (README, Pretrained weights).
BASELINES = ("resnet10t", "resnet18", "resnet26", "resnet34", "resnet50", "resnet101")


def register(name: str, spec: ModelSpec, module: str) -> None:
    """Register ``spec`` as model ``name`` here and in timm (called once per variant by a family file)."""
    if not name.startswith("zoo_"):
        raise ValueError(f"zoo model names start with 'zoo_' so timm's own are never overwritten: {name!r}")
    _SPECS[name] = spec

    def entry_point(pretrained: bool | str = False, *, pretrained_cfg=None, pretrained_cfg_overlay=None,
                    cache_dir=None, **overrides: Any) -> nn.Module:
        # timm's create_model passes its pretrained_cfg plumbing. zoo takes weights only from local
        # files (no network): timm's way to name one, pretrained_cfg_overlay=dict(file=...), is
        # honoured; a hub id or URL is refused rather than ignored. Overrides are checked strictly.
        overlay = {k: v for k, v in (pretrained_cfg_overlay or {}).items() if v is not None}
        remote = sorted(set(overlay) - {"file"})
        if remote:
            raise ValueError(f"pretrained_cfg_overlay: {', '.join(remote)} not supported; zoo loads local files "
                             f"only: pretrained_cfg_overlay=dict(file=PATH) or pretrained=PATH")
        if "file" in overlay and pretrained:
            pretrained = overlay["file"]
        return create_model(name, pretrained=pretrained, **overrides)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__module__ = module
    entry_point.__doc__ = f"{name}: {spec.paper}"
    setattr(sys.modules[module], name, entry_point)
    timm.models.register_model(entry_point)


def get_spec(name: str) -> ModelSpec:
    if name not in _SPECS:
        raise unknown_model(name)
    return _SPECS[name]


def list_models(pattern: str = "*", *, baselines: bool = False) -> list[str]:
    """Registered zoo model names matching a shell-style ``pattern`` (and the baselines if asked)."""
    names = list(_SPECS) + (list(BASELINES) if baselines else [])
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def fixed_input_size(name: str) -> bool:
    """Whether model ``name`` is built for one input size (timm's ``pretrained_cfg["fixed_input_size"]``:
    a position embedding, or a token mixer with per-token weights). Read from the model itself,
    built on the meta device so that no weights are allocated."""
    if name in BASELINES:
        return False
    with torch.device("meta"):
        model = create_model(name)
    return bool(model.pretrained_cfg.get("fixed_input_size", False))


def unknown_model(name: str) -> ValueError:
    # Up to three names, unquoted: a misspelt size (s12 / s24 / s36) is usually one of several.
    near = close_names(name, [*_SPECS, *BASELINES], n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else "; see zoo.list_models()"
    return ValueError(f"unknown model {name!r}{hint}")


# pretrained_cfg keys a shipped manifest entry sets on the model it loads.
_PREPROCESSING = ("mean", "std", "crop_pct", "interpolation", "input_size")


def create_model(name: str, pretrained: bool | str | Path = False, *, features_only: bool = False,
                 out_indices: int | Sequence[int] | None = None, **overrides: Any) -> nn.Module:
    """Create a zoo model or a ResNet baseline.

    Args:
        name: a registered ``zoo_*`` name (see ``list_models()``) or a baseline such as ``resnet50``.
        pretrained: False; True for the weights shipped in weights/; or the path of a checkpoint
            file or folder (zoo, timm, official PoolFormer / DeiT / CvT layouts, detected from keys).
        features_only: return a feature extractor giving NCHW maps at ``out_indices``.
        **overrides: ``ModelSpec`` fields (``num_classes``, ``in_chans``, ``img_size``,
            ``drop_path_rate``, ``head_norm_on``, ...) or stage fields applied to every stage
            (``token_mixer``, ``channel_mixer``, ``mlp_ratio``, ``norm``, ...). Unknown keys are errors.
    """
    entry = None
    if pretrained is True:  # like timm: the shipped weights' class count and channels unless overridden
        from .pretrained import shipped_entry

        entry = shipped_entry(name)
        for key in ("num_classes", "in_chans"):
            if key in entry:
                overrides.setdefault(key, entry[key])
    if name in BASELINES:
        model = timm.create_model(name, pretrained=False, **overrides)
    elif name in _SPECS:
        model = ZooModel(apply_overrides(_SPECS[name], overrides, model_name=name), name=name)
    else:
        raise unknown_model(name)
    if pretrained:
        from .pretrained import load_pretrained

        load_pretrained(model, name, pretrained)
    if entry is not None:  # the preprocessing the weights were trained with (timm.data reads it)
        cfg = {**model.pretrained_cfg, **{k: entry[k] for k in _PREPROCESSING if k in entry}}
        model.pretrained_cfg = model.default_cfg = cfg
    return _features(model, out_indices) if features_only else model


def _features(model: nn.Module, out_indices: int | Sequence[int] | None) -> nn.Module:
    """timm's FeatureGetterNet over our forward_intermediates: NCHW maps with feature_info."""
    if out_indices is None:  # timm's defaults: every stage of a hierarchical model, the last 3 blocks of a ViT
        taps = tuple(range(len(model.feature_info)))
        out_indices = taps[-3:] if len(getattr(model, "stages", ())) == 1 else taps
    return FeatureGetterNet(model, out_indices=out_indices, output_fmt="NCHW", prune=True)
