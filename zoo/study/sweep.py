"""Equal-budget studies on Optuna: arms tuned by the same successive-halving bracket at the same
points, their best re-trained over fresh seeds, compared with corrected intervals.

  python -m zoo.study sweep --arms zoo_poolformer_mini_32:adamw,resnet10t:adamw,resnet10t:adamw@default
      --configs 27 --eta 3 --min-epochs 2 --epochs 18 --seeds 5 --data mnist5k

Arms: MODEL:OPTIMIZER[:FIELD=VALUE] (``model.name``, ``optim.name``, one ``model.spec`` change)
or MODEL:OPTIMIZER@default (the optimizer's cited defaults from zoo.train.optim, never tuned:
trained with the finals' seeds, so the table shows what tuning bought).

Budget: one synchronous successive-halving bracket. Rung k trains configs // eta^k configurations
for min_epochs * eta^k epochs (the last rung: --epochs); each is a fresh run whose schedule is
made for its own length; the best 1/eta of a rung (by --metric on the holdout, ties to the lower
slot) are queued for the next rung once every run of the rung has finished (a failed run is
retried first; a diverged run counts as 100 %). Every tuned arm starts from the same points (the
first --configs points of a scrambled Sobol sequence, --qmc-seed), so every arm spends the same
optimizer steps whatever the workers do; the table prints each arm's steps and core-seconds
(wall time x threads) per rung. --min-epochs equal to --epochs (the default) is one rung: every
configuration trains the full budget. --space none trains the recipe itself (no search).

Splits: every tuning run trains on the training images less a --holdout share and is scored on
that holdout; the finals (--seeds fresh seeds of the last rung's best, on all training images)
are the only runs that read the dataset's own validation split, and they only report.

Table (RESULTS/STUDY.{md,csv,json} and plots): per arm the finals' mean with its 95 % t interval,
the difference to --baseline with Welch's interval, a Holm-adjusted p over the table's
comparisons and the interval at the Bonferroni level; robustness (share of first-rung
configurations at or under --bar, Wilson interval; per rung in the JSON); expected best holdout
value against the number of configurations (Dodge et al. 2019, STUDY_expected_best.png); the
majority-class and logistic-regression floors; failed / retried / diverged trials; each arm's
share of trial time spent in training steps; the code versions and precision. With --metric
balanced_err (imbalanced sets) also balanced accuracy and per-class recall.

Storage: an Optuna storage, by default SQLite beside the runs (RUNS/STUDY/study.db),
--storage postgresql+psycopg2://... for many machines. Start the same command in any number of
terminals or machines: each worker takes the next queued trial; a killed worker's trial is failed
by the heartbeat and queued again; a restarted command resumes. The design (arms, space, bracket,
seeds, data, resolved recipe, each optimizer's implementation and hyper-parameters, precision:
`auto` is resolved once, when the study is created) is stored; a command with another design is
refused. --export FILE writes the study to a SQLite file to commit; --import FILE resumes it on
another machine (finished trials kept, running ones failed and retried).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from zoo.bench.report import RESULTS, command_line, environment, stem_part, write_results
from zoo.study import table as tables
from zoo.study.arms import InputError, parse_arms, parse_space
from zoo.study.design import METRICS, Bracket, Plan
from zoo.study.storage import DesignError, Studies, open_storage, saved_design
from zoo.study.worker import work
from zoo.train import ConfigError

PROG = "python -m zoo.study sweep"
SET_BY_THE_STUDY = ("model.name", "optim.name", "model.spec", "train.epochs", "data.holdout", "seed", "name")
SET_BY_THE_STUDY += ("output_dir", "data.dataset")


# ---------------------------------------------------------------- checking the input (no run yet)


def check(plan: Plan) -> dict[str, int]:
    """Build every arm's config and model once (both ends of every range): a ConfigError names
    the bad model, optimizer, spec part or key. Returns each arm's parameter count."""
    from zoo.bench.counts import count_params
    from zoo.data import create_dataset, create_transform
    from zoo.train.loop import _check_model_name

    plan.bracket.check()
    if plan.seeds < 1:
        raise InputError(f"--seeds {plan.seeds}: must be at least 1")
    if plan.metric not in METRICS:
        raise InputError(f"--metric {plan.metric!r}: expected one of {', '.join(METRICS)}")
    if not 0 < plan.holdout < 1:
        raise InputError(f"--holdout {plan.holdout}: must be in (0, 1): trials tune on a share of the training images")
    if plan.baseline not in [a.label for a in plan.arms]:
        raise InputError(f"--baseline {plan.baseline!r}: not one of the arms ({', '.join(a.label for a in plan.arms)})")
    swept = {d.key for d in plan.dims} | set(SET_BY_THE_STUDY)
    for s in plan.sets:
        if s.partition("=")[0].strip() in swept:
            raise InputError(f"--set {s!r}: {s.partition('=')[0]} is set by the study itself")
    params = {}
    data = None
    for arm in plan.arms:
        ends = ("low", "high") if plan.tuned(arm) else ("low",)
        for end in ends:
            point = {d.name: getattr(d, end) for d in plan.dims}
            cfg = plan.config(
                arm, plan.values(arm, point), seed=0, holdout=plan.holdout, epochs=plan.bracket.epochs, name="check"
            )
        _check_model_name(cfg.model.name)
        if data is None:
            try:
                ds = create_dataset(cfg.data, "val", create_transform(cfg.aug, is_training=False))
            except (FileNotFoundError, ValueError) as e:
                raise InputError(f"--data {plan.data!r}: {e}") from None
            data = (len(ds.classes), int(ds[0][0].shape[0]))
        params[arm.label] = count_params(_model_shapes(cfg, *data))
    return params


def _model_shapes(cfg, num_classes: int, in_chans: int):
    """The arm's model on the meta device: its parameters' shapes and its config errors without
    computing the initial weights (a second a model on a slow CPU, for a count); on the CPU for a
    part that reads values when it is built."""
    import torch

    from zoo.train.loop import _create_model

    try:
        with torch.device("meta"):
            return _create_model(cfg, num_classes, in_chans)
    except (NotImplementedError, RuntimeError):  # "Cannot copy out of meta tensor" and the like
        return _create_model(cfg, num_classes, in_chans)


def check_workers(args: argparse.Namespace) -> None:
    """The worker's own options: a heartbeat the storage can keep, a grace longer than it."""
    if args.heartbeat < 1:
        raise InputError(f"--heartbeat {args.heartbeat}: must be at least 1 second")
    if args.grace <= args.heartbeat:
        raise InputError(f"--grace {args.grace}: must exceed --heartbeat {args.heartbeat}, or live trials are failed")
    if args.poll <= 0:
        raise InputError(f"--poll {args.poll}: must be above 0 seconds")
    if args.max_trials is not None and args.max_trials < 1:
        raise InputError(f"--max-trials {args.max_trials}: must be at least 1")


# ---------------------------------------------------------------- the table


def collect(plan: Plan, studies: Studies) -> list[tables.TrialRow]:
    """Every attempt of every slot (surplus claims left out): the table's rows."""
    from optuna.trial import TrialState

    studies.load_existing()
    rows = []
    for label, rung, study in studies.jobs():
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            a = t.user_attrs
            if "surplus" in a or "slot" not in a:
                continue
            prov = a.get("provenance", {})
            rows.append(
                tables.TrialRow(
                    arm=label,
                    kind="final" if rung is None else "tune",
                    rung=rung,
                    slot=a["slot"],
                    state=t.state.name.lower(),
                    value=t.value if t.state == TrialState.COMPLETE else None,
                    params=dict(t.params),
                    seed=a.get("seed", plan.tune_seed),
                    err=a.get("err"),
                    balanced_err=a.get("balanced_err"),
                    recall=a.get("recall"),
                    steps=a.get("steps", 0),
                    epochs=a.get("epochs_done", 0),
                    wall_s=a.get("wall_s", 0.0),
                    core_s=a.get("core_s", 0.0),
                    seconds=a.get("seconds") or {},
                    diverged="diverged" in a,
                    code=prov.get("code"),
                    precision=prov.get("precision"),
                    threads=prov.get("threads"),
                )
            )
    return rows


def study_floors(plan: Plan, studies: Studies, floors_fn: Callable) -> dict:
    """The majority-class and logistic-regression floors, computed once and kept with the study."""
    import dataclasses

    import optuna

    cfg = plan.config(plan.arms[0], plan.values(plan.arms[0], plan.points()[0]), seed=0, holdout=0, epochs=1, name="x")
    key = f"floors:{cfg.aug.img_size}:{plan.holdout}:{cfg.data.split_seed}:{plan.metric}"
    meta = optuna.load_study(study_name=plan.study, storage=studies.storage)
    if key not in meta.user_attrs:
        metric = "balanced_error" if plan.metric == "balanced_err" else "error"
        f = floors_fn(plan.data, cfg.aug.img_size, plan.holdout, cfg.data.split_seed, metric=metric)
        meta.set_user_attr(key, json.loads(json.dumps(dataclasses.asdict(f), default=str)))
    return meta.user_attrs[key]


def report(
    plan: Plan,
    studies: Studies,
    params: dict[str, int],
    bar: float | None,
    results: Path,
    command: str,
    floors_fn: Callable,
) -> str:
    from zoo.study.curves import plot_expected_best

    rows = collect(plan, studies)
    labels = [a.label for a in plan.arms]
    tuned = {a.label: plan.tuned(a) for a in plan.arms}
    baselines = [plan.baseline] + [a.label for a in plan.arms if not a.model.startswith("zoo_")]
    baselines = [b for b in dict.fromkeys(baselines) if tuned[b]]
    bar, why = tables.default_bar(rows, baselines) if bar is None else (bar, "given (--bar)")
    rungs = plan.bracket.rungs()
    table = tables.summarise(
        rows, labels, plan.baseline, bar, rungs=[n for n, _ in rungs], seeds=plan.seeds, tuned=tuned, params=params
    )
    floors = study_floors(plan, studies, floors_fn)
    balanced = plan.metric == "balanced_err"
    floor_rows = [
        ("floor: majority class", floors["majority_balanced_err" if balanced else "majority_err"]),
        (
            f"floor: logistic regression on pixels (C={floors['logreg_C']:g})",
            floors["logreg_balanced_err" if balanced else "logreg_err"],
        ),
    ]
    stem = plan.study
    sens, best_png = results / f"{stem}_sensitivity.png", results / f"{stem}_expected_best.png"
    seeds = plan.final_seeds()
    codes = sorted({r.code for r in rows if r.code})
    precisions = sorted({r.precision for r in rows if r.precision})
    notes = [
        (
            f"Budget per tuned arm: one successive-halving bracket, {plan.bracket} (eta {plan.bracket.eta}), from the "
            f"same {plan.bracket.configs} points of {', '.join(map(str, plan.dims)) or 'no space'} (scrambled Sobol, "
            f"seed {plan.qmc_seed}), tuned on {METRICS[plan.metric]} on a {plan.holdout:g} holdout of the training "
            f"images (seed {plan.tune_seed}); the last rung's best re-trained with seeds {seeds[0]}-{seeds[-1]} on all "
            f"training images and reported on {plan.data}'s own validation split. Untuned arms (@default: the "
            "optimizer's cited defaults) train those seeds only."
        ),
        (
            f"Differences: arm - {plan.baseline}, Welch 95 % interval; Holm p over the table's "
            f"{sum(1 for r in table if not math.isnan(r['p_holm']))} comparisons; the Bonferroni column is the "
            f"interval at the family level. Bar: {bar:.2f} % = {why}; robustness counts first-rung configurations "
            "(same steps each); a diverged trial counts at 100 %. Floors: the same splits and resolution "
            f"({floors.get('img_size')} px), logistic regression's C chosen on the holdout."
        ),
    ]
    for r in table:
        if not r["tuned"]:
            continue
        per = "; ".join(
            f"rung {p['rung']}: {p['configs']} x {rungs[p['rung']][1]} ep, {p['steps']} steps, {p['core_s']:.0f} "
            f"core-s, {p['robust_k']}/{p['robust_n']} under the bar"
            for p in r["per_rung"]
        )
        notes.append(f"{r['arm']}: {per}.")
    overhead = ", ".join(
        f"{r['arm']} {100 * r['train_share']:.0f} %" for r in table if not math.isnan(r["train_share"])
    )
    notes.append(
        "Share of trial wall time in training steps (the rest: start-up, evaluation, checkpoints, exports): "
        f"{overhead or '—'}. "
        f"Precision {', '.join(precisions) or plan.precision}; "
        + (
            f"trials from {len(codes)} code versions: {', '.join(codes)}."
            if len(codes) > 1
            else f"code {codes[0] if codes else '—'}."
        )
    )
    results.mkdir(parents=True, exist_ok=True)
    rel = [os.path.relpath(p) if Path.cwd() in p.resolve().parents else str(p) for p in (sens, best_png)]
    curves = tables.expected_best_curves(rows, [a for a in labels if tuned[a]])
    if plan.dims and curves:
        notes.append(
            f"![first-rung tuning metric against {plan.dims[0].name}]({rel[0]}) ![expected best against configurations]"
            f"({rel[1]})"
        )
        x = next((d for d in plan.dims if d.name == "lr"), plan.dims[0])
        tables.plot(rows, labels, bar, x.name, x.log, sens, f"{plan.study}: first rung, {rungs[0][0]} configurations")
        plot_expected_best(
            curves,
            best_png,
            f"{plan.study}: expected best of n first-rung configurations (Dodge et al. 2019)",
            ylabel=f"expected best holdout {METRICS[plan.metric]} (%)",
        )
    text = tables.markdown(table, plan.baseline, bar, plan.metric, floor_rows, notes)
    threads = max((r.threads or 0 for r in rows), default=0) or None
    meta = {
        "command": command,
        **environment(threads),
        "design": studies.design,
        "bar": bar,
        "bar_rule": why,
        "floors": floors,
        "code_versions": codes,
        "expected_best": curves,
        "trials": [vars(r) for r in rows],
    }
    write_results(results, stem, text, table, tables.COLUMNS, meta)
    return text


# ---------------------------------------------------------------- command line


def _trainer(spec: str) -> Callable:
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)


def build_parser(prog: str = PROG, doc: str | None = __doc__, arms: bool = True) -> argparse.ArgumentParser:
    """The sweep's options; ``arms=False``: without --arms and --baseline (a front-end sets them)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what is compared")
    if arms:
        add_arms_args(g)
    g.add_argument(
        "--space",
        default="lr=1e-4:1e-2:log,weight_decay=1e-3:0.3:log",
        help="NAME=LOW:HIGH[:log|linear],... (lr, weight_decay or any float config key); 'none': the recipe, untuned "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--metric",
        default="err",
        choices=sorted(METRICS),
        help="tuning metric (default: err; balanced_err for an imbalanced set)",
    )
    g = p.add_argument_group("budget (one successive-halving bracket, the same for every tuned arm)")
    g.add_argument("--configs", type=int, default=9, help="configurations at the first rung (default: %(default)s)")
    g.add_argument(
        "--eta", type=int, default=3, help="each rung keeps the best 1/eta, for eta x the epochs (default: 3)"
    )
    g.add_argument(
        "--min-epochs", type=int, default=None, help="epochs of the first rung (default: --epochs: one rung)"
    )
    g.add_argument("--epochs", type=int, default=10, help="epochs of the last rung and the finals (default: 10)")
    g.add_argument("--seeds", type=int, default=5, help="fresh seeds re-training each arm's best (default: 5)")
    g = p.add_argument_group("data and recipe")
    g.add_argument("--data", default="mnist5k", help="mnist5k, digits, elpv, or an image folder")
    g.add_argument("--config", default=None, help="the recipe (default: configs/mnist5k_poolformer.yaml)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    g.add_argument("--holdout", type=float, default=0.2, help="share of the training images the trials tune on")
    g.add_argument("--tune-seed", type=int, default=0, help="the seed of every tuning run (finals use the next ones)")
    g.add_argument("--qmc-seed", type=int, default=0, help="the Sobol scrambling seed")
    g.add_argument("--bar", type=float, default=None, help="robustness bar, %% (default: best first-rung baseline + 1)")
    g = p.add_argument_group("storage and workers")
    g.add_argument("--study", default=None, help="study name (default: sweep_DATA); also the results' file name")
    g.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///RUNS/STUDY/study.db)")
    g.add_argument("--runs", type=Path, default=Path("runs"), help="run directories go to RUNS/STUDY/ARM/")
    g.add_argument("--results", type=Path, default=RESULTS)
    g.add_argument("--heartbeat", type=int, default=30, help="seconds between a worker's heartbeats")
    g.add_argument("--grace", type=int, default=120, help="seconds without one before a trial is failed and retried")
    g.add_argument("--poll", type=float, default=5.0, help="seconds between looks while other workers finish")
    g.add_argument("--max-trials", type=int, default=None, help="stop this worker after N runs (a time-boxed worker)")
    g.add_argument(
        "--import",
        dest="import_file",
        type=Path,
        default=None,
        metavar="FILE",
        help="resume a study exported elsewhere (into a storage that does not hold it yet)",
    )
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--report-only", action="store_true", help="write the table from the storage, train nothing")
    mode.add_argument("--no-report", action="store_true", help="work only; leave the table to another command")
    mode.add_argument(
        "--export",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the study to a SQLite file (to commit), train nothing",
    )
    g.add_argument("--trainer", default="zoo.train:run", help="MODULE:FUNCTION training one config (tests use a fake)")
    return p


def add_arms_args(g) -> None:
    g.add_argument(
        "--arms", required=True, help="comma-separated MODEL:OPTIMIZER[:FIELD=VALUE] or MODEL:OPTIMIZER@default"
    )
    g.add_argument(
        "--baseline", default=None, help="the arm the others are compared to (default: the first ResNet arm)"
    )


def make_plan(args: argparse.Namespace) -> Plan:
    arms = parse_arms(args.arms)
    dims = parse_space(args.space)
    baseline = args.baseline or next((a.label for a in arms if not a.model.startswith("zoo_") and not a.default), None)
    if baseline is None:
        raise InputError("--baseline: no ResNet arm among --arms; add one or name the baseline arm")
    study = args.study or f"sweep_{stem_part(Path(args.data).name or args.data)}"
    min_epochs = args.epochs if args.min_epochs is None else args.min_epochs
    bracket = Bracket(args.configs, args.eta, min_epochs, args.epochs)
    return Plan(
        arms=arms,
        dims=dims,
        bracket=bracket if dims else Bracket(1, max(args.eta, 2), args.epochs, args.epochs),
        seeds=args.seeds,
        data=args.data,
        recipe=args.config,
        sets=list(args.set),
        holdout=args.holdout,
        tune_seed=args.tune_seed,
        qmc_seed=args.qmc_seed,
        metric=args.metric,
        study=study,
        runs=args.runs,
        baseline=baseline,
    )


def parse(argv: list[str]) -> tuple[argparse.Namespace, Plan]:
    args = build_parser().parse_args(argv)
    return args, make_plan(args)


def _fail(message: str) -> int:
    print(f"zoo.study: {(message.splitlines() or [''])[0]}", file=sys.stderr)
    return 2


def main(
    argv: list[str] | None = None,
    train_fn: Callable | None = None,
    floors_fn: Callable | None = None,
    command: str | None = None,
) -> int:
    """The sweep; ``command``: the command line the results record (a front-end's own)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = command or command_line(PROG, argv)
    try:
        args, plan = parse(argv)
        check_workers(args)
        params = check(plan)
        train_fn = train_fn or _trainer(args.trainer)
        if args.import_file is not None:  # before any storage or folder is made
            check_import(args.import_file, plan)
    except (InputError, ConfigError, ImportError, AttributeError, DesignError) as e:
        return _fail(str(e) or type(e).__name__)
    if floors_fn is None:
        from zoo.study.floors import floors as floors_fn
    import optuna
    import sqlalchemy

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url = args.storage
    if url is None:
        (plan.runs / plan.study).mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(plan.runs / plan.study / 'study.db').resolve()}"
    try:
        storage = open_storage(url, args.heartbeat, args.grace)
        if args.import_file is not None:
            imported = import_into(args.import_file, storage, plan.study)
        studies = Studies(plan, storage)
    except (DesignError, InputError) as e:
        return _fail(str(e))
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as e:  # unreachable or malformed: one line
        return _fail(f"--storage {url}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    if args.import_file is not None:
        print(f"imported {args.import_file}: {imported[0]} trials, {imported[1]} interrupted (retried)", flush=True)
    if args.export is not None:
        from zoo.study.transfer import export_study

        n = export_study(storage, plan.study, args.export)
        print(f"exported study {plan.study!r} ({n} trials) to {args.export}", flush=True)
        return 0
    tuned = [a for a in plan.arms if plan.tuned(a)]
    print(
        f"study {plan.study}: {len(plan.arms)} arms ({len(tuned)} tuned: {plan.bracket}), "
        f"then {plan.seeds} seeds each; precision {plan.precision}; storage {url}",
        flush=True,
    )
    if not args.report_only:
        ran = work(plan, studies, train_fn, args.poll, args.max_trials)
        print(f"worker done: {ran} runs here", flush=True)
        if args.max_trials is not None and not all(studies.done(a.label) for a in plan.arms):
            return 0
    if args.no_report:
        return 0
    text = report(plan, studies, params, args.bar, args.results, command, floors_fn)
    print(text, end="")
    print(f"wrote {args.results / plan.study}.{{md,csv,json}} and its plots", flush=True)
    return 0


def check_import(path: Path, plan: Plan) -> None:
    """``--import``: refuse a missing or unreadable file, a file without the study, another design."""
    import sqlalchemy

    from zoo.study.design import diff
    from zoo.study.transfer import read_design

    if not path.is_file():
        raise InputError(f"--import {path}: no such file")
    try:
        saved = read_design(path, plan.study)
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise InputError(f"--import {path}: not a study export ({type(e).__name__})") from None
    if saved is None:
        raise InputError(f"--import {path}: holds no study {plan.study!r} (use --study NAME)")
    plan.precision = saved["precision"]
    design = plan.design()
    if saved != design:
        raise DesignError(f"--import {path}: the study was made with another design ({diff(saved, design)})")


def import_into(path: Path, storage, study: str) -> tuple[int, int]:
    """``--import`` (checked by ``check_import``): refuse a storage that holds the study; copy."""
    from zoo.study.transfer import import_study

    if saved_design(storage, study) is not None:
        raise InputError(f"--import {path}: the storage already holds study {study!r}; import into a fresh one")
    return import_study(path, storage, study)
