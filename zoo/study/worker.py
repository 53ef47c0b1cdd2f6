"""A study's worker: take the next queued trial, train it, tell the storage; until the study is done.

A trial is an ordinary training run (``zoo.train.run``, or a stand-in: the ``train_fn`` seam) in
``RUNS/STUDY/ARM/rungK-slotN`` (tuned on the ``holdout`` carved from the training images) or
``RUNS/STUDY/ARM/final-seedS`` (all training images, reported on the dataset's own validation
split, which no tuning decision reads). A trial's value is the study's tuning metric after its
last epoch; a run that diverged counts as the worst (100 %).
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable
from typing import Any

from zoo.study.arms import Arm
from zoo.study.design import Plan
from zoo.study.provenance import provenance
from zoo.study.storage import Heartbeat, Studies, claim
from zoo.study.table import fmt_params
from zoo.train import ConfigError, TrainingStopped, config_to_yaml

WORST = 100.0  # a diverged run's error


def suggest(plan: Plan, arm: Arm, trial) -> dict[str, float]:
    """The trial's point (queued with it: the sampler is never asked); none for an untuned arm."""
    return {d.name: trial.suggest_float(d.name, d.low, d.high, log=d.log) for d in plan.dims} if plan.tuned(arm) else {}


def objective(plan: Plan, arm: Arm, trial, rung: int | None, train_fn: Callable) -> float:
    """Train the trial's run; store what it cost and what produced it; its tuning metric."""
    params = suggest(plan, arm, trial)
    final = rung is None
    seed = trial.user_attrs["seed"] if final else plan.tune_seed
    epochs = plan.bracket.epochs if final else plan.bracket.rungs()[rung][1]
    name = f"final-seed{seed}" if final else f"rung{rung}-slot{trial.user_attrs['slot']}"
    cfg = plan.config(
        arm, plan.values(arm, params), seed=seed, holdout=0.0 if final else plan.holdout, epochs=epochs, name=name
    )
    saved = cfg.run_dir / "config.yaml"
    if saved.is_file() and saved.read_text() != config_to_yaml(cfg):
        raise ConfigError(f"{cfg.run_dir} holds a run of another config: remove it")
    try:
        result = train_fn(cfg, resume="auto")
    except TrainingStopped as e:  # diverged: a setting that does not train, at the worst error
        trial.set_user_attr("diverged", str(e).splitlines()[0])
        trial.set_user_attr("provenance", provenance(plan.precision, cfg.train.num_threads))
        return WORST
    threads = result.threads or cfg.train.num_threads or 1
    wall = result.wall_s + result.seconds.get("finish", 0.0)  # RunResult.wall_s ends before the exports
    err = 100.0 - result.top1
    balanced = result.balanced_err if result.balanced_err is not None else math.nan
    attrs: dict[str, Any] = {
        "err": err,
        "balanced_err": balanced,
        "recall": result.recall,
        "steps": result.steps,
        "epochs_done": result.epochs_done,
        "wall_s": wall,
        "core_s": wall * threads,
        "seconds": result.seconds,
        "run_dir": str(result.run_dir),
        "provenance": provenance(result.precision or plan.precision, threads),
    }
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    value = err if plan.metric == "err" else balanced
    return WORST if math.isnan(value) else value


def run_trial(plan: Plan, studies: Studies, arm: Arm, rung: int | None, study, trial, train_fn: Callable) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr("host", socket.gethostname())
    slot = trial.user_attrs["slot"]
    what = f"final seed {trial.user_attrs['seed']}" if rung is None else f"rung {rung} slot {slot}"
    point = fmt_params(suggest(plan, arm, trial)) or ("cited defaults" if arm.default else "the recipe")
    t0 = time.time()
    print(f"[{arm.label}] {what} at {point}: training", flush=True)
    with Heartbeat(studies.storage, trial):
        try:
            value = objective(plan, arm, trial, rung, train_fn)
        except BaseException:  # already failed when its heartbeat went stale: that error is the one to see
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
    study.tell(trial, value)
    print(f"[{arm.label}] {what}: {plan.metric} {value:.2f} % ({time.time() - t0:.0f} s)", flush=True)


def work(plan: Plan, studies: Studies, train_fn: Callable, poll: float, max_trials: int | None = None) -> int:
    """Run queued trials until every arm's bracket and finals are finished (or ``max_trials``
    have run here); how many ran here."""
    import optuna

    ran = 0
    arms = {a.label: a for a in plan.arms}
    while max_trials is None or ran < max_trials:
        for label in arms:
            studies.advance(label)
        for s in studies.all():
            optuna.storages.fail_stale_trials(s)  # a dead worker's trial: FAIL, queued again
        for label, rung, study in studies.jobs():
            while (trial := claim(study, studies.storage)) is False:
                pass
            if trial is not None:
                run_trial(plan, studies, arms[label], rung, study, trial, train_fn)
                ran += 1
                break
        else:  # nothing queued: queue slots whose trials all failed; done, or wait for the others
            if studies.requeue():
                continue
            for label in arms:  # a rung another worker just completed opens the next one
                studies.advance(label)
            if any(claimable(s) for _, _, s in studies.jobs()):
                continue
            if all(studies.done(a) for a in arms):
                return ran
            time.sleep(poll)
    return ran


def claimable(study) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
