"""Expected-best-score curves (Dodge et al. 2019, "Show Your Work", arXiv 1909.03004): each arm's
expected best holdout error against the number of configurations tried, so a reader sees which
arm wins at which tuning budget, not only at the one the study spent. The curves come from
``zoo.study.statistics.expected_best`` on the first-rung scores."""

from __future__ import annotations

import math
from pathlib import Path

from zoo.atomic import atomic_write


def plot_expected_best(
    curves: dict[str, list[float]],
    path: Path | str,
    title: str,
    *,
    ylabel: str = "expected best holdout error (%)",
) -> None:
    """One line per arm, x = number of configurations n (1 .. len(curve), log2 axis), y = the
    expected best at n; written atomically as a PNG to ``path``."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.ticker import FixedLocator, NullLocator

    if not curves or any(len(c) == 0 for c in curves.values()):
        raise ValueError(f"plot_expected_best: every arm needs a non-empty curve, got {sorted(curves)}")
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot()
    for i, (arm, curve) in enumerate(curves.items()):
        ax.plot(range(1, len(curve) + 1), curve, "o-", color=f"C{i % 10}", label=arm, ms=3, lw=1.2)
    longest = max(len(c) for c in curves.values())
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator([2**k for k in range(int(math.log2(longest)) + 1)]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(lambda x, _pos: f"{x:g}")
    ax.set_xlabel("number of configurations n (drawn from the arm's first rung)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
