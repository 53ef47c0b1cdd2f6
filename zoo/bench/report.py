"""Results files for the benchmark tables, and the README blocks copied from them.

A bench command writes its table as ``NAME.md`` (the Markdown the README shows), ``NAME.csv`` and
``NAME.json`` (the rows plus what produced them: command, git commit, date, CPU model and
capability, threads, library versions) into a results folder, by default the committed
``zoo/bench/results``. The README never holds a typed figure: each table sits between markers

    <!-- results:NAME -->
    ...the exact text of zoo/bench/results/NAME.md...
    <!-- /results -->

and ``python -m zoo.bench readme`` copies every marked block from its file (``--check``: change
nothing, exit 1 naming the blocks that differ; the test suite runs the same check).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from zoo.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
MARKER = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.DOTALL)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(threads: int | None = None) -> dict[str, Any]:
    """What produced a table: commit, date, the machine (``zoo.machine``: CPU model, capability, bf16
    flags, usable cores, GPU), threads (the runs'; default this process's), versions."""
    import torch

    from zoo.machine import describe

    machine = describe().record()
    versions = {k: machine.pop(k) for k in ("python", "torch", "timm")}
    try:
        import optuna

        versions["optuna"] = optuna.__version__
    except ImportError:
        pass
    return {
        "commit": _git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **machine,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "versions": versions,
    }


def command_line(prog: str, argv: list[str]) -> str:
    return " ".join([prog, *map(shlex.quote, argv)])


def write_results(
    out: Path, stem: str, markdown: str, rows: list[dict], columns: list[str], meta: dict[str, Any]
) -> list[Path]:
    """``out/stem.md`` (exactly ``markdown``), ``.csv`` (``columns`` of ``rows``) and ``.json``
    (``meta`` plus the rows), each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path, js = out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.json"
    atomic_write_text(md, markdown if markdown.endswith("\n") else markdown + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: r.get(k) for k in columns} for r in rows)
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(js, json.dumps({**meta, "rows": rows}, indent=1, default=str) + "\n")
    return [md, csv_path, js]


def stem_part(text: str) -> str:
    """``text`` (a dataset name or an image folder) as part of a results file stem, as the sweep
    names its study: letters, digits, ``-`` and ``_`` kept, anything else ``_`` (a README marker
    name and a file name both take it)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def machine_line(env: dict[str, Any]) -> str:
    """The notes line under a table that says what measured it, from :func:`environment`."""
    from zoo.machine import Machine

    machine = Machine(**{f.name: env[f.name] for f in dataclasses.fields(Machine)})
    versions = ", ".join(f"{k} {env['versions'][k]}" for k in ("torch", "timm") if k in env["versions"])
    return (
        f"Machine: {machine.summary()}, "
        f"{env['threads']} thread{'s' * (env['threads'] != 1)}; {versions}; commit {env['commit']}, {env['date'][:10]}."
    )


def markdown_table(header: list[str], rows: list[list[str]], right: list[bool]) -> str:
    """A Markdown table with every column padded to one width, so that the text printed to a
    terminal reads as a table too; ``right[i]``: column i is right-aligned (numbers)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    widths = [max(w, 4) for w in widths]  # room for the alignment row's "---:"

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    rule = ["-" * (w - 1) + ":" if r else "-" * w for w, r in zip(widths, right)]
    return "\n".join([line(header), line(rule), *(line([str(c) for c in row]) for row in rows)])


def readme_blocks(text: str) -> dict[str, str]:
    """Marker name -> the text between its markers."""
    return {m["name"]: m["body"] for m in MARKER.finditer(text)}


def sync_readme(readme: Path, results: Path, check: bool = False) -> list[str]:
    """Copy every marked block of ``readme`` from ``results/NAME.md``; return the names that
    differed (with ``check``, write nothing). A marker naming a missing file raises."""
    text = readme.read_text()
    changed: list[str] = []

    def fill(m: re.Match) -> str:
        path = results / f"{m['name']}.md"
        if not path.is_file():
            raise FileNotFoundError(f"{readme}: block {m['name']!r} has no results file {path}")
        body = path.read_text()
        if body != m["body"]:
            changed.append(m["name"])
        return m.group(1) + body + m.group(4)

    new = MARKER.sub(fill, text)
    if changed and not check:
        atomic_write_text(readme, new)
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m zoo.bench readme", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs from its file")
    args = p.parse_args(argv)
    try:
        changed = sync_readme(args.readme, args.results, check=args.check)
    except (OSError, FileNotFoundError) as e:
        print(f"zoo.bench readme: {e}", file=sys.stderr)
        return 2
    names = sorted(readme_blocks(args.readme.read_text()))
    if args.check:
        if changed:
            print(
                f"zoo.bench readme: {args.readme} differs from {args.results} in {', '.join(changed)}; "
                "run `python -m zoo.bench readme`",
                file=sys.stderr,
            )
            return 1
        print(f"{args.readme}: {len(names)} results blocks match {args.results}")
        return 0
    print(
        f"{args.readme}: {len(changed)} of {len(names)} results blocks updated"
        + (f" ({', '.join(changed)})" if changed else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
