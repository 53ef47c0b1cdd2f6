"""``top1`` and ``ablate`` as studies, the command line, the training run's new figures (balanced
error, per-class recall, where the time went), and one real study end to end (slow)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, recall_score
from study_fakes import CALLS, fake_floors, fake_run

from zoo.study import frontends, sweep

REPO = Path(__file__).resolve().parents[1]


def common(tmp: Path) -> list[str]:
    return [
        "--space",
        "none",
        "--epochs",
        "2",
        "--seeds",
        "2",
        "--runs",
        str(tmp / "runs"),
        "--results",
        str(tmp / "results"),
        "--poll",
        "0.1",
        "--set",
        "data.num_workers=0",
    ]


def quietly(fn, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = fn(argv, train_fn=fake_run, floors_fn=fake_floors)
    return rc, out.getvalue()


def test_top1_is_a_study_of_one_arm_per_model(tmp_path):
    CALLS.clear()
    argv = ["--models", "zoo_vit_mini_32", "--baseline", "resnet10t", "--data=digits", *common(tmp_path)]
    rc, out = quietly(frontends.top1, argv)
    assert rc == 0, out
    data = json.loads((tmp_path / "results" / "top1_digits.json").read_text())  # the study named by its data
    assert data["design"]["arms"] == ["zoo_vit_mini_32:adamw", "resnet10t:adamw"]  # the baseline added
    assert data["command"].startswith("python -m zoo.study top1 --models zoo_vit_mini_32")
    assert "vs resnet10t:adamw" in out
    assert sorted((c.model.name, c.seed) for c in CALLS) == [
        ("resnet10t", 1),
        ("resnet10t", 2),
        ("zoo_vit_mini_32", 1),
        ("zoo_vit_mini_32", 2),
    ]


def test_ablate_is_a_study_of_single_changes(tmp_path, capsys):
    CALLS.clear()
    argv = ["--base", "zoo_poolformer_mini_32", "--swap", "token_mixer=identity,pooling", *common(tmp_path)]
    rc, out = quietly(frontends.ablate, argv)
    assert rc == 0, out
    data = json.loads((tmp_path / "results" / "ablate_mnist5k.json").read_text())
    # pooling is the base's own token mixer: no arm for it
    assert data["design"]["arms"] == [
        "zoo_poolformer_mini_32:adamw",
        "zoo_poolformer_mini_32:adamw:token_mixer=identity",
    ]
    assert {str(c.model.spec) for c in CALLS} == {"{}", "{'token_mixer': 'identity'}"}
    assert frontends.ablate(["--base", "zoo_poolformer_mini_32", "--swap", "token_mixr=pooling"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'token_mixer'" in err


def test_the_new_parts_are_one_change_arms_of_a_study(tmp_path):
    """Issue 26's parts (L1 norm, sparse FFN, Conformer's convolution module) each as one arm of an
    ablation study: the study's input check builds every arm's model, and every trial's config
    builds a model that holds the part (the trainer is the fake; the configs are the real ones)."""
    import zoo

    CALLS.clear()
    swaps = [
        "--swap",
        "norm=l1_layernorm",
        "--swap",
        "channel_mixer=sparse_ffn",
        "--swap",
        "token_mixer=conformer_conv",
    ]
    argv = ["--base", "zoo_poolformer_mini_32", *swaps, "--data=digits", *common(tmp_path)]
    rc, out = quietly(frontends.ablate, argv)
    assert rc == 0, out
    data = json.loads((tmp_path / "results" / "ablate_digits.json").read_text())
    assert data["design"]["arms"] == [
        "zoo_poolformer_mini_32:adamw",
        "zoo_poolformer_mini_32:adamw:norm=l1_layernorm",
        "zoo_poolformer_mini_32:adamw:channel_mixer=sparse_ffn",
        "zoo_poolformer_mini_32:adamw:token_mixer=conformer_conv",
    ]
    part_class = {"norm": "L1LayerNorm", "channel_mixer": "SparseFFN", "token_mixer": "ConformerConv"}
    seen = set()
    for cfg in CALLS:
        if not cfg.model.spec:
            continue
        ((field, _),) = cfg.model.spec.items()
        net = zoo.create_model(cfg.model.name, num_classes=10, **cfg.model.spec)
        assert any(type(m).__name__ == part_class[field] for m in net.modules()), field
        seen.add(field)
    assert seen == set(part_class)


def test_help_and_the_old_entry_points(capsys):
    """In this process (what ``python -m`` runs: the modules' ``main``), not in new interpreters:
    each would spend seconds importing torch for a help text."""
    from zoo.bench.__main__ import main as bench
    from zoo.study.__main__ import main as study

    text = sweep.build_parser().format_help()
    for option in ("--configs", "--eta", "--min-epochs", "--metric", "--export", "--import", "@default"):
        assert option in text, option
    assert "successive-halving" in text and "holdout" in text
    with pytest.raises(SystemExit) as done:
        study(["ablate", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--swap" in out and "--configs" in out
    assert bench(["sweep", "--arms", "x"]) == 2
    err = capsys.readouterr().err
    assert "python -m zoo.study sweep" in err and err.count("\n") == 1


def test_evaluate_reports_balanced_error_and_recall_as_sklearn():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from zoo.train.loop import evaluate

    rng = np.random.default_rng(0)
    y = torch.as_tensor(np.r_[np.zeros(30), np.ones(6), np.full(4, 2)].astype(np.int64))  # imbalanced
    logits = torch.as_tensor(rng.normal(size=(40, 4)).astype(np.float32))  # class 3 never true

    class Table(torch.nn.Module):  # returns the fixed logits of the images it is given (their index)
        def forward(self, x):
            return logits[x.long().view(-1)]

    loader = torch.utils.data.DataLoader(list(zip(torch.arange(40).float().view(40, 1), y)), batch_size=16)
    try:
        res = evaluate(Table(), loader, Accelerator(cpu=True))
    finally:  # Accelerate's process-wide settings: a later run() in this process chooses its own
        AcceleratorState._reset_state()
        GradientState._reset_state()
    pred = logits.argmax(1).numpy()
    assert res["top1"] == pytest.approx(100 * (pred == y.numpy()).mean())
    assert res["balanced_err"] == pytest.approx(100 * (1 - balanced_accuracy_score(y.numpy(), pred)))
    recall = recall_score(y.numpy(), pred, labels=[0, 1, 2], average=None, zero_division=0)
    assert res["recall"][:3] == pytest.approx(100 * recall) and np.isnan(res["recall"][3])


@pytest.mark.slow
def test_a_real_study_end_to_end(tmp_path):
    """Real training runs (a 64-image subset, 1-2 epochs) and the real floors, on digits."""
    argv = [
        *("--arms", "resnet10t:adamw,zoo_poolformer_mini_32:adamw@default"),
        *("--data", "digits", "--configs", "2", "--eta", "2", "--min-epochs", "1", "--epochs", "2", "--seeds", "2"),
        *("--study", "toy", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")),
        *("--set", "train.limit_train=64", "--set", "train.limit_val=32", "--set", "train.batch_size=16"),
        *("--set", "data.num_workers=0", "--set", "train.num_threads=1", "--set", "log.tensorboard=false"),
    ]
    assert sweep.main(argv) == 0
    data = json.loads((tmp_path / "results" / "toy.json").read_text())
    rows = {r["arm"]: r for r in data["rows"]}
    assert rows["resnet10t:adamw"]["complete"] and rows["zoo_poolformer_mini_32:adamw@default"]["complete"]
    assert [p["steps"] for p in rows["resnet10t:adamw"]["per_rung"]] == [2 * 4, 1 * 2 * 4]  # 64 / 16 steps an epoch
    for t in data["trials"]:
        assert t["threads"] == 1 and t["code"] and t["precision"] in ("bf16", "fp32")
        assert set(t["seconds"]) == {"startup", "train", "eval", "checkpoint", "finish"}
        assert 0 < t["seconds"]["train"] < t["wall_s"] and t["balanced_err"] is not None and len(t["recall"]) == 10
    assert 0 < data["floors"]["logreg_err"] < data["floors"]["majority_err"]


def test_a_run_says_where_its_time_went(tmp_path):
    from zoo.train import load_config, run

    over = ["train.limit_train=32", "train.limit_val=16", "train.batch_size=16", "train.epochs=1", "data.num_workers=0"]
    over += ["log.progress=false", "log.plot=false", "log.tensorboard=false", f"output_dir={tmp_path}", "name=t"]
    result = run(load_config(None, over))
    s = result.seconds
    assert set(s) == {"startup", "train", "eval", "checkpoint", "finish"} and all(v > 0 for v in s.values())
    assert s["startup"] + s["train"] + s["eval"] + s["checkpoint"] == pytest.approx(result.wall_s, rel=0.05)
    assert result.precision in ("bf16", "fp32") and result.threads == torch.get_num_threads()
    assert 0 <= result.balanced_err <= 100 and len(result.recall) == 10
