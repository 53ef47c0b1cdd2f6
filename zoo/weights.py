"""The weights zoo ships: add a finished training run to weights/, and re-measure what is there.

    python -m zoo.weights add runs/mnist5k_vit --command "python train_vision.py --config configs/mnist5k_vit.yaml"
    python -m zoo.weights check            # re-measure every entry's top-1; Markdown table; exit 1 on a mismatch

``add`` takes the run's final weights (``model_last.safetensors``: the last epoch, not the epoch
that scored best on the validation split, so the reported top-1 is not selected on it), stores
them in float16 (half the bytes: weights/ must stay under BUDGET_BYTES), evaluates that float16 copy in
float32 on the run's validation split with the run's own eval preprocessing, and writes the
manifest entry: file, sha256, what the weights were trained for (classes, channels, input size,
normalisation), the data, the recipe (config file, and the sha256 of the resolved config that is
also stored in the file's header), the measured top-1 and the command that reproduces the run.
``zoo.create_model(name, pretrained=True)`` reads the entry. ``check`` repeats the evaluation for
every entry, which is what ``tests/test_shipped_weights.py`` does too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader

from .atomic import atomic_write_text
from .models.pretrained import (
    MANIFEST_NAME,
    WEIGHTS_DIR,
    CheckpointError,
    read_manifest,
)
from .models.registry import BASELINES, create_model

BUDGET_BYTES = 30_000_000  # weights/ as a whole (issue 6); tests/test_shipped_weights.py holds it to this
STORED_DTYPE = torch.float16


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _config_sha256(config_yaml: str) -> str:
    """Identifies a recipe: the sha256 of the resolved config a run stores in its weights' header."""
    return hashlib.sha256(config_yaml.encode()).hexdigest()


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _resolved_config(yaml_text: str):
    """The TrainConfig a run wrote into its weights' header (strictly re-read)."""
    import yaml

    from .train.config import TrainConfig
    from .train.strict import from_dict

    return from_dict(TrainConfig, yaml.safe_load(yaml_text))


def command_config(command: str):
    """The TrainConfig a manifest command trains (``python train_vision.py --config FILE key=value ...``)."""
    import shlex

    from .train.config import load_config

    args = shlex.split(command)
    # the last train_vision.py of the command (a distilled student's command trains its teacher first)
    script = max((i for i, a in enumerate(args) if a.endswith("train_vision.py")), default=None)
    if script is None:
        raise CheckpointError(f"command {command!r}: expected `python train_vision.py [--config FILE] [key=value ...]`")
    args, config = args[script + 1 :], None
    if args[:1] == ["--config"]:
        config, args = WEIGHTS_DIR.parent / args[1], args[2:]
    return load_config(config, args)


def recipe_drift(entry: dict[str, Any], weights_dir: Path = WEIGHTS_DIR) -> list[str]:
    """Keys on which the entry's command, run today, would train another recipe than the one stored
    in its file's header ([] when it reproduces the run; execution settings such as threads aside)."""
    from .train.config import recipe_changes

    stored = _resolved_config(_header(weights_dir / entry["file"])["config"])
    return recipe_changes(stored, command_config(entry["command"]))


def family(name: str) -> str:
    """The family file a model comes from (zoo.models.vit -> 'vit'), or the baseline's timm module."""
    import timm

    module = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
    return f"{module} (timm baseline)" if name in BASELINES else module


@torch.no_grad()
def evaluate_top1(model: nn.Module, cfg, batch_size: int = 250, precision: str = "fp32") -> tuple[float, int]:
    """Top-1 (%) and image count of ``model`` on ``cfg``'s validation split, with its eval transform.
    Single process; by default float32 without autocast: the number a user of the weights gets
    (``precision="bf16"``: under bf16 autocast, as a bf16 training run evaluates)."""
    from .data import create_dataset, create_transform

    ds = create_dataset(cfg.data, "val", create_transform(cfg.aug, is_training=False))
    model.eval()
    correct = total = 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for x, y in DataLoader(ds, batch_size=batch_size, num_workers=0):
            correct += (model(x).argmax(dim=1) == y).sum().item()
            total += len(y)
    return 100.0 * correct / total, total


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=WEIGHTS_DIR.parent, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def add(
    run_dir: Path, command: str, *, weights_dir: Path = WEIGHTS_DIR, replace: bool = False, machine: str = ""
) -> dict[str, Any]:
    """Ship ``run_dir``'s final weights as ``weights_dir/<model>.safetensors`` with a manifest entry."""
    from .train.checkpoint import export_weights
    from .train.metrics import read_epochs

    source = run_dir / "model_last.safetensors"
    if not source.is_file():
        raise CheckpointError(f"{source}: not found; `add` takes a finished run's directory")
    header = _header(source)
    if "config" not in header or "stopped" in header:
        raise CheckpointError(f"{source}: not the final weights of a completed train_vision.py run")
    cfg = _resolved_config(header["config"])
    name = header["model"]
    if cfg.train.limit_train is not None or cfg.train.limit_val is not None:
        raise CheckpointError(f"{source}: trained with train.limit_train/limit_val; shipped weights use whole splits")
    if cfg.model.spec or cfg.model.img_size is not None:
        raise CheckpointError(f"{source}: model.spec/img_size overrides; weights/ ships registered architectures only")
    manifest = read_manifest(weights_dir)
    if name in manifest and not replace:
        raise CheckpointError(f"{weights_dir / MANIFEST_NAME}: already has {name!r}; pass --replace to overwrite it")

    num_classes, in_chans = int(header["num_classes"]), int(header["in_chans"])
    model = create_model(name, pretrained=str(source), num_classes=num_classes, in_chans=in_chans)
    file = weights_dir / f"{name}.safetensors"
    export_weights(model.to(STORED_DTYPE), file, {**header, "stored_dtype": str(STORED_DTYPE)})
    metrics = read_epochs(run_dir / "metrics.jsonl")
    aug = cfg.aug
    entry = {
        "file": file.name,
        "sha256": _sha256(file),
        "bytes": file.stat().st_size,
        "dtype": str(STORED_DTYPE).removeprefix("torch."),
        "family": family(name),
        "params": sum(p.numel() for p in model.parameters()),
        "num_classes": num_classes,
        "in_chans": in_chans,
        "input_size": [in_chans, aug.img_size, aug.img_size],
        "mean": list(aug.mean),
        "std": list(aug.std),
        "crop_pct": aug.crop_pct,
        "interpolation": aug.interpolation,
        "config": _config_path(cfg.name),
        "config_sha256": _config_sha256(header["config"]),
        "command": command,
        "epochs": len([r for r in metrics if not r.get("partial")]),
        "weights": "final epoch (model_last), float16",
        "train_log_top1": round(metrics[-1]["val_top1"], 2) if metrics else None,
        "machine": machine,
        "added_at_commit": _git_commit(),  # HEAD when the entry was added (the run may predate it)
    }
    # Measure what ships, as `check` does: the float16 file, loaded into a float32 model as a user loads it.
    top1, n_val = measure(name, entry, weights_dir)
    entry["data"] = (
        f"{cfg.data.dataset}: trained on its '{cfg.data.train_split}' split, "
        f"top-1 on its '{cfg.data.val_split}' split ({n_val} images)"
    )
    entry["top1"] = round(top1, 2)
    manifest[name] = entry
    atomic_write_text(weights_dir / MANIFEST_NAME, json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    return entry


def _config_path(run_name: str) -> str:
    """configs/<run name>.yaml when that file exists (the configs name their runs after themselves)."""
    path = WEIGHTS_DIR.parent / "configs" / f"{run_name}.yaml"
    return str(path.relative_to(WEIGHTS_DIR.parent)) if path.is_file() else run_name


def measure(
    name: str, entry: dict[str, Any], weights_dir: Path = WEIGHTS_DIR, as_run: bool = False
) -> tuple[float, int]:
    """Re-measure a shipped entry's top-1 (%) and the image count, from the file, with the recipe
    stored in the file's header: in float32 at batch 250, or (``as_run``) as its training run
    evaluated (:func:`run_eval_settings`)."""
    file = weights_dir / entry["file"]
    if _sha256(file) != entry["sha256"]:
        raise CheckpointError(f"{file}: sha256 does not match the manifest's {entry['sha256'][:12]}...")
    header = _header(file)
    if _config_sha256(header["config"]) != entry["config_sha256"]:
        raise CheckpointError(f"{file}: its stored config does not match the manifest's config_sha256")
    model = create_model(name, pretrained=str(file), num_classes=entry["num_classes"], in_chans=entry["in_chans"])
    cfg = _resolved_config(header["config"])
    if not as_run:
        return evaluate_top1(model, cfg)
    precision, batch = run_eval_settings(cfg)
    return evaluate_top1(model, cfg, batch_size=batch, precision=precision)


def run_eval_settings(cfg) -> tuple[str, int]:
    """How a single-process training run of ``cfg`` evaluated: its precision (``auto`` resolved on
    this machine, as the run resolved it on its own) and its eval batch (zoo.train.loop: twice the
    micro-batch)."""
    from .machine import describe, resolve_precision

    precision, _ = resolve_precision(cfg.train.precision, describe(), "cpu")
    return precision, 2 * (cfg.train.micro_batch_size or cfg.train.batch_size)


COLUMNS_NOTE = (
    "Top-1 % on each data set's validation split. *Training run's log*: the last epoch's figure the run "
    "that made the file printed (its precision, its eval batch). *float32, shipped*: the float16 file "
    "evaluated in float32 at batch 250 when it was shipped (the manifest's `top1`). *float32, now*: the "
    "same evaluation by this command; the check fails where it differs from the shipped one. *As the run "
    "evaluated*: only where the log and the float32 figures differ, the file evaluated with the run's "
    "precision and eval batch, which says whether the difference is the evaluation's or the code's."
)


def table(rows: list[dict[str, Any]], baseline: str | None) -> str:
    """Markdown: model, family, params, stored MB, the three top-1s (the training run's log, float32
    when shipped, float32 now), the file as the run evaluated it (where the log differs), error vs
    the baseline."""
    base = next((r for r in rows if r["name"] == baseline), None)
    head = (
        "| model | family | params (M) | file MB | top-1 % (training run's log) | top-1 % (float32, shipped) | "
        f"top-1 % (float32, now) | top-1 % (as the run evaluated) | err vs {baseline or 'baseline'} (pp) |"
    )
    out = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        diff = (
            "baseline" if r is base else (f"{(100 - r['measured']) - (100 - base['measured']):+.1f}" if base else "—")
        )
        log = "-" if r.get("train_log_top1") is None else f"{r['train_log_top1']:.1f}"
        as_run = "-" if r.get("as_run") is None else f"{r['as_run']:.1f} ({r['as_run_settings']})"
        out.append(
            f"| {r['name']} | {r['family']} | {r['params'] / 1e6:.2f} | {r['bytes'] / 1e6:.1f} | "
            f"{log} | {r['top1']:.1f} | {r['measured']:.1f} | {as_run} | {diff} |"
        )
    return "\n".join(out)


def check(
    names: list[str] | None = None,
    weights_dir: Path = WEIGHTS_DIR,
    tolerance: float = 0.1,
    results: Path | None = None,
    argv: list[str] | None = None,
) -> int:
    """Print the re-measured table; return 1 when an entry's float32 top-1 is off the one measured
    when it was shipped by more than ``tolerance`` points (0.1 = one image of MNIST-5k's 1,000:
    another CPU's float32 kernels may flip one borderline image), else 0. Where the training run's
    log differs from the float32 figure, the file is also evaluated as the run evaluated and both
    are printed (a note, not a failure: a code change since the run explains what the precision and
    batch do not). ``results``: also write the table as ``results/weights_check.{md,csv,json}``."""
    manifest = read_manifest(weights_dir)
    unknown = [n for n in names or [] if n not in manifest]
    if unknown:
        raise CheckpointError(
            f"no shipped weights for {', '.join(unknown)}; weights/ has: {', '.join(sorted(manifest))}"
        )
    rows, bad, notes = [], [], []
    for name in names or sorted(manifest, key=lambda n: (n in BASELINES, n)):
        entry = manifest[name]
        measured, _ = measure(name, entry, weights_dir)
        row = {"name": name, **entry, "measured": measured, "as_run": None, "as_run_settings": None}
        if abs(measured - entry["top1"]) > tolerance:
            bad.append(f"{name}: re-measured {measured:.2f} % vs {entry['top1']:.2f} % when shipped (float32)")
        log = entry.get("train_log_top1")
        if log is not None and abs(log - measured) > tolerance:
            header = _header(weights_dir / entry["file"])
            precision, batch = run_eval_settings(_resolved_config(header["config"]))
            row["as_run"], _ = measure(name, entry, weights_dir, as_run=True)
            row["as_run_settings"] = f"{precision}, batch {batch}"
            verdict = (
                "the evaluation explains the difference"
                if abs(row["as_run"] - log) <= tolerance
                else "the file no longer gives its run's figure: the code it runs changed since (see docs/changelog.md)"
            )
            notes.append(
                f"{name}: the training run logged {log:.2f} %; as the run evaluated ({row['as_run_settings']}) "
                f"{row['as_run']:.2f} %, in float32 {measured:.2f} %: {verdict}"
            )
        rows.append(row)
    baseline = next((r["name"] for r in rows if r["name"] in BASELINES), None)
    total = sum(p.stat().st_size for p in weights_dir.iterdir() if p.is_file())
    text = table(rows, baseline)
    print(text)
    print(f"\nweights/: {total / 1e6:.1f} MB of {BUDGET_BYTES / 1e6:.0f} MB")
    for line in notes:
        print("NOTE " + line)
    if results is not None:
        _write_results(results, text, rows, total, argv or [])
    for line in bad:
        print("MISMATCH " + line, file=sys.stderr)
    return 1 if bad else 0


def _write_results(results: Path, text: str, rows: list[dict[str, Any]], total: int, argv: list[str]) -> None:
    from zoo.bench.report import command_line, environment, machine_line, write_results

    note = f"weights/ holds {total / 1e6:.1f} MB of its {BUDGET_BYTES / 1e6:.0f} MB budget. {COLUMNS_NOTE}"
    columns = ["name", "family", "params", "bytes", "train_log_top1", "top1", "measured", "as_run", "as_run_settings"]
    columns += ["config", "command"]
    prog = command_line("python -m zoo.weights", argv)
    meta = {"command": prog, **environment(torch.get_num_threads())}
    markdown = f"{text}\n\n{note}\n`{prog}`\n{machine_line(meta)}\n"
    paths = write_results(results, "weights_check", markdown, rows, columns, meta)
    print(f"wrote {paths[0].with_suffix('')}.{{md,csv,json}}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.weights", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_add = sub.add_parser("add", help="ship a finished run's final weights (float16) with a manifest entry")
    p_add.add_argument("run_dir", type=Path)
    p_add.add_argument("--command", required=True, help="the exact command that reproduces the run")
    p_add.add_argument("--machine", default="", help="where the run was trained (for the manifest)")
    p_add.add_argument("--replace", action="store_true", help="overwrite an existing entry for the model")
    p_check = sub.add_parser("check", help="re-measure shipped weights' top-1 against the manifest")
    p_check.add_argument("names", nargs="*")
    p_check.add_argument(
        "--results", type=Path, metavar="DIR", help="also write the table to DIR/weights_check.{md,csv,json}"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        if args.cmd == "add":
            entry = add(args.run_dir, args.command, replace=args.replace, machine=args.machine)
            print(
                f"weights/{entry['file']}: {entry['bytes'] / 1e6:.1f} MB, top-1 {entry['top1']:.2f} % "
                f"({entry['family']}, {entry['params'] / 1e6:.2f} M params)"
            )
            return 0
        raw = sys.argv[1:] if argv is None else argv
        return check(args.names, results=args.results, argv=raw)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
