"""Saving and reloading backbones as a folder in timm's Hugging Face layout.

``save_pretrained(model, dir)`` writes ``config.json`` as timm's ``save_for_hf`` does
(``architecture``, ``num_classes``, ``num_features``, ``pretrained_cfg``, and ``model_args``: the
spec overrides that make this model differ from the registered one; free-form ``metadata`` beside
them) and ``model.safetensors``. ``from_pretrained(dir)`` and ``timm.create_model("local-dir:DIR")``
(after ``import zoo``) rebuild exactly that model; ``zoo.create_model(name, pretrained=dir)`` loads
the weights into a model of your choosing (re-initialising the head for another class count).
Folders written before this layout (``overrides`` instead of ``model_args``) still load.
Both files are written atomically: a crash leaves the previous save intact.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_model
from torch import nn

from .atomic import atomic_write, atomic_write_text
from .models.pretrained import CheckpointError
from .models.registry import BASELINES, create_model, get_spec
from .models.specs import MODEL_FIELDS

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def _overrides(model: nn.Module) -> dict[str, Any]:
    """The ModelSpec fields in which ``model`` differs from its registered spec, as JSON data."""
    if not hasattr(model, "spec"):  # a timm baseline: class count and input channels can differ
        first_conv = model.get_submodule(model.pretrained_cfg.get("first_conv", "conv1"))  # conv1.0: a deep stem
        return {"num_classes": model.num_classes, "in_chans": first_conv.in_channels}
    base, spec = get_spec(model.name), model.spec
    out = {}
    for name in MODEL_FIELDS:
        value = getattr(spec, name)
        if value != getattr(base, name):
            out[name] = [dataclasses.asdict(s) for s in value] if name == "stages" else value
    return out


def save_pretrained(model: nn.Module, directory: str | Path, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = getattr(model, "name", None) or model.pretrained_cfg.get("architecture")
    # where the weights came from is not where they are now: timm drops these on export too
    cfg = {
        k: v
        for k, v in model.pretrained_cfg.items()
        if v is not None and k not in ("architecture", "file", "url", "hf_hub_id", "source", "state_dict")
    }
    cfg["num_classes"] = model.num_classes
    # user metadata is nested so that it can never overwrite the keys the loaders read
    config = {
        "architecture": name,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "pretrained_cfg": cfg,
        "model_args": _overrides(model),
        "metadata": metadata or {},
    }
    text = json.dumps(config, indent=2, default=str) + "\n"
    # save_model (not save_file) because weight-shared blocks alias tensors, which safetensors stores once.
    atomic_write(
        directory / WEIGHTS_NAME, lambda tmp: save_model(model, str(tmp), metadata={"architecture": str(name)})
    )
    atomic_write_text(directory / CONFIG_NAME, text)
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file (a folder saved by zoo.save_pretrained holds one)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict) or "architecture" not in config:
        raise CheckpointError(f"{path}: expected a JSON object with an 'architecture' key")
    args = config.get("model_args", config.get("overrides", {}))  # "overrides": a folder saved before timm's layout
    if not isinstance(args, dict):
        raise CheckpointError(f"{path}: 'model_args' must be a JSON object of model arguments")
    import timm

    if config["architecture"] not in BASELINES and not timm.is_model(config["architecture"]):
        raise CheckpointError(
            f"{path}: unknown architecture {config['architecture']!r} (import the package "
            "that registers it; zoo registers zoo_* and its ResNet baselines)"
        )
    return {**config, "model_args": args}


def from_pretrained(directory: str | Path, **overrides: Any) -> nn.Module:
    """Rebuild the model saved in ``directory`` (its architecture and overrides) with its weights."""
    config = read_config(directory)
    name = config["architecture"]
    kwargs = dict(config["model_args"])
    if name in BASELINES:
        kwargs = {k: v for k, v in kwargs.items() if k in ("num_classes", "in_chans")}
    kwargs.update(overrides)
    model = create_model(name, pretrained=str(directory), **kwargs)
    saved = config.get("pretrained_cfg") or {}  # the preprocessing the saved model was used with
    model.pretrained_cfg = {**model.pretrained_cfg, **saved, "architecture": name, "num_classes": model.num_classes}
    model.default_cfg = model.pretrained_cfg
    return model
