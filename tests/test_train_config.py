"""Strict configs: unknown keys, wrong types and out-of-range values are one-line errors naming the key."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.scheduler import CosineLRScheduler

import zoo
from zoo.train import ConfigError, TrainConfig, config_to_yaml, load_config
from zoo.train.optim import create_optimizer, lr_at, peak_lr
from zoo.train.strict import from_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _error(*overrides: str, path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg, "config errors are one line"
    return msg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lrr=1e-3", "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("lr=1e-3", "unknown key 'lr' (did you mean 'optim.lr'?)"),
        ("aug.mixupp=0.2", "unknown key 'aug.mixupp' (did you mean 'aug.mixup'?)"),
        ("data.datset=mnist5k", "unknown key 'data.datset' (did you mean 'data.dataset'?)"),
        ("optim.lr=fast", "optim.lr: expected float or null"),
        ("train.epochs=2.5", "train.epochs: expected int, got float 2.5"),
        ("train.epochs=true", "train.epochs: expected int, got bool True"),
        ("ema.enabled=1", "ema.enabled: expected bool, got int 1"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 items"),
        ("optim.lr=-1", "optim.lr: -1.0 is out of range (must be > 0)"),
        ("train.batch_size=0", "train.batch_size: 0 is out of range (must be >= 1); nearest valid value: 1"),
        ("ema.decay=1.5", "ema.decay: 1.5 is out of range (must be >= 0 and < 1)"),
        ("schedule.name=cosin", "schedule.name: 'cosin' is not one of 'cosine', 'constant' (did you mean 'cosine'?)"),
        ("train.precision=fp8", "train.precision: 'fp8' is not one of 'auto', 'fp32', 'bf16', 'fp16'"),
        ("aug.hflip=2", "aug.hflip: must be in [0, 1]"),  # the data side's validate(), prefixed
        ("data.num_workers=-1", "data.num_workers: must be >= 0"),
        ("optim.lr.x=1", "'optim.lr' is a value, not a section"),
        ("optim=3", "optim: expected a mapping"),
        ("distill.type=hard", "distill.teacher: distill.type 'hard' needs"),
        ("no_equals_sign", "is not of the form key.sub=value"),
    ],
)
def test_config_errors_name_the_key(override, expected):
    assert expected in _error(override)


def test_float_written_without_a_dot_is_accepted():
    # PyYAML (YAML 1.1) reads `5e-4` as a string; a float field takes it anyway.
    assert load_config(None, ["optim.lr=5e-4"]).optim.lr == 5e-4


def test_unknown_key_in_a_file_and_base_inheritance(tmp_path):
    (tmp_path / "child.yaml").write_text(
        f"base: {ROOT / 'configs' / 'mnist5k_poolformer.yaml'}\nname: child\ntrain:\n  epochs: 3\n"
    )
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.name, cfg.train.epochs, cfg.model.name) == ("child", 3, "zoo_poolformer_mini_32")
    assert cfg.train.batch_size == load_config(None).train.batch_size  # inherited
    (tmp_path / "bad.yaml").write_text("optim:\n  weight_decai: 0.1\n")
    assert "unknown key 'optim.weight_decai' (did you mean 'optim.weight_decay'?)" in _error(path=tmp_path / "bad.yaml")
    assert "config file not found" in _error(path=tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["optim.betas=[0.8, 0.9]", "debug.nan_at_steps=[3, 4]", "model.spec={mlp_ratio: 2}"])
    (tmp_path / "resolved.yaml").write_text(config_to_yaml(cfg))
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert isinstance(cfg.aug.scale, tuple) and cfg.optim.betas == (0.8, 0.9)


def test_from_dict_defaults_and_missing_sections():
    cfg = from_dict(TrainConfig, {})
    assert cfg == TrainConfig()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_strictly(path):
    cfg = load_config(path)
    assert cfg.model.name in zoo.list_models(baselines=True)
    assert cfg.name == path.stem, "run name = config file name, so runs/<name> says which config made it"


def test_deit_recipe_is_deits_defaults():
    cfg = load_config(ROOT / "configs" / "deit_small_imagenet.yaml")
    assert cfg.optim.name == "adamw" and cfg.optim.base_lr == 5e-4 and cfg.optim.lr_base_batch == 512
    assert cfg.optim.lr is None and math.isclose(peak_lr(cfg), 5e-4 * cfg.train.batch_size / 512)
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.no_decay_on_1d and cfg.optim.clip_grad is None
    s = cfg.schedule
    assert (s.name, s.update, s.warmup_epochs, s.warmup_lr, s.min_lr) == ("cosine", "epoch", 5, 1e-6, 1e-5)
    assert cfg.model.drop_path_rate == 0.1 and cfg.train.epochs == 300
    a = cfg.aug
    assert (a.label_smoothing, a.mixup, a.cutmix, a.rand_augment, a.re_prob) == (
        0.1,
        0.8,
        1.0,
        "rand-m9-mstd0.5-inc1",
        0.25,
    )
    assert cfg.data.repeated_aug == 3
    assert cfg.ema.enabled and cfg.ema.decay == 0.99996


def test_lr_schedule_matches_timm_cosine_per_epoch():
    cfg = load_config(ROOT / "configs" / "deit_small_imagenet.yaml")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak_lr(cfg))
    sched = CosineLRScheduler(
        opt,
        t_initial=cfg.train.epochs,
        lr_min=cfg.schedule.min_lr,
        warmup_lr_init=cfg.schedule.warmup_lr,
        warmup_t=int(cfg.schedule.warmup_epochs),
    )
    steps_per_epoch = 7
    for epoch in [0, 1, 4, 5, 6, 150, 299]:
        expected = sched._get_lr(epoch)[0]
        for step in (epoch * steps_per_epoch, epoch * steps_per_epoch + 6):  # constant within the epoch
            assert math.isclose(lr_at(step, steps_per_epoch, cfg), expected, rel_tol=1e-12)


def test_no_weight_decay_on_norms_biases_tokens_and_position_embeddings():
    cfg = load_config(None, ["model.name=zoo_deit_mini_distilled_32"])
    model = zoo.create_model(cfg.model.name, num_classes=10)
    opt = create_optimizer(model, cfg)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert {"cls_token", "dist_token"} <= {n.rsplit(".", 1)[-1] for n in names}
    assert any("pos_embed" in n for n in names)
    assert all(
        p.ndim <= 1 or any(t in n for t in ("token", "pos_embed"))
        for n, p in model.named_parameters()
        if id(p) in no_decay
    )
    assert any(g["weight_decay"] == cfg.optim.weight_decay for g in opt.param_groups)


def test_cli_config_error_is_one_line_exit_2():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "train_vision.py", "optim.lrr=0.1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.strip() == "config error: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"
    assert "Traceback" not in p.stderr and p.stdout == ""
