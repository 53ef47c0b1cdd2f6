"""``python -m zoo.study plan``: each arm's probe is timed and priced over the design's runs."""

from __future__ import annotations

import dataclasses
import json

import pytest
from study_fakes import CALLS, fake_run

from zoo.study import plan as planning
from zoo.study.arms import parse_arms
from zoo.study.sweep import make_plan


def timed_fake(cfg, resume=None, on_epoch=None):
    """fake_run with seconds that depend on the model, so each arm's price is checkable by hand."""
    result = fake_run(cfg, resume=resume, on_epoch=on_epoch)
    per_epoch = {"resnet10t": 2.0, "zoo_vit_mini_32": 5.0}[cfg.model.name]
    seconds = {"startup": 1.5, "train": per_epoch * cfg.train.epochs, "eval": 0.5 * cfg.train.epochs, "finish": 0.5}
    return dataclasses.replace(result, seconds=seconds, threads=1)


def test_the_plan_prices_each_arm_from_its_probe(tmp_path, capsys):
    CALLS.clear()
    argv = [
        "--arms=zoo_vit_mini_32:adamw,resnet10t:adamw,resnet10t:adamw@default",
        "--data=digits",
        "--configs=9",
        "--eta=3",
        "--min-epochs=1",
        "--epochs=9",
        "--seeds=2",
        "--holdout=0.25",
        "--probe-epochs=2",
        f"--results={tmp_path / 'results'}",
        f"--runs={tmp_path / 'runs'}",
        "--set=data.num_workers=0",
    ]
    assert planning.main(argv, train_fn=timed_fake) == 0
    # one probe per arm, on the tuning split, for --probe-epochs, never a final's seed or split
    assert [(c.model.name, c.train.epochs, c.data.holdout, c.seed) for c in CALLS] == [
        ("zoo_vit_mini_32", 2, 0.25, 0),
        ("resnet10t", 2, 0.25, 0),
        ("resnet10t", 2, 0.25, 0),
    ]
    assert not (tmp_path / "runs").exists()  # probes run in a temporary folder
    rows = {r["arm"]: r for r in json.loads((tmp_path / "results" / "sweep_digits_plan.json").read_text())["rows"]}
    # rungs 9 x 1, 3 x 3, 1 x 9 epochs: 27 tuning epochs in 13 runs, then 2 finals of 9 epochs on 4/3 the images
    vit = rows["zoo_vit_mini_32:adamw"]
    assert (vit["runs"], vit["tune_epochs"], vit["final_epochs"]) == (15, 27, 18)
    assert vit["probe_core_s_per_epoch"] == 5.5 and vit["probe_core_s_per_run"] == 2.0
    assert vit["core_h"] == pytest.approx(((27 + 18 / 0.75) * 5.5 + 15 * 2.0) / 3600, abs=1e-3)
    default = rows["resnet10t:adamw@default"]  # never tuned: its finals only
    assert (default["runs"], default["tune_epochs"], default["final_epochs"]) == (2, 0, 18)
    assert default["core_h"] == pytest.approx((18 / 0.75 * 2.5 + 2 * 2.0) / 3600, abs=1e-3)
    assert "core-hours" in capsys.readouterr().out


def test_bad_probe_epochs_is_one_line(tmp_path, capsys):
    rc = planning.main(["--arms=resnet10t:adamw", "--data=digits", "--probe-epochs=0"], train_fn=timed_fake)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--probe-epochs 0" in err


def test_spend_counts_every_run_of_the_design():
    from argparse import Namespace

    args = Namespace(
        arms="resnet10t:adamw",
        space="lr=1e-4:1e-2:log",
        baseline=None,
        data="digits",
        study=None,
        epochs=18,
        min_epochs=2,
        configs=27,
        eta=3,
        seeds=5,
        config=None,
        set=[],
        holdout=0.2,
        tune_seed=0,
        qmc_seed=0,
        metric="err",
        runs=None,
    )
    plan = make_plan(args)
    (arm,) = parse_arms("resnet10t:adamw")
    # 27 x 2, 9 x 6, 3 x 18 = 162 epochs in 39 runs, + 5 finals of 18
    assert planning.spend(plan, arm) == (39 + 5, 162, 90)
