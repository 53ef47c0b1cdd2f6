"""``python -m zoo.export NAME --format onnx|torchscript|exported``: export a backbone and check it.

The exported program is loaded back and run on a fresh input; its output must match eager
PyTorch to ``--atol`` (default 1e-4), otherwise the command fails (exit 1) and says by how much.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import zoo

FORMATS = {"onnx": ".onnx", "torchscript": ".ts.pt", "exported": ".pt2"}


def export(model: torch.nn.Module, x: torch.Tensor, fmt: str, path: Path) -> None:
    """Write ``model`` traced on ``x`` to ``path`` in format ``fmt``, with a dynamic batch size."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        if fmt == "onnx":
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                verbose=False,
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
            )
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.trace(model, x), str(path))  # traced graphs are shape-generic
        elif fmt == "exported":
            torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), str(path))
        else:
            raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}")


def run_exported(path: Path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Load an exported file and run it on ``x`` (onnxruntime for ONNX)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    if fmt == "torchscript":
        return torch.jit.load(str(path))(x)
    return torch.export.load(str(path)).module()(x)


def export_and_check(
    model: torch.nn.Module,
    fmt: str,
    path: Path,
    *,
    img_size: int,
    in_chans: int = 3,
    batch: int = 2,
    atol: float = 1e-4,
) -> float:
    """Export, reload, compare with eager on a new input of another batch size; returns the max
    abs difference."""
    model = model.eval()
    torch.manual_seed(0)
    export(model, torch.randn(batch, in_chans, img_size, img_size), fmt, path)
    x = torch.randn(batch + 1, in_chans, img_size, img_size)  # another batch size: the export must not fix it
    with torch.no_grad():
        diff = (run_exported(path, fmt, x) - model(x)).abs().max().item()
    if not diff <= atol:
        raise AssertionError(f"{path}: exported output differs from eager by {diff:.3g} (> {atol})")
    return diff


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zoo.export", description=__doc__)
    p.add_argument("name", help="model name (zoo.list_models(), or a ResNet baseline)")
    p.add_argument("--format", choices=sorted(FORMATS), default="onnx")
    p.add_argument("--pretrained", default=None, help="weights: a file or folder, or 'shipped' for weights/")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's)")
    p.add_argument("--out", type=Path, default=None, help="output file (default: NAME + the format's suffix)")
    p.add_argument("--atol", type=float, default=1e-4)
    args = p.parse_args(argv)
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    if args.img_size is not None and args.name in zoo.list_models():
        kwargs["img_size"] = args.img_size  # models built for one input size need it at construction
    pretrained = True if args.pretrained == "shipped" else (args.pretrained or False)
    try:
        model = zoo.create_model(args.name, pretrained=pretrained, **kwargs)
    except (ValueError, TypeError) as e:
        print(f"zoo.export: {e}", file=sys.stderr)
        return 2
    img_size = args.img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    in_chans = model.pretrained_cfg.get("input_size", (3,))[0]
    out = args.out or Path(args.name + FORMATS[args.format])
    try:
        diff = export_and_check(model, args.format, out, img_size=img_size, in_chans=in_chans, atol=args.atol)
    except AssertionError as e:
        print(f"zoo.export: {e}", file=sys.stderr)
        return 1
    print(
        f"exported {args.name} as {args.format} to {out}; max |exported - eager| = {diff:.2e} on a "
        f"{img_size}x{img_size} batch"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
