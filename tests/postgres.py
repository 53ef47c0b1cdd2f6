"""A throwaway PostgreSQL server for tests: initdb + pg_ctl in a temporary directory, unix socket only.

    with postgres_server() as url:   # postgresql+psycopg2://zoo@/zoo?host=DIR&port=PORT
        ...

``initdb`` refuses to run as root, so under root the server runs as the ``postgres`` system user
(``runuser``) in a directory it owns; no TCP port is opened (``listen_addresses=''``), the port
only names the socket file. Stopped (``pg_ctl stop -m fast``) and removed at the end.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def pg_bindir() -> Path | None:
    """Where initdb and pg_ctl are: ``pg_config --bindir``, PATH, or Debian's /usr/lib/postgresql/N/bin."""
    candidates = []
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10, check=False)
        candidates.append(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).resolve().parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


@contextmanager
def postgres_server(db: str = "zoo") -> Iterator[str]:
    bindir = pg_bindir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL's initdb not found (pg_config --bindir, PATH, /usr/lib/postgresql/*/bin)")
    root = os.geteuid() == 0
    # Not pytest's tmp_path: its parents are private to root, and the server runs as postgres.
    d = Path(tempfile.mkdtemp(prefix="zoo-pg-"))
    as_pg = ["runuser", "-u", "postgres", "--"] if root else []
    if root:
        shutil.chown(d, "postgres", "postgres")
    port = random.randint(20000, 60000)

    def pg(tool: str, *args: str) -> None:
        out = subprocess.run(
            [*as_pg, str(bindir / tool), *args], capture_output=True, text=True, timeout=120, check=False
        )
        if out.returncode:
            log = (d / "log").read_text()[-2000:] if (d / "log").is_file() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()} {log}")

    started = False
    try:
        pg("initdb", "-D", str(d / "data"), "-A", "trust", "-U", "zoo", "--no-sync", "-E", "UTF8")
        pg(
            "pg_ctl",
            "-D",
            str(d / "data"),
            "-o",
            f"-k {d} -p {port} -c listen_addresses='' -c fsync=off",
            "-l",
            str(d / "log"),
            "-w",
            "start",
        )
        started = True
        createdb = (
            bindir / "createdb" if (bindir / "createdb").is_file() else Path(shutil.which("createdb") or "createdb")
        )
        out = subprocess.run(
            [str(createdb), "-h", str(d), "-p", str(port), "-U", "zoo", db],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if out.returncode:
            raise RuntimeError(f"createdb failed: {out.stderr.strip()}")
        yield f"postgresql+psycopg2://zoo@/{db}?host={d}&port={port}"
    finally:
        if started:
            subprocess.run(
                [*as_pg, str(bindir / "pg_ctl"), "-D", str(d / "data"), "-m", "fast", "-w", "stop"],
                capture_output=True,
                timeout=120,
                check=False,
            )
        shutil.rmtree(d, ignore_errors=True)
