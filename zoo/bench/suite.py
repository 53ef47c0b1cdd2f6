"""``python -m zoo.bench suite``: run the README's test command from a fresh clone and record its summary.

The README's second command installs the test tools and runs the test suite. This command clones
the repository at a commit (``--ref``, default HEAD), makes a new venv that sees the installed
packages (``zoo/bench/fresh.py``), runs the second command of that commit's README exactly as
written, and writes pytest's summary line (the counts by outcome, pytest's own seconds) with the
wall time of the whole command and the machine to ``results/suite.{md,csv,json}``. A failing suite
is recorded too (its counts say so) and the command exits with the suite's exit status.

``--from-log FILE --label COMMAND`` records the summary of a pytest run that already happened on
this machine (its output saved to FILE) instead; ``tests/timm_suite/run.sh`` records timm's own
test-suite on the zoo's models this way, as ``results/timm_suite*.{md,csv,json}``.

    python -m zoo.bench suite                          # on a quiet machine; minutes
    python -m zoo.bench suite --from-log LOG --label "tests/timm_suite/run.sh" --name timm_suite
"""

from __future__ import annotations

import argparse
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

PROG = "python -m zoo.bench suite"
OUTCOMES = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed", "deselected", "warnings")
_COUNT = re.compile(r"(\d[\d,]*) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)\b")
_SECONDS = re.compile(r"\bin (\d+(?:\.\d+)?)s\b")
COLUMNS = ["command", "commit", *OUTCOMES, "pytest_s", "wall_s", "returncode"]


def summary_line(output: str) -> str:
    """pytest's final summary line ("3 passed, 1 skipped in 2.01s"), with or without its ``=`` rule."""
    for line in reversed(output.splitlines()):
        text = line.strip().strip("=").strip()
        if _COUNT.search(text) and _SECONDS.search(text):
            return text
    raise FreshRunError("no pytest summary line (`N passed ... in S s`) in the output")


def parse_summary(line: str) -> dict[str, Any]:
    """The counts of every outcome (0 when absent; ``error``/``warning`` counted as their plurals)
    and pytest's own seconds."""
    counts = {k: 0 for k in OUTCOMES}
    for number, outcome in _COUNT.findall(line):
        counts[{"error": "errors", "warning": "warnings"}.get(outcome, outcome)] = int(number.replace(",", ""))
    return {**counts, "pytest_s": float(_SECONDS.search(line)[1])}


def markdown(row: dict[str, Any], env: dict[str, Any], where: str, prog: str | None) -> str:
    shown = ", ".join(f"{row[k]} {k}" for k in OUTCOMES if row[k] and k != "warnings")
    wall = f"; {row['wall_s']:.0f} s for the whole command" if row.get("wall_s") is not None else ""
    status = "" if row["returncode"] == 0 else f"; exit status {row['returncode']}"
    return (
        f"`{row['command']}` {where}: {shown} in {row['pytest_s']:.0f} s (pytest's own time){wall}{status}.\n"
        + (f"`{prog}`\n" if prog else "")
        + f"{machine_line(env)}\n"
    )


def _record(args: argparse.Namespace, row: dict[str, Any], where: str, argv: list[str]) -> None:
    """Write the results; a --from-log record names the logged command (its label) as its command."""
    prog = command_line(PROG, argv)
    env = {**environment(), "command": args.label or prog, "recorded_by": prog}
    if row.get("commit"):
        env["commit"] = row["commit"]
    row = {**row, "commit": env["commit"]}
    text = markdown(row, env, where.format(commit=env["commit"]), None if args.label else prog)
    print(text, end="")
    paths = write_results(args.results, args.name, text, [row], COLUMNS, env)
    print(f"wrote {paths[0].with_suffix('')}.{{md,csv,json}}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default="HEAD", help="the commit to clone (default: %(default)s)")
    p.add_argument("--source", type=Path, default=REPO, help="the repository to clone (default: this one)")
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    p.add_argument("--name", default=None, help="results file stem (default: suite, or timm_suite with --from-log)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds before the command is stopped")
    p.add_argument("--keep", action="store_true", help="keep the temporary clone and venv (their path is printed)")
    p.add_argument("--from-log", type=Path, metavar="FILE", help="record the summary of a finished pytest run's output")
    p.add_argument("--label", help="with --from-log: the command that produced FILE (shown in the results)")
    args = p.parse_args(argv)
    if args.from_log is not None:
        return _from_log(args, argv)
    if args.label:
        print("zoo.bench suite: --label goes with --from-log (a fresh run's command is the README's)", file=sys.stderr)
        return 2
    args.name = args.name or "suite"
    try:
        with fresh_checkout(args.source, args.ref, keep=args.keep) as checkout:
            command = readme_commands(checkout.root / "README.md")[1]
            make_venv(checkout, with_pip=uses_pip(command))
            timed = run_timed(checkout, command, args.timeout)
            check_imports_clone(checkout, installed=uses_pip(command))
            counts = parse_summary(summary_line(timed.output))
    except (FreshRunError, IndexError) as e:
        print(f"zoo.bench suite: {e}", file=sys.stderr)
        return 2
    row = {"command": command, "commit": checkout.commit, **counts, "wall_s": timed.wall_s}
    _record(args, {**row, "returncode": timed.returncode}, f"from a fresh clone of {checkout.commit}", argv)
    return timed.returncode


def _from_log(args: argparse.Namespace, argv: list[str]) -> int:
    if not args.label:
        print("zoo.bench suite: --from-log needs --label, the command that produced the log", file=sys.stderr)
        return 2
    try:
        text = args.from_log.read_text(errors="replace")
        counts = parse_summary(summary_line(text))
    except (OSError, FreshRunError) as e:
        print(f"zoo.bench suite: {args.from_log}: {e}", file=sys.stderr)
        return 2
    args.name = args.name or "timm_suite"
    failed = counts["failed"] + counts["errors"]
    row = {"command": args.label, "commit": None, **counts, "wall_s": None, "returncode": 1 if failed else 0}
    _record(args, row, "on a checkout of {commit}", argv)
    return 0
