"""The training loop: DeiT's recipe through Accelerate, resumable bit for bit.

Shape of Accelerate's examples (``examples/cv_example.py``): ``prepare`` the model and the
optimizer, ``accumulate`` micro-batches up to the configured global batch, ``backward``, step,
reduce the evaluation counts over processes. What differs, and why:

* The DataLoaders are NOT passed to ``accelerator.prepare``. ``prepare_data_loader`` wraps any
  multi-process loader's batch sampler in ``BatchSamplerShard``, which would shard our
  ``EpochSampler`` a second time (it already yields only this rank's positions), and its
  ``DataLoaderShard`` re-synchronises the global torch RNG from rank 0 at every ``__iter__``,
  an RNG draw that a mid-epoch resume would not replay. So each process builds its own loader
  over the self-sharding sampler and moves batches to ``accelerator.device`` itself.
* No prepared LR scheduler (Accelerate steps a prepared scheduler once per process): the
  learning rate is ``lr_at(step)``, set on the param groups before every update.
* Evaluation reduces the per-process sums (loss, top-1, top-5, count) with
  ``accelerator.reduce`` instead of ``gather_for_metrics``: the latter drops the duplicated
  tail only for prepared loaders, while our evaluation shards (rank r takes r, r + W, ...)
  hold every image exactly once, so summing is exact.

Resume is exact because everything that decides the next update is restored or recomputed:
model, optimizer and loss scaler (Accelerate's ``save_state``), the EMA (``ema.safetensors``),
every process's python / numpy / torch RNG (also ``save_state``; numpy drives Mixup),
Accelerate's accumulation counter,
the position in the epoch's data order (``EpochSampler.set_start``; each sample's augmentation
is seeded from (seed, epoch, position), not from worker state), the learning rate (a function
of the step) and the DataLoader's base seed (its own ``torch.Generator``, so creating an
iterator after a resume draws nothing from the global RNG).

Order of work: everything a run needs (precision, threads, data, model, teacher, checkpoint
paths) is resolved and checked before anything is written, so a bad config leaves no trace;
then the run directory is opened, the parts are prepared, and ``run`` reads top to bottom:
one epoch of training, one evaluation, one checkpoint, until the schedule ends.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, set_seed
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import zoo
from zoo import collect_aux_loss  # MoE load-balancing losses, added after every forward
from zoo.data import EpochSampler, Subset, create_dataset, create_mixup, create_transform
from zoo.data.loader import worker_init
from zoo.models import BASELINES

from ..atomic import atomic_write_text
from ..machine import Machine, ThreadPlan, describe, keep_freed_memory, plan_threads, resolve_precision
from ..names import suggest
from .checkpoint import (
    clean_stale,
    export_weights,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, changed_keys, config_to_yaml
from .metrics import JsonLog, Trackers, plot_curves, read_epochs, topk_correct, tracker_names, truncate_log
from .optim import create_optimizer, lr_at, optimizer_summary
from .strict import ConfigError, to_dict

__all__ = ["LoopState", "RunResult", "TrainingStopped", "evaluate", "run"]


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps); the message says why."""


@dataclass
class RunResult:
    summary: str  # the final one-line summary
    run_dir: Path
    top1: float  # last epoch's validation top-1 (%)
    best_top1: float
    best_epoch: int
    ema_top1: float | None
    epochs_done: int
    steps: int
    wall_s: float
    stopped_by: str | None = None  # "on_epoch" when the caller's callback ended the run early
    # last epoch's balanced error (%, the mean of the per-class error rates) and per-class recall (%)
    balanced_err: float | None = None
    recall: list[float] | None = None
    # where this process's wall time went: startup (until the first step), train (the steps and
    # their data loading), eval, checkpoint, finish (exports, plots); a study's overhead figure
    seconds: dict[str, float] = field(default_factory=dict)
    precision: str | None = None  # as resolved (auto -> bf16/fp32)
    threads: int | None = None  # compute threads


@dataclass
class EpochSums:
    """Running sums of the current epoch (logged, then reset, at its end)."""

    loss: float = 0.0
    steps: int = 0
    skipped: int = 0
    images: int = 0
    time: float = 0.0


@dataclass
class LoopState:
    """Where the loop stands: saved as loop_state.json in every checkpoint, restored on resume."""

    epoch: int = 0  # completed epochs
    micro: int = 0  # micro-batches done in the current epoch
    step: int = 0  # optimizer steps done (skipped ones included)
    consecutive_skips: int = 0
    skipped_total: int = 0
    best_top1: float = -1.0
    best_epoch: int = 0
    num_processes: int = 1
    # CPU compute threads: a resumed run uses the same (float sums depend on the thread count)
    threads: int | None = None
    sums: EpochSums = field(default_factory=EpochSums)
    stop_reason: str | None = None

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> LoopState:
        state = dict(state)
        sums = EpochSums(**state.pop("sums"))
        return cls(**state, sums=sums)


@dataclass
class Setup:
    """Everything a run needs, resolved and checked; nothing written yet."""

    accelerator: Accelerator
    machine: Machine
    precision: str
    precision_why: str
    threads: ThreadPlan
    allocator: str  # what the run's memory allocator was told (zoo.machine.keep_freed_memory)
    resume_from: Path | None
    train_ds: Dataset
    val_ds: Dataset
    train_sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader
    micro: int  # images per forward on this process
    accum: int  # micro-batches per optimizer step
    steps_per_epoch: int
    num_classes: int
    in_chans: int
    model: nn.Module
    teacher: nn.Module | None


@dataclass
class Session:
    """A run in progress: the prepared parts the epoch functions use."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: nn.Module  # as prepared by Accelerate (DDP-wrapped on several processes)
    unwrapped: nn.Module
    optimizer: torch.optim.Optimizer
    ema: ModelEmaV3 | None
    teacher: nn.Module | None
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    mixup: Callable | None
    train_sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader
    micro: int
    accum: int
    steps_per_epoch: int
    meta: dict[str, Any]  # written into every exported weights file's header
    metrics_log: JsonLog
    steps_log: JsonLog
    trackers: Trackers  # Accelerate's experiment trackers (log.trackers)
    precision: str = ""
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("startup", "train", "eval", "checkpoint"), 0.0)
    )

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def ckpt_dir(self) -> Path:
        return self.cfg.run_dir / "checkpoints"


def run(
    cfg: TrainConfig, resume: str | None = None, on_epoch: Callable[[dict[str, Any]], bool] | None = None
) -> RunResult:
    """Train ``cfg``; ``resume`` is None (fresh), ``"auto"`` (newest checkpoint, fresh if none) or a path.

    ``on_epoch(record)`` is called on every process after each evaluation with the record written
    to metrics.jsonl (``epoch``, ``val_err1``, ``val_top1``, ...); when it returns True the run
    ends there, after its checkpoint (an Optuna pruner's decision, say), with ``stopped_by="on_epoch"``.

    Raises ``ConfigError`` for problems with the config (the CLI exits 2), before anything is
    written, and ``TrainingStopped`` when too many consecutive steps were non-finite (after saving
    a checkpoint).
    """
    s: Session | None = None
    try:
        t0 = time.time()
        setup = build(cfg, resume)
        open_run_dir(cfg, setup)
        s = prepare(cfg, setup)
        s.trackers.start(cfg.name, to_dict(cfg), resumed=setup.resume_from is not None)  # before restore's truncation
        st = restore(s, setup.resume_from)
        if cfg.debug.nan_at_steps and s.accelerator.process_index == 0:
            s.criterion = _NanAtSteps(s.criterion, cfg.debug.nan_at_steps, st)
        last, stopped_by = None, None
        s.model.train()
        s.seconds["startup"] = time.time() - t0
        while st.epoch < cfg.train.epochs and not _reached_max_steps(cfg, st):
            t_epoch, checkpoint_s = time.time(), s.seconds["checkpoint"]
            end_of_epoch = train_one_epoch(s, st)
            s.seconds["train"] += time.time() - t_epoch - (s.seconds["checkpoint"] - checkpoint_s)
            last = end_epoch(s, st, end_of_epoch)
            if on_epoch is not None and on_epoch(last):
                stopped_by = "on_epoch"
                break
        return finish(s, st, last, time.time() - t0, stopped_by)
    finally:
        if s is not None:  # closed already unless the run raised (an open MLflow run would refuse the next)
            s.trackers.end()
        # Accelerate keeps its settings (mixed precision, accumulation steps) in process-wide
        # singletons that refuse different values later; forget them so that another run() in this
        # process (tests, notebooks) may choose its own. The process group (PartialState) stays.
        AcceleratorState._reset_state()
        GradientState._reset_state()


# ---- setup: resolve and check everything, write nothing


def build(cfg: TrainConfig, resume: str | None) -> Setup:
    """Precision, threads, data, model and teacher, each checked; a bad value is a ConfigError
    raised before the run directory exists."""
    # Without a GPU, Accelerate sets up a multi-process (gloo) run under torchrun only when told
    # cpu=True; otherwise every process would believe it is alone.
    cpu = not torch.accelerator.is_available()
    state = PartialState(cpu=cpu)
    machine = describe()
    if cfg.train.precision == "fp16" and state.device.type != "cuda":
        raise ConfigError(
            "train.precision: 'fp16' needs a CUDA GPU (it uses a loss scaler); use 'auto', 'bf16' or 'fp32'"
        )
    precision, why = resolve_precision(cfg.train.precision, machine, state.device.type)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    threads = plan_threads(machine, local, cfg.train.num_threads, cfg.data.num_workers)
    if state.device.type == "cpu":
        torch.set_num_threads(threads.threads)
    # ZOO_ALLOCATOR=system keeps glibc's defaults: a setting of the process, not of the recipe
    allocator = os.environ.get("ZOO_ALLOCATOR") or "reuse"
    if allocator not in ("reuse", "system"):
        raise ConfigError(f"ZOO_ALLOCATOR={allocator!r}: expected 'reuse' (the default) or 'system'")
    resume_from = _check_names_and_paths(cfg, resume)
    world, rank = state.num_processes, state.process_index
    micro, accum = _batch_plan(cfg, world)
    train_ds, val_ds = _build_datasets(cfg)
    train_sampler, train_loader, val_loader, steps_per_epoch = _build_loaders(
        cfg, train_ds, val_ds, world, rank, micro, accum, threads.workers, pin=state.device.type == "cuda"
    )

    # Same seed on every process: identical initial weights.
    num_classes, in_chans = len(train_ds.classes), int(val_ds[0][0].shape[0])
    set_seed(cfg.seed)
    model = _create_model(cfg, num_classes, in_chans)
    teacher = None
    if cfg.distill.type != "none":
        if not hasattr(model, "set_distilled_training"):
            raise ConfigError(f"distill.type: {cfg.model.name} has no distillation token; use a *_distilled_* model")
        teacher = _create_teacher(cfg, num_classes, in_chans)
    trackers = tracker_names(cfg.log.trackers, cfg.log.tensorboard)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision={"fp32": "no"}.get(precision, precision),
        gradient_accumulation_steps=accum,
        log_with=trackers or None,
        project_config=ProjectConfiguration(logging_dir=str(cfg.run_dir / "trackers")),
    )
    # the process's allocator changes only once everything above has passed its checks
    allocator = (keep_freed_memory() if allocator == "reuse" else None) or "the system allocator's defaults"
    return Setup(
        accelerator=accelerator,
        machine=machine,
        precision=precision,
        precision_why=why,
        threads=threads,
        allocator=allocator,
        resume_from=resume_from,
        train_ds=train_ds,
        val_ds=val_ds,
        train_sampler=train_sampler,
        train_loader=train_loader,
        val_loader=val_loader,
        micro=micro,
        accum=accum,
        steps_per_epoch=steps_per_epoch,
        num_classes=num_classes,
        in_chans=in_chans,
        model=model,
        teacher=teacher,
    )


def _check_names_and_paths(cfg: TrainConfig, resume: str | None) -> Path | None:
    """Model and teacher names, the teacher's checkpoint, the checkpoint to resume; the latter."""
    _check_model_name(cfg.model.name)
    if cfg.distill.type != "none":
        _check_model_name(cfg.distill.teacher, "distill.teacher")
        if not Path(cfg.distill.teacher_checkpoint).is_file():
            raise ConfigError(f"distill.teacher_checkpoint: no such file {cfg.distill.teacher_checkpoint!r}")
    resume_from = _resolve_resume(resume, cfg.run_dir / "checkpoints")
    if resume_from is None and list_checkpoints(cfg.run_dir / "checkpoints"):
        raise ConfigError(
            f"{cfg.run_dir} already holds checkpoints of an earlier run: add --resume auto to continue "
            "it, or pick another name=... (or delete the directory)"
        )
    return resume_from


def _build_loaders(
    cfg: TrainConfig,
    train_ds: Dataset,
    val_ds: Dataset,
    world: int,
    rank: int,
    micro: int,
    accum: int,
    workers: int,
    pin: bool,
) -> tuple[EpochSampler, DataLoader, DataLoader, int]:
    """This process's train sampler and loaders, and the optimizer steps of an epoch."""
    sampler = EpochSampler(
        train_ds,
        shuffle=True,
        seed=cfg.seed,
        repeats=cfg.data.repeated_aug,
        num_replicas=world,
        rank=rank,
        drop_last=True,
    )
    train_loader = _loader(train_ds, sampler, micro, cfg.seed, workers, drop_last=True, pin=pin)
    val_shard = list(range(rank, len(val_ds), world))
    val_loader = _loader(val_ds, val_shard, 2 * micro, cfg.seed, workers, drop_last=False, pin=pin)
    # Global batches per epoch, the same for any number of processes (the sampler's drop_last
    # cuts the epoch to whole rounds over the ranks). A last incomplete global batch is dropped.
    steps_per_epoch = len(sampler) // (micro * accum)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the training set ({len(train_ds)} images)"
        )
    return sampler, train_loader, val_loader, steps_per_epoch


def open_run_dir(cfg: TrainConfig, setup: Setup) -> None:
    """Create (or reopen) the run directory, write the resolved config, say what the run is."""
    acc, run_dir = setup.accelerator, cfg.run_dir
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_stale(run_dir / "checkpoints")
        if setup.resume_from is None:  # logs of a run killed before its first checkpoint
            for f in ("metrics.jsonl", "steps.jsonl"):
                (run_dir / f).unlink(missing_ok=True)
            # The header record: the machine and what was chosen for it (records without "epoch").
            JsonLog(run_dir / "metrics.jsonl", True).write(
                {
                    "machine": setup.machine.record(),
                    "precision": setup.precision,
                    "precision_why": setup.precision_why,
                    "threads": setup.threads.threads,
                    "loader_workers": setup.threads.workers,
                    "allocator": setup.allocator,
                    "processes": acc.num_processes,
                }
            )
        elif (run_dir / "config.yaml").is_file():
            changed = changed_keys(yaml.safe_load((run_dir / "config.yaml").read_text()), to_dict(cfg))
            if changed:  # allowed (e.g. more epochs, lower lr after a stop), but said out loud
                _print(acc, f"note: resuming with a changed config: {', '.join(changed)}")
        atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
    acc.wait_for_everyone()
    _print(acc, f"machine: {setup.machine.summary()}")
    _print(acc, f"precision: {setup.precision} ({setup.precision_why})")
    _print(acc, f"threads: {setup.threads.summary()}")
    _print(acc, f"memory: {setup.allocator}")
    _print(acc, f"train: {setup.train_ds.describe()}")
    _print(acc, f"val: {setup.val_ds.describe()}")


def prepare(cfg: TrainConfig, setup: Setup) -> Session:
    """EMA, optimizer, Accelerate's wrapping, the loss and the logs."""
    acc, model = setup.accelerator, setup.model
    if setup.teacher is not None:
        model.set_distilled_training(True)
        setup.teacher.requires_grad_(False).eval().to(acc.device)
    model.to(acc.device)
    # The EMA is not registered with Accelerate (which would unpickle it with weights_only=False
    # on resume): save_checkpoint / load_checkpoint keep it as safetensors.
    ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup) if cfg.ema.enabled else None
    optimizer = create_optimizer(model, cfg)
    _print(acc, f"optimizer: {optimizer_summary(cfg.optim)}")
    prepared, optimizer = acc.prepare(model, optimizer)
    mixup = create_mixup(cfg.aug, setup.num_classes)
    criterion = _train_criterion(cfg, mixup is not None)
    # From here on each process draws its own randomness (Mixup, drop path) from seed + rank.
    set_seed(cfg.seed, device_specific=True)
    main, run_dir = acc.is_main_process, cfg.run_dir
    meta = {
        "model": cfg.model.name,
        "num_classes": setup.num_classes,
        "in_chans": setup.in_chans,
        "img_size": cfg.model.img_size or cfg.aug.img_size,
        "config": config_to_yaml(cfg),
    }
    return Session(
        cfg=cfg,
        accelerator=acc,
        model=prepared,
        unwrapped=acc.unwrap_model(prepared),
        optimizer=optimizer,
        ema=ema,
        teacher=setup.teacher,
        criterion=criterion,
        mixup=mixup,
        train_sampler=setup.train_sampler,
        train_loader=setup.train_loader,
        val_loader=setup.val_loader,
        micro=setup.micro,
        accum=setup.accum,
        steps_per_epoch=setup.steps_per_epoch,
        meta=meta,
        metrics_log=JsonLog(run_dir / "metrics.jsonl", main),
        steps_log=JsonLog(run_dir / "steps.jsonl", main),
        trackers=Trackers(acc, run_dir),
        precision=setup.precision,
    )


def restore(s: Session, resume_from: Path | None) -> LoopState:
    """The loop state of a fresh run, or the one a checkpoint holds (with weights, optimizer, RNG)."""
    acc = s.accelerator
    if resume_from is None:
        return LoopState(num_processes=acc.num_processes, threads=torch.get_num_threads())
    st = LoopState.from_json(load_checkpoint(acc, resume_from, s.ema.module if s.ema else None))
    _print(acc, f"resumed from {resume_from} (epoch {st.epoch + 1}, step {st.step})")
    if (
        acc.device.type == "cpu"
        and s.cfg.train.num_threads is None
        and st.threads
        and st.threads != torch.get_num_threads()
    ):
        torch.set_num_threads(st.threads)
        _print(acc, f"threads: {st.threads} compute threads, as the run it resumes (the sums depend on them)")
    if acc.is_main_process:  # a killed run may have logged past its checkpoint; the resumed run redoes that
        truncate_log(s.run_dir / "metrics.jsonl", "epoch", st.epoch)
        truncate_log(s.run_dir / "steps.jsonl", "step", st.step)
    return st


# ---- one epoch of training


def train_one_epoch(s: Session, st: LoopState) -> bool:
    """Train from the state's position to the epoch's end (or to train.max_steps); True at the end."""
    cfg, acc = s.cfg, s.accelerator
    micro_per_epoch = s.steps_per_epoch * s.accum
    s.train_sampler.set_epoch(st.epoch)
    s.train_sampler.set_start(st.micro * s.micro)  # mid-epoch resume: skip what was done
    bar = tqdm(
        total=s.steps_per_epoch,
        initial=st.micro // s.accum,
        desc=f"epoch {st.epoch + 1}/{cfg.train.epochs}",
        disable=not (acc.is_main_process and cfg.log.progress),
        leave=False,
        dynamic_ncols=True,
    )
    t_epoch = time.time()
    micro_losses: list[torch.Tensor] = []
    # islice: the last, incomplete global batch of the epoch is never fetched.
    for x, y in itertools.islice(s.train_loader, micro_per_epoch - st.micro):
        micro_losses.append(_forward_backward(s, x, y))
        st.micro += 1
        if not acc.sync_gradients:
            continue
        # Checkpoints are taken only here, so Accelerate's restored counter stays in step.
        assert st.micro % s.accum == 0, "accumulation counter out of step with the data position"
        loss, lr = _optimizer_step(s, st, micro_losses)
        micro_losses = []
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if st.consecutive_skips >= cfg.train.max_consecutive_skips:
            bar.close()
            st.sums.time += time.time() - t_epoch
            _stop(s, st)
        if _reached_max_steps(cfg, st):
            break
        if (
            cfg.checkpoint.every_steps and st.step % cfg.checkpoint.every_steps == 0 and st.micro < micro_per_epoch
        ):  # the epoch's end has its own checkpoint
            st.sums.time += time.time() - t_epoch
            _checkpoint(s, st)
            t_epoch = time.time()
    bar.close()
    st.sums.time += time.time() - t_epoch
    return st.micro >= micro_per_epoch


def _forward_backward(s: Session, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One micro-batch: forward, loss (with distillation and MoE terms), backward; the loss."""
    acc = s.accelerator
    x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
    if s.mixup is not None:
        x, y = s.mixup(x, y)
    with acc.accumulate(s.model):
        out = s.model(x)
        if s.teacher is not None and isinstance(out, tuple):
            with torch.no_grad(), acc.autocast():
                teacher_logits = s.teacher(x).float()
            loss = _distill_loss(s.cfg, s.criterion(out[0], y), out[1], teacher_logits)
        else:
            loss = s.criterion(out, y)
        loss = loss + collect_aux_loss(s.unwrapped)
        acc.backward(loss)
    return loss.detach().float()


def _optimizer_step(s: Session, st: LoopState, micro_losses: list[torch.Tensor]) -> tuple[float, float]:
    """One optimizer step, or a skip decided identically on every process; (global loss, lr)."""
    cfg, acc = s.cfg, s.accelerator
    lr = lr_at(st.step, s.steps_per_epoch, cfg)
    for g in s.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    grad_norm = acc.clip_grad_norm_(s.model.parameters(), cfg.optim.clip_grad or math.inf)
    # Gradients are all-reduced already, the losses are not: reduce both, so that a NaN on any
    # one process skips the step on all of them.
    flags = torch.stack(
        [torch.stack(micro_losses).mean(), torch.as_tensor(grad_norm, dtype=torch.float32, device=acc.device)]
    )
    flags = acc.reduce(flags, reduction="mean")
    loss, finite = flags[0].item(), bool(torch.isfinite(flags).all())
    if finite:
        s.optimizer.step()
        if s.ema is not None:
            # step only with warm-up: timm's EMA copies the weights at steps 0-1 when given a step;
            # DeiT's EMA decays from the first update.
            s.ema.update(s.unwrapped, step=st.step + 1 if cfg.ema.warmup else None)
        st.consecutive_skips = 0
        st.sums.loss += loss
        st.sums.steps += 1
    else:
        if acc.scaler is not None:
            # fp16: clip_grad_norm_ has unscaled; update() resets that bookkeeping (else the next
            # unscale_ raises) and backs the scale off, as a scaler skip would.
            acc.scaler.update(acc.scaler.get_scale() * acc.scaler.get_backoff_factor())
        st.consecutive_skips += 1
        st.skipped_total += 1
        st.sums.skipped += 1
    s.optimizer.zero_grad(set_to_none=True)
    st.step += 1
    st.sums.images += cfg.train.batch_size
    s.steps_log.write(
        {
            "step": st.step,
            "epoch": st.epoch + 1,
            "loss": loss,
            "lr": lr,
            "grad_norm": flags[1].item(),
            "skipped": not finite,
        }
    )
    return loss, lr


# ---- the end of an epoch: evaluate, log, keep the best, checkpoint


def end_epoch(s: Session, st: LoopState, end_of_epoch: bool) -> dict[str, Any]:
    """Evaluate, log and checkpoint after (part of) an epoch; the metrics record."""
    epoch_done = st.epoch + 1
    t_eval = time.time()
    record = _evaluate_and_log(s, st, epoch_done, partial=not end_of_epoch)
    s.seconds["eval"] += time.time() - t_eval
    ema_bit = f", EMA {record['ema_top1']:.2f}%" if s.ema is not None else ""
    _print(
        s.accelerator,
        f"epoch {epoch_done}/{s.cfg.train.epochs}{'' if end_of_epoch else ' (partial)'}: "
        f"train loss {record['train_loss']:.4f}, val top-1 {record['val_top1']:.2f}%"
        f"{ema_bit}, {record['img_per_s']:.0f} img/s",
    )
    if end_of_epoch:
        st.epoch, st.micro, st.sums = epoch_done, 0, EpochSums()
    _checkpoint(s, st)
    return record


def _evaluate_and_log(s: Session, st: LoopState, epoch_done: int, partial: bool) -> dict[str, Any]:
    # The unwrapped model: DDP's forward would broadcast buffers, a collective that hangs when
    # the ranks' evaluation shards end after different numbers of batches.
    res = evaluate(s.unwrapped, s.val_loader, s.accelerator)
    sums = st.sums
    record = {
        "epoch": epoch_done,
        "step": st.step,
        "train_loss": sums.loss / max(sums.steps, 1),
        "val_loss": res["loss"],
        "val_top1": res["top1"],
        "val_top5": res["top5"],
        "val_err1": 100 - res["top1"],
        "val_balanced_err1": res["balanced_err"],
        "val_recall": res["recall"],
        "lr": s.optimizer.param_groups[0]["lr"],
        "img_per_s": sums.images / max(sums.time, 1e-9),
        "skipped_steps": sums.skipped,
    }
    if s.ema is not None:
        er = evaluate(s.ema.module, s.val_loader, s.accelerator)
        record.update({"ema_loss": er["loss"], "ema_top1": er["top1"], "ema_top5": er["top5"]})
    if partial:
        record["partial"] = True
    s.metrics_log.write(record)
    s.trackers.log(record)
    if res["top1"] > st.best_top1:
        st.best_top1, st.best_epoch = res["top1"], epoch_done
        if s.accelerator.is_main_process:
            export_weights(
                s.unwrapped,
                s.run_dir / "model_best.safetensors",
                {**s.meta, "epoch": epoch_done, "top1": f"{res['top1']:.4f}"},
            )
    return record


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, Any]:
    """Top-1/top-5 (%), mean cross-entropy, balanced error (%: the mean over classes of each
    class's error rate, for imbalanced sets) and per-class recall (%) over the whole validation
    split, all processes."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, top1, top5, n
    confusion: torch.Tensor | None = None  # (true class, predicted class) counts
    for x, y in loader:
        x, y = x.to(accelerator.device, non_blocking=True), y.to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            logits = model(x)
        collect_aux_loss(model)  # drop the MoE losses of eval forwards
        logits = logits.float()
        c1, c5 = topk_correct(logits, y, (1, 5))
        sums += torch.tensor(
            [F.cross_entropy(logits, y, reduction="sum").item(), c1, c5, len(y)],
            dtype=torch.float64,
            device=sums.device,
        )
        k = logits.shape[1]
        counts = torch.bincount(y * k + logits.argmax(1), minlength=k * k).view(k, k)  # (true, predicted)
        confusion = counts if confusion is None else confusion + counts
    sums = accelerator.reduce(sums, reduction="sum")
    if confusion is not None:  # every process saw at least one batch of a non-empty split
        confusion = accelerator.reduce(confusion.to(torch.float64), reduction="sum")
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    out = {"loss": sums[0].item() / n, "top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n}
    if confusion is None:
        return {**out, "balanced_err": float("nan"), "recall": []}
    from zoo.study.statistics import balanced_accuracy, per_class_recall  # the study tables' definitions

    cm = confusion.cpu().numpy()
    recall = [100 * r for r in per_class_recall(cm)]  # nan for a class absent from the split
    return {**out, "balanced_err": 100 * (1 - balanced_accuracy(cm)), "recall": recall}


def _checkpoint(s: Session, st: LoopState) -> None:
    t0 = time.time()
    save_checkpoint(
        s.accelerator, s.ckpt_dir, asdict(st), s.cfg.checkpoint.keep_last, s.ema.module if s.ema is not None else None
    )
    s.seconds["checkpoint"] += time.time() - t0


def _stop(s: Session, st: LoopState) -> None:
    """Too many non-finite steps in a row: save, export the last good weights, say why."""
    first = st.step - st.consecutive_skips + 1
    st.stop_reason = (
        f"{st.consecutive_skips} consecutive steps with a non-finite loss or gradient (steps "
        f"{first}-{st.step}; train.max_consecutive_skips={s.cfg.train.max_consecutive_skips})"
    )
    _checkpoint(s, st)
    if s.accelerator.is_main_process:
        export_weights(s.unwrapped, s.run_dir / "model_last.safetensors", {**s.meta, "stopped": st.stop_reason})
    s.trackers.end()
    raise TrainingStopped(
        f"stopped: {st.stop_reason}; the last good weights are in {s.ckpt_dir} and "
        f"{s.run_dir / 'model_last.safetensors'}"
    )


# ---- the end of the run


def finish(s: Session, st: LoopState, last: dict[str, Any] | None, wall: float, stopped_by: str | None) -> RunResult:
    """Export the last and EMA weights, plot, print and return the summary."""
    cfg, acc = s.cfg, s.accelerator
    t_finish = time.time()
    records = read_epochs(s.run_dir / "metrics.jsonl") if acc.is_main_process or last is None else []
    if last is None:  # resumed a finished run: report from the logs
        last = records[-1] if records else None
    if acc.is_main_process:
        export_weights(s.unwrapped, s.run_dir / "model_last.safetensors", {**s.meta, "step": st.step})
        if s.ema is not None:
            export_weights(s.ema.module, s.run_dir / "model_ema.safetensors", {**s.meta, "step": st.step, "ema": "1"})
        if cfg.log.plot:
            plot_curves(records, s.run_dir / "curves.png", f"{cfg.model.name} on {_dataset_name(cfg)}")
    s.trackers.end()
    acc.wait_for_everyone()
    top1 = last["val_top1"] if last else float("nan")
    ema_top1 = last.get("ema_top1") if last else None
    summary = (
        f"done: {_model_label(cfg)} {_dataset_name(cfg)} {st.epoch} epochs top1 {top1:.1f}% "
        f"(best {st.best_top1:.1f}% @ epoch {st.best_epoch}"
        + (f", ema {ema_top1:.1f}%" if ema_top1 is not None else "")
        + f") {wall:.0f} s"
    )
    if st.epoch < cfg.train.epochs and stopped_by is None:
        summary += f" [stopped at train.max_steps={cfg.train.max_steps}]"
    elif stopped_by is not None:
        summary += f" [stopped by {stopped_by}]"
    if acc.is_main_process:
        print(summary, flush=True)
    return RunResult(
        summary=summary,
        run_dir=s.run_dir,
        top1=top1,
        best_top1=st.best_top1,
        best_epoch=st.best_epoch,
        ema_top1=ema_top1,
        epochs_done=st.epoch,
        steps=st.step,
        wall_s=wall,
        stopped_by=stopped_by,
        balanced_err=last.get("val_balanced_err1") if last else None,
        recall=last.get("val_recall") if last else None,
        seconds={**s.seconds, "finish": time.time() - t_finish},
        precision=s.precision,
        threads=torch.get_num_threads(),
    )


# ---- helpers


def _reached_max_steps(cfg: TrainConfig, st: LoopState) -> bool:
    return cfg.train.max_steps is not None and st.step >= cfg.train.max_steps


def _batch_plan(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(micro batch per process, accumulation steps) that make up ``train.batch_size``."""
    b = cfg.train.batch_size
    if b % world:
        raise ConfigError(f"train.batch_size: {b} is not divisible by the {world} processes")
    per_proc = b // world
    micro = cfg.train.micro_batch_size or per_proc
    if micro > per_proc or per_proc % micro:
        raise ConfigError(
            f"train.micro_batch_size: {micro} must divide the per-process batch {per_proc} "
            f"(train.batch_size {b} / {world} processes)"
        )
    return micro, per_proc // micro


def _check_model_name(name: str, key: str = "model.name") -> None:
    known = zoo.list_models(baselines=True)
    if name not in known:
        raise ConfigError(f"{key}: unknown model {name!r}{suggest(name, known)}")


def _seeded_subset(ds: Dataset, n: int, seed: int) -> Subset:
    """``train.limit_train``/``limit_val``: a fixed seeded subset of ``n`` images. MNIST-5k is stored
    class by class, so a head would be one class; a seeded subset is not."""
    indices = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
    return Subset(ds, indices, f"{ds.name} (seeded subset of {len(ds)})")


def _build_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    try:
        train_ds = create_dataset(cfg.data, "train", create_transform(cfg.aug, is_training=True))
        val_ds = create_dataset(cfg.data, "val", create_transform(cfg.aug, is_training=False))
    except FileNotFoundError as e:
        raise ConfigError(f"data.{e}") from None
    if cfg.train.limit_train is not None and cfg.train.limit_train < len(train_ds):
        train_ds = _seeded_subset(train_ds, cfg.train.limit_train, cfg.seed)
    if cfg.train.limit_val is not None and cfg.train.limit_val < len(val_ds):
        val_ds = _seeded_subset(val_ds, cfg.train.limit_val, cfg.seed)
    return train_ds, val_ds


def _create_model(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    m = cfg.model
    kwargs: dict[str, Any] = dict(
        pretrained=m.pretrained,
        num_classes=num_classes,
        in_chans=in_chans,
        drop_rate=m.drop_rate,
        drop_path_rate=m.drop_path_rate,
        **m.spec,
    )
    if m.img_size is not None and m.name not in BASELINES:  # timm's ResNets take any size and no img_size
        kwargs["img_size"] = m.img_size
    try:
        model = zoo.create_model(m.name, **kwargs)
    except (TypeError, ValueError) as e:  # unknown spec override, a missing or unfit checkpoint
        raise ConfigError(f"model: {m.name}: {str(e).splitlines()[0]}") from None
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _create_teacher(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    try:
        return zoo.create_model(
            cfg.distill.teacher, pretrained=cfg.distill.teacher_checkpoint, num_classes=num_classes, in_chans=in_chans
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"distill.teacher_checkpoint: {str(e).splitlines()[0]}") from None


def _train_criterion(cfg: TrainConfig, mixup_active: bool) -> nn.Module:
    smoothing = cfg.aug.label_smoothing
    if cfg.loss.name == "bce":  # RSB: with Mixup the smoothing is already in the soft targets
        return BinaryCrossEntropy(
            smoothing=0.0 if mixup_active else smoothing, target_threshold=cfg.loss.bce_target_thresh
        )
    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


class _NanAtSteps(nn.Module):
    """``debug.nan_at_steps``: the wrapped loss turns NaN during those optimizer steps (1-based),
    to exercise skip-and-stop without a debug branch in the step code."""

    def __init__(self, criterion: nn.Module, steps: list[int], state: LoopState):
        super().__init__()
        self.criterion, self.steps, self.state = criterion, set(steps), state

    def forward(self, *args) -> torch.Tensor:
        loss = self.criterion(*args)
        return loss * float("nan") if self.state.step + 1 in self.steps else loss


def _distill_loss(
    cfg: TrainConfig, base: torch.Tensor, dist_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """DeiT's DistillationLoss: (1 - alpha) * base + alpha * distillation term."""
    d = cfg.distill
    if d.type == "soft":
        t = d.tau
        kd = (
            F.kl_div(
                F.log_softmax(dist_logits / t, dim=1),
                F.log_softmax(teacher_logits / t, dim=1),
                reduction="sum",
                log_target=True,
            )
            * (t * t)
            / dist_logits.numel()
        )
    else:  # hard: the teacher's argmax is the label of the distillation token
        kd = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
    return base * (1 - d.alpha) + kd * d.alpha


def _loader(ds: Dataset, sampler, batch_size: int, seed: int, workers: int, drop_last: bool, pin: bool) -> DataLoader:
    # Its own generator: the base seed drawn when an iterator is made comes from here, not from
    # the global torch RNG (which a resumed run must find exactly as the checkpoint left it).
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=pin,
        worker_init_fn=worker_init if workers > 0 else None,
        persistent_workers=workers > 0,
        generator=g,
    )


def _resolve_resume(resume: str | None, ckpt_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(ckpt_dir)
    path = Path(resume)
    if not (path / "loop_state.json").is_file():
        raise ConfigError(f"--resume: {resume} is not a checkpoint directory (no loop_state.json)")
    return path


def _print(accelerator: Accelerator, msg: str) -> None:
    if accelerator.is_main_process:
        print(msg, file=sys.stderr, flush=True)


def _model_label(cfg: TrainConfig) -> str:
    """The model name, with the run name and a hint when ``model.spec`` overrides its stages (the
    model is then not the named one, e.g. configs/mnist5k_mixed.yaml)."""
    if not cfg.model.spec:
        return cfg.model.name
    what = "custom stages" if "stages" in cfg.model.spec else "custom spec"
    return f"{cfg.name} ({what} on {cfg.model.name})" if cfg.name else f"{cfg.model.name} ({what})"


def _dataset_name(cfg: TrainConfig) -> str:
    return Path(cfg.data.dataset).name or cfg.data.dataset
