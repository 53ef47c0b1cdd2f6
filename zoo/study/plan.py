"""A study's compute plan before its long runs: one short probe run per arm, timed, and the
core-hours its bracket and finals will cost.

  python -m zoo.study plan --arms zoo_poolformer_mini_32:adamw,resnet10t:adamw,resnet10t:adamw@default
      --configs 27 --eta 3 --min-epochs 2 --epochs 18 --seeds 5 --data mnist5k --probe-epochs 1

It takes the sweep's options (the same design: arms, bracket, seeds, data, recipe, --set) and trains
each arm once for --probe-epochs epochs at the first point of the space, on the tuning split, with
the study's pinned precision and the recipe's threads, in a temporary folder (nothing of a stored
study is touched). From the probe's own accounting (the run result's seconds: start-up and finish
once a run; training steps, evaluation and checkpoints per epoch) it prices every run the design
will make: a tuned arm's rungs (configurations x epochs on the tuning split) and its finals
(--seeds x --epochs on the whole training split, so 1 / (1 - holdout) of a tuning epoch's images),
a default arm's finals only. Core-seconds are wall seconds x the run's threads, the unit the
study's table reports, so a plan made with one thread a worker prices two workers as well.

The table goes to RESULTS/STUDY_plan.{md,csv,json} with the machine beside it: a plan is that
machine's; another CPU kind needs its own probe.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from zoo.bench.report import command_line, environment, markdown_table, write_results
from zoo.study.arms import Arm, InputError
from zoo.study.design import Plan
from zoo.study.sweep import _fail, _trainer, build_parser, check, make_plan
from zoo.train import ConfigError

PROG = "python -m zoo.study plan"
COLUMNS = ["arm", "probe_core_s_per_epoch", "probe_core_s_per_run", "runs", "tune_epochs", "final_epochs", "core_h"]


@dataclass(frozen=True)
class Cost:
    """What one arm's probe measured and what the design will spend."""

    arm: str
    per_epoch: float  # core-seconds of one tuning-split epoch (steps, evaluation, checkpoint)
    per_run: float  # core-seconds a run spends once (start-up, finish)
    runs: int
    tune_epochs: int
    final_epochs: int
    core_h: float

    def row(self) -> dict:
        return {
            "arm": self.arm,
            "probe_core_s_per_epoch": round(self.per_epoch, 2),
            "probe_core_s_per_run": round(self.per_run, 2),
            "runs": self.runs,
            "tune_epochs": self.tune_epochs,
            "final_epochs": self.final_epochs,
            "core_h": round(self.core_h, 3),
        }


def spend(plan: Plan, arm: Arm) -> tuple[int, int, int]:
    """(runs, tuning-split epochs, whole-split epochs) the design trains for ``arm``."""
    finals = plan.seeds * plan.bracket.epochs
    if not plan.tuned(arm):
        return plan.seeds, 0, finals
    rungs = plan.bracket.rungs()
    return sum(n for n, _ in rungs) + plan.seeds, sum(n * e for n, e in rungs), finals


def price(plan: Plan, arm: Arm, seconds: dict[str, float], threads: int, probe_epochs: int) -> Cost:
    """An arm's cost from its probe run's seconds (the run result's accounting)."""
    per_epoch = threads * sum(seconds.get(k, 0.0) for k in ("train", "eval", "checkpoint")) / probe_epochs
    per_run = threads * sum(seconds.get(k, 0.0) for k in ("startup", "finish"))
    runs, tune, final = spend(plan, arm)
    whole = final / (1 - plan.holdout)  # a final's epoch sees every training image
    core_s = (tune + whole) * per_epoch + runs * per_run
    return Cost(arm.label, per_epoch, per_run, runs, tune, final, core_s / 3600)


def probe(plan: Plan, arm: Arm, epochs: int, train_fn: Callable) -> tuple[dict[str, float], int]:
    """Train ``arm`` for ``epochs`` at the first point, on the tuning split; its seconds and threads."""
    cfg = plan.config(
        arm, plan.values(arm, plan.points()[0]), seed=plan.tune_seed, holdout=plan.holdout, epochs=epochs, name="probe"
    )
    result = train_fn(cfg, resume=None)
    return dict(result.seconds), int(result.threads)


def markdown(plan: Plan, costs: list[Cost], probe_epochs: int, env: dict) -> str:
    rows = [
        [
            f"`{c.arm}`",
            f"{c.per_epoch:.1f}",
            f"{c.per_run:.1f}",
            str(c.runs),
            str(c.tune_epochs),
            str(c.final_epochs),
            f"{c.core_h:.2f}",
        ]
        for c in costs
    ]
    rows.append(["**total**", "", "", str(sum(c.runs for c in costs)), "", "", f"{sum(c.core_h for c in costs):.2f}"])
    header = ["arm", "core-s / epoch", "core-s / run", "runs", "tuning epochs", "final epochs", "core-hours"]
    table = markdown_table(header, rows, [False, True, True, True, True, True, True])
    notes = (
        f"\nBracket {plan.bracket}, then {plan.seeds} seeds x {plan.bracket.epochs} epochs on the whole training "
        f"split; probes of {probe_epochs} epoch(s) on {plan.data}, precision {plan.precision}, on "
        f"{env['cpu_model']} ({env['cpu_capability']}).\n"
    )
    return table + notes


def main(argv: list[str] | None = None, train_fn: Callable | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(PROG, __doc__)
    parser.add_argument("--probe-epochs", type=int, default=1, help="epochs of each arm's timed probe (default: 1)")
    try:
        args = parser.parse_args(argv)
        plan = make_plan(args)
        if args.probe_epochs < 1:
            raise InputError(f"--probe-epochs {args.probe_epochs}: must be at least 1")
        check(plan)
        train_fn = train_fn or _trainer(args.trainer)
    except (InputError, ConfigError, ImportError, AttributeError) as e:
        return _fail(str(e) or type(e).__name__)
    plan = replace(plan, precision=plan.resolve_precision())
    costs = []
    with tempfile.TemporaryDirectory(prefix="zoo-plan-") as tmp:
        probing = replace(plan, runs=Path(tmp))
        for arm in plan.arms:
            seconds, threads = probe(probing, arm, args.probe_epochs, train_fn)
            cost = price(plan, arm, seconds, threads, args.probe_epochs)
            print(f"[{arm.label}] {cost.per_epoch:.1f} core-s an epoch: {cost.core_h:.2f} core-hours", flush=True)
            costs.append(cost)
    env = environment()
    text = markdown(plan, costs, args.probe_epochs, env)
    meta = {"command": command_line(PROG, argv), **env, "design": plan.design(), "probe_epochs": args.probe_epochs}
    stem = f"{plan.study}_plan"
    write_results(args.results, stem, text, [c.row() for c in costs], COLUMNS, meta)
    print(text, end="")
    print(f"wrote {args.results / stem}.{{md,csv,json}}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
