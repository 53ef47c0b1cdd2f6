"""timm's own model test-suite on the zoo's models (issue 18, item 7): tests/timm_suite/run.sh fetches
tests/ from the sdist of the installed timm with pip, patches its conftest to ``import zoo`` (with
our exclusions, each with its reason, in patch_suite.py) and runs ``pytest -k zoo_`` on its
test_models.py. Slow (tens of minutes on a small CPU): ``pytest -m slow tests/test_timm_suite.py``.
run.sh records its summary line as a results file (zoo/bench/results/timm_suite*.md, shown in
docs/reliability.md); this test points it at a temporary folder, as tests write no results."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

RUN = Path(__file__).parent / "timm_suite" / "run.sh"


@pytest.mark.slow
def test_timm_model_suite_passes_on_every_zoo_model(tmp_path):
    env = {**os.environ, "TIMM_SUITE_RESULTS": str(tmp_path)}
    proc = subprocess.run([str(RUN)], capture_output=True, text=True, env=env)
    out = proc.stdout + proc.stderr
    if proc.returncode == 2 and "could not fetch" in proc.stderr:  # run.sh's exit for a failed pip download
        pytest.skip(f"timm's sdist could not be fetched with pip (offline?): {proc.stderr.strip().splitlines()[-1]}")
    summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    assert summary, f"run.sh (exit {proc.returncode}) printed no pytest summary:\n{out[-4000:]}"
    last = summary[-1]
    assert proc.returncode == 0 and not re.search(r"\d+ (failed|errors?)\b", last), f"{last}\n{out[-8000:]}"
    assert re.search(r"[1-9]\d* passed", last), last
    assert (tmp_path / "timm_suite.md").is_file(), "run.sh recorded no results file"
