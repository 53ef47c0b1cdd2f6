"""The equal-budget sweep at toy size: budgets, points, splits, robustness, resume, workers, storages.

Most tests train through ``fake_run``, a stand-in for ``zoo.train.run`` (the sweep's ``train_fn``
seam; ``--trainer test_bench_sweep:fake_run`` in a worker process): its error is a smooth
function of lr and weight decay that falls with the epochs, it resumes from its own state file,
and it logs every start and finish so that a test can count what ran. One test trains real runs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from zoo.bench import report, sweep, sweep_storage, sweep_table
from zoo.bench.sweep_table import TrialRow
from zoo.train import RunResult, config_to_yaml

REPO = Path(__file__).resolve().parents[1]
ARMS = "zoo_poolformer_mini_32:adamw,resnet10t:adamw"
CALLS: list = []  # every config fake_run trained in this process


def fake_run(cfg, resume=None, on_epoch=None):
    """zoo.train.run's contract without the training: per-epoch records, checkpoint-and-resume, early stop."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    state = run_dir / "state.json"
    start, err = (0, 90.0)
    if resume == "auto" and state.is_file():
        saved = json.loads(state.read_text())
        start, err = saved["epoch"], saved["err"]
    CALLS.append(cfg)
    log = os.environ.get("FAKE_LOG")

    def note(line: str) -> None:
        if log:
            with open(log, "a") as f:
                f.write(line + "\n")

    note(f"start {run_dir} {start}")
    base = 3 + 6 * (math.log10(cfg.optim.lr) + 2.5) ** 2 + 2 * abs(math.log10(cfg.optim.weight_decay) + 1.5)
    base += (3 if cfg.model.name.startswith("resnet") else 0) + 0.2 * (cfg.seed % 5)
    stopped, epoch = None, start
    for epoch in range(start + 1, cfg.train.epochs + 1):
        time.sleep(float(os.environ.get("FAKE_EPOCH_S", "0")))
        err = min(95.0, base + 30 / epoch)
        state.write_text(json.dumps({"epoch": epoch, "err": err}))  # the checkpoint, before on_epoch as in run()
        note(f"epoch {run_dir} {epoch}")
        if on_epoch is not None and on_epoch({"epoch": epoch, "val_err1": err, "val_top1": 100 - err}):
            stopped = "on_epoch"
            break
    note(f"done {run_dir}")
    return RunResult(
        summary="fake",
        run_dir=run_dir,
        top1=100 - err,
        best_top1=100 - err,
        best_epoch=epoch,
        ema_top1=None,
        epochs_done=epoch,
        steps=0,
        wall_s=0.01,
        stopped_by=stopped,
    )


def toy_args(tmp: Path, *extra: str, trials: int = 5, seeds: int = 2, epochs: int = 3) -> list[str]:
    return [
        "--arms",
        ARMS,
        "--trials",
        str(trials),
        "--seeds",
        str(seeds),
        "--epochs",
        str(epochs),
        "--prune-startup",
        "2",
        "--runs",
        str(tmp / "runs"),
        "--results",
        str(tmp / "results"),
        "--poll",
        "0.2",
        "--set",
        "data.num_workers=0",
        *extra,
    ]


def load(tmp: Path, url: str | None = None, study: str = "sweep_mnist5k"):
    """The sweep's studies, read back from the storage: {kind: {arm: study}}."""
    import optuna

    url = url or f"sqlite:///{tmp / 'runs' / study / 'study.db'}"
    names = optuna.get_all_study_names(url)
    out: dict[str, dict] = {"tune": {}, "final": {}}
    for name in names:
        if name.count(":tune:") or name.count(":final:"):
            _, kind, arm = name.split(":", 2)
            out[kind][arm] = optuna.load_study(study_name=name, storage=url)
    return out


def finished_once(study) -> dict[int, object]:
    """Slot -> its one COMPLETE/PRUNED trial; fails if a slot finished twice."""
    done = [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
    slots = [t.user_attrs["slot"] for t in done]
    assert len(slots) == len(set(slots)), f"a slot finished twice: {sorted(slots)}"
    return {t.user_attrs["slot"]: t for t in done}


# ---------------------------------------------------------------- statistics on hand-made lists


def test_wilson_interval_is_scipys():
    for k, n in [(0, 10), (3, 6), (255, 2200), (7, 7)]:
        ci = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert sweep_table.wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert sweep_table.wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert all(math.isnan(x) for x in sweep_table.wilson(0, 0))


def hand_made() -> list[TrialRow]:
    errs = [1.0, 2.0, 2.5, 3.0, 9.0]
    rows = [TrialRow("a", "tune", i, "complete", e, e, {"lr": 10.0**-i}, epochs_done=4) for i, e in enumerate(errs)]
    # pruned below the bar at its last epoch: still not counted as reaching it
    rows.append(TrialRow("a", "tune", 5, "pruned", None, 1.5, {"lr": 1e-6}, epochs_done=1))
    rows += [
        TrialRow("b", "tune", i, "complete", e, e, {"lr": 10.0**-i}, epochs_done=4)
        for i, e in enumerate([2.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    ]
    rows += [TrialRow("a", "final", i, "complete", e, e, seed=i + 1) for i, e in enumerate([1.1, 1.3, 1.2])]
    rows += [TrialRow("b", "final", i, "complete", e, e, seed=i + 1) for i, e in enumerate([2.1, 2.6, 2.2])]
    return rows


def test_robustness_counts_pruned_trials_as_not_reaching_the_bar():
    rows = hand_made()
    bar, why = sweep_table.default_bar(rows, ["b"])
    assert bar == 3.0 and "b, 2.00 %" in why  # the baseline's best tuning error + 1 point
    assert sweep_table.robustness([r for r in rows if r.arm == "a"], bar) == (4, 6)  # 1, 2, 2.5, 3; not the pruned 1.5
    table = {r["arm"]: r for r in sweep_table.summarise(rows, ["a", "b"], "b", bar, budget=6, seeds=3, epochs=4)}
    a = table["a"]
    assert (a["robust_k"], a["robust_n"]) == (4, 6)
    assert (a["robust_lo"], a["robust_hi"]) == pytest.approx(sweep_table.wilson(4, 6))
    assert a["median_trial_err"] == pytest.approx(statistics.median([1.0, 2.0, 2.5, 3.0, 9.0, 1.5]))
    assert (a["trials_complete"], a["trials_pruned"], a["epochs_saved"]) == (5, 1, 3)
    assert a["best_tuning_err"] == 1.0 and a["best_config"] == "lr=1"
    assert a["final_err"] == pytest.approx(1.2) and a["final_seeds"] == 3 and a["complete"]
    welch = stats.ttest_ind([1.1, 1.3, 1.2], [2.1, 2.6, 2.2], equal_var=False).confidence_interval(0.95)
    assert a["diff_vs_baseline"] == pytest.approx(1.2 - 2.3)
    assert a["diff_ci95"] == pytest.approx((welch.high - welch.low) / 2)
    assert (table["b"]["robust_k"], table["b"]["robust_n"]) == (1, 6)
    md = sweep_table.markdown(list(table.values()), "b", bar, ["note"])
    assert "| a | 0.00 | lr=1 | 1.00 | 1.20 ± " in md and "| 4/6 = 67 % (30 %-90 %) |" in md
    assert "| baseline |" in md and "6 (5/1)" in md


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing run


@pytest.mark.parametrize(
    "args, says",
    [
        (["--arms", "zoo_poolfromer_mini_32:adamw,resnet10t:adamw"], "zoo_poolfromer_mini_32"),
        (["--arms", "zoo_poolformer_mini_32:adamx,resnet10t:adamw"], "adamx"),
        (["--arms", "zoo_poolformer_mini_32:adamw:token_mixr=identity,resnet10t:adamw"], "token_mixr"),
        (["--arms", "zoo_poolformer_mini_32,resnet10t:adamw"], "MODEL:OPTIMIZER"),
        (["--arms", "zoo_poolformer_mini_32:adamw"], "no ResNet arm"),
        (["--space", "lr=1e-2:1e-4:log"], "inverted"),
        (["--space", "lr=1e-3:1e-3"], "empty"),
        (["--space", "lr=0:1e-3:log"], "above 0"),
        (["--space", "optim.lrr=1e-4:1e-3"], "lrr"),
        (["--trials", "2", "--seeds", "3"], "below the 3 seeds"),
        (["--set", "optim.lr=0.1"], "set by the sweep"),
        (["--data", "/no/such/folder"], "/no/such/folder"),
    ],
)
def test_bad_input_exits_2_with_one_line_before_any_run(tmp_path, capsys, args, says):
    base = [
        "--arms",
        ARMS,
        "--trials",
        "3",
        "--seeds",
        "2",
        "--runs",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "results"),
    ]
    CALLS.clear()
    assert sweep.main(base + args, train_fn=fake_run) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("zoo.bench sweep: ") and says in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists() and not CALLS


# ---------------------------------------------------------------- one fake sweep, inspected by several tests


@pytest.fixture(scope="module")
def fake_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    CALLS.clear()
    argv = toy_args(tmp)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert sweep.main(argv, train_fn=fake_run) == 0
    return {"tmp": tmp, "argv": argv, "calls": list(CALLS), "out": out.getvalue()}


def test_every_arm_gets_the_same_budget_at_the_same_points(fake_sweep):
    tmp = fake_sweep["tmp"]
    studies = load(tmp)
    _, plan = sweep.parse(fake_sweep["argv"])
    assert sorted(studies["tune"]) == sorted(ARMS.split(","))
    points = {}
    for arm, study in studies["tune"].items():
        done = finished_once(study)
        assert sorted(done) == list(range(5))  # the whole budget, each slot once
        points[arm] = [[d.unit(done[n].params[d.name]) for d in plan.dims] for n in range(5)]
    a, b = points.values()
    assert a == b  # the same normalised points, slot by slot
    from scipy.stats import qmc

    with pytest.warns(UserWarning, match="power of 2"):
        sobol = qmc.Sobol(2, scramble=True, rng=0).random(5)
    assert np.allclose(a, sobol, atol=1e-3)  # the scrambled Sobol points (params kept to 4 digits)
    assert len({tuple(p) for p in a}) == 5


def test_the_reported_split_is_never_tuned_on(fake_sweep):
    tune = [c for c in fake_sweep["calls"] if c.name.startswith("trial-")]
    final = [c for c in fake_sweep["calls"] if c.name.startswith("final-")]
    assert len(tune) == 2 * 5 and len(final) == 2 * 2
    assert {c.data.holdout for c in tune} == {0.2} and {c.seed for c in tune} == {0}
    assert {c.data.holdout for c in final} == {0.0} and {c.seed for c in final} == {1, 2}  # fresh seeds
    studies = load(fake_sweep["tmp"])
    for arm, study in studies["tune"].items():
        best = min((t for t in finished_once(study).values() if t.state.name == "COMPLETE"), key=lambda t: t.value)
        for c in (c for c in final if f"{c.model.name}:{c.optim.name}" == arm):
            assert (c.optim.lr, c.optim.weight_decay) == pytest.approx((best.params["lr"], best.params["weight_decay"]))
    # With a holdout the validation images are training images: the dataset's own val split is not read.
    from zoo.data import create_dataset

    held = create_dataset(tune[0].data, "val", None)
    train = create_dataset(final[0].data, "train", None)
    own_val = create_dataset(final[0].data, "val", None)

    def digest(ds) -> set[bytes]:
        return {np.asarray(ds[i][0]).tobytes() for i in range(len(ds))}

    assert digest(held) <= digest(train) and len(held) == 0.2 * len(train)
    assert digest(own_val) - digest(train)  # the reported split holds images tuning never saw


def test_pruning_is_on_by_default_and_its_saving_printed(fake_sweep):
    studies = load(fake_sweep["tmp"])
    pruned = [t for s in studies["tune"].values() for t in finished_once(s).values() if t.state.name == "PRUNED"]
    assert pruned, "the toy sweep should prune"
    assert all(t.user_attrs["epochs_done"] < 3 for t in pruned)  # never at the last epoch: that saves nothing
    saved = sum(3 - t.user_attrs["epochs_done"] for t in pruned)
    assert f"saved {saved} of 30 tuning epochs" in fake_sweep["out"]
    assert "A pruned trial counts as not reaching the bar" in fake_sweep["out"]
    data = json.loads((fake_sweep["tmp"] / "results" / "sweep_mnist5k.json").read_text())
    assert data["epochs_saved"] == saved
    for row in data["rows"]:  # pruned trials are in n, never in k
        trials = finished_once(studies["tune"][row["arm"]]).values()
        assert row["trials_pruned"] == sum(t.state.name == "PRUNED" for t in trials) and row["robust_n"] == 5
        assert row["robust_k"] == sum(t.state.name == "COMPLETE" and t.value <= data["bar"] for t in trials)


def test_results_files_and_the_readme_round_trip(fake_sweep, tmp_path):
    res = fake_sweep["tmp"] / "results"
    md = (res / "sweep_mnist5k.md").read_text()
    assert md.startswith("| arm | params (M) |") and md in fake_sweep["out"]
    with open(res / "sweep_mnist5k.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["arm"] for r in rows] == ARMS.split(",") and list(rows[0]) == sweep_table.COLUMNS
    data = json.loads((res / "sweep_mnist5k.json").read_text())
    for key in ("command", "commit", "date", "cpu_model", "cpu_capability", "threads", "design", "trials"):
        assert data[key] not in (None, ""), key
    assert {"torch", "timm", "optuna"} <= set(data["versions"])
    assert data["command"].startswith("python -m zoo.bench sweep --arms")
    assert data["design"]["space"] == ["lr=0.0001:0.01:log", "weight_decay=0.001:0.3:log"]
    assert (res / "sweep_mnist5k_sensitivity.png").stat().st_size > 0
    assert (res / "sweep_mnist5k_trials.png").stat().st_size > 0
    # README blocks are copied from the results files, and checked against them
    readme = tmp_path / "README.md"
    readme.write_text("# t\n\n<!-- results:sweep_mnist5k -->\nstale | table\n<!-- /results -->\n\nafter\n")
    assert report.sync_readme(readme, res, check=True) == ["sweep_mnist5k"]
    assert report.main(["--readme", str(readme), "--results", str(res), "--check"]) == 1
    assert report.sync_readme(readme, res) == ["sweep_mnist5k"]
    assert report.readme_blocks(readme.read_text()) == {"sweep_mnist5k": md}
    assert readme.read_text().endswith("<!-- /results -->\n\nafter\n")
    assert report.main(["--readme", str(readme), "--results", str(res), "--check"]) == 0
    assert report.sync_readme(readme, res) == []  # idempotent


def test_a_storage_with_another_design_is_refused(fake_sweep, capsys):
    tmp = fake_sweep["tmp"]
    before = sorted(p for p in (tmp / "runs").rglob("*") if p.is_dir())
    trials = {a: len(s.get_trials()) for a, s in load(tmp)["tune"].items()}
    for argv, says in (
        (toy_args(tmp, "--space", "lr=1e-3:1e-1:log"), "space"),
        (toy_args(tmp, epochs=4), "epochs"),
        (toy_args(tmp, "--set", "train.batch_size=32"), "sets"),
        ([*toy_args(tmp), "--arms", "zoo_vit_mini_32:adamw,resnet10t:adamw"], "arms"),
    ):
        assert sweep.main(argv, train_fn=fake_run) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "another design" in err and says in err, err
    assert sorted(p for p in (tmp / "runs").rglob("*") if p.is_dir()) == before
    assert {a: len(s.get_trials()) for a, s in load(tmp)["tune"].items()} == trials
    # the same command resumes: nothing left to run, the same table
    md = (tmp / "results" / "sweep_mnist5k.md").read_text()
    n = len(CALLS)
    assert sweep.main(fake_sweep["argv"], train_fn=fake_run) == 0
    assert sweep.main([*fake_sweep["argv"], "--report-only"], train_fn=fake_run) == 0
    assert len(CALLS) == n and (tmp / "results" / "sweep_mnist5k.md").read_text() == md


def test_arms_added_to_a_study_keep_its_trials_and_get_the_same_budget(tmp_path, capsys):
    argv = toy_args(tmp_path, trials=4, seeds=1)
    assert sweep.main(argv, train_fn=fake_run) == 0
    before = {a: sorted(t.number for t in s.get_trials()) for a, s in load(tmp_path)["tune"].items()}
    CALLS.clear()
    wider = [*argv, "--arms", ARMS + ",zoo_cvt_mini_32:adamw"]
    assert sweep.main(wider, train_fn=fake_run) == 0
    assert "arms added (zoo_cvt_mini_32:adamw)" in capsys.readouterr().out
    assert {c.model.name for c in CALLS} == {"zoo_cvt_mini_32"}  # only the new arm trained
    assert len(CALLS) == 4 + 1  # its whole budget: 4 tuning slots and 1 final seed
    studies = load(tmp_path)["tune"]
    assert {a: sorted(t.number for t in studies[a].get_trials()) for a in before} == before
    new = finished_once(studies["zoo_cvt_mini_32:adamw"])
    old = finished_once(studies["resnet10t:adamw"])
    assert [new[n].params for n in range(4)] == [old[n].params for n in range(4)]  # the same points
    table = (tmp_path / "results" / "sweep_mnist5k.md").read_text()
    assert all(f"| {a} |" in table for a in [*ARMS.split(","), "zoo_cvt_mini_32:adamw"])
    # the narrower command is now another design; a changed recipe for a stored arm too
    for args, says in ((argv, "arms"), ([*wider, "--set", "train.batch_size=32"], "sets")):
        assert sweep.main(args, train_fn=fake_run) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "another design" in err and says in err, err


def test_the_readme_blocks_match_their_results_files():
    blocks = report.readme_blocks((REPO / "README.md").read_text())
    for name, body in blocks.items():
        path = report.RESULTS / f"{name}.md"
        assert path.is_file(), f"README block {name!r} has no results file {path}"
        assert body == path.read_text(), f"README block {name!r} differs from {path}: run python -m zoo.bench readme"


# ---------------------------------------------------------------- claims: a slot runs once


def test_duplicate_and_surplus_claims_give_themselves_up(tmp_path):
    import optuna

    storage = sweep_storage.open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=60, grace=120)
    study = optuna.create_study(storage=storage, study_name="s")
    for slot in (0, 0, 1, 1):  # two workers queued the same slots
        study.enqueue_trial({"x": 0.5}, user_attrs={"slot": slot, "kind": "tune"})
    a = sweep_storage.claim(study, storage)
    assert a.user_attrs["slot"] == 0
    assert sweep_storage.claim(study, storage) is False  # the second copy of slot 0 sees the first running
    # slot 1: the higher copy was popped first by another worker (not yet checked), then ours pops the lower one
    higher = [t for t in study.get_trials() if t.state.name == "WAITING"][1]
    storage.set_trial_state_values(higher._trial_id, optuna.trial.TrialState.RUNNING)
    lower = sweep_storage.claim(study, storage)
    assert lower.user_attrs["slot"] == 1 and lower.number < higher.number
    assert sweep_storage.surplus(study, higher.number, 1) is not None  # the other worker's check gives up
    assert sweep_storage.surplus(study, lower.number, 1) is None  # ours keeps it: exactly one runs
    # the queue empties between the look and the ask: the fresh trial has no slot and gives up
    real = study.get_trials
    study.get_trials = lambda deepcopy=True, states=None: real(deepcopy, None) if states else real(deepcopy, states)
    assert sweep_storage.claim(study, storage) is False
    study.get_trials = real
    surplus = [t for t in study.get_trials() if "surplus" in t.user_attrs]
    assert len(surplus) == 2 and all(t.state.name == "FAIL" for t in surplus)
    # an empty queue re-queues only slots with nothing waiting, running or finished
    study.tell(a, 1.0)
    slots = {0: ({"x": 0.5}, {"kind": "tune"}), 1: ({"x": 0.5}, {"kind": "tune"}), 2: ({"x": 0.5}, {"kind": "tune"})}
    assert sweep_storage.ensure_slots(study, slots) == 1  # slot 2 only
    assert sweep_storage.ensure_slots(study, slots) == 0


# ---------------------------------------------------------------- worker processes


def worker(tmp: Path, *extra: str, epoch_s: float = 0.0, **kw) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        "FAKE_LOG": str(tmp / "fake.log"),
        "FAKE_EPOCH_S": str(epoch_s),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zoo.bench",
            "sweep",
            *toy_args(tmp, **kw),
            "--trainer",
            "test_bench_sweep:fake_run",
            "--heartbeat",
            "1",
            "--grace",
            "2",
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def log_lines(tmp: Path, kind: str) -> list[str]:
    path = tmp / "fake.log"
    return (
        [line.split(" ", 2)[1] for line in path.read_text().splitlines() if line.startswith(kind)]
        if path.is_file()
        else []
    )


def assert_ran_once(tmp: Path, studies: dict, trials: int, seeds: int) -> None:
    for arm in ARMS.split(","):
        assert sorted(finished_once(studies["tune"][arm])) == list(range(trials))
        final = finished_once(studies["final"][arm])
        assert sorted(final) == list(range(seeds)) and all(t.state.name == "COMPLETE" for t in final.values())
    done = log_lines(tmp, "done")
    assert len(done) == len(set(done)) == 2 * (trials + seeds)  # every run finished exactly once


def test_a_worker_killed_mid_trial_is_recovered_on_restart(tmp_path):
    first = worker(tmp_path, "--no-report", epoch_s=0.5, trials=2, seeds=1, epochs=2)
    deadline = time.time() + 120
    while not log_lines(tmp_path, "epoch") and time.time() < deadline:
        time.sleep(0.1)
    assert log_lines(tmp_path, "epoch"), first.communicate(timeout=30)[0]
    first.send_signal(signal.SIGKILL)  # mid-trial: one epoch checkpointed, the trial RUNNING in the storage
    first.wait(timeout=30)
    killed = log_lines(tmp_path, "start")[-1]
    second = worker(tmp_path, epoch_s=0.5, trials=2, seeds=1, epochs=2)
    out = second.communicate(timeout=240)[0]
    assert second.returncode == 0, out
    studies = load(tmp_path)
    assert_ran_once(tmp_path, studies, trials=2, seeds=1)
    failed = [t for s in studies["tune"].values() for t in s.get_trials() if t.state.name == "FAIL"]
    assert len(failed) == 1 and "surplus" not in failed[0].user_attrs  # the dead worker's trial, failed by heartbeat
    starts = [line for line in (tmp_path / "fake.log").read_text().splitlines() if line.startswith(f"start {killed} ")]
    assert len(starts) == 2 and starts[0] == f"start {killed} 0"
    assert starts[1] in (f"start {killed} 1", f"start {killed} 2")  # retried, resuming from its checkpoint
    assert "| zoo_poolformer_mini_32:adamw |" in out


def run_two_workers(tmp: Path, *extra: str) -> None:
    procs = [
        worker(tmp, *extra, "--no-prune", "--no-report", epoch_s=0.1, trials=4, seeds=2, epochs=2) for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    if [p.returncode for p in procs] != [0, 0]:
        pytest.fail("a worker failed:\n" + "\n----\n".join(o[-4000:] for o in outs), pytrace=False)
    ran = [int(o.split("worker done: ")[1].split()[0]) for o in outs]
    assert sum(ran) == 2 * (4 + 2), ran  # together, each run once


def test_two_workers_share_one_file_storage(tmp_path):
    run_two_workers(tmp_path)
    assert_ran_once(tmp_path, load(tmp_path), trials=4, seeds=2)


@pytest.fixture
def postgres_url():
    import postgres

    if postgres.pg_bindir() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL's initdb not found under CI (.ci/run installs Debian's postgresql)")
        pytest.skip(
            "PostgreSQL's initdb not found (pg_config --bindir, PATH, /usr/lib/postgresql/*/bin); "
            "apt-get install postgresql to run this test"
        )
    with postgres.postgres_server() as url:
        yield url


def test_two_workers_share_a_postgresql_storage(tmp_path, postgres_url):
    run_two_workers(tmp_path, "--storage", postgres_url)
    assert_ran_once(tmp_path, load(tmp_path, postgres_url), trials=4, seeds=2)
    assert not (tmp_path / "runs" / "sweep_mnist5k" / "study.db").exists()


# ---------------------------------------------------------------- real training


def test_real_training_runs_end_to_end(tmp_path, capsys):
    argv = [
        "--arms",
        ARMS,
        "--trials",
        "2",
        "--seeds",
        "2",
        "--epochs",
        "1",
        "--no-prune",
        "--runs",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "results"),
        "--study",
        "toy",
        "--set",
        "train.limit_train=64",
        "--set",
        "train.limit_val=32",
        "--set",
        "train.batch_size=16",
        "--set",
        "data.num_workers=0",
        "--set",
        "train.precision=fp32",
        "--set",
        "log.tensorboard=false",
    ]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "results" / "toy.csv") as f:
        rows = {r["arm"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(ARMS.split(","))
    for r in rows.values():
        assert r["complete"] == "True" and int(r["final_seeds"]) == 2 and int(r["trials_complete"]) == 2
        assert 0 <= float(r["final_err"]) <= 100 and float(r["wall_s"]) > 0
    assert float(rows["resnet10t:adamw"]["params_m"]) == pytest.approx(4.93, abs=0.01)
    import yaml

    for arm in ("zoo_poolformer_mini_32-adamw", "resnet10t-adamw"):
        runs = tmp_path / "runs" / "toy" / arm
        assert sorted(p.name for p in runs.iterdir()) == ["final-seed1", "final-seed2", "trial-0", "trial-1"]
        for run in runs.iterdir():
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            assert cfg["data"]["holdout"] == (0.0 if run.name.startswith("final") else 0.2)
            assert (run / "model_last.safetensors").is_file()
    assert "| resnet10t:adamw |" in out and "baseline" in out
