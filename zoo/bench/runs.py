"""Training runs for the benchmark tables: one recipe, many models and seeds, results as rows."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import zoo
from zoo.bench.counts import count_macs, count_params
from zoo.train import config_to_yaml, load_config, run
from zoo.train.metrics import read_log


@dataclass
class RunRow:
    """One trained model: what the tables need from it."""

    label: str
    model: str
    seed: int
    top1: float
    err1: float
    params: int
    macs: int
    train_s: float
    img_per_s: float


def add_recipe_args(p: argparse.ArgumentParser, *, out: str) -> None:
    """The options every training benchmark shares: the recipe, the seeds, where runs go."""
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--seed-start",
        type=int,
        default=0,
        help="first seed (seeds run seed-start .. seed-start+seeds-1): split a table across processes",
    )
    p.add_argument("--epochs", type=int, default=None, help="default: the config's")
    p.add_argument("--data", default="mnist5k", help="mnist5k, digits, or an image folder")
    p.add_argument("--config", default=None, help="the recipe (default: configs/mnist5k_poolformer.yaml)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every run (e.g. train.limit_train=512)",
    )
    p.add_argument("--reuse", action="store_true", help="read back finished runs under --out instead of retraining")
    p.add_argument("--out", type=Path, default=Path(out))


def dataset_overrides(data: str) -> list[str]:
    """``--data``: the embedded ``mnist5k`` / ``digits``, or an image folder path."""
    return [f"data.dataset={data}"]


def train_one(
    *,
    label: str,
    model: str,
    spec: dict[str, Any],
    seed: int,
    config: str | None,
    epochs: int | None,
    data: str,
    out_dir: Path,
    extra: list[str],
    reuse: bool = False,
) -> RunRow:
    """Train ``model`` (with ``spec`` overrides) under the base ``config`` and return its row.

    The row is also written beside the run (``bench_row.json``); with ``reuse`` a finished run of
    the same name is read back instead of trained again, so a benchmark can be split across
    processes or machines and collected afterwards.
    """
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{label}_seed{seed}")
    row_path = Path(out_dir) / name / "bench_row.json"
    overrides = [
        f"model.name={model}",
        f"seed={seed}",
        f"name={name}",
        f"output_dir={out_dir}",
        "log.progress=false",
        "log.plot=false",
        *dataset_overrides(data),
        *extra,
    ]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if spec:
        overrides.append("model.spec=" + yaml.safe_dump(spec, default_flow_style=True, width=10**6).strip())
    cfg = load_config(config, overrides)
    # A finished run is reused only if it was trained with exactly this resolved config.
    fingerprint = hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest()
    if reuse and row_path.is_file():
        saved = json.loads(row_path.read_text())
        if saved.pop("config_sha256", None) == fingerprint:
            return RunRow(**saved)
        raise ValueError(f"{row_path}: that run used another config; remove it or drop --reuse")
    result = run(cfg, resume=None)
    records = [r for r in read_log(result.run_dir / "metrics.jsonl") if "img_per_s" in r]
    from safetensors import safe_open

    with safe_open(str(result.run_dir / "model_last.safetensors"), "pt") as f:
        meta = f.metadata()
    # the same model the run trained, rebuilt to count it (cheap next to the training)
    kw = {"img_size": cfg.model.img_size} if cfg.model.img_size else {}
    built = zoo.create_model(model, num_classes=int(meta["num_classes"]), in_chans=int(meta["in_chans"]), **spec, **kw)
    img = int(meta["img_size"])
    row = RunRow(
        label=label,
        model=model,
        seed=seed,
        top1=result.top1,
        err1=100 - result.top1,
        params=count_params(built),
        macs=count_macs(built, img, int(meta["in_chans"])),
        train_s=result.wall_s,
        img_per_s=sum(r["img_per_s"] for r in records) / max(len(records), 1),
    )
    tmp = row_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**dataclasses.asdict(row), "config_sha256": fingerprint}) + "\n")
    tmp.replace(row_path)
    return row


def train_all(jobs: list[tuple[str, str, dict[str, Any]]], args: argparse.Namespace) -> list[RunRow]:
    """Train every (label, model, spec) job over the seeds of ``add_recipe_args``' options."""
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, model, spec in jobs:
        for seed in range(args.seed_start, args.seed_start + args.seeds):
            row = train_one(
                label=label,
                model=model,
                spec=spec,
                seed=seed,
                config=args.config,
                epochs=args.epochs,
                data=args.data,
                out_dir=args.out / "runs",
                extra=args.set,
                reuse=args.reuse,
            )
            print(f"  {label} seed {seed}: top-1 err {row.err1:.2f}% ({row.train_s:.0f} s)", flush=True)
            rows.append(row)
    return rows
