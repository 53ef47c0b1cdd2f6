"""Checkpoints that survive SIGKILL at any moment, and the exported safetensors weights.

A checkpoint is a directory ``<run>/checkpoints/step_00001234/`` holding Accelerate's state
(model, optimizer, per-process RNG, the loss scaler), the EMA weights as ``ema.safetensors``
(written and read here with safetensors, not registered with Accelerate: Accelerate 1.x loads
registered custom objects with ``torch.load(weights_only=False)``, i.e. full pickle), plus
``loop_state.json`` (epoch, step, position in the epoch's data order, skip counters, best
top-1, partial epoch sums). It is written under a hidden temporary name and renamed into place
with ``os.replace`` only when every process has finished writing, so a directory without the
leading dot is always complete; ``--resume auto`` takes the newest one. Old checkpoints are
first renamed away (atomic), then deleted, so a kill during pruning never leaves a half-deleted
checkpoint that looks complete.

Multi-node runs need the run directory on a filesystem all nodes share (as Accelerate's own
``save_state`` assumes: the main process writes the weights, each process its RNG state).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors.torch import load_model, save_model
from torch import nn

from ..atomic import atomic_write, atomic_write_text, fsync_dir

__all__ = [
    "LOOP_STATE",
    "clean_stale",
    "export_weights",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

LOOP_STATE = "loop_state.json"
EMA_STATE = "ema.safetensors"
_NAME = re.compile(r"^step_(\d{8})$")


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / LOOP_STATE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def clean_stale(ckpt_dir: Path) -> None:
    """Remove what a killed run left half-written (temporary and half-pruned directories)."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    trash = path.with_name(f".trash_{path.name}")
    os.replace(path, trash)  # atomic: the checkpoint stops looking complete before it is deleted
    shutil.rmtree(trash, ignore_errors=True)


class _DropAliasWarning(logging.Filter):
    """Accelerate warns, on every save of a model whose modules are shared (WideNet), that it
    "removed shared tensor" keys: the second and later names of one tensor. Loading puts the tensor
    back under every name through the shared module (tests/test_train_checkpoint.py), so the
    warning, a set of dozens of names on each checkpoint, says nothing here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()  # Accelerate prefixes "[RANK i] "


@contextlib.contextmanager
def _aliases_dropped_quietly():
    log, quiet = logging.getLogger("accelerate.utils.other"), _DropAliasWarning()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def save_checkpoint(
    accelerator: Accelerator, ckpt_dir: Path, loop_state: dict[str, Any], keep_last: int, ema: nn.Module | None = None
) -> Path:
    """Every process calls this at the same point; returns the final checkpoint directory.

    ``ema`` (the averaged model, e.g. ``ModelEmaV3.module``) is written as ``ema.safetensors``."""
    final = ckpt_dir / f"step_{loop_state['step']:08d}"
    tmp = ckpt_dir / f".tmp_{final.name}"
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with _aliases_dropped_quietly():
        accelerator.save_state(str(tmp))  # main: model/optimizer/scaler; every process: its RNG
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            _save_model_atomic(ema, tmp / EMA_STATE, None)
        # loop_state.json goes last: its presence marks the directory complete (list_checkpoints).
        atomic_write_text(tmp / LOOP_STATE, json.dumps(loop_state, indent=1, sort_keys=True))
        if final.exists():  # e.g. re-saving the same step after a resume
            _remove(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, ema: nn.Module | None = None) -> dict[str, Any]:
    """Restore Accelerate's state (weights, optimizer, RNG, accelerator.step) and ``ema``'s weights;
    return the loop state."""
    from .strict import ConfigError

    state = json.loads((path / LOOP_STATE).read_text())
    if state.get("num_processes", 1) != accelerator.num_processes:
        raise ConfigError(
            f"--resume: {path} was written by {state['num_processes']} processes; resume it with "
            f"the same number (this run has {accelerator.num_processes}) so data order and RNG match"
        )
    if any(path.glob("custom_checkpoint_*.pkl")):
        raise ConfigError(
            f"--resume: {path} holds pickled custom state (custom_checkpoint_*.pkl, written by an "
            f"older zoo); it is not loaded, as unpickling it can run code: start the run afresh"
        )
    if ema is not None and not (path / EMA_STATE).is_file():
        raise ConfigError(f"--resume: {path} has no {EMA_STATE} (was it written with ema.enabled: false?)")
    accelerator.load_state(str(path))
    if ema is not None:
        load_model(ema, str(path / EMA_STATE), strict=True, device=str(_device_of(ema)))
    return state


def _device_of(model: nn.Module):
    for t in model.state_dict().values():
        return t.device
    return "cpu"


def _save_model_atomic(model: nn.Module, path: Path, metadata: dict[str, str] | None) -> None:
    """``safetensors.torch.save_model`` (stores each shared tensor once), atomically."""
    atomic_write(path, lambda tmp: save_model(model, str(tmp), metadata=metadata))


def export_weights(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Save ``model``'s weights as safetensors (atomically), with ``metadata`` in the header.

    ``safetensors.torch.save_model`` stores a tensor shared by several names (ALBERT/WideNet's
    repeated blocks) once, under one of its names; ``zoo.models.pretrained`` fills the other
    names from it on load.
    """
    _save_model_atomic(model, path, {k: str(v) for k, v in metadata.items()})
