"""The study across workers and machines: claims, a killed worker, equal steps whatever order the
runs finish in, two workers on SQLite and on PostgreSQL, export and import.

Workers are processes running ``python -m zoo.study sweep ... --trainer study_fakes:fake_run
--no-report``; the table is then written in this process with ``study_fakes.fake_floors``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from study_fakes import CALLS, STEPS_PER_EPOCH, fake_floors, fake_run
from test_study_sweep import complete, load, run_quietly

from zoo.study import storage as study_storage
from zoo.study import sweep

REPO = Path(__file__).resolve().parents[1]
ARMS = "zoo_poolformer_mini_32:adamw,resnet10t:adamw"


def small_args(tmp: Path, *extra: str) -> list[str]:
    """Two arms, a bracket of 4 x 1 epoch -> 2 x 2 epochs, 2 final seeds."""
    return [
        "--arms",
        ARMS,
        "--configs",
        "4",
        "--eta",
        "2",
        "--min-epochs",
        "1",
        "--epochs",
        "2",
        "--seeds",
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


RUNS_PER_ARM = 4 + 2 + 2


def worker(tmp: Path, *extra: str, epoch_s: float = 0.0, jitter_s: float = 0.0) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        "FAKE_LOG": str(tmp / "fake.log"),
        "FAKE_EPOCH_S": str(epoch_s),
        "FAKE_JITTER_S": str(jitter_s),
    }
    argv = [*small_args(tmp), "--trainer", "study_fakes:fake_run", "--heartbeat", "1", "--grace", "2", "--no-report"]
    return subprocess.Popen(
        [sys.executable, "-m", "zoo.study", "sweep", *argv, *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def log_lines(tmp: Path, kind: str) -> list[str]:
    path = tmp / "fake.log"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [line.split(" ", 2)[1] for line in lines if line.startswith(kind)]


def assert_equal_steps_and_ran_once(tmp: Path, studies: dict) -> None:
    """Every slot of every rung and every final seed complete once, and each arm spent the same steps."""
    steps = {}
    for arm in ARMS.split(","):
        per_rung = []
        for k, size in ((0, 4), (1, 2)):
            done = complete(studies[f"rung{k}"][arm])
            assert len(done) == size
            per_rung.append(sum(t.user_attrs["steps"] for t in done.values()))
        assert sorted(complete(studies["final"][arm])) == [0, 1]
        steps[arm] = per_rung
    assert list(steps.values()) == [[4 * STEPS_PER_EPOCH, 2 * 2 * STEPS_PER_EPOCH]] * 2, steps
    done = log_lines(tmp, "done")
    assert len(done) == len(set(done)) == 2 * RUNS_PER_ARM  # every run finished exactly once


def test_duplicate_and_surplus_claims_give_themselves_up(tmp_path):
    import optuna

    storage = study_storage.open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=60, grace=120)
    study = optuna.create_study(storage=storage, study_name="s")
    for slot in (0, 0, 1, 1):  # two workers queued the same slots
        study.enqueue_trial({"x": 0.5}, user_attrs={"slot": slot, "kind": "tune"})
    a = study_storage.claim(study, storage)
    assert a.user_attrs["slot"] == 0
    assert study_storage.claim(study, storage) is False  # the second copy of slot 0 sees the first running
    higher = [t for t in study.get_trials() if t.state.name == "WAITING"][1]
    storage.set_trial_state_values(higher._trial_id, optuna.trial.TrialState.RUNNING)
    lower = study_storage.claim(study, storage)
    assert lower.user_attrs["slot"] == 1 and lower.number < higher.number
    assert study_storage.surplus(study, higher.number, 1) is not None
    assert study_storage.surplus(study, lower.number, 1) is None
    surplus = [t for t in study.get_trials() if "surplus" in t.user_attrs]
    assert len(surplus) == 1 and surplus[0].state.name == "FAIL"
    study.tell(a, 1.0)
    slots = {n: ({"x": 0.5}, {"kind": "tune"}) for n in range(3)}
    assert study_storage.ensure_slots(study, slots) == 1  # slot 2 only: 0 done, 1 running
    assert study_storage.ensure_slots(study, slots) == 0


def mid_trial(tmp: Path, pid: int) -> bool:
    """Whether process ``pid``'s last line in the fake log starts a run (so it trains for a while)."""
    path = tmp / "fake.log"
    mine = [line for line in (path.read_text().splitlines() if path.is_file() else []) if line.endswith(f"pid={pid}")]
    return len(mine) > 4 and mine[-1].startswith("start")


def test_equal_steps_whatever_the_order_with_a_worker_killed_mid_trial(tmp_path):
    # two workers with random epoch times: the runs finish in any order; one is killed mid-trial
    first = worker(tmp_path, epoch_s=0.6, jitter_s=0.3)
    second = worker(tmp_path, epoch_s=0.1, jitter_s=0.3)
    deadline = time.time() + 240
    while not mid_trial(tmp_path, first.pid) and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert mid_trial(tmp_path, first.pid), first.communicate(timeout=30)[0]
    first.send_signal(signal.SIGKILL)  # its trial RUNNING in the storage
    first.wait(timeout=30)
    out = second.communicate(timeout=300)[0]
    assert second.returncode == 0, out
    studies = load(tmp_path)
    killed = [t for kind in studies.values() for s in kind.values() for t in s.trials if t.state.name == "FAIL"]
    killed = [t for t in killed if "surplus" not in t.user_attrs]
    assert len(killed) == 1  # the dead worker's trial, failed by the heartbeat, then retried
    done = log_lines(tmp_path, "done")
    assert killed[0].user_attrs.get("run_dir") is None and len(done) == len(set(done))
    # the table counts it: failed 1, retried 1 for the arm it belonged to
    CALLS.clear()
    assert run_quietly([*small_args(tmp_path), "--report-only"])[0] == 0 and not CALLS
    rows = {r["arm"]: r for r in json.loads((tmp_path / "results" / "sweep_mnist5k.json").read_text())["rows"]}
    assert sorted((r["failed"], r["retried"]) for r in rows.values()) == [(0, 0), (1, 1)]
    assert [p["steps"] for p in rows["resnet10t:adamw"]["per_rung"]] == [
        p["steps"] for p in rows["zoo_poolformer_mini_32:adamw"]["per_rung"]
    ]
    assert_equal_steps_and_ran_once_allowing_the_killed(tmp_path, studies)


def assert_equal_steps_and_ran_once_allowing_the_killed(tmp: Path, studies: dict) -> None:
    steps = {
        arm: [sum(t.user_attrs["steps"] for t in complete(studies[f"rung{k}"][arm]).values()) for k in (0, 1)]
        for arm in ARMS.split(",")
    }
    assert list(steps.values()) == [[4 * STEPS_PER_EPOCH, 2 * 2 * STEPS_PER_EPOCH]] * 2, steps
    for arm in ARMS.split(","):
        assert [len(complete(studies[f"rung{k}"][arm])) for k in (0, 1)] == [4, 2]
        assert sorted(complete(studies["final"][arm])) == [0, 1]


def run_two_workers(tmp: Path, *extra: str) -> None:
    procs = [worker(tmp, *extra, epoch_s=0.05, jitter_s=0.1) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    if [p.returncode for p in procs] != [0, 0]:
        pytest.fail("a worker failed:\n" + "\n----\n".join(o[-4000:] for o in outs), pytrace=False)
    ran = [int(o.split("worker done: ")[1].split()[0]) for o in outs]
    assert sum(ran) == 2 * RUNS_PER_ARM, ran  # together, each run once


def test_two_workers_share_one_file_storage(tmp_path):
    run_two_workers(tmp_path)
    assert_equal_steps_and_ran_once(tmp_path, load(tmp_path))


@pytest.fixture
def postgres_url():
    import postgres

    if postgres.pg_bindir() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL's initdb not found under CI (.ci/run installs Debian's postgresql)")
        pytest.skip("PostgreSQL's initdb not found; apt-get install postgresql to run this test")
    with postgres.postgres_server() as url:
        yield url


def test_two_workers_share_a_postgresql_storage(tmp_path, postgres_url):
    run_two_workers(tmp_path, "--storage", postgres_url)
    assert_equal_steps_and_ran_once(tmp_path, load(tmp_path, url=postgres_url))
    assert not (tmp_path / "runs" / "sweep_mnist5k" / "study.db").exists()


def test_export_then_import_into_a_fresh_run_folder_finishes_the_study(tmp_path, capsys):
    import optuna

    here, there = tmp_path / "here", tmp_path / "there"
    CALLS.clear()
    assert run_quietly([*small_args(here), "--max-trials", "5"])[0] == 0  # part of the study
    assert len(CALLS) == 5 and not (here / "results").exists()
    url = f"sqlite:///{here / 'runs' / 'sweep_mnist5k' / 'study.db'}"
    waiting = optuna.load_study(study_name="sweep_mnist5k:rung0:resnet10t:adamw", storage=url)
    running = waiting.ask()  # a trial another worker is training when the file is written
    exported = tmp_path / "study_export.db"
    rc, out = run_quietly([*small_args(here), "--export", str(exported)])
    assert rc == 0 and f"to {exported}" in out and len(CALLS) == 5
    # a fresh clone elsewhere: another run folder, nothing but the exported file
    CALLS.clear()
    rc, out = run_quietly([*small_args(there), "--import", str(exported)])
    assert rc == 0, out
    assert "1 interrupted" in out
    assert len(CALLS) == 2 * RUNS_PER_ARM - 5  # the finished trials are kept, the rest run here
    studies = load(there)
    assert_equal_steps_and_ran_once_allowing_the_killed(there, studies)
    moved = [t for t in studies["rung0"]["resnet10t:adamw"].trials if "interrupted" in t.user_attrs]
    assert len(moved) == 1 and moved[0].state.name == "FAIL" and moved[0].number == running.number
    row = next(
        r
        for r in json.loads((there / "results" / "sweep_mnist5k.json").read_text())["rows"]
        if r["arm"] == "resnet10t:adamw"
    )
    assert (row["failed"], row["retried"]) == (1, 1)
    # refused, one line, exit 2: an import into a storage that holds the study; another design
    assert sweep.main([*small_args(there), "--import", str(exported)], train_fn=fake_run, floors_fn=fake_floors) == 2
    assert "already holds study" in capsys.readouterr().err
    other = tmp_path / "other"
    argv = [*small_args(other), "--epochs", "4", "--import", str(exported)]
    assert sweep.main(argv, train_fn=fake_run, floors_fn=fake_floors) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another design" in err and "bracket" in err, err
    assert not other.exists()  # refused before any storage or folder was made
