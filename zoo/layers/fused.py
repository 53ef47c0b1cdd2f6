"""Training-step Functions whose backward reuses the memory of the activations it saved.

A layer's forward saves activations for its backward; autograd's backward then allocates a fresh
buffer for every gradient, though the activation of the same shape is dead by the time that
gradient is written. On the CPU, glibc serves every buffer over 32 MB with a fresh mmap (a ViT-B
hidden activation at batch 32 is 77 MB), zero-filled and faulted in 4 KB at a time when first
written, and smaller ones with whatever the heap holds, so a train step spends a share of its CPU
time in the kernel faulting pages in (count them with ``resource.getrusage().ru_minflt`` around a
step; the training loop also keeps freed memory, ``zoo.machine.keep_freed_memory``, but a model
used elsewhere runs under whatever allocator its process has). The Functions here run the same
forward ops as the plain modules and write their gradients over the dead activations instead
(or, on maps, over a gradient buffer the convolution backward already allocated).

Used only where it computes the same thing (``fused_backward_allowed``): a float32 or float64
forward that will be differentiated, without autocast (it casts inside the plain ops), tracing,
scripting or compiling (those record the plain ops), or hooks on the parts. A second backward through a retained graph
recomputes what the first overwrote; a backward with ``create_graph=True`` recomputes the plain
ops and differentiates them. ``FUSED_BACKWARD = False`` turns all of it off.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

FUSED_BACKWARD = True


def fused_backward_allowed(x: torch.Tensor, *parts: nn.Module, weights: tuple[torch.Tensor | None, ...] = ()) -> bool:
    """Whether a forward over ``x`` may replace the plain ops of ``parts`` with a fused Function;
    ``weights`` are parameters it reads that belong to none of ``parts`` (None for an absent bias)."""
    return (
        torch.is_grad_enabled()
        and fused_forward_allowed(x, *parts)  # first: it stops before an FX proxy is asked anything
        and (
            x.requires_grad
            or any(p.requires_grad for m in parts for p in m.parameters())
            or any(w is not None and w.requires_grad for w in weights)
        )
    )


def fused_forward_allowed(x: torch.Tensor, *parts: nn.Module) -> bool:
    """Whether a forward over ``x``, differentiated or not, may run a fused Function in place of the
    plain ops of ``parts`` (``PoolingResidualFunction`` saves passes in eval too)."""
    return (
        FUSED_BACKWARD
        # a symbolic trace (FX) records the plain ops; torch.func transforms (grad, vmap,
        # functional_call's wrapped tensors) need Functions with a vmap rule, which these
        # Functions, writing over their saved tensors, cannot give: both fall back to plain ops
        and not torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        and torch._C._functorch.maybe_current_level() is None
        and x.dtype in (torch.float32, torch.float64)  # half types: per-image partial sums would round
        # meta tensors (timm's model tests, shape inference) compute nothing to save; the plain
        # ops give the shapes, and autocast has no state for that device type to ask about
        and x.device.type != "meta"
        and not (torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type))
        and not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling())
        # forward-mode AD (forward_ad's dual tensors, jacfwd through autograd) needs a jvp rule
        and torch.autograd.forward_ad._current_level < 0
        and not has_hooks(*parts)
        and not has_global_hooks()
    )


def has_global_hooks() -> bool:
    """Whether a process-wide module hook is registered (``nn.modules.module.register_module_*_hook``),
    which a part whose weights are read instead of calling it would skip."""
    hooks = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
    return any(getattr(nn.modules.module, name) for name in hooks)


def has_hooks(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` has a forward or backward hook of its own, which reading its
    weights instead of calling it would skip."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in modules)


def _recomputed_grads(ctx, inputs: tuple, outputs_fn, grad_out: torch.Tensor) -> tuple:
    """``create_graph=True``: the plain ops' gradients, differentiable, recomputed from the inputs;
    one entry per argument of ``forward`` (None for the options after ``inputs``)."""
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad, strict=False) if need]
    grads = iter(torch.autograd.grad(outputs_fn(*inputs), wanted, grad_out, create_graph=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad)


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` over the channels of a (B, C, H, W) map: a 1x1 convolution with the linear weight."""
    return F.conv2d(x, weight[:, :, None, None], bias)  # (B, in, H, W) -> (B, out, H, W)


class GeluMlpFunction(torch.autograd.Function):
    """``fc2(gelu(fc1(x)))`` (``zoo.layers.mlp.Mlp``), bit-identical values and gradients: on tokens
    (..., dim) with linear layers, or with ``on_map`` on a (B, dim, H, W) map with 1x1 convolutions
    (``Mlp.forward_nchw``, PoolFormer).

    On tokens, autograd's backward allocates two hidden-width buffers: the gradient of the
    activation (``grad @ fc2.weight``) and that of fc1's output (``gelu_backward``). Both have the
    shape of the saved activation ``a``, which is dead once fc2's weight gradient is taken, so both
    are written over ``a``.

    On maps, oneDNN's convolution backward allocates the activation's gradient itself, so only
    ``gelu_backward``'s buffer is saved: it writes over that gradient instead of a fresh one (the
    activations stay intact, so a retained graph needs no recompute).
    """

    @staticmethod
    def plain(x, w1, b1, w2, b2, approximate="none", on_map=False):
        layer = conv1x1 if on_map else F.linear
        return layer(F.gelu(layer(x, w1, b1), approximate=approximate), w2, b2)

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, approximate: str, on_map: bool):
        layer = conv1x1 if on_map else F.linear
        h = layer(x, w1, b1)  # (..., dim) -> (..., hidden), or (B, dim, H, W) -> (B, hidden, H, W)
        a = F.gelu(h, approximate=approximate)
        ctx.approximate, ctx.on_map, ctx.consumed = approximate, on_map, False
        ctx.save_for_backward(x, w1, b1, w2, b2, h, a)
        return layer(a, w2, b2)  # back to dim channels, same layout

    @staticmethod
    def backward(ctx, grad_out):
        x, w1, b1, w2, b2, h, a = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            plain = functools.partial(GeluMlpFunction.plain, approximate=ctx.approximate, on_map=ctx.on_map)
            return _recomputed_grads(ctx, (x, w1, b1, w2, b2), plain, grad_out)
        backward = _map_mlp_backward if ctx.on_map else _token_mlp_backward
        return (*backward(ctx, grad_out, x, w1, b1, w2, b2, h, a), None, None)


def _token_mlp_backward(ctx, grad_out, x, w1, b1, w2, b2, h, a) -> tuple:
    need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
    if ctx.consumed:  # a second backward through a retained graph: a was overwritten by the first
        a = F.gelu(h, approximate=ctx.approximate)
    else:  # .data: writing over a must not bump the version autograd checks when unpacking it again
        a, ctx.consumed = a.data, True
    x_shape = x.shape
    x = x.reshape(-1, x.shape[-1])  # (..., dim) -> (tokens, dim)
    grad_out = grad_out.reshape(-1, grad_out.shape[-1])  # (..., dim) -> (tokens, dim)
    h, a = h.view(-1, h.shape[-1]), a.view(-1, a.shape[-1])  # (..., hidden) -> (tokens, hidden)
    grad_w2 = grad_out.t().mm(a) if need_w2 else None
    grad_b2 = grad_out.sum(0) if need_b2 else None
    grad = torch.mm(grad_out, w2, out=a)  # d loss / d a, over a (no longer needed)
    torch.ops.aten.gelu_backward.grad_input(grad, h, approximate=ctx.approximate, grad_input=grad)  # d / d h
    grad_w1 = grad.t().mm(x) if need_w1 else None
    grad_b1 = grad.sum(0) if need_b1 else None
    grad_x = grad.mm(w1).view(x_shape) if need_x else None  # (tokens, dim) -> (..., dim)
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def _map_mlp_backward(ctx, grad_out, x, w1, b1, w2, b2, h, a) -> tuple:
    need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
    grad, grad_w2, grad_b2 = _conv1x1_backward(grad_out, a, w2, b2, (True, need_w2, need_b2))
    torch.ops.aten.gelu_backward.grad_input(grad, h, approximate=ctx.approximate, grad_input=grad)  # over grad
    grad_x, grad_w1, grad_b1 = _conv1x1_backward(grad, x, w1, b1, (need_x, need_w1, need_b1))
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def batched_linear(x_t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``E`` linear layers at once, transposed: ``weight (E, out, in) @ x_t (E, in, S) + bias (E, out)``
    as a column, ``-> (E, out, S)`` (``zoo.layers.moe.expert_mlp``)."""
    return torch.bmm(weight, x_t) if bias is None else torch.baddbmm(bias.unsqueeze(-1), weight, x_t)


class GeluExpertsFunction(torch.autograd.Function):
    """``E`` GELU feed-forward experts on their buffers (``zoo.layers.moe.expert_mlp``), bit-identical
    values and gradients: ``buf_t (E, C, S) -> out_t (E, C, S)``, computed transposed as there
    (``h = W1 @ buf_t + b1``, ``out = W2 @ gelu(h) + b2``, one ``baddbmm`` each).

    The reason is ``GeluMlpFunction``'s: autograd's backward allocates two ``(E, H, S)`` buffers,
    the activation's gradient (``W2^T @ grad``) and ``gelu_backward``'s, both the shape of the saved
    activation, which is dead once fc2's weight gradient is taken; both are written over it. At
    Switch's 64 experts top-1 they are as large as a dense MLP's hidden map, and the dense
    reference in ``python -m zoo.bench moe`` already saves them through ``GeluMlpFunction``.
    """

    @staticmethod
    def plain(buf_t, w1, b1, w2, b2, approximate="none"):
        return batched_linear(F.gelu(batched_linear(buf_t, w1, b1), approximate=approximate), w2, b2)

    @staticmethod
    def forward(ctx, buf_t, w1, b1, w2, b2, approximate: str):
        h = batched_linear(buf_t, w1, b1)  # (E, H, C) @ (E, C, S) -> (E, H, S)
        a = F.gelu(h, approximate=approximate)
        ctx.approximate, ctx.consumed = approximate, False
        ctx.save_for_backward(buf_t, w1, b1, w2, b2, h, a)
        return batched_linear(a, w2, b2)  # (E, C, H) @ (E, H, S) -> (E, C, S)

    @staticmethod
    def backward(ctx, grad_out):
        buf_t, w1, b1, w2, b2, h, a = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            plain = functools.partial(GeluExpertsFunction.plain, approximate=ctx.approximate)
            return _recomputed_grads(ctx, (buf_t, w1, b1, w2, b2), plain, grad_out)
        need_buf, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        if ctx.consumed:  # a second backward through a retained graph: a was overwritten by the first
            a = F.gelu(h, approximate=ctx.approximate)
        else:  # .data: writing over a must not bump the version autograd checks when unpacking it again
            a, ctx.consumed = a.data, True
        # the ops and operand orders of baddbmm's own backward, so the gradients are its bits
        grad_w2 = grad_out.bmm(a.transpose(1, 2)) if need_w2 else None  # (E, C, S) @ (E, S, H) -> (E, C, H)
        grad_b2 = grad_out.sum(2) if need_b2 else None  # (E, C, S) -> (E, C)
        grad = torch.bmm(w2.transpose(1, 2), grad_out, out=a)  # d loss / d a (E, H, S), over a
        torch.ops.aten.gelu_backward.grad_input(grad, h, approximate=ctx.approximate, grad_input=grad)  # d / d h
        grad_w1 = grad.bmm(buf_t.transpose(1, 2)) if need_w1 else None  # (E, H, S) @ (E, S, C) -> (E, H, C)
        grad_b1 = grad.sum(2) if need_b1 else None  # (E, H, S) -> (E, H)
        grad_buf = w1.transpose(1, 2).bmm(grad) if need_buf else None  # (E, C, H) @ (E, H, S) -> (E, C, S)
        return grad_buf, grad_w1, grad_b1, grad_w2, grad_b2, None


def _conv1x1_backward(grad_out, x, weight, bias, mask) -> tuple:
    """The gradients of ``conv1x1(x, weight, bias)`` that ``mask`` asks for (the op autograd's own
    convolution backward calls); the weight's back in the linear layout."""
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_out,
        x,
        weight[:, :, None, None],
        None if bias is None else [weight.shape[0]],
        [1, 1],
        [0, 0],
        [1, 1],
        False,
        [0, 0],
        1,
        [mask[0], mask[1], mask[2] and bias is not None],
    )
    return grad_x, None if grad_w is None else grad_w.view_as(weight), grad_b


class SpatialGatingFunction(torch.autograd.Function):
    """gMLP's gated unit (``zoo.layers.mixers.SpatialGating``): ``fc2(u * proj(norm(v))^T)`` with
    ``u, v = gelu(fc1(x)).chunk(2)``; the same forward ops, gradients equal to float rounding.

    Autograd's backward allocates, per block, the gradients of fc2's input, of u, of the gelu
    output (a ``cat`` of u's and v's) and of fc1's output: here fc2's input gradient is written
    over the saved product ``y``, u's and v's straight into the two halves of the saved activation
    (no ``cat``), and fc1's output gradient over that again. The token projection's gradients are
    taken per image on the (B, N, D) layout the forward already has, without transposed copies.
    """

    @staticmethod
    def plain(x, w1, b1, ln_w, ln_b, wp, bp, w2, b2, eps=1e-5, approximate="none"):
        u, v = F.gelu(F.linear(x, w1, b1), approximate=approximate).chunk(2, dim=-1)
        v = F.layer_norm(v, (v.shape[-1],), ln_w, ln_b, eps)
        v = F.linear(v.transpose(1, 2), wp, bp).transpose(1, 2)
        return F.linear(u * v, w2, b2)

    @staticmethod
    def forward(ctx, x, w1, b1, ln_w, ln_b, wp, bp, w2, b2, eps: float, approximate: str):
        h = F.linear(x, w1, b1)  # (B, N, C) -> (B, N, 2D)
        a = F.gelu(h, approximate=approximate)
        u, v = a.chunk(2, dim=-1)  # 2 x (B, N, D), views of a
        vn, mean, rstd = torch.native_layer_norm(v, (v.shape[-1],), ln_w, ln_b, eps)
        p = F.linear(vn.transpose(1, 2), wp, bp)  # mix tokens: (B, D, N) -> (B, D, N)
        y = u * p.transpose(1, 2)  # (B, N, D)
        ctx.eps, ctx.approximate, ctx.consumed = eps, approximate, False
        ctx.save_for_backward(x, w1, b1, ln_w, ln_b, wp, bp, w2, b2, h, a, vn, mean, rstd, p, y)
        return F.linear(y, w2, b2)  # (B, N, D) -> (B, N, C)

    @staticmethod
    def backward(ctx, grad_out):
        x, w1, b1, ln_w, ln_b, wp, bp, w2, b2, h, a, vn, mean, rstd, p, y = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            plain = functools.partial(SpatialGatingFunction.plain, eps=ctx.eps, approximate=ctx.approximate)
            return _recomputed_grads(ctx, (x, w1, b1, ln_w, ln_b, wp, bp, w2, b2), plain, grad_out)
        need = ctx.needs_input_grad
        if ctx.consumed:  # a second backward through a retained graph: recompute what the first overwrote
            a = F.gelu(h, approximate=ctx.approximate)
            y = a.chunk(2, dim=-1)[0] * p.transpose(1, 2)
        else:  # .data: writing over them must not bump the versions autograd checks when unpacking again
            a, y, ctx.consumed = a.data, y.data, True
        B, N, C = grad_out.shape
        D = y.shape[-1]
        u, v = a.chunk(2, dim=-1)  # 2 x (B, N, D), views of a
        grad_out = grad_out.reshape(B * N, C)  # (B, N, C) -> (B*N, C)
        y2 = y.reshape(B * N, D)  # (B, N, D) -> (B*N, D)
        grad_w2 = grad_out.t().mm(y2) if need[7] else None
        grad_b2 = grad_out.sum(0) if need[8] else None
        grad_y = torch.mm(grad_out, w2, out=y2).view(B, N, D)  # over y; (B*N, D) -> (B, N, D)
        grad_pt = grad_y * u  # d loss / d p^T, (B, N, D)
        torch.mul(grad_y, p.transpose(1, 2), out=u)  # d loss / d u, over u
        # p = vn^T @ wp^T + bp per image: wp's gradient is sum_b grad_pt[b] @ vn[b]^T, vn's is wp^T @ grad_pt[b].
        grad_wp = torch.bmm(grad_pt, vn.transpose(1, 2)).sum(0) if need[5] else None  # (B, N, N) -> (N, N)
        grad_bp = grad_pt.sum((0, 2)) if need[6] else None
        grad_vn = torch.matmul(wp.t(), grad_pt)  # (N, N) @ (B, N, D) -> (B, N, D)
        grad_v, grad_ln_w, grad_ln_b = torch.ops.aten.native_layer_norm_backward(
            grad_vn, v, [D], mean, rstd, ln_w, ln_b, [True, need[3], need[4]]
        )
        v.copy_(grad_v)  # d loss / d v, over v: a now holds d loss / d gelu output
        h2, a2 = h.view(B * N, 2 * D), a.view(B * N, 2 * D)  # (B, N, 2D) -> (B*N, 2D)
        torch.ops.aten.gelu_backward.grad_input(a2, h2, approximate=ctx.approximate, grad_input=a2)  # d / d h
        grad_w1 = a2.t().mm(x.reshape(B * N, C)) if need[1] else None
        grad_b1 = a2.sum(0) if need[2] else None
        grad_x = a2.mm(w1).view(B, N, C) if need[0] else None  # (B*N, C) -> (B, N, C)
        return grad_x, grad_w1, grad_b1, grad_ln_w, grad_ln_b, grad_wp, grad_bp, grad_w2, grad_b2, None, None


class PoolingResidualFunction(torch.autograd.Function):
    """PoolFormer's whole token-mixer branch on a (B, C, H, W) map, residual included::

        y = r * x + s * ls * (avgpool(gn(x)) - gn(x))     # gn: one-group GroupNorm, avgpool 3x3,
                                                          # count_include_pad=False; r res scale,
                                                          # ls layer scale, s the drop-path scale

    Why one Function: the plain chain runs six memory-bound ops over the map (GroupNorm reads it
    twice, then pool, subtract, scale, add), each reading its input from memory and writing a fresh
    map, and its backward as many again; the map is too large for the cache at the first stages, so
    those passes, not arithmetic, are what the chain costs. Two identities remove most of them:

    - a count_include_pad=False average is a convex combination of its window (weights sum to 1 at
      every output, the borders included), so it commutes with GroupNorm's per-channel affine, and
      the norm's shift cancels in ``pool - identity``:
      ``avgpool(gn(x)) - gn(x) = w * rstd * (avgpool(x) - x)`` with ``rstd`` the sample's
      1/sqrt(var + eps). The normalised map is never written, and the norm's bias gets no gradient
      (exactly zero; the plain ops' is zero up to rounding);
    - with ``k = s * ls * w * rstd`` per sample and channel, the branch plus residual is
      ``lerp(x, avgpool(x), k)`` (r = 1) -- one pass over x and the pooled map.

    Forward: the sample statistics (GroupNorm's kernel, its output dropped), the pool (read x,
    write p), the blend (read x and p, write y). Backward (g = dL/dy): ``dL/dk = sum_hw g * (p - x)``,
    written over the saved p; the pool's adjoint of g over that same buffer; then
    ``dx = lerp(g, pool^T(g), k) + c * (x - mean)`` where ``c`` carries the gradient through rstd.
    Same function as the plain ops; values and gradients agree to float rounding (tests/test_fused.py).
    """

    @staticmethod
    def plain(x, gn_w, gn_b, ls, rs, keep, eps=1e-5, pool_size=3):
        n = F.group_norm(x, 1, gn_w, gn_b, eps)
        pool = F.avg_pool2d(n, pool_size, 1, pool_size // 2, count_include_pad=False)
        branch = pool - n
        if ls is not None:
            branch = branch * ls.view(-1, 1, 1)  # (C,) -> (C, 1, 1)
        if keep is not None:
            branch = branch * keep.view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1)
        return (x if rs is None else x * rs.view(-1, 1, 1)) + branch  # rs: (C,) -> (C, 1, 1)

    @staticmethod
    def forward(ctx, x, gn_w, gn_b, ls, rs, keep, eps: float, pool_size: int):
        # GroupNorm's own statistics (its normalised output is dropped): the plain ops' mean and rstd
        # exactly, and several times faster on the CPU than var_mean over (C, H, W)
        B, C, H, W = x.shape
        _, mean, rstd = torch.native_group_norm(x, None, None, B, C, H * W, 1, eps)  # (B, 1) each
        mean, rstd = mean.view(B), rstd.view(B)
        k = _pool_branch_scale(rstd, gn_w, ls, keep)  # (B, C)
        p = F.avg_pool2d(x, pool_size, 1, pool_size // 2, count_include_pad=False)  # (B, C, H, W)
        k4 = k[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        if rs is None:
            y = torch.lerp(x, p, k4)  # x + k * (p - x)
        else:
            y = torch.addcmul(p * k4, x, rs[None, :, None, None] - k4)  # r * x + k * (p - x)
        ctx.eps, ctx.pool_size, ctx.consumed = eps, pool_size, False
        ctx.save_for_backward(x, gn_w, gn_b, ls, rs, keep, p, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, gn_w, gn_b, ls, rs, keep, p, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            plain = functools.partial(PoolingResidualFunction.plain, eps=ctx.eps, pool_size=ctx.pool_size)
            return _recomputed_grads(ctx, (x, gn_w, gn_b, ls, rs, keep), plain, grad_out)
        need_x, need_w, need_b, need_ls, need_rs, need_keep = ctx.needs_input_grad[:6]
        size = ctx.pool_size
        if ctx.consumed:  # a second backward through a retained graph: p was overwritten by the first
            buf = F.avg_pool2d(x, size, 1, size // 2, count_include_pad=False)
        else:  # .data: writing over p must not bump the version autograd checks when unpacking it again
            buf, ctx.consumed = p.data, True
        # d loss / d k, per sample and channel: sum over the map of g * (p - x), computed in buf
        grad_k = buf.sub_(x).mul_(grad_out).sum((2, 3))  # (B, C, H, W) -> (B, C)
        w = gn_w  # (C,)
        s = 1.0 if keep is None else keep[:, None]  # (B,) -> (B, 1)
        scale = 1.0 if ls is None else ls  # (C,)
        grad_w = (grad_k * s * rstd[:, None] * scale).sum(0) if need_w else None
        grad_ls = (grad_k * s * rstd[:, None] * w).sum(0) if need_ls else None
        grad_keep = (grad_k * rstd[:, None] * w * scale).sum(1) if need_keep else None
        grad_b = torch.zeros_like(gn_b) if need_b else None  # the shift cancels in pool - identity
        grad_rs = (grad_out * x).sum((0, 2, 3)) if need_rs else None
        grad_x = None
        if need_x:
            k4 = _pool_branch_scale(rstd, gn_w, ls, keep)[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
            # the pool's adjoint of g, over buf (dead now that grad_k is taken)
            pooled = torch.ops.aten.avg_pool2d_backward.grad_input(
                grad_out, x, [size, size], [1, 1], [size // 2, size // 2], False, False, None, grad_input=buf
            )
            if rs is None:
                grad_x = torch.lerp(grad_out, pooled, k4, out=pooled)  # g + k * (pool^T g - g)
            else:
                grad_x = pooled.mul_(k4).addcmul_(grad_out, rs[None, :, None, None] - k4)
            # through rstd = (var + eps)^-1/2: d rstd / d x = -rstd^3 (x - mean) / M, M = C*H*W
            grad_rstd = (grad_k * w * scale * s).sum(1)  # (B,)
            c = -grad_rstd * rstd.pow(3) / x[0].numel()  # (B,)
            grad_x.addcmul_(x, c[:, None, None, None]).sub_((c * mean)[:, None, None, None])
        return grad_x, grad_w, grad_b, grad_ls, grad_rs, grad_keep, None, None


def _pool_branch_scale(rstd, gn_w, ls, keep) -> torch.Tensor:
    """``k = keep * ls * w * rstd``, the per-sample, per-channel scale of ``avgpool(x) - x``: (B, C)."""
    k = rstd[:, None] * gn_w[None, :]  # (B,) x (C,) -> (B, C)
    if ls is not None:
        k = k * ls[None, :]
    if keep is not None:
        k = k * keep[:, None]
    return k
