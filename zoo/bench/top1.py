"""Top-1 against the ResNet baseline, every model trained with the same recipe over several seeds.

``python -m zoo.bench top1 --data mnist5k --models zoo_poolformer_mini_32,resnet18 --seeds 3 --epochs 10``

Prints and writes (``--out``, Markdown and CSV) a table: model, params, MACs, top-1 error mean
with its 95 % t interval over seeds, the difference to the ResNet baseline with Welch's 95 %
interval, train time and images/s; and a PNG of top-1 error against params and against throughput.
The recipe is one training config (``--config``, default the MNIST-5k default) for every model:
only the model name and the seed change between runs.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import zoo
from zoo.bench.runs import RunRow, add_recipe_args, train_all
from zoo.bench.stats import diff_ci, fmt_ci, mean_ci

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


def write_csv(table: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in COLUMNS} for r in table)


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m zoo.bench top1", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="zoo_poolformer_mini_32,resnet18", help="comma-separated names")
    p.add_argument("--baseline", default="resnet18", help="the ResNet every model is compared to (always run)")
    add_recipe_args(p, out="runs/bench_top1")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.baseline not in models:
        models.append(args.baseline)  # the baseline row is always there
    for m in models:
        if m not in zoo.list_models(baselines=True):
            print(f"zoo.bench top1: {zoo.models.registry.unknown_model(m)}", file=sys.stderr)
            return 2
    rows = train_all([(m, m, {}) for m in models], args)
    table = summarise(rows, args.baseline)
    text = markdown(table, args.baseline)
    print(text)
    (args.out / "top1.md").write_text(text + "\n")
    write_csv(table, args.out / "top1.csv")
    plot(
        table,
        args.out / "top1.png",
        args.baseline,
        f"{args.data}: top-1 error vs params and throughput ({args.seeds} seeds)",
    )
    print(f"wrote {args.out / 'top1.md'}, {args.out / 'top1.csv'}, {args.out / 'top1.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
