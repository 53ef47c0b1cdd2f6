"""The benchmark commands at toy size: their tables are computed from the runs, not copied."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from zoo.bench import moe
from zoo.bench.machines import machine_slug
from zoo.machine import describe, keep_freed_memory


def read_results(res: Path, stem: str, printed: str | None, command: str) -> tuple[str, list[list[str]], dict]:
    """The three results files of ``stem``, checked against each other and against what was printed
    (the Markdown is the printed text; the CSV's rows are the JSON's, in the table's order; the JSON
    says what measured it); returns the Markdown, its tables' body cells, the JSON."""
    md = (res / f"{stem}.md").read_text()
    if printed is not None:
        assert md.rstrip("\n") in printed
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    rules = {i for i, row in enumerate(cells) if all(c and set(c) <= set("-:") for c in row)}
    body = [row for i, row in enumerate(cells) if i not in rules and i + 1 not in rules]  # nor headers
    with open(res / f"{stem}.csv") as f:
        rows = list(csv.DictReader(f))
    data = json.loads((res / f"{stem}.json").read_text())
    assert data["command"] == command and f"`{command}`" in md
    for key in ("commit", "date", "cpu_model", "cpu_capability", "cores", "threads"):
        assert data[key] not in (None, ""), key
    assert {"torch", "timm"} <= set(data["versions"])
    assert f"Machine: {data['cpu_model']} ({data['cpu_capability']}" in md and data["commit"] in md
    assert [{k: "" if r[k] is None else str(r[k]) for k in rows[0]} for r in data["rows"]] == rows
    assert len(body) == len(rows)
    return md, body, data


MOE_TOY = ["--batch", "1", "--tokens", "8", "--dim", "16", "--hidden", "32", "--warmup", "0", "--repeats", "1"]


def test_moe_command_writes_each_setting_as_it_is_measured(tmp_path, capsys, monkeypatch, request):
    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))  # --threads 1 is the command's, not pytest's
    res = tmp_path / "results"
    argv = [*MOE_TOY, "--threads", "1", "--out", str(res)]
    command, measure = moe.command_line(moe.PROG, argv), moe._measure

    def stopped_in_the_second(s, args):
        if s.experts == 64:
            raise KeyboardInterrupt
        return measure(s, args)

    monkeypatch.setattr(moe, "_measure", stopped_in_the_second)
    with pytest.raises(KeyboardInterrupt):
        moe.main(argv)
    stem = f"moe_{machine_slug(describe().record())}"  # the files name the machine kind
    md, table, data = read_results(res, stem, None, command)  # the notes were not printed yet
    assert md.split("\n\n")[0] in capsys.readouterr().out  # the table was, as soon as measured
    assert [c[0] for c in table] == ["4e top-2"] * 5 and "Not measured (the run stopped" in md
    assert [r["layer"] for r in data["rows"]] == ["dense", *moe.ROUTERS] and data["threads"] == 1
    monkeypatch.setattr(moe, "_measure", measure)
    assert moe.main(argv) == 0
    md, table, data = read_results(res, stem, capsys.readouterr().out, command)
    assert [c[0] for c in table] == ["4e top-2"] * 5 + ["64e top-1"] * 5 and "Not measured" not in md
    assert md.count("| setting ") == 2 and "4e_top2: 4 experts x hidden 32" in md
    if keep_freed_memory():  # glibc (no other malloc preloaded): the bench kept freed memory too
        assert "Memory: as the training loop, freed memory kept" in md and data["allocator"] == "reuse"
    else:
        assert "Memory: the system allocator's defaults" in md and data["allocator"] == "system"
    for cells, r in zip(table, data["rows"]):
        dense = data["rows"][0 if r["setting"] == "4e_top2" else 5]
        assert r["ratio"] == pytest.approx(r["tokens_per_s"] / dense["tokens_per_s"])
        assert cells[1:5] == [r["label"], f"{r['tokens_per_s']:.0f}", f"{r['ms_per_step']:.1f}", f"{r['ratio']:.3f}"]
    spread = (res / "moe_machines.md").read_text().splitlines()  # every router's ratio on this machine kind
    header, row = ([c.strip() for c in line.strip().strip("|").split("|")] for line in (spread[2], spread[4]))
    routed = [r for r in data["rows"] if r["layer"] != "dense"]
    assert header[3:] == [f"{r['experts']}e top-{r['top_k']} {r['layer']}" for r in routed]
    assert row[3:] == [f"{r['ratio']:.2f}" for r in routed] and len(spread) == 7
