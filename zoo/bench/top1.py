"""Top-1 against the ResNet baseline, every model trained with the same recipe over several seeds.

``python -m zoo.bench top1 --data mnist5k --models zoo_poolformer_mini_32,resnet18 --seeds 3 --epochs 10``

Prints a table: model, params, MACs, top-1 error mean with its 95 % t interval over seeds, the
difference to the ResNet baseline with Welch's 95 % interval, train time and images/s, and under it
notes (the command, the recipe, the machine). The recipe is one training config (``--config``,
default the MNIST-5k default) for every model: only the model name and the seed change between runs.

The runs go to ``--out`` (default ``runs/bench_top1``); the table to ``--results`` (default
``zoo/bench/results``) as ``NAME.md`` (exactly what is printed; ``python -m zoo.bench readme``
copies it into README.md between ``<!-- results:NAME -->`` markers), ``NAME.csv`` (the rows),
``NAME.json`` (rows, each run, command, commit, CPU, threads, versions) and ``NAME.png`` (top-1
error against params and against throughput); NAME is ``--name``, default ``top1_<data>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import zoo
from zoo.bench.report import RESULTS, command_line, environment, machine_line, stem_part, write_results
from zoo.bench.runs import RunRow, add_recipe_args, dataset_overrides, train_all
from zoo.bench.stats import diff_ci, fmt_ci, mean_ci
from zoo.train import DEFAULT_CONFIG, TrainConfig, load_config

PROG = "python -m zoo.bench top1"

COLUMNS = [
    "model",
    "params_m",
    "gmacs",
    "top1_err",
    "top1_err_ci95",
    "diff_vs_baseline",
    "diff_ci95",
    "seeds",
    "train_s",
    "img_per_s",
]


def summarise(rows: list[RunRow], baseline: str) -> list[dict]:
    """One table row per label: means and intervals over its seeds, difference to ``baseline``."""
    by_label: dict[str, list[RunRow]] = {}
    for r in rows:
        by_label.setdefault(r.label, []).append(r)
    if baseline not in by_label:
        raise ValueError(f"baseline {baseline!r} has no runs")
    base_err = [r.err1 for r in by_label[baseline]]
    table = []
    for label, runs in by_label.items():
        err = [r.err1 for r in runs]
        mean, half = mean_ci(err)
        diff, dhalf = diff_ci(err, base_err)
        table.append(
            {
                "model": label,
                "params_m": runs[0].params / 1e6,
                "gmacs": runs[0].macs / 1e9,
                "top1_err": mean,
                "top1_err_ci95": half,
                "diff_vs_baseline": diff,
                "diff_ci95": dhalf,
                "seeds": len(runs),
                "train_s": statistics.fmean(r.train_s for r in runs),
                "img_per_s": statistics.fmean(r.img_per_s for r in runs),
            }
        )
    return table


def markdown(table: list[dict], baseline: str) -> str:
    lines = [
        "| model | params (M) | GMACs | top-1 err % (95% CI) | vs " + baseline + " (95% CI) | seeds | "
        "train s | img/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table:
        diff = "baseline" if r["model"] == baseline else fmt_ci(r["diff_vs_baseline"], r["diff_ci95"])
        lines.append(
            f"| {r['model']} | {r['params_m']:.2f} | {r['gmacs']:.3f} | {fmt_ci(r['top1_err'], r['top1_err_ci95'])} "
            f"| {diff} | {r['seeds']} | {r['train_s']:.0f} | {r['img_per_s']:.0f} |"
        )
    return "\n".join(lines)


def plot(table: list[dict], path: Path, baseline: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "params_m", "parameters (M)"), (axes[1], "img_per_s", "train images/s")):
        for r in table:
            yerr = None if r["top1_err_ci95"] != r["top1_err_ci95"] else r["top1_err_ci95"]
            ax.errorbar(r[key], r["top1_err"], yerr=yerr, fmt="s" if r["model"] == baseline else "o", capsize=3)
            ax.annotate(
                r["model"].removeprefix("zoo_"),
                (r[key], r["top1_err"]),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 error % (mean, 95% CI)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_results_args(p: argparse.ArgumentParser, name: str) -> None:
    """Where a training benchmark's table goes. Not ``--out``: that is the runs' folder."""
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    p.add_argument("--name", default=None, help=f"results file stem (default: {name})")


def recipe(args: argparse.Namespace) -> TrainConfig:
    """The config every run of the table starts from (raises ConfigError on a bad ``--set``)."""
    epochs = [f"train.epochs={args.epochs}"] if args.epochs is not None else []
    return load_config(args.config, [*dataset_overrides(args.data), *args.set, *epochs])


def recipe_notes(
    args: argparse.Namespace, cfg: TrainConfig, command: str, env: dict[str, Any], versus: str
) -> list[str]:
    """The lines under a training table saying what was measured: command, recipe, seeds, machine;
    ``versus``: what the differences are to."""
    o, t = cfg.optim, cfg.train
    lr = f"lr {o.lr:g}" if o.lr is not None else f"lr {o.base_lr:g} x batch / {o.lr_base_batch}"
    config = args.config or f"{DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[1])} (the default)"
    first, last = args.seed_start, args.seed_start + args.seeds - 1
    seeds = f"seeds {first}-{last}" if last > first else f"seed {first}"
    lines = [
        f"`{command}`",
        f"Recipe {config}: {t.epochs} epochs, {o.name} {lr}, batch {t.batch_size}, precision {t.precision}"
        + (f" (--set {' '.join(args.set)})" if args.set else "")
        + f"; {args.seeds} {seeds}, on {args.data}; top-1 error % on its validation split, mean with the "
        f"95 % t interval over seeds, differences to {versus} with Welch's 95 % interval.",
    ]
    if args.reuse:
        lines.append("Finished runs were read back (--reuse): train s and img/s are the machines' that ran them.")
    return [*lines, machine_line(env)]


def _relative(path: Path) -> str:
    """``path`` as a Markdown link from the working folder (the repo root, for the README)."""
    return os.path.relpath(path) if Path.cwd() in path.resolve().parents else str(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="zoo_poolformer_mini_32,resnet18", help="comma-separated names")
    p.add_argument("--baseline", default="resnet18", help="the ResNet every model is compared to (always run)")
    add_recipe_args(p, out="runs/bench_top1")
    add_results_args(p, "top1_<data>")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.baseline not in models:
        models.append(args.baseline)  # the baseline row is always there
    for m in models:
        if m not in zoo.list_models(baselines=True):
            print(f"zoo.bench top1: {zoo.models.registry.unknown_model(m)}", file=sys.stderr)
            return 2
    try:
        cfg = recipe(args)  # a bad --set fails here, before any training
    except ValueError as e:
        print(f"zoo.bench top1: {e}", file=sys.stderr)
        return 2
    rows = train_all([(m, m, {}) for m in models], args)
    table = summarise(rows, args.baseline)
    stem = args.name or f"top1_{stem_part(args.data)}"
    png = args.results / f"{stem}.png"
    command, env = command_line(PROG, argv), environment(cfg.train.num_threads)
    notes = recipe_notes(args, cfg, command, env, args.baseline)
    notes.append(f"![top-1 error against params and throughput]({_relative(png)})")
    text = markdown(table, args.baseline) + "\n\n" + "\n".join(notes)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    plot(table, png, args.baseline, f"{args.data}: top-1 error vs params and throughput ({args.seeds} seeds)")
    meta = {"command": command, **env, "baseline": args.baseline, "runs": [dataclasses.asdict(r) for r in rows]}
    paths = write_results(args.results, stem, text, table, COLUMNS, meta)
    print(f"results: {', '.join(map(str, [*paths, png]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
