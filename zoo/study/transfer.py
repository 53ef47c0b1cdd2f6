"""Studies that outlive a machine: ``--export FILE`` and ``--import FILE``.

The export is a SQLite file holding the study's Optuna studies (the design, every rung's and the
finals' trials with their values, params and attributes), copied with ``optuna.copy_study``. Why
SQLite rather than Optuna's JournalStorage: it is the format of the default storage, so the file
is itself a storage (``--storage sqlite:///FILE`` works on it), ``copy_study`` moves it into
PostgreSQL as easily, and ``sqlite3`` reads it anywhere. It holds only what resuming needs: the
run folders (checkpoints, logs) stay behind, so on the new machine an unfinished trial starts
over, while a finished one is kept and never trained again.

On import, a trial that was running when the file was written (its worker is on the old machine,
or dead) is failed, marked ``interrupted``, and its slot queued again: it is counted in the
table's failed and retried trials like a killed worker's.
"""

from __future__ import annotations

import os
from pathlib import Path

from zoo.study.storage import saved_design


def study_names(storage, study: str) -> list[str]:
    """The design study and every rung's and final study of ``study`` in ``storage``."""
    import optuna

    return [n for n in optuna.get_all_study_names(storage) if n == study or n.startswith(study + ":")]


def export_study(storage, study: str, path: Path) -> int:
    """Write ``study``'s Optuna studies to the SQLite file ``path`` (replaced atomically); how many trials."""
    import optuna

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    url = f"sqlite:///{tmp.resolve()}"
    for name in study_names(storage, study):
        optuna.copy_study(from_study_name=name, from_storage=storage, to_storage=url)
    trials = sum(len(optuna.load_study(study_name=n, storage=url).trials) for n in study_names(url, study))
    os.replace(tmp, path)
    return trials


def read_design(path: Path, study: str) -> dict | None:
    """The design stored in an export file (None: the file holds no such study)."""
    return saved_design(f"sqlite:///{path.resolve()}", study)


def import_study(path: Path, storage, study: str) -> tuple[int, int]:
    """Copy ``study`` from the export ``path`` into ``storage`` (which must not hold it yet); fail
    the trials that were running. (trials copied, trials interrupted)."""
    import optuna
    from optuna.trial import TrialState

    url = f"sqlite:///{path.resolve()}"
    copied = interrupted = 0
    for name in study_names(url, study):
        optuna.copy_study(from_study_name=name, from_storage=url, to_storage=storage)
        target = optuna.load_study(study_name=name, storage=storage)
        for t in target.get_trials(deepcopy=False):
            copied += 1
            if t.state == TrialState.RUNNING:
                storage.set_trial_user_attr(t._trial_id, "interrupted", f"running when {path.name} was exported")
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                interrupted += 1
    return copied, interrupted
