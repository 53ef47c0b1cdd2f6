"""Results files for the benchmark tables, and the README blocks copied from them.

A bench command writes its table as ``NAME.md`` (the Markdown the README shows), ``NAME.csv`` and
``NAME.json`` (the rows plus what produced them: command, git commit, date, CPU model and
capability, threads, library versions) into a results folder, by default the committed
``zoo/bench/results``. The README and docs/ never hold a typed figure: each table sits between markers

    <!-- results:NAME -->
    ...the exact text of zoo/bench/results/NAME.md...
    <!-- /results -->

and ``python -m zoo.bench readme`` copies every marked block of README.md and of every docs/*.md
from its file (``--check``: change nothing, exit 1 naming the blocks that differ; the test suite
runs the same check). Blocks computed rather than measured (the model table from the registry, the
README's headline from the results files) sit between ``<!-- generated:NAME -->`` and
``<!-- /generated -->`` and are rewritten the same way (``zoo/bench/generated.py``). A results block
whose file does not exist yet, of a command listed in ``PRODUCERS``, reads "not measured yet" with
that command. Links in a results file are relative to the repository root (as the README's are);
a block in docs/ gets them rebased to its folder.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import os
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
BLOCK = re.compile(
    r"(<!-- (?P<kind>results|generated):(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /(?P=kind) -->)", re.DOTALL
)
# Results files a fresh checkout may not have yet, and the command that writes each.
PRODUCERS = {
    "first_run": "python -m zoo.bench first-run",
    "suite": "python -m zoo.bench suite",
    "timm_suite": "tests/timm_suite/run.sh",
    "timm_suite_selection": 'tests/timm_suite/run.sh -k "zoo_ and mini"',
    "data_stats": "python -m zoo.bench data-stats",
    "norm_precision": "python -m zoo.bench norm-precision",
}
_LINK = re.compile(r"(\]\()(?P<target>[^)\s]+)(\))")


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
    """Results marker name -> the text between its markers."""
    return {m["name"]: m["body"] for m in MARKER.finditer(text)}


def rebase_links(text: str, depth: int) -> str:
    """Relative Markdown link targets of ``text`` (relative to the repository root) as seen from a
    file ``depth`` folders below it; URLs, anchors and absolute paths unchanged."""
    if depth == 0:
        return text

    def fix(m: re.Match) -> str:
        target = m["target"]
        if re.match(r"[a-z][a-z0-9+.-]*:|#|/", target):
            return m.group(0)
        return m.group(1) + "../" * depth + target + m.group(3)

    return _LINK.sub(fix, text)


def _depth(path: Path, root: Path) -> int:
    try:
        return len(path.resolve().parent.relative_to(root.resolve()).parts)
    except ValueError:  # a file outside the repository (a test's copy): its own folder is the root
        return 0


def block_text(kind: str, name: str, results: Path) -> str:
    """What the block ``kind:name`` holds, links relative to the repository root."""
    if kind == "generated":
        from zoo.bench.generated import GENERATORS

        if name not in GENERATORS:
            raise KeyError(f"no generator {name!r}; known: {', '.join(sorted(GENERATORS))}")
        return GENERATORS[name](results)
    path = results / f"{name}.md"
    if path.is_file():
        return path.read_text()
    if name in PRODUCERS:
        return f"_Not measured yet: `{PRODUCERS[name]}` writes it._\n"
    raise FileNotFoundError(f"block {name!r} has no results file {path}")


def sync_file(
    doc: Path, results: Path, check: bool = False, root: Path = REPO, skip: frozenset[str] = frozenset()
) -> list[str]:
    """Rewrite every marked block of ``doc`` (results and generated); return the names that
    differed (with ``check``, write nothing). A block that cannot be filled raises, naming ``doc``.
    Blocks named in ``skip`` are left as they are (a fast check of the rest)."""
    text = doc.read_text()
    depth = _depth(doc, root)
    changed: list[str] = []

    def fill(m: re.Match) -> str:
        if m["name"] in skip:
            return m.group(0)
        try:
            body = rebase_links(block_text(m["kind"], m["name"], results), depth)
        except (KeyError, FileNotFoundError) as e:
            raise FileNotFoundError(f"{doc}: {e.args[0]}") from None
        if body != m["body"]:
            changed.append(m["name"])
        return m.group(1) + body + m.group(5)

    new = BLOCK.sub(fill, text)
    if changed and not check:
        atomic_write_text(doc, new)
    return changed


sync_readme = sync_file  # the name the sweep and its tests know


def documents(readme: Path, docs: Path | None = None) -> list[Path]:
    """README.md and every Markdown file under docs/ (default: the docs/ beside the README)."""
    docs = readme.parent / "docs" if docs is None else docs
    return [readme, *sorted(docs.rglob("*.md"))] if docs.is_dir() else [readme]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m zoo.bench readme", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    p.add_argument("--docs", type=Path, default=None, help="the docs folder (default: docs/ beside the README)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs from its file")
    args = p.parse_args(argv)
    stale: list[str] = []
    total = 0
    try:
        for doc in documents(args.readme, args.docs):
            changed = sync_file(doc, args.results, check=args.check)
            total += len(BLOCK.findall(doc.read_text()))
            stale += [f"{os.path.relpath(doc)}:{name}" for name in changed]
    except (OSError, FileNotFoundError) as e:
        print(f"zoo.bench readme: {e}", file=sys.stderr)
        return 2
    if args.check:
        if stale:
            print(
                f"zoo.bench readme: blocks differ from {args.results} or their generator: {', '.join(stale)}; "
                "run `python -m zoo.bench readme`",
                file=sys.stderr,
            )
            return 1
        print(f"{args.readme} and docs: {total} blocks match {args.results} and the generators")
        return 0
    print(f"{len(stale)} of {total} blocks updated" + (f" ({', '.join(stale)})" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
