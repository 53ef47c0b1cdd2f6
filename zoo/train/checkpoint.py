"""Checkpoints that survive SIGKILL at any moment, and the exported safetensors weights.

A checkpoint is a directory ``<run>/checkpoints/step_00001234/`` holding Accelerate's state
(model, optimizer, per-process RNG, the EMA registered as a custom object, the loss scaler)
plus ``loop_state.json`` (epoch, step, position in the epoch's data order, skip counters, best
top-1, partial epoch sums). It is written under a hidden temporary name and renamed into place
with ``os.replace`` only when every process has finished writing, so a directory without the
leading dot is always complete; ``--resume auto`` takes the newest one. Old checkpoints are
first renamed away (atomic), then deleted, so a kill during pruning never leaves a half-deleted
checkpoint that looks complete.

Multi-node runs need the run directory on a filesystem all nodes share (as Accelerate's own
``save_state`` assumes: the main process writes the weights, each process its RNG state).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn

__all__ = [
    "LOOP_STATE",
    "atomic_write_text",
    "clean_stale",
    "export_weights",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

LOOP_STATE = "loop_state.json"
_NAME = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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


def save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, loop_state: dict[str, Any], keep_last: int) -> Path:
    """Every process calls this at the same point; returns the final checkpoint directory."""
    final = ckpt_dir / f"step_{loop_state['step']:08d}"
    tmp = ckpt_dir / f".tmp_{final.name}"
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # main: model/optimizer/EMA/scaler; every process: its RNG
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # loop_state.json goes last: its presence marks the directory complete (list_checkpoints).
        atomic_write_text(tmp / LOOP_STATE, json.dumps(loop_state, indent=1, sort_keys=True))
        if final.exists():  # e.g. re-saving the same step after a resume
            _remove(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore Accelerate's state (weights, optimizer, EMA, RNG, accelerator.step); return the loop state."""
    state = json.loads((path / LOOP_STATE).read_text())
    if state.get("num_processes", 1) != accelerator.num_processes:
        from .strict import ConfigError
        raise ConfigError(f"--resume: {path} was written by {state['num_processes']} processes; resume it with "
                          f"the same number (this run has {accelerator.num_processes}) so data order and RNG match")
    accelerator.load_state(str(path))
    return state


def export_weights(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Save ``model``'s weights as safetensors (atomically), with ``metadata`` in the header.

    Tensors are copied one by one: a weight-shared model (ALBERT/WideNet) has several names for
    one tensor, which safetensors refuses to write as shared; copies load back the same.
    """
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    os.replace(tmp, path)

