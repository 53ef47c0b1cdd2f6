"""Every optimizer of ``optim.name``: it trains, it resumes bit for bit on the CPU (preconditioners
included), muon splits the params as its authors prescribe, a wrong name is a one-line error, the
cited defaults (``@default`` arms) are the libraries' own, and ``describe_optimizer`` says what the
factory builds (tests/test_train_shampoo.py: the scalable Shampoo itself).

CI-sized: a ~11 k-parameter two-stage PoolFormer (``model.spec`` below), a few steps of batch 16.
"""

from __future__ import annotations

import itertools
import typing

import pytest
import torch
import torch.nn.functional as F
from test_train_loop import _assert_same_weights, _cfg, _steps

import zoo
from zoo.models import Block
from zoo.train import ConfigError, load_config, run
from zoo.train.config import OptimConfig
from zoo.train.optim import (
    OPTIMIZER_DEFAULTS,
    OPTIMIZERS,
    CombinedOptimizer,
    create_optimizer,
    default_overrides,
    describe_optimizer,
    muon_param_sets,
)

NAMES = list(typing.get_args(typing.get_type_hints(OptimConfig)["name"]))


def _stage(dim: int) -> str:
    return (
        f"{{depth: 1, dim: {dim}, embed: {{kernel: 3, stride: 2, padding: 1}}, token_mixer: pooling, "
        f"mixer_options: {{pool_size: 3}}, channel_mixer: mlp, mlp_ratio: 2.0, norm: groupnorm1, "
        f"layer_scale: 1.0}}"
    )  # not 1e-5: SGD would move norm2 by less than a float32 ulp


TINY_MODEL = f"model.spec={{stages: [{_stage(16)}, {_stage(32)}]}}"
# Preconditioners refreshed every 2nd step, so that the refresh after the resume reads restored state.
# shampoo: preconditioned from step 2, so that steps after the resume use restored inverse roots.
EXTRA = {
    "soap": ["optim.precondition_frequency=2"],
    "shampoo": ["optim.precondition_frequency=2", "optim.start_preconditioning_step=2"],
    "shampoo_plain": ["optim.precondition_frequency=2"],
    "kron": ["optim.precondition_frequency=2"],
}


def test_the_table_is_the_config_literal():
    assert set(OPTIMIZERS) == set(NAMES)
    import timm.optim

    assert {"adamw", "sgd", "lamb", "lion", "kron"} <= set(timm.optim.list_optimizers())


@pytest.mark.parametrize("name", NAMES)
def test_builds_from_config_and_trains(name):
    cfg = load_config(None, [f"optim.name={name}", "optim.lr=1e-2", TINY_MODEL, *EXTRA.get(name, [])])
    torch.manual_seed(0)
    model = zoo.create_model(cfg.model.name, num_classes=10, in_chans=1, **cfg.model.spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = create_optimizer(model, cfg)
    # DeiT's rule: no decay on 1-d params, decay on the others, whatever the optimizer.
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters()} == set(decay)
    assert all(decay[id(p)] == (0.0 if p.ndim <= 1 else cfg.optim.weight_decay) for p in model.parameters())
    x, y = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    still = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    # PoolFormer's first norm bias cancels in pool(n) - n: it has no gradient (the fused branch
    # gives it exactly 0; the plain ops' rounding noise, which Adam would blow up into steps of lr;
    # so this holds with zoo.layers.fused.FUSED_BACKWARD on, the default)
    cancelled = [n for n in before if n.endswith("norm1.bias")]
    assert cancelled and all(n in still for n in cancelled), f"{name}: {cancelled} moved"
    moved_too_little = [n for n in still if n not in cancelled]
    assert not moved_too_little, f"{name}: parameters that never moved: {moved_too_little}"


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_identical(tmp_path, name):
    """4 steps in one go == 2 steps, checkpoint, a new run() resuming for the other 2 (96 images:
    6 steps an epoch, so both stops fall mid-epoch)."""
    common = [
        f"optim.name={name}",
        "optim.lr=1e-2",
        TINY_MODEL,
        *EXTRA.get(name, []),
        "train.precision=fp32",
        "train.num_threads=1",
        "train.limit_train=96",
        "train.limit_val=16",
        "train.batch_size=16",
        "train.epochs=1",
    ]
    ref = run(_cfg(tmp_path, *common, "train.max_steps=4", name="ref"))
    first = run(_cfg(tmp_path, *common, "train.max_steps=2", "checkpoint.every_steps=2", name="split"))
    assert first.steps == 2
    resumed = run(_cfg(tmp_path, *common, "train.max_steps=4", "checkpoint.every_steps=2", name="split"), resume="auto")
    assert ref.steps == resumed.steps == 4
    losses = [s["loss"] for s in _steps(ref.run_dir)]
    assert len(set(losses)) > 1 and all(not s["skipped"] for s in _steps(ref.run_dir))
    assert losses == [s["loss"] for s in _steps(resumed.run_dir)]
    for f in ("model_last.safetensors", "model_ema.safetensors"):
        _assert_same_weights(ref.run_dir / f, resumed.run_dir / f)


@pytest.mark.parametrize("model_name", ["zoo_vit_mini_32", "zoo_poolformer_mini_32"])
def test_muon_takes_the_blocks_2d_weights_and_adamw_the_rest(model_name):
    cfg = load_config(None, ["optim.name=muon", "optim.lr=1e-3"])
    model = zoo.create_model(model_name, num_classes=10)
    opt = create_optimizer(model, cfg)
    assert isinstance(opt, CombinedOptimizer) and set(opt.parts) == {"muon", "adamw"}
    assert isinstance(opt.parts["muon"], torch.optim.Muon) and isinstance(opt.parts["adamw"], torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in opt.parts["muon"].param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in opt.parts["adamw"].param_groups for p in g["params"]}
    blocks_2d = {n for n, p in model.named_parameters() if ".blocks." in n and p.ndim == 2}
    assert in_muon == blocks_2d and in_adamw == set(names.values()) - blocks_2d
    assert {names[id(p)] for p in muon_param_sets(model)[0]} == blocks_2d
    assert any(".fc1." in n for n in in_muon)
    assert any(n.startswith("head.") for n in in_adamw) and any(".embed." in n for n in in_adamw)
    if model_name == "zoo_vit_mini_32":
        assert any("qkv.weight" in n for n in in_muon)
        assert {"stages.0.cls_token", "stages.0.pos_embed"} <= in_adamw
    # One optimizer for the loop: its groups are the parts' own dicts, Muon's at lr_scale 1 (Moonlight).
    for g in opt.param_groups:
        g["lr"] = 0.5 * g.get("lr_scale", 1.0)
    assert all(g["lr"] == 0.5 for o in opt.parts.values() for g in o.param_groups)
    assert all(g["lr_scale"] == 1.0 and g["adjust_lr_fn"] == "match_rms_adamw" for g in opt.parts["muon"].param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)


def test_muon_without_block_matrices_is_a_config_error():
    model = zoo.create_model("resnet10t", num_classes=10)
    assert not any(isinstance(m, Block) for m in model.modules())
    with pytest.raises(ConfigError, match="muon needs 2-D weight matrices"):
        create_optimizer(model, load_config(None, ["optim.name=muon"]))


def test_combined_state_dict_round_trips_through_weights_only_load(tmp_path):
    cfg = load_config(None, ["optim.name=muon", TINY_MODEL])
    torch.manual_seed(0)
    model = zoo.create_model(cfg.model.name, num_classes=10, in_chans=1, **cfg.model.spec)
    opt = create_optimizer(model, cfg)
    F.cross_entropy(model(torch.randn(4, 1, 32, 32)), torch.arange(4)).backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.bin")
    fresh = create_optimizer(model, cfg)
    fresh.load_state_dict(torch.load(tmp_path / "opt.bin", weights_only=True))
    for name, part in opt.parts.items():
        for p in (p for g in part.param_groups for p in g["params"]):
            a, b = part.state[p], fresh.parts[name].state[p]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(fresh.state) == len(opt.state) == len(list(model.parameters()))


def test_unknown_name_is_one_line_naming_the_nearest():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.name=sopa"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("optim.name: 'sopa' is not one of") and "(did you mean 'soap'?)" in msg


@pytest.mark.parametrize(
    "override, name, users",
    [
        ("optim.betas=[0.9, 0.95]", "lion", "adamw, lamb, muon"),
        ("optim.momentum=0.8", "adamw", "sgd, kron"),
        ("optim.precondition_frequency=5", "adamw", "kron, soap, shampoo, shampoo_plain"),
        ("optim.graft_type=adagrad", "shampoo_plain", "shampoo"),
        ("optim.block_size=64", "soap", "shampoo"),
        ("optim.nesterov=false", "muon", "sgd"),
    ],
)
def test_a_field_the_optimizer_does_not_read_is_an_error(override, name, users):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"optim.name={name}", override])
    key = override.split("=")[0]
    assert str(e.value).startswith(f"{key}: optim.name {name!r} does not use it (read by {users})")


@pytest.mark.parametrize("model_name", ["zoo_vit_mini_32", "zoo_poolformer_mini_32"])
def test_layer_decay_groups_follow_the_group_matcher(model_name):
    """optim.layer_decay: one lr scale per layer of the model's group_matcher (stem 0, blocks, head
    last), decreasing from head to stem by the factor, every parameter in exactly one group, DeiT's
    weight-decay rule kept; timm's factory (adamw) and timm's param groups (sm3, muon) agree.
    ``pytest -s`` prints the groups."""
    from timm.models import group_parameters

    model = zoo.create_model(model_name, num_classes=10)
    names = {id(p): n for n, p in model.named_parameters()}
    layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    num_layers = max(layer_of.values()) + 1
    # stem, one layer per block (a later stage's embedding joins its first block, the final norm the
    # last block, as timm's ViT does), the head
    assert num_layers == 2 + sum(len(s.blocks) for s in model.stages)
    scales: dict[str, dict[str, tuple[float, float]]] = {}
    for name in ("adamw", "sm3", "muon"):
        cfg = load_config(None, [f"optim.name={name}", "optim.lr=1e-3", "optim.layer_decay=0.65"])
        opt = create_optimizer(model, cfg)
        seen = [names[id(p)] for g in opt.param_groups for p in g["params"]]
        assert sorted(seen) == sorted(names.values()), f"{name}: each parameter in exactly one group"
        scales[name] = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert scales["adamw"] == scales["sm3"] == scales["muon"]
    for n, p in model.named_parameters():
        lr_scale, wd = scales["adamw"][n]
        assert lr_scale == pytest.approx(0.65 ** (num_layers - 1 - layer_of[n])), n
        no_decay = p.ndim <= 1 or n.endswith(("cls_token", "pos_embed"))
        assert wd == (0.0 if no_decay else 0.05), n
    by_layer: dict[int, list[str]] = {}
    for n, layer in layer_of.items():
        by_layer.setdefault(layer, []).append(n)
    layer_scale = [scales["adamw"][by_layer[i][0]][0] for i in range(num_layers)]
    assert layer_scale[-1] == 1.0 and all(a < b for a, b in itertools.pairwise(layer_scale))
    assert all(layer_of[n] == num_layers - 1 for n in names.values() if n.startswith("head."))
    assert layer_of["stages.0.embed.proj.weight"] == 0
    print(f"\n{model_name}: layer_decay=0.65, {num_layers} layers (group_matcher)")
    for i in reversed(range(num_layers)):
        members = sorted({".".join(n.split(".")[: 4 if ".blocks." in n else 3]) for n in by_layer[i]})
        print(f"  layer {i}: lr_scale {layer_scale[i]:.4f}  {len(by_layer[i]):2d} params  {', '.join(members)}")


# ---------------------------------------------------------------------------------------------
# Cited defaults (a study's MODEL:OPTIMIZER@default arm) and the description a study fingerprints


@pytest.mark.parametrize("name", sorted(OPTIMIZER_DEFAULTS))
def test_cited_library_defaults_are_the_librarys_own(name):
    d = OPTIMIZER_DEFAULTS[name]
    assert {"optim.lr", "optim.weight_decay"} <= set(d.values) and d.source
    if d.library is None:  # cited to a paper: sgd (He et al. 2016)
        return
    import importlib
    import inspect

    module, cls = d.library.rsplit(".", 1)
    signature = inspect.signature(getattr(importlib.import_module(module), cls)).parameters
    compared = [k for k in d.values if k.removeprefix("optim.") in signature]
    assert "optim.lr" in compared
    for key in compared:
        library = signature[key.removeprefix("optim.")].default
        assert d.values[key] == (tuple(library) if isinstance(library, (list, tuple)) else library), key


@pytest.mark.parametrize("name", sorted(OPTIMIZER_DEFAULTS))
def test_default_overrides_load_into_the_values_cited(name):
    cfg = load_config(None, [f"optim.name={name}", *default_overrides(name)])
    for key, value in OPTIMIZER_DEFAULTS[name].values.items():
        got = getattr(cfg.optim, key.removeprefix("optim."))
        assert got == value and type(got) is type(value), key


def test_default_overrides_of_an_optimizer_without_cited_defaults_is_one_line():
    with pytest.raises(ConfigError) as e:
        default_overrides("adamx")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("@default: optimizer 'adamx' has no cited defaults")
    assert "(did you mean 'adamw'?)" in msg and "shampoo_plain" in msg


def _as_built(opt, part: str, key: str):
    """The value of hyper-parameter ``key`` in the built optimizer (a group entry or an attribute)."""
    target = opt.parts[part] if isinstance(opt, CombinedOptimizer) else opt
    group = target.param_groups[0]
    if key in group:
        return group[key]
    return getattr(target, key, KeyError)


@pytest.mark.parametrize("name", NAMES)
def test_description_is_what_the_factory_builds(name):
    import json

    from zoo.train.optim import _plain

    cfg = load_config(None, [f"optim.name={name}", "optim.lr=1e-2", TINY_MODEL])
    d = describe_optimizer(cfg.optim)
    assert json.loads(json.dumps(d)) == d  # JSON as it is
    assert d["name"] == name and d["hyper_parameters"]["lr"] == 1e-2
    model = zoo.create_model(cfg.model.name, num_classes=10, in_chans=1, **cfg.model.spec)
    opt = create_optimizer(model, cfg)
    checked = 0
    for part, arguments in d["library_arguments"].items():
        built_class = type(opt.parts[part] if isinstance(opt, CombinedOptimizer) else opt)
        assert OPTIMIZERS[name].parts[part].rsplit(".", 1)[1] in {c.__name__ for c in built_class.__mro__}
        for key, value in arguments.items():
            built = _as_built(opt, part, key)
            if built is KeyError or (callable(built) and not isinstance(built, type)):
                continue  # neither kept in a group nor as an attribute (e.g. foreach), or a schedule
            assert _plain(built) == value, f"{part}.{key}: built {built!r}, described {value!r}"
            checked += 1
    assert checked >= 3, f"{name}: only {checked} described values found in the built optimizer"


def test_description_changes_with_the_implementation_and_any_resolved_value(monkeypatch):
    import zoo.train.optim as optim

    shampoo = load_config(None, ["optim.name=shampoo"]).optim
    base = describe_optimizer(shampoo)
    assert base["implementation"].startswith("pytorch_optimizer.ScalableShampoo ")
    plain = describe_optimizer(load_config(None, ["optim.name=shampoo_plain"]).optim)
    assert plain["implementation"].startswith("pytorch_optimizer.Shampoo ") and plain != base
    for override in ("optim.precondition_frequency=10", "optim.graft_type=adagrad", "optim.block_size=64"):
        assert describe_optimizer(load_config(None, ["optim.name=shampoo", override]).optim) != base, override
    assert describe_optimizer(load_config(None, ["optim.name=shampoo", "optim.weight_decay=0.1"]).optim) != base
    monkeypatch.setattr(optim, "_version", lambda module_path: "0.0.1")  # another library release
    assert describe_optimizer(shampoo)["implementation"] != base["implementation"]


# ---------------------------------------------------------------------------------------------
# The cost bench (python -m zoo.bench optim), at toy size into a temporary folder


def test_cost_bench_writes_each_optimizers_ratio(tmp_path, capsys):
    import json

    from zoo.bench.__main__ import main

    names = ["sgd", "shampoo", "muon"]  # a few, to stay fast: the bench runs all by default
    spec = TINY_MODEL.removeprefix("model.spec=")
    argv = ["optim", "--spec", spec, "--batch", "4", "--block", "2", "--warmup-steps", "1", "--repeats", "2"]
    assert main([*argv, "--optimizers", ",".join(names), "--threads", "1", "--out", str(tmp_path)]) == 0
    machine = [p for p in tmp_path.glob("optim_steps_*.json") if p.stem != "optim_steps_machines"]
    assert len(machine) == 1 and machine[0].with_suffix(".md").is_file() and machine[0].with_suffix(".csv").is_file()
    result = json.loads(machine[0].read_text())
    rows = {r["optimizer"]: r for r in result["rows"]}
    assert sorted(rows) == sorted(names)
    for r in rows.values():
        assert r["step_ms"] > 0 and r["ratio"] == pytest.approx(r["step_ms"] / r["fwd_bwd_ms"])
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    assert rows["shampoo"]["implementation"].startswith("pytorch_optimizer.ScalableShampoo ")
    assert result["settings"]["block"] == 2 and result["settings"]["batch"] == 4
    table = machine[0].with_suffix(".md").read_text()
    assert all(f"| {name} " in table for name in names)
    spread = (tmp_path / "optim_steps_machines.md").read_text()
    assert all(f" {name} " in spread.splitlines()[2] for name in names)  # the header row
    assert "results: " in capsys.readouterr().out


def test_cost_bench_times_the_step_apart_from_the_gradients(monkeypatch):
    import time

    from zoo.bench.optim import Contender

    torch.manual_seed(0)
    cfg = load_config(None, [TINY_MODEL])
    model = zoo.create_model(cfg.model.name, num_classes=10, in_chans=1, **cfg.model.spec)
    batch = (torch.randn(2, 1, 32, 32), torch.tensor([0, 1]))
    c = Contender("sgd", model, batch)
    real_step = c.optimizer.step
    monkeypatch.setattr(c.optimizer, "step", lambda: (time.sleep(0.2), real_step()))
    fwd_bwd, step = c.block(2)
    assert step >= 0.2 > fwd_bwd
    assert all(p.grad is not None for p in c.model.parameters() if p.requires_grad)  # gradients were computed


def test_cost_bench_rejects_an_unknown_optimizer_in_one_line(capsys):
    from zoo.bench.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["optim", "--optimizers", "adamw,shampo"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"--optimizers: unknown 'shampo'; choose from {', '.join(OPTIMIZERS)}")
