"""The benchmark commands at toy size: their tables are computed from the runs, not copied."""

from __future__ import annotations

import csv
import math
import statistics

import pytest
from scipy import stats

from zoo.bench import ablate, top1
from zoo.bench.runs import RunRow
from zoo.bench.stats import diff_ci, mean_ci

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
    out = tmp_path / "top1"
    assert top1.main(["--models", "zoo_poolformer_mini_32", "--seeds", "2", "--out", str(out), *TOY]) == 0
    with open(out / "top1.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"zoo_poolformer_mini_32", "resnet18"}  # the baseline row is added
    assert list(rows["resnet18"]) == top1.COLUMNS
    for r in rows.values():
        assert int(r["seeds"]) == 2 and 0 <= float(r["top1_err"]) <= 100 and float(r["img_per_s"]) > 0
    assert float(rows["resnet18"]["params_m"]) == pytest.approx(11.18, abs=0.01)  # timm resnet18, 10 classes
    mini, base = rows["zoo_poolformer_mini_32"], rows["resnet18"]
    assert float(mini["diff_vs_baseline"]) == pytest.approx(float(mini["top1_err"]) - float(base["top1_err"]))
    assert (out / "top1.png").stat().st_size > 0 and (out / "top1.md").read_text().startswith("| model |")
    # --reuse reads the finished runs back instead of training again, only under the same config
    first = (out / "top1.csv").read_text()
    assert top1.main(["--models", "zoo_poolformer_mini_32", "--seeds", "2", "--out", str(out), "--reuse", *TOY]) == 0
    assert (out / "top1.csv").read_text() == first
    with pytest.raises(ValueError, match="used another config"):
        top1.main(
            [
                "--models",
                "zoo_poolformer_mini_32",
                "--seeds",
                "2",
                "--out",
                str(out),
                "--reuse",
                *TOY,
                "--set",
                "optim.lr=0.01",
            ]
        )


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


def test_ablate_command_end_to_end(tmp_path):
    out = tmp_path / "ablate"
    assert ablate.main(["--swap", "token_mixer=identity", "--seeds", "1", "--out", str(out), *TOY]) == 0
    lines = (out / "ablate.md").read_text().splitlines()
    assert lines[0].startswith("| change |") and len(lines) == 4
    assert lines[2].startswith("| base |") and lines[3].startswith("| token_mixer=identity |")
