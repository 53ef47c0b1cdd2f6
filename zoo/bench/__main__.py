"""``python -m zoo.bench COMMAND [options]``: one entry point for every benchmark.

Commands (each module has its own ``--help``):
  data    DeiT train pipeline images/s per core, zoo vs timm's create_transform
  moe     MoE layer tokens/s vs a dense MLP of the same active FLOPs
  optim   one optimizer step of every optim.name as a multiple of the default model's forward+backward
  norm-precision  L1 vs L2 norms' outputs and gradients in bf16 / fp16 against float32
  sparse-ffn      sparse feed-forward ("Sparse is Enough") eval speed vs a dense MLP of equal parameters
  speed   params, MACs, eval / train-step images/s and memory; ratio to the timm twin
  (top1, ablate and sweep are studies now: python -m zoo.study COMMAND --help)
  readme  copy the results files' Markdown tables into README.md's and docs/'s marked blocks (--check: compare only)
  first-run  time the README's first command (install + train the default) from a fresh clone
  suite   run the README's test command from a fresh clone; record pytest's summary line
  data-stats  mean / std of the embedded data sets as served, beside zoo.data's normalisation constants
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "data": "zoo.bench.data",
    "moe": "zoo.bench.moe",
    "optim": "zoo.bench.optim",
    "norm-precision": "zoo.bench.norm_precision",
    "sparse-ffn": "zoo.bench.sparse_ffn",
    "speed": "zoo.bench.speed",
    "readme": "zoo.bench.report",
    "first-run": "zoo.bench.first_run",
    "suite": "zoo.bench.suite",
    "data-stats": "zoo.bench.data_stats",
}
MOVED = ("top1", "ablate", "sweep")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in MOVED:  # one implementation of a comparison: the study package's
        print(f"zoo.bench {command}: moved to `python -m zoo.study {command}` (see its --help)", file=sys.stderr)
        return 2
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
