"""Run the README's commands as a new user does: a fresh clone, a new environment, the command as written.

``first-run`` and ``suite`` time the README's two commands this way, so the figures the README shows
for them come from a run of exactly those commands, not from a developer's warm checkout.

What "fresh" means here (and what it does not):

- **a fresh clone** of one commit (``git clone`` of this repository, then that commit checked out)
  in a new temporary folder: no ``runs/``, no build leftovers, no uncommitted edits;
- **a new virtual environment** made with ``--system-site-packages``: the command's ``pip install``
  installs the zoo itself (editable, into the venv, which then imports the clone's ``zoo``) but
  finds every dependency already installed, so nothing is downloaded (the machines here reach no
  network) and the time measured is the install a user with torch/timm already installed sees,
  not a download of torch. A venv gets pip only when the command calls pip (a toy command in a test
  saves the seconds of bootstrapping it);
- the command runs through ``bash -c`` in the clone, with the venv first on ``PATH`` and
  ``PYTHONPATH`` set to the clone alone, so that nothing of the checkout that started it leaks in:
  a console script the venv did not get (``pytest`` is already installed, so the venv's pip adds
  no ``pytest`` of its own) is the system's, whose Python would otherwise import the ``zoo`` of
  the checkout installed there; afterwards the venv is asked where it imports ``zoo`` from, and a
  run that did not import the clone is refused.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from zoo.bench.report import REPO

FENCE = re.compile(r"^```[\w-]*\n(?P<body>.*?)^```", re.DOTALL | re.MULTILINE)


class FreshRunError(RuntimeError):
    """A fresh run that could not be set up or did not do what it measures (one line, exit code 2)."""


@dataclass(frozen=True)
class Checkout:
    root: Path  # the clone
    venv: Path
    commit: str  # the short hash checked out


@dataclass(frozen=True)
class Timed:
    command: str
    returncode: int
    wall_s: float
    output: str  # stdout and stderr, interleaved as printed


def readme_commands(readme: Path) -> list[str]:
    """The commands of the README's first fenced code block (the project's two commands: train the
    default model, run the tests), one per non-empty line."""
    text = readme.read_text()
    m = FENCE.search(text)
    if m is None:
        raise FreshRunError(f"{readme}: no fenced code block; expected the two commands at the top")
    commands = [line.strip() for line in m["body"].splitlines() if line.strip() and not line.startswith("#")]
    if len(commands) < 2:
        raise FreshRunError(f"{readme}: the first code block holds {len(commands)} command(s); expected the two")
    return commands


def _git(*args: str, cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise FreshRunError(f"git {' '.join(args)} in {cwd}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


@contextmanager
def fresh_checkout(source: Path = REPO, ref: str = "HEAD", *, keep: bool = False) -> Iterator[Checkout]:
    """A clone of ``source`` at ``ref`` in a temporary folder removed afterwards unless ``keep``;
    ``make_venv`` then makes its venv."""
    sha = _git("rev-parse", "--verify", f"{ref}^{{commit}}", cwd=source)
    tmp = Path(tempfile.mkdtemp(prefix="zoo-fresh-"))
    try:
        root, venv = tmp / "checkout", tmp / "venv"
        _git("clone", "--quiet", str(source), str(root), cwd=tmp)
        _git("checkout", "--quiet", "--detach", sha, cwd=root)
        yield Checkout(root=root, venv=venv, commit=_git("rev-parse", "--short", "HEAD", cwd=root))
    finally:
        if keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def make_venv(checkout: Checkout, with_pip: bool) -> None:
    """The clone's venv: this Python's, seeing its installed packages; pip only when asked."""
    cmd = [sys.executable, "-m", "venv", "--system-site-packages", *([] if with_pip else ["--without-pip"])]
    proc = subprocess.run([*cmd, str(checkout.venv)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise FreshRunError(f"python -m venv {checkout.venv}: {proc.stderr.strip()}")


def uses_pip(command: str) -> bool:
    return re.search(r"(^|[\s;&|(])pip3?\s|-m pip\b", command) is not None


def _env(checkout: Checkout) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["VIRTUAL_ENV"] = str(checkout.venv)
    env["PYTHONPATH"] = str(checkout.root)  # the clone's zoo for every Python the command starts
    env["PATH"] = f"{checkout.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_timed(checkout: Checkout, command: str, timeout: float | None = None, echo: bool = True) -> Timed:
    """Run ``command`` in the clone with the venv active; wall time from start to exit. The output is
    echoed to stderr as it comes (``echo``) and returned."""
    lines: list[str] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["bash", "-c", command],
        cwd=checkout.root,
        env=_env(checkout),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    watchdog = threading.Timer(timeout, proc.kill) if timeout is not None else None
    if watchdog is not None:  # kills a command that hangs without printing, too
        watchdog.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if echo:
                sys.stderr.write(line)
        rc = proc.wait()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    wall = time.perf_counter() - t0
    if timeout is not None and wall >= timeout:
        raise FreshRunError(f"{command!r}: stopped after {timeout:.0f} s (--timeout)")
    return Timed(command=command, returncode=rc, wall_s=wall, output="".join(lines))


def check_imports_clone(checkout: Checkout, installed: bool, package: str = "zoo") -> Path:
    """Where the venv's Python imports ``package`` from; a path outside the clone means the run
    measured another checkout. ``installed`` (the command ran pip): asked from outside the clone, so
    the answer is the venv's installed package, as pytest imports it; otherwise from the clone's
    root, as a script in it (``python train_vision.py``) imports it."""
    # where `import zoo` would load it from, without running it (torch's import alone takes seconds)
    code = f"import importlib.util as u; print(u.find_spec({package!r}).origin)"
    proc = subprocess.run(
        [str(checkout.venv / "bin" / "python"), "-c", code],
        cwd=checkout.root.parent if installed else checkout.root,
        env={k: v for k, v in _env(checkout).items() if k != "PYTHONPATH"},  # the venv's own answer
        capture_output=True,
        text=True,
        check=False,
    )
    path = Path(proc.stdout.strip()).resolve() if proc.returncode == 0 else None
    if path is None or checkout.root.resolve() not in path.parents:
        raise FreshRunError(
            f"the fresh venv imports {package} from {path or proc.stderr.strip()!s}, not the clone {checkout.root}"
        )
    return path
