"""The sweep's table from its trials: best config, final error over fresh seeds, robustness, plots.

Pure functions of a list of ``TrialRow`` (what the storage holds, read by ``zoo.bench.sweep``), so
that every figure of the table can be checked on a hand-made list.

Counting rules (stated in the table's notes too):
* robustness = share of an arm's tuning trials whose tuning error is <= the bar, with a Wilson
  95 % interval; a pruned trial counts as NOT reaching the bar (the median pruner stops only a
  trial worse than the median of the finished ones at that epoch), whatever its last error;
* the median trial error takes a pruned trial at its last reported error (an earlier epoch's,
  usually above what it would have reached: pessimistic);
* a trial whose training diverged (too many non-finite steps) is a complete trial at 100 % error.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy import stats as _scipy_stats

from zoo.atomic import atomic_write
from zoo.bench.stats import diff_ci, fmt_ci, mean_ci

COLUMNS = [
    "arm",
    "params_m",
    "best_config",
    "best_tuning_err",
    "final_err",
    "final_err_ci95",
    "final_seeds",
    "diff_vs_baseline",
    "diff_ci95",
    "robust_k",
    "robust_n",
    "robust_share",
    "robust_lo",
    "robust_hi",
    "median_trial_err",
    "trials_complete",
    "trials_pruned",
    "epochs_saved",
    "wall_s",
    "complete",
]


@dataclass
class TrialRow:
    """One finished trial: a tuning trial (``kind="tune"``, on the holdout) or a final re-training."""

    arm: str
    kind: str  # "tune" or "final"
    slot: int
    state: str  # "complete" or "pruned"
    err: float | None  # the trial's value: last epoch's top-1 error %; None when pruned
    last_err: float | None  # the last reported (per-epoch) error %, pruned or not
    params: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    epochs_done: int = 0
    wall_s: float = 0.0
    diverged: bool = False


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (nan, nan for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    z = _scipy_stats.norm.ppf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def robustness(trials: list[TrialRow], bar: float) -> tuple[int, int]:
    """(trials reaching ``bar``, trials): pruned trials count in n, never in k."""
    tune = [t for t in trials if t.kind == "tune"]
    return sum(t.state == "complete" and t.err is not None and t.err <= bar for t in tune), len(tune)


def trial_error(t: TrialRow) -> float:
    """The error a trial stands for in the median and the plots: its value, or its last reported one."""
    return t.err if t.state == "complete" and t.err is not None else (t.last_err if t.last_err is not None else 100.0)


def best_trial(trials: list[TrialRow]) -> TrialRow | None:
    """The complete tuning trial of lowest error (the lower slot on a tie)."""
    done = [t for t in trials if t.kind == "tune" and t.state == "complete" and t.err is not None]
    return min(done, key=lambda t: (t.err, t.slot)) if done else None


def fmt_params(params: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in params.items())


def default_bar(trials: list[TrialRow], baselines: list[str]) -> tuple[float, str]:
    """The best baseline arm's best tuning error + 1 point, and the sentence that says so."""
    best = [(b.err, a) for a in baselines if (b := best_trial([t for t in trials if t.arm == a])) is not None]
    if not best:
        return float("nan"), "no baseline arm has a complete trial yet"
    err, arm = min(best)
    return err + 1.0, f"the best baseline tuning error ({arm}, {err:.2f} %) + 1 point"


def summarise(
    trials: list[TrialRow],
    arms: list[str],
    baseline: str,
    bar: float,
    *,
    budget: int,
    seeds: int,
    epochs: int,
    params: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One row per arm (``COLUMNS``). ``budget``/``seeds``: what a complete arm has."""
    by_arm = {a: [t for t in trials if t.arm == a] for a in arms}
    finals = {a: [t.err for t in ts if t.kind == "final" and t.state == "complete"] for a, ts in by_arm.items()}
    table = []
    for arm, ts in by_arm.items():
        tune = [t for t in ts if t.kind == "tune"]
        best = best_trial(ts)
        final = finals[arm]
        mean, half = mean_ci(final) if final else (float("nan"), float("nan"))
        if final and finals.get(baseline) and arm != baseline:
            diff, dhalf = diff_ci(final, finals[baseline])
        else:
            diff, dhalf = (0.0, 0.0) if arm == baseline and final else (float("nan"), float("nan"))
        k, n = robustness(ts, bar)
        lo, hi = wilson(k, n)
        pruned = [t for t in tune if t.state == "pruned"]
        table.append(
            {
                "arm": arm,
                "params_m": (params or {}).get(arm, 0) / 1e6,
                "best_config": fmt_params(best.params) if best else "",
                "best_tuning_err": best.err if best else math.nan,
                "final_err": mean,
                "final_err_ci95": half,
                "final_seeds": len(final),
                "diff_vs_baseline": diff,
                "diff_ci95": dhalf,
                "robust_k": k,
                "robust_n": n,
                "robust_share": k / n if n else math.nan,
                "robust_lo": lo,
                "robust_hi": hi,
                "median_trial_err": statistics.median(trial_error(t) for t in tune) if tune else math.nan,
                "trials_complete": len(tune) - len(pruned),
                "trials_pruned": len(pruned),
                "epochs_saved": sum(max(epochs - t.epochs_done, 0) for t in pruned),
                "wall_s": sum(t.wall_s for t in ts),
                "complete": len(tune) == budget and len(final) == seeds,
            }
        )
    return table


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def markdown(table: list[dict], baseline: str, bar: float, notes: list[str]) -> str:
    lines = [
        (
            f"| arm | params (M) | best config | best-config tuning err % | final err % (95% CI, seeds) | "
            f"vs {baseline} (95% CI) | robustness: err <= {bar:.2f} % (Wilson 95% CI) | median trial err % | "
            "trials (complete/pruned) | wall s |"
        ),
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table:
        final = f"{fmt_ci(r['final_err'], r['final_err_ci95'])} ({r['final_seeds']})" if r["final_seeds"] else "—"
        diff = (
            "baseline"
            if r["arm"] == baseline
            else "—"
            if math.isnan(r["diff_vs_baseline"])
            else fmt_ci(r["diff_vs_baseline"], r["diff_ci95"])
        )
        robust = (
            (
                f"{r['robust_k']}/{r['robust_n']} = {_pct(r['robust_share'])} "
                f"({_pct(r['robust_lo'])}-{_pct(r['robust_hi'])})"
            )
            if r["robust_n"]
            else "—"
        )
        n = r["trials_complete"] + r["trials_pruned"]
        arm = r["arm"] if r["complete"] else f"{r['arm']} (incomplete)"
        lines.append(
            f"| {arm} | {r['params_m']:.2f} | {r['best_config']} | {r['best_tuning_err']:.2f} | {final} | "
            f"{diff} | {robust} | {r['median_trial_err']:.2f} | {n} ({r['trials_complete']}/"
            f"{r['trials_pruned']}) | {r['wall_s']:.0f} |"
        )
    return "\n".join([*lines, "", *notes]) + "\n"


def plot(
    trials: list[TrialRow],
    arms: list[str],
    bar: float,
    x_param: str,
    x_log: bool,
    sensitivity: Path,
    distribution: Path,
    title: str,
) -> None:
    """Tuning error against ``x_param`` per arm (pruned trials as crosses at their last error), and
    the distribution of the arms' tuning errors (box and points), the bar dashed in both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, arm in enumerate(arms):
        tune = sorted(
            (t for t in trials if t.arm == arm and t.kind == "tune" and x_param in t.params),
            key=lambda t: t.params[x_param],
        )
        colour = f"C{i % 10}"
        done = [t for t in tune if t.state == "complete"]
        ax.plot(
            [t.params[x_param] for t in done], [trial_error(t) for t in done], "o-", color=colour, label=arm, ms=4, lw=1
        )
        cut = [t for t in tune if t.state == "pruned"]
        ax.plot([t.params[x_param] for t in cut], [trial_error(t) for t in cut], "x", color=colour, ms=6)
    if not math.isnan(bar):
        ax.axhline(bar, ls="--", color="grey", lw=1, label=f"bar {bar:.2f} %")
    if x_log:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(x_param + " (x: pruned, at its last error)")
    ax.set_ylabel("tuning top-1 error % (holdout)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(sensitivity, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(arms) + 2), 4.5))
    data = [[trial_error(t) for t in trials if t.arm == arm and t.kind == "tune"] or [math.nan] for arm in arms]
    ax.boxplot(data, showfliers=False)
    rng = np.random.default_rng(0)
    for i, arm in enumerate(arms, start=1):
        for state, marker in (("complete", "."), ("pruned", "x")):
            errs = [trial_error(t) for t in trials if t.arm == arm and t.kind == "tune" and t.state == state]
            ax.plot(i + rng.uniform(-0.12, 0.12, len(errs)), errs, marker, color="C0", alpha=0.7)
    if not math.isnan(bar):
        ax.axhline(bar, ls="--", color="grey", lw=1)
    ax.set_xticks(range(1, len(arms) + 1), arms, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("tuning top-1 error % per trial (x: pruned)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    atomic_write(distribution, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
