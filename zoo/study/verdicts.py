"""``python -m zoo.study verdicts``: the field's claims (``zoo.study.claims``), each run as its own
sweep study ``verdict_<claim>`` with one budget for all, and the verdict table they add up to.

  python -m zoo.study verdicts --configs 9 --eta 3 --min-epochs 2 --epochs 18 --seeds 5 --data mnist5k
  python -m zoo.study verdicts --report-only            # the table from RESULTS/verdict_<claim>.json
  python -m zoo.study verdicts --list                   # the claims, their arms and pairs
  python -m zoo.study verdicts --claims rsb,l1_norm ... # a subset

Every other option is the sweep's budget and storage (``python -m zoo.study sweep --help``), given
once and passed to every claim's study, so every claim spends the same bracket and seeds.

The table (RESULTS/verdicts.{md,csv,json}) has one row per compared pair of a claim:
* error: the difference of the finals' mean errors (arm - versus, Welch), its 95 % interval, the
  two-sided Welch p Holm-adjusted ACROSS THE WHOLE TABLE (the verdict table is one family: a
  reader scans all of it for "supported"; Holm 1979 via statsmodels), the interval at the
  table's Bonferroni level 1 - 0.05 / m, the smallest difference detectable at 80 % power at
  that level given the observed seed SDs (``statistics.min_detectable_difference``), and
  ``statistics.verdict``;
* spread (L1 vs L2 norm): the ratio of seed SDs, the two-sided F test of equal variances
  (Snedecor's variance-ratio test; normal errors assumed, stated), its interval at both levels,
  the smallest SD ratio detectable at 80 % power, and the same verdict rule on the ratio;
* robustness (Shampoo): each arm's share of first-rung configurations under its study's bar
  with Wilson intervals, Fisher's exact test of the two shares (scipy; exact at the small counts
  of a study, where a chi-square approximation is not), the Newcombe (Wilson-based) interval of
  the difference (statsmodels), and the smallest share difference detectable at 80 % power
  (Cohen's h with statsmodels' normal power, around the versus arm's share).
A claim whose study has not finished is a row "not run yet" with the command that runs it.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo.bench.report import command_line, environment, write_results
from zoo.study import sweep
from zoo.study.arms import InputError
from zoo.study.claims import BY_NAME, CLAIMS, Claim, Pair
from zoo.study.statistics import NAN, Comparison, mean_ci, min_detectable_difference, verdict, welch, wilson
from zoo.study.table import TrialRow, completed

PROG = "python -m zoo.study verdicts"
ALPHA, POWER = 0.05, 0.8
NOT_FOR_VERDICTS = ("--study", "--export", "--import", "--arms", "--baseline")
COLUMNS = [
    "claim",
    "pair",
    "measure",
    "claimed",
    "status",
    "n_arm",
    "n_versus",
    "arm_value",
    "arm_ci95_lo",
    "arm_ci95_hi",
    "versus_value",
    "versus_ci95_lo",
    "versus_ci95_hi",
    "difference",
    "ci95_lo",
    "ci95_hi",
    "p",
    "p_holm",
    "ci_bonferroni_lo",
    "ci_bonferroni_hi",
    "mdd",
    "verdict",
    "command",
]


# ---------------------------------------------------------------- the tests of one pair


@dataclass(frozen=True)
class Test:
    """One pair's figures before the table-wide adjustment: ``interval(confidence)`` gives the
    (low, high) interval of ``difference`` at a confidence, ``mdd(alpha)`` the smallest
    detectable effect at a level; both are needed at the table's Bonferroni level, known last."""

    arm_value: float
    versus_value: float
    n_arm: int
    n_versus: int
    difference: float
    p: float
    interval: Callable[[float], tuple[float, float]]
    mdd: Callable[[float], float]
    arm_ci: tuple[float, float] = (NAN, NAN)  # each side's own 95 % interval: t (error), Wilson (share)
    versus_ci: tuple[float, float] = (NAN, NAN)


def error_test(a: list[float], b: list[float]) -> Test:
    w = welch(a, b)
    sd = [statistics.stdev(v) if len(v) > 1 else NAN for v in (a, b)]

    def interval(confidence: float) -> tuple[float, float]:
        half = welch(a, b, confidence).half
        return w.diff - half, w.diff + half

    (mean_a, half_a), (mean_b, half_b) = mean_ci(a), mean_ci(b)
    return Test(
        mean_a,
        mean_b,
        len(a),
        len(b),
        w.diff,
        w.p,
        interval,
        lambda alpha: min_detectable_difference(sd[0], sd[1], len(a), len(b), alpha, POWER),
        (mean_a - half_a, mean_a + half_a),
        (mean_b - half_b, mean_b + half_b),
    )


def spread_test(a: list[float], b: list[float]) -> Test:
    """The SD ratio sd(a) / sd(b) and the two-sided F test of var(a) = var(b): F = s_a^2 / s_b^2
    ~ rho * F(n_a - 1, n_b - 1) with rho the true variance ratio."""
    from scipy.stats import f

    n_a, n_b = len(a), len(b)
    if n_a < 2 or n_b < 2 or statistics.variance(b) == 0:
        return Test(NAN, NAN, n_a, n_b, NAN, NAN, lambda c: (NAN, NAN), lambda alpha: NAN)
    ratio = statistics.variance(a) / statistics.variance(b)
    dist = f(n_a - 1, n_b - 1)
    p = min(1.0, 2 * min(dist.cdf(ratio), dist.sf(ratio)))

    def interval(confidence: float) -> tuple[float, float]:  # of the SD ratio
        tail = (1 - confidence) / 2
        return math.sqrt(ratio / dist.ppf(1 - tail)), math.sqrt(ratio / dist.ppf(tail))

    def mdd(alpha: float) -> float:
        # the SD ratio < 1 the lower tail detects with probability POWER: rho * F < F_(alpha/2)
        return math.sqrt(dist.ppf(alpha / 2) / dist.ppf(POWER))

    return Test(statistics.stdev(a), statistics.stdev(b), n_a, n_b, math.sqrt(ratio), p, interval, mdd)


def robustness_test(k_a: int, n_a: int, k_b: int, n_b: int) -> Test:
    from scipy.stats import fisher_exact
    from statsmodels.stats.power import NormalIndPower
    from statsmodels.stats.proportion import confint_proportions_2indep

    if not (n_a and n_b):
        return Test(NAN, NAN, n_a, n_b, NAN, NAN, lambda c: (NAN, NAN), lambda alpha: NAN)
    share_a, share_b = k_a / n_a, k_b / n_b
    p = float(fisher_exact([[k_a, n_a - k_a], [k_b, n_b - k_b]]).pvalue)

    def interval(confidence: float) -> tuple[float, float]:
        low, high = confint_proportions_2indep(k_a, n_a, k_b, n_b, method="newcomb", alpha=1 - confidence)
        return float(low), float(high)

    def mdd(alpha: float) -> float:
        h = NormalIndPower().solve_power(nobs1=n_a, alpha=alpha, power=POWER, ratio=n_b / n_a)
        # Cohen's h = 2 asin(sqrt(p_a)) - 2 asin(sqrt(p_b)): the share h above the versus arm's
        angle = min(math.pi / 2, math.asin(math.sqrt(share_b)) + h / 2)
        return math.sin(angle) ** 2 - share_b

    return Test(share_a, share_b, n_a, n_b, share_a - share_b, p, interval, mdd, wilson(k_a, n_a), wilson(k_b, n_b))


def ratio_verdict(p_holm: float, ratio: float, low: float, mdd: float) -> str:
    """``statistics.verdict``'s rule for a claim that the arm's SD is lower (ratio < 1): supported
    or contradicted by the adjusted p and the ratio's side of 1; contradicted too when even the
    interval's low end is above the smallest detectable ratio (no detectable reduction)."""
    if not math.isnan(p_holm) and p_holm < ALPHA and ratio != 1:
        return "supported" if ratio < 1 else "contradicted"
    if not (math.isnan(low) or math.isnan(mdd)) and low > mdd:
        return "contradicted"
    return "not resolved at this power"


def share_verdict(p_holm: float, diff: float, high: float, mdd: float) -> str:
    """The rule for a claim that the arm's share is higher: supported or contradicted by the
    adjusted p and the sign; contradicted too when the interval's high end stays under the
    smallest detectable gain."""
    if not math.isnan(p_holm) and p_holm < ALPHA and diff != 0:
        return "supported" if diff > 0 else "contradicted"
    if not (math.isnan(high) or math.isnan(mdd)) and high < mdd:
        return "contradicted"
    return "not resolved at this power"


# ---------------------------------------------------------------- reading a claim's study


def study_results(results: Path, claim: Claim) -> dict[str, Any] | None:
    """The claim's study JSON as the sweep writes it, or None when it is missing, was made for
    other arms, or has an arm not complete (its finals or its bracket)."""
    path = results / f"verdict_{claim.name}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    rows = {r["arm"]: r for r in data.get("rows", [])}
    if sorted(rows) != sorted(claim.arms) or not all(r["complete"] for r in rows.values()):
        return None
    return data


def pair_test(pair: Pair, data: dict[str, Any]) -> Test:
    trials = [TrialRow(**t) for t in data["trials"]]

    def finals(arm: str) -> list[float]:
        return [t.value for t in completed(trials, arm, "final")]

    if pair.measure == "robustness":
        rows = {r["arm"]: r for r in data["rows"]}
        a, b = rows[pair.arm], rows[pair.versus]
        return robustness_test(a["robust_k"], a["robust_n"], b["robust_k"], b["robust_n"])
    test = spread_test if pair.measure == "spread" else error_test
    return test(finals(pair.arm), finals(pair.versus))


def table_rows(results: Path, claims: list[Claim], run_command: Callable[[Claim], str]) -> list[dict[str, Any]]:
    """Every pair of every claim; Holm and Bonferroni over the pairs that have a p-value."""
    from statsmodels.stats.multitest import multipletests

    rows, tests = [], []
    for claim in claims:
        data = study_results(results, claim)
        for pair in claim.pairs:
            row = {
                "claim": claim.name,
                "pair": f"{pair.arm} vs {pair.versus}",
                "measure": pair.measure,
                "claimed": pair.claim,
                "statement": claim.statement,
                "missing": list(claim.missing),
            }
            if data is None:
                row.update(status="not run yet", verdict="not run yet", command=run_command(claim))
                rows.append(row)
                continue
            row.update(status="done", command="", bar=data.get("bar"))
            rows.append(row)
            tests.append((row, pair, pair_test(pair, data)))
    tested = [(row, pair, t) for row, pair, t in tests if not math.isnan(t.p)]
    m = len(tested)
    holm = multipletests([t.p for _, _, t in tested], method="holm")[1] if m else []
    adjusted = {id(row): float(p) for (row, _, _), p in zip(tested, holm)}
    level = ALPHA / m if m else NAN  # the Bonferroni level; Holm's first step tests at it
    for row, pair, t in tests:
        p_holm = adjusted.get(id(row), NAN)
        lo, hi = t.interval(1 - ALPHA)
        blo, bhi = t.interval(1 - level) if m else (NAN, NAN)
        mdd = t.mdd(level) if m else NAN
        if pair.measure == "error":
            half = (bhi - blo) / 2
            comparison = Comparison(t.difference, (hi - lo) / 2, half, t.p, p_holm, m=m)
            word = verdict(comparison, mdd, claim=pair.claim, alpha=ALPHA)
        elif pair.measure == "spread":
            word = ratio_verdict(p_holm, t.difference, blo, mdd)
        else:
            word = share_verdict(p_holm, t.difference, bhi, mdd)
        row.update(
            n_arm=t.n_arm,
            n_versus=t.n_versus,
            arm_value=t.arm_value,
            arm_ci95_lo=t.arm_ci[0],
            arm_ci95_hi=t.arm_ci[1],
            versus_value=t.versus_value,
            versus_ci95_lo=t.versus_ci[0],
            versus_ci95_hi=t.versus_ci[1],
            difference=t.difference,
            ci95_lo=lo,
            ci95_hi=hi,
            p=t.p,
            p_holm=p_holm,
            ci_bonferroni_lo=blo,
            ci_bonferroni_hi=bhi,
            mdd=mdd,
            m=m,
            verdict=word,
        )
    return rows


# ---------------------------------------------------------------- the table


def _num(x: Any, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _with_ci(row: dict[str, Any], side: str, digits: int) -> str:
    value, low, high = (row[f"{side}{k}"] for k in ("_value", "_ci95_lo", "_ci95_hi"))
    if math.isnan(low):
        return _num(value, digits)
    return f"{_num(value, digits)} [{_num(low, digits)}, {_num(high, digits)}]"


def _p(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


UNITS = {
    "error": ("error diff (pts)", "smallest detectable diff (pts)"),
    "spread": ("seed SD ratio", "smallest detectable SD ratio"),
    "robustness": ("share diff under the bar", "smallest detectable share diff"),
}


def markdown(rows: list[dict[str, Any]], claims: list[Claim]) -> str:
    head = (
        "| claim | pair (arm vs versus) | measure | claimed | "
        "arm / versus [95% CI: t, or Wilson for a share] (seeds or configs) | difference (95% CI) | "
        "Holm p (table) | Bonferroni CI | power: smallest detectable at 80 % | verdict |"
    )
    lines = [head, "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if r["status"] != "done":
            lines.append(
                f"| {r['claim']} | {r['pair']} | {r['measure']} | {r['claimed']} | | | | | | not run yet: "
                f"`{r['command']}` |"
            )
            continue
        digits = 3 if r["measure"] != "error" else 2
        arm, versus = (_with_ci(r, side, digits) for side in ("arm", "versus"))
        values = f"{arm} / {versus} ({r['n_arm']}, {r['n_versus']})"
        lines.append(
            f"| {r['claim']} | {r['pair']} | {UNITS[r['measure']][0]} | {r['claimed']} | {values} | "
            f"{_num(r['difference'], digits)} ({_num(r['ci95_lo'], digits)} to {_num(r['ci95_hi'], digits)}) | "
            f"{_p(r['p_holm'])} | {_num(r['ci_bonferroni_lo'], digits)} to {_num(r['ci_bonferroni_hi'], digits)} | "
            f"{_num(r['mdd'], digits)} | {r['verdict']} |"
        )
    m = max((r.get("m", 0) for r in rows), default=0)
    notes = [
        "",
        f"Holm and Bonferroni over the whole table ({m} comparisons with a p-value), alpha {ALPHA}; the smallest "
        f"detectable effect is at the Bonferroni level {ALPHA}/{m or 'm'} and {int(100 * POWER)} % power. Error: "
        "arm - versus (negative: the arm has lower error), Welch. Spread: SD ratio arm / versus, F test. Robustness: "
        "share of first-rung configurations under the study's bar, Fisher's exact test, Newcombe interval.",
        "",
        "Claims:",
    ]
    for c in claims:
        gap = f" Not expressible as an arm yet: {'; '.join(c.missing)}." if c.missing else ""
        notes.append(f"- {c.name}: {c.statement}.{gap}")
    return "\n".join([*lines, *notes]) + "\n"


def list_claims() -> str:
    out = []
    for c in CLAIMS:
        out.append(f"{c.name}: {c.statement}")
        out.append(f"  arms ({len(c.arms)}, reference {c.reference}): {', '.join(c.arms)}")
        for p in c.pairs:
            out.append(f"  pair: {p.arm} vs {p.versus} ({p.measure}, claimed {p.claim})")
        for gap in c.missing:
            out.append(f"  missing: {gap}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- command line


def _own_options(argv: list[str]) -> tuple[Any, list[str]]:
    """(--claims, --list) and the rest of ``argv`` for the sweep (with --report-only taken out:
    here it means "read the studies' results", not "the sweep's table from its storage")."""
    import argparse

    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--claims", default=None)
    own.add_argument("--list", action="store_true")
    args, rest = own.parse_known_args(argv)
    return args, [a for a in rest if a != "--report-only"]


def build_parser():
    p = sweep.build_parser(PROG, __doc__, arms=False)
    g = p.add_argument_group("the verdicts")
    g.add_argument("--claims", default=None, help=f"comma-separated subset of: {', '.join(BY_NAME)}")
    g.add_argument("--list", action="store_true", help="print the claims, their arms and pairs")
    return p


def select(text: str | None) -> list[Claim]:
    from zoo.names import suggest

    if text is None:
        return list(CLAIMS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in BY_NAME:
            raise InputError(f"--claims {n!r}: not a claim{suggest(n, BY_NAME)}; expected one of {', '.join(BY_NAME)}")
    if not names:
        raise InputError("--claims: no claim given")
    return [BY_NAME[n] for n in dict.fromkeys(names)]


def claim_argv(claim: Claim, rest: list[str]) -> list[str]:
    return ["--arms", ",".join(claim.arms), "--baseline", claim.reference, "--study", f"verdict_{claim.name}", *rest]


def main(argv: list[str] | None = None, train_fn: Callable | None = None, floors_fn: Callable | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parsed = build_parser().parse_args(argv)
        given = [o for o in NOT_FOR_VERDICTS if any(a == o or a.startswith(o + "=") for a in argv)]
        if given:
            raise InputError(f"{given[0]}: set by the verdicts (each claim is study verdict_<claim>)")
        claims = select(parsed.claims)
    except InputError as e:
        print(f"zoo.study: {e}", file=sys.stderr)
        return 2
    if parsed.list:
        print(list_claims(), end="")
        return 0
    _, rest = _own_options(argv)
    for claim in [] if parsed.report_only else claims:
        print(f"claim {claim.name}: study verdict_{claim.name}", flush=True)
        rc = sweep.main(
            claim_argv(claim, rest),
            train_fn=train_fn,
            floors_fn=floors_fn,
            command=command_line(PROG, ["--claims", claim.name, *rest]),
        )
        if rc != 0:
            return rc
    rows = table_rows(parsed.results, claims, lambda c: command_line(PROG, ["--claims", c.name, *rest]))
    text = markdown(rows, claims)
    meta = {"command": command_line(PROG, argv), **environment(None), "alpha": ALPHA, "power": POWER}
    write_results(parsed.results, "verdicts", text, rows, COLUMNS, meta)
    print(text, end="")
    print(f"wrote {parsed.results / 'verdicts'}.{{md,csv,json}}", flush=True)
    return 0
