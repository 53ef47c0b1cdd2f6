"""``first-run`` and ``suite`` at toy size: a toy repository whose README's two commands are a fake
training run and a three-test pytest run, cloned fresh, run in a new venv, results in tmp_path."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from zoo.bench import first_run, fresh, suite

FAKE_TRAIN = """\
import json, pathlib, time
run = pathlib.Path("runs/toy")
run.mkdir(parents=True)
(run / "config.yaml").write_text("model:\\n  name: toy_model\\ndata:\\n  dataset: toyset\\n")
with open(run / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"machine": {}, "precision": "fp32", "threads": 1}) + "\\n")
    for epoch, top1 in ((1, 50.0), (2, 87.5)):
        f.write(json.dumps({"epoch": epoch, "val_top1": top1}) + "\\n")
time.sleep(0.2)
print("done: toy_model toyset 2 epochs top1 87.5% (best 87.5% @ epoch 2) 7 s")
"""

TOY_TESTS = """\
import pytest

def test_a(): pass
def test_b(): pass
def test_c(): pytest.skip("toy")
"""


def make_repo(root: Path, commands: list[str], with_package: bool = True) -> Path:
    root.mkdir()
    (root / "README.md").write_text("# toy\n\n```bash\n" + "\n".join(commands) + "\n```\n\nmore text\n")
    (root / "train_vision.py").write_text(FAKE_TRAIN)
    (root / "tests").mkdir()
    (root / "tests" / "test_toy.py").write_text(TOY_TESTS)
    if with_package:  # the clone's own `zoo`, which the venv must import
        (root / "zoo").mkdir()
        (root / "zoo" / "__init__.py").write_text("")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "toy"]):
        subprocess.run([*git, *args], cwd=root, check=True, capture_output=True)
    return root


TOY_COMMANDS = ['python -c "print(1)" && python train_vision.py', "python -m pytest -q -p no:cacheprovider tests"]


def test_readme_commands_are_the_first_fenced_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\n```bash\npip install -e . && python train_vision.py\n\npytest\n```\n\n```\nnot this\n```\n"
    )
    assert fresh.readme_commands(readme) == ["pip install -e . && python train_vision.py", "pytest"]
    # and this repository's README opens with its two commands, as written
    ours = fresh.readme_commands(Path(__file__).parents[1] / "README.md")
    assert ours[:2] == ["pip install -e . && python train_vision.py", 'pip install -e ".[dev]" && pytest']
    assert fresh.uses_pip(ours[0]) and fresh.uses_pip("python -m pip install x") and not fresh.uses_pip("pytest")
    readme.write_text("# x\n\n```bash\npytest\n```\n")
    with pytest.raises(fresh.FreshRunError, match="expected the two"):
        fresh.readme_commands(readme)


def test_a_command_past_its_timeout_is_stopped(tmp_path):
    src = make_repo(tmp_path / "src", TOY_COMMANDS)
    with fresh.fresh_checkout(src) as checkout:
        fresh.make_venv(checkout, with_pip=False)
        with pytest.raises(fresh.FreshRunError, match="stopped after"):
            fresh.run_timed(checkout, "sleep 30", timeout=0.5, echo=False)  # silent: the watchdog stops it


def test_first_run_times_the_readme_command_in_a_fresh_clone(tmp_path, capsys):
    src = make_repo(tmp_path / "src", TOY_COMMANDS)
    (src / "uncommitted.txt").write_text("not in the clone")
    res = tmp_path / "res"
    assert first_run.main(["--source", str(src), "--results", str(res)]) == 0
    data = json.loads((res / "first_run.json").read_text())
    (row,) = data["rows"]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True).stdout
    assert row["command"] == TOY_COMMANDS[0] and row["commit"] == data["commit"] == head.strip()
    assert (row["model"], row["dataset"], row["epochs"], row["top1"]) == ("toy_model", "toyset", 2, 87.5)
    assert row["train_s"] == 7.0 and 0.2 < row["wall_s"] < 60  # the fake sleeps 0.2 s; the done: line says 7
    assert (row["precision"], row["threads"]) == ("fp32", 1)
    md = (res / "first_run.md").read_text()
    assert "top-1 87.5 %" in md and f"Machine: {data['cpu_model']}" in md and "`python -m zoo.bench first-run" in md
    assert "1 compute thread)" in md
    assert not (src / "runs").exists()  # the run happened in the clone, which is gone
    assert "first_run" not in capsys.readouterr().err


def test_first_run_refuses_a_failed_command(tmp_path, capsys):
    src = make_repo(tmp_path / "src", ["python -c 'raise SystemExit(3)'", "true"])
    assert first_run.main(["--source", str(src), "--results", str(tmp_path / "res")]) == 2
    assert "exited with 3" in capsys.readouterr().err and not (tmp_path / "res").exists()


def test_suite_records_pytest_summary_from_a_fresh_clone(tmp_path):
    src = make_repo(tmp_path / "src", TOY_COMMANDS)
    res = tmp_path / "res"
    assert suite.main(["--source", str(src), "--results", str(res)]) == 0
    data = json.loads((res / "suite.json").read_text())
    (row,) = data["rows"]
    assert (row["passed"], row["skipped"], row["failed"], row["returncode"]) == (2, 1, 0, 0)
    assert row["command"] == TOY_COMMANDS[1] and row["wall_s"] >= row["pytest_s"] > 0
    md = (res / "suite.md").read_text()
    assert "2 passed, 1 skipped in" in md and "Machine:" in md


def test_the_venv_must_import_the_clone(tmp_path):
    src = make_repo(tmp_path / "src", TOY_COMMANDS, with_package=False)
    with fresh.fresh_checkout(src) as checkout:
        fresh.make_venv(checkout, with_pip=False)
        with pytest.raises(fresh.FreshRunError, match="not the clone"):
            fresh.check_imports_clone(checkout, installed=False)  # finds this checkout's zoo, not a clone's
    src = make_repo(tmp_path / "with_zoo", TOY_COMMANDS)
    with fresh.fresh_checkout(src) as checkout:
        fresh.make_venv(checkout, with_pip=False)
        assert checkout.root in fresh.check_imports_clone(checkout, installed=False).parents
        with pytest.raises(fresh.FreshRunError, match="not the clone"):  # nothing installed it into the venv
            fresh.check_imports_clone(checkout, installed=True)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("1,098 passed, 1 skipped, 1 xfailed in 436.12s (0:07:16)", {"passed": 1098, "skipped": 1, "xfailed": 1}),
        (
            "==== 12 failed, 514 passed, 17941 deselected, 73 warnings in 6892.91s (1:54:52) ====",
            {"failed": 12, "passed": 514, "deselected": 17941, "warnings": 73},
        ),
        ("= 1 failed, 2 passed, 1 error in 0.50s =", {"failed": 1, "passed": 2, "errors": 1}),
    ],
)
def test_parse_summary(line, expected):
    out = textwrap.dedent(f"""\
        tests/test_x.py ..F
        some line with 3 passed words but no time
        {line}
        """)
    got = suite.parse_summary(suite.summary_line(out))
    assert {k: v for k, v in got.items() if v and k != "pytest_s"} == expected
    assert got["pytest_s"] == float(line.split(" in ")[1].split("s")[0])


def test_suite_from_log_records_a_finished_run(tmp_path, capsys):
    log = tmp_path / "log"
    log.write_text("....\n110 passed, 18348 deselected, 23 warnings in 174.01s (0:02:54)\n")
    res = tmp_path / "res"
    argv = ["--from-log", str(log), "--label", 'tests/timm_suite/run.sh -k "zoo_ and mini"', "--results", str(res)]
    assert suite.main(argv) == 0
    data = json.loads((res / "timm_suite.json").read_text())
    assert data["rows"][0]["passed"] == 110 and data["rows"][0]["deselected"] == 110 + 18238
    assert '`tests/timm_suite/run.sh -k "zoo_ and mini"`' in (res / "timm_suite.md").read_text()
    log.write_text("interrupted\n")
    assert suite.main(argv) == 2 and "no pytest summary line" in capsys.readouterr().err
