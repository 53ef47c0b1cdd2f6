"""``python -m zoo.bench COMMAND [options]``: one entry point for every benchmark.

Commands (each module has its own ``--help``):
  data    DeiT train pipeline images/s per core, zoo vs timm's create_transform
  moe     MoE layer tokens/s vs a dense MLP of the same active FLOPs
  speed   params, MACs, eval / train-step images/s and memory; ratio to the timm twin
  top1    top-1 error of models vs the ResNet baseline, same recipe, over seeds
  ablate  one-change ablations of a base model (token mixer, channel mixer, ...)
  sweep   equal-budget Optuna sweeps of arms (model, optimizer[, one change]): tuned, re-trained over seeds
  readme  copy the results files' Markdown tables into README.md's marked blocks (--check: compare only)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "data": "zoo.bench.data",
    "moe": "zoo.bench.moe",
    "speed": "zoo.bench.speed",
    "top1": "zoo.bench.top1",
    "ablate": "zoo.bench.ablate",
    "sweep": "zoo.bench.sweep",
    "readme": "zoo.bench.report",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        from zoo.names import suggest

        print(
            f"zoo.bench: unknown command {command!r}{suggest(command, COMMANDS)}; expected one of {sorted(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    if command != "readme":  # every figure is printed beside the machine that measured it
        import timm
        import torch

        from zoo.machine import describe

        print(
            f"machine: {describe().summary()}; torch {torch.__version__}, timm {timm.__version__}",
            file=sys.stderr,
            flush=True,
        )
    return importlib.import_module(COMMANDS[command]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
