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
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from timm.loss import (
    BinaryCrossEntropy,
    LabelSmoothingCrossEntropy,
    SoftTargetCrossEntropy,
)
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import zoo
from zoo import collect_aux_loss  # MoE load-balancing losses, added after every forward
from zoo.data import (
    EpochSampler,
    Subset,
    create_dataset,
    create_mixup,
    create_transform,
)
from zoo.data.loader import worker_init

from ..atomic import atomic_write_text
from .checkpoint import (
    clean_stale,
    export_weights,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, config_to_yaml
from .metrics import (
    JsonLog,
    TensorBoard,
    plot_curves,
    read_log,
    topk_correct,
    truncate_log,
)
from .optim import create_optimizer, lr_at
from .strict import ConfigError, to_dict

__all__ = ["RunResult", "TrainingStopped", "run"]


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


def _seeded_subset(ds: Dataset, n: int, seed: int) -> Subset:
    """``train.limit_train``/``limit_val``: a fixed seeded subset of ``n`` images. MNIST-5k is stored
    class by class, so a head would be one class; a seeded subset is not."""
    indices = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
    return Subset(ds, indices, f"{ds.name} (seeded subset of {len(ds)})")


def _threads(cfg: TrainConfig, state: PartialState) -> None:
    if state.device.type != "cpu":
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    torch.set_num_threads(cfg.train.num_threads or max(1, cores // max(1, local)))


def _batch_plan(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(micro batch per process, accumulation steps) that make up ``train.batch_size``."""
    b = cfg.train.batch_size
    if b % world:
        raise ConfigError(f"train.batch_size: {b} is not divisible by the {world} processes")
    per_proc = b // world
    micro = cfg.train.micro_batch_size or per_proc
    if micro > per_proc or per_proc % micro:
        raise ConfigError(f"train.micro_batch_size: {micro} must divide the per-process batch {per_proc} "
                          f"(train.batch_size {b} / {world} processes)")
    return micro, per_proc // micro


def _check_model_name(name: str, key: str = "model.name") -> None:
    known = zoo.list_models(baselines=True)
    if name not in known:
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        raise ConfigError(f"{key}: unknown model {name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))


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
    kwargs: dict[str, Any] = dict(pretrained=m.pretrained, num_classes=num_classes, in_chans=in_chans,
                                  drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate, **m.spec)
    if m.img_size is not None:
        kwargs["img_size"] = m.img_size
    try:
        model = zoo.create_model(m.name, **kwargs)
    except (TypeError, ValueError) as e:  # unknown spec override or a value the model refuses
        raise ConfigError(f"model: {m.name}: {str(e).splitlines()[0]}") from None
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _train_criterion(cfg: TrainConfig, mixup_active: bool) -> nn.Module:
    smoothing = cfg.aug.label_smoothing
    if cfg.loss.name == "bce":  # RSB: with Mixup the smoothing is already in the soft targets
        return BinaryCrossEntropy(smoothing=0.0 if mixup_active else smoothing,
                                  target_threshold=cfg.loss.bce_target_thresh)
    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


def _distill_loss(cfg: TrainConfig, base: torch.Tensor, dist_logits: torch.Tensor,
                  teacher_logits: torch.Tensor) -> torch.Tensor:
    """DeiT's DistillationLoss: (1 - alpha) * base + alpha * distillation term."""
    d = cfg.distill
    if d.type == "soft":
        t = d.tau
        kd = F.kl_div(F.log_softmax(dist_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                      reduction="sum", log_target=True) * (t * t) / dist_logits.numel()
    else:  # hard: the teacher's argmax is the label of the distillation token
        kd = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
    return base * (1 - d.alpha) + kd * d.alpha


def _loader(ds: Dataset, sampler, batch_size: int, cfg: TrainConfig, drop_last: bool, pin: bool) -> DataLoader:
    # Its own generator: the base seed drawn when an iterator is made comes from here, not from
    # the global torch RNG (which a resumed run must find exactly as the checkpoint left it).
    g = torch.Generator().manual_seed(cfg.seed)
    workers = cfg.data.num_workers
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=pin, worker_init_fn=worker_init if workers > 0 else None,
                      persistent_workers=workers > 0, generator=g)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
    """Top-1/top-5 (%) and mean cross-entropy over the whole validation split, all processes."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, top1, top5, n
    for x, y in loader:
        x, y = x.to(accelerator.device, non_blocking=True), y.to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            logits = model(x)
        collect_aux_loss(model)  # drop the MoE losses of eval forwards
        logits = logits.float()
        c1, c5 = topk_correct(logits, y, (1, 5))
        sums += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(), c1, c5, len(y)],
                             dtype=torch.float64, device=sums.device)
    sums = accelerator.reduce(sums, reduction="sum")
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {"loss": sums[0].item() / n, "top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n}


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


def run(cfg: TrainConfig, resume: str | None = None,
        on_epoch: Callable[[dict[str, Any]], bool] | None = None) -> RunResult:
    """Train ``cfg``; ``resume`` is None (fresh), ``"auto"`` (newest checkpoint, fresh if none) or a path.

    ``on_epoch(record)`` is called on every process after each evaluation with the record written
    to metrics.jsonl (``epoch``, ``val_err1``, ``val_top1``, ...); when it returns True the run
    checkpoints and ends there (an Optuna pruner's decision, say), with ``stopped_by="on_epoch"``.

    Raises ``ConfigError`` for problems with the config (the CLI exits 2) and ``TrainingStopped``
    when too many consecutive steps were non-finite (after saving a checkpoint).
    """
    try:
        return _run(cfg, resume, on_epoch)
    finally:
        # Accelerate keeps its settings (mixed precision, accumulation steps) in process-wide
        # singletons that refuse different values later; forget them so that another run() in this
        # process (tests, notebooks) may choose its own. The process group (PartialState) stays.
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _run(cfg: TrainConfig, resume: str | None, on_epoch) -> RunResult:
    t0 = time.time()
    # Without a GPU, Accelerate sets up a multi-process (gloo) run under torchrun only when told
    # cpu=True; otherwise every process would believe it is alone.
    cpu = not torch.accelerator.is_available()
    state = PartialState(cpu=cpu)
    _threads(cfg, state)
    if cfg.train.precision == "fp16" and state.device.type != "cuda":
        raise ConfigError("train.precision: 'fp16' needs a CUDA GPU (it uses a loss scaler); use 'bf16' or 'fp32'")
    _check_model_name(cfg.model.name)
    if cfg.distill.type != "none":
        _check_model_name(cfg.distill.teacher, "distill.teacher")
        if not Path(cfg.distill.teacher_checkpoint).is_file():
            raise ConfigError(f"distill.teacher_checkpoint: no such file {cfg.distill.teacher_checkpoint!r}")
    world, rank = state.num_processes, state.process_index
    micro, accum = _batch_plan(cfg, world)
    precision = {"fp32": "no"}.get(cfg.train.precision, cfg.train.precision)  # Accelerate's spelling
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision, gradient_accumulation_steps=accum)
    device = accelerator.device
    is_main = accelerator.is_main_process

    run_dir = cfg.run_dir
    ckpt_dir = run_dir / "checkpoints"
    resume_from = _resolve_resume(resume, ckpt_dir)
    if resume == "auto" and resume_from is None:
        _print(accelerator, f"--resume auto: no checkpoint in {ckpt_dir}, starting fresh")
    if resume_from is None and list_checkpoints(ckpt_dir):
        raise ConfigError(f"{run_dir} already holds checkpoints of an earlier run: add --resume auto to continue "
                          "it, or pick another name=... (or delete the directory)")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_stale(ckpt_dir)
        if resume_from is None:  # logs of a run killed before its first checkpoint
            for f in ("metrics.jsonl", "steps.jsonl"):
                (run_dir / f).unlink(missing_ok=True)
        if resume_from is not None and (run_dir / "config.yaml").is_file():
            changed = _changed_keys(yaml.safe_load((run_dir / "config.yaml").read_text()), to_dict(cfg))
            if changed:  # allowed (e.g. more epochs, lower lr after a stop), but said out loud
                _print(accelerator, f"note: resuming with a changed config: {', '.join(changed)}")
        atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
    accelerator.wait_for_everyone()

    # ---- data
    train_ds, val_ds = _build_datasets(cfg)
    num_classes = len(train_ds.classes)
    _print(accelerator, f"train: {train_ds.describe()}")
    _print(accelerator, f"val: {val_ds.describe()}")
    in_chans = int(val_ds[0][0].shape[0])
    mixup_fn = create_mixup(cfg.aug, num_classes)
    train_sampler = EpochSampler(train_ds, shuffle=True, seed=cfg.seed, repeats=cfg.data.repeated_aug,
                                 num_replicas=world, rank=rank, drop_last=True)
    pin = device.type == "cuda"
    train_loader = _loader(train_ds, train_sampler, micro, cfg, drop_last=True, pin=pin)
    val_loader = _loader(val_ds, list(range(rank, len(val_ds), world)), 2 * micro, cfg, drop_last=False, pin=pin)
    # Global batches per epoch, the same for any number of processes (the sampler's drop_last
    # cuts the epoch to whole rounds over the ranks). A last incomplete global batch is dropped.
    steps_per_epoch = len(train_sampler) // (micro * accum)
    if steps_per_epoch < 1:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is larger than the training set "
                          f"({len(train_ds)} images)")

    # ---- model, EMA, optimizer (same seed on every process: identical initial weights)
    set_seed(cfg.seed)
    model = _create_model(cfg, num_classes, in_chans)
    teacher = None
    if cfg.distill.type != "none":
        if not hasattr(model, "set_distilled_training"):
            raise ConfigError(f"distill.type: {cfg.model.name} has no distillation token; use a *_distilled_* model")
        model.set_distilled_training(True)
        teacher = zoo.create_model(cfg.distill.teacher, pretrained=cfg.distill.teacher_checkpoint,
                                   num_classes=num_classes, in_chans=in_chans)
        teacher.requires_grad_(False).eval().to(device)
    model.to(device)
    ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup) if cfg.ema.enabled else None
    optimizer = create_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    # The EMA is not registered with Accelerate (which would unpickle it with weights_only=False
    # on resume): save_checkpoint / load_checkpoint keep it as safetensors.
    criterion = _train_criterion(cfg, mixup_fn is not None)
    # From here on each process draws its own randomness (Mixup, drop path) from seed + rank.
    set_seed(cfg.seed, device_specific=True)

    # ---- loop state (restored on resume; RNG and weights by load_state, after all setup)
    loop: dict[str, Any] = {
        "epoch": 0, "micro": 0, "step": 0, "consecutive_skips": 0, "skipped_total": 0,
        "best_top1": -1.0, "best_epoch": 0, "num_processes": world,
        "sums": {"loss": 0.0, "steps": 0, "skipped": 0, "images": 0, "time": 0.0},
        "stop_reason": None,
    }
    if resume_from is not None:
        loop.update(load_checkpoint(accelerator, resume_from, ema.module if ema is not None else None))
        _print(accelerator, f"resumed from {resume_from} (epoch {loop['epoch'] + 1}, step {loop['step']})")
        if is_main:  # a killed run may have logged past its checkpoint; the resumed run redoes that
            truncate_log(run_dir / "metrics.jsonl", "epoch", loop["epoch"])
            truncate_log(run_dir / "steps.jsonl", "step", loop["step"])
    metrics_log = JsonLog(run_dir / "metrics.jsonl", is_main)
    steps_log = JsonLog(run_dir / "steps.jsonl", is_main)
    tb = TensorBoard(run_dir / "tb", cfg.log.tensorboard and is_main)
    meta = {"model": cfg.model.name, "num_classes": num_classes, "in_chans": in_chans,
            "img_size": cfg.model.img_size or cfg.aug.img_size, "config": config_to_yaml(cfg)}
    nan_steps = set(cfg.debug.nan_at_steps)

    def checkpoint() -> None:
        save_checkpoint(accelerator, ckpt_dir, loop, cfg.checkpoint.keep_last,
                        ema.module if ema is not None else None)

    def eval_and_log(epoch_done: int, partial: bool) -> dict[str, Any]:
        # The unwrapped model: DDP's forward would broadcast buffers, a collective that hangs when
        # the ranks' evaluation shards end after different numbers of batches.
        res = evaluate(unwrapped, val_loader, accelerator)
        s = loop["sums"]
        record = {
            "epoch": epoch_done, "step": loop["step"],
            "train_loss": s["loss"] / max(s["steps"], 1), "val_loss": res["loss"],
            "val_top1": res["top1"], "val_top5": res["top5"], "val_err1": 100 - res["top1"],
            "lr": optimizer.param_groups[0]["lr"], "img_per_s": s["images"] / max(s["time"], 1e-9),
            "skipped_steps": s["skipped"],
        }
        if ema is not None:
            er = evaluate(ema.module, val_loader, accelerator)
            record.update({"ema_loss": er["loss"], "ema_top1": er["top1"], "ema_top5": er["top5"]})
        if partial:
            record["partial"] = True
        metrics_log.write(record)
        tb.scalars(record, epoch_done, "epoch/")
        if res["top1"] > loop["best_top1"]:
            loop["best_top1"], loop["best_epoch"] = res["top1"], epoch_done
            if is_main:
                export_weights(unwrapped, run_dir / "model_best.safetensors",
                               {**meta, "epoch": epoch_done, "top1": f"{res['top1']:.4f}"})
        return record

    def stop(reason: str) -> None:
        loop["stop_reason"] = reason
        checkpoint()
        if is_main:
            export_weights(unwrapped, run_dir / "model_last.safetensors", {**meta, "stopped": reason})
        tb.close()
        raise TrainingStopped(f"stopped: {reason}; the last good weights are in {ckpt_dir} and "
                              f"{run_dir / 'model_last.safetensors'}")

    # ---- train
    max_steps = cfg.train.max_steps
    last_record: dict[str, Any] | None = None
    stopped_by = None
    model.train()
    while loop["epoch"] < cfg.train.epochs and not (max_steps is not None and loop["step"] >= max_steps):
        epoch = loop["epoch"]
        micro_per_epoch = steps_per_epoch * accum
        train_sampler.set_epoch(epoch)
        train_sampler.set_start(loop["micro"] * micro)  # mid-epoch resume: skip what was done
        bar = tqdm(total=steps_per_epoch, initial=loop["micro"] // accum, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=not (is_main and cfg.log.progress), leave=False, dynamic_ncols=True)
        t_epoch = time.time()
        micro_losses: list[torch.Tensor] = []
        # islice: the last, incomplete global batch of the epoch is never fetched.
        for x, y in itertools.islice(train_loader, micro_per_epoch - loop["micro"]):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)
            with accelerator.accumulate(model):
                out = model(x)
                if teacher is not None and isinstance(out, tuple):
                    with torch.no_grad(), accelerator.autocast():
                        teacher_logits = teacher(x).float()
                    loss = _distill_loss(cfg, criterion(out[0], y), out[1], teacher_logits)
                else:
                    loss = criterion(out, y)
                loss = loss + collect_aux_loss(unwrapped)
                if loop["step"] + 1 in nan_steps and rank == 0:  # debug.nan_at_steps
                    loss = loss * float("nan")
                micro_losses.append(loss.detach().float())
                accelerator.backward(loss)
            loop["micro"] += 1
            if not accelerator.sync_gradients:
                continue
            # Checkpoints are taken only here, so Accelerate's restored counter stays in step.
            assert loop["micro"] % accum == 0, "accumulation counter out of step with the data position"

            # ---- one optimizer step, or a skip decided identically on every process
            lr = lr_at(loop["step"], steps_per_epoch, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad or math.inf)
            # Gradients are all-reduced already, the losses are not: reduce both, so that a NaN
            # on any one process skips the step on all of them.
            flags = torch.stack([torch.stack(micro_losses).mean(),
                                 torch.as_tensor(grad_norm, dtype=torch.float32, device=device)])
            flags = accelerator.reduce(flags, reduction="mean")
            micro_losses = []
            global_loss, finite = flags[0].item(), bool(torch.isfinite(flags).all())
            if finite:
                optimizer.step()
                if ema is not None:
                    # step only with warm-up: timm's EMA copies the weights at steps 0-1 when given
                    # a step; DeiT's EMA decays from the first update.
                    ema.update(unwrapped, step=loop["step"] + 1 if cfg.ema.warmup else None)
                loop["consecutive_skips"] = 0
                loop["sums"]["loss"] += global_loss
                loop["sums"]["steps"] += 1
            else:
                if accelerator.scaler is not None:
                    # fp16: clip_grad_norm_ has unscaled; update() resets that bookkeeping (else
                    # the next unscale_ raises) and backs the scale off, as a scaler skip would.
                    accelerator.scaler.update(accelerator.scaler.get_scale() * accelerator.scaler.get_backoff_factor())
                loop["consecutive_skips"] += 1
                loop["skipped_total"] += 1
                loop["sums"]["skipped"] += 1
            optimizer.zero_grad(set_to_none=True)
            loop["step"] += 1
            loop["sums"]["images"] += cfg.train.batch_size
            steps_log.write({"step": loop["step"], "epoch": epoch + 1, "loss": global_loss, "lr": lr,
                             "grad_norm": flags[1].item(), "skipped": not finite})
            bar.update(1)
            bar.set_postfix(loss=f"{global_loss:.4f}", lr=f"{lr:.2e}")
            if loop["consecutive_skips"] >= cfg.train.max_consecutive_skips:
                bar.close()
                loop["sums"]["time"] += time.time() - t_epoch
                first = loop["step"] - loop["consecutive_skips"] + 1
                stop(f"{loop['consecutive_skips']} consecutive steps with a non-finite loss or gradient "
                     f"(steps {first}-{loop['step']}; train.max_consecutive_skips={cfg.train.max_consecutive_skips})")
            if max_steps is not None and loop["step"] >= max_steps:
                break
            if (cfg.checkpoint.every_steps and loop["step"] % cfg.checkpoint.every_steps == 0
                    and loop["micro"] < micro_per_epoch):  # the epoch's end has its own checkpoint
                loop["sums"]["time"] += time.time() - t_epoch
                checkpoint()
                t_epoch = time.time()
        bar.close()
        loop["sums"]["time"] += time.time() - t_epoch
        end_of_epoch = loop["micro"] >= micro_per_epoch
        last_record = eval_and_log(epoch + 1, partial=not end_of_epoch)
        ema_bit = f", EMA {last_record['ema_top1']:.2f}%" if ema is not None else ""
        _print(accelerator, f"epoch {epoch + 1}/{cfg.train.epochs}{'' if end_of_epoch else ' (partial)'}: "
                            f"train loss {last_record['train_loss']:.4f}, val top-1 {last_record['val_top1']:.2f}%"
                            f"{ema_bit}, {last_record['img_per_s']:.0f} img/s")
        if end_of_epoch:
            loop["epoch"], loop["micro"] = epoch + 1, 0
            loop["sums"] = {"loss": 0.0, "steps": 0, "skipped": 0, "images": 0, "time": 0.0}
        checkpoint()
        if on_epoch is not None and on_epoch(last_record):
            stopped_by = "on_epoch"
            break

    # ---- finish: exports, plot, summary
    if last_record is None:  # resumed a finished run: report from the logs
        records = read_log(run_dir / "metrics.jsonl")
        last_record = records[-1] if records else None
    if is_main:
        export_weights(unwrapped, run_dir / "model_last.safetensors", {**meta, "step": loop["step"]})
        if ema is not None:
            export_weights(ema.module, run_dir / "model_ema.safetensors", {**meta, "step": loop["step"], "ema": "1"})
        if cfg.log.plot:
            plot_curves(read_log(run_dir / "metrics.jsonl"), run_dir / "curves.png", f"{cfg.model.name} on "
                        f"{_dataset_name(cfg)}")
    tb.close()
    accelerator.wait_for_everyone()
    wall = time.time() - t0
    top1 = last_record["val_top1"] if last_record else float("nan")
    ema_top1 = last_record.get("ema_top1") if last_record else None
    stopped_early = loop["epoch"] < cfg.train.epochs  # train.max_steps ended it
    done_epochs = loop["epoch"]
    summary = (f"done: {_model_label(cfg)} {_dataset_name(cfg)} {done_epochs} epochs top1 {top1:.1f}% "
               f"(best {loop['best_top1']:.1f}% @ epoch {loop['best_epoch']}"
               + (f", ema {ema_top1:.1f}%" if ema_top1 is not None else "") + f") {wall:.0f} s")
    if stopped_early:
        summary += f" [stopped at train.max_steps={cfg.train.max_steps}]"
    if is_main:
        print(summary, flush=True)
    return RunResult(summary=summary, run_dir=run_dir, top1=top1, best_top1=loop["best_top1"],
                     best_epoch=loop["best_epoch"], ema_top1=ema_top1, epochs_done=done_epochs,
                     steps=loop["step"], wall_s=wall, stopped_by=stopped_by)


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _model_label(cfg: TrainConfig) -> str:
    """The model name, with the run name and a hint when ``model.spec`` overrides its stages (the
    model is then not the named one, e.g. configs/mnist5k_mixed.yaml)."""
    if not cfg.model.spec:
        return cfg.model.name
    what = "custom stages" if "stages" in cfg.model.spec else "custom spec"
    return f"{cfg.name} ({what} on {cfg.model.name})" if cfg.name else f"{cfg.model.name} ({what})"


def _dataset_name(cfg: TrainConfig) -> str:
    return Path(cfg.data.dataset).name or cfg.data.dataset

