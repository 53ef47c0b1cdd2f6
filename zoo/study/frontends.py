"""``top1`` and ``ablate``: the sweep with arms built for you, so there is one way to run a comparison.

  python -m zoo.study top1 --models zoo_poolformer_mini_32,zoo_vit_mini_32 --baseline resnet10t [sweep options]
      arms MODEL:OPTIMIZER for every model (the baseline added), compared to the baseline's arm
  python -m zoo.study ablate --base zoo_poolformer_mini_32 --swap token_mixer=pooling,attention [sweep options]
      the base and one arm per single spec change (--swap FIELD=V1,V2, repeatable), compared to the base

Every other option is the sweep's (``python -m zoo.study sweep --help``): the same bracket,
seeds, splits, storage and table. ``--space none`` trains each arm's recipe untuned (the
fixed-recipe comparison the old ``zoo.bench top1``/``ablate`` made), over ``--seeds`` seeds.
"""

from __future__ import annotations

import argparse
import difflib
import sys

import yaml

from zoo.bench.report import command_line, stem_part
from zoo.study import sweep
from zoo.study.arms import InputError


def _frontend(prog: str, own: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse ``argv`` with the front-end's options and the sweep's (for --help and errors);
    (the front-end's options and ``--study``, ``--data`` as the sweep reads them, the rest for the sweep)."""
    full = sweep.build_parser(prog, __doc__, arms=False)
    # argparse cannot merge two parsers publicly; _add_action is what add_argument itself calls
    for action in own._actions:
        if action.option_strings and action.dest != "help":
            full._add_action(action)
    parsed = full.parse_args(argv)  # --data=elpv and --data elpv alike
    args, rest = own.parse_known_args(argv)
    args.study, args.data = parsed.study, parsed.data
    return args, rest


def _default_study(args: argparse.Namespace, kind: str) -> list[str]:
    return [] if args.study is not None else ["--study", f"{kind}_{stem_part(args.data)}"]


def top1(argv: list[str] | None = None, **seams) -> int:
    prog = "python -m zoo.study top1"
    argv = sys.argv[1:] if argv is None else list(argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--models", required=True, help="comma-separated model names")
    own.add_argument("--baseline", default="resnet10t", help="the model the others are compared to (always run)")
    own.add_argument("--optimizer", default="adamw", help="every arm's optimizer (default: adamw)")
    args, rest = _frontend(prog, own, argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.baseline not in models:
        models.append(args.baseline)
    arms = ",".join(f"{m}:{args.optimizer}" for m in models)
    study = _default_study(args, "top1")
    baseline = f"{args.baseline}:{args.optimizer}"
    return sweep.main(
        ["--arms", arms, "--baseline", baseline, *study, *rest], command=command_line(prog, argv), **seams
    )


def parse_swaps(items: list[str]) -> list[tuple[str, object]]:
    """``FIELD=V1,V2`` strings -> [(field, value), ...]; values parsed as YAML scalars."""
    from zoo.models.specs import STAGE_WIDE_FIELDS

    swaps = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise InputError(f"--swap {item!r}: expected FIELD=VALUE[,VALUE...]")
        if key not in STAGE_WIDE_FIELDS:
            near = difflib.get_close_matches(key, STAGE_WIDE_FIELDS, n=1)
            raise InputError(
                f"--swap {key!r}: not a stage field"
                + (f" (did you mean {near[0]!r}?)" if near else "")
                + f"; expected one of {list(STAGE_WIDE_FIELDS)}"
            )
        swaps += [(key, yaml.safe_load(v)) for v in values.split(",") if v]
    return swaps


def base_value(base: str, key: str) -> object:
    """The base model's value of a stage field (None when its stages differ)."""
    import zoo

    values = {getattr(s, key) for s in zoo.get_spec(base).stages}
    return values.pop() if len(values) == 1 else None


def ablate(argv: list[str] | None = None, **seams) -> int:
    prog = "python -m zoo.study ablate"
    argv = sys.argv[1:] if argv is None else list(argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--base", required=True, help="the zoo model every arm changes once")
    own.add_argument("--swap", action="append", required=True, metavar="FIELD=V1,V2", help="repeatable")
    own.add_argument("--optimizer", default="adamw", help="every arm's optimizer (default: adamw)")
    args, rest = _frontend(prog, own, argv)
    import zoo

    try:
        if args.base not in zoo.list_models():
            raise InputError(str(zoo.models.registry.unknown_model(args.base)))
        swaps = [(k, v) for k, v in parse_swaps(args.swap) if base_value(args.base, k) != v]
    except InputError as e:
        print(f"zoo.study: {e}", file=sys.stderr)
        return 2
    base = f"{args.base}:{args.optimizer}"
    arms = ",".join([base, *(f"{base}:{k}={v}" for k, v in swaps)])
    study = _default_study(args, "ablate")
    return sweep.main(["--arms", arms, "--baseline", base, *study, *rest], command=command_line(prog, argv), **seams)
