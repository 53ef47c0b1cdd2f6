"""L1 against L2 norms in low precision: how far bf16 and fp16 outputs and gradients land from float32.

Hoffer et al. 2018, "Norm matters", https://arxiv.org/abs/1802.09769, argue that L1 normalisation
(the scale ``sqrt(pi/2) * mean|x - mu|``, no squares) is the more stable one in low precision. This
command measures it, for each pair of twins (``batchnorm`` / ``l1_batchnorm``, ``layernorm`` /
``l1_layernorm``, ``groupnorm1`` / ``l1_groupnorm1``) as ``zoo.create_norm`` builds them, in
training mode (batch norms on the batch's statistics):

- the input: a seeded random tensor of each kind below, rounded to the low-precision dtype; the
  float32 reference runs on that same rounded input (cast back up), so the input's own rounding
  is not counted;
- the output's relative error ``||y_lp - y_32|| / ||y_32||`` and the input gradient's, for a seeded
  upstream gradient (also rounded first);
- the median over ``--seeds`` seeds, and the worst; a non-finite output or gradient counts as such.

Input kinds: ``normal`` N(0, 1); ``shifted`` 100 + 10 N(0, 1) (a large mean to remove, where the
rounding of ``x - mu`` shows); ``wide`` 300 N(0, 1) (squares beyond fp16's largest number, 65504).

Three norms a row, since two things differ between a model's L2 and L1 norms:

- ``L2 torch``: torch's kernels (what ``batchnorm`` / ``layernorm`` / ``groupnorm1`` run), which
  compute in float32 inside for bf16 / fp16 inputs;
- ``L2 same ops``: the L2 formula ``(x - mu) / sqrt(mean((x - mu)^2) + eps)`` written with the
  same tensor ops as zoo's L1 norms (here, in this file), so its intermediates (``x - mu``, the
  squares) are rounded to the input's dtype: the paper's setting;
- ``L1``: zoo's ``l1_*`` norms (``zoo.layers.norm``), intermediates in the input's dtype.

Reductions (the means) accumulate in float32 inside torch in every case.

    python -m zoo.bench norm-precision [--seeds 3] [--device cpu] [--out DIR] [--name norm_precision]

Writes ``NAME.md`` (the table printed), ``NAME.csv`` and ``NAME.json`` to ``--out``
(default ``zoo/bench/results``). A numerical comparison, not a timing: the load of the machine
does not change it, the CPU or GPU kind may (their kernels round differently).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from zoo.bench.report import RESULTS, command_line, environment, machine_line, markdown_table, write_results
from zoo.layers.norm import create_norm

__all__ = ["main", "measure"]

PROG = "python -m zoo.bench norm-precision"
PAIRS = (("batchnorm", "l1_batchnorm"), ("layernorm", "l1_layernorm"), ("groupnorm1", "l1_groupnorm1"))
# (layout, shape): a CNN stage's map (batch 16, 64 channels, 16x16) and a ViT-Ti/16's tokens (batch 8,
# 197 tokens of 192 channels): ~0.3 M values each, so the whole command takes well under a minute
SHAPES = (("nchw", (16, 64, 16, 16)), ("nlc", (8, 197, 192)))
INPUTS = ("normal", "shifted", "wide")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COLUMNS = [
    "norm",
    "layout",
    "shape",
    "input",
    "dtype",
    "seeds",
    "out_rel_err",
    "out_rel_err_max",
    "grad_rel_err",
    "grad_rel_err_max",
    "nonfinite",
]
HEADER = [
    "norms",
    "shape",
    "input",
    "dtype",
    "output: L2 torch",
    "L2 same ops",
    "L1",
    "grad: L2 torch",
    "L2 same ops",
    "L1",
]
SAME_OPS = "_same_ops"  # suffix of the rows of the L2 formula written with the L1 norms' ops


def _parse_shapes(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``nchw:32x64x16x16,nlc:16x197x384`` -> ((layout, shape), ...)."""
    out = []
    for item in text.split(","):
        layout, _, dims = item.partition(":")
        try:
            shape = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--shapes: {item!r}: expected LAYOUT:AxBxC...") from None
        if layout not in ("nchw", "nlc") or len(shape) < 2 or min(shape) < 1:
            raise argparse.ArgumentTypeError(f"--shapes: {item!r}: expected nchw:BxCxHxW or nlc:BxNxC")
        out.append((layout, shape))
    return tuple(out)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="random inputs per case (default: %(default)s)")
    p.add_argument(
        "--shapes", type=_parse_shapes, default=SHAPES, help="LAYOUT:AxBx...,... (default: a map and tokens)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    p.add_argument("--name", default="norm_precision", help="results file stem (default: %(default)s)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds: expected >= 1, got {args.seeds}")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        p.error(f"--device: {args.device!r}: expected cpu, or cuda where a GPU is present")
    return args


def _input(kind: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=generator)
    return {"normal": x, "shifted": 100 + 10 * x, "wide": 300 * x}[kind]


def l2_same_ops(axes: tuple[int, ...], x: torch.Tensor, eps: float) -> torch.Tensor:
    """The L2 norm with the L1 norms' ops: ``(x - mu) / sqrt(mean((x - mu)^2) + eps)`` over ``axes``, no affine."""
    centered = x - x.mean(dim=axes, keepdim=True)
    return centered / torch.sqrt(centered.square().mean(dim=axes, keepdim=True) + eps)


def _run(name: str, layout: str, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm ``name`` in ``x``'s dtype, training mode: its output and the input's gradient, in float32."""
    base = name.removesuffix(SAME_OPS)
    channels = x.shape[1 if layout == "nchw" else -1]
    norm = create_norm(base, channels, layout).to(x.device, x.dtype).train()
    x = x.detach().requires_grad_(True)
    if name.endswith(SAME_OPS):  # over the axes the L1 twin takes its statistics over
        axes = create_norm(dict(PAIRS)[base], channels, layout).stat_axes(x)
        y = l2_same_ops(axes, x, norm.eps)
    else:
        y = norm(x)
    y.backward(grad)
    return y.detach().float(), x.grad.float()


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def measure(name: str, layout: str, shape: tuple[int, ...], kind: str, dtype: str, seeds: int, device: str) -> dict:
    """One row: the norm's relative errors in ``dtype`` against float32 over ``seeds`` inputs."""
    out_errs, grad_errs = [], []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        x = _input(kind, shape, g).to(device, DTYPES[dtype])  # rounded once: both sides see these values
        up = torch.randn(shape, generator=g).to(device, DTYPES[dtype])
        y_lp, gx_lp = _run(name, layout, x, up)
        y_32, gx_32 = _run(name, layout, x.float(), up.float())
        out_errs.append(_rel_err(y_lp, y_32))
        grad_errs.append(_rel_err(gx_lp, gx_32))
    return {
        "norm": name,
        "layout": layout,
        "shape": "x".join(map(str, shape)),
        "input": kind,
        "dtype": dtype,
        "seeds": seeds,
        "out_rel_err": statistics.median(out_errs),
        "out_rel_err_max": max(out_errs),
        "grad_rel_err": statistics.median(grad_errs),
        "grad_rel_err_max": max(grad_errs),
        "nonfinite": sum(e == float("inf") for e in out_errs + grad_errs),
    }


def _cell(row: dict, key: str) -> str:
    median, worst = row[key], row[f"{key}_max"]
    return "non-finite" if median == float("inf") else f"{median:.2e} ({worst:.1e})"


def format_table(rows: list[dict]) -> str:
    """One line per (pair, shape, input, dtype): the L2 norm's and the L1 norm's errors side by side."""
    by_key = {(r["norm"], r["layout"], r["shape"], r["input"], r["dtype"]): r for r in rows}
    cells = []
    for l2, l1 in PAIRS:
        for (norm, layout, shape, kind, dtype), torch_row in by_key.items():
            if norm != l2:
                continue
            three = (
                torch_row,
                by_key[(l2 + SAME_OPS, layout, shape, kind, dtype)],
                by_key[(l1, layout, shape, kind, dtype)],
            )
            cells.append(
                [
                    f"{l2} / {l1}",
                    f"{layout} {shape}",
                    kind,
                    dtype,
                    *(_cell(r, "out_rel_err") for r in three),
                    *(_cell(r, "grad_rel_err") for r in three),
                ]
            )
    return markdown_table(HEADER, cells, [False] * 4 + [True] * 6)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    rows = [
        measure(name, layout, shape, kind, dtype, args.seeds, args.device)
        for l2, l1 in PAIRS
        for name in (l2, l2 + SAME_OPS, l1)
        for layout, shape in args.shapes
        for kind in INPUTS
        for dtype in DTYPES
    ]
    command, env = command_line(PROG, argv), environment()
    notes = [
        f"Relative error against float32 on the same rounded inputs, training mode, device {args.device}: "
        f"median over {args.seeds} seeded inputs (worst in brackets); output = the norm's output, grad = the "
        "input's gradient for a seeded upstream gradient. Inputs: normal N(0,1); shifted 100 + 10 N(0,1); "
        "wide 300 N(0,1). L2 torch: torch's kernels (float32 inside); L2 same ops: the L2 formula with the L1 "
        "norms' tensor ops (intermediates in the low-precision dtype); L1: zoo.layers.norm's l1_* norms.",
        f"`{command}`",
        machine_line(env),
    ]
    text = format_table(rows) + "\n\n" + "\n".join(notes)
    print(text)
    meta = {"command": command, **env, "device": args.device, "seeds": args.seeds, "inputs": list(INPUTS)}
    paths = write_results(args.out, args.name, text, rows, COLUMNS, meta)
    print(f"results: {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
