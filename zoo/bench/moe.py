"""MoE layers against a dense FFN of the same ACTIVE FLOPs, forward + backward, every router.

Two settings, each with its own reference: 4 experts top-2 (WideNet's, GShard's) and 64 experts
top-1 (Switch's regime, where per-expert overhead shows: many experts, few tokens each). In each,
the reference is a dense ``Mlp(dim, hidden_dim=top_k * hidden)``, so every token does the same
multiply-adds as its ``top_k`` experts (the router, ``dim x E``, is left out of the count: a share
``E / (2 * top_k * hidden)`` of the experts' multiply-adds), and the rows are:

- ``token_choice``: :class:`zoo.layers.moe.MoE`, default routing (one group an image, capacity
  factor 1.2, buffer trimmed to the largest expert load: the eager CPU default);
- ``token_choice + BPR``: the same with ``batch_priority=True``;
- ``expert_choice``: ``router="expert_choice"`` at the capacity factor whose per-image capacity
  is ``floor(top_k * N / E)`` (``N`` tokens an image), so its experts take ``top_k`` tokens'
  worth per token (or a fraction of a token fewer): the dense layer's FLOPs;
- ``soft_moe``: :class:`zoo.layers.soft_moe.SoftMoE` with ``round(top_k * N / E)`` slots per
  expert, so as many slot rows as the top-k assignments; its three token-slot products (logits,
  dispatch, combine) add a share ``1.5 * N / hidden`` to the expert FLOPs, which it pays.

Every MoE router has its rows rescaled to one norm (see ``_balanced_router_``).

Memory: by default the process keeps freed memory as the training loop does
(:func:`zoo.machine.keep_freed_memory`), since that is where these layers train: the dense
layer's few large buffers and the MoEs' many smaller ones (dispatch buffer, index vectors, per
expert hidden maps) are then reused every step instead of being zero-filled again page by page
by the kernel, a cost that falls unevenly on the two sides. ``--allocator system`` times them
under glibc's defaults instead (``ZOO_ALLOCATOR=system`` in training).

All run in training mode (router noise on) on the same input, a ``(batch, tokens, dim)`` tensor
of unit-scale activations that requires grad (as inside a network), after warm-up; the layers
are timed in turn inside each repeat (the order rotates every repeat) and the median of the
repeats is reported. ratio = tokens/s over the dense layer's, measured in this one run; absolute
numbers are noise on a shared machine, and so are the ratios when the load average printed with
them is well above the thread count.

    python -m zoo.bench moe [--settings 4e_top2,64e_top1] [--batch B --dim C --hidden H ...]
    python -m zoo.bench.moe ...

The measured ratios are in ``zoo/bench/results/moe_machines.md`` (and ``moe_<machine>.md``).
Each setting's table is printed as soon as it is measured, and the tables so far, with notes under
them (settings, repeats, load average, the command, the machine), are written to ``--out``
(default ``zoo/bench/results``) after every setting, so a run stopped midway keeps what it
measured: ``NAME_<machine>.md`` (exactly what is printed), ``.csv`` (the rows) and ``.json`` (rows,
settings, command, commit, CPU, threads, versions), one set per machine kind
(``zoo.bench.machines``); then ``NAME_machines.md``, every router's ratio on every machine kind met,
newest first, the block the README shows (``python -m zoo.bench readme`` copies ``NAME.md`` files
between ``<!-- results:NAME -->`` markers). NAME is ``--name``, default ``moe``; ``--spread-only``
rewrites ``NAME_machines.md`` from the files there and measures nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from zoo.bench.machines import add_spread_only, rewrite_spreads, write_machine_results
from zoo.bench.report import RESULTS, command_line, environment, machine_line, markdown_table
from zoo.layers.mlp import Mlp
from zoo.layers.moe import MoE, collect_aux_loss
from zoo.layers.soft_moe import SoftMoE

__all__ = ["SETTINGS", "main"]


@dataclasses.dataclass(frozen=True)
class Setting:
    experts: int
    top_k: int
    batch: int  # images per step
    dim: int
    hidden: int  # hidden width of EACH expert


# The same experts in both (ViT-S width, 384 / 1536). 64 experts top-1 take a bigger batch: at 8
# images an expert would multiply 8 * 197 / 64 rows a step, where a bmm runs far below one big
# matmul (its weight-gradient products have only that many rows to sum over); at 128 images each
# expert gets 16 times as many, closer to a Switch layer's experts, which see thousands of tokens
# a step (how the ratio grows with the batch: --batch, results in zoo/bench/results/moe_*.md).
SETTINGS = {
    "4e_top2": Setting(experts=4, top_k=2, batch=8, dim=384, hidden=1536),
    "64e_top1": Setting(experts=64, top_k=1, batch=128, dim=384, hidden=1536),
}
ROUTERS = ("token_choice", "token_choice_bpr", "expert_choice", "soft_moe")
PROG = "python -m zoo.bench moe"
COLUMNS = [
    "setting",
    "experts",
    "top_k",
    "batch",
    "tokens",
    "dim",
    "hidden",
    "layer",
    "label",
    "tokens_per_s",
    "ms_per_step",
    "ratio",
    "buffer_rows",
    "width",
    "unrouted",
]
HEADER = ["setting", "layer", "tokens/s", "ms/step", "ratio", "rows x width per linear", "unrouted"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help=f"comma-separated, from {', '.join(SETTINGS)} (each: experts, top-k, batch, dim, hidden)",
    )
    p.add_argument("--batch", type=int, default=None, help="images per step, every setting (default: the setting's)")
    p.add_argument("--tokens", type=int, default=197, help="tokens per image (ViT-S/16 at 224: 197)")
    p.add_argument("--dim", type=int, default=None, help="width, every setting (default: the setting's)")
    p.add_argument("--hidden", type=int, default=None, help="hidden width of each expert (default: the setting's)")
    p.add_argument("--capacity-factor", type=float, default=1.2, help="token choice's; <= 0: unlimited")
    p.add_argument(
        "--padded",
        action="store_true",
        help="also time token choice padded to its full capacity (what torch.compile runs)",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument(
        "--allocator",
        choices=("reuse", "system"),
        default="reuse",
        help="reuse: keep freed memory, as the training loop does (default); system: glibc's defaults",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPU cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    p.add_argument("--name", default="moe", help="results name (default: %(default)s; files NAME_<machine>)")
    add_spread_only(p)
    args = p.parse_args(argv)
    unknown = [s for s in args.settings.split(",") if s not in SETTINGS]
    if unknown:
        p.error(f"--settings: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(SETTINGS)}")
    return args


def _step(layer: nn.Module, x: torch.Tensor) -> None:
    """One training step's worth of work for ``layer``: forward, loss, backward (to the input too)."""
    y = layer(x)
    loss = y.square().mean() + collect_aux_loss(layer)  # collect also clears for the next step
    loss.backward()
    layer.zero_grad(set_to_none=True)
    x.grad = None


def _balanced_router_(moe: MoE) -> MoE:
    """Rescale the router's rows to one norm. A random router favours the experts whose rows
    happen to be longer (on isotropic input the longest row wins most often), an imbalance the
    balance loss removes in training; with equal norms every expert is equally likely, as under a
    trained, balanced router."""
    with torch.no_grad():
        w = moe.router.weight
        w.mul_(w.norm(dim=1).mean() / w.norm(dim=1, keepdim=True))
    return moe


def _layers(s: Setting, tokens: int, capacity_factor: float, padded: bool) -> dict[str, tuple[str, nn.Module]]:
    moe = dict(hidden_dim=s.hidden, num_experts=s.experts, top_k=s.top_k)
    # Expert choice takes ceil(factor * N * k / E) tokens of an image per expert: the factor whose
    # capacity is floor(k * N / E), so that it never does more than the dense layer's FLOPs (1.0
    # would round 197 / 64 up to 4 tokens an expert, more than the dense layer's work). Soft MoE: as
    # many slots as assignments.
    ec_capacity = max(1, s.top_k * tokens // s.experts)
    ec_factor = ec_capacity * s.experts / (s.top_k * tokens)
    slots = max(1, round(s.top_k * tokens / s.experts))
    cf = capacity_factor
    layers = {
        "dense": (f"dense Mlp (hidden {s.top_k * s.hidden})", Mlp(s.dim, hidden_dim=s.top_k * s.hidden)),
        "token_choice": (f"token_choice, capacity {cf}", MoE(s.dim, capacity_factor=cf, **moe)),
        "token_choice_bpr": (
            f"token_choice + BPR, capacity {cf}",
            MoE(s.dim, capacity_factor=cf, batch_priority=True, **moe),
        ),
        "expert_choice": (
            f"expert_choice, capacity {ec_factor:.3g} ({ec_capacity}/image)",
            MoE(s.dim, router="expert_choice", capacity_factor=ec_factor, **moe),
        ),
        "soft_moe": (
            f"soft_moe, {slots} slots/expert",
            SoftMoE(s.dim, hidden_dim=s.hidden, num_experts=s.experts, slots_per_expert=slots),
        ),
    }
    if padded:
        layers["token_choice_padded"] = (
            f"token_choice, capacity {cf}, padded",
            MoE(s.dim, capacity_factor=cf, trim_capacity=False, **moe),
        )
    for _, layer in layers.values():
        if isinstance(layer, MoE):
            _balanced_router_(layer)
    return {name: (label, layer.train()) for name, (label, layer) in layers.items()}


def _measure(s: Setting, args: argparse.Namespace) -> list[dict]:
    """One row a layer of setting ``s``: its tokens/s and ratio to the dense layer's, what it multiplied."""
    torch.manual_seed(args.seed)
    layers = _layers(s, args.tokens, args.capacity_factor, args.padded)
    # Like a pre-norm block's input: unit scale, and requiring grad, as inside a network (every
    # layer but the first backpropagates to its input; Soft MoE's slots and the MoEs' buffers
    # need that gradient anyway, which a leaf input would let the dense layer skip).
    x = torch.randn(s.batch, args.tokens, s.dim, requires_grad=True)
    num_tokens = s.batch * args.tokens
    times: dict[str, list[float]] = {name: [] for name in layers}
    rows: dict[str, list[int]] = {name: [] for name in layers}
    dropped: dict[str, list[float]] = {name: [] for name in layers}

    def run(name: str) -> float:
        layer = layers[name][1]
        t0 = time.perf_counter()
        _step(layer, x)
        elapsed = time.perf_counter() - t0
        if isinstance(layer, MoE):
            rows[name].append(s.experts * layer.last_stats["slots"])
            dropped[name].append(float(layer.last_stats["unrouted_tokens"]) / num_tokens)
        elif isinstance(layer, SoftMoE):
            rows[name].append(layer.num_slots * s.batch)
        else:
            rows[name].append(num_tokens)
        return elapsed

    names = list(layers)
    for _ in range(args.warmup):
        for name in names:
            run(name)
    for r in range(args.repeats):
        # Interleave the layers; rotate the order each repeat so none always runs first.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(run(name))
    tps = {name: num_tokens / statistics.median(ts) for name, ts in times.items()}
    width = {name: s.top_k * s.hidden if name == "dense" else s.hidden for name in layers}
    shape = dict(experts=s.experts, top_k=s.top_k, batch=s.batch, tokens=args.tokens, dim=s.dim, hidden=s.hidden)
    return [
        {
            **shape,
            "layer": name,
            "label": layers[name][0],
            "tokens_per_s": tps[name],
            "ms_per_step": 1e3 * statistics.median(times[name]),
            "ratio": tps[name] / tps["dense"],
            "buffer_rows": statistics.median(rows[name]),
            "width": width[name],
            "unrouted": statistics.mean(dropped[name]) if dropped[name] else None,
        }
        for name in names
    ]


def format_table(rows: list[dict]) -> str:
    """One setting's rows as a Markdown table, padded so that it reads as a table printed too."""
    cells = [
        [
            f"{r['experts']}e top-{r['top_k']}",
            r["label"],
            f"{r['tokens_per_s']:.0f}",
            f"{r['ms_per_step']:.1f}",
            f"{r['ratio']:.3f}",
            f"{r['buffer_rows']:.0f} x {r['width']}",
            "-" if r["unrouted"] is None else f"{r['unrouted']:.2%}",
        ]
        for r in rows
    ]
    return markdown_table(HEADER, cells, [False, False, True, True, True, True, True])


def _setting_line(key: str, s: Setting, tokens: int) -> str:
    return (
        f"{key}: {s.experts} experts x hidden {s.hidden}, top_k={s.top_k}, dim={s.dim}, "
        f"{s.batch} images x {tokens} tokens = {s.batch * tokens} tokens a step; dense hidden {s.top_k * s.hidden}"
    )


def _notes(args: argparse.Namespace, settings: dict[str, Setting], done: list[str], load_before: float) -> list[str]:
    """The lines under the tables saying what was measured, as of the settings in ``done``."""
    lines = [
        "MoE routers vs a dense FFN of equal active FLOPs, forward+backward, training mode (router noise on), "
        f"CPU, torch threads {torch.get_num_threads()}; warmup {args.warmup}, median of {args.repeats} "
        "interleaved repeats (the order rotating every repeat).",
        f"Memory: {args.allocator_line}.",
        *(_setting_line(key, settings[key], args.tokens) + "." for key in done),
    ]
    if missing := [key for key in settings if key not in done]:  # a run stopped midway says so
        lines.append(f"Not measured (the run stopped or is still running): {', '.join(missing)}.")
    lines += [
        f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} CPUs: "
        "well above the thread count means other processes shared the cores, which slows the MoE's many "
        "small parallel ops more than the dense matmuls.",
        "ratio = tokens/s over the dense row's of the same setting; rows = what each linear multiplied: MoE "
        "buffer rows (experts x slots, padding included), Soft MoE slots, dense tokens; unrouted = tokens no "
        "expert kept (the residual carries them).",
    ]
    return lines


SPREAD_TITLE = (
    "MoE layers, tokens/s over the dense FFN's of equal active FLOPs (forward + backward), on every machine kind met:"
)


def spread_cells(result: dict) -> dict[str, str]:
    """A results file's row of the spread across machines: every router's ratio, setting by setting."""
    return {
        f"{r['experts']}e top-{r['top_k']} {r['layer']}": f"{r['ratio']:.2f}"
        for r in result["rows"]
        if r["layer"] != "dense"
    }


def main(argv: list[str] | None = None) -> int:
    from zoo.machine import describe, keep_freed_memory

    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    if args.spread_only:
        return rewrite_spreads(args.out, {args.name: SPREAD_TITLE}, spread_cells)
    threads = args.threads or len(os.sched_getaffinity(0))
    kept = keep_freed_memory() if args.allocator == "reuse" else None  # None also where it cannot (not glibc)
    args.allocator_line = f"as the training loop, {kept}" if kept else "the system allocator's defaults"
    torch.set_num_threads(threads)
    settings = {}
    for key in args.settings.split(","):
        s = SETTINGS[key]
        settings[key] = dataclasses.replace(
            s, batch=args.batch or s.batch, dim=args.dim or s.dim, hidden=args.hidden or s.hidden
        )
    command, env = command_line(PROG, argv), environment(threads)
    print(f"MoE routers vs a dense FFN of equal active FLOPs; torch {torch.__version__}, torch threads {threads}")
    print(f"machine: {describe().summary()}")
    print(f"memory: {args.allocator_line}")
    for key, s in settings.items():
        print(_setting_line(key, s, args.tokens))
    print(f"warmup {args.warmup}, median of {args.repeats} interleaved repeats\n")
    run = {k: getattr(args, k) for k in ("tokens", "capacity_factor", "padded", "warmup", "repeats", "seed")}
    run["allocator"] = "reuse" if kept else "system"  # what took effect, not what was asked
    meta = {"command": command, **env, "settings": {k: dataclasses.asdict(v) for k, v in settings.items()}, **run}
    load_before = os.getloadavg()[0]
    tables, rows, notes = [], [], []
    for key, s in settings.items():  # each setting's table as soon as it is measured, and its files
        measured = [{"setting": key, **r} for r in _measure(s, args)]
        tables.append(format_table(measured))
        rows += measured
        print(("\n" if len(tables) > 1 else "") + tables[-1], flush=True)
        notes = _notes(args, settings, list(settings)[: len(tables)], load_before)
        notes += [f"`{command}`", machine_line(env)]
        text = "\n\n".join(tables) + "\n\n" + "\n".join(notes)
        spread = (SPREAD_TITLE, spread_cells)
        paths = write_machine_results(args.out, args.name, env, text, rows, COLUMNS, meta, spread)
    print("\n" + "\n".join(notes))
    print(f"results: {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
