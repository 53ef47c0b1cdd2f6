"""The sparse feed-forward layer's eval speed against a dense MLP of the same parameter count.

Jaszczur et al. 2021, "Sparse is Enough in Scaling Transformers", https://arxiv.org/abs/2111.12763,
claim a faster *decoding*: generating one token at a time, a layer that reads one unit in ``N`` of
its feed-forward weights does ``1/N`` of the memory traffic. "Eval speed" here is therefore
measured in three regimes, in eval mode under ``torch.inference_mode``, each with its own meaning:

- ``token``: one token a call (batch 1, sequence 1): the decoding analogue, per-token latency;
  :class:`zoo.layers.sparse_ffn.SparseFFN` reads only the chosen rows of its weights here;
- ``image``: one image's tokens a call (batch 1, ``--tokens``): latency of classifying one image,
  where the sparse layer computes the dense product masked to the chosen units (cheaper than a
  gather of weights per token once tokens outnumber ``block_size``; see its docstring);
- ``batch``: ``--batch`` images a call: throughput.

The reference is :class:`zoo.layers.mlp.Mlp` with ReLU (the sparse layer's activation) and the
hidden width that gives it the sparse layer's parameter count (its controller included), rounded
to the nearest unit. Each regime times every layer in turn inside each repeat (the order rotating),
after warm-up, and reports the median; ratio = the dense layer's time over the sparse layer's (above
1: the sparse layer is faster), measured in this one run. Absolute times are noise on a shared
machine; so are the ratios when the load average printed with them is above the thread count.

    python -m zoo.bench sparse-ffn [--dim 384 --hidden 1536 --block-sizes 32,64,128 --rank 64]
                                   [--tokens 197 --batch 32 --warmup 5 --repeats 21 --threads T]

Writes ``NAME_<machine>.md`` (the table printed), ``.csv`` and ``.json`` to ``--out`` (default
``zoo/bench/results``; ``--name``, default ``sparse_ffn``), one set per machine kind
(``zoo.bench.machines``), then ``NAME_machines.md``: every ratio on every machine kind met.
``--device cuda`` times on the GPU instead (synchronising around each call).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from zoo.bench.counts import count_params
from zoo.bench.machines import write_machine_results
from zoo.bench.report import RESULTS, command_line, environment, machine_line, markdown_table
from zoo.layers.mlp import Mlp
from zoo.layers.sparse_ffn import SparseFFN

__all__ = ["dense_twin", "main"]

PROG = "python -m zoo.bench sparse-ffn"
REGIMES = ("token", "image", "batch")
COLUMNS = ["regime", "tokens_per_call", "layer", "block_size", "hidden", "params", "us_per_call", "ratio"]
HEADER = ["regime", "tokens/call", "layer", "params", "us/call", "ratio"]


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    return values


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=384, help="model width (ViT-S: %(default)s)")
    p.add_argument("--hidden", type=int, default=1536, help="sparse layer's hidden width (ViT-S: %(default)s)")
    p.add_argument(
        "--block-sizes", type=_positive_ints, default=[32, 64, 128], help="block sizes N (default: 32,64,128)"
    )
    p.add_argument("--rank", type=int, default=64, help="controller rank (trax's d_lowrank: %(default)s)")
    p.add_argument("--tokens", type=int, default=197, help="tokens an image (ViT-S/16 at 224: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="images a call in the batch regime")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPU cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    p.add_argument("--name", default="sparse_ffn", help="results file stem (default: %(default)s)")
    args = p.parse_args(argv)
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        p.error(f"--device: {args.device!r}: expected cpu, or cuda where a GPU is present")
    for size in args.block_sizes:
        if args.hidden % size:
            p.error(f"--block-sizes: {size} does not divide --hidden {args.hidden}")
    for key in ("dim", "hidden", "rank", "tokens", "batch", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key}: expected >= 1, got {getattr(args, key)}")
    return args


def dense_twin(sparse: SparseFFN, dim: int) -> Mlp:
    """A ReLU ``Mlp`` whose hidden width gives it ``sparse``'s parameter count (to one unit):
    ``2 * dim * h + h + dim`` parameters for hidden width ``h``."""
    hidden = round((count_params(sparse) - dim) / (2 * dim + 1))
    return Mlp(dim, hidden_dim=hidden, act="relu")


def _layers(args: argparse.Namespace) -> dict[str, tuple[int | None, int, nn.Module]]:
    """name -> (block size or None, hidden width, layer in eval mode)."""
    torch.manual_seed(args.seed)
    layers: dict[str, tuple[int | None, int, nn.Module]] = {}
    for size in args.block_sizes:
        layers[f"sparse_ffn N={size}"] = (
            size,
            args.hidden,
            SparseFFN(args.dim, hidden_dim=args.hidden, block_size=size, controller_rank=args.rank),
        )
    # the controller's parameters grow with the hidden width only, not N: one twin fits every N
    twin = dense_twin(next(iter(layers.values()))[2], args.dim)
    layers = {f"dense Mlp (hidden {twin.fc1.out_features})": (None, twin.fc1.out_features, twin), **layers}
    return {name: (size, hidden, layer.to(args.device).eval()) for name, (size, hidden, layer) in layers.items()}


def _time_regime(layers: dict, x: torch.Tensor, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds a call of each layer on ``x``, the layers interleaved, the order rotating."""
    names = list(layers)
    times: dict[str, list[float]] = {name: [] for name in names}
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        for r in range(warmup + repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                sync()
                t0 = time.perf_counter()
                layers[name][2](x)
                sync()
                if r >= warmup:
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(args: argparse.Namespace) -> list[dict]:
    layers = _layers(args)
    shapes = {
        "token": (1, 1, args.dim),
        "image": (1, args.tokens, args.dim),
        "batch": (args.batch, args.tokens, args.dim),
    }
    dense = next(iter(layers))
    rows = []
    for regime in REGIMES:
        x = torch.randn(shapes[regime], device=args.device)  # unit scale, as after a pre-norm
        seconds = _time_regime(layers, x, args.warmup, args.repeats)
        for name, (size, hidden, layer) in layers.items():
            rows.append(
                {
                    "regime": regime,
                    "tokens_per_call": x.numel() // args.dim,
                    "layer": name,
                    "block_size": size,
                    "hidden": hidden,
                    "params": count_params(layer),
                    "us_per_call": 1e6 * seconds[name],
                    "ratio": seconds[dense] / seconds[name],
                }
            )
    return rows


SPREAD_TITLE = (
    "Sparse feed-forward (one unit in N active), eval time of a dense MLP of equal parameters over its own "
    "(above 1: faster than dense), on every machine kind met:"
)


def spread_cells(result: dict) -> dict[str, str]:
    """A results file's row of the spread across machines: each sparse layer's ratio, regime by regime."""
    return {
        f"{r['regime']} N={r['block_size']}": f"{r['ratio']:.2f}" for r in result["rows"] if r["block_size"] is not None
    }


def format_table(rows: list[dict]) -> str:
    cells = [
        [
            r["regime"],
            str(r["tokens_per_call"]),
            r["layer"],
            f"{r['params']:,}",
            f"{r['us_per_call']:.1f}",
            f"{r['ratio']:.2f}",
        ]
        for r in rows
    ]
    return markdown_table(HEADER, cells, [False, True, False, True, True, True])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    rows = measure(args)
    command, env = command_line(PROG, argv), environment(threads)
    notes = [
        f"Eval mode, inference_mode, device {args.device}, torch threads {threads}; dim {args.dim}, "
        f"sparse hidden {args.hidden}, "
        f"controller rank {args.rank}; warmup {args.warmup}, median of {args.repeats} interleaved repeats. "
        "Regimes: token = one token a call (the decoding analogue: the sparse layer reads only its chosen "
        f"units' weights); image = one image's {args.tokens} tokens; batch = {args.batch} images. "
        "ratio = the dense layer's time over this layer's (above 1: faster than dense).",
        f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} CPUs.",
        f"`{command}`",
        machine_line(env),
    ]
    text = format_table(rows) + "\n\n" + "\n".join(notes)
    print(text)
    keys = ("dim", "hidden", "block_sizes", "rank", "tokens", "batch", "warmup", "repeats", "seed", "device")
    meta = {"command": command, **env, "settings": {k: getattr(args, k) for k in keys}}
    paths = write_machine_results(
        args.out, args.name, env, text, rows, COLUMNS, meta, (SPREAD_TITLE, spread_cells), device=args.device
    )
    print(f"results: {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
