"""MoE layer against naive per-token references: routing, capacity, drops, losses, sharing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo.layers.mlp import CHANNEL_MIXERS, Mlp
from zoo.layers.moe import MoE, collect_aux_loss, moe_modules, reset_aux_loss

DIM, HIDDEN = 8, 12


def _moe(**kw) -> MoE:
    torch.manual_seed(0)
    m = MoE(DIM, hidden_dim=HIDDEN, **kw)
    with torch.no_grad():  # non-zero biases so the references check them too
        m.fc1_bias.normal_(std=0.1)
        m.fc2_bias.normal_(std=0.1)
        m.router.weight.normal_(std=1.0)  # decisive routing: no near-ties between experts
    return m


def _expert(m: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    h = F.gelu(F.linear(x, m.fc1_weight[e], m.fc1_bias[e]))
    return F.linear(h, m.fc2_weight[e], m.fc2_bias[e])


def _naive(
    m: MoE, x: torch.Tensor, factor: float | None, group_tokens: int | None = None, batch_priority: bool = False
) -> tuple[torch.Tensor, dict[str, object]]:
    """Per-token reference, one routing group (``group_tokens`` consecutive tokens) at a time:
    capacity ``min(n, ceil(factor * n * k / E))`` per group of ``n`` tokens (``None``: unlimited);
    GShard priority (all first choices, then second, each in token order -- or, with
    ``batch_priority``, in order of the token's top-1 probability, highest first)."""
    tokens = x.reshape(-1, DIM)
    num_tokens = tokens.shape[0]
    group_tokens = group_tokens or num_tokens
    probs = F.linear(tokens, m.router.weight).softmax(-1)
    gates, experts = probs.topk(m.top_k, dim=-1)
    top1 = gates[:, 0].clone()
    if m.normalize_top_k and m.top_k > 1:
        gates = gates / gates.sum(-1, keepdim=True)
    routed = torch.bincount(experts.flatten(), minlength=m.num_experts).tolist()
    kept, kept_load = set(), [0] * m.num_experts
    for g0 in range(0, num_tokens, group_tokens):
        members = list(range(g0, min(num_tokens, g0 + group_tokens)))
        n = len(members)
        capacity = None if factor is None else min(n, math.ceil(factor * n * m.top_k / m.num_experts))
        if batch_priority:
            members.sort(key=lambda t: -float(top1[t]))  # Python's sort is stable: ties keep token order
        load = [0] * m.num_experts
        for r in range(m.top_k):
            for t in members:
                e = int(experts[t, r])
                if capacity is None or load[e] < capacity:
                    load[e] += 1
                    kept.add((t, r))
        kept_load = [a + b for a, b in zip(kept_load, load, strict=True)]
    every = torch.stack([_expert(m, e, tokens) for e in range(m.num_experts)])  # (E, T, C)
    out = torch.zeros_like(tokens)
    for t in range(num_tokens):
        for r in range(m.top_k):
            if (t, r) in kept:
                out[t] += gates[t, r] * every[int(experts[t, r]), t]
    unrouted = sum(all((t, r) not in kept for r in range(m.top_k)) for t in range(num_tokens))
    dropped = m.top_k * num_tokens - len(kept)
    stats = {"dropped": dropped, "unrouted": unrouted, "load": kept_load, "routed": routed, "kept": kept}
    return out.view(x.shape), stats


def test_single_expert_equals_plain_mlp() -> None:
    torch.manual_seed(0)
    mlp = Mlp(DIM, hidden_dim=HIDDEN).eval()
    with torch.no_grad():
        mlp.fc1.bias.normal_()
        mlp.fc2.bias.normal_()
    moe = MoE(DIM, hidden_dim=HIDDEN, num_experts=1, top_k=1, capacity_factor=None).eval()
    with torch.no_grad():
        moe.fc1_weight[0].copy_(mlp.fc1.weight)
        moe.fc1_bias[0].copy_(mlp.fc1.bias)
        moe.fc2_weight[0].copy_(mlp.fc2.weight)
        moe.fc2_bias[0].copy_(mlp.fc2.bias)
    x = torch.randn(3, 5, DIM)
    torch.testing.assert_close(moe(x), mlp(x), rtol=1e-5, atol=1e-5)
    moe.train()  # training path too (noise cannot change a single expert's gate of 1.0)
    torch.testing.assert_close(moe(x), mlp(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trim", [True, False])
@pytest.mark.parametrize("capacity_factor", [None, 8.0])
def test_ample_capacity_equals_naive_gate_weighted_sum(capacity_factor, trim: bool) -> None:
    """``None`` is unlimited (so is ``<= 0``, see test_capacity_formula); 8.0 exceeds any load."""
    m = _moe(
        num_experts=4,
        top_k=2,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        trim_capacity=trim,
    ).eval()
    x = torch.randn(2, 3, 5, DIM)  # (B, H, W, C): all leading dims are tokens, one group an image
    expected, stats = _naive(m, x, factor=None)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    assert stats["dropped"] == 0 and int(m.last_stats["dropped_tokens"]) == 0
    assert m.last_stats["groups"] == 2 and m.last_stats["group_tokens"] == 15


def test_eval_drops_nothing_unless_asked() -> None:
    """Token choice in eval: ``eval_capacity_factor=None`` (default) is unlimited, whatever the
    training capacity; a number asks for that capacity in eval."""
    m = _moe(num_experts=4, top_k=2, capacity_factor=0.25).eval()
    x = torch.randn(3, 20, DIM)
    expected, _ = _naive(m, x, factor=None)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    assert int(m.last_stats["dropped_tokens"]) == 0 and m.capacity(20) == 20
    m.train()
    assert m.capacity(20) == math.ceil(0.25 * 20 * 2 / 4)
    asked = _moe(num_experts=4, top_k=2, capacity_factor=8.0, eval_capacity_factor=0.25).eval()
    y = asked(x)
    expected, stats = _naive(asked, x, factor=0.25, group_tokens=20)
    assert stats["dropped"] > 0 and int(asked.last_stats["dropped_tokens"]) == stats["dropped"]
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_top1_keeps_raw_probability_as_gate() -> None:
    m = _moe(num_experts=4, top_k=1, capacity_factor=None).eval()
    x = torch.randn(10, DIM)
    expected, _ = _naive(m, x, factor=None)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trim", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("group_size", [None, 1, 3])
def test_tight_capacity_drops_like_naive_count(top_k: int, trim: bool, group_size) -> None:
    """A capacity per routing group: the whole call (``None``), each image, or 3 images (the
    batch of 7 ends with a group of one image, which gets its own smaller capacity)."""
    m = _moe(
        num_experts=4,
        top_k=top_k,
        capacity_factor=0.5,
        eval_capacity_factor=0.5,
        trim_capacity=trim,
        group_size=group_size,
    ).eval()
    with torch.no_grad():  # crowd expert 0 so that whole tokens get dropped, not only 2nd choices
        m.router.weight[0] = m.router.weight[0] * 0.1 + 0.5
    x = torch.randn(7, 6, DIM).abs()  # positive inputs so expert 0's row dominates
    num_tokens = 42
    group_tokens = {None: 42, 1: 6, 3: 18}[group_size]
    assert m.group_tokens(x.shape) == group_tokens
    capacity = math.ceil(0.5 * group_tokens * top_k / 4)
    assert m.capacity(group_tokens) == capacity
    y = m(x)
    expected, stats = _naive(m, x, factor=0.5, group_tokens=group_tokens)
    s = m.last_stats
    assert stats["dropped"] > 0 and stats["unrouted"] > 0, "test must exercise drops"
    assert s["groups"] == -(-num_tokens // group_tokens) and s["capacity"] == capacity
    assert int(s["dropped_tokens"]) == stats["dropped"]
    assert int(s["unrouted_tokens"]) == stats["unrouted"]
    assert s["expert_counts"].tolist() == stats["routed"]
    assert s["kept_counts"].tolist() == stats["load"]
    assert float(s["dropped_fraction"]) == pytest.approx(stats["dropped"] / (top_k * num_tokens))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # tokens dropped by every expert come out as exact zeros (the block's residual carries them)
    dropped_rows = (expected.reshape(-1, DIM) == 0).all(dim=-1)
    assert int(dropped_rows.sum()) == stats["unrouted"]
    assert torch.count_nonzero(y.reshape(-1, DIM)[dropped_rows]) == 0


def test_capacity_formula() -> None:
    m = MoE(DIM, hidden_dim=HIDDEN, num_experts=4, top_k=2, capacity_factor=1.2, eval_capacity_factor=2.0)
    assert m.train().capacity(197) == math.ceil(1.2 * 197 * 2 / 4)
    assert m.eval().capacity(197) == math.ceil(2.0 * 197 * 2 / 4)
    assert MoE(DIM, hidden_dim=HIDDEN).eval().capacity(197) == 197  # eval: drops nothing unless asked
    assert MoE(DIM, hidden_dim=HIDDEN, capacity_factor=None).capacity(197) == 197
    assert MoE(DIM, hidden_dim=HIDDEN, capacity_factor=0.0).capacity(197) == 197
    assert MoE(DIM, hidden_dim=HIDDEN, capacity_factor=100.0).capacity(197) == 197  # never above T
    ec = MoE(DIM, hidden_dim=HIDDEN, router="expert_choice", capacity_factor=1.0)
    assert ec.train().capacity(64) == ec.eval().capacity(64) == 32  # its capacity is its routing


def test_group_tokens_follow_the_image_axis() -> None:
    m = MoE(DIM, hidden_dim=HIDDEN)
    assert m.group_tokens((5, 7, DIM)) == 7 and m.group_tokens((5, 2, 3, DIM)) == 6  # one image
    assert m.group_tokens((40, DIM)) == 40  # a 2-D input is one image
    assert MoE(DIM, hidden_dim=HIDDEN, group_size=4).group_tokens((5, 7, DIM)) == 28
    assert MoE(DIM, hidden_dim=HIDDEN, group_size=8).group_tokens((5, 7, DIM)) == 35  # never above T
    assert MoE(DIM, hidden_dim=HIDDEN, group_size=None).group_tokens((5, 7, DIM)) == 35


def test_balance_and_z_loss_match_formula_and_gradients_reach_everything() -> None:
    m = _moe(num_experts=4, top_k=2, balance_loss_weight=0.01, z_loss_weight=1e-3, router_noise=0.0)
    m.train()
    x = torch.randn(64, DIM)
    y = m(x)
    logits = F.linear(x, m.router.weight)
    probs = logits.softmax(-1)
    counts = torch.zeros(4)
    for e in probs.topk(2, dim=-1).indices.flatten().tolist():
        counts[e] += 1
    balance = 4 * torch.sum(counts / counts.sum() * probs.mean(0))
    z = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(m.aux_loss, 0.01 * balance + 1e-3 * z, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m.last_stats["balance_loss"], balance.detach())
    (y.square().sum() + collect_aux_loss(m)).backward()
    assert m.router.weight.grad.abs().sum() > 0
    for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
        grad = getattr(m, name).grad
        assert all(grad[e].abs().sum() > 0 for e in range(4)), f"an expert got no gradient in {name}"


def test_router_learns_from_task_loss_alone() -> None:
    for top_k in (1, 2):
        m = _moe(num_experts=4, top_k=top_k, balance_loss_weight=0.0).train()
        m(torch.randn(32, DIM)).square().sum().backward()
        assert m.router.weight.grad.abs().sum() > 0


def test_balance_loss_is_one_when_routing_is_uniform() -> None:
    m = MoE(DIM, hidden_dim=HIDDEN, num_experts=4, top_k=1, router_noise=0.0, balance_loss_weight=1.0)
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(4, DIM) * 50)  # token i -> expert i, probabilities ~one-hot
    m(torch.eye(4, DIM).repeat(5, 1))
    assert float(collect_aux_loss(m).detach()) == pytest.approx(1.0, abs=1e-4)


class _SharedStack(nn.Module):
    """WideNet-style: one MoE shared by all blocks, each block with its own norm."""

    def __init__(self, moe: MoE, depth: int, extra: MoE | None = None) -> None:
        super().__init__()
        self.moe = moe
        self.norms = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(depth))
        self.blocks_moe = nn.ModuleList([moe] * depth)  # the same module registered again
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, moe in zip(self.norms, self.blocks_moe, strict=True):
            x = x + moe(norm(x))
        return x if self.extra is None else x + self.extra(x)


def test_aux_loss_of_a_shared_module_accumulates_over_calls_and_collect_resets() -> None:
    shared, extra = _moe(router_noise=0.0), _moe(router_noise=0.0)
    model = _SharedStack(shared, depth=3, extra=extra).train()
    assert len(moe_modules(model)) == 2  # shared module counted once
    x = torch.randn(2, 6, DIM)

    # Reference: the same forward, collecting after every single call.
    per_call = []
    h = x
    for norm in model.norms:
        h = h + shared(norm(h))
        per_call.append(collect_aux_loss(shared))
    h = h + extra(h)
    per_call.append(collect_aux_loss(extra))
    assert all(float(v.detach()) > 0 for v in per_call)

    out = model(x)
    torch.testing.assert_close(out, h)
    assert shared.aux_loss_calls == 3 and extra.aux_loss_calls == 1
    total = collect_aux_loss(model)
    torch.testing.assert_close(total, torch.stack(per_call).sum())
    assert shared.aux_loss is None and extra.aux_loss is None  # collect reset them
    assert float(collect_aux_loss(model)) == 0.0

    model(x)
    reset_aux_loss(model)
    assert float(collect_aux_loss(model)) == 0.0
    assert float(collect_aux_loss(nn.Linear(2, 2))) == 0.0  # no MoE at all


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_recompute_adds_no_aux_loss(use_reentrant: bool) -> None:
    from torch.utils.checkpoint import checkpoint

    m = _moe(router_noise=1.0).train()
    x = torch.randn(2, 9, DIM, requires_grad=True)
    torch.manual_seed(1)
    expected_y = m(x)
    expected_aux = collect_aux_loss(m)
    torch.manual_seed(1)  # checkpoint preserves the RNG state, so the noisy routing is replayed
    y = checkpoint(m, x, use_reentrant=use_reentrant)
    aux = collect_aux_loss(m)
    torch.testing.assert_close(y, expected_y)
    torch.testing.assert_close(aux, expected_aux)
    (y.square().sum() + aux).backward()  # recomputes the forward inside backward
    assert m.aux_loss is None and m.aux_loss_calls == 0, "the recompute left a stale aux loss"


def test_bf16_autocast_on_cpu() -> None:
    m = _moe(capacity_factor=None).eval()
    x = torch.randn(4, 10, DIM)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    assert m.aux_loss.dtype == torch.float32  # router and losses stay fp32
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(x).float().square().mean() + collect_aux_loss(m)
    loss.backward()
    assert m.router.weight.grad is not None and m.fc1_weight.grad is not None


@pytest.mark.parametrize(
    "routing",
    [{}, {"batch_priority": True}, {"router": "expert_choice"}, {"group_size": 3}, {"group_size": None}],
    ids=["default", "bpr", "expert_choice", "groups_of_3", "one_group"],
)
def test_torch_compile_fullgraph_matches_eager(routing) -> None:
    m = _moe(capacity_factor=0.75, router_noise=0.0, **routing).train()
    x = torch.randn(5, 16, DIM)  # with groups of 3 images, the last group holds 2
    eager = m(x)
    eager_aux = collect_aux_loss(m)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(collect_aux_loss(m), eager_aux)
    y.sum().backward()
    assert m.fc1_weight.grad is not None


def test_registered_and_validates_arguments() -> None:
    assert CHANNEL_MIXERS["moe"] is MoE
    with pytest.raises(ValueError, match="top_k"):
        MoE(DIM, hidden_dim=HIDDEN, num_experts=2, top_k=3)
    m = MoE(DIM, hidden_dim=HIDDEN, bias=False, capacity_factor=None).eval()
    assert m.fc1_bias is None and m.fc2_bias is None
    assert m(torch.randn(5, DIM)).shape == (5, DIM)


@pytest.mark.parametrize(
    ("capacity_factor", "group_size", "batch_priority"),
    [
        (0.5, 1, False),
        (0.5, 1, True),
        (0.5, 3, False),
        (0.5, None, False),
        (1.2, 1, False),
        (None, 1, False),
    ],
)
@pytest.mark.parametrize("how", ["jit.trace", "torch.export"])
def test_exported_moe_matches_eager_at_another_batch_size(
    capacity_factor, group_size, batch_priority, how: str
) -> None:
    """Traced/exported programs take the traceable path: same drops and outputs as the indexed
    eager path, for a batch size other than the one traced (groups and capacities follow the
    token count; with ``group_size=3`` the batch of 5 ends with a group of 2 images)."""
    m = _moe(
        num_experts=4,
        top_k=2,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        group_size=group_size,
        batch_priority=batch_priority,
    ).eval()
    example = torch.randn(2, 16, DIM)
    if how == "jit.trace":
        program = torch.jit.trace(m, example)
    else:
        batch = torch.export.Dim("batch", min=1, max=64)
        program = torch.export.export(m, (example,), dynamic_shapes=({0: batch},)).module()
    x = torch.randn(5, 16, DIM)
    with torch.no_grad():
        expected = m(x)
        if capacity_factor == 0.5:
            assert m.last_stats["dropped_tokens"] > 0  # the comparison covers dropped assignments
        torch.testing.assert_close(program(x), expected, atol=1e-5, rtol=1e-5)
