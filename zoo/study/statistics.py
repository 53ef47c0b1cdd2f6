"""The statistics a study table needs to settle a comparison, and why each one is there.

* ``mean_ci``: a seed mean with its Student-t interval: final errors vary with the seed, and
  Bouthillier et al. 2021 ("Accounting for Variance in Machine Learning Benchmarks",
  arXiv 2103.03098) show that seed variance alone can flip a ranking, so no mean goes without it.
* ``welch`` / ``compare``: each arm against the baseline arm with Welch's unequal-variance t test
  (arms need not share a variance), and, because a table makes several comparisons at once, a
  Holm-adjusted p-value (Holm 1979, "A simple sequentially rejective multiple test procedure",
  via statsmodels' ``multipletests``; scipy has no Holm) and the interval at the Bonferroni level,
  so that "significant" in a table of m comparisons keeps its family-wise error rate.
* ``wilson``: the interval of a share (the robustness share of configurations that reach a bar);
  Wilson's score interval stays inside [0, 1] and keeps its coverage at the small n of a study.
* ``expected_best``: Dodge et al. 2019 ("Show Your Work", arXiv 1909.03004): the expected best
  holdout score of n configurations drawn from an arm's observed ones, for every n, so a reader
  sees what an arm gives at a smaller tuning budget than the study spent.
* ``min_detectable_difference`` / ``verdict``: what a non-significant difference means: the
  smallest true difference the table could have detected (noncentral t power of the Welch test),
  and a one-word verdict on a claimed direction.
* ``balanced_accuracy`` / ``per_class_recall``: on an imbalanced set (ELPV) top-1 rewards the
  majority grade; the mean of per-class recalls does not.

Errors are in whatever unit the caller gives (percent in the tables); ``diff`` is always the arm
minus the baseline, so for an error a negative difference means the arm is better.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
from scipy import optimize
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

NAN = float("nan")
VERDICTS = ("supported", "contradicted", "not resolved at this power")


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its two-sided Student-t interval (nan for a single value: no
    spread known)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, NAN
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, sem * scipy_stats.t.ppf(0.5 + confidence / 2, len(values) - 1)


@dataclass(frozen=True)
class Welch:
    """Welch's test of mean(a) - mean(b): the difference, the half-width of its interval, the
    two-sided p-value and the Welch-Satterthwaite degrees of freedom."""

    diff: float
    half: float
    p: float
    dof: float


def welch(a: list[float], b: list[float], confidence: float = 0.95) -> Welch:
    """Welch's unequal-variance t test of a - b (scipy's ``ttest_ind(equal_var=False)``).

    Degenerate cases scipy answers with warnings and infinities are decided here: fewer than two
    values on a side gives nan half, p and dof (no spread known); no spread on either side gives
    half 0 and p 0 for a non-zero difference, 1 for none.
    """
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Welch(diff, NAN, NAN, NAN)
    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        return Welch(diff, 0.0, 0.0 if diff != 0 else 1.0, NAN)
    res = scipy_stats.ttest_ind(a, b, equal_var=False)
    low, high = res.confidence_interval(confidence)
    return Welch(diff, float(high - low) / 2, float(res.pvalue), float(res.df))


@dataclass(frozen=True)
class Comparison:
    """One arm against the baseline: ``diff`` = arm - baseline with its Welch interval ``half``
    at the table's confidence, ``half_bonferroni`` at the Bonferroni level 1 - (1 - confidence) / m,
    the two-sided Welch ``p`` and ``p_holm``, Holm-adjusted over the table's m comparisons."""

    diff: float
    half: float
    half_bonferroni: float
    p: float
    p_holm: float
    dof: float = NAN
    m: int = 0


def compare(baseline: list[float], arms: dict[str, list[float]], confidence: float = 0.95) -> dict[str, Comparison]:
    """Every arm against ``baseline``. The family is the comparisons that have a p-value (both
    sides with >= 2 seeds): m counts them, and an arm without one gets nan ``p_holm`` and
    ``half_bonferroni``."""
    tests = {name: welch(values, baseline, confidence) for name, values in arms.items()}
    tested = [name for name, w in tests.items() if not math.isnan(w.p)]
    m = len(tested)
    holm = dict(zip(tested, multipletests([tests[n].p for n in tested], method="holm")[1])) if m else {}
    family = 1 - (1 - confidence) / m if m else NAN
    out = {}
    for name, w in tests.items():
        half_bonferroni = welch(arms[name], baseline, family).half if name in holm else NAN
        out[name] = Comparison(w.diff, w.half, half_bonferroni, w.p, float(holm.get(name, NAN)), w.dof, m)
    return out


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the share k/n (statsmodels' ``proportion_confint``); (nan, nan)
    for n = 0."""
    if n == 0:
        return NAN, NAN
    low, high = proportion_confint(k, n, alpha=1 - confidence, method="wilson")
    return float(low), float(high)


def expected_best(scores: list[float], lower_is_better: bool = True) -> list[float]:
    """Dodge et al. 2019's expected best score of n configurations drawn with replacement from
    the observed ``scores``, for n = 1 .. len(scores) (index n - 1).

    With the empirical distribution of the N scores and v its distinct values,
    E[max of n] = sum_v v * (P(X <= v)^n - P(X < v)^n) (the paper's eq. 1, ties handled by
    counting each distinct value once with its share); for errors (``lower_is_better``) the
    mirror E[min of n] = sum_v v * (P(X >= v)^n - P(X > v)^n). n = 1 gives the mean; large n
    tends to the best observed score.
    """
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"expected_best: scores must be a non-empty list of finite numbers, got {scores!r}")
    values, counts = np.unique(x, return_counts=True)  # ascending
    if lower_is_better:  # mirror: "at or beyond v" is >= v
        values, counts = values[::-1], counts[::-1]
    at_or_before = np.cumsum(counts) / len(x)  # P(X <= v), or P(X >= v) when mirrored
    before = at_or_before - counts / len(x)
    n = np.arange(1, len(x) + 1)[:, None]  # (N, 1) against (V,) distinct values
    return [float(e) for e in ((at_or_before**n - before**n) @ values)]


def min_detectable_difference(
    sd_a: float, sd_b: float, n_a: int, n_b: int, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest true difference of means that a two-sided Welch test at level ``alpha``
    detects with probability ``power``, given seed standard deviations and seed counts.

    Under a true difference d the Welch statistic is noncentral t with the Welch-Satterthwaite
    dof and noncentrality d / se, se = sqrt(sd_a^2 / n_a + sd_b^2 / n_b); its power
    P(|T| > t_crit) (both tails) is solved for d. ``alpha`` is the level the caller tests at:
    pass the Bonferroni / Holm level for a table of several comparisons. nan with < 2 seeds on a
    side; 0 when neither side varies.
    """
    if n_a < 2 or n_b < 2:
        return NAN
    if not (0 < alpha < 1 and alpha < power < 1):
        raise ValueError(f"min_detectable_difference: need 0 < alpha < power < 1, got alpha={alpha}, power={power}")
    va, vb = sd_a**2 / n_a, sd_b**2 / n_b
    se = math.sqrt(va + vb)
    if se == 0:
        return 0.0
    dof = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
    crit = scipy_stats.t.ppf(1 - alpha / 2, dof)

    def shortfall(nc: float) -> float:
        nct = scipy_stats.nct(dof, nc)
        return nct.sf(crit) + nct.cdf(-crit) - power

    # power rises from alpha (nc = 0) towards 1 as nc grows: widen the bracket until it passes `power`
    high = crit + scipy_stats.norm.ppf(power) + 1
    while shortfall(high) < 0:
        high *= 2
    return float(optimize.brentq(shortfall, 0.0, high, xtol=1e-10) * se)


def verdict(
    comparison: Comparison, mdd: float, *, claim: str = "lower", alpha: float = 0.05, min_effect: float | None = None
) -> str:
    """One of ``VERDICTS`` for a claim that the arm's value is ``claim`` ("lower" or "higher")
    than the baseline's (for an error, "lower" claims the arm is better).

    * "supported": the Holm-adjusted p < alpha and the difference has the claimed sign;
    * "contradicted": the Holm-adjusted p < alpha with the other sign, or the Bonferroni interval
      excludes a difference of ``min_effect`` in the claimed direction (a claim with no stated
      size, ``min_effect=None``, is taken to claim a difference the table could detect:
      ``mdd``, the minimum detectable difference);
    * otherwise "not resolved at this power" (also when p is nan: too few seeds).
    """
    if claim not in ("lower", "higher"):
        raise ValueError(f"verdict: claim must be 'lower' or 'higher', got {claim!r}")
    sign = -1.0 if claim == "lower" else 1.0
    c = comparison
    if not math.isnan(c.p_holm) and c.p_holm < alpha and c.diff != 0:
        return "supported" if math.copysign(1.0, c.diff) == sign else "contradicted"
    effect = mdd if min_effect is None else min_effect
    if not (math.isnan(effect) or math.isnan(c.half_bonferroni)):
        claimed_end = c.diff + sign * c.half_bonferroni  # the interval's end in the claimed direction
        if sign * claimed_end < effect:  # the whole interval falls short of the claimed effect
            return "contradicted"
    return "not resolved at this power"


def _confusion(confusion) -> np.ndarray:
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or np.any(cm < 0):
        raise ValueError(
            f"confusion: expected a square matrix of counts (rows true, columns predicted), got shape {cm.shape}"
        )
    return cm


def per_class_recall(confusion) -> list[float]:
    """Recall of each class from a confusion matrix (rows: true class, columns: predicted, as
    scikit-learn's ``confusion_matrix``); nan for a class with no true samples."""
    cm = _confusion(confusion)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [float(r) for r in np.where(support > 0, np.diag(cm) / support, np.nan)]


def balanced_accuracy(confusion) -> float:
    """Mean recall over the classes that have true samples (scikit-learn's
    ``balanced_accuracy_score``, which skips absent classes the same way); a fraction in [0, 1]."""
    recalls = [r for r in per_class_recall(confusion) if not math.isnan(r)]
    return statistics.fmean(recalls) if recalls else NAN


def fmt_ci(mean: float, half: float, digits: int = 2) -> str:
    """``mean ± half`` (just the mean when the half-width is nan)."""
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"
