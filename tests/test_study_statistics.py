"""zoo.study.statistics against independent references: formulas written out here from the
papers, slow loops, Monte Carlo, and scipy / statsmodels / scikit-learn."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from zoo.study.statistics import (
    VERDICTS,
    Comparison,
    balanced_accuracy,
    compare,
    expected_best,
    fmt_ci,
    mean_ci,
    min_detectable_difference,
    per_class_recall,
    verdict,
    welch,
    wilson,
)

A = [31.2, 30.1, 33.0, 29.8, 32.4]
B = [28.0, 27.1, 29.9, 28.8, 26.5, 27.7]


def test_mean_ci_matches_the_t_formula_and_is_nan_for_one_value():
    mean, half = mean_ci(A, 0.9)
    sd = math.sqrt(sum((x - sum(A) / 5) ** 2 for x in A) / 4)
    assert mean == pytest.approx(sum(A) / 5)
    assert half == pytest.approx(scipy_stats.t.ppf(0.95, 4) * sd / math.sqrt(5))
    assert math.isnan(mean_ci([3.0])[1])


def test_welch_matches_the_satterthwaite_formula_and_scipy():
    w = welch(A, B, confidence=0.9)
    # Welch 1947 written out: the difference, its standard error, the Satterthwaite dof
    ma, mb = np.mean(A), np.mean(B)
    va, vb = np.var(A, ddof=1) / len(A), np.var(B, ddof=1) / len(B)
    dof = (va + vb) ** 2 / (va**2 / (len(A) - 1) + vb**2 / (len(B) - 1))
    t = (ma - mb) / math.sqrt(va + vb)
    assert w.diff == pytest.approx(ma - mb)
    assert w.dof == pytest.approx(dof)
    assert w.p == pytest.approx(2 * scipy_stats.t.sf(abs(t), dof))
    assert w.half == pytest.approx(scipy_stats.t.ppf(0.95, dof) * math.sqrt(va + vb))
    ref = scipy_stats.ttest_ind(A, B, equal_var=False)
    assert w.p == pytest.approx(ref.pvalue) and w.dof == pytest.approx(ref.df)
    back = welch(B, A)  # the order is a - b
    assert back.diff == pytest.approx(-w.diff) and back.p == pytest.approx(w.p)


def test_welch_degenerate_cases():
    one = welch([1.0], B)
    assert math.isnan(one.half) and math.isnan(one.p) and one.diff == pytest.approx(1.0 - np.mean(B))
    flat = welch([2.0, 2.0, 2.0], [3.0, 3.0])
    assert (flat.diff, flat.half, flat.p) == (-1.0, 0.0, 0.0)
    same = welch([2.0, 2.0], [2.0, 2.0, 2.0])
    assert (same.diff, same.p) == (0.0, 1.0)


def _holm_by_hand(p: list[float]) -> list[float]:
    """Holm 1979 step-down: sort ascending, multiply the i-th smallest (0-based) by m - i, keep
    the running maximum, cap at 1, and put back in the original order."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def test_compare_holm_and_bonferroni_against_a_hand_step_down_and_statsmodels():
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(3)
    baseline = list(rng.normal(30, 1.0, 5))
    arms = {
        "far": list(rng.normal(26, 1.0, 5)),
        "near": list(rng.normal(29.3, 1.0, 5)),
        "same": list(rng.normal(30, 1.0, 5)),
        "worse": list(rng.normal(31.5, 1.5, 6)),
        "one-seed": [25.0],
    }
    table = compare(baseline, arms, confidence=0.95)
    tested = ["far", "near", "same", "worse"]
    raw = [scipy_stats.ttest_ind(arms[n], baseline, equal_var=False).pvalue for n in tested]
    by_hand = _holm_by_hand(raw)
    library = multipletests(raw, method="holm")[1]
    for name, p, hand, lib in zip(tested, raw, by_hand, library):
        c = table[name]
        assert c.p == pytest.approx(p)
        assert c.p_holm == pytest.approx(hand) and c.p_holm == pytest.approx(lib)
        assert c.m == 4
        # the Bonferroni interval is the Welch interval at 1 - 0.05 / 4
        va = np.var(arms[name], ddof=1) / len(arms[name])
        vb = np.var(baseline, ddof=1) / len(baseline)
        assert c.half_bonferroni == pytest.approx(scipy_stats.t.ppf(1 - 0.05 / 8, c.dof) * math.sqrt(va + vb))
        assert c.half_bonferroni > c.half
    assert len(set(by_hand)) > 1 and min(by_hand) < 0.05  # the table is not all ties or all null
    lone = table["one-seed"]
    assert math.isnan(lone.p) and math.isnan(lone.p_holm) and math.isnan(lone.half_bonferroni)


@pytest.mark.parametrize("k,n", [(0, 7), (3, 7), (7, 7), (12, 40), (1, 1)])
def test_wilson_against_the_score_formula_and_statsmodels(k, n):
    from statsmodels.stats.proportion import proportion_confint

    low, high = wilson(k, n, 0.9)
    z = scipy_stats.norm.ppf(0.95)
    p = k / n  # Wilson 1927: centre and half-width of the score interval
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert low == pytest.approx(centre - half, abs=1e-12) and high == pytest.approx(centre + half, abs=1e-12)
    assert (low, high) == pytest.approx(proportion_confint(k, n, alpha=0.1, method="wilson"))


def test_wilson_of_nothing_is_nan():
    assert all(math.isnan(x) for x in wilson(0, 0))


def _expected_best_by_enumeration(scores: list[float], n: int, lower: bool) -> float:
    """Every ordered draw of n from the N scores (with replacement) is equally likely."""
    pick = min if lower else max
    draws = list(itertools.product(scores, repeat=n))
    return sum(pick(d) for d in draws) / len(draws)


@pytest.mark.parametrize("lower", [True, False])
def test_expected_best_matches_enumeration_with_ties(lower):
    scores = [31.0, 28.5, 35.0, 28.5, 40.0, 31.0]  # ties on purpose
    curve = expected_best(scores, lower_is_better=lower)
    assert len(curve) == len(scores)
    for n in range(1, 5):  # 6^4 draws: exact enumeration stays fast
        assert curve[n - 1] == pytest.approx(_expected_best_by_enumeration(scores, n, lower))
    assert curve[0] == pytest.approx(np.mean(scores))
    steps = np.diff(curve)
    assert np.all(steps <= 1e-12) if lower else np.all(steps >= -1e-12)


def test_expected_best_monte_carlo_and_limit():
    rng = np.random.default_rng(0)
    scores = list(rng.uniform(20, 60, 30))
    curve = expected_best(scores)
    draws = rng.choice(scores, size=(40_000, 10))
    assert curve[9] == pytest.approx(draws.min(axis=1).mean(), abs=0.15)
    # far beyond N draws the expected best is the best observed
    assert expected_best(scores * 40)[-1] == pytest.approx(min(scores), abs=1e-6)
    assert expected_best([5.0]) == [5.0]


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")]])
def test_expected_best_rejects_bad_scores(bad):
    with pytest.raises(ValueError, match="expected_best"):
        expected_best(bad)


@pytest.mark.parametrize("n,alpha,power", [(5, 0.05, 0.8), (10, 0.0125, 0.8), (3, 0.05, 0.9)])
def test_min_detectable_difference_equal_groups_matches_statsmodels(n, alpha, power):
    from statsmodels.stats.power import TTestIndPower

    sd = 1.7
    effect = TTestIndPower().solve_power(nobs1=n, ratio=1.0, alpha=alpha, power=power, alternative="two-sided")
    assert min_detectable_difference(sd, sd, n, n, alpha, power) == pytest.approx(effect * sd, rel=1e-4)


def test_min_detectable_difference_power_by_simulation():
    # unequal groups: the Welch test run on simulated seeds at the returned difference has the power asked for
    sd_a, sd_b, n_a, n_b = 1.0, 2.5, 5, 8
    d = min_detectable_difference(sd_a, sd_b, n_a, n_b, 0.05, 0.8)
    rng = np.random.default_rng(1)
    a = rng.normal(d, sd_a, (20_000, n_a))
    b = rng.normal(0.0, sd_b, (20_000, n_b))
    hit = scipy_stats.ttest_ind(a, b, axis=1, equal_var=False).pvalue < 0.05
    assert hit.mean() == pytest.approx(0.8, abs=0.02)


def test_min_detectable_difference_monotone_and_edges():
    base = min_detectable_difference(1.0, 2.0, 5, 7)
    assert min_detectable_difference(1.0, 2.0, 10, 14) < base  # more seeds: smaller
    assert min_detectable_difference(1.5, 2.0, 5, 7) > base  # more noise: larger
    assert min_detectable_difference(1.0, 2.0, 5, 7, alpha=0.01) > base  # stricter level: larger
    assert min_detectable_difference(1.0, 2.0, 5, 7, power=0.9) > base  # more power: larger
    assert min_detectable_difference(0.0, 0.0, 5, 5) == 0.0
    assert math.isnan(min_detectable_difference(1.0, 1.0, 1, 5))
    with pytest.raises(ValueError, match="alpha"):
        min_detectable_difference(1.0, 1.0, 5, 5, alpha=0.9, power=0.8)


def _cmp(diff: float, half_b: float, p_holm: float) -> Comparison:
    return Comparison(diff=diff, half=half_b / 2, half_bonferroni=half_b, p=p_holm, p_holm=p_holm)


@pytest.mark.parametrize(
    "comparison,claim,min_effect,expected",
    [
        (_cmp(-3.0, 1.0, 0.001), "lower", None, "supported"),
        (_cmp(3.0, 1.0, 0.001), "lower", None, "contradicted"),
        (_cmp(3.0, 1.0, 0.001), "higher", None, "supported"),
        # not significant, interval [-1.5, 0.5] reaches past -1 (the mdd): open
        (_cmp(-0.5, 1.0, 0.3), "lower", None, "not resolved at this power"),
        # not significant, interval [-0.8, 1.2] cannot reach an improvement of 1 (the mdd)
        (_cmp(0.2, 1.0, 0.6), "lower", None, "contradicted"),
        # the same interval with a smaller claimed effect stays open
        (_cmp(0.2, 1.0, 0.6), "lower", 0.5, "not resolved at this power"),
        (_cmp(-0.2, float("nan"), float("nan")), "lower", None, "not resolved at this power"),
    ],
)
def test_verdict_rules(comparison, claim, min_effect, expected):
    assert verdict(comparison, 1.0, claim=claim, min_effect=min_effect) == expected
    assert expected in VERDICTS


def test_verdict_rejects_an_unknown_claim():
    with pytest.raises(ValueError, match="claim"):
        verdict(_cmp(0.0, 1.0, 1.0), 1.0, claim="better")


def test_balanced_accuracy_and_recall_against_sklearn():
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, recall_score

    rng = np.random.default_rng(2)
    y_true = rng.choice(4, size=300, p=[0.6, 0.2, 0.05, 0.15])
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.choice(4, size=300))
    cm = confusion_matrix(y_true, y_pred, labels=range(4))
    assert balanced_accuracy(cm) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert per_class_recall(cm) == pytest.approx(list(recall_score(y_true, y_pred, average=None)))
    # a class never true: nan recall, left out of the mean as sklearn does
    y_true3 = np.where(y_true == 3, 0, y_true)
    cm3 = confusion_matrix(y_true3, y_pred, labels=range(4))
    assert math.isnan(per_class_recall(cm3)[3])
    with pytest.warns(UserWarning):
        assert balanced_accuracy(cm3) == pytest.approx(balanced_accuracy_score(y_true3, y_pred))
    with pytest.raises(ValueError, match="confusion"):
        balanced_accuracy([[1, 2, 3]])


def test_fmt_ci():
    assert fmt_ci(12.3456, 0.789) == "12.35 ± 0.79"
    assert fmt_ci(12.3456, float("nan"), 1) == "12.3"


def test_plot_expected_best_writes_a_png(tmp_path):
    from PIL import Image

    from zoo.study.curves import plot_expected_best

    path = tmp_path / "expected_best.png"
    curves = {"a:adamw": expected_best([30.0, 28.0, 35.0, 41.0, 29.5]), "b:sgd": expected_best([33.0, 31.0, 90.0])}
    plot_expected_best(curves, path, "toy")
    assert path.stat().st_size > 1000
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (840, 540)
    with pytest.raises(ValueError, match="non-empty"):
        plot_expected_best({"a": []}, tmp_path / "x.png", "toy")
