"""Per-epoch and per-step logs (JSON lines, TensorBoard when installed), the curves plot, top-k counts.

Logs are append-only JSON lines written by the main process. A resumed run first rewrites them
without the records past the checkpoint it resumes from (a killed run may have logged an epoch
or steps that the resumed run redoes), so the files read as if the run had never stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text

__all__ = ["JsonLog", "TensorBoard", "plot_curves", "read_epochs", "read_log", "topk_correct", "truncate_log"]


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at classes)."""
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices  # (B, kmax)
    hit = top.eq(target[:, None])  # (B, kmax)
    return [int(hit[:, : min(k, kmax)].any(dim=-1).sum()) for k in ks]


def read_log(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a torn last line (killed mid-write) is ignored."""
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def read_epochs(path: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a metrics.jsonl (without its header record, which has no epoch)."""
    return [r for r in read_log(path) if "epoch" in r]


def truncate_log(path: Path, key: str, upto: int) -> None:
    """Keep only the records with ``record[key] <= upto`` (called on resume)."""
    if path.is_file():
        kept = [r for r in read_log(path) if r.get(key, 0) <= upto]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class JsonLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class TensorBoard:
    """Scalars to ``<run>/tb`` when TensorBoard is installed; silently nothing otherwise."""

    def __init__(self, log_dir: Path, enabled: bool):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                return
            self.writer = SummaryWriter(str(log_dir))

    def scalars(self, record: dict[str, Any], step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(prefix + k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(metrics: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss, top-1 (raw and EMA) and learning rate against epoch, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        return
    ep = [m["epoch"] for m in metrics]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(ep, [m["train_loss"] for m in metrics], label="train (training targets)")
    ax[0].plot(ep, [m["val_loss"] for m in metrics], label="val")
    ax[0].set_title("loss")
    ax[1].plot(ep, [m["val_top1"] for m in metrics], label="top-1")
    ax[1].plot(ep, [m["val_top5"] for m in metrics], label="top-5", alpha=0.6)
    if any("ema_top1" in m for m in metrics):
        ax[1].plot(ep, [m.get("ema_top1", float("nan")) for m in metrics], label="EMA top-1")
    ax[1].set_title("val accuracy (%)")
    ax[2].plot(ep, [m["lr"] for m in metrics])
    ax[2].set_title("learning rate (end of epoch)")
    for a in ax:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    ax[0].legend()
    ax[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
