"""A bad config writes nothing: everything a run needs is resolved and checked before the run
directory exists, and the error is the only line printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from zoo.train import ConfigError, load_config, run

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "train.limit_train=64",
    "train.limit_val=32",
    "train.batch_size=16",
    "train.max_steps=1",
    "log.progress=false",
    "log.plot=false",
]


@pytest.mark.parametrize(
    ("override", "words"),
    [
        (
            "model.spec={token_mixer: poolng}",
            ["model: zoo_poolformer_mini_32:", "unknown token mixer 'poolng'", "(did you mean 'pooling'?)"],
        ),
        (
            "model.pretrained=/nonexistent/w.safetensors",
            ["model: zoo_poolformer_mini_32:", "/nonexistent/w.safetensors"],
        ),
        ("data.dataset=/nonexistent/images", ["data.dataset: '/nonexistent/images' is neither"]),
        (
            "model.name=zoo_poolformer_mini32",
            ["model.name: unknown model 'zoo_poolformer_mini32'", "(did you mean 'zoo_poolformer_mini_32'?)"],
        ),
    ],
)
def test_a_bad_config_creates_nothing_and_prints_only_the_error(tmp_path, capsys, override, words):
    with pytest.raises(ConfigError) as err:
        run(load_config(None, [*QUICK, f"output_dir={tmp_path / 'runs'}", "name=bad", override]))
    assert str(err.value).startswith(words[0]) and all(w in str(err.value) for w in words), str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists(), "the run directory was created before the config was checked"
    out = capsys.readouterr()
    assert out.out == "" and out.err == "", "something was printed before the error"


def test_the_cli_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train_vision.py"),
            *QUICK,
            f"output_dir={tmp_path / 'runs'}",
            "model.spec={token_mixer: poolng}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert p.returncode == 2
    (line,) = p.stderr.splitlines()
    assert line.startswith("config error: model: zoo_poolformer_mini_32:") and "(did you mean 'pooling'?)" in line
    assert p.stdout == "" and not (tmp_path / "runs").exists()


def test_a_run_says_what_it_chose_for_this_machine(tmp_path, capsys):
    run(load_config(None, [*QUICK, f"output_dir={tmp_path}", "name=ok"]))
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("machine: ") and "cores usable" in err[0]
    assert err[1].startswith("precision: ") and ("natively" in err[1] or "no native bf16" in err[1])
    assert err[2].startswith("threads: ") and "compute thread" in err[2]
    assert err[3].startswith("memory: ")  # freed memory kept for reuse (glibc), or the system's defaults


def test_a_bad_allocator_setting_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_ALLOCATOR", "jemalloc")
    with pytest.raises(ConfigError, match=r"^ZOO_ALLOCATOR='jemalloc': expected 'reuse' \(the default\) or 'system'$"):
        run(load_config(None, [*QUICK, f"output_dir={tmp_path / 'runs'}", "name=bad"]))
    assert not (tmp_path / "runs").exists()
