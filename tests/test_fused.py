"""The fused-backward training Functions (zoo/layers/fused.py) against the plain autograd ops.

Each module is run twice, ``FUSED_BACKWARD`` on and off, and the outputs and every gradient must
agree: bit for bit for the MLP, on tokens and on maps (the same ops in the same order), to float64
rounding for gMLP's gated unit (whose token-projection gradients are taken per image instead of on a transposed copy).
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn

import zoo
import zoo.layers.fused as fused_mod
import zoo.layers.moe as moe_mod
from zoo.layers.mixers import SpatialGating
from zoo.layers.mlp import GluMlp, Mlp
from zoo.layers.moe import MoE
from zoo.layers.soft_moe import SoftMoE

DIM, HIDDEN, TOKENS = 16, 24, 6


def fused_taken(out: torch.Tensor) -> bool:
    fn = out.grad_fn
    while type(fn).__name__ in ("ViewBackward0", "PermuteBackward0"):  # MapMlp's layout views
        fn = fn.next_functions[0][0]
    return type(fn).__name__ in ("GeluMlpFunctionBackward", "SpatialGatingFunctionBackward")


def mlp(**kw) -> nn.Module:
    return Mlp(DIM, hidden_dim=HIDDEN, **kw)


class MapMlp(Mlp):
    """The MLP as PoolFormer's blocks call it: ``forward_nchw`` on a channels_last map."""


def map_mlp(**kw) -> nn.Module:
    return MapMlp(DIM, hidden_dim=HIDDEN, **kw)


def sgu(**kw) -> nn.Module:
    torch.manual_seed(0)
    module = SpatialGating(DIM, num_tokens=TOKENS, ffn_ratio=3.0, **kw)
    with torch.no_grad():  # weights that make the token projection and the norm's affine matter
        for p in (module.proj.weight, module.norm.weight, module.norm.bias):
            p.add_(torch.randn_like(p) * 0.5)
    return module


def call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Tokens (B, 6, C) in and out; a MapMlp sees them as a channels_last (B, C, 2, 3) map."""
    if isinstance(module, MapMlp):
        B, N, C = x.shape
        out = module.forward_nchw(x.view(B, 2, 3, C).permute(0, 3, 1, 2))  # (B, 2, 3, C) -> (B, C, 2, 3) view
        return out.permute(0, 2, 3, 1).view(B, N, C)  # (B, C, 2, 3) channels_last -> (B, N, C) view
    return module(x, (2, 3)) if isinstance(module, SpatialGating) else module(x)


def run(
    module,
    x,
    *,
    fused: bool,
    monkeypatch,
    loss=lambda out: (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum(),
):
    """Output, input gradient (if any) and parameter gradients of one forward+backward."""
    monkeypatch.setattr(fused_mod, "FUSED_BACKWARD", fused)
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    out = call(module, x)
    assert fused_taken(out) is fused  # the path asked for was taken
    loss(out).backward()
    return [out.detach(), *([x.grad] if x.requires_grad else []), *(p.grad for p in module.parameters())]


def assert_same(plain: list, fused: list, *, exact: bool) -> None:
    assert len(plain) == len(fused)
    for p, f in zip(plain, fused, strict=True):
        if exact:
            assert torch.equal(p, f)
        else:
            torch.testing.assert_close(f, p, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [mlp, map_mlp], ids=["tokens", "map"])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False], ids=["input_grad", "frozen_input"])
def test_fused_mlp_is_bit_identical_to_autograd(make, act, bias, input_grad, monkeypatch):
    torch.manual_seed(0)
    module = make(act=act, bias=bias).train()
    x = torch.randn(2, TOKENS, DIM, requires_grad=input_grad)
    assert_same(
        run(module, x, fused=False, monkeypatch=monkeypatch),
        run(module, x, fused=True, monkeypatch=monkeypatch),
        exact=True,
    )


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("input_grad", [True, False], ids=["input_grad", "frozen_input"])
def test_fused_spatial_gating_matches_autograd(act, input_grad, monkeypatch):
    module = sgu(act=act).double().train()
    x = torch.randn(3, TOKENS, DIM, dtype=torch.float64, requires_grad=input_grad)
    plain = run(module, x, fused=False, monkeypatch=monkeypatch)
    fused = run(module, x, fused=True, monkeypatch=monkeypatch)
    assert torch.equal(plain[0], fused[0])  # the forward runs the same ops
    assert_same(plain, fused, exact=False)


def test_fused_spatial_gating_float32_gradients_agree(monkeypatch):
    module = sgu().train()
    x = torch.randn(4, TOKENS, DIM, requires_grad=True)
    plain, fused = (
        run(module, x, fused=on, monkeypatch=monkeypatch, loss=lambda out: out.square().sum()) for on in (False, True)
    )
    assert torch.equal(plain[0], fused[0])
    for p, f in zip(plain[1:], fused[1:], strict=True):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [mlp, map_mlp, sgu], ids=["mlp", "map_mlp", "spatial_gating"])
def test_fused_path_is_taken_only_where_it_computes_the_same_thing(make):
    x = torch.randn(2, TOKENS, DIM, requires_grad=True)
    module = make().train()
    assert fused_taken(call(module, x))
    with torch.no_grad():
        assert not fused_taken(call(module, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts inside the plain ops
        assert not fused_taken(call(module, x))
    assert not fused_taken(call(make(drop=0.1).train(), x))  # dropout inside the unit
    assert fused_taken(call(make(drop=0.1).eval(), x))  # ... inactive in eval
    assert not fused_taken(call(make(act="relu"), x))
    assert not fused_taken(call(make().bfloat16(), x.bfloat16()))
    assert not fused_taken(call(make().requires_grad_(False), x.detach()))  # nothing to differentiate
    seen = []
    module.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))  # hooks on the parts must fire
    assert not fused_taken(call(module, x))
    assert len(seen) == (0 if make is map_mlp else 1)  # on maps fc1 is a weight of a convolution, not called
    assert not fused_taken(call(GluMlp(DIM, hidden_dim=HIDDEN, act="gelu"), x))


def both_paths(make, monkeypatch, backward) -> list[list[torch.Tensor]]:
    """``backward(out, x)`` on the plain and then the fused path, each from zeroed gradients; what it
    returns, then the parameters' gradients."""
    module = make().double().train()
    x = torch.randn(2, TOKENS, DIM, dtype=torch.float64, requires_grad=True)
    results = []
    for fused in (False, True):
        monkeypatch.setattr(fused_mod, "FUSED_BACKWARD", fused)
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = call(module, x)
        assert fused_taken(out) is fused
        results.append([*backward(out, x), *(p.grad for p in module.parameters())])
    return results


@pytest.mark.parametrize("make", [mlp, map_mlp, sgu], ids=["mlp", "map_mlp", "spatial_gating"])
def test_fused_double_backward_matches_the_plain_ops(make, monkeypatch):
    # A gradient penalty differentiates the input gradient again (create_graph=True).
    def penalty(out, x):
        (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        grad_x.square().sum().backward()
        return [grad_x.detach()]

    assert_same(*both_paths(make, monkeypatch, penalty), exact=False)


@pytest.mark.parametrize("make", [mlp, map_mlp, sgu], ids=["mlp", "map_mlp", "spatial_gating"])
def test_fused_second_backward_through_a_retained_graph(make, monkeypatch):
    # The first backward writes over saved activations; a second one (retain_graph=True, e.g. one
    # backward per loss) must recompute them, not read gradients as activations.
    def two_losses(out, x):
        out.square().sum().backward(retain_graph=True)
        out.sum().backward()
        return [x.grad]

    assert_same(*both_paths(make, monkeypatch, two_losses), exact=False)


@pytest.mark.parametrize("name", ["zoo_vit_mini_32", "zoo_gmlp_mini_32", "zoo_poolformer_mini_32"])
def test_fused_models_train_like_the_plain_ones_with_and_without_checkpointing(name, monkeypatch):
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=10).double().train()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    results = []
    for fused, checkpointed in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(fused_mod, "FUSED_BACKWARD", fused)
        model.set_grad_checkpointing(checkpointed)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same drop-path draws
        model(x).logsumexp(1).sum().backward()
        results.append([p.grad.clone() for p in model.parameters()])
    for grads in results[1:]:
        assert_same(results[0], grads, exact=False)


def test_tracing_records_the_plain_ops():
    traced = torch.jit.trace(mlp().train(), torch.randn(2, 5, DIM, requires_grad=True))
    assert "PythonOp" not in str(traced.graph)


# ---------------------------------------------------------------- PoolFormer's token-mixer branch


def pool_block(norm: str = "groupnorm1", layer_scale=1e-5, res_scale=None, drop_path=0.0) -> nn.Module:
    """A PoolFormer block whose norm, scales and bias are far from their inits, so each matters."""
    from zoo.models.backbone import Block

    torch.manual_seed(0)
    block = Block(
        DIM,
        token_mixer=zoo.layers.mixers.Pooling(DIM),
        channel_mixer=None,
        norm=norm,
        layout="nchw",
        layer_scale=layer_scale,
        drop_path=drop_path,
        res_scale=res_scale,
    )
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1)
    return block


def pool_taken(out: torch.Tensor) -> bool:
    return type(out.grad_fn).__name__ == "PoolingResidualFunctionBackward"


def pool_run(block, x, *, fused: bool, monkeypatch, seed=0) -> list[torch.Tensor]:
    """Output, input gradient and parameter gradients (None as zeros) of one forward + backward."""
    monkeypatch.setattr(fused_mod, "FUSED_BACKWARD", fused)
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # the same drop-path draws on both paths
    out = block(x, x.shape[-2:])
    assert pool_taken(out) is fused
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in block.parameters()]
    return [out.detach(), x.grad, *grads]


def assert_pool_same(block, plain: list, fused: list, *, rtol: float, atol: float, bias_noise: float) -> None:
    """``pool_run``'s outputs and gradients agree; the norm's bias, which cancels in pool(n) - n,
    gets an exact 0 from the fused branch and rounding noise (relative to the input gradient) from the plain ops."""
    names = ["out", "x", *(n for n, _ in block.named_parameters())]
    for name, p, f in zip(names, plain, fused, strict=True):
        if name == "norm1.bias":
            assert torch.equal(f, torch.zeros_like(f)) and p.abs().max() < bias_noise * plain[1].abs().max()
        else:
            torch.testing.assert_close(f, p, rtol=rtol, atol=atol, msg=name)


POOL_BLOCKS = {
    "poolformer": {},  # GroupNorm with bias, layer scale
    "no_layer_scale": {"layer_scale": None},
    "v2_res_scale": {"norm": "groupnorm1_nobias", "layer_scale": None, "res_scale": 1.0},  # PoolFormerV2
    "both_scales": {"res_scale": 1.0},
    "drop_path": {"drop_path": 0.4},
}


@pytest.mark.parametrize("kind", list(POOL_BLOCKS))
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["cl", "nchw"])
def test_fused_pooling_branch_matches_the_plain_ops(kind, memory_format, monkeypatch):
    block = pool_block(**POOL_BLOCKS[kind]).double().train()
    # a map with an offset and a scale per sample: GroupNorm's statistics must matter
    x = torch.randn(4, DIM, 5, 7, dtype=torch.float64) * torch.tensor([0.5, 1, 2, 3]).view(4, 1, 1, 1).double() + 1
    x = x.contiguous(memory_format=memory_format)
    plain = pool_run(block, x, fused=False, monkeypatch=monkeypatch)
    fused = pool_run(block, x, fused=True, monkeypatch=monkeypatch)
    assert fused[0].is_contiguous(memory_format=memory_format)
    if kind == "drop_path":  # some samples dropped, some kept: the draws were timm's
        kept = (fused[0] - x).flatten(1).abs().amax(1) > 0
        assert 0 < kept.sum() < 4
    assert_pool_same(block, plain, fused, rtol=1e-10, atol=1e-12, bias_noise=1e-9)


def test_fused_pooling_branch_float32_agrees_to_rounding(monkeypatch):
    block = pool_block().train()
    x = torch.randn(3, DIM, 8, 8).contiguous(memory_format=torch.channels_last) * 2 + 0.5
    plain, fused = (pool_run(block, x, fused=on, monkeypatch=monkeypatch) for on in (False, True))
    assert_pool_same(block, plain, fused, rtol=1e-5, atol=1e-6, bias_noise=1e-4)


def test_fused_pooling_function_passes_gradcheck():
    from zoo.layers.fused import PoolingResidualFunction

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w, b, ls, rs = (torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(4))
    keep = torch.tensor([0.0, 2.0], dtype=torch.float64, requires_grad=True)  # one sample dropped
    inputs = (x, w, b, ls, rs, keep)

    def fn(*args):
        return PoolingResidualFunction.apply(*args, 1e-5, 3)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)  # create_graph=True recomputes the plain ops


def test_fused_pooling_in_eval_gives_the_plain_output(monkeypatch):
    from zoo.layers.fused import PoolingResidualFunction

    calls = []
    real_apply = PoolingResidualFunction.apply
    monkeypatch.setattr(PoolingResidualFunction, "apply", lambda *a: calls.append(1) or real_apply(*a))
    block = pool_block(drop_path=0.3).eval()
    x = torch.randn(2, DIM, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        monkeypatch.setattr(fused_mod, "FUSED_BACKWARD", False)
        plain = block(x, (6, 6))
        assert not calls
        monkeypatch.setattr(fused_mod, "FUSED_BACKWARD", True)
        rng = torch.get_rng_state()
        fused = block(x, (6, 6))
        assert calls == [1] and torch.equal(torch.get_rng_state(), rng)  # taken; no drop-path draw in eval
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_fused_pooling_is_taken_only_where_it_computes_the_same_thing():
    x = torch.randn(2, DIM, 6, 6, requires_grad=True)
    assert pool_taken(pool_block().train()(x, (6, 6)))
    assert not pool_taken(pool_block(norm="layernorm").train()(x, (6, 6)))  # not a one-group norm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not pool_taken(pool_block().train()(x, (6, 6)))
    assert not pool_taken(pool_block().bfloat16().train()(x.bfloat16(), (6, 6)))
    block, seen = pool_block().train(), []
    block.norm1.register_forward_hook(lambda m, i, o: seen.append(o.shape))  # hooks on the parts must fire
    assert not pool_taken(block(x, (6, 6)))
    assert seen == [x.shape]
    graph = str(torch.fx.symbolic_trace(pool_block().train(), concrete_args={"grid": (6, 6)}).graph)
    assert "PoolingResidualFunction" not in graph and "token_mixer_pool" in graph  # FX records the plain ops


def test_fused_pooling_second_backward_through_a_retained_graph(monkeypatch):
    block = pool_block().double().train()
    x = torch.randn(2, DIM, 5, 5, dtype=torch.float64)
    results = []
    for fused in (False, True):
        monkeypatch.setattr(fused_mod, "FUSED_BACKWARD", fused)
        block.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        out = block(xg, (5, 5))
        assert pool_taken(out) is fused
        out.square().sum().backward(retain_graph=True)  # writes over the saved pool in the fused path
        out.sum().backward()
        results.append([xg.grad, *(p.grad for p in block.parameters())])
    assert_same(*results, exact=False)


# --- the experts of MoE and Soft MoE (GeluExpertsFunction) ---------------------------------------


def graph_has(out: torch.Tensor, node: str) -> bool:
    """Whether autograd's graph behind ``out`` holds a node of type ``node`` anywhere."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        if type(fn).__name__ == node:
            return True
        seen.add(fn)
        todo += [next_fn for next_fn, _ in fn.next_functions]
    return False


def experts(kind: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    common = dict(hidden_dim=HIDDEN, num_experts=4, **kw)
    if kind == "soft_moe":
        return SoftMoE(DIM, slots_per_expert=2, **common)
    return MoE(DIM, router=kind, top_k=2, capacity_factor=1.0, **common)  # tight: some tokens dropped


def experts_run(module, x, *, fused: bool, monkeypatch, backward=None) -> list[torch.Tensor]:
    """Output, input gradient (if x requires grad), what ``backward`` returns, and the gradient of
    every parameter that requires one."""
    monkeypatch.setattr(fused_mod, "FUSED_BACKWARD", fused)
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(1)  # the same router noise
    out = module(x)
    assert graph_has(out, "GeluExpertsFunctionBackward") is fused  # the path asked for was taken
    extra = (backward or (lambda out, x: (out * torch.linspace(-1, 1, DIM, dtype=out.dtype)).sum().backward()))(out, x)
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    return [out.detach(), *([x.grad] if x.requires_grad else []), *(extra or []), *grads]


FROZEN = {  # which of the Function's inputs need no gradient (its needs_input_grad)
    "nothing": (),
    "fc1": ("fc1_weight", "fc1_bias"),
    "fc2": ("fc2_weight", "fc2_bias"),
    "experts": ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"),
    "input": (),
}


@pytest.mark.parametrize("kind", ["token_choice", "expert_choice", "soft_moe"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_fused_experts_are_bit_identical_to_autograd(kind, bias, act, monkeypatch):
    module = experts(kind, bias=bias, act=act).train()
    x = torch.randn(3, TOKENS, DIM, requires_grad=True)
    plain = experts_run(module, x, fused=False, monkeypatch=monkeypatch)
    fused = experts_run(module, x, fused=True, monkeypatch=monkeypatch)
    assert len(plain) == len(fused) == 2 + len(list(module.parameters()))  # output, input, every parameter
    assert_same(plain, fused, exact=True)


@pytest.mark.parametrize("kind", ["token_choice", "soft_moe"])
@pytest.mark.parametrize("frozen", list(FROZEN))
def test_fused_experts_give_the_gradients_asked_for(kind, frozen, monkeypatch):
    module = experts(kind).train()
    for name in FROZEN[frozen]:
        getattr(module, name).requires_grad_(False)
    x = torch.randn(3, TOKENS, DIM, requires_grad=frozen != "input")
    plain = experts_run(module, x, fused=False, monkeypatch=monkeypatch)
    fused = experts_run(module, x, fused=True, monkeypatch=monkeypatch)
    assert len(fused) == 1 + x.requires_grad + sum(p.requires_grad for p in module.parameters())
    assert_same(plain, fused, exact=True)


@pytest.mark.parametrize("kind", ["token_choice", "soft_moe"])
def test_fused_experts_double_and_second_backward_match_the_plain_ops(kind, monkeypatch):
    def penalty(out, x):  # create_graph=True: the plain ops are recomputed and differentiated
        (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        grad_x.square().sum().backward()
        return [grad_x.detach()]

    def two_losses(out, x):  # the first backward wrote over the saved activation
        out.square().sum().backward(retain_graph=True)
        out.sum().backward()

    module = experts(kind).double().train()
    x = torch.randn(3, TOKENS, DIM, dtype=torch.float64, requires_grad=True)
    for backward in (penalty, two_losses):
        plain = experts_run(module, x, fused=False, monkeypatch=monkeypatch, backward=backward)
        fused = experts_run(module, x, fused=True, monkeypatch=monkeypatch, backward=backward)
        assert_same(plain, fused, exact=False)


@pytest.mark.parametrize("kind", ["token_choice", "soft_moe"])
def test_fused_experts_are_taken_only_where_they_compute_the_same_thing(kind, monkeypatch):
    calls, real = [], moe_mod.GeluExpertsFunction

    class Counted:  # the Function as expert_mlp sees it, counting its calls
        @staticmethod
        def apply(*args):
            calls.append(1)
            return real.apply(*args)

    monkeypatch.setattr(moe_mod, "GeluExpertsFunction", Counted)
    x = torch.randn(2, TOKENS, DIM, requires_grad=True)

    def taken(module, inp=x) -> bool:
        calls.clear()
        module(inp)
        return bool(calls)

    assert taken(experts(kind).train())
    assert taken(experts(kind).requires_grad_(False), x)  # the input's gradient alone
    assert not taken(experts(kind).requires_grad_(False), x.detach())  # nothing to differentiate
    with torch.no_grad():
        assert not taken(experts(kind))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # routed experts get an fp32 buffer: the check that matters
        assert not taken(experts(kind))
    assert not taken(experts(kind, drop=0.1).train())  # dropout between the layers
    assert taken(experts(kind, drop=0.1).eval())  # ... inactive in eval
    assert not taken(experts(kind, act="relu"))
    with forward_ad.dual_level():  # forward-mode AD: the Function has no jvp, the plain ops do
        assert not taken(experts(kind), forward_ad.make_dual(x.detach(), torch.randn_like(x)))
    handle = nn.modules.module.register_module_full_backward_hook(lambda module, grad_in, grad_out: None)
    try:  # a process-wide backward hook must see the experts' GELU as a module
        assert not taken(experts(kind))
    finally:
        handle.remove()
    assert taken(experts(kind))
