"""End-to-end training on tiny MNIST-5k subsets: outputs, exact resume after SIGKILL, 2 vs 1
processes, NaN skipping and the clean stop, gradient accumulation, distillation.

Each run is CI-sized (a few hundred images, a ~1 M parameter model, seconds on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import zoo
from zoo.train import TrainingStopped, load_config, run
from zoo.train.checkpoint import list_checkpoints
from zoo.train.metrics import read_epochs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

# 256 training images at global batch 32: 8 optimizer steps an epoch.
TINY = [
    "train.limit_train=256",
    "train.limit_val=128",
    "train.batch_size=32",
    "train.epochs=2",
    "data.num_workers=0",
    "log.progress=false",
    "log.plot=false",
    "checkpoint.keep_last=2",
]


def _cfg(tmp_path: Path, *overrides: str, name: str = "t", config: Path | None = None):
    return load_config(config, [*TINY, f"output_dir={tmp_path}", f"name={name}", *overrides])


def _steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def _cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train_vision.py"), *args]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_smoke_train_outputs_and_export(tmp_path, capsys):
    res = run(_cfg(tmp_path, "train.epochs=1", "log.plot=true"))
    err = capsys.readouterr().err
    # class names and counts are reported at the start (the subsets' counts: limit_train/limit_val)
    assert "train: mnist5k" in err and "256 images, 10 classes (0: " in err and "val: " in err and "128 images" in err
    d = res.run_dir
    for f in (
        "config.yaml",
        "metrics.jsonl",
        "steps.jsonl",
        "model_best.safetensors",
        "model_last.safetensors",
        "model_ema.safetensors",
        "curves.png",
    ):
        assert (d / f).is_file(), f
    header, m = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert header["machine"]["cpu_capability"] and header["precision"] in ("bf16", "fp32") and header["threads"] >= 1
    for k in ("train_loss", "val_loss", "val_top1", "val_top5", "val_err1", "lr", "img_per_s", "ema_top1"):
        assert k in m
    assert m["epoch"] == 1 and m["step"] == 8 and 0 <= m["val_top1"] <= 100
    assert res.summary.startswith("done: zoo_poolformer_mini_32 mnist5k 1 epochs top1 ")
    assert load_config(d / "config.yaml") == _cfg(tmp_path, "train.epochs=1", "log.plot=true")
    # The export carries the model name and config, and zoo.create_model loads it.
    with safe_open(str(d / "model_last.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["model"] == "zoo_poolformer_mini_32" and meta["num_classes"] == "10"
    assert yaml.safe_load(meta["config"]) == yaml.safe_load((d / "config.yaml").read_text())
    model = zoo.create_model(
        meta["model"], pretrained=str(d / "model_last.safetensors"), num_classes=int(meta["num_classes"])
    )
    ref = load_file(str(d / "model_last.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert len(list_checkpoints(d / "checkpoints")) == 1  # the epoch-end checkpoint


def test_summary_names_a_custom_spec_run():
    from zoo.train.loop import _model_label

    cfg = load_config(ROOT / "configs" / "mnist5k_mixed.yaml", [])
    assert _model_label(cfg) == "mnist5k_mixed (custom stages on zoo_poolformer_mini_32)"
    assert _model_label(load_config(None, [])) == "zoo_poolformer_mini_32"


def test_fresh_start_refuses_to_overwrite_checkpoints(tmp_path):
    cfg = _cfg(tmp_path, "train.max_steps=1")
    run(cfg)
    p = subprocess.run(
        _cli(*TINY, f"output_dir={tmp_path}", "name=t", "train.max_steps=1"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert p.returncode == 2 and "--resume auto" in p.stderr and "Traceback" not in p.stderr


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    common = ("train.precision=fp32", "model.drop_path_rate=0", "train.max_steps=4", "ema.enabled=false")
    a = run(_cfg(tmp_path, *common, name="big"))
    b = run(_cfg(tmp_path, *common, "train.micro_batch_size=8", name="accum"))  # 4 micro-batches a step
    la = [s["loss"] for s in _steps(a.run_dir)]
    lb = [s["loss"] for s in _steps(b.run_dir)]
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-6)


def test_kill_at_random_step_then_resume_is_bit_identical(tmp_path):
    """SIGKILL at a random moment (possibly mid-checkpoint), --resume auto: same final weights."""
    args = [*TINY, "checkpoint.every_steps=2", "data.num_workers=1"]  # a loader worker, as the default
    ref = subprocess.run(
        _cli(*args, f"output_dir={tmp_path / 'ref'}", "name=r"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr
    total = len(_steps(tmp_path / "ref" / "r"))
    assert total == 16

    kill_after = random.Random(time.time_ns()).randint(3, total - 1)
    print(f"killing after step {kill_after}")
    run_dir = tmp_path / "kill" / "r"
    cmd = _cli(*args, f"output_dir={tmp_path / 'kill'}", "name=r")
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        steps_file = run_dir / "steps.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            if steps_file.is_file() and len(steps_file.read_text().splitlines()) >= kill_after:
                break
            time.sleep(0.005)
        assert p.poll() is None, "the run ended before it could be killed"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    assert not (run_dir / "model_last.safetensors").exists()
    resumed = subprocess.run(
        [*cmd, "--resume", "auto"], cwd=ROOT, env=ENV, capture_output=True, text=True, check=False, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    for f in ("model_last.safetensors", "model_ema.safetensors", "model_best.safetensors"):
        _assert_same_weights(tmp_path / "ref" / "r" / f, run_dir / f)
    # The logs read as if the run had never stopped.
    ref_steps, got_steps = _steps(tmp_path / "ref" / "r"), _steps(run_dir)
    assert [s["loss"] for s in ref_steps] == [s["loss"] for s in got_steps]

    def epochs(d: Path) -> list[dict]:  # everything but the speed
        return [
            {k: v for k, v in json.loads(line).items() if k != "img_per_s"}
            for line in (d / "metrics.jsonl").read_text().splitlines()
        ]

    assert epochs(tmp_path / "ref" / "r") == epochs(run_dir)


def test_nan_steps_are_skipped_then_the_run_stops_cleanly(tmp_path):
    # Step 2 alone is skipped and training goes on; 5, 6, 7 in a row stop the run (K = 3).
    cfg = _cfg(tmp_path, "debug.nan_at_steps=[2, 5, 6, 7]", "train.max_consecutive_skips=3", "checkpoint.every_steps=4")
    with pytest.raises(TrainingStopped, match=r"3 consecutive steps with a non-finite loss .*steps 5-7"):
        run(cfg)
    d = cfg.run_dir
    skipped = [s["step"] for s in _steps(d) if s["skipped"]]
    assert skipped == [2, 5, 6, 7]
    ckpts = list_checkpoints(d / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000004", "step_00000007"]
    state = json.loads((ckpts[-1] / "loop_state.json").read_text())
    assert "consecutive" in state["stop_reason"]
    # Skipped steps changed nothing: the stop checkpoint holds the weights of the last good step.
    good, stop = load_file(str(ckpts[0] / "model.safetensors")), load_file(str(ckpts[1] / "model.safetensors"))
    assert all(torch.equal(good[k], stop[k]) and torch.isfinite(stop[k]).all() for k in good)
    _assert_same_weights(ckpts[1] / "model.safetensors", d / "model_last.safetensors")
    # The last good checkpoint loads: resuming without the injected NaNs finishes the run.
    res = run(_cfg(tmp_path, "train.max_consecutive_skips=3", "checkpoint.every_steps=4"), resume="auto")
    assert res.steps == 16 and res.epochs_done == 2


def test_two_processes_match_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU) with the same global batch gives the same losses.

    Per-sample augmentation is seeded by (seed, epoch, position), not by rank, so it is the same
    in both runs; the per-process randomness (drop path, Mixup) is switched off, since a rank
    draws it from its own generator.
    """
    args = [*TINY, "train.precision=fp32", "model.drop_path_rate=0", "aug.mixup=0", "aug.cutmix=0"]
    one = subprocess.run(
        _cli(*args, f"output_dir={tmp_path}", "name=one"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "train_vision.py"),
            *args,
            f"output_dir={tmp_path}",
            "name=two",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr
    cfg_two = tmp_path / "two" / "checkpoints"
    state = json.loads((list_checkpoints(cfg_two)[-1] / "loop_state.json").read_text())
    assert state["num_processes"] == 2
    l1 = [s["loss"] for s in _steps(tmp_path / "one")]
    l2 = [s["loss"] for s in _steps(tmp_path / "two")]
    assert len(l1) == len(l2) == 16
    assert l2 == pytest.approx(l1, rel=1e-4)
    m1, m2 = read_epochs(tmp_path / "one" / "metrics.jsonl"), read_epochs(tmp_path / "two" / "metrics.jsonl")
    assert len(m1) == len(m2) == 2
    assert [m["val_top1"] for m in m1] == pytest.approx([m["val_top1"] for m in m2], abs=0.8)  # 1 image of 128
    w1, w2 = (
        load_file(str(tmp_path / "one" / "model_last.safetensors")),
        load_file(str(tmp_path / "two" / "model_last.safetensors")),
    )
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4, msg=k)


def test_hard_distillation_from_a_teacher_checkpoint(tmp_path):
    teacher = run(_cfg(tmp_path, "train.max_steps=2", name="teacher"))
    res = run(
        _cfg(
            tmp_path,
            "model.name=zoo_deit_mini_distilled_32",
            "distill.type=hard",
            "distill.teacher=zoo_poolformer_mini_32",
            f"distill.teacher_checkpoint={teacher.run_dir / 'model_best.safetensors'}",
            "train.max_steps=2",
            name="student",
        )
    )
    assert res.steps == 2 and all(not s["skipped"] for s in _steps(res.run_dir))


MNIST_CONFIGS = sorted(p for p in (ROOT / "configs").glob("mnist5k_*.yaml") if "distill" not in p.name)


@pytest.mark.parametrize("config", MNIST_CONFIGS, ids=lambda p: p.stem)
def test_every_family_config_trains_on_mnist5k(tmp_path, config):
    """CI-sized end-to-end run of each family's small-image config: a few steps, evaluate, export."""
    cfg = _cfg(
        tmp_path,
        "train.limit_train=64",
        "train.limit_val=32",
        "train.batch_size=16",
        "train.max_steps=3",
        config=config,
    )
    res = run(cfg)
    steps = _steps(res.run_dir)
    assert len(steps) == 3 and all(not s["skipped"] and s["loss"] > 0 for s in steps)
    assert (res.run_dir / "model_last.safetensors").is_file()
    shutil.rmtree(res.run_dir)


@pytest.mark.slow
def test_default_config_reaches_98_percent(tmp_path):
    """`python train_vision.py` with no arguments: >= 98.0 % top-1 on the MNIST-5k validation split."""
    p = subprocess.run(
        _cli(f"output_dir={tmp_path}"), cwd=ROOT, env=ENV, capture_output=True, text=True, check=False, timeout=1800
    )
    assert p.returncode == 0, p.stderr[-2000:]
    summary = p.stdout.strip().splitlines()[-1]
    print(summary)
    assert summary.startswith("done: zoo_poolformer_mini_32 mnist5k 40 epochs top1 ")
    last = read_epochs(tmp_path / "mnist5k_poolformer" / "metrics.jsonl")[-1]
    assert last["val_top1"] >= 98.0
