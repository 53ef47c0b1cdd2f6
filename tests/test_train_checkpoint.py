"""Checkpoint directory rules that make a SIGKILL at any moment harmless, and the weight export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from zoo.train.checkpoint import (
    LOOP_STATE,
    clean_stale,
    export_weights,
    latest_checkpoint,
    list_checkpoints,
)
from zoo.train.metrics import read_log, topk_correct, truncate_log
from zoo.train.strict import ConfigError


def _ckpt(root, name, complete=True):
    d = root / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    if complete:
        (d / LOOP_STATE).write_text("{}")
    return d


def test_only_complete_checkpoints_count_and_leftovers_are_cleaned(tmp_path):
    _ckpt(tmp_path, "step_00000002")
    _ckpt(tmp_path, "step_00000010")
    _ckpt(tmp_path, ".tmp_step_00000012")  # killed while writing (renamed into place only when complete)
    _ckpt(tmp_path, ".trash_step_00000001")  # killed while pruning (renamed away before deletion)
    _ckpt(tmp_path, "step_00000011", complete=False)  # not ours / incomplete: ignored
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000010"]
    assert latest_checkpoint(tmp_path).name == "step_00000010"
    clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000010", "step_00000011"]
    assert latest_checkpoint(tmp_path / "missing") is None


def test_export_handles_shared_weights(tmp_path):
    class Shared(nn.Module):  # ALBERT/WideNet-style sharing: one module under two names
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = self.a

    m = Shared()
    export_weights(m, tmp_path / "w.safetensors", {"model": "shared", "num_classes": 3})
    sd = load_file(str(tmp_path / "w.safetensors"))
    assert len(sd) == 2 and {k.split(".")[1] for k in sd} == {"weight", "bias"}  # stored once
    assert torch.equal(next(v for k, v in sd.items() if k.endswith("weight")), m.a.weight.detach())
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_export_stores_widenet_shared_blocks_once_and_loads_back(tmp_path):
    import zoo

    torch.manual_seed(0)
    m = zoo.create_model("zoo_widenet_mini_32", num_classes=5).eval()
    path = tmp_path / "w.safetensors"
    export_weights(m, path, {"model": "zoo_widenet_mini_32", "num_classes": 5, "step": 3})
    full = tmp_path / "full.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}, str(full))
    assert path.stat().st_size < 0.5 * full.stat().st_size
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()  # ours, plus save_model's alias -> stored-name entries
        assert {k: meta[k] for k in ("model", "num_classes", "step")} == {
            "model": "zoo_widenet_mini_32",
            "num_classes": "5",
            "step": "3",
        }
    loaded = zoo.create_model("zoo_widenet_mini_32", num_classes=5, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)


def test_ema_checkpoint_is_safetensors_not_pickle(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from zoo.train.checkpoint import EMA_STATE, load_checkpoint, save_checkpoint

    try:
        _ema_roundtrip(Accelerator(cpu=True), tmp_path, EMA_STATE, load_checkpoint, save_checkpoint)
    finally:  # Accelerate's state is process-global: leave none behind for the in-process runs
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _ema_roundtrip(acc, tmp_path, EMA_STATE, load_checkpoint, save_checkpoint):
    ema = nn.Sequential(nn.Linear(3, 3))
    ema.add_module("again", ema[0])  # shared, as in ALBERT/WideNet
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    ckpt = save_checkpoint(acc, tmp_path, {"step": 4, "num_processes": 1}, keep_last=2, ema=ema)
    assert (ckpt / EMA_STATE).is_file()
    assert not list(ckpt.glob("custom_checkpoint_*"))
    with torch.no_grad():
        ema[0].weight.zero_()
    assert load_checkpoint(acc, ckpt, ema)["step"] == 4
    assert all(torch.equal(saved[k], v) for k, v in ema.state_dict().items())
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(b"x")  # an older zoo's pickled EMA: refused
    with pytest.raises(ConfigError, match="custom_checkpoint"):
        load_checkpoint(acc, ckpt, ema)


def test_truncate_log_drops_torn_lines_and_records_past_the_checkpoint(tmp_path):
    log = tmp_path / "steps.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert [r["step"] for r in read_log(log)] == [1, 2, 3, 4, 5]
    truncate_log(log, "step", 3)
    assert [r["step"] for r in read_log(log)] == [1, 2, 3]


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    assert topk_correct(logits, torch.tensor([1, 1, 0]), (1, 2)) == [1, 2]
    assert topk_correct(logits, torch.tensor([1, 1, 0]), (1, 5)) == [1, 3]  # k capped at the classes


def test_weight_shared_model_saves_quietly_and_resumes_every_alias(tmp_path, caplog):
    """WideNet's blocks share one attention and one MoE: Accelerate stores each tensor once (it
    warns about the dropped aliases, which we silence) and loading restores them under every name."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from zoo.train.checkpoint import save_checkpoint

    try:
        _shared_roundtrip(Accelerator(cpu=True), tmp_path, caplog, save_checkpoint)
    finally:  # Accelerate's state is process-global: leave none behind for the in-process runs
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _shared_roundtrip(accelerator, tmp_path, caplog, save_checkpoint):
    import logging

    import zoo

    torch.manual_seed(0)
    model = accelerator.prepare(zoo.create_model("zoo_widenet_mini_32", num_classes=5))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        path = save_checkpoint(accelerator, tmp_path, {"step": 1}, keep_last=2)
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]
    from accelerate.utils.other import clean_state_dict_for_safetensors

    with caplog.at_level(logging.WARNING):  # what the filter silenced: Accelerate still says it
        clean_state_dict_for_safetensors(dict(model.state_dict()))
    assert [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    accelerator.load_state(str(path))
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert "stages.0.blocks.3.token_mixer.qkv.weight" in state  # an alias of block 0's attention
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
