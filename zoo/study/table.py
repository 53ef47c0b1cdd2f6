"""A study's table from its trials: finals with intervals, corrected comparisons, robustness per
rung, steps and core-seconds per rung, failures, overhead, floors; and its plots.

Pure functions of a list of ``TrialRow`` (what the storage holds, read by ``zoo.study.sweep``),
so that every figure of the table can be checked on a hand-made list.

Counting rules (stated in the table's notes too):
* robustness = share of an arm's configurations whose tuning metric at the FIRST rung is <= the
  bar (every configuration has had the same steps there), with a Wilson 95 % interval; also
  given per rung (a later rung holds only the promoted configurations);
* a trial whose training diverged is a complete trial at the worst value (100 %);
* failed = attempts that ended in FAIL (a killed worker's, a crash), surplus claims excluded;
  retried = slots that needed more than one attempt.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.atomic import atomic_write
from zoo.study.statistics import compare, expected_best, fmt_ci, mean_ci, wilson

COLUMNS = [
    "arm",
    "params_m",
    "tuned",
    "best_config",
    "best_tuning",
    "final",
    "final_ci95",
    "final_seeds",
    "diff_vs_baseline",
    "diff_ci95",
    "diff_ci_bonferroni",
    "p",
    "p_holm",
    "robust_k",
    "robust_n",
    "robust_share",
    "robust_lo",
    "robust_hi",
    "steps",
    "core_s",
    "train_share",
    "failed",
    "retried",
    "diverged",
    "balanced_acc",
    "recall",
    "complete",
]


@dataclass
class TrialRow:
    """One trial attempt: a tuning run at a rung (``kind="tune"``, on the holdout) or a final run."""

    arm: str
    kind: str  # "tune" or "final"
    rung: int | None  # None for a final
    slot: int
    state: str  # "complete" or "fail"
    value: float | None  # the tuning metric after the last epoch (%); None unless complete
    params: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    err: float | None = None  # top-1 error %
    balanced_err: float | None = None
    recall: list[float] | None = None  # per class, %
    steps: int = 0
    epochs: int = 0
    wall_s: float = 0.0
    core_s: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    diverged: bool = False
    code: str | None = None  # the code version that ran it
    precision: str | None = None
    threads: int | None = None


def completed(rows: list[TrialRow], arm: str, kind: str, rung: int | None = None) -> list[TrialRow]:
    """The first complete attempt of every slot (a slot is complete once)."""
    seen: dict[int, TrialRow] = {}
    for r in rows:
        if r.arm == arm and r.kind == kind and r.rung == rung and r.state == "complete":
            seen.setdefault(r.slot, r)
    return [seen[s] for s in sorted(seen)]


def best_trial(rows: list[TrialRow], arm: str, rung: int) -> TrialRow | None:
    """The complete trial of lowest value at ``rung`` (the lower slot on a tie)."""
    done = completed(rows, arm, "tune", rung)
    return min(done, key=lambda t: (t.value, t.slot)) if done else None


def default_bar(rows: list[TrialRow], baselines: list[str]) -> tuple[float, str]:
    """The best first-rung value of the baseline arms + 1 point, and the sentence that says so."""
    best = [(b.value, a) for a in baselines if (b := best_trial(rows, a, 0)) is not None]
    if not best:
        return math.nan, "no baseline arm has a complete first-rung trial"
    value, arm = min(best)
    return value + 1.0, f"the best first-rung baseline value ({arm}, {value:.2f} %) + 1 point"


def robustness(rows: list[TrialRow], arm: str, rung: int, bar: float) -> tuple[int, int]:
    """(configurations at ``rung`` reaching ``bar``, configurations at ``rung``)."""
    done = completed(rows, arm, "tune", rung)
    return sum(t.value <= bar for t in done), len(done)


def fmt_params(params: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in params.items())


def per_rung(rows: list[TrialRow], arm: str, rungs: int, bar: float) -> list[dict[str, Any]]:
    """Per rung: configurations, steps and core-seconds spent (complete trials), robustness."""
    out = []
    for k in range(rungs):
        done = completed(rows, arm, "tune", k)
        hit, n = robustness(rows, arm, k, bar)
        out.append(
            {
                "rung": k,
                "configs": n,
                "epochs": max((t.epochs for t in done), default=0),
                "steps": sum(t.steps for t in done),
                "core_s": sum(t.core_s for t in done),
                "robust_k": hit,
                "robust_n": n,
            }
        )
    return out


def summarise(
    rows: list[TrialRow],
    arms: list[str],
    baseline: str,
    bar: float,
    *,
    rungs: list[int],
    seeds: int,
    tuned: dict[str, bool],
    params: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One row per arm (``COLUMNS`` plus ``per_rung`` and ``overhead``); ``rungs``: the
    configurations each rung of the bracket holds when complete, ``seeds``: the finals'."""
    finals = {a: completed(rows, a, "final") for a in arms}
    values = {a: [t.value for t in finals[a]] for a in arms}
    comparisons = (
        compare(values[baseline], {a: v for a, v in values.items() if a != baseline and v})
        if values.get(baseline)
        else {}
    )
    table = []
    for arm in arms:
        last = best_trial(rows, arm, len(rungs) - 1) if tuned[arm] else None
        mean, half = mean_ci(values[arm]) if values[arm] else (math.nan, math.nan)
        c = comparisons.get(arm)
        k, n = robustness(rows, arm, 0, bar) if tuned[arm] else (0, 0)
        lo, hi = wilson(k, n)
        mine = [r for r in rows if r.arm == arm]
        done = [r for r in mine if r.state == "complete"]
        slots = {(r.kind, r.rung, r.slot) for r in mine}
        attempts = {s: sum((r.kind, r.rung, r.slot) == s for r in mine) for s in slots}
        rung_rows = per_rung(rows, arm, len(rungs), bar) if tuned[arm] else []
        seconds: dict[str, float] = {}
        for r in done:
            for key, s in r.seconds.items():
                seconds[key] = seconds.get(key, 0.0) + s
        wall = sum(r.wall_s for r in done)
        recalls = [t.recall for t in finals[arm] if t.recall]
        complete = len(finals[arm]) == seeds and (not tuned[arm] or [r["configs"] for r in rung_rows] == rungs)
        table.append(
            {
                "arm": arm,
                "params_m": (params or {}).get(arm, 0) / 1e6,
                "tuned": tuned[arm],
                "best_config": fmt_params(last.params) if last else "" if tuned[arm] else untuned_config(arm),
                "best_tuning": last.value if last else math.nan,
                "final": mean,
                "final_ci95": half,
                "final_seeds": len(values[arm]),
                "diff_vs_baseline": c.diff if c else (0.0 if arm == baseline else math.nan),
                "diff_ci95": c.half if c else math.nan,
                "diff_ci_bonferroni": c.half_bonferroni if c else math.nan,
                "p": c.p if c else math.nan,
                "p_holm": c.p_holm if c else math.nan,
                "robust_k": k,
                "robust_n": n,
                "robust_share": k / n if n else math.nan,
                "robust_lo": lo,
                "robust_hi": hi,
                "steps": sum(r["steps"] for r in rung_rows),
                "core_s": sum(r["core_s"] for r in rung_rows),
                "train_share": seconds.get("train", 0.0) / wall if wall else math.nan,
                "failed": sum(r.state == "fail" for r in mine),
                "retried": sum(n > 1 for n in attempts.values()),
                "diverged": sum(r.diverged for r in done),
                "balanced_acc": statistics.fmean(100 - t.balanced_err for t in finals[arm])
                if finals[arm] and all(t.balanced_err is not None for t in finals[arm])
                else math.nan,
                "recall": [statistics.fmean(c) for c in zip(*recalls)] if recalls else [],
                "complete": complete,
                "per_rung": rung_rows,
                "overhead": {key: s / wall for key, s in seconds.items()} if wall else {},
            }
        )
    return table


def untuned_config(arm: str) -> str:
    """What an untuned arm trains: its optimizer's cited defaults (``@default``) or the recipe."""
    return "cited defaults" if arm.endswith("@default") else "the recipe"


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _p(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


def markdown(
    table: list[dict], baseline: str, bar: float, metric: str, floors: list[tuple[str, float]], notes: list[str]
) -> str:
    balanced = metric == "balanced_err"
    head = (
        f"| arm | params (M) | best config | final {metric} % (95% CI, seeds) | vs {baseline} (95% CI) | "
        f"Holm p | vs {baseline} (Bonferroni CI) | robust at rung 0: <= {bar:.2f} % (Wilson 95% CI) | tuning steps | "
        "tuning core-s | trials failed/retried/diverged |"
    )
    rule = "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    if balanced:
        head += " balanced acc % | recall per class % |"
        rule += " ---: | --- |"
    lines = [head, rule]
    for r in table:
        final = f"{fmt_ci(r['final'], r['final_ci95'])} ({r['final_seeds']})" if r["final_seeds"] else "—"
        base = r["arm"] == baseline
        diff = (
            "baseline"
            if base
            else "—"
            if math.isnan(r["diff_vs_baseline"])
            else fmt_ci(r["diff_vs_baseline"], r["diff_ci95"])
        )
        bonf = (
            ""
            if base or math.isnan(r["diff_ci_bonferroni"])
            else fmt_ci(r["diff_vs_baseline"], r["diff_ci_bonferroni"])
        )
        robust = (
            f"{r['robust_k']}/{r['robust_n']} = {_pct(r['robust_share'])} "
            f"({_pct(r['robust_lo'])}-{_pct(r['robust_hi'])})"
            if r["robust_n"]
            else "untuned"
            if not r["tuned"]
            else "—"
        )
        arm = r["arm"] if r["complete"] else f"{r['arm']} (incomplete)"
        line = (
            f"| {arm} | {r['params_m']:.2f} | {r['best_config']} | {final} | {diff} | "
            f"{'' if base else _p(r['p_holm'])} | "
            f"{bonf} | {robust} | {r['steps']} | {r['core_s']:.0f} | {r['failed']}/{r['retried']}/{r['diverged']} |"
        )
        if balanced:
            recall = ", ".join(f"{x:.0f}" for x in r["recall"])
            line += f" {r['balanced_acc']:.2f} | {recall} |"
        lines.append(line)
    for name, value in floors:
        lines.append(f"| {name} | | | {value:.2f} | | | | | | | |" + (" | |" if balanced else ""))
    return "\n".join([*lines, "", *notes]) + "\n"


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def plot(
    rows: list[TrialRow], arms: list[str], bar: float, x_param: str, x_log: bool, sensitivity: Path, title: str
) -> None:
    """First-rung tuning metric against ``x_param`` per arm, the bar dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, arm in enumerate(arms):
        done = sorted(
            (t for t in completed(rows, arm, "tune", 0) if x_param in t.params), key=lambda t: t.params[x_param]
        )
        ax.plot(
            [t.params[x_param] for t in done], [t.value for t in done], "o-", color=f"C{i % 10}", label=arm, ms=4, lw=1
        )
    if not math.isnan(bar):
        ax.axhline(bar, ls="--", color="grey", lw=1, label=f"bar {bar:.2f} %")
    if x_log:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(x_param)
    ax.set_ylabel("first-rung tuning metric % (holdout)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, sensitivity)


def expected_best_curves(rows: list[TrialRow], arms: list[str]) -> dict[str, list[float]]:
    """Per tuned arm, Dodge et al.'s expected best first-rung value of n configurations."""
    return {a: expected_best([t.value for t in done]) for a in arms if (done := completed(rows, a, "tune", 0))}
