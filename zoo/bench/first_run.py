"""``python -m zoo.bench first-run``: time the README's first command from a fresh clone.

The README opens with two commands; the first installs the zoo and trains the default model. This
command clones the repository at a commit (``--ref``, default HEAD: committed files only), makes a
new venv that sees the installed packages (nothing is downloaded; see ``zoo/bench/fresh.py``), runs
the first command of *that commit's* README exactly as written, and writes what it measured to
``results/first_run.{md,csv,json}``: the model, its last epoch's top-1 on the validation split,
the wall time of the whole command and of the training alone (the run's own ``done:`` line), the
precision and threads the run chose, and the machine. The README's headline is generated from it.

    python -m zoo.bench first-run                 # on a quiet machine; minutes
    python -m zoo.bench first-run --ref v0.1.0 --results /tmp/res
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from zoo.bench.fresh import (
    FreshRunError,
    check_imports_clone,
    fresh_checkout,
    make_venv,
    readme_commands,
    run_timed,
    uses_pip,
)
from zoo.bench.report import REPO, RESULTS, command_line, environment, machine_line, write_results

PROG = "python -m zoo.bench first-run"
DONE = re.compile(r"^done: .* (?P<seconds>\d+) s\b", re.MULTILINE)  # zoo.train.loop.finish's summary line
COLUMNS = ["command", "commit", "model", "dataset", "epochs", "top1", "wall_s", "train_s", "precision", "threads"]


def read_run(root: Path, output: str) -> dict[str, Any]:
    """What the training run in the clone ``root`` recorded: its one run directory under ``runs/``
    (config.yaml, metrics.jsonl) and the ``done:`` line it printed."""
    import yaml

    logs = sorted((root / "runs").glob("*/metrics.jsonl"))
    if len(logs) != 1:
        raise FreshRunError(f"expected one run under {root / 'runs'}, found {len(logs)}: {[str(p) for p in logs]}")
    # JSON lines; not zoo.train.metrics.read_log, whose import builds the whole training package
    records = [json.loads(line) for line in logs[0].read_text().splitlines() if line.strip()]
    header = next((r for r in records if "machine" in r), {})
    epochs = [r for r in records if "epoch" in r and not r.get("partial")]
    done = DONE.findall(output)
    if not epochs or not done:
        raise FreshRunError(f"{logs[0].parent}: no finished epoch or no `done:` line; did the training complete?")
    cfg = yaml.safe_load((logs[0].parent / "config.yaml").read_text())
    return {
        "model": cfg["model"]["name"],
        "dataset": cfg["data"]["dataset"],
        "epochs": epochs[-1]["epoch"],
        "top1": epochs[-1]["val_top1"],
        "train_s": float(done[-1]),
        "precision": header.get("precision"),
        "threads": header.get("threads"),
    }


def markdown(row: dict[str, Any], env: dict[str, Any], prog: str) -> str:
    return (
        f"`{row['command']}` from a fresh clone of {row['commit']}: {row['model']} on {row['dataset']}, "
        f"{row['epochs']} epochs, top-1 {row['top1']:.1f} % on the validation split (last epoch), "
        f"{row['wall_s']:.0f} s for the whole command, {row['train_s']:.0f} s of it training "
        f"({row['precision']}, {row['threads']} compute thread{'s' * (row['threads'] != 1)}).\n"
        "A new venv with --system-site-packages (the dependencies already installed; nothing downloaded).\n"
        f"`{prog}`\n{machine_line(env)}\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default="HEAD", help="the commit to clone (default: %(default)s)")
    p.add_argument("--source", type=Path, default=REPO, help="the repository to clone (default: this one)")
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    p.add_argument("--name", default="first_run", help="results file stem (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds before the command is stopped")
    p.add_argument("--keep", action="store_true", help="keep the temporary clone and venv (their path is printed)")
    args = p.parse_args(argv)
    try:
        with fresh_checkout(args.source, args.ref, keep=args.keep) as checkout:
            command = readme_commands(checkout.root / "README.md")[0]
            make_venv(checkout, with_pip=uses_pip(command))
            timed = run_timed(checkout, command, args.timeout)
            if timed.returncode != 0:
                raise FreshRunError(f"{command!r} exited with {timed.returncode} (its output is above)")
            check_imports_clone(checkout, installed=uses_pip(command))
            run = read_run(checkout.root, timed.output)
    except FreshRunError as e:
        print(f"zoo.bench first-run: {e}", file=sys.stderr)
        return 2
    row = {"command": command, "commit": checkout.commit, **run, "wall_s": timed.wall_s}
    prog = command_line(PROG, argv)
    env = {**environment(run["threads"] or None), "commit": checkout.commit, "command": prog}
    text = markdown(row, env, prog)
    print(text, end="")
    paths = write_results(args.results, args.name, text, [row], COLUMNS, env)
    print(f"wrote {paths[0].with_suffix('')}.{{md,csv,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
