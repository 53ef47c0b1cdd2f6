"""What one optimizer step costs, for every ``optim.name``, as a multiple of the model's forward+backward.

The default config's model, batch and image size (3 channels and 10 classes, as MNIST-5k is
served) get one copy of the model per optimizer, same initial weights, same batch. Every step
recomputes the gradients (forward, loss, backward: timed, but as the reference, not as the step)
and then times ``optimizer.step()`` alone. Optimizers with periodic work (shampoo's inverse roots,
soap's eigenbasis refresh, shampoo_plain's roots at every step) are timed at their configured
schedules, so a sample is the mean step over a block of ``--block`` consecutive steps (default:
shampoo's period, a multiple of soap's), after ``--warmup-steps`` steps that take shampoo to its
start step (before it, its step is the graft's). The optimizers' blocks are
interleaved (the order rotates every repeat); the table shows the median block of each, divided by
the median forward+backward of all (per step, every model the same), with the range over repeats.
kron runs its early schedule (timm's: a preconditioner update every step for the first 500 steps).

Absolute times are noise on a shared machine; the ratio is measured in one run, and the load
average is printed with it.

    python -m zoo.bench optim [--optimizers adamw,shampoo,...] [--batch B --block N --repeats R ...]

Results: ``zoo/bench/results/optim_steps_<machine>.{md,csv,json}`` (one set per machine kind,
``zoo.bench.machines``) and ``optim_steps_machines.md`` (every machine kind's ratios).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zoo.bench.machines import add_spread_only, rewrite_spreads, write_machine_results
from zoo.bench.report import RESULTS, command_line, environment, machine_line, markdown_table

PROG = "python -m zoo.bench optim"
COLUMNS = ["optimizer", "implementation", "step_ms", "fwd_bwd_ms", "ratio", "ratio_min", "ratio_max"]
SPREAD_TITLE = "One optimizer step over the default model's forward+backward, on every machine kind met:"


def _parse(argv: list[str]) -> argparse.Namespace:
    from zoo.train.optim import OPTIMIZERS

    shampoo = OPTIMIZERS["shampoo"].defaults
    period, first = shampoo["preconditioning_compute_steps"], shampoo["start_preconditioning_step"]
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated optim.name values")
    p.add_argument("--model", default=None, help="model name (default: the default config's)")
    p.add_argument("--spec", default=None, help="model.spec override as YAML (tests: a toy model)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: the default config's)")
    p.add_argument("--img-size", type=int, default=None, help="default: the default config's")
    p.add_argument("--in-chans", type=int, default=3, help="default: %(default)s (MNIST-5k is served as RGB)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--block", type=int, default=period, help="steps per timed sample (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=first - 1, help="untimed steps first (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks per optimizer (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPU cores)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    p.add_argument("--name", default="optim_steps", help="results name (default: %(default)s; files NAME_<machine>)")
    add_spread_only(p)
    args = p.parse_args(argv)
    unknown = [n for n in args.optimizers.split(",") if n not in OPTIMIZERS]
    if unknown:
        p.error(f"--optimizers: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(OPTIMIZERS)}")
    for key in ("block", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key}: must be >= 1, got {getattr(args, key)}")
    if args.warmup_steps < 0:
        p.error(f"--warmup-steps: must be >= 0, got {args.warmup_steps}")
    return args


class Contender:
    """One optimizer over its own copy of the model, and its gradients recomputed per step."""

    def __init__(self, name: str, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        from zoo.train import load_config
        from zoo.train.optim import create_optimizer, describe_optimizer

        cfg = load_config(None, [f"optim.name={name}"])  # the default config's lr and weight decay
        self.name, self.model, self.batch = name, copy.deepcopy(model).train(), batch
        self.optimizer = create_optimizer(self.model, cfg)
        self.implementation = describe_optimizer(cfg.optim)["implementation"]

    def step(self) -> tuple[float, float]:
        """(forward+backward seconds, optimizer step seconds) of one training step."""
        x, y = self.batch
        self.optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        F.cross_entropy(self.model(x), y).backward()
        middle = time.perf_counter()
        self.optimizer.step()
        return middle - start, time.perf_counter() - middle

    def block(self, steps: int) -> tuple[float, float]:
        """Mean (forward+backward, step) seconds over ``steps`` consecutive steps."""
        times = [self.step() for _ in range(steps)]
        return statistics.fmean(t[0] for t in times), statistics.fmean(t[1] for t in times)


def resolve(args: argparse.Namespace) -> dict:
    """The model, spec, batch and image size: the arguments', else the default config's."""
    import yaml

    from zoo.train import load_config

    base = load_config(None, [f"model.spec={args.spec}"] if args.spec else [])
    return {
        "model": args.model or base.model.name,
        "spec": yaml.safe_load(args.spec) if args.spec else dict(base.model.spec),
        "batch": args.batch or base.train.batch_size,
        "img_size": args.img_size or base.aug.img_size,
    }


def measure(args: argparse.Namespace, setup: dict) -> list[dict]:
    import zoo

    torch.manual_seed(0)
    model = zoo.create_model(setup["model"], num_classes=args.num_classes, in_chans=args.in_chans, **setup["spec"])
    g = torch.Generator().manual_seed(0)
    size = (setup["batch"], args.in_chans, setup["img_size"], setup["img_size"])
    batch = (torch.randn(size, generator=g), torch.randint(0, args.num_classes, (setup["batch"],), generator=g))
    contenders = [Contender(n, model, batch) for n in args.optimizers.split(",")]
    for c in contenders:
        for _ in range(args.warmup_steps):
            c.step()
    fwd_bwd: list[float] = []
    step: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(args.repeats):
        for c in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:  # the order rotates
            f, s = c.block(args.block)
            fwd_bwd.append(f)
            step[c.name].append(s)
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    reference = statistics.median(fwd_bwd)
    return [
        {
            "optimizer": c.name,
            "implementation": c.implementation,
            "step_ms": 1e3 * statistics.median(step[c.name]),
            "fwd_bwd_ms": 1e3 * reference,
            "ratio": statistics.median(step[c.name]) / reference,
            "ratio_min": min(step[c.name]) / reference,
            "ratio_max": max(step[c.name]) / reference,
        }
        for c in contenders
    ]


def format_table(rows: list[dict]) -> str:
    header = ["optimizer", "implementation", "step / (forward+backward)", "range over repeats", "step ms"]
    cells = [
        [
            r["optimizer"],
            r["implementation"],
            f"{r['ratio']:.3g}x",
            f"{r['ratio_min']:.3g}-{r['ratio_max']:.3g}x",
            f"{r['step_ms']:.3g}",
        ]
        for r in sorted(rows, key=lambda r: r["ratio"])
    ]
    return markdown_table(header, cells, [False, False, True, True, True])


def spread_cells(result: dict) -> dict[str, str]:
    """A results file's row of the spread across machines: every optimizer's ratio."""
    return {r["optimizer"]: f"{r['ratio']:.3g}x" for r in result["rows"]}


def main(argv: list[str] | None = None) -> int:
    from zoo.machine import describe

    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    if args.spread_only:
        return rewrite_spreads(args.out, {args.name: SPREAD_TITLE}, spread_cells)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    command, env = command_line(PROG, argv), environment(threads)
    print(f"one optimizer step vs forward+backward; torch {torch.__version__}, torch threads {threads}")
    print(f"machine: {describe().summary()}")
    load_before = os.getloadavg()[0]
    setup = resolve(args)
    rows = measure(args, setup)
    table = format_table(rows)
    notes = [
        f"Model {setup['model']}{' (spec ' + args.spec + ')' if args.spec else ''}, batch {setup['batch']} at "
        f"{setup['img_size']}x{setup['img_size']}, fp32, eager; the median of {args.repeats} interleaved blocks "
        f"of {args.block} steps each after {args.warmup_steps} untimed steps; forward+backward "
        f"{rows[0]['fwd_bwd_ms']:.3g} ms a step (median of all blocks). Load average "
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on {threads} thread{'s' * (threads != 1)}.",
        f"`{command}`",
        machine_line(env),
    ]
    text = table + "\n\n" + "\n\n".join(notes)
    print("\n" + text)
    settings = {
        **setup,
        **{k: getattr(args, k) for k in ("in_chans", "num_classes", "block", "warmup_steps", "repeats")},
    }
    meta = {"command": command, **env, "settings": settings}
    paths = write_machine_results(args.out, args.name, env, text, rows, COLUMNS, meta, (SPREAD_TITLE, spread_cells))
    print(f"results: {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
