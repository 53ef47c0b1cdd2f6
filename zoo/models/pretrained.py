"""Loading weights into zoo models: our format, timm's, and the official repositories' layouts.

A checkpoint's layout is detected from its keys and its keys are rewritten to ours by a table of
regular expressions that the family files register (``register_layout``). Loading then adapts
what a user may legitimately change (class count, input channels, position-embedding grid) and
refuses everything else with a one-line error naming the keys.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..layers.embed import sine_position_table

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """A foreign checkpoint layout: how to recognise it and how to rename its keys to ours."""

    name: str
    detect: Callable[[StateDict], bool]
    rules: tuple[tuple[str, str], ...]  # (regex, replacement), applied in order to every key
    # A warning to give when this layout is loaded into a given model (an architecture caveat), or None.
    note: Callable[[nn.Module], str | None] = lambda model: None
    # For the error when the weights do not fit: the architecture a state dict in OUR key layout holds
    # (e.g. "CCT-7/3x1"), applied to the renamed checkpoint and to the model's own state; None: no summary.
    describe: Callable[[StateDict], str] | None = None


_LAYOUTS: list[Layout] = []


def exact_logits_hint(difference: str, overrides: dict) -> str:
    """A layout note for a model that differs from the checkpoint's source in one setting:
    ``difference``, then the overrides that reproduce the source's logits exactly."""
    settings = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    return f"{difference}: create it with {settings} for timm's exact logits"


def register_layout(layout: Layout) -> None:
    _LAYOUTS.append(layout)


def _layout_named(name: str) -> Layout | None:
    return next((layout for layout in _LAYOUTS if layout.name == name), None)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


def weights_file(path: str | Path) -> Path:
    """``path``, or for a saved folder the weights file in it (model.safetensors first, as timm)."""
    path = Path(path)
    if path.is_dir():
        files = [path / "model.safetensors", path / "pytorch_model.bin"]
        found = [f for f in files if f.is_file()]
        if not found:
            raise CheckpointError(f"{path}: folder holds no model.safetensors or pytorch_model.bin")
        path = found[0]
    return path


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a safetensors file, a torch file (weights only: no code runs), or a saved folder."""
    path = weights_file(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused or unreadable torch checkpoint (weights_only load: {first})") from None
    for key in ("model", "state_dict", "model_ema", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def to_zoo_layout(state: StateDict, model: nn.Module) -> tuple[StateDict, str]:
    """Rename a foreign checkpoint's keys to the model's; returns the new dict and the layout name."""
    own = model.state_dict()
    if not hasattr(model, "spec"):  # a baseline: timm's own model, timm's own keys
        return state, "timm"
    if any(k.startswith("stages.0.embed.proj.") for k in state):
        return state, "zoo"
    for layout in _LAYOUTS:
        if layout.detect(state):
            out = {}
            for key, value in state.items():
                for pattern, repl in layout.rules:
                    key = re.sub(pattern, repl, key)
                target = own.get(key)
                # timm and the official PoolFormer store channel MLPs as 1x1 convolutions; ours are linear
                if target is not None and _is_pointwise_pair(value.shape, target.shape):
                    value = value.reshape(target.shape)
                out[key] = value
            note = layout.note(model)
            if note:
                warnings.warn(note, stacklevel=3)
            return out, layout.name
    return state, "unknown"


def _is_pointwise_pair(src: torch.Size, dst: torch.Size) -> bool:
    """A 1x1 convolution weight (O, I, 1, 1) and a linear weight (O, I), either way round: the one
    reshape a checkpoint's tensor may get. Anything else of the right size is another tensor."""
    return (len(src) == 4 and len(dst) == 2 and tuple(src) == (*dst, 1, 1)) or (
        len(src) == 2 and len(dst) == 4 and tuple(dst) == (*src, 1, 1)
    )


def _fill_shared(state: StateDict, model: nn.Module, source: str = "checkpoint") -> None:
    """Weight-shared modules appear under several names; a file may store only one of them.

    A file that stores several of those names must store the same tensor under each: different
    tensors mean the file comes from a model without that sharing, and no one of them is "the"
    shared weight, so that is an error rather than a silent pick.
    """
    by_tensor: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(t), []).append(name)
    for names in by_tensor.values():
        have = [n for n in names if n in state]
        for other in have[1:]:
            if not torch.equal(state[have[0]], state[other]):
                arch = getattr(model, "name", type(model).__name__)
                raise CheckpointError(
                    f"{source}: {have[0]} and {other} differ, but {arch} shares one tensor under both names: "
                    f"the checkpoint is not weight-shared like the model (check share_group)"
                )
        for n in names:
            if n not in state and have:
                state[n] = state[have[0]]


def _adapt(state: StateDict, model: nn.Module, source: str) -> None:
    """What a user may change from the checkpoint: class count, input channels, token grid."""
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "fc"
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    # A model without a classifier (num_classes=0: its head is Identity) takes the backbone only,
    # as timm does: the checkpoint's classifier keys are dropped, with one warning.
    dropped = [
        k for head in heads if f"{head}.weight" not in own for k in (f"{head}.weight", f"{head}.bias") if k in state
    ]
    # An MLP head (ConvFormer/CAFormer: head.fc1, head.norm, head.fc2) goes as a whole with its
    # classifier, as timm's reset_classifier replaces it: its other keys are dropped too.
    for module in {h.rsplit(".", 1)[0] + "." for h in heads if "." in h}:
        if not any(k.startswith(module) for k in own):
            dropped += [k for k in state if k.startswith(module) and k not in dropped]
    if dropped:
        for k in dropped:
            del state[k]
        warnings.warn(
            f"{source}: the model has no classifier (num_classes=0): ignored the checkpoint's {', '.join(dropped)}",
            stacklevel=4,
        )
    for head in heads:
        w = f"{head}.weight"
        # only the class count may differ; another feature width is another architecture (reported below)
        if w in state and w in own and state[w].shape[1:] == own[w].shape[1:] and state[w].shape != own[w].shape:
            warnings.warn(
                f"{source}: classifier {head!r} has {state[w].shape[0]} classes, the model "
                f"{own[w].shape[0]}: "
                "re-initialised it",
                stacklevel=4,
            )
            for k in (w, f"{head}.bias"):
                state.pop(k, None)
                if k in own:
                    state[k] = own[k]
    first = model.pretrained_cfg.get("first_conv", "conv1") + ".weight" if hasattr(model, "pretrained_cfg") else ""
    if first in state and first in own and state[first].shape[1] != own[first].shape[1]:
        from timm.models import adapt_input_conv

        state[first] = adapt_input_conv(own[first].shape[1], state[first])
    for k, v in own.items():  # BatchNorm's step counter: absent from some checkpoints, unused in eval
        if k.endswith(".num_batches_tracked") and k not in state:
            state[k] = v
    for k, v in list(state.items()):
        if not (k.endswith("pos_embed") and k in own):
            continue
        stage = model.get_submodule(k.rsplit(".", 1)[0])
        if getattr(stage, "sine_pos_embed", False):  # a fixed table: the model's own, for its token count
            if not _holds_sine_table(v):  # learned positions (at any token count): another model
                raise CheckpointError(
                    f"{source}: {k} holds learned positions, the model a fixed sine table "
                    "(pos_embed='sine'): create it with pos_embed='learned'"
                )
            state[k] = own[k]
        elif v.shape != own[k].shape:
            from .backbone import resize_pos_embed

            state[k] = resize_pos_embed(v, stage.grid, stage.num_prefix_tokens)


def _holds_sine_table(v: torch.Tensor) -> bool:
    """Whether a checkpoint's (1, N, C) position tensor is the fixed sine table for its N tokens, to
    its dtype's rounding (zoo/weights.py ships float16); on "meta" there are no values: taken as one."""
    if v.device.type == "meta":
        return True
    if v.ndim != 3 or not v.is_floating_point():
        return False
    atol = max(1e-5, torch.finfo(v.dtype).eps)  # values in [-1, 1]: rounding below one eps
    return torch.allclose(v.float().cpu(), sine_position_table(v.shape[1], v.shape[2]), atol=atol)


def _mismatch_message(model: nn.Module, state: StateDict) -> str | None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", shapes)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:3])}{more}")
    return "; ".join(parts) or None


def load_state_into(model: nn.Module, state: StateDict, source: str) -> str:
    """Convert, adapt and strictly load ``state``; returns the layout name that was detected."""
    state, layout = to_zoo_layout(state, model)
    _fill_shared(state, model, source)
    _adapt(state, model, source)
    problem = _mismatch_message(model, state)
    if problem:
        arch = getattr(model, "name", type(model).__name__)
        found = _layout_named(layout)
        if found is not None and found.describe is not None:  # say which architecture each side is
            theirs, ours = found.describe(state), found.describe(model.state_dict())
            raise CheckpointError(
                f"{source}: a {layout} checkpoint of {theirs} does not fit {arch}, a {ours}: {problem}"
            )
        raise CheckpointError(f"{source}: weights do not fit {arch} (layout {layout}): {problem}")
    model.load_state_dict(state, strict=True)
    return layout


def load_pretrained(model: nn.Module, name: str, pretrained: bool | str | Path) -> None:
    """Load ``pretrained`` (True: shipped weights; a path: that file or folder) into ``model``."""
    if pretrained is True:
        path = shipped_weights(name)
    else:
        path = weights_file(pretrained)  # errors name the file in a folder, not the folder
    load_state_into(model, read_state_dict(path), str(path))


# weights/ sits beside zoo/ in the source tree, which the README's editable install uses; a wheel
# does not carry it, so the environment variable ZOO_WEIGHTS may name the folder instead.
WEIGHTS_DIR = Path(os.environ.get("ZOO_WEIGHTS") or Path(__file__).resolve().parents[2] / "weights")
MANIFEST_NAME = "manifest.json"


def read_manifest(weights_dir: Path | None = None) -> dict[str, dict]:
    """weights/manifest.json: {model name: entry}; an entry gives file, sha256, the class count and
    input channels the weights were trained for, the eval preprocessing, data, recipe, top-1 and
    the command that reproduces them (see ``zoo.weights``)."""
    path = (weights_dir or WEIGHTS_DIR) / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: expected a JSON object of model name -> entry")
    return manifest


def shipped_entry(name: str) -> dict:
    """The manifest entry for ``name``; a one-line error naming the names that have weights."""
    if not (WEIGHTS_DIR / MANIFEST_NAME).is_file():
        raise CheckpointError(
            f"{WEIGHTS_DIR / MANIFEST_NAME}: not found; pretrained=True reads the weights/ folder of a "
            "source checkout (pip install -e .) or the folder named by ZOO_WEIGHTS"
        )
    manifest = read_manifest()
    if name not in manifest:
        have = ", ".join(sorted(manifest)) or "none yet"
        raise CheckpointError(f"no shipped weights for {name!r}; weights/ has: {have}")
    return manifest[name]


def shipped_weights(name: str) -> Path:
    """The file weights/ ships for ``name``, checked against the manifest's sha256."""
    import hashlib

    entry = shipped_entry(name)
    path = WEIGHTS_DIR / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"{path}: listed in {WEIGHTS_DIR / MANIFEST_NAME} for {name!r} but missing")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != entry["sha256"]:
        raise CheckpointError(
            f"{path}: sha256 {digest[:12]}... does not match the manifest's {entry['sha256'][:12]}..."
        )
    return path
