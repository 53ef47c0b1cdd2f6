"""Results kept per machine kind, and the spread across the kinds met.

A ratio measured on one CPU is that CPU's: the same two models trade places between an AMD EPYC
and an Intel Xeon with AMX, and with the batch and the optimizer (DESIGN.md, "Measuring"). So the
speed, data-pipeline and MoE benches write ``NAME_<machine>.{md,csv,json}``, one set per machine
kind, where ``<machine>`` is :func:`machine_slug` of the machine that measured it; a run on
another kind adds files beside the others instead of replacing them. After each run the bench
also writes ``NAME_machines.md``: one row per machine kind, newest first, with the ratios of every
file of that NAME (each bench says which ratios); the README and docs show that block, so a
reader sees the spread across machines rather than one machine's best.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from zoo.atomic import atomic_write_text
from zoo.bench.report import REPO, markdown_table, write_results

__all__ = [
    "add_spread_only",
    "machine_results",
    "machine_slug",
    "results_stem",
    "rewrite_spreads",
    "spread_name",
    "write_machine_results",
    "write_spread",
]

Cells = Callable[[dict[str, Any]], dict[str, str]]

_NOISE = re.compile(r"\((R|TM|tm)\)|\b(CPU|Processor)\b|@.*$")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_slug(record: dict[str, Any], device: str = "cpu") -> str:
    """The machine kind in a results file name, from a results file's (or ``Machine.record()``'s)
    fields: the CPU's vendor and line, then torch's CPU capability and the strongest native bf16
    unit (``amd-epyc-avx512-bf16``, ``intel-xeon-avx512-amx``, ``intel-core-avx2``); for a run
    on a CUDA device, the GPU's name (``nvidia-h200``)."""
    if device.startswith("cuda") and record.get("gpu"):
        return _slug(record["gpu"])
    family = "-".join(_NOISE.sub(" ", record["cpu_model"]).split()[:2]) or "cpu"
    flags = record.get("cpu_flags") or ()
    unit = "-amx" if "amx_bf16" in flags else "-bf16" if flags else ""
    return _slug(f"{family}-{record['cpu_capability']}{unit}")


def results_stem(name: str, record: dict[str, Any], device: str = "cpu") -> str:
    """``NAME_<machine>``: the stem of one machine kind's results files."""
    return f"{name}_{machine_slug(record, device)}"


def spread_name(name: str) -> str:
    """The stem of the spread across machines of NAME's results."""
    return f"{name}_machines"


def _date(result: dict[str, Any]) -> datetime.datetime:
    when = datetime.datetime.fromisoformat(result["date"])
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def machine_results(out: Path, name: str) -> list[dict[str, Any]]:
    """The results JSONs of NAME in ``out``, one per machine kind, newest first: the files
    ``NAME_<machine>.json`` whose own machine fields give that ``<machine>`` (so that
    ``speed_cpu_fp32_subset_<machine>`` is not taken for a ``speed_cpu_fp32`` file)."""
    found = []
    for path in sorted(out.glob(f"{name}_*.json")):
        result = json.loads(path.read_text())
        if "cpu_model" not in result or "date" not in result:
            continue
        if path.stem == results_stem(name, result, _device(result)):
            found.append(result)
    return sorted(found, key=_date, reverse=True)


def _device(result: dict[str, Any]) -> str:
    """The device a results file measured on (the speed bench's ``settings.device``; else the CPU)."""
    return str(result.get("settings", {}).get("device", "cpu"))


def _link(out: Path, stem: str) -> str:
    """A link to a full table, relative to the repository root as README links are (a results
    folder outside the repository: the file name only)."""
    try:
        return f"[`{stem}`]({(out.resolve() / f'{stem}.md').relative_to(REPO).as_posix()})"
    except ValueError:
        return f"`{stem}.md`"


def _machine_cell(result: dict[str, Any]) -> str:
    device = _device(result)
    if device.startswith("cuda") and result.get("gpu"):
        return f"{result['gpu']} (GPU)"
    flags = ", ".join(result.get("cpu_flags") or ())
    return f"{result['cpu_model']} ({result['cpu_capability']}{', ' + flags if flags else ''})"


def write_spread(out: Path, name: str, title: str, cells: Cells) -> Path | None:
    """``NAME_machines.md``: ``title``, then one row per machine kind (newest first): the machine,
    date and threads of its results file (its full table names the commit), then ``cells(result)``
    (column -> text; a column missing from a row shows "-"), then links to the full tables. None
    (nothing written) when ``out`` holds no results of NAME."""
    results = machine_results(out, name)
    if not results:
        return None
    own = [cells(r) for r in results]
    columns = list(dict.fromkeys(c for row in own for c in row))
    header = ["machine", "date", "threads", *columns]
    rows = [
        [_machine_cell(r), r["date"][:10], str(r.get("threads", "-")), *(row.get(c, "-") for c in columns)]
        for r, row in zip(results, own)
    ]
    numeric = [all(row[i][:1].isdigit() or row[i] == "-" for row in rows) for i in range(3, len(header))]
    table = markdown_table(header, rows, [False, False, True, *numeric])
    tables = ", ".join(_link(out, results_stem(name, r, _device(r))) for r in results)
    text = f"{title}\n\n{table}\n\nOne row per machine kind, newest first; each row's full table: {tables}.\n"
    path = out / f"{spread_name(name)}.md"
    atomic_write_text(path, text)
    return path


def write_machine_results(
    out: Path,
    name: str,
    record: dict[str, Any],
    text: str,
    rows: list[dict[str, Any]],
    columns: list[str],
    meta: dict[str, Any],
    spread: tuple[str, Cells],
    device: str = "cpu",
) -> list[Path]:
    """A bench's results for this machine kind, ``NAME_<machine>.{md,csv,json}``
    (``report.write_results``; ``record``: the machine's fields), then ``NAME_machines.md`` rebuilt
    with them (``spread``: its title and :func:`write_spread`'s cells). The paths written."""
    paths = write_results(out, results_stem(name, record, device), text, rows, columns, meta)
    if path := write_spread(out, name, *spread):
        paths.append(path)
    return paths


def add_spread_only(parser: argparse.ArgumentParser) -> None:
    """The benches' ``--spread-only`` flag: :func:`rewrite_spreads` instead of measuring."""
    parser.add_argument(
        "--spread-only", action="store_true", help="rewrite NAME_machines.md from the results in --out; measure nothing"
    )


def rewrite_spreads(out: Path, titles: Mapping[str, str], cells: Cells) -> int:
    """``--spread-only``: ``NAME_machines.md`` rewritten for each NAME of ``titles`` (NAME -> title)
    that has results in ``out``, each path printed; the exit code, 0."""
    for name, title in titles.items():
        if path := write_spread(out, name, title, cells):
            print(f"results: {path}")
    return 0
