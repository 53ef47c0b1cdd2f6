"""What produced a trial: code version, library versions, machine, precision, threads.

Stored with every trial (``user_attrs["provenance"]``) so that a table built from trials of more
than one code version, or more than one machine, can say so.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@functools.cache
def code_version() -> str:
    """``git:COMMIT`` (+ ``-dirty`` when tracked files differ from it) in a checkout, else
    ``zoo==VERSION`` as installed."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0 and head.stdout.strip():
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=30,
            )
            return f"git:{head.stdout.strip()}" + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"zoo=={version('zoo')}"
    except PackageNotFoundError:
        return "unknown"


@functools.cache
def _software_and_machine() -> dict[str, Any]:
    import optuna

    from zoo.machine import describe

    machine = describe().record()
    versions = {k: machine.pop(k) for k in ("python", "torch", "timm") if k in machine}
    return {"versions": {**versions, "optuna": optuna.__version__}, "machine": machine}


def provenance(precision: str | None, threads: int | None) -> dict[str, Any]:
    """One trial's provenance (the run's own resolved precision and compute threads)."""
    return {"code": code_version(), **_software_and_machine(), "precision": precision, "threads": threads}
