"""One-change ablations: swap exactly one part of a base model, train with the same recipe.

``python -m zoo.bench ablate --base zoo_poolformer_mini_32 --swap token_mixer=pooling,attention
--swap channel_mixer=mlp_gelu,geglu,moe --seeds 3``

Every variant differs from the base in one spec field (``--swap FIELD=V1,V2,...``; any stage-wide
field of ``StageSpec``: token_mixer, channel_mixer, norm, mlp_ratio, share_group, ...). The table
gives each change's effect on top-1 error with Welch's 95 % interval against the base, and its
params and MACs beside the base's. A change that moves the parameter count by more than
``--iso-tolerance`` is marked not iso-param, with the ``mlp_ratio`` that would restore the base's
count; ``--width-match`` also trains that width-matched variant.

The runs go to ``--out`` (default ``runs/bench_ablate``); the table, with notes under it (the
command, the recipe, the machine), is printed and written to ``--results`` (default
``zoo/bench/results``) as ``NAME.md`` (exactly what is printed; ``python -m zoo.bench readme``
copies it into README.md between ``<!-- results:NAME -->`` markers), ``NAME.csv`` (the rows) and
``NAME.json`` (rows, each run, command, commit, CPU, threads, versions); NAME is ``--name``,
default ``ablate_<data>`` (two ablations on one dataset need two names).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

import zoo
from zoo.bench.counts import count_macs, count_params
from zoo.bench.report import command_line, environment, stem_part, write_results
from zoo.bench.runs import RunRow, add_recipe_args, train_all
from zoo.bench.stats import diff_ci, fmt_ci, mean_ci
from zoo.bench.top1 import add_results_args, recipe, recipe_notes
from zoo.models.specs import STAGE_WIDE_FIELDS

PROG = "python -m zoo.bench ablate"
COLUMNS = [
    "change",
    "params_m",
    "gmacs",
    "top1_err",
    "top1_err_ci95",
    "diff_vs_base",
    "diff_ci95",
    "seeds",
    "note",
    "spec",
]


def parse_swaps(items: list[str]) -> list[tuple[str, object]]:
    """``FIELD=V1,V2`` strings -> [(field, value), ...]; values parsed as YAML scalars."""
    swaps = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--swap {item!r}: expected FIELD=VALUE[,VALUE...]")
        if key not in STAGE_WIDE_FIELDS:
            import difflib

            near = difflib.get_close_matches(key, STAGE_WIDE_FIELDS, n=1)
            raise ValueError(
                f"--swap {key!r}: not a stage field"
                + (f" (did you mean {near[0]!r}?)" if near else "")
                + f"; expected one of {list(STAGE_WIDE_FIELDS)}"
            )
        swaps += [(key, yaml.safe_load(v)) for v in values.split(",") if v]
    return swaps


def base_value(base: str, key: str) -> object:
    values = {getattr(s, key) for s in zoo.get_spec(base).stages}
    return values.pop() if len(values) == 1 else None


def size_of(base: str, spec: dict, img: int) -> tuple[int, int]:
    model = zoo.create_model(base, num_classes=10, **spec)
    return count_params(model), count_macs(model, img)


def width_match(base: str, spec: dict, target: int) -> float:
    """The mlp_ratio (to 1/16) whose parameter count is closest to ``target`` for this variant."""
    lo, hi = 0.25, 16.0
    for _ in range(12):  # parameters grow monotonically with the MLP width: bisect
        mid = (lo + hi) / 2
        if count_params(zoo.create_model(base, num_classes=10, **{**spec, "mlp_ratio": mid})) < target:
            lo = mid
        else:
            hi = mid
    return round((lo + hi) / 2 * 16) / 16


def plan(base: str, swaps: list[tuple[str, object]], img: int, tolerance: float, match: bool) -> list[dict]:
    """Variants to train: the base, one per swap (skipping the base's own value), width-matched ones."""
    base_params, base_macs = size_of(base, {}, img)
    variants = [{"label": "base", "spec": {}, "params": base_params, "macs": base_macs, "note": ""}]
    for key, value in swaps:
        if base_value(base, key) == value:
            continue
        spec = {key: value}
        params, macs = size_of(base, spec, img)
        change = (params - base_params) / base_params
        note = ""
        if abs(change) > tolerance:
            ratio = width_match(base, spec, base_params)
            note = f"not iso-param ({change:+.0%}); mlp_ratio={ratio:g} matches"
            if match:
                mspec = {**spec, "mlp_ratio": ratio}
                mparams, mmacs = size_of(base, mspec, img)
                variants.append({"label": f"{key}={value}", "spec": spec, "params": params, "macs": macs, "note": note})
                variants.append(
                    {
                        "label": f"{key}={value}, mlp_ratio={ratio:g}",
                        "spec": mspec,
                        "params": mparams,
                        "macs": mmacs,
                        "note": "width-matched",
                    }
                )
                continue
        variants.append({"label": f"{key}={value}", "spec": spec, "params": params, "macs": macs, "note": note})
    return variants


def summarise(variants: list[dict], rows: list[RunRow]) -> list[dict]:
    """One table row per variant: its size, mean error over seeds, difference to the base's."""
    errs = {v["label"]: [r.err1 for r in rows if r.label == v["label"]] for v in variants}
    table = []
    for v in variants:
        err = errs[v["label"]]
        mean, half = mean_ci(err)
        diff, dhalf = diff_ci(err, errs["base"]) if v is not variants[0] else (None, None)
        table.append(
            {
                "change": v["label"],
                "params_m": v["params"] / 1e6,
                "gmacs": v["macs"] / 1e9,
                "top1_err": mean,
                "top1_err_ci95": half,
                "diff_vs_base": diff,
                "diff_ci95": dhalf,
                "seeds": len(err),
                "note": v["note"],
                "spec": v["spec"],
            }
        )
    return table


def markdown(table: list[dict]) -> str:
    lines = [
        "| change | params (M) | GMACs | top-1 err % (95% CI) | vs base (95% CI) | note |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in table:
        diff = "—" if r["diff_vs_base"] is None else fmt_ci(r["diff_vs_base"], r["diff_ci95"])
        lines.append(
            f"| {r['change']} | {r['params_m']:.3f} | {r['gmacs']:.4f} | {fmt_ci(r['top1_err'], r['top1_err_ci95'])} "
            f"| {diff} | {r['note']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="zoo_poolformer_mini_32")
    p.add_argument("--swap", action="append", default=[], metavar="FIELD=V1,V2", help="repeatable")
    p.add_argument("--iso-tolerance", type=float, default=0.02, help="relative params change still iso-param")
    p.add_argument("--width-match", action="store_true", help="also train width-matched variants")
    p.add_argument("--img-size", type=int, default=32, help="input side for the MACs column")
    add_recipe_args(p, out="runs/bench_ablate")
    add_results_args(p, "ablate_<data>")
    args = p.parse_args(argv)
    try:
        if args.base not in zoo.list_models():
            raise ValueError(str(zoo.models.registry.unknown_model(args.base)))
        variants = plan(args.base, parse_swaps(args.swap), args.img_size, args.iso_tolerance, args.width_match)
        cfg = recipe(args)  # a bad --set fails here, before any training
    except (ValueError, TypeError) as e:
        print(f"zoo.bench ablate: {e}", file=sys.stderr)
        return 2
    rows = train_all([(v["label"], args.base, v["spec"]) for v in variants], args)
    table = summarise(variants, rows)
    command, env = command_line(PROG, argv), environment(cfg.train.num_threads)
    notes = recipe_notes(args, cfg, command, env, f"the base, {args.base}")
    text = markdown(table) + "\n\n" + "\n".join(notes)
    print(text)
    meta = {"command": command, **env, "base": args.base, "runs": [dataclasses.asdict(r) for r in rows]}
    paths = write_results(args.results, args.name or f"ablate_{stem_part(args.data)}", text, table, COLUMNS, meta)
    print(f"results: {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
