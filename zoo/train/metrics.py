"""Per-epoch and per-step logs (JSON lines), experiment trackers, the curves plot, top-k counts.

Logs are append-only JSON lines written by the main process. A resumed run first rewrites them
without the records past the checkpoint it resumes from (a killed run may have logged an epoch
or steps that the resumed run redoes), so the files read as if the run had never stopped.

Experiment trackers are Accelerate's (``log.trackers``: TensorBoard, MLflow, Weights & Biases),
each kept in the run directory, ``<run>/trackers``, and never on a server: MLflow writes a SQLite
store (``mlflow ui --backend-store-uri sqlite:///<run>/trackers/mlflow.db``; MLflow's plain file
store is deprecated), W&B runs offline (``wandb sync <run>/trackers/wandb/offline-run-*`` uploads
it later), TensorBoard writes event files (``tensorboard --logdir <run>/trackers``). They get the
per-epoch record of metrics.jsonl at the optimizer step it was taken (so a partial epoch and the
full one never share a step). A resumed run continues the same MLflow and W&B run (their ids are
kept in ``<run>/trackers/runs.json``) and does not send again what the stopped run had sent:
resume is exact, so those records would be the same numbers (but for a resume with a changed
config, which the loop allows and prints: the redone epochs' new numbers are in metrics.jsonl,
while the trackers keep the first ones); the hyper-parameters are sent once,
at the start (MLflow refuses a changed value; a config changed on resume is printed by the loop),
so a tracker first named on a resume gets the epochs from there on, without them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

from ..atomic import atomic_write_text
from .strict import ConfigError

__all__ = [
    "TRACKERS",
    "JsonLog",
    "Trackers",
    "plot_curves",
    "read_epochs",
    "read_log",
    "topk_correct",
    "tracker_names",
    "truncate_log",
]

# log.trackers: Accelerate's tracker name -> (is it installed, what to pip install). The others
# Accelerate knows (Comet, Aim, ClearML, ...) log to an account or a server of their own.
TRACKERS = {
    "tensorboard": (is_tensorboard_available, "tensorboard"),
    "mlflow": (is_mlflow_available, "mlflow"),
    "wandb": (is_wandb_available, "wandb"),
}


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


def tracker_names(trackers: list[str], tensorboard: bool) -> list[str]:
    """The trackers a run logs to: ``log.trackers``, each installed (else a one-line ConfigError
    naming the pip command), and TensorBoard too when ``log.tensorboard`` and it is installed."""
    for name in trackers:
        installed, package = TRACKERS[name]
        if not installed():
            raise ConfigError(
                f"log.trackers: {name!r} is not installed; pip install {package} (or pip install -e '.[trackers]')"
            )
    soft = ["tensorboard"] if tensorboard and "tensorboard" not in trackers and is_tensorboard_available() else []
    return [*trackers, *soft]


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": x}}`` -> ``{"optim.lr": x}``: the hyper-parameters as the trackers take
    them (scalars; a list or null as its JSON text)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return out


class Trackers:
    """The run's Accelerate trackers, kept under ``<run>/trackers`` (see the module docstring)."""

    def __init__(self, accelerator: Accelerator, run_dir: Path):
        self.accelerator, self.dir = accelerator, run_dir / "trackers"
        self.names = [str(t) for t in accelerator.log_with]  # LoggerType members -> "mlflow", ...
        self.sent_upto = 0  # the last optimizer step whose record the trackers have

    def start(self, name: str, config: dict[str, Any], resumed: bool) -> None:
        """Start (or, ``resumed``, continue) the trackers' runs; ``config``: ``strict.to_dict`` of the run's."""
        acc = self.accelerator
        if not self.names or not acc.is_main_process:
            return
        ids_file = self.dir / "runs.json"
        if resumed:
            ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
            self.sent_upto = max((r["step"] for r in read_epochs(self.dir.parent / "metrics.jsonl")), default=0)
        else:  # what a run killed before its first checkpoint left
            shutil.rmtree(self.dir, ignore_errors=True)
            ids = {}
        self.dir.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, dict[str, Any]] = {}
        if "mlflow" in self.names:
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{(self.dir / 'mlflow.db').resolve()}")
            artifacts = str((self.dir / "mlflow-artifacts").resolve())
            kwargs["mlflow"] = {"logging_dir": artifacts, "run_id": ids.get("mlflow"), "run_name": name}
        if "wandb" in self.names:
            kwargs["wandb"] = {"dir": str(self.dir), "mode": "offline", "name": name}
            if ids.get("wandb"):
                kwargs["wandb"] |= {"id": ids["wandb"], "resume": "allow"}
        acc.init_trackers(name, config=None if resumed else _flat(config), init_kwargs=kwargs)
        if "mlflow" in self.names:
            ids["mlflow"] = acc.get_tracker("mlflow", unwrap=True).info.run_id
        if "wandb" in self.names:
            ids["wandb"] = acc.get_tracker("wandb", unwrap=True).id
        atomic_write_text(ids_file, json.dumps(ids) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        """A metrics.jsonl record's numbers, at its optimizer step (not again after a resume)."""
        step = record["step"]
        if not self.accelerator.trackers or step <= self.sent_upto:
            return
        values = {
            k: v
            for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        self.accelerator.log(values, step=step)
        self.sent_upto = step

    def end(self) -> None:
        """Close every tracker. Not ``Accelerator.end_training``: that also destroys the process
        group, which outlives a run here (another run may follow in this process)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []


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
