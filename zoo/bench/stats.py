"""Small statistics for benchmark tables: means with Student-t intervals over seeds."""

from __future__ import annotations

import math
import statistics

from scipy import stats as _scipy_stats


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its two-sided t interval (nan for a single value: no spread known)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, sem * _scipy_stats.t.ppf(0.5 + confidence / 2, len(values) - 1)


def diff_ci(a: list[float], b: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Difference of means a - b and the half-width of Welch's t interval for it."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return diff, float("nan")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, 0.0
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return diff, se * _scipy_stats.t.ppf(0.5 + confidence / 2, dof)


def fmt_ci(mean: float, half: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"
