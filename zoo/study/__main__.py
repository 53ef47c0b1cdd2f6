"""``python -m zoo.study COMMAND [options]``: comparisons of arms, run as studies.

Commands (each has its own ``--help``):
  sweep   arms (model, optimizer[, one change | @default]) tuned by one successive-halving
          bracket at the same points, their best re-trained over seeds, compared with
          Welch / Holm / Bonferroni, robustness, expected-best curves and floors
  top1    the sweep with one arm per model (MODEL:OPTIMIZER), against a baseline model
  ablate  the sweep with one arm per single spec change of a base model
  floors  the majority-class and logistic-regression floors of a dataset
  plan    a study's compute plan: one timed probe run per arm, priced over its bracket and finals
  verdicts  the field's claims (zoo.study.claims), each a study, and the verdict table with its power
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    commands = ("sweep", "top1", "ablate", "floors", "plan", "verdicts")
    if command not in commands:
        from zoo.names import suggest

        print(
            f"zoo.study: unknown command {command!r}{suggest(command, commands)}; expected one of {commands}",
            file=sys.stderr,
        )
        return 2
    if command == "floors":
        from zoo.study.floors import main as floors

        return floors(rest)
    import timm
    import torch

    from zoo.machine import describe

    print(
        f"machine: {describe().summary()}; torch {torch.__version__}, timm {timm.__version__}",
        file=sys.stderr,
        flush=True,
    )
    if command == "sweep":
        from zoo.study.sweep import main as sweep

        return sweep(rest)
    if command == "plan":
        from zoo.study.plan import main as plan

        return plan(rest)
    if command == "verdicts":
        from zoo.study.verdicts import main as verdicts

        return verdicts(rest)
    from zoo.study import frontends

    return getattr(frontends, command)(rest)


if __name__ == "__main__":
    sys.exit(main())
