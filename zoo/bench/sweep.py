"""Equal-budget sweeps on Optuna: arms tuned with the same trials, re-trained over fresh seeds.

``python -m zoo.bench sweep --arms zoo_poolformer_mini_32:adamw,resnet10t:adamw --trials 8 --seeds 3
--epochs 10 --data mnist5k --space lr=1e-4:1e-2:log,weight_decay=1e-3:0.3:log``

An arm is MODEL:OPTIMIZER[:FIELD=VALUE] (``model.name``, ``optim.name``, one ``model.spec`` change).
Every arm gets the same budget: ``--trials`` tuning runs at the same points of the declared space
(the first N points of a scrambled Sobol sequence with ``--qmc-seed``, the sequence Optuna's
QMCSampler draws from, enqueued by slot so that arm A's trial n and arm B's trial n train at the
same point whatever the workers do). A trial is an ordinary training run (``zoo.train.run``, run
directory ``RUNS/STUDY/ARM/trial-N``) tuned on a ``--holdout`` share of the *training* images;
it reports its validation error after each epoch to a median pruner (``--no-prune``: off). Once
an arm's budget is done, its best config is re-trained with ``--seeds`` fresh seeds on all
training images and evaluated on the dataset's own validation split, never read while tuning.

The study lives in an Optuna storage: by default SQLite beside the runs (RUNS/STUDY/study.db),
``--storage postgresql+psycopg2://...`` for many machines. Start the same command in any number
of terminals or machines: each worker takes the next queued trial, a killed worker's trial is
failed by the heartbeat (``--heartbeat``/``--grace``) and queued again (its run resumes from its
checkpoint where the run directory is shared), a restarted command resumes the study, and no
slot is trained twice (a duplicate claim gives itself up). The design (arms, space, budget,
epochs, data, config) is stored with the study; a command with another design is refused.

When every arm is done, the table (``zoo.bench.sweep_table``) is written to RESULTS/STUDY.{md,csv,
json} with the sensitivity and distribution plots (``--report-only``: write it from the storage,
train nothing). ``python -m zoo.bench readme`` copies the Markdown into README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zoo.bench import sweep_table
from zoo.bench.report import RESULTS, command_line, environment, write_results
from zoo.bench.runs import dataset_overrides
from zoo.bench.sweep_storage import (
    DesignError,
    Heartbeat,
    Studies,
    claim,
    ensure_slots,
    finished,
    open_storage,
)
from zoo.train import ConfigError, TrainingStopped, config_to_yaml, load_config

PROG = "python -m zoo.bench sweep"
ALIASES = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "wd": "optim.weight_decay"}
FIXED = ("log.progress=false", "log.plot=false")  # many workers share a terminal


class InputError(ValueError):
    """Bad input: one line, exit 2, before any trial runs."""


@dataclass(frozen=True)
class Arm:
    model: str
    optim: str
    change: tuple[str, Any] | None = None  # one model.spec field

    @property
    def label(self) -> str:
        return f"{self.model}:{self.optim}" + (f":{self.change[0]}={self.change[1]}" if self.change else "")

    @property
    def slug(self) -> str:  # its folder under the sweep's runs
        return "".join(c if c.isalnum() or c in "-_.=" else "-" for c in self.label.replace(":", "-"))

    def overrides(self) -> list[str]:
        spec = {self.change[0]: self.change[1]} if self.change else {}
        return [
            f"model.name={self.model}",
            f"optim.name={self.optim}",
            "model.spec=" + yaml.safe_dump(spec, default_flow_style=True, width=10**6).strip(),
        ]


def parse_arms(text: str) -> list[Arm]:
    arms = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise InputError(f"--arms {item!r}: expected MODEL:OPTIMIZER[:FIELD=VALUE]")
        change = None
        if len(parts) == 3:
            key, sep, value = parts[2].partition("=")
            if not (sep and key and value):
                raise InputError(f"--arms {item!r}: the spec change must be FIELD=VALUE")
            change = (key, yaml.safe_load(value))
        arms.append(Arm(parts[0], parts[1], change))
    if not arms:
        raise InputError("--arms: no arm given")
    if len({a.label for a in arms}) < len(arms):
        raise InputError(f"--arms: an arm is given twice in {text!r}")
    return arms


@dataclass(frozen=True)
class Dim:
    """One dimension of the search space: a float config key between low and high."""

    name: str
    key: str
    low: float
    high: float
    log: bool

    def __str__(self) -> str:
        return f"{self.name}={self.low:g}:{self.high:g}:{'log' if self.log else 'linear'}"

    def value(self, u: float) -> float:
        """The point u in [0, 1) of the normalised space, to 4 significant digits."""
        v = (
            math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
            if self.log
            else self.low + u * (self.high - self.low)
        )
        return float(f"{min(max(v, self.low), self.high):.4g}")

    def unit(self, v: float) -> float:
        """The normalised coordinate of value v (the inverse of ``value``, before rounding)."""
        if self.log:
            return (math.log(v) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (v - self.low) / (self.high - self.low)


def parse_space(text: str) -> list[Dim]:
    dims = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, rng = item.partition("=")
        parts = rng.split(":")
        if not sep or len(parts) not in (2, 3):
            raise InputError(f"--space {item!r}: expected NAME=LOW:HIGH[:log|linear]")
        scale = parts[2] if len(parts) == 3 else "log"
        try:
            low, high = float(parts[0]), float(parts[1])
        except ValueError:
            raise InputError(f"--space {item!r}: LOW and HIGH must be numbers") from None
        if scale not in ("log", "linear"):
            raise InputError(f"--space {item!r}: scale must be log or linear, got {scale!r}")
        if not low < high:
            raise InputError(f"--space {item!r}: empty or inverted range ({low:g} to {high:g})")
        if scale == "log" and low <= 0:
            raise InputError(f"--space {item!r}: a log range must be above 0")
        key = ALIASES.get(name, name)
        if "." not in key:
            raise InputError(f"--space {name!r}: not a config key (use section.key, or one of {sorted(ALIASES)})")
        dims.append(Dim(name, key, low, high, scale == "log"))
    if not dims:
        raise InputError("--space: empty search space")
    if len({d.key for d in dims}) < len(dims):
        raise InputError(f"--space {text!r}: a key is given twice")
    return dims


@dataclass
class Plan:
    """The design of one sweep (what the storage must agree with) and where it runs."""

    arms: list[Arm]
    dims: list[Dim]
    trials: int
    seeds: int
    epochs: int
    data: str
    recipe: str | None  # the base config file (None: the default)
    sets: list[str]
    holdout: float
    tune_seed: int
    qmc_seed: int
    prune: bool
    prune_startup: int
    prune_after: int
    study: str
    runs: Path
    baseline: str

    def points(self) -> list[dict[str, float]]:
        """Slot n -> the params of the n-th point of the scrambled Sobol sequence (every arm's)."""
        from scipy.stats import qmc

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # balance properties want a power of 2: noted, not needed
            u = qmc.Sobol(len(self.dims), scramble=True, rng=self.qmc_seed).random(self.trials)
        return [{d.name: d.value(float(x)) for d, x in zip(self.dims, row)} for row in u]

    def final_seeds(self) -> list[int]:
        """Fresh seeds: every tuning trial trains with ``tune_seed``."""
        return [self.tune_seed + 1 + i for i in range(self.seeds)]

    def config(self, arm: Arm, params: dict[str, float], *, seed: int, holdout: float, name: str):
        over = [
            *dataset_overrides(self.data),
            *FIXED,
            *self.sets,
            *arm.overrides(),
            f"train.epochs={self.epochs}",
            f"data.holdout={holdout}",
            f"seed={seed}",
            f"name={name}",
            f"output_dir={self.runs / self.study / arm.slug}",
        ]
        over += [f"{d.key}={params[d.name]:.6e}" for d in self.dims]
        return load_config(self.recipe, over)

    def design(self) -> dict[str, Any]:
        def fingerprint(arm: Arm) -> str:  # the resolved recipe, wherever the runs go
            cfg = self.config(arm, self.points()[0], seed=self.tune_seed, holdout=self.holdout, name="x")
            text = config_to_yaml(cfg).replace(str(self.runs / self.study / arm.slug), "RUNS")
            return hashlib.sha256(text.encode()).hexdigest()[:16]

        design = {
            "arms": [a.label for a in self.arms],
            "space": [str(d) for d in self.dims],
            "trials": self.trials,
            "seeds": self.seeds,
            "epochs": self.epochs,
            "data": self.data,
            "holdout": self.holdout,
            "tune_seed": self.tune_seed,
            "qmc_seed": self.qmc_seed,
            "sets": self.sets,
            "prune": {"on": self.prune, "startup_trials": self.prune_startup, "after_epoch": self.prune_after},
            "config": {a.label: fingerprint(a) for a in self.arms},
        }
        return json.loads(json.dumps(design))


# ---------------------------------------------------------------- checking the input (no run yet)


def check(plan: Plan) -> dict[str, int]:
    """Build every arm's config and model once (both ends of every range): a ConfigError names
    the bad model, optimizer, spec part or key. Returns each arm's parameter count."""
    from zoo.bench.counts import count_params
    from zoo.data import create_dataset, create_transform
    from zoo.train.loop import _check_model_name, _create_model

    if plan.trials < plan.seeds:
        raise InputError(f"--trials {plan.trials}: the budget is below the {plan.seeds} seeds of the final runs")
    for name, v in (("--trials", plan.trials), ("--seeds", plan.seeds), ("--epochs", plan.epochs)):
        if v < 1:
            raise InputError(f"{name} {v}: must be at least 1")
    if not 0 < plan.holdout < 1:
        raise InputError(f"--holdout {plan.holdout}: must be in (0, 1): trials tune on a share of the training images")
    if plan.baseline not in [a.label for a in plan.arms]:
        raise InputError(f"--baseline {plan.baseline!r}: not one of the arms ({', '.join(a.label for a in plan.arms)})")
    swept = {d.key for d in plan.dims} | {
        "model.name",
        "optim.name",
        "model.spec",
        "train.epochs",
        "data.holdout",
        "seed",
        "name",
        "output_dir",
        "data.dataset",
    }
    for s in plan.sets:
        if s.partition("=")[0].strip() in swept:
            raise InputError(f"--set {s!r}: {s.partition('=')[0]} is set by the sweep itself")
    params = {}
    data = None
    for arm in plan.arms:
        for end in ("low", "high"):
            cfg = plan.config(
                arm, {d.name: getattr(d, end) for d in plan.dims}, seed=0, holdout=plan.holdout, name="check"
            )
        _check_model_name(cfg.model.name)
        if data is None:
            try:
                ds = create_dataset(cfg.data, "val", create_transform(cfg.aug, is_training=False))
            except (FileNotFoundError, ValueError) as e:
                raise InputError(f"--data {plan.data!r}: {e}") from None
            data = (len(ds.classes), int(ds[0][0].shape[0]))
        params[arm.label] = count_params(_create_model(cfg, *data))
    return params


# ---------------------------------------------------------------- the worker


def objective(plan: Plan, arm: Arm, trial, train_fn: Callable) -> float:
    """One training run at the trial's point: a tuning trial on the holdout (pruned on its
    per-epoch error), or a final run with a fresh seed on the full training split."""
    import optuna

    params = {d.name: trial.suggest_float(d.name, d.low, d.high, log=d.log) for d in plan.dims}
    final = trial.user_attrs["kind"] == "final"
    seed = trial.user_attrs["seed"] if final else plan.tune_seed
    name = f"final-seed{seed}" if final else f"trial-{trial.user_attrs['slot']}"
    cfg = plan.config(arm, params, seed=seed, holdout=0.0 if final else plan.holdout, name=name)
    saved = cfg.run_dir / "config.yaml"
    if saved.is_file() and saved.read_text() != config_to_yaml(cfg):
        raise ConfigError(f"{cfg.run_dir} holds a run of another config: remove it")

    last: dict[str, Any] = {}

    def on_epoch(record: dict) -> bool:
        last.update(record)
        if final:
            return False
        trial.report(record["val_err1"], record["epoch"])
        # never at the last epoch: stopping there saves nothing and would only relabel a finished trial
        return plan.prune and record["epoch"] < plan.epochs and trial.should_prune()

    try:
        result = train_fn(cfg, resume="auto", on_epoch=on_epoch)
    except TrainingStopped as e:  # diverged: a setting that does not train, at 100 % error
        trial.set_user_attr("diverged", str(e).splitlines()[0])
        return 100.0
    for k, v in {
        "wall_s": result.wall_s,
        "epochs_done": result.epochs_done,
        "run_dir": str(result.run_dir),
        "last_err": last.get("val_err1", 100.0 - result.top1),
    }.items():
        trial.set_user_attr(k, v)
    if result.stopped_by == "on_epoch":
        raise optuna.TrialPruned()
    return 100.0 - result.top1


def run_trial(plan: Plan, studies: Studies, arm: Arm, study, trial, train_fn: Callable) -> None:
    import optuna
    from optuna.trial import TrialState

    trial.set_user_attr("host", socket.gethostname())
    kind, slot = trial.user_attrs["kind"], trial.user_attrs["slot"]
    what = f"final seed {trial.user_attrs['seed']}" if kind == "final" else f"trial {slot + 1}/{plan.trials}"
    point = sweep_table.fmt_params({d.name: trial.suggest_float(d.name, d.low, d.high, log=d.log) for d in plan.dims})
    t0 = time.time()
    print(f"[{arm.label}] {what} at {point}: training", flush=True)
    with Heartbeat(studies.storage, trial):
        try:
            err = objective(plan, arm, trial, train_fn)
        except optuna.TrialPruned:
            last = trial.user_attrs.get("last_err", math.nan)
            study.tell(trial, state=TrialState.PRUNED)
            print(
                f"[{arm.label}] {what}: pruned after epoch {trial.user_attrs.get('epochs_done')} of {plan.epochs} "
                f"(err {last:.2f} %, {time.time() - t0:.0f} s)",
                flush=True,
            )
            return
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
    study.tell(trial, err)
    print(f"[{arm.label}] {what}: err {err:.2f} % ({time.time() - t0:.0f} s)", flush=True)


def work(plan: Plan, studies: Studies, train_fn: Callable, poll: float) -> int:
    """Run queued trials until every arm's tuning and final runs are finished; returns how many ran here."""
    import optuna

    ran = 0
    arms = {a.label: a for a in plan.arms}
    while True:
        for s in studies.all():
            optuna.storages.fail_stale_trials(s)  # a dead worker's trial: FAIL, queued again
        # Tuning first, the least advanced arm first; then the finals of arms whose budget is done.
        order = sorted(plan.arms, key=lambda a: (len(finished(studies.tune[a.label])), plan.arms.index(a)))
        jobs = [(a, studies.tune[a.label]) for a in order]
        jobs += [(a, f) for a in plan.arms if (f := studies.final_study(a.label)) is not None]
        for arm, study in jobs:
            while (trial := claim(study, studies.storage)) is False:
                pass
            if trial is not None:
                run_trial(plan, studies, arm, study, trial, train_fn)
                ran += 1
                break
        else:  # nothing queued: re-queue slots whose trials all failed; done, or wait for the others
            queued = sum(ensure_slots(studies.tune[a], studies.tune_slots()) for a in arms)
            queued += sum(ensure_slots(studies.final[a], studies.final_slots(a)) for a in studies.final)
            if queued:
                continue
            if all(
                studies.tune_done(a)
                and studies.final_study(a) is not None
                and len(finished(studies.final[a], "COMPLETE")) >= plan.seeds
                for a in arms
            ):
                return ran
            time.sleep(poll)


# ---------------------------------------------------------------- the table


def collect(plan: Plan, studies: Studies) -> list[sweep_table.TrialRow]:
    rows = []
    for arm in plan.arms:
        for kind, study in (("tune", studies.tune[arm.label]), ("final", studies.final_study(arm.label))):
            for slot, t in sorted(finished(study).items()) if study is not None else ():
                a = t.user_attrs
                rows.append(
                    sweep_table.TrialRow(
                        arm=arm.label,
                        kind=kind,
                        slot=slot,
                        state=t.state.name.lower(),
                        err=t.value if t.state.name == "COMPLETE" else None,
                        last_err=a.get("last_err"),
                        params={d.name: t.params[d.name] for d in plan.dims},
                        seed=a.get("seed", plan.tune_seed),
                        epochs_done=a.get("epochs_done", 0),
                        wall_s=a.get("wall_s", 0.0),
                        diverged="diverged" in a,
                    )
                )
    return rows


def report(
    plan: Plan, studies: Studies, params: dict[str, int], bar: float | None, results: Path, argv: list[str]
) -> str:
    rows = collect(plan, studies)
    labels = [a.label for a in plan.arms]
    baselines = [plan.baseline] + [a.label for a in plan.arms if not a.model.startswith("zoo_")]
    if bar is None:
        bar, why = sweep_table.default_bar(rows, list(dict.fromkeys(baselines)))
    else:
        why = "given (--bar)"
    table = sweep_table.summarise(
        rows, labels, plan.baseline, bar, budget=plan.trials, seeds=plan.seeds, epochs=plan.epochs, params=params
    )
    tune = [r for r in rows if r.kind == "tune"]
    saved = sum(r["epochs_saved"] for r in table)
    full = len(tune) * plan.epochs
    wall = sum(r.wall_s for r in rows)
    stem = plan.study
    sens, dist = results / f"{stem}_sensitivity.png", results / f"{stem}_trials.png"
    seeds = plan.final_seeds()
    notes = [
        (
            f"Budget per arm: {plan.trials} trials of {plan.epochs} epochs at the same points of "
            f"{', '.join(map(str, plan.dims))} (scrambled Sobol, seed {plan.qmc_seed}), tuned on a {plan.holdout:g} "
            f"holdout of the training images (seed {plan.tune_seed}); each arm's best config re-trained with seeds "
            f"{seeds[0]}-{seeds[-1]} on all training images and reported on {plan.data}'s own validation split."
        ),
        (
            f"Bar: {bar:.2f} % = {why}. A pruned trial counts as not reaching the bar (the median pruner stops only "
            "trials worse than the median at that epoch); the median trial error takes it at its last reported error; "
            "a diverged trial counts at 100 %."
        ),
        (
            f"Pruning (median, after {plan.prune_startup} finished trials, from epoch {plan.prune_after}) "
            f"saved {saved} "
            f"of {full} tuning epochs ({saved / full:.0%})."
            if plan.prune and full
            else "Pruning off."
        )
        + f" Training time {wall:.0f} s over {len(rows)} runs.",
    ]
    results.mkdir(parents=True, exist_ok=True)
    rel = [os.path.relpath(p) if Path.cwd() in p.resolve().parents else str(p) for p in (sens, dist)]
    notes.append(f"![tuning error against {plan.dims[0].name}]({rel[0]}) ![tuning errors per arm]({rel[1]})")
    text = sweep_table.markdown(table, plan.baseline, bar, notes)
    x = next((d for d in plan.dims if d.name == "lr"), plan.dims[0])
    sweep_table.plot(rows, labels, bar, x.name, x.log, sens, dist, f"{plan.study}: {plan.trials} trials an arm")
    threads = plan.config(plan.arms[0], plan.points()[0], seed=0, holdout=0.0, name="x").train.num_threads
    meta = {
        "command": command_line(PROG, argv),
        **environment(threads),
        "design": plan.design(),
        "bar": bar,
        "bar_rule": why,
        "epochs_saved": saved,
        "epochs_full": full,
        "trials": [vars(r) for r in rows],
    }
    write_results(results, stem, text, table, sweep_table.COLUMNS, meta)
    return text


# ---------------------------------------------------------------- command line


def _trainer(spec: str) -> Callable:
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)


def parse(argv: list[str]) -> tuple[argparse.Namespace, Plan]:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", required=True, help="comma-separated MODEL:OPTIMIZER[:FIELD=VALUE]")
    p.add_argument(
        "--space",
        default="lr=1e-4:1e-2:log,weight_decay=1e-3:0.3:log",
        help="NAME=LOW:HIGH[:log|linear],... (lr, weight_decay or any float config key)",
    )
    p.add_argument("--trials", type=int, default=8, help="tuning trials per arm (the budget)")
    p.add_argument("--seeds", type=int, default=3, help="fresh seeds re-training each arm's best config")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--data", default="mnist5k", help="mnist5k, digits, or an image folder")
    p.add_argument("--config", default=None, help="the recipe (default: configs/mnist5k_poolformer.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument(
        "--baseline", default=None, help="the arm the others are compared to (default: the first ResNet arm)"
    )
    p.add_argument(
        "--bar", type=float, default=None, help="robustness bar, tuning error %% (default: best baseline + 1)"
    )
    p.add_argument("--holdout", type=float, default=0.2, help="share of the training images the trials tune on")
    p.add_argument("--tune-seed", type=int, default=0, help="the seed of every tuning trial (finals use the next ones)")
    p.add_argument("--qmc-seed", type=int, default=0, help="the Sobol scrambling seed")
    p.add_argument("--no-prune", action="store_true", help="train every trial to the end")
    p.add_argument("--prune-startup", type=int, default=4, help="finished trials before the pruner may stop one")
    p.add_argument("--prune-after", type=int, default=2, help="first epoch at which a trial may be pruned")
    p.add_argument("--study", default=None, help="study name (default: sweep_DATA); also the results' file name")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///RUNS/STUDY/study.db)")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="run directories go to RUNS/STUDY/ARM/")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--heartbeat", type=int, default=30, help="seconds between a worker's heartbeats")
    p.add_argument(
        "--grace", type=int, default=120, help="seconds without one before a trial is failed and queued again"
    )
    p.add_argument("--poll", type=float, default=5.0, help="seconds between looks while other workers finish")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--report-only", action="store_true", help="write the table from the storage, train nothing")
    mode.add_argument("--no-report", action="store_true", help="work only; leave the table to another command")
    p.add_argument("--trainer", default="zoo.train:run", help="MODULE:FUNCTION training one config (tests use a fake)")
    args = p.parse_args(argv)
    arms = parse_arms(args.arms)
    dims = parse_space(args.space)
    baseline = args.baseline or next((a.label for a in arms if not a.model.startswith("zoo_")), None)
    if baseline is None:
        raise InputError("--baseline: no ResNet arm among --arms; add one or name the baseline arm")
    data = Path(args.data).name or args.data
    study = args.study or f"sweep_{''.join(c if c.isalnum() or c in '-_' else '_' for c in data)}"
    plan = Plan(
        arms=arms,
        dims=dims,
        trials=args.trials,
        seeds=args.seeds,
        epochs=args.epochs,
        data=args.data,
        recipe=args.config,
        sets=list(args.set),
        holdout=args.holdout,
        tune_seed=args.tune_seed,
        qmc_seed=args.qmc_seed,
        prune=not args.no_prune,
        prune_startup=args.prune_startup,
        prune_after=args.prune_after,
        study=study,
        runs=args.runs,
        baseline=baseline,
    )
    return args, plan


def main(argv: list[str] | None = None, train_fn: Callable | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, plan = parse(argv)
        params = check(plan)
        train_fn = train_fn or _trainer(args.trainer)
    except (InputError, ConfigError, ImportError, AttributeError) as e:
        print(f"zoo.bench sweep: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    import optuna
    import sqlalchemy

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url = args.storage
    if url is None:
        (plan.runs / plan.study).mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(plan.runs / plan.study / 'study.db').resolve()}"
    try:
        studies = Studies(plan, open_storage(url, args.heartbeat, args.grace))
    except DesignError as e:
        print(f"zoo.bench sweep: {e}", file=sys.stderr)
        return 2
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as e:  # unreachable or malformed: one line
        print(
            f"zoo.bench sweep: --storage {url}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}", file=sys.stderr
        )
        return 2
    print(
        f"sweep {plan.study}: {len(plan.arms)} arms x {plan.trials} trials of {plan.epochs} epochs, "
        f"space {', '.join(map(str, plan.dims))}, then {plan.seeds} seeds each; storage {url}",
        flush=True,
    )
    if not args.report_only:
        ran = work(plan, studies, train_fn, args.poll)
        print(f"worker done: {ran} runs here", flush=True)
    if args.no_report:
        return 0
    text = report(plan, studies, params, args.bar, args.results, argv)
    print(text, end="")
    print(f"wrote {args.results / plan.study}.{{md,csv,json}} and its plots", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
