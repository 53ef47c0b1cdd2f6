"""Training configuration: frozen dataclasses, loaded strictly from YAML plus ``key.sub=value`` overrides.

A config file is a mapping with the sections below (every key optional, defaults are DeiT's
where DeiT has one). ``base: other.yaml`` at the top of a file inherits another file (resolved
relative to it, merged section by section); it is the only key that is not a field.

    name, output_dir, seed
    model:      name, pretrained, img_size, drop_rate, drop_path_rate, spec, grad_checkpointing
    data:       zoo.data.DataConfig      (dataset, root, split, workers, ...)
    aug:        zoo.data.AugmentConfig   (RandAugment, Mixup/CutMix, erasing, repeats, ...)
    train:      epochs, batch_size (global), micro_batch_size (per process), precision, max_steps,
                max_consecutive_skips, num_threads, limit_train, limit_val
    optim:      name, lr | base_lr * batch_size / lr_base_batch, weight_decay, betas, eps, momentum,
                nesterov, clip_grad, no_decay_on_1d, layer_decay
    schedule:   name, update, warmup_epochs, warmup_lr, min_lr
    loss:       name, bce_target_thresh       (label smoothing is aug.label_smoothing, shared with Mixup)
    ema:        enabled, decay, warmup
    distill:    type, teacher, teacher_checkpoint, alpha, tau
    checkpoint: every_steps, keep_last
    log:        progress, tensorboard, plot, trackers
    debug:      nan_at_steps
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from zoo.data import AugmentConfig, DataConfig

from .strict import ConfigError, apply_overrides, bounds, from_dict, to_dict

__all__ = [
    "DEFAULT_CONFIG",
    "EXECUTION_KEYS",
    "CheckpointConfig",
    "DebugConfig",
    "DistillConfig",
    "EmaConfig",
    "LogConfig",
    "LoopConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "changed_keys",
    "config_to_yaml",
    "load_config",
    "recipe_changes",
]

# `python train_vision.py` with no --config trains this (a small zoo model on MNIST-5k).
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "mnist5k_poolformer.yaml"


@dataclass(frozen=True)
class ModelConfig:
    name: str = "zoo_poolformer_mini_32"  # any zoo_* model or a timm ResNet baseline (resnet50, ...)
    pretrained: bool | str = False  # False, True (weights/ manifest) or a checkpoint path
    img_size: int | None = field(default=None, metadata=bounds(ge=8))  # None: the model's default
    drop_rate: float = field(default=0.0, metadata=bounds(ge=0, lt=1))
    drop_path_rate: float = field(default=0.1, metadata=bounds(ge=0, lt=1))
    spec: dict[str, Any] = field(default_factory=dict)  # spec overrides for zoo.create_model (checked there)
    grad_checkpointing: bool = False


@dataclass(frozen=True)
class LoopConfig:
    epochs: int = field(default=300, metadata=bounds(ge=1))
    # Images per optimizer step over all processes; the loop accumulates micro-batches to reach it.
    batch_size: int = field(default=1024, metadata=bounds(ge=1))
    # Images per forward on one process; None: batch_size / processes (no accumulation).
    micro_batch_size: int | None = field(default=None, metadata=bounds(ge=1))
    # auto: bf16 autocast where the device computes bf16 natively (a bf16 GPU; a CPU with
    # AVX512_BF16 or AMX), fp32 elsewhere (zoo.machine.resolve_precision). bf16 forces it,
    # with a warning where it is emulated; fp16 (with a loss scaler) on GPU only; fp32: no autocast.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_steps: int | None = field(default=None, metadata=bounds(ge=1))  # stop early (the schedule ignores it)
    # Non-finite loss/gradients skip the step; this many in a row saves, stops and says why.
    max_consecutive_skips: int = field(default=10, metadata=bounds(ge=1))
    # CPU compute threads per process; None: the cores this process may use, shared among the
    # processes on this machine, minus the loader workers (zoo.machine.plan_threads).
    num_threads: int | None = field(default=None, metadata=bounds(ge=1))
    # Train / evaluate on a fixed seeded subset of this many images (CI-sized runs, quick trials).
    limit_train: int | None = field(default=None, metadata=bounds(ge=1))
    limit_val: int | None = field(default=None, metadata=bounds(ge=1))


@dataclass(frozen=True)
class OptimConfig:
    # Library, fixed hyper-parameters and their sources: zoo.train.optim.OPTIMIZERS. muon: torch's
    # Muon on the blocks' 2-D weights, AdamW on the rest.
    name: Literal["adamw", "sgd", "lamb", "lion", "kron", "soap", "shampoo", "shampoo_plain", "sm3", "muon"] = "adamw"
    lr: float | None = field(default=None, metadata=bounds(gt=0))  # absolute; None: the scaling rule
    base_lr: float = field(default=5e-4, metadata=bounds(gt=0))  # DeiT: lr = 5e-4 * batch / 512
    lr_base_batch: int = field(default=512, metadata=bounds(ge=1))
    weight_decay: float = field(default=0.05, metadata=bounds(ge=0))
    # The fields below are read by some optimizers only; setting one that optim.name does not read
    # is an error (validate). Their defaults are the libraries' (sources in OPTIMIZERS).
    betas: tuple[float, float] = (0.9, 0.999)  # adamw, lamb, muon's AdamW part (lion, soap: fixed, see OPTIMIZERS)
    eps: float = field(default=1e-8, metadata=bounds(gt=0))  # adamw, lamb, muon's AdamW part
    momentum: float = field(default=0.9, metadata=bounds(ge=0, lt=1))  # sgd, kron
    nesterov: bool = True  # sgd
    # soap: eigenbasis refresh every N steps; shampoo, shampoo_plain: inverse roots every N steps;
    # kron: preconditioner update every N steps (None: each one's default, OPTIMIZERS).
    precondition_frequency: int | None = field(default=None, metadata=bounds(ge=1))
    # shampoo (Anil et al. 2020) only; None: the defaults in OPTIMIZERS["shampoo"]. graft_type: whose
    # per-layer step size the Shampoo direction takes (a pytorch-optimizer LayerWiseGrafting name);
    # block_size: largest preconditioner block; start_preconditioning_step: first step that uses the
    # preconditioners (before it, the graft's own update; None: precondition_frequency + 1).
    graft_type: str | None = None
    block_size: int | None = field(default=None, metadata=bounds(ge=1))
    start_preconditioning_step: int | None = field(default=None, metadata=bounds(ge=1))
    clip_grad: float | None = field(default=None, metadata=bounds(gt=0))  # max global grad norm
    # No weight decay on 1-d params (norms, biases) nor on model.no_weight_decay() names (tokens,
    # position embeddings): DeiT's rule.
    no_decay_on_1d: bool = True
    # Layer-wise lr decay (BEiT): the lr of layer i of n (stem 0, blocks by the model's
    # group_matcher, head n-1) is scaled by layer_decay ** (n - 1 - i). None: off; 0.65-0.75 is the
    # BEiT / DeiT III / ConvNeXt fine-tuning value. Every optimizer reads it (timm's param groups).
    layer_decay: float | None = field(default=None, metadata=bounds(gt=0, le=1))

    def validate(self) -> None:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: each must be in [0, 1), got {list(self.betas)}")
        # Which optimizer reads which field is zoo.train.optim's table (imported here: optim imports config).
        from dataclasses import fields

        from .optim import OPTIMIZERS, check_shampoo_fields, per_optimizer_fields

        def shown(v: Any) -> str:  # as YAML writes it
            return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(to_dict(v))

        defaults = {f.name: f.default for f in fields(self)}
        for key in per_optimizer_fields():
            if key not in OPTIMIZERS[self.name].reads and getattr(self, key) != defaults[key]:
                users = [n for n, spec in OPTIMIZERS.items() if key in spec.reads]
                raise ValueError(
                    f"{key}: optim.name {self.name!r} does not use it (read by {', '.join(users)}); "
                    f"leave it at its default {shown(defaults[key])}"
                )
        check_shampoo_fields(self)


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["cosine", "constant"] = "cosine"
    # "step": the lr moves every optimizer step; "epoch": once per epoch, as DeiT steps timm's scheduler.
    update: Literal["step", "epoch"] = "step"
    warmup_epochs: float = field(default=5.0, metadata=bounds(ge=0))
    warmup_lr: float = field(default=1e-6, metadata=bounds(ge=0))
    min_lr: float = field(default=1e-5, metadata=bounds(ge=0))


@dataclass(frozen=True)
class LossConfig:
    name: Literal["ce", "bce"] = "ce"  # bce: "ResNet strikes back" binary cross-entropy
    bce_target_thresh: float | None = field(default=None, metadata=bounds(ge=0, le=1))  # bce only


@dataclass(frozen=True)
class EmaConfig:
    enabled: bool = True
    decay: float = field(default=0.99996, metadata=bounds(ge=0, lt=1))
    warmup: bool = False  # timm's EMA warm-up (decay ramps up with the step)


@dataclass(frozen=True)
class DistillConfig:
    type: Literal["none", "hard", "soft"] = "none"  # DeiT distillation through the dist token
    teacher: str | None = None  # model name for zoo.create_model
    teacher_checkpoint: str | None = None  # its weights (a file create_model(pretrained=...) reads)
    alpha: float = field(default=0.5, metadata=bounds(ge=0, le=1))  # weight of the distillation term
    tau: float = field(default=1.0, metadata=bounds(gt=0))  # soft distillation temperature

    def validate(self) -> None:
        if self.type != "none" and not (self.teacher and self.teacher_checkpoint):
            raise ValueError(
                f"teacher: distill.type {self.type!r} needs distill.teacher and distill.teacher_checkpoint"
            )


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int | None = field(default=None, metadata=bounds(ge=1))  # also save every N steps
    keep_last: int = field(default=3, metadata=bounds(ge=1))


@dataclass(frozen=True)
class LogConfig:
    progress: bool = True  # tqdm bar on the main process
    # Also TensorBoard when it is installed (through Accelerate, as log.trackers: [tensorboard] does,
    # which requires it): the soft default that stored configs carry.
    tensorboard: bool = True
    plot: bool = True  # curves.png at the end
    # Accelerate's experiment trackers that get the per-epoch metrics, each kept under
    # <run>/trackers (MLflow: a local SQLite store; W&B: offline): zoo.train.metrics.Trackers.
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=list)

    def validate(self) -> None:
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError(f"trackers: each tracker once, got {self.trackers}")


@dataclass(frozen=True)
class DebugConfig:
    # Inject a NaN loss on process 0 at these optimizer steps (1-based), to exercise skip-and-stop.
    nan_at_steps: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TrainConfig:
    name: str = "mnist5k_poolformer"  # the run directory is <output_dir>/<name>
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"name: must be a plain directory name, got {self.name!r}")
        if self.distill.type != "none" and self.model.name.startswith("resnet"):
            raise ValueError("distill: distillation needs a model with a distillation token")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"base: circular inheritance through {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"base: expected a file name, got {base!r}")
        data = _merge(_read_yaml(path.parent / base, (*seen, path.resolve())), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read ``path`` (default: the MNIST-5k PoolFormer config), apply overrides, build strictly.

    Raises ``ConfigError`` with a one-line message naming the offending key.
    """
    data = _read_yaml(Path(path) if path is not None else DEFAULT_CONFIG)
    apply_overrides(data, list(overrides))
    if "base" in data:
        raise ConfigError("base: only allowed at the top of a config file, not as an override")
    return from_dict(TrainConfig, data)


# How a run executes on a machine, not what it trains: two configs that differ only here are
# the same recipe (a shipped checkpoint's command stays its command on any machine).
EXECUTION_KEYS = (
    "data.num_workers",
    "train.num_threads",
    "log.progress",
    "log.tensorboard",
    "log.plot",
    "log.trackers",
)


def recipe_changes(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Dotted keys whose values differ between two configs, execution settings aside."""
    return [k for k in changed_keys(to_dict(a), to_dict(b)) if k not in EXECUTION_KEYS]


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (``strict.to_dict`` of each)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (``load_config`` reads it back to an equal config)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
