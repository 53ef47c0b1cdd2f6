"""Checkpoint directory rules that make a SIGKILL at any moment harmless, and the weight export."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from torch import nn

from zoo.train.checkpoint import (
    LOOP_STATE,
    clean_stale,
    export_weights,
    latest_checkpoint,
    list_checkpoints,
)
from zoo.train.metrics import read_log, topk_correct, truncate_log


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
    assert set(sd) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    assert torch.equal(sd["b.weight"], m.a.weight.detach())
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


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
