"""MoE routing that does not depend on batch-mates: routing groups, Batch Priority Routing, expert
choice and Soft MoE, each against a naive per-token (per-group, per-image) reference; whole models
whose eval logits for an image are the same alone and inside a batch of 64 other images; traced
and exported programs at another batch size."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_moe import DIM, HIDDEN, _expert, _moe, _naive

import zoo
from zoo.export import export_and_check
from zoo.layers.mlp import CHANNEL_MIXERS, create_channel_mixer
from zoo.layers.moe import MoE, collect_aux_loss
from zoo.layers.soft_moe import SoftMoE
from zoo.models.widenet import MOE_OPTIONS


def _crowded(**kw) -> MoE:
    """A module whose expert 0 is every token's favourite on positive inputs: drops guaranteed."""
    m = _moe(**kw).eval()
    with torch.no_grad():
        m.router.weight[0] = m.router.weight[0] * 0.1 + 0.5
    return m


# ---- routing groups ---------------------------------------------------------------------------------


def test_an_images_output_depends_on_its_group_only() -> None:
    """Eval capacity asked for (drops happen): per image by default, per 3 images with
    ``group_size=3``; the whole call with ``group_size=None`` couples every image."""
    torch.manual_seed(1)
    x = torch.randn(6, 10, DIM).abs()
    other = x.clone()
    other[3:] = torch.randn(3, 10, DIM).abs() * 2  # new batch-mates after the first three images
    for group_size, coupled in ((1, False), (3, False), (None, True)):
        m = _crowded(capacity_factor=0.5, eval_capacity_factor=0.5, group_size=group_size)
        y, y_other = m(x), m(other)
        assert int(m.last_stats["dropped_tokens"]) > 0
        assert torch.equal(y[:3], y_other[:3]) != coupled, f"group_size={group_size}"
        if group_size == 1:  # alone, and at another position in the batch
            torch.testing.assert_close(m(x[1:2]), y[1:2], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(m(x.flip(0))[4], y[1], rtol=1e-6, atol=1e-6)


# ---- Batch Priority Routing -------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
def test_batch_priority_routing_matches_naive_and_serves_confident_tokens_first(top_k: int) -> None:
    m = _crowded(num_experts=4, top_k=top_k, capacity_factor=0.5, eval_capacity_factor=0.5, batch_priority=True)
    x = torch.randn(3, 12, DIM).abs()
    y = m(x)
    expected, stats = _naive(m, x, factor=0.5, group_tokens=12, batch_priority=True)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert int(m.last_stats["dropped_tokens"]) == stats["dropped"] > 0
    assert int(m.last_stats["unrouted_tokens"]) == stats["unrouted"]
    assert m.last_stats["kept_counts"].tolist() == stats["load"]
    _, vanilla = _naive(m, x, factor=0.5, group_tokens=12, batch_priority=False)
    assert vanilla["kept"] != stats["kept"], "BPR must change which assignments survive here"

    # BPR's ordering: within an image, a kept first choice never has a lower top-1 probability than
    # a dropped first choice of the same expert (first choices are served before second choices).
    probs = F.linear(x.reshape(-1, DIM), m.router.weight).softmax(-1)
    top1, first = probs.max(-1)
    for g in range(3):
        for e in range(4):
            members = [t for t in range(12 * g, 12 * g + 12) if int(first[t]) == e]
            kept = [float(top1[t]) for t in members if (t, 0) in stats["kept"]]
            lost = [float(top1[t]) for t in members if (t, 0) not in stats["kept"]]
            if kept and lost:
                assert min(kept) >= max(lost)


def test_batch_priority_is_the_same_function_without_drops() -> None:
    x = torch.randn(4, 9, DIM)
    plain, bpr = _moe(), _moe(batch_priority=True)
    torch.testing.assert_close(bpr.eval()(x), plain.eval()(x), rtol=1e-6, atol=1e-6)


# ---- expert choice ----------------------------------------------------------------------------------


def _naive_expert_choice(
    m: MoE, x: torch.Tensor, factor: float, group_tokens: int
) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """Per expert and group: its ``C = min(n, ceil(factor * n * k / E))`` most probable tokens."""
    tokens = x.reshape(-1, DIM)
    probs = F.linear(tokens, m.router.weight).softmax(-1)
    out = torch.zeros_like(tokens)
    picks = []
    for g0 in range(0, tokens.shape[0], group_tokens):
        members = range(g0, min(tokens.shape[0], g0 + group_tokens))
        capacity = min(len(members), math.ceil(factor * len(members) * m.top_k / m.num_experts))
        picks.append([])
        for e in range(m.num_experts):
            chosen = sorted(members, key=lambda t: -float(probs[t, e]))[:capacity]
            picks[-1].append(chosen)
            for t in chosen:
                out[t] += probs[t, e] * _expert(m, e, tokens[t])
    return out.view(x.shape), picks


@pytest.mark.parametrize(("group_size", "group_tokens"), [(1, 6), (3, 18), (None, 42)])
@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_expert_choice_matches_naive_and_takes_exactly_its_capacity(
    group_size, group_tokens: int, factor: float
) -> None:
    """7 images of 6 tokens; with ``group_size=3`` the last group is one image, with a smaller
    capacity of its own. Each expert takes exactly ``C`` tokens of every group."""
    m = _moe(router="expert_choice", num_experts=4, top_k=2, capacity_factor=factor, group_size=group_size).eval()
    x = torch.randn(7, 6, DIM)
    y = m(x)
    expected, picks = _naive_expert_choice(m, x, factor, group_tokens)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    s = m.last_stats
    sizes = [min(group_tokens, 42 - g0) for g0 in range(0, 42, group_tokens)]
    caps = [min(n, math.ceil(factor * n * 2 / 4)) for n in sizes]
    assert s["capacity"] == caps[0] and s["groups"] == len(sizes)
    assert all(len(p) == c for group, c in zip(picks, caps, strict=True) for p in group)
    assert s["kept_counts"].tolist() == [sum(caps)] * 4 and int(s["dropped_tokens"]) == 0
    untouched = 42 - len({t for group in picks for p in group for t in p})
    assert int(s["unrouted_tokens"]) == untouched


def test_expert_choice_trains_with_z_loss_only_and_its_capacity_holds_in_eval() -> None:
    m = _moe(router="expert_choice", capacity_factor=1.0, router_noise=0.0, z_loss_weight=1e-3).train()
    x = torch.randn(2, 16, DIM)
    y = m(x)
    logits = F.linear(x.reshape(-1, DIM), m.router.weight)
    z = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(m.aux_loss, 1e-3 * z)  # no balance term: balanced by construction
    (y.square().sum() + collect_aux_loss(m)).backward()
    assert m.router.weight.grad.abs().sum() > 0  # the gates are the router's probabilities
    assert all(m.fc1_weight.grad[e].abs().sum() > 0 for e in range(4))
    train_y = m(x).detach()
    m.eval()
    torch.testing.assert_close(m(x), train_y)  # eval_capacity_factor=None keeps capacity_factor
    assert m.capacity(16) == 8


# ---- Soft MoE ---------------------------------------------------------------------------------------


def _soft(**kw) -> SoftMoE:
    torch.manual_seed(0)
    m = SoftMoE(DIM, hidden_dim=HIDDEN, **kw)
    with torch.no_grad():
        m.fc1_bias.normal_(std=0.1)
        m.fc2_bias.normal_(std=0.1)
        if m.scale is not None:
            m.scale.fill_(3.0)
    return m


def _naive_soft(m: SoftMoE, x: torch.Tensor) -> torch.Tensor:
    """One image at a time, one slot at a time, in the paper's notation."""
    images = x.reshape(1, -1, DIM) if x.dim() == 2 else x.reshape(x.shape[0], -1, DIM)
    phi = m.slot_embed
    outs = []
    for tokens in images:  # (N, C)
        if m.normalize:
            logits = (tokens / tokens.norm(dim=-1, keepdim=True)) @ (m.scale * phi / phi.norm(dim=-1, keepdim=True)).T
        else:
            logits = tokens @ phi.T
        dispatch = logits.softmax(dim=0)  # (N, S): each column sums to 1 over the tokens
        combine = logits.softmax(dim=1)  # (N, S): each row sums to 1 over the slots
        slot_in = dispatch.T @ tokens  # (S, C)
        slot_out = torch.stack([_expert(m, s // m.slots_per_expert, slot_in[s]) for s in range(m.num_slots)])
        outs.append(combine @ slot_out)
    return torch.stack(outs).view(x.shape)


@pytest.mark.parametrize("shape", [(3, 7, DIM), (2, 3, 3, DIM), (7, DIM)], ids=["tokens", "map_bhwc", "one_image"])
@pytest.mark.parametrize("normalize", [True, False])
def test_soft_moe_matches_naive_per_image_reference(shape, normalize: bool) -> None:
    m = _soft(num_experts=3, slots_per_expert=2, normalize=normalize)
    x = torch.randn(shape)
    torch.testing.assert_close(m(x), _naive_soft(m, x), rtol=1e-5, atol=1e-5)
    if len(shape) == 3:  # an image alone gives what it gives in the batch
        torch.testing.assert_close(m(x[1:2]), m(x)[1:2], rtol=1e-6, atol=1e-6)


def test_soft_moe_is_registered_trains_and_runs_under_autocast() -> None:
    assert CHANNEL_MIXERS["soft_moe"] is SoftMoE
    m = create_channel_mixer("soft_moe", DIM, hidden_dim=HIDDEN, options={"num_experts": 2, "slots_per_expert": 3})
    assert m.num_slots == 6 and m.slot_embed.shape == (6, DIM)
    x = torch.randn(2, 5, DIM, requires_grad=True)
    m(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    ref = m.eval()(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    assert SoftMoE(DIM, hidden_dim=HIDDEN, bias=False, normalize=False).scale is None


def test_soft_moe_compiles_fullgraph_to_the_same_function() -> None:
    m = _soft(num_experts=2, slots_per_expert=3).train()
    x = torch.randn(3, 10, DIM)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)


# ---- options: explicit names, one-line errors naming them --------------------------------------------


@pytest.mark.parametrize(
    ("ctor", "kw", "named"),
    [
        (MoE, {"router": "expert_choise"}, "router"),
        (MoE, {"group_size": 0}, "group_size"),
        (MoE, {"group_size": 2.5}, "group_size"),
        (MoE, {"batch_priority": True, "router": "expert_choice"}, "batch_priority"),
        (MoE, {"router": "expert_choice", "capacity_factor": None}, "capacity_factor"),
        (MoE, {"router": "expert_choice", "eval_capacity_factor": 0.0}, "eval_capacity_factor"),
        (MoE, {"capacity_factor": "1.2"}, "capacity_factor"),
        (SoftMoE, {"slots_per_expert": 0}, "slots_per_expert"),
        (SoftMoE, {"num_experts": 1.5}, "num_experts"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_option(ctor, kw, named: str) -> None:
    with pytest.raises(ValueError) as info:
        ctor(DIM, hidden_dim=HIDDEN, **kw)
    msg = str(info.value)
    assert msg.startswith(named) and "\n" not in msg, msg
    if named == "router":
        assert "did you mean 'expert_choice'" in msg
    with pytest.raises(TypeError, match="'groupsize'"):  # explicit names: no catch-all
        create_channel_mixer("moe", DIM, hidden_dim=HIDDEN, options={"groupsize": 2})


# ---- traced and exported programs at another batch size ----------------------------------------------


@pytest.mark.parametrize("how", ["jit.trace", "torch.export"])
@pytest.mark.parametrize("which", ["expert_choice", "soft_moe"])
def test_expert_choice_and_soft_moe_export_at_another_batch_size(which: str, how: str) -> None:
    m = (_moe(router="expert_choice", capacity_factor=0.75) if which == "expert_choice" else _soft()).eval()
    example = torch.randn(2, 16, DIM)
    if how == "jit.trace":
        program = torch.jit.trace(m, example)
    else:
        batch = torch.export.Dim("batch", min=1, max=64)
        program = torch.export.export(m, (example,), dynamic_shapes=({0: batch},)).module()
    x = torch.randn(5, 16, DIM)
    with torch.no_grad():
        torch.testing.assert_close(program(x), m(x), atol=1e-5, rtol=1e-5)


def test_expert_choice_refuses_to_trace_a_batch_dependent_grouping() -> None:
    m = _moe(router="expert_choice", group_size=None).eval()
    with pytest.raises(RuntimeError, match="group_size=1"):
        torch.jit.trace(m, torch.randn(2, 16, DIM))


# ---- whole models: an image's eval logits alone and inside a batch of 64 others ----------------------

ROUTER_MODELS = {
    # every router with its default settings
    "widenet": ("zoo_widenet_mini_32", {}),
    "widenet_bpr": ("zoo_widenet_mini_32", {"channel_options": {**MOE_OPTIONS, "batch_priority": True}}),
    "widenet_expert_choice": ("zoo_widenet_mini_32", {"channel_options": {**MOE_OPTIONS, "router": "expert_choice"}}),
    "poolformer_moe": ("zoo_poolformer_mini_32", {"channel_mixer": "moe"}),
    "poolformer_moe_bpr": (
        "zoo_poolformer_mini_32",
        {"channel_mixer": "moe", "channel_options": {"batch_priority": True}},
    ),
    "poolformer_moe_expert_choice": (
        "zoo_poolformer_mini_32",
        {"channel_mixer": "moe", "channel_options": {"router": "expert_choice"}},
    ),
    "poolformer_soft_moe": ("zoo_poolformer_mini_32", {"channel_mixer": "soft_moe"}),
    "widenet_soft_moe": ("zoo_widenet_mini_32", {"channel_mixer": "soft_moe"}),
    # a capacity asked for in eval: drops happen, still within each image
    "widenet_eval_capacity": ("zoo_widenet_mini_32", {"channel_options": {**MOE_OPTIONS, "eval_capacity_factor": 1.0}}),
    "widenet_bpr_eval_capacity": (
        "zoo_widenet_mini_32",
        {"channel_options": {**MOE_OPTIONS, "batch_priority": True, "eval_capacity_factor": 1.0}},
    ),
}


def _model(name: str, overrides: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=10, **overrides).eval()
    with torch.no_grad():  # a decisive router (random init is near-uniform): no near-ties to flip
        for m in model.modules():
            if isinstance(m, MoE):
                m.router.weight.normal_(std=0.2)
    return model


def _alone_and_in_batch(model: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = torch.randn(65, 3, 32, 32, generator=g)
    with torch.no_grad():
        in_batch = model(batch)[37]  # the image between 37 before and 27 after
        alone = model(batch[37:38])[0]
    return alone, in_batch


@pytest.mark.parametrize("case", sorted(ROUTER_MODELS))
def test_eval_logits_of_an_image_are_the_same_alone_and_in_a_batch_of_64_others(case: str) -> None:
    name, overrides = ROUTER_MODELS[case]
    model = _model(name, overrides)
    alone, in_batch = _alone_and_in_batch(model)
    torch.testing.assert_close(alone, in_batch, rtol=1e-4, atol=1e-4)
    if "eval_capacity" in case:  # the comparison covers dropped tokens
        moe = next(m for m in model.modules() if isinstance(m, MoE))
        assert int(moe.last_stats["dropped_tokens"]) > 0


def test_the_batch_coupled_routing_would_fail_that_test() -> None:
    """The check has teeth: one routing group for the whole batch, with an eval capacity."""
    model = _model(
        "zoo_widenet_mini_32", {"channel_options": {**MOE_OPTIONS, "group_size": None, "eval_capacity_factor": 1.0}}
    )
    alone, in_batch = _alone_and_in_batch(model)
    assert (alone - in_batch).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("case", "fmt"),
    [
        ("widenet_expert_choice", "exported"),
        ("widenet_bpr_eval_capacity", "torchscript"),
        ("poolformer_soft_moe", "exported"),
    ],
)
def test_models_with_each_router_export_at_another_batch_size(case: str, fmt: str, tmp_path) -> None:
    """The default router's round trip, in all three formats, is test_pretrained_io's
    test_export_round_trip (every shipped family); the layers' own in both formats are above."""
    name, overrides = ROUTER_MODELS[case]
    assert export_and_check(_model(name, overrides), fmt, tmp_path / f"m.{fmt}", img_size=32) <= 1e-4
