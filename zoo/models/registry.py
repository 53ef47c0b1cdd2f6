"""Registry and factory: ``zoo.create_model(name, ...)`` for zoo families and timm's ResNets.

Each zoo model is registered twice from one spec: in our table (for ``zoo.list_models`` and
strict overrides) and in timm's registry (so ``timm.create_model('zoo_...')`` works after
``import zoo``). ResNet baselines are timm's own models, created unchanged.
"""

from __future__ import annotations

import fnmatch
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import DefaultCfg, FeatureInfo, PretrainedCfg
from torch import nn

from ..names import close_names
from .backbone import ZooModel, feature_take_indices, spec_pretrained_cfg
from .specs import ModelSpec, apply_overrides

_SPECS: dict[str, ModelSpec] = {}
# timm models that zoo treats as baselines: created by zoo.create_model, never modified.
# resnet10t (timm's tiered-stem ResNet-10, 4.9 M parameters) is the baseline whose MNIST-5k weights
# weights/ ships: resnet18's 11.2 M parameters alone would take 22 MB of weights/' 30 MB in fp16
# (README, Pretrained weights).
BASELINES = ("resnet10t", "resnet18", "resnet26", "resnet34", "resnet50", "resnet101")


def _shipped_tag(entry: dict) -> str:
    """The pretrained tag of a manifest entry: the dataset it was trained on ("mnist5k: trained on ...")."""
    return str(entry.get("data", "shipped")).split(":", 1)[0].strip()


def shipped_pretrained_cfg(name: str, entry: dict) -> dict:
    """timm's ``pretrained_cfg`` of weights/' checkpoint for ``name``: the file, tag, class count and
    the preprocessing it was trained with (what ``timm.data.resolve_model_data_config`` reads)."""
    from .pretrained import WEIGHTS_DIR

    cfg = spec_pretrained_cfg(_SPECS[name], name) if name in _SPECS else {"architecture": name}
    cfg.update(file=str(WEIGHTS_DIR / entry["file"]), source="file", tag=_shipped_tag(entry))
    for key in ("num_classes", "crop_pct", "interpolation"):
        if key in entry:
            cfg[key] = entry[key]
    for key in ("input_size", "mean", "std"):
        if key in entry:
            cfg[key] = tuple(entry[key])
    if "data" in entry:
        cfg["description"] = f"{entry['data']}; top-1 {entry.get('top1')} %"
    cfg["notes"] = (f"sha256 {entry['sha256']}", *([entry["command"]] if "command" in entry else []))
    return cfg


def _timm_default_cfg(name: str, spec: ModelSpec) -> DefaultCfg:
    """What timm's registry lists for ``name``: the shipped checkpoint as its (default) tag, or an
    untagged cfg without weights (so that ``timm.get_pretrained_cfg`` describes every model)."""
    from .pretrained import read_manifest

    entry = read_manifest().get(name)
    cfg = shipped_pretrained_cfg(name, entry) if entry else spec_pretrained_cfg(spec, name)
    fields = {f: v for f, v in cfg.items() if f in PretrainedCfg.__dataclass_fields__}
    tag = _shipped_tag(entry) if entry else ""
    return DefaultCfg(tags=deque([tag]), cfgs={tag: PretrainedCfg(**fields)})


def register(name: str, spec: ModelSpec, module: str) -> None:
    """Register ``spec`` as model ``name`` here and in timm (called once per variant by a family file)."""
    if not name.startswith("zoo_"):
        raise ValueError(f"zoo model names start with 'zoo_' so timm's own are never overwritten: {name!r}")
    _SPECS[name] = spec

    def entry_point(
        pretrained: bool | str = False,
        *,
        pretrained_cfg=None,
        pretrained_cfg_overlay=None,
        cache_dir=None,
        pretrained_model_args=None,
        device=None,
        dtype=None,
        **overrides: Any,
    ) -> nn.Module:
        # timm's create_model passes its pretrained_cfg plumbing: a tag ("mnist5k" from
        # "zoo_x.mnist5k"), or a local-dir folder's cfg whose model_args timm has already merged
        # into the overrides. zoo takes weights only from local files (no network): a hub id or URL
        # is refused rather than ignored. Overrides are checked strictly.
        cfg = _resolve_cfg(name, pretrained_cfg)
        overlay = {k: v for k, v in (pretrained_cfg_overlay or {}).items() if v is not None}
        remote = sorted(set(overlay) - {"file"})
        if remote:
            raise ValueError(
                f"pretrained_cfg_overlay: {', '.join(remote)} not supported; zoo loads local files "
                f"only: pretrained_cfg_overlay=dict(file=PATH) or pretrained=PATH"
            )
        if cfg.get("hf_hub_id") or cfg.get("url"):
            raise ValueError(
                f"{name}: pretrained_cfg names a hub id / URL; zoo loads local files only "
                "(timm.create_model('local-dir:PATH'), pretrained=PATH or a registered tag)"
            )
        if cfg.get("source") == "local-dir":
            for key, value in (cfg.get("overrides") or {}).items():  # a folder saved before timm's layout
                overrides.setdefault(key, value)
            if pretrained:
                pretrained = cfg["file"]
        elif cfg.get("tag") and pretrained:
            pretrained = True  # the shipped checkpoint of that tag: sha256-checked by load_pretrained
        elif pretrained and cfg.get("file"):
            pretrained = cfg["file"]
        if "file" in overlay and pretrained:
            pretrained = overlay["file"]
        model = create_model(name, pretrained=pretrained, device=device, dtype=dtype, **overrides)
        if cfg.get("source") == "local-dir" and hasattr(model, "spec"):
            saved = {k: v for k, v in cfg.items() if k in PretrainedCfg.__dataclass_fields__}
            model.pretrained_cfg = {**model.pretrained_cfg, **saved, "architecture": name}
        return model

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__module__ = module
    entry_point.__doc__ = f"{name}: {spec.paper}"
    setattr(sys.modules[module], name, entry_point)
    # timm's register_model reads a module's default_cfgs: the pretrained tags it lists come from there
    mod = sys.modules[module]
    if not hasattr(mod, "default_cfgs"):
        mod.default_cfgs = {}
    mod.default_cfgs[name] = _timm_default_cfg(name, spec)
    timm.models.register_model(entry_point)


def _resolve_cfg(name: str, pretrained_cfg: Any) -> dict:
    """timm's ``pretrained_cfg`` argument as a dict: a tag, a PretrainedCfg, a dict, or None."""
    if pretrained_cfg is None:
        return {}
    if isinstance(pretrained_cfg, str):
        cfg = timm.models.get_pretrained_cfg(f"{name}.{pretrained_cfg}")
        if cfg is None:
            tags = [t for t in timm.list_pretrained(f"{name}.*")] or ["none"]
            raise ValueError(f"{name}: unknown pretrained tag {pretrained_cfg!r}; registered: {', '.join(tags)}")
        return cfg.to_dict(remove_source=False, remove_null=True)
    if isinstance(pretrained_cfg, PretrainedCfg):
        return pretrained_cfg.to_dict(remove_source=False, remove_null=True)
    if isinstance(pretrained_cfg, dict):
        return dict(pretrained_cfg)
    raise TypeError(
        f"{name}: pretrained_cfg must be a tag, a dict or a PretrainedCfg, got {type(pretrained_cfg).__name__}"
    )


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


def create_model(
    name: str,
    pretrained: bool | str | Path = False,
    *,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    feature_cls: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> nn.Module:
    """Create a zoo model or a ResNet baseline.

    Args:
        name: a registered ``zoo_*`` name (see ``list_models()``) or a baseline such as ``resnet50``.
        pretrained: False; True for the weights shipped in weights/; or the path of a checkpoint
            file or folder (zoo, timm, official PoolFormer / DeiT / CvT layouts, detected from keys).
        features_only: return a feature extractor giving NCHW maps at ``out_indices``
            (``feature_cls``: None or "getter", the only kind zoo builds).
        device, dtype: where and in what type the parameters are made (``"meta"``: no memory), as
            timm's constructors take them.
        **overrides: ``ModelSpec`` fields (``num_classes``, ``in_chans``, ``img_size``,
            ``drop_path_rate``, ``dynamic_img_size``, ``global_pool``, ...) or stage fields applied
            to every stage (``token_mixer``, ``channel_mixer``, ``mlp_ratio``, ``norm``, ...).
            Unknown keys are errors.
    """
    if feature_cls not in (None, "getter"):
        raise ValueError(
            f"{name}: feature_cls={feature_cls!r}: zoo models give features through "
            "forward_intermediates only (feature_cls='getter' or None)"
        )
    entry = None
    if pretrained is True:  # like timm: the shipped weights' class count and channels unless overridden
        from .pretrained import shipped_entry

        entry = shipped_entry(name)
        for key in ("num_classes", "in_chans"):
            if key in entry:
                overrides.setdefault(key, entry[key])
    with torch.device(device) if device is not None else _no_device():
        if name in BASELINES:
            model = timm.create_model(name, pretrained=False, **overrides)
        elif name in _SPECS:
            model = ZooModel(apply_overrides(_SPECS[name], overrides, model_name=name), name=name)
        else:
            raise unknown_model(name)
    if pretrained:
        from .pretrained import load_pretrained

        load_pretrained(model, name, pretrained)
    if dtype is not None:
        # made in float32, then cast: the init draws the same numbers in any dtype
        model = model.to(dtype=dtype)
    if entry is not None:  # the preprocessing the weights were trained with (timm.data reads it)
        shipped = shipped_pretrained_cfg(name, entry)
        if name in BASELINES:
            shipped = {k: shipped[k] for k in ("file", "tag", "mean", "std", "crop_pct", "interpolation", "input_size")}
        model.pretrained_cfg = {**model.pretrained_cfg, **shipped, "num_classes": model.num_classes}
        model.default_cfg = model.pretrained_cfg
    return _features(model, out_indices) if features_only else model


class _no_device:
    """A context that changes nothing (``torch.device(None)`` is not a context)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class FeatureGetter(nn.Module):
    """``features_only=True``: the model's ``forward_intermediates`` maps at ``out_indices`` (what
    timm's FeatureGetterNet does, built here so that no private timm class is imported), pruned
    after the last tap, with ``feature_info`` and the model's ``pretrained_cfg``."""

    def __init__(self, model: nn.Module, out_indices: Sequence[int]):
        super().__init__()
        info = list(model.feature_info)
        take = model.prune_intermediate_layers(out_indices, prune_norm=True, prune_head=True)
        self.out_indices = tuple(take)
        self.feature_info = FeatureInfo(info, take)
        self.model = model
        self.pretrained_cfg = self.default_cfg = model.pretrained_cfg
        self.output_fmt = "NCHW"

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, self.out_indices, intermediates_only=True)


def _features(model: nn.Module, out_indices: int | Sequence[int] | None) -> nn.Module:
    """NCHW maps at ``out_indices`` with feature_info (timm's convention for the defaults)."""
    if out_indices is None:  # timm's defaults: every stage of a hierarchical model, the last 3 blocks of a ViT
        taps = tuple(range(len(model.feature_info)))
        out_indices = taps[-3:] if len(getattr(model, "stages", ())) == 1 else taps
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(f"{type(model).__name__}: features_only needs forward_intermediates")
    if isinstance(out_indices, int) or not hasattr(model, "spec"):
        take, _ = feature_take_indices(len(model.feature_info), out_indices)
        out_indices = take
    return FeatureGetter(model, out_indices)
