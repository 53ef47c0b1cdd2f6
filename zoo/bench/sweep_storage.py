"""The sweep's state in an Optuna storage: studies, slots, claims and heartbeats.

A sweep is one design study (its user attr ``design``: arms, space, budget, epochs, data, config)
and, per arm, a tuning study and a final study. Every trial to run is a *slot* queued in advance
(``enqueue_trial`` with its params and ``user_attrs["slot"]``): the N points of the space for a
tuning study, the fresh seeds for a final one. Workers pop queued trials (``ask``: atomic in the
storage), so the budget is the slots, never a count that two workers could both read as short.

What can still go wrong, and what handles it:
* a worker dies mid-trial: its heartbeat stops, the next worker's ``fail_stale_trials`` fails the
  trial and Optuna's retry callback queues a copy (same params and slot);
* a trial raises (its worker stops) or a worker died before queuing everything: when the queue
  is empty, ``ensure_slots`` queues every slot that has no waiting, running or finished trial;
* two workers queue the same slot, or the queue empties between the look and the ``ask``:
  ``claim``/``surplus`` make every copy but the lowest-numbered one give itself up (FAIL, with
  ``user_attrs["surplus"]``), so a slot is trained once.
"""

from __future__ import annotations

import json
import random
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zoo.bench.sweep import Plan

WAITING_OR_LIVE = ("WAITING", "RUNNING", "COMPLETE", "PRUNED")


class DesignError(ValueError):
    """The storage holds this study with another design (exit 2, nothing run)."""


def open_storage(url: str, heartbeat: int, grace: int):
    """Optuna's RDBStorage (SQLite or PostgreSQL) with heartbeats and the stale-trial retry."""
    import optuna
    import sqlalchemy

    kw = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        hook = (
            {"heartbeat_stale_trial_callback": retry()}
            if retry is not None
            else {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback()}
        )
        for attempt in range(6):
            try:
                storage = optuna.storages.RDBStorage(
                    url, engine_kwargs=kw, heartbeat_interval=heartbeat, grace_period=grace, **hook
                )
                break
            except (
                sqlalchemy.exc.IntegrityError,
                sqlalchemy.exc.ProgrammingError,
                sqlalchemy.exc.OperationalError,
            ) as e:
                # Two workers creating a new storage's tables at once: one loses the race (a
                # duplicate version row or table) and finds the tables made on its next try.
                race = not isinstance(e, sqlalchemy.exc.OperationalError) or any(
                    w in str(e) for w in ("already exists", "locked")
                )
                if attempt == 5 or not race:
                    raise
                time.sleep(0.2 + random.random())
    if url.startswith("sqlite"):  # write-ahead log: readers do not wait for a writer; no fsync per commit

        @sqlalchemy.event.listens_for(storage.engine, "connect")
        def _pragmas(conn, _record) -> None:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.isolation_level = None  # transactions begin below, not in the driver

        # A deferred transaction that reads and then writes cannot wait for another writer (SQLite
        # answers "database is locked" at once instead of waiting out the busy timeout, to avoid a
        # deadlock): under load two workers hit it. Taking the write lock at BEGIN makes every
        # transaction wait its turn; trials last minutes, so serialised storage calls cost nothing.
        @sqlalchemy.event.listens_for(storage.engine, "begin")
        def _begin_immediate(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        storage.engine.dispose()
    return storage


def _diff(saved: dict, design: dict) -> str:
    for k, v in design.items():
        if saved.get(k) != v:
            return f"{k}: {json.dumps(saved.get(k))} in the storage, {json.dumps(v)} here"
    return "?"


def _added_arms(saved: dict, design: dict) -> list[str] | None:
    """The arms ``design`` adds to ``saved``, or None when it changes anything else.

    Adding arms keeps the design: every arm's budget is the same slots at the same points of the
    same space, so an arm tuned later is tuned as it would have been with the others; the stored
    arms must keep their exact recipes (config fingerprints), or their trials would mix designs.
    """
    rest = [k for k in design if k not in ("arms", "config")]
    if any(saved.get(k) != design[k] for k in rest) or set(saved) != set(design):
        return None
    if not set(saved["arms"]) <= set(design["arms"]):
        return None
    if any(saved["config"][a] != design["config"].get(a) for a in saved["arms"]):
        return None
    return [a for a in design["arms"] if a not in saved["arms"]] or None  # a reordering is not an addition


class Studies:
    """The sweep's studies in one storage: the design, a tuning and a final study per arm."""

    def __init__(self, plan: Plan, storage):
        import optuna

        self.plan, self.storage = plan, storage
        design = plan.design()
        meta = optuna.create_study(storage=storage, study_name=plan.study, load_if_exists=True)
        if "design" not in meta.user_attrs:
            meta.set_user_attr("design", design)
            meta = optuna.load_study(study_name=plan.study, storage=storage)  # a concurrent start may have won
        saved = meta.user_attrs["design"]
        if saved != design:
            added = _added_arms(saved, design)
            if added is None:
                raise DesignError(
                    f"storage: study {plan.study!r} was made with another design ("
                    f"{_diff(saved, design)}); use another --study or storage"
                )
            meta.set_user_attr("design", design)  # a concurrent worker adding the same arms writes the same
            print(f"storage: study {plan.study!r}: arms added ({', '.join(added)}); the others' trials kept")
        self.pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=plan.prune_startup, n_warmup_steps=plan.prune_after)
            if plan.prune
            else optuna.pruners.NopPruner()
        )
        self.tune = {a.label: self._study(f"{plan.study}:tune:{a.label}", self.tune_slots()) for a in plan.arms}
        self.final: dict[str, Any] = {}

    def _study(self, name: str, slots: dict[int, tuple[dict, dict]] | None):
        """Load or create; the creator (one process: names are unique) queues the slots."""
        import optuna

        # Every trial is queued with its params: the sampler is never asked for a point.
        kw = {"storage": self.storage, "pruner": self.pruner, "sampler": optuna.samplers.RandomSampler(0)}
        try:
            study = optuna.create_study(study_name=name, direction="minimize", **kw)
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.load_study(study_name=name, **kw)
        if slots:
            ensure_slots(study, slots)
        return study

    def tune_slots(self) -> dict[int, tuple[dict, dict]]:
        return {n: (p, {"kind": "tune"}) for n, p in enumerate(self.plan.points())}

    def final_slots(self, arm: str) -> dict[int, tuple[dict, dict]] | None:
        best = min(
            finished(self.tune[arm], "COMPLETE").values(), key=lambda t: (t.value, t.user_attrs["slot"]), default=None
        )
        if best is None:
            return None
        return {
            i: (best.params, {"kind": "final", "seed": s, "from_trial": best.user_attrs["slot"]})
            for i, s in enumerate(self.plan.final_seeds())
        }

    def tune_done(self, arm: str) -> bool:
        return len(finished(self.tune[arm])) >= self.plan.trials

    def final_study(self, arm: str):
        if arm not in self.final and self.tune_done(arm):
            self.final[arm] = self._study(f"{self.plan.study}:final:{arm}", self.final_slots(arm))
        return self.final.get(arm)

    def all(self) -> list:
        return [*self.tune.values(), *self.final.values()]


def finished(study, *states: str) -> dict[int, Any]:
    """Slot -> its first finished trial (COMPLETE or PRUNED unless ``states`` says)."""
    from optuna.trial import TrialState

    want = tuple(TrialState[s] for s in (states or ("COMPLETE", "PRUNED")))
    out: dict[int, Any] = {}
    for t in study.get_trials(deepcopy=False, states=want):
        out.setdefault(t.user_attrs.get("slot"), t)
    out.pop(None, None)
    return out


def ensure_slots(study, slots: dict[int, tuple[dict, dict]]) -> int:
    """Queue every slot that has no waiting, running or finished trial (new, or only failed)."""
    from optuna.trial import TrialState

    live = {
        t.user_attrs.get("slot")
        for t in study.get_trials(deepcopy=False, states=tuple(TrialState[s] for s in WAITING_OR_LIVE))
    }
    missing = [n for n in slots if n not in live]
    for n in missing:
        params, attrs = slots[n]
        study.enqueue_trial(params, user_attrs={"slot": n, **attrs})
    return len(missing)


def claim(study, storage=None):
    """Take the next queued trial of ``study``: the trial, None (nothing queued) or False (the
    claim gave itself up, see ``surplus``; look again)."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return None
    with warnings.catch_warnings():  # "Heartbeat ... supposed to be used with Study.optimize": Heartbeat below
        warnings.simplefilter("ignore", UserWarning)
        trial = study.ask()
    if storage is not None:
        storage.record_heartbeat(trial._trial_id)
    reason = surplus(study, trial.number, trial.user_attrs.get("slot"))
    if reason is None:
        return trial
    trial.set_user_attr("surplus", reason)
    study.tell(trial, state=TrialState.FAIL)
    return False


def surplus(study, number: int, slot: int | None) -> str | None:
    """Why running trial ``number`` must give itself up, or None. A fresh trial has no slot (the
    queue emptied between the look and the ask); a slot is finished, or held by a lower-numbered
    waiting or running copy (two workers queued the same failed slot). Of concurrent copies of a
    slot only the lowest-numbered one runs, in any interleaving of the claims: a higher copy's
    check sees the lower one (created before it) waiting, running or failed."""
    from optuna.trial import TrialState

    if slot is None:
        return "the queue emptied before ask()"
    for t in study.get_trials(deepcopy=False):
        if (
            t.number != number
            and t.user_attrs.get("slot") == slot
            and (
                t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                or (t.state in (TrialState.WAITING, TrialState.RUNNING) and t.number < number)
            )
        ):
            return f"slot {slot} is held by trial {t.number}"
    return None


class Heartbeat:
    """Tells the storage this worker is alive while its trial trains (Optuna does the same in optimize)."""

    def __init__(self, storage, trial):
        self.storage, self.trial_id, self.stop_event = storage, trial._trial_id, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop_event.wait(self.storage.heartbeat_interval):
            self.storage.record_heartbeat(self.trial_id)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join()
