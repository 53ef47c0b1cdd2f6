"""The study's state in an Optuna storage: studies, slots, rungs, claims and heartbeats.

A study is one design study (its user attr ``design``, see ``zoo.study.design``) and, per arm,
one Optuna study per rung of the bracket (``STUDY:rungK:ARM``) and a final study
(``STUDY:final:ARM``). Every trial to run is a *slot* queued in advance (``enqueue_trial`` with
its params and ``user_attrs["slot"]``, the index of its Sobol point): rung 0 queues every point,
rung k + 1 is queued only once every slot of rung k has a complete trial (the best ``1/eta``, ties
to the lower slot), the finals once the last rung is complete. Workers pop queued trials (``ask``:
atomic in the storage), so the budget is the slots, never a count that two workers could both
read as short, and every arm spends the same steps whatever the workers do.

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

import random
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

from zoo.study.design import added_arms, diff

if TYPE_CHECKING:
    from zoo.study.design import Plan

WAITING_OR_LIVE = ("WAITING", "RUNNING", "COMPLETE")


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


def saved_design(storage, name: str) -> dict | None:
    """The design stored with study ``name``, or None when the storage has no such study."""
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage).user_attrs.get("design")
    except KeyError:
        return None


class Studies:
    """The study's Optuna studies in one storage: the design, per arm its rungs and its finals."""

    def __init__(self, plan: Plan, storage):
        import optuna

        self.plan, self.storage = plan, storage
        saved = saved_design(storage, plan.study)
        # The precision is pinned when the study is created: a study resumed on another CPU kind
        # keeps its numerics (a changed --set train.precision is another design, refused below).
        plan.precision = saved["precision"] if saved else plan.resolve_precision()
        design = plan.design()
        if saved is None:
            meta = optuna.create_study(storage=storage, study_name=plan.study, load_if_exists=True)
            if "design" not in meta.user_attrs:
                meta.set_user_attr("design", design)
            saved = optuna.load_study(study_name=plan.study, storage=storage).user_attrs["design"]
        if saved != design:
            added = added_arms(saved, design)
            if added is None:
                raise DesignError(
                    f"storage: study {plan.study!r} was made with another design ({diff(saved, design)}); "
                    "use another --study or storage"
                )
            optuna.load_study(study_name=plan.study, storage=storage).set_user_attr("design", design)
            print(f"storage: study {plan.study!r}: arms added ({', '.join(added)}); the others' trials kept")
        self.design = design
        self.rungs: dict[str, list[Any]] = {a.label: [] for a in plan.arms}  # arm -> its rung studies so far
        self.final: dict[str, Any] = {}

    # ---- the studies, created in order as the bracket advances

    def _study(self, name: str, slots: dict[int, tuple[dict, dict]] | None):
        """Load or create; the creator (one process: names are unique) queues the slots."""
        import optuna

        # Every trial is queued with its params: the sampler is never asked for a point.
        kw = {"storage": self.storage, "sampler": optuna.samplers.RandomSampler(0)}
        try:
            study = optuna.create_study(study_name=name, direction="minimize", **kw)
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.load_study(study_name=name, **kw)
        if slots:
            ensure_slots(study, slots)
        return study

    def rung_slots(self, arm: str, k: int) -> dict[int, tuple[dict, dict]]:
        """Rung 0: every point. Rung k > 0: rung k - 1's best (its value, then its slot)."""
        if k == 0:
            return {n: (p, {"kind": "tune", "rung": 0}) for n, p in enumerate(self.plan.points())}
        keep = self.plan.bracket.rungs()[k][0]
        ranked = sorted(finished(self.rungs[arm][k - 1]).items(), key=lambda st: (st[1].value, st[0]))
        return {slot: (t.params, {"kind": "tune", "rung": k}) for slot, t in ranked[:keep]}

    def rung_done(self, arm: str, k: int) -> bool:
        return len(finished(self.rungs[arm][k])) >= self.plan.bracket.rungs()[k][0]

    def final_slots(self, arm: str) -> dict[int, tuple[dict, dict]]:
        if self.rungs[arm]:
            slot, best = min(finished(self.rungs[arm][-1]).items(), key=lambda st: (st[1].value, st[0]))
            params, source = best.params, {"from_slot": slot}
        else:
            params, source = {}, {}
        return {i: (params, {"kind": "final", "seed": s, **source}) for i, s in enumerate(self.plan.final_seeds())}

    def advance(self, arm: str) -> None:
        """Load or create the arm's studies up to the first unfinished rung (or its finals)."""
        label = arm
        tuned = self.plan.tuned(next(a for a in self.plan.arms if a.label == label))
        rungs = self.rungs[label]
        n = len(self.plan.bracket.rungs()) if tuned else 0
        while len(rungs) < n and (not rungs or self.rung_done(label, len(rungs) - 1)):
            k = len(rungs)
            rungs.append(self._study(f"{self.plan.study}:rung{k}:{label}", self.rung_slots(label, k)))
        if label not in self.final and len(rungs) == n and (n == 0 or self.rung_done(label, n - 1)):
            self.final[label] = self._study(f"{self.plan.study}:final:{label}", self.final_slots(label))

    def load_existing(self) -> None:
        """Load every study the storage holds for this study's arms (a report reads them; nothing queued)."""
        import optuna

        names = set(optuna.get_all_study_names(self.storage))
        kw = {"storage": self.storage, "sampler": optuna.samplers.RandomSampler(0)}
        for label, rungs in self.rungs.items():
            while f"{self.plan.study}:rung{len(rungs)}:{label}" in names:
                rungs.append(optuna.load_study(study_name=f"{self.plan.study}:rung{len(rungs)}:{label}", **kw))
            if label not in self.final and f"{self.plan.study}:final:{label}" in names:
                self.final[label] = optuna.load_study(study_name=f"{self.plan.study}:final:{label}", **kw)

    def requeue(self) -> int:
        """Queue the slots that have only failed trials, in every study loaded; how many."""
        queued = 0
        for label, rungs in self.rungs.items():
            for k, study in enumerate(rungs):
                if not self.rung_done(label, k):
                    queued += ensure_slots(study, self.rung_slots(label, k))
            if label in self.final:
                queued += ensure_slots(self.final[label], self.final_slots(label))
        return queued

    def done(self, arm: str) -> bool:
        return arm in self.final and len(finished(self.final[arm])) >= self.plan.seeds

    def jobs(self) -> list[tuple[str, int | None, Any]]:
        """(arm, rung or None for the finals, study): the lowest rung first, the finals last."""
        out = [(arm, k, s) for arm, rungs in self.rungs.items() for k, s in enumerate(rungs)]
        out.sort(key=lambda job: job[1])
        return out + [(arm, None, s) for arm, s in self.final.items()]

    def all(self) -> list:
        return [s for _, _, s in self.jobs()]


def finished(study, *states: str) -> dict[int, Any]:
    """Slot -> its first finished trial (COMPLETE unless ``states`` says)."""
    from optuna.trial import TrialState

    want = tuple(TrialState[s] for s in (states or ("COMPLETE",)))
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
                t.state == TrialState.COMPLETE
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
