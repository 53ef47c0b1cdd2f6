"""The benchmark commands at toy size: their tables are computed from the runs, not copied."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from scipy import stats

from zoo.bench import ablate, moe, top1
from zoo.bench.runs import RunRow
from zoo.bench.stats import diff_ci, mean_ci
from zoo.machine import keep_freed_memory

TOY = [
    "--set",
    "train.limit_train=64",
    "--set",
    "train.limit_val=64",
    "--set",
    "train.batch_size=32",
    "--set",
    "data.num_workers=0",
    "--epochs",
    "1",
]


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


def test_mean_ci_is_student_t():
    values = [1.0, 2.0, 4.0]
    mean, half = mean_ci(values)
    sem = statistics.stdev(values) / math.sqrt(3)
    assert mean == pytest.approx(7 / 3)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * sem)
    assert math.isnan(mean_ci([3.0])[1])


def test_diff_ci_is_welch():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 9.0]
    diff, half = diff_ci(a, b)
    welch = stats.ttest_ind(a, b, equal_var=False)
    ci = welch.confidence_interval(0.95)
    assert diff == pytest.approx(2 - 5)
    assert half == pytest.approx((ci.high - ci.low) / 2)


def test_top1_summary_rows_are_computed():
    rows = [RunRow("m", "m", s, 100 - e, e, 1_000_000, 2_000_000, 10.0 + s, 50.0) for s, e in enumerate([2.0, 3.0])]
    rows += [
        RunRow("resnet18", "resnet18", s, 100 - e, e, 11_000_000, 37_000_000, 20.0, 40.0)
        for s, e in enumerate([1.0, 1.5])
    ]
    table = {r["model"]: r for r in top1.summarise(rows, "resnet18")}
    assert table["m"]["top1_err"] == pytest.approx(2.5)
    assert table["m"]["diff_vs_baseline"] == pytest.approx(2.5 - 1.25)
    assert table["m"]["train_s"] == pytest.approx(10.5) and table["m"]["params_m"] == pytest.approx(1.0)
    assert table["resnet18"]["diff_vs_baseline"] == 0.0


def test_top1_command_end_to_end(tmp_path, capsys):
    out, res = tmp_path / "top1", tmp_path / "results"
    argv = ["--models", "zoo_poolformer_mini_32", "--seeds", "2", "--out", str(out), "--results", str(res), *TOY]
    assert top1.main(argv) == 0
    md, table, data = read_results(res, "top1_mnist5k", capsys.readouterr().out, top1.command_line(top1.PROG, argv))
    with open(res / "top1_mnist5k.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert [c[0] for c in table] == ["zoo_poolformer_mini_32", "resnet18"] == list(rows)  # the baseline is added
    assert list(rows["resnet18"]) == top1.COLUMNS
    for cells, r in zip(table, rows.values()):
        assert int(r["seeds"]) == 2 and 0 <= float(r["top1_err"]) <= 100 and float(r["img_per_s"]) > 0
        assert cells[1:3] == [f"{float(r['params_m']):.2f}", f"{float(r['gmacs']):.3f}"]
        assert cells[3].startswith(f"{float(r['top1_err']):.2f} ± ")
    assert float(rows["resnet18"]["params_m"]) == pytest.approx(11.18, abs=0.01)  # timm resnet18, 10 classes
    mini, base = rows["zoo_poolformer_mini_32"], rows["resnet18"]
    assert float(mini["diff_vs_baseline"]) == pytest.approx(float(mini["top1_err"]) - float(base["top1_err"]))
    assert len(data["runs"]) == 4 and {r["seed"] for r in data["runs"]} == {0, 1}
    assert "1 epochs" in md and "2 seeds 0-1, on mnist5k" in md and "differences to resnet18" in md
    assert (res / "top1_mnist5k.png").stat().st_size > 0 and "top1_mnist5k.png)" in md
    assert not (out / "top1.csv").exists()  # the runs' folder holds the runs only
    # --reuse reads the finished runs back instead of training again, only under the same config
    first = (res / "top1_mnist5k.csv").read_text()
    assert top1.main([*argv, "--reuse", "--name", "again"]) == 0
    assert (res / "again.csv").read_text() == first and "read back (--reuse)" in (res / "again.md").read_text()
    with pytest.raises(ValueError, match="used another config"):
        top1.main([*argv, "--reuse", "--set", "optim.lr=0.01"])
    assert top1.main([*argv, "--set", "train.no_such_key=1"]) == 2  # refused before any training


def test_ablate_plan_marks_non_iso_param_and_width_matches():
    variants = ablate.plan("zoo_poolformer_mini_32", ablate.parse_swaps(["channel_mixer=geglu,mlp"]), 32, 0.02, True)
    labels = [v["label"] for v in variants]
    assert labels[0] == "base" and "channel_mixer=mlp" not in labels  # the base's own value is skipped
    geglu = next(v for v in variants if v["label"] == "channel_mixer=geglu")
    assert geglu["params"] > variants[0]["params"] and geglu["note"].startswith("not iso-param")
    matched = next(v for v in variants if v["note"] == "width-matched")
    assert abs(matched["params"] - variants[0]["params"]) / variants[0]["params"] < 0.02


def test_ablate_rejects_unknown_field(capsys):
    assert ablate.main(["--swap", "token_mixr=pooling"]) == 2
    assert "did you mean 'token_mixer'" in capsys.readouterr().err


def test_ablate_command_end_to_end(tmp_path, capsys):
    out, res = tmp_path / "ablate", tmp_path / "results"
    argv = ["--swap", "token_mixer=identity", "--seeds", "1", "--out", str(out), "--results", str(res), *TOY]
    assert ablate.main(argv) == 0
    command = ablate.command_line(ablate.PROG, argv)
    md, table, data = read_results(res, "ablate_mnist5k", capsys.readouterr().out, command)
    lines = md.splitlines()
    assert lines[0].startswith("| change |") and lines[4] == "" and len(table) == 2
    assert [c[0] for c in table] == ["base", "token_mixer=identity"] == [r["label"] for r in data["runs"]]
    assert table[0][4] == "—" and data["rows"][0]["diff_vs_base"] is None
    assert data["rows"][1]["spec"] == {"token_mixer": "identity"}
    assert table[1][3] == f"{data['rows'][1]['top1_err']:.2f}"  # one seed: no interval
    assert "differences to the base, zoo_poolformer_mini_32" in md and "1 seed 0, on mnist5k" in md


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
    md, table, data = read_results(res, "moe", None, command)  # the notes were not printed yet
    assert md.split("\n\n")[0] in capsys.readouterr().out  # the table was, as soon as measured
    assert [c[0] for c in table] == ["4e top-2"] * 5 and "Not measured (the run stopped" in md
    assert [r["layer"] for r in data["rows"]] == ["dense", *moe.ROUTERS] and data["threads"] == 1
    monkeypatch.setattr(moe, "_measure", measure)
    assert moe.main(argv) == 0
    md, table, data = read_results(res, "moe", capsys.readouterr().out, command)
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
