"""log.trackers: the epoch metrics reach Accelerate's trackers (MLflow's local SQLite store and
TensorBoard's event files, read back with their own readers), a resumed run continues the same
MLflow run without sending an epoch twice, and a tracker that is not installed is a one-line
config error before anything is written.

Each run is CI-sized: 128 MNIST-5k images at batch 32 (4 optimizer steps an epoch), 2 epochs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zoo.train import load_config, run
from zoo.train import metrics as train_metrics
from zoo.train.checkpoint import list_checkpoints
from zoo.train.metrics import read_epochs
from zoo.train.strict import ConfigError

TINY = [
    "train.limit_train=128",
    "train.limit_val=64",
    "train.batch_size=32",
    "train.epochs=2",
    "data.num_workers=0",
    "log.progress=false",
    "log.plot=false",
    "log.tensorboard=false",
    "checkpoint.keep_last=2",
]


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [*TINY, f"output_dir={tmp_path}", "name=t", *overrides])


def _mlflow_history(run_dir: Path, key: str) -> tuple[list[str], list[tuple[int, float]]]:
    """The ids of the runs in the run directory's MLflow store, and ``key``'s (step, value) history
    of the only one, read with MLflow's client API."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'trackers' / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("t")
    runs = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(runs[0].info.run_id, key) if len(runs) == 1 else []
    return [r.info.run_id for r in runs], sorted((m.step, m.value) for m in history)


def test_mlflow_and_tensorboard_get_the_epoch_metrics(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = run(_cfg(tmp_path, "log.trackers=[mlflow,tensorboard]"))
    records = read_epochs(res.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [4, 8]

    run_ids, history = _mlflow_history(res.run_dir, "val_top1")
    assert len(run_ids) == 1
    assert history == [(r["step"], pytest.approx(r["val_top1"])) for r in records]
    _, loss = _mlflow_history(res.run_dir, "train_loss")
    assert loss == [(r["step"], pytest.approx(r["train_loss"])) for r in records]
    from mlflow.tracking import MlflowClient

    params = MlflowClient(f"sqlite:///{(res.run_dir / 'trackers' / 'mlflow.db').resolve()}").get_run(run_ids[0])
    assert params.data.params["train.batch_size"] == "32" and params.data.params["model.name"] == res.summary.split()[1]

    events = sorted((res.run_dir / "trackers" / "t").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under <run>/trackers/t"
    acc = EventAccumulator(str(events[0].parent)).Reload()
    scalars = [(e.step, e.value) for e in acc.Scalars("val_top1")]
    assert scalars == [(r["step"], pytest.approx(r["val_top1"], abs=1e-4)) for r in records]
    assert not (tmp_path / "mlruns").exists() and not Path("mlruns").exists()  # nothing outside the run


def test_resume_continues_the_mlflow_run_without_sending_an_epoch_twice(tmp_path):
    pytest.importorskip("mlflow")
    cfg = _cfg(tmp_path, "log.trackers=[mlflow]")
    first = run(cfg)
    run_ids, before = _mlflow_history(first.run_dir, "val_top1")
    # Resume from the first epoch's checkpoint: epoch 2 is trained again, as after a kill between
    # its log record and its checkpoint; the trackers already have it.
    epoch1 = list_checkpoints(first.run_dir / "checkpoints")[0]
    again = run(cfg, resume=str(epoch1))
    run_ids_after, after = _mlflow_history(again.run_dir, "val_top1")
    assert run_ids_after == run_ids  # the same MLflow run, continued
    assert [step for step, _ in after] == [4, 8]  # no step twice
    # and what the trackers hold is what the resumed run measured (resume is exact)
    assert after == before == [(r["step"], r["val_top1"]) for r in read_epochs(again.run_dir / "metrics.jsonl")]


def test_a_tracker_not_installed_is_a_config_error_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(train_metrics.TRACKERS, "mlflow", (lambda: False, "mlflow"))
    with pytest.raises(ConfigError) as e:
        run(_cfg(tmp_path, "log.trackers=[tensorboard,mlflow]"))
    message = str(e.value)
    assert "\n" not in message and "log.trackers" in message and "'mlflow'" in message
    assert "pip install mlflow" in message
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[mlfow]", "log.trackers[0]: 'mlfow' is not one of 'tensorboard', 'mlflow', 'wandb' (did you mean 'mlflow'?)"),
        ("[comet_ml]", "log.trackers[0]: 'comet_ml' is not one of"),
        ("[mlflow,mlflow]", "log.trackers: each tracker once"),
        ("mlflow", "log.trackers: expected list"),
    ],
)
def test_trackers_are_checked_strictly(tmp_path, value, expected):
    with pytest.raises(ConfigError, match="^" + re.escape(expected)):
        _cfg(tmp_path, f"log.trackers={value}")


def test_tensorboard_is_added_softly_only_when_asked_and_installed(monkeypatch):
    from zoo.train.metrics import tracker_names

    monkeypatch.setattr(train_metrics, "is_tensorboard_available", lambda: True)
    assert tracker_names([], tensorboard=True) == ["tensorboard"]
    assert tracker_names(["mlflow", "tensorboard"], tensorboard=True) == ["mlflow", "tensorboard"]  # once
    assert tracker_names([], tensorboard=False) == []
    monkeypatch.setattr(train_metrics, "is_tensorboard_available", lambda: False)
    assert tracker_names([], tensorboard=True) == []  # the soft default never fails a run
