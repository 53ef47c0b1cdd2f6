"""Stand-ins for the study's seams: ``fake_run`` for ``zoo.train.run`` (``--trainer
study_fakes:fake_run`` in a worker process) and ``fake_floors`` for ``zoo.study.floors.floors``.

``fake_run`` keeps ``zoo.train.run``'s contract without the training: a smooth error in lr and
weight decay that falls with the epochs and differs per model and seed, ``STEPS_PER_EPOCH``
optimizer steps an epoch, a state file it resumes from, an optional sleep per epoch
(``FAKE_EPOCH_S``, or a random one in [0, FAKE_JITTER_S) so that workers finish in any order), and
a log of every start, epoch and finish (``FAKE_LOG``) so that a test can count what ran.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

from zoo.study.floors import Floors
from zoo.train import RunResult, TrainingStopped, config_to_yaml

STEPS_PER_EPOCH = 7
CALLS: list = []  # every config fake_run trained in this process


def fake_error(cfg) -> float:
    base = 3 + 6 * (math.log10(cfg.optim.lr) + 2.5) ** 2 + 2 * abs(math.log10(max(cfg.optim.weight_decay, 1e-6)) + 1.5)
    base += {"resnet10t": 3.0, "zoo_vit_mini_32": 1.5}.get(cfg.model.name, 0.0) + 0.37 * (cfg.seed % 5)
    if cfg.model.spec:
        base += 0.5
    return base


def fake_run(cfg, resume=None, on_epoch=None):
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    state = run_dir / "state.json"
    start = 0
    if resume == "auto" and state.is_file():
        start = json.loads(state.read_text())["epoch"]
    CALLS.append(cfg)
    log = os.environ.get("FAKE_LOG")

    def note(line: str) -> None:
        if log:
            with open(log, "a") as f:
                f.write(f"{line} pid={os.getpid()}\n")

    note(f"start {run_dir} {start}")
    if cfg.optim.lr > 0.5:
        raise TrainingStopped("stopped: 10 consecutive steps with a non-finite loss")
    err = 95.0
    jitter = float(os.environ.get("FAKE_JITTER_S", "0"))
    for epoch in range(start + 1, cfg.train.epochs + 1):
        time.sleep(float(os.environ.get("FAKE_EPOCH_S", "0")) + random.random() * jitter)
        err = min(95.0, fake_error(cfg) + 30 / epoch)
        state.write_text(json.dumps({"epoch": epoch}))  # the checkpoint
        note(f"epoch {run_dir} {epoch}")
    note(f"done {run_dir}")
    epochs = cfg.train.epochs
    return RunResult(
        summary="fake",
        run_dir=run_dir,
        top1=100 - err,
        best_top1=100 - err,
        best_epoch=epochs,
        ema_top1=None,
        epochs_done=epochs,
        steps=STEPS_PER_EPOCH * epochs,
        wall_s=0.5 * epochs,
        balanced_err=err + 2.0,
        recall=[100 - err, 100 - err - 4.0],
        seconds={"startup": 0.02, "train": 0.46 * epochs, "eval": 0.03 * epochs, "checkpoint": 0.01 * epochs},
        precision=cfg.train.precision,
        threads=cfg.train.num_threads or 2,
    )


FLOOR_CALLS: list = []


def fake_floors(data, img_size, holdout, seed, *, metric="error"):
    FLOOR_CALLS.append((data, img_size, holdout, seed, metric))
    values = dict(
        data=data,
        img_size=img_size,
        holdout=holdout,
        seed=seed,
        classes=("a", "b"),
        n_train=10,
        n_val=5,
        majority_class="a",
        majority_err=88.5,
        majority_balanced_err=90.0,
        logreg_err=31.5,
        logreg_balanced_err=40.25,
        logreg_C=0.1,
        logreg_per_class_recall=(0.7, 0.5),
        holdout_metric=metric,
        holdout_errs=((0.1, 30.0),),
        converged=True,
    )
    # fields the table does not read (None): the fake follows Floors as it grows
    return Floors(**{f.name: values.get(f.name) for f in dataclasses.fields(Floors)})
