"""The study protocol at toy size: the bracket, equal steps, promotion, splits, default arms, the
table's statistics against libraries, floors, provenance, design refusal, bad input.

Training goes through ``study_fakes.fake_run`` (the ``train_fn`` seam) and the floors through
``study_fakes.fake_floors``; worker processes, storages and export/import are in
``test_study_workers.py``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import study_fakes
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint
from study_fakes import CALLS, STEPS_PER_EPOCH, fake_floors, fake_run

from zoo.bench import report
from zoo.study import sweep
from zoo.study.design import Bracket
from zoo.study.statistics import expected_best
from zoo.train.optim import OPTIMIZER_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
TUNED = ["zoo_poolformer_mini_32:adamw", "zoo_vit_mini_32:adamw", "resnet10t:adamw"]
ARMS = ",".join([*TUNED, "resnet10t:adamw@default"])


def toy_args(tmp: Path, *extra: str, configs: int = 9, seeds: int = 3, arms: str = ARMS) -> list[str]:
    return [
        "--arms",
        arms,
        "--configs",
        str(configs),
        "--eta",
        "3",
        "--min-epochs",
        "1",
        "--epochs",
        "9",
        "--seeds",
        str(seeds),
        "--runs",
        str(tmp / "runs"),
        "--results",
        str(tmp / "results"),
        "--poll",
        "0.1",
        "--set",
        "data.num_workers=0",
        *extra,
    ]


def run_quietly(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = sweep.main(argv, train_fn=fake_run, floors_fn=fake_floors)
    return rc, out.getvalue()


def load(tmp: Path, study: str = "sweep_mnist5k", url: str | None = None) -> dict[str, dict]:
    """{"rung0": {arm: study}, ..., "final": {arm: study}} read back from the storage."""
    import optuna

    url = url or f"sqlite:///{tmp / 'runs' / study / 'study.db'}"
    out: dict[str, dict] = {}
    for name in optuna.get_all_study_names(url):
        if name.count(":") >= 2:
            _, kind, arm = name.split(":", 2)
            out.setdefault(kind, {})[arm] = optuna.load_study(study_name=name, storage=url)
    return out


def complete(study) -> dict[int, object]:
    """Slot -> its COMPLETE trial; fails if a slot completed twice."""
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    slots = [t.user_attrs["slot"] for t in done]
    assert len(slots) == len(set(slots)), f"a slot finished twice: {sorted(slots)}"
    return {t.user_attrs["slot"]: t for t in done}


# ---------------------------------------------------------------- the bracket


@pytest.mark.parametrize(
    "bracket, rungs",
    [
        (Bracket(27, 3, 1, 27), [(27, 1), (9, 3), (3, 9), (1, 27)]),
        (Bracket(9, 3, 1, 10), [(9, 1), (3, 3), (1, 10)]),  # the last rung takes the whole budget
        (Bracket(8, 2, 2, 8), [(8, 2), (4, 4), (2, 8)]),
        (Bracket(5, 3, 6, 6), [(5, 6)]),  # min-epochs = epochs: one rung, no halving
    ],
)
def test_bracket_rungs(bracket, rungs):
    assert bracket.rungs() == rungs
    bracket.check()


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing run


@pytest.mark.parametrize(
    "args, says",
    [
        (["--eta", "1"], "--eta 1"),
        (["--configs", "8"], "--configs 8: too few for the bracket's first rung"),  # 3 rungs at eta 3 need 9
        (["--min-epochs", "12"], "--min-epochs 12"),
        (["--min-epochs", "0"], "--min-epochs 0"),
        (["--min-epochs", "5"], "--min-epochs 5: a second rung needs 15 epochs"),  # not silently 9 x 9 epochs
        (["--seeds", "0"], "--seeds 0"),
        (["--arms", "zoo_poolfromer_mini_32:adamw,resnet10t:adamw"], "zoo_poolfromer_mini_32"),
        (["--arms", "zoo_poolformer_mini_32:adamx,resnet10t:adamw"], "adamx"),
        (["--arms", "resnet10t:adamx@default"], "adamx"),
        (["--arms", "zoo_poolformer_mini_32:adamw:token_mixr=identity,resnet10t:adamw"], "token_mixr"),
        (["--arms", "zoo_poolformer_mini_32,resnet10t:adamw"], "MODEL:OPTIMIZER"),
        (["--arms", "zoo_poolformer_mini_32:adamw"], "no ResNet arm"),
        (["--space", "lr=1e-2:1e-4:log"], "inverted"),
        (["--space", "optim.lrr=1e-4:1e-3"], "lrr"),
        (["--set", "optim.lr=0.1"], "set by the study"),
        (["--data", "/no/such/folder"], "/no/such/folder"),
        (["--import", "/no/such/file.db"], "/no/such/file.db"),
        (["--grace", "30"], "--grace 30: must exceed --heartbeat 30"),
        (["--max-trials", "0"], "--max-trials 0"),
    ],
)
def test_bad_input_exits_2_with_one_line_before_any_run(tmp_path, capsys, args, says):
    CALLS.clear()
    assert sweep.main([*toy_args(tmp_path), *args], train_fn=fake_run, floors_fn=fake_floors) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("zoo.study: ") and says in err, err
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists() and not CALLS


def test_default_arm_of_an_optimizer_without_cited_defaults_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delitem(OPTIMIZER_DEFAULTS, "soap")
    argv = toy_args(tmp_path, arms="resnet10t:adamw,resnet10t:soap@default")
    assert sweep.main(argv, train_fn=fake_run, floors_fn=fake_floors) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resnet10t:soap@default" in err and "no cited defaults" in err, err


# ---------------------------------------------------------------- one toy study, inspected by several tests


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    CALLS.clear()
    argv = toy_args(tmp)
    rc, out = run_quietly(argv)
    assert rc == 0, out
    data = json.loads((tmp / "results" / "sweep_mnist5k.json").read_text())
    return {"tmp": tmp, "argv": argv, "calls": list(CALLS), "out": out, "json": data, "studies": load(tmp)}


def test_every_tuned_arm_starts_from_the_same_sobol_points(toy):
    _, plan = sweep.parse(toy["argv"])
    points = {}
    for arm in TUNED:
        done = complete(toy["studies"]["rung0"][arm])
        assert sorted(done) == list(range(9))
        points[arm] = [[d.unit(done[n].params[d.name]) for d in plan.dims] for n in range(9)]
    from scipy.stats import qmc

    with pytest.warns(UserWarning, match="power of 2"):
        sobol = qmc.Sobol(2, scramble=True, rng=0).random(9)
    for arm in TUNED:
        assert np.allclose(points[arm], sobol, atol=1e-3)  # params kept to 4 digits


def test_each_rung_promotes_the_best_third_of_the_last(toy):
    for arm in TUNED:
        studies = {k: toy["studies"][f"rung{k}"][arm] for k in range(3)}
        for k, size, epochs in ((0, 9, 1), (1, 3, 3), (2, 1, 9)):
            done = complete(studies[k])
            assert len(done) == size and len(studies[k].trials) == size  # nothing run twice, nothing extra
            assert {t.user_attrs["epochs_done"] for t in done.values()} == {epochs}
        for k in (0, 1):
            ranked = sorted(complete(studies[k]).values(), key=lambda t: (t.value, t.user_attrs["slot"]))
            keep = len(complete(studies[k + 1]))
            assert sorted(complete(studies[k + 1])) == sorted(t.user_attrs["slot"] for t in ranked[:keep])
            for slot, t in complete(studies[k + 1]).items():  # the same point, trained longer
                assert t.params == complete(studies[k])[slot].params


def test_equal_steps_for_every_tuned_arm_printed_and_stored(toy):
    rows = {r["arm"]: r for r in toy["json"]["rows"]}
    expected = [9 * 1 * STEPS_PER_EPOCH, 3 * 3 * STEPS_PER_EPOCH, 1 * 9 * STEPS_PER_EPOCH]
    for arm in TUNED:
        assert [p["steps"] for p in rows[arm]["per_rung"]] == expected
        assert rows[arm]["steps"] == sum(expected)
        assert rows[arm]["core_s"] == pytest.approx(sum(0.5 * e * n * 2 for n, e in ((9, 1), (3, 3), (1, 9))))
        assert f"{arm}: rung 0: 9 x 1 ep, {expected[0]} steps" in toy["out"]


def test_the_reported_split_is_only_read_by_the_finals(toy):
    tune = [c for c in toy["calls"] if c.name.startswith("rung")]
    final = [c for c in toy["calls"] if c.name.startswith("final-")]
    assert len(tune) == 3 * (9 + 3 + 1) and len(final) == 4 * 3
    assert {c.data.holdout for c in tune} == {0.2} and {c.seed for c in tune} == {0}
    assert {c.data.holdout for c in final} == {0.0} and {c.seed for c in final} == {1, 2, 3}
    for arm in TUNED:  # the finals train the last rung's best
        best = complete(toy["studies"]["rung2"][arm])
        (point,) = [t.params for t in best.values()]
        model, optim = arm.split(":")
        for c in (c for c in final if (c.model.name, c.optim.name) == (model, optim) and c.optim.lr < 0.9e-3):
            assert (c.optim.lr, c.optim.weight_decay) == pytest.approx((point["lr"], point["weight_decay"]))


def test_a_default_arm_trains_the_cited_defaults_with_the_finals_seeds(toy):
    assert "resnet10t:adamw@default" not in toy["studies"]["rung0"]  # never tuned
    runs = [c for c in toy["calls"] if c.run_dir.parent.name == "resnet10t-adamw-default"]
    cited = OPTIMIZER_DEFAULTS["adamw"].values
    assert sorted(c.seed for c in runs) == [1, 2, 3] and {c.data.holdout for c in runs} == {0.0}
    for c in runs:
        assert (c.optim.lr, c.optim.weight_decay) == (cited["optim.lr"], cited["optim.weight_decay"])
        assert tuple(c.optim.betas) == tuple(cited["optim.betas"])
    row = next(r for r in toy["json"]["rows"] if r["arm"] == "resnet10t:adamw@default")
    assert row["tuned"] is False and row["final_seeds"] == 3 and row["best_config"] == "cited defaults"


def test_the_table_statistics_match_the_libraries(toy):
    rows = {r["arm"]: r for r in toy["json"]["rows"]}
    finals = {
        arm: [t.value for t in complete(s).values()] for arm, s in toy["studies"]["final"].items()
    }  # the finals' values, read from the storage
    base = finals["resnet10t:adamw"]
    others = [a for a in rows if a != "resnet10t:adamw"]
    pvalues = [stats.ttest_ind(finals[a], base, equal_var=False).pvalue for a in others]
    holm = multipletests(pvalues, method="holm")[1]
    for arm, p, p_holm in zip(others, pvalues, holm):
        r = rows[arm]
        assert r["diff_vs_baseline"] == pytest.approx(np.mean(finals[arm]) - np.mean(base))
        welch = stats.ttest_ind(finals[arm], base, equal_var=False)
        lo, hi = welch.confidence_interval(0.95)
        assert r["diff_ci95"] == pytest.approx((hi - lo) / 2)
        lo, hi = welch.confidence_interval(1 - 0.05 / len(others))
        assert r["diff_ci_bonferroni"] == pytest.approx((hi - lo) / 2)
        assert r["p"] == pytest.approx(p) and r["p_holm"] == pytest.approx(p_holm)
        mean, half = np.mean(finals[arm]), stats.sem(finals[arm]) * stats.t.ppf(0.975, len(finals[arm]) - 1)
        assert (r["final"], r["final_ci95"]) == pytest.approx((mean, half))
    # robustness at the first rung, against the bar: the best first-rung baseline value + 1
    bar = min(t.value for t in complete(toy["studies"]["rung0"]["resnet10t:adamw"]).values()) + 1
    assert toy["json"]["bar"] == pytest.approx(bar)
    for arm in TUNED:
        first = [t.value for t in complete(toy["studies"]["rung0"][arm]).values()]
        k = sum(v <= bar for v in first)
        assert (rows[arm]["robust_k"], rows[arm]["robust_n"]) == (k, 9)
        assert (rows[arm]["robust_lo"], rows[arm]["robust_hi"]) == pytest.approx(
            proportion_confint(k, 9, method="wilson")
        )
        assert toy["json"]["expected_best"][arm] == pytest.approx(expected_best(first))
        assert [p["robust_n"] for p in rows[arm]["per_rung"]] == [9, 3, 1]


def test_floors_rows_provenance_overhead_and_files(toy):
    tmp, data = toy["tmp"], toy["json"]
    md = (tmp / "results" / "sweep_mnist5k.md").read_text()
    assert md in toy["out"]
    assert (
        "| floor: majority class | | | 88.50 |" in md
        and "| floor: logistic regression on pixels (C=0.1) | | | 31.50 |" in md
    )
    assert data["floors"]["logreg_err"] == 31.5 and data["floors"]["img_size"] == 32
    with open(tmp / "results" / "sweep_mnist5k.csv") as f:
        assert [r["arm"] for r in csv.DictReader(f)] == ARMS.split(",")
    design = data["design"]
    assert design["bracket"] == {"configs": 9, "eta": 3, "min_epochs": 1, "epochs": 9}
    assert design["precision"] in ("bf16", "fp32")
    assert {c.train.precision for c in toy["calls"]} == {design["precision"]}  # pinned, passed to every run
    assert "torch.optim.AdamW" in design["optimizer"]["resnet10t:adamw"]["implementation"]
    for t in data["trials"]:
        assert t["code"].startswith(("git:", "zoo==")) and t["precision"] == design["precision"] and t["threads"] == 2
    trial = next(iter(complete(toy["studies"]["final"]["resnet10t:adamw"]).values()))
    prov = trial.user_attrs["provenance"]
    assert {"torch", "timm", "optuna"} <= set(prov["versions"]) and prov["machine"]["cpu_model"]
    assert data["code_versions"] == [prov["code"]] and "trials from" not in md  # one code version
    for r in data["rows"]:  # fake_run spends 0.46 of its 0.5 s an epoch in steps
        assert r["train_share"] == pytest.approx(0.92) and r["overhead"]["train"] == pytest.approx(0.92)
        assert (r["failed"], r["retried"], r["diverged"]) == (0, 0, 0) and r["complete"]
    assert "Share of trial wall time in training steps" in md and "92 %" in md
    for png in ("sensitivity", "expected_best"):
        assert (tmp / "results" / f"sweep_mnist5k_{png}.png").stat().st_size > 0
    # README blocks are copied from the results files, and checked against them
    readme = tmp / "README.md"
    readme.write_text("# t\n\n<!-- results:sweep_mnist5k -->\nstale\n<!-- /results -->\n")
    assert report.sync_readme(readme, tmp / "results") == ["sweep_mnist5k"]
    assert report.main(["--readme", str(readme), "--results", str(tmp / "results"), "--check"]) == 0


def test_a_storage_with_another_design_is_refused_and_the_same_resumes(toy, capsys):
    tmp = toy["tmp"]
    trials = {arm: len(s.trials) for arm, s in toy["studies"]["rung0"].items()}
    for argv, says in (
        (toy_args(tmp, "--eta", "2"), "bracket"),
        (toy_args(tmp, "--metric", "balanced_err"), "metric"),
        (toy_args(tmp, "--set", "train.batch_size=32"), "sets: "),
        (toy_args(tmp, "--set", "optim.eps=1e-6"), "optim.eps=1e-6"),
        (toy_args(tmp, arms="zoo_vit_mini_32:adamw,resnet10t:adamw"), "arms"),
    ):
        assert sweep.main(argv, train_fn=fake_run, floors_fn=fake_floors) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "another design" in err and says in err, err
    assert {arm: len(s.trials) for arm, s in load(tmp)["rung0"].items()} == trials
    md = (tmp / "results" / "sweep_mnist5k.md").read_text()
    n, floors = len(CALLS), len(study_fakes.FLOOR_CALLS)
    assert run_quietly(toy["argv"])[0] == 0  # nothing left to run, the same table, floors kept
    assert run_quietly([*toy["argv"], "--report-only"])[0] == 0
    assert len(CALLS) == n and len(study_fakes.FLOOR_CALLS) == floors
    assert (tmp / "results" / "sweep_mnist5k.md").read_text() == md


def test_a_stored_study_of_another_optimizer_implementation_is_refused(toy, capsys, monkeypatch):
    """The config can stay the same while the code behind ``optim.name`` changes (``shampoo`` was
    a plain Shampoo before it became the scalable one): the stored study is refused, also when the
    command adds an arm (the stored arms must keep their optimizers)."""
    from zoo.train import optim

    real = optim.describe_optimizer

    def before(o):  # the same name and config, another implementation
        return {**real(o), "implementation": "torch_optimizer.Shampoo 0.3.0"}

    monkeypatch.setattr(optim, "describe_optimizer", before)
    n = len(CALLS)
    for arms in (ARMS, ARMS + ",zoo_cvt_mini_32:adamw"):
        assert sweep.main(toy_args(toy["tmp"], arms=arms), train_fn=fake_run, floors_fn=fake_floors) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "another design (optimizer of " in err, err
        assert "torch_optimizer.Shampoo 0.3.0" in err, err
    assert len(CALLS) == n


def test_the_precision_is_pinned_when_the_study_is_created(tmp_path, capsys, monkeypatch):
    """A study resumed on another CPU kind keeps the precision it was created with; a command that
    sets another one is another design."""
    from zoo.study.design import Plan

    argv = toy_args(tmp_path, "--study", "pinned", "--min-epochs", "9", configs=3, seeds=1, arms="resnet10t:adamw")
    monkeypatch.setattr(Plan, "resolve_precision", lambda self: "fp32")
    assert run_quietly([*argv, "--max-trials", "1"])[0] == 0
    monkeypatch.setattr(Plan, "resolve_precision", lambda self: "bf16")  # the next machine would choose bf16
    CALLS.clear()
    assert run_quietly(argv)[0] == 0
    assert len(CALLS) == 3 and {c.train.precision for c in CALLS} == {"fp32"}
    assert sweep.main([*argv, "--set", "train.precision=bf16"], train_fn=fake_run, floors_fn=fake_floors) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another design" in err, err


def test_arms_added_later_get_the_same_bracket(tmp_path, capsys):
    argv = toy_args(tmp_path, configs=9, seeds=1, arms="resnet10t:adamw")
    assert run_quietly(argv)[0] == 0
    CALLS.clear()
    wider = toy_args(tmp_path, configs=9, seeds=1, arms="resnet10t:adamw,zoo_cvt_mini_32:adamw")
    rc, out = run_quietly(wider)
    assert rc == 0 and "arms added (zoo_cvt_mini_32:adamw)" in out
    assert {c.model.name for c in CALLS} == {"zoo_cvt_mini_32"} and len(CALLS) == 9 + 3 + 1 + 1
    studies = load(tmp_path)
    new, old = complete(studies["rung0"]["zoo_cvt_mini_32:adamw"]), complete(studies["rung0"]["resnet10t:adamw"])
    assert [new[n].params for n in range(9)] == [old[n].params for n in range(9)]


def test_balanced_error_as_the_tuning_metric(tmp_path):
    CALLS.clear()
    rc, out = run_quietly(
        [
            *toy_args(
                tmp_path, "--metric", "balanced_err", "--study", "bal", configs=3, seeds=2, arms="resnet10t:adamw"
            ),
            "--min-epochs",
            "9",
        ]
    )
    assert rc == 0, out
    studies = load(tmp_path, "bal")
    for t in studies["rung0"]["resnet10t:adamw"].trials:  # fake_run's balanced error is its error + 2
        assert t.value == pytest.approx(t.user_attrs["err"] + 2.0)
    data = json.loads((tmp_path / "results" / "bal.json").read_text())
    (row,) = data["rows"]
    finals = [t.user_attrs for t in studies["final"]["resnet10t:adamw"].trials]
    assert row["balanced_acc"] == pytest.approx(np.mean([100 - a["balanced_err"] for a in finals]))
    assert row["recall"] == pytest.approx(np.mean([a["recall"] for a in finals], axis=0).tolist())
    md = (tmp_path / "results" / "bal.md").read_text()
    assert "final balanced_err %" in md and "balanced acc %" in md and "recall per class %" in md
    assert "| floor: logistic regression on pixels (C=0.1) | | | 40.25 |" in md  # the floor in the same metric


def test_a_diverged_trial_counts_as_the_worst(tmp_path):
    # fake_run diverges above lr 0.5: half of a linear space up to 1 does
    argv = toy_args(
        tmp_path, "--space", "lr=1e-3:1:linear", "--study", "div", configs=3, seeds=1, arms="resnet10t:adamw"
    )
    rc, out = run_quietly([*argv, "--min-epochs", "9"])
    assert rc == 0, out
    trials = load(tmp_path, "div")["rung0"]["resnet10t:adamw"].trials
    diverged = [t for t in trials if "diverged" in t.user_attrs]
    assert diverged and all(t.value == 100.0 and t.state.name == "COMPLETE" for t in diverged)
    row = json.loads((tmp_path / "results" / "div.json").read_text())["rows"][0]
    assert row["diverged"] == len(diverged)


def test_ties_go_to_the_lower_slot(tmp_path):
    # every point diverges (fake_run: lr above 0.5), so every first-rung value ties at 100 %
    argv = toy_args(
        tmp_path, "--space", "lr=0.6:0.9:linear", "--study", "ties", configs=3, seeds=1, arms="resnet10t:adamw"
    )
    rc, out = run_quietly([*argv, "--min-epochs", "3"])
    assert rc == 0, out
    studies = load(tmp_path, "ties")
    assert {t.value for t in studies["rung0"]["resnet10t:adamw"].trials} == {100.0}
    assert sorted(complete(studies["rung1"]["resnet10t:adamw"])) == [0]
    (final,) = studies["final"]["resnet10t:adamw"].trials
    assert final.user_attrs["from_slot"] == 0


def test_space_none_trains_the_recipe_untuned(tmp_path):
    CALLS.clear()
    argv = toy_args(
        tmp_path, "--space", "none", "--study", "fixed", seeds=2, arms="zoo_vit_mini_32:adamw,resnet10t:adamw"
    )
    assert run_quietly(argv)[0] == 0
    assert sorted(c.name for c in CALLS) == ["final-seed1", "final-seed1", "final-seed2", "final-seed2"]
    assert {c.train.epochs for c in CALLS} == {9}
    assert math.isnan(json.loads((tmp_path / "results" / "fixed.json").read_text())["bar"])


def test_a_table_from_two_code_versions_lists_them(tmp_path, monkeypatch):
    argv = toy_args(tmp_path, "--study", "mixed", "--min-epochs", "9", configs=3, seeds=2, arms="resnet10t:adamw")
    assert run_quietly([*argv, "--max-trials", "2"])[0] == 0  # two trials under this code, then a commit
    monkeypatch.setattr("zoo.study.provenance.code_version", lambda: "git:0ther")
    rc, out = run_quietly(argv)
    data = json.loads((tmp_path / "results" / "mixed.json").read_text())
    assert rc == 0 and len(data["code_versions"]) == 2 and "git:0ther" in data["code_versions"]
    assert [t["code"] for t in data["trials"]].count("git:0ther") == 3  # one tuning run, two finals
    assert f"trials from 2 code versions: {', '.join(data['code_versions'])}." in out
