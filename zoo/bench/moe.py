"""MoE layer speed vs a dense FFN of the same ACTIVE FLOPs, forward + backward, on the CPU.

Reference: a dense ``Mlp(dim, hidden_dim=top_k * hidden)``, so every token does the same
multiply-adds as its ``top_k`` experts (the router, ``dim x E``, is left out of the count;
it is under 1% here). The MoE is timed twice, same module and weights: with its buffer
trimmed to the largest expert load (the eager CPU default) and padded to the full capacity
(what ``torch.compile`` or ``trim_capacity=False`` runs). All run in training mode on the same
input (router noise on, training capacity factor), after warm-up; the variants are timed in
turn inside each repeat (the order rotates every repeat) and the median of the repeats is
reported. The ratio is tokens/s over the dense layer's, measured in this one run; absolute
numbers are noise on a shared machine, and so are the ratios when the load average printed
with them is well above the thread count.

    python -m zoo.bench moe [--batch 8 --tokens 197 --dim 384 --hidden 1536 ...]
    python -m zoo.bench.moe ...
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from zoo.layers.mlp import Mlp
from zoo.layers.moe import MoE, collect_aux_loss

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m zoo.bench moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="images per batch (DeiT-S: 32+; 8 is CPU-sized)")
    p.add_argument("--tokens", type=int, default=197, help="tokens per image (ViT-S/16 at 224: 197)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--hidden", type=int, default=1536, help="hidden width of each expert")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.2, help="<= 0: unlimited")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPU cores)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _step(layer: nn.Module, x: torch.Tensor) -> None:
    """One training step's worth of work for ``layer``: forward, loss, backward."""
    y = layer(x)
    loss = y.square().mean() + collect_aux_loss(layer)  # collect also clears for the next step
    loss.backward()
    layer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)

    num_tokens = args.batch * args.tokens
    dense_hidden = args.top_k * args.hidden
    moe = MoE(
        args.dim,
        hidden_dim=args.hidden,
        num_experts=args.experts,
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
    ).train()
    dense = Mlp(args.dim, hidden_dim=dense_hidden).train()
    # Input like a pre-norm block's: unit-scale activations.
    x = torch.randn(args.batch, args.tokens, args.dim)

    # The MoE twice, same module and weights: buffers trimmed to the largest expert load (the
    # default, eager mode) and padded to the full capacity (what torch.compile runs).
    variants = {"dense": (dense, None), "moe_trim": (moe, True), "moe_pad": (moe, False)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    dropped: dict[str, list[float]] = {name: [] for name in variants}
    rows_done: dict[str, list[int]] = {name: [] for name in variants}

    def run(name: str) -> float:
        layer, trim = variants[name]
        if trim is not None:
            moe.trim_capacity = trim
        t0 = time.perf_counter()
        _step(layer, x)
        elapsed = time.perf_counter() - t0
        if trim is not None:
            dropped[name].append(float(moe.last_stats["dropped_fraction"]))
            rows_done[name].append(args.experts * moe.last_stats["slots"])
        return elapsed

    names = list(variants)
    load_before = os.getloadavg()[0]
    for _ in range(args.warmup):
        for name in names:
            run(name)
    for r in range(args.repeats):
        # Interleave the variants; rotate the order each repeat so none always runs first.
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(run(name))

    load_after = os.getloadavg()[0]
    med = {name: statistics.median(ts) for name, ts in times.items()}
    tps = {name: num_tokens / t for name, t in med.items()}
    flops = 2 * num_tokens * args.dim * dense_hidden * 2  # fwd: 2 linears, 2 flops per multiply-add

    print(
        f"MoE vs dense FFN of equal active FLOPs, forward+backward, training mode, CPU, "
        f"torch {torch.__version__}, torch threads={torch.get_num_threads()}"
    )
    print(
        f"tokens={num_tokens} (batch {args.batch} x {args.tokens}), dim={args.dim}, "
        f"{args.experts} experts x hidden {args.hidden}, top_k={args.top_k}, "
        f"capacity_factor={args.capacity_factor} -> {moe.capacity(num_tokens)} slots/expert; "
        f"dense hidden={dense_hidden}; fwd active GFLOP={flops / 1e9:.2f}; "
        f"warmup {args.warmup}, median of {args.repeats} interleaved repeats"
    )
    labels = {
        "dense": f"dense Mlp (hidden {dense_hidden})",
        "moe_trim": f"MoE {args.experts}e top-{args.top_k}, trimmed buffer",
        "moe_pad": f"MoE {args.experts}e top-{args.top_k}, padded to capacity",
    }
    table = [("layer", "tokens/s", "ms/step", "ratio", "rows x width per linear", "dropped")]
    for name in names:
        is_moe = name != "dense"
        table.append((
            labels[name],
            f"{tps[name]:.0f}",
            f"{1e3 * med[name]:.1f}",
            f"{tps[name] / tps['dense']:.3f}",
            f"{statistics.median(rows_done[name]):.0f} x {args.hidden}" if is_moe
            else f"{num_tokens} x {dense_hidden}",
            f"{statistics.mean(dropped[name]):.2%}" if is_moe else "-",
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        print("  ".join(cells))
    print(
        f"1-min load average {load_before:.2f} before, {load_after:.2f} after, on "
        f"{os.cpu_count()} CPUs: well above the thread count means other processes shared the "
        f"cores, which slows the MoE's many small parallel ops more than the dense matmuls"
    )
    print(
        f"ratio = tokens/s over the dense row's; MoE rows = experts x buffer slots, of which "
        f"{args.top_k * num_tokens} routed assignments are real (the rest is capacity padding)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
