"""optuna-dashboard opens a zoo study's SQLite storage as it is: started on a toy study named and
queued the way the zoo's sweep does it (zoo.study.storage), it lists the study's trials, checked
in its JSON API and, as a user sees them, in headless Chromium.

    optuna-dashboard sqlite:///runs/STUDY/study.db      # then open http://127.0.0.1:8080/

Chromium is Debian's ``chromium`` (.ci/run installs it where missing); without it the browser
check skips, except under CI (CI=true), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("optuna_dashboard")

STUDY = "toy"
ARM = "zoo_poolformer_mini_32:adamw"  # an arm label as zoo.study.arms writes it: model:optimizer
RUNG = f"{STUDY}:rung0:{ARM}"  # zoo.study.storage.Studies names an arm's rung k "STUDY:rungK:ARM"
ERRORS = (12.5, 7.25, 30.0)  # the toy trials' validation errors (%), made up for the test


def _toy_study(path: Path) -> str:
    """A study in the zoo's layout: the design study, one rung study whose slots are queued with
    zoo.study.storage.ensure_slots, each trial claimed and told its error, as a worker does."""
    import optuna

    from zoo.study.storage import ensure_slots, open_storage

    url = f"sqlite:///{path.resolve()}"
    storage = open_storage(url, heartbeat=60, grace=120)
    optuna.create_study(storage=storage, study_name=STUDY).set_user_attr("design", {"arms": [ARM]})
    rung = optuna.create_study(
        study_name=RUNG, direction="minimize", storage=storage, sampler=optuna.samplers.RandomSampler(0)
    )
    lrs = [1e-3, 1e-4, 1e-5]
    ensure_slots(rung, {n: ({"optim.lr": lr}, {"kind": "tune", "rung": 0}) for n, lr in enumerate(lrs)})
    space = {"optim.lr": optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True)}
    for err in ERRORS:
        rung.tell(rung.ask(space), err)
    return url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """``optuna-dashboard sqlite:///DIR/study.db`` on a free loopback port: (base URL, the rung study's id)."""
    storage = _toy_study(tmp_path_factory.mktemp("study") / "study.db")
    command = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or shutil.which(
        "optuna-dashboard"
    )
    assert command, "optuna-dashboard's command is not installed beside this Python (pip install optuna-dashboard)"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [command, storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                studies = _get_json(f"{base}/api/studies")["study_summaries"]
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if server.poll() is not None or time.time() > deadline:
                    server.kill()
                    pytest.fail(f"optuna-dashboard did not answer on {base}: {server.communicate()[0][-2000:]}")
                time.sleep(0.5)
        yield base, {s["study_name"]: s["study_id"] for s in studies}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_the_api_lists_the_zoo_study_and_its_trials(dashboard):
    base, ids = dashboard
    assert set(ids) == {STUDY, RUNG}
    detail = _get_json(f"{base}/api/studies/{ids[RUNG]}?after=0")
    trials = sorted(detail["trials"], key=lambda t: t["number"])
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert [t["state"] for t in trials] == ["Complete"] * 3
    assert [t["values"] for t in trials] == [[e] for e in ERRORS]
    assert [{a["key"]: a["value"] for a in t["user_attrs"]}["slot"] for t in trials] == ["0", "1", "2"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI") == "true":
        pytest.fail("chromium not found under CI (.ci/run installs Debian's chromium)")
    pytest.skip(
        "chromium not found (chromium, chromium-browser, google-chrome); apt-get install chromium to run this test"
    )


def _rendered(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran: headless Chromium, virtual time to let the app fetch and render."""
    done = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",  # as root, Chromium refuses to start with its sandbox
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=20000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_chromium_shows_the_zoo_study_and_its_trials(dashboard, tmp_path):
    base, ids = dashboard
    home = _rendered(f"{base}/dashboard", tmp_path / "profile")
    for name in (STUDY, RUNG):  # each study's card: "ID. NAME"
        assert f">{ids[name]}. {name}</h5>" in home, name
    page = _rendered(f"{base}/dashboard/studies/{ids[RUNG]}/trials", tmp_path / "profile")
    for number in range(len(ERRORS)):
        assert f"Trial {number}" in page
    assert "Trial 3" not in page
    assert "7.25" in page  # the best trial's value is shown
