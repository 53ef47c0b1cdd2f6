"""Mixture-of-experts channel mixer (Switch Transformer / GShard / V-MoE style), index-based.

How a forward pass goes, for ``T`` tokens, ``E`` experts, ``k`` choices per token:

1. Router: ``logits = x @ W_r^T`` in fp32 (autocast off), training noise, softmax, top-k.
2. Assignments are queued per expert in priority order -- all first choices before any second
   choice, then token order (GShard's rule; Switch is the ``k = 1`` case) -- by ONE stable
   argsort of the ``k * T`` expert ids. An expert keeps the first ``capacity`` assignments of its
   queue; the rest are dropped.
3. Dispatch: one ``index_select`` gathers the kept tokens into an ``(E, capacity, dim)`` buffer.
4. Experts: stacked weights, one ``torch.baddbmm`` per linear layer for all experts at once.
5. Combine: expert outputs times their gate weights are ``index_add``-ed back into ``(T, dim)``.
   A token dropped by all of its experts gets zeros: the block's residual carries it through.

There is no dense ``(T, E, capacity)`` dispatch/combine tensor (GShard's einsum formulation is
``O(T * E * capacity)`` memory); everything is ``O(k * T)`` index vectors plus the buffers.

Auxiliary losses: each call adds its loss to ``module.aux_loss``; the training loop takes them
with :func:`collect_aux_loss` (which also resets them) -- see its docstring.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .activations import get_act
from .init import trunc_normal_init_

__all__ = ["MoE", "collect_aux_loss", "moe_modules", "reset_aux_loss"]


class MoE(nn.Module):
    """Top-k routed mixture of feed-forward experts with a capacity limit and balance loss.

    Switch Transformer: Fedus et al. 2021, https://arxiv.org/abs/2101.03961 (capacity factor,
    load-balancing loss ``E * sum_e f_e * P_e``, fp32 router). GShard: Lepikhin et al. 2020,
    https://arxiv.org/abs/2006.16668 (top-2, first choices served before second choices).
    V-MoE: Riquelme et al. 2021, https://arxiv.org/abs/2106.05974 (router noise). WideNet:
    Xue et al. 2021, https://arxiv.org/abs/2107.11817 (4 experts, top-2, capacity factor 1.2,
    balance weight 0.01 -- the defaults here). Router z-loss: ST-MoE, Zoph et al. 2022,
    https://arxiv.org/abs/2202.08906.

    Args:
        dim: channels in and out; input is channels-last ``(..., dim)``.
        hidden_dim: hidden width of EACH expert (each expert is an ``Mlp(dim, hidden_dim)``).
        num_experts: ``E``.
        top_k: experts per token, ``1 <= top_k <= num_experts``.
        capacity_factor: training capacity per expert is
            ``min(T, ceil(capacity_factor * T * top_k / num_experts))`` token slots, ``T`` the
            number of tokens in the call (all leading dims flattened). ``None`` or ``<= 0``
            means unlimited (``T`` slots: an expert can never get more, top-k picks distinct
            experts), so nothing is dropped.
        eval_capacity_factor: the same in eval mode; ``None`` means use ``capacity_factor``
            (Switch evaluates with a larger one, e.g. 2.0; ``0`` = unlimited).
        act: expert activation, a name for :func:`zoo.layers.activations.get_act`.
        bias: biases in the expert linears (the router never has one).
        drop: dropout after the activation and after the second linear, as in ``Mlp``.
        router_noise: in training, Gaussian noise with std ``router_noise / num_experts`` is
            ADDED to the router logits before softmax and top-k -- V-MoE's ``N(0, 1/E^2)``
            (Riquelme et al. 2021, section 2.2) at the default 1.0. ``0`` disables it. (Switch's
            alternative, multiplicative jitter on the router input, is not implemented.)
        balance_loss_weight: weight of the Switch load-balancing loss (see :meth:`forward`).
        z_loss_weight: weight of the ST-MoE router z-loss ``mean(logsumexp(logits)^2)``.
        normalize_top_k: rescale the ``k`` selected gate probabilities to sum to 1 (GShard's
            top-2 rule). Only applies for ``top_k > 1``: with ``top_k = 1`` it would make every
            gate 1.0 and cut the router off from the task gradient, so Switch's raw
            probability is kept.
        trim_capacity: in eager mode, shrink the buffer to the largest actual expert load when
            that is below the capacity. Outputs are identical (the trimmed slots would be empty
            and weighted 0); it saves the matmuls on padding. It needs the load on the host
            (``int(counts.max())``): free on CPU, a device sync on GPU, where the host then waits for
            the router instead of queueing the experts' kernels behind it, which costs more than
            the padded matmuls it saves. ``None`` (default): trim on CPU only. Always skipped
            under ``torch.compile`` so that shapes stay static.

    Init: expert weights truncated-normal std .02 and zero biases, like a ViT ``Mlp``; router
    truncated-normal std .02. (A zero router would tie all logits, and ``topk`` breaks ties by
    index, so every token would pick experts 0..k-1 until noise or gradients separated them.)

    Parameters: ``router.weight (E, dim)``, ``fc1_weight (E, hidden, dim)``, ``fc1_bias
    (E, hidden)``, ``fc2_weight (E, dim, hidden)``, ``fc2_bias (E, dim)`` -- expert ``e`` is
    ``Linear`` weights ``fc1_weight[e]``, ``fc2_weight[e]`` in ``nn.Linear``'s (out, in) layout.

    After each forward: ``aux_loss`` (0-dim fp32 tensor, summed over calls since the last
    :func:`collect_aux_loss` / :func:`reset_aux_loss`; ``None`` before any call; a recompute
    under activation checkpointing does not add to it), ``aux_loss_calls`` (how many) and
    ``last_stats`` of the LAST call: ``tokens`` (int T), ``capacity`` (int, slots per expert),
    ``slots`` (int, buffer rows per expert actually computed: ``capacity`` or less if trimmed),
    and detached tensors ``expert_counts`` (E,) assignments routed to each expert before the
    capacity cut, ``kept_counts`` (E,), ``dropped_tokens`` (assignments dropped),
    ``dropped_fraction`` (of the ``k * T`` assignments), ``unrouted_tokens`` (tokens dropped by
    ALL their experts, which the MoE passes as zeros), ``balance_loss``, ``z_loss``.
    """

    def __init__(
        self,
        dim: int,
        *,
        hidden_dim: int,
        num_experts: int = 4,
        top_k: int = 2,
        capacity_factor: float | None = 1.2,
        eval_capacity_factor: float | None = None,
        act: str = "gelu",
        bias: bool = True,
        drop: float = 0.0,
        router_noise: float = 1.0,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        normalize_top_k: bool = True,
        trim_capacity: bool | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.router_noise = router_noise
        self.balance_loss_weight = balance_loss_weight
        self.z_loss_weight = z_loss_weight
        self.normalize_top_k = normalize_top_k
        self.trim_capacity = trim_capacity

        self.router = nn.Linear(dim, num_experts, bias=False)
        # Stacked expert weights, nn.Linear layout (out, in) per expert, so expert e's weights
        # copy to/from an Mlp's fc1/fc2 directly.
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        if bias:
            self.fc1_bias = nn.Parameter(torch.empty(num_experts, hidden_dim))
            self.fc2_bias = nn.Parameter(torch.empty(num_experts, dim))
        else:
            self.register_parameter("fc1_bias", None)
            self.register_parameter("fc2_bias", None)
        self.act = get_act(act)
        self.drop1 = nn.Dropout(drop)
        self.drop2 = nn.Dropout(drop)

        self.aux_loss: torch.Tensor | None = None
        self.aux_loss_calls = 0
        self.last_stats: dict[str, object] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_init_(self.router.weight)
        trunc_normal_init_(self.fc1_weight, self.fc1_bias)
        trunc_normal_init_(self.fc2_weight, self.fc2_bias)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
            f"eval_capacity_factor={self.eval_capacity_factor}, router_noise={self.router_noise}"
        )

    def _active_capacity_factor(self) -> float | None:
        """The capacity factor of the current mode; ``None`` when unlimited."""
        factor = self.capacity_factor
        if not self.training and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        return factor if factor is not None and factor > 0 else None

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for a call with ``num_tokens`` tokens in the current mode:
        ``min(T, ceil(factor * T * top_k / num_experts))``, or ``T`` if the factor is
        ``None`` / ``<= 0`` (unlimited)."""
        factor = self._active_capacity_factor()
        if factor is None:
            return num_tokens
        return min(num_tokens, math.ceil(factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim) -> (..., dim)``; also adds this call's auxiliary loss to ``aux_loss``:

        ``balance_loss_weight * E * sum_e f_e * P_e + z_loss_weight * mean_t(logsumexp_e(l)^2)``

        with ``f_e`` the fraction of the ``k * T`` routing assignments (before the capacity cut)
        that go to expert ``e`` and ``P_e`` the mean router probability of ``e`` over tokens.
        For ``k = 1`` this is exactly Switch's loss (eq. 4); for ``k > 1`` counting every choice
        balances what actually fills the buffers. Its minimum is 1 at uniform routing.
        """
        shape = x.shape
        x_flat = x.reshape(-1, self.dim)  # (..., C) -> (T, C): every leading position is a token
        num_tokens = x_flat.shape[0]
        num_experts, top_k = self.num_experts, self.top_k
        num_assign = top_k * num_tokens
        if num_tokens == 0:  # static shape check, no tensor values involved
            return x.new_zeros(shape)

        # --- router, in fp32 even under autocast (Switch: bf16 routing is unstable)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x_flat.float(), self.router.weight.float())  # (T, E)
        clean_logits = logits
        if self.training and self.router_noise > 0:
            logits = logits + torch.randn_like(logits) * (self.router_noise / num_experts)
        probs = logits.softmax(dim=-1)  # (T, E) fp32
        gate_vals, expert_idx = probs.topk(top_k, dim=-1)  # (T, k) each, best choice first
        if self.normalize_top_k and top_k > 1:
            gate_vals = gate_vals / gate_vals.sum(dim=-1, keepdim=True)

        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            # An exported program must hold for every batch size: the traceable form below.
            return self._forward_traceable(x_flat, gate_vals, expert_idx).view(shape)

        # --- queue assignments per expert in priority order.
        # Assignment a = r * T + t is token t's r-th choice; flattening choice-major puts every
        # first choice ahead of every second choice, and a STABLE sort by expert keeps that
        # order (then token order) inside each expert's queue.
        flat_expert = expert_idx.t().reshape(-1)  # (T, k) -> (k, T) -> (k*T,)
        flat_gate = gate_vals.t().reshape(-1)  # (T, k) -> (k, T) -> (k*T,), same order
        order = torch.argsort(flat_expert, stable=True)  # (k*T,) assignment ids grouped by expert
        counts = torch.zeros(num_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))  # (E,) routed per expert
        starts = counts.cumsum(0) - counts  # (E,) where each expert's queue begins in `order`

        capacity = self.capacity(num_tokens)
        slots = capacity
        trim = self.trim_capacity if self.trim_capacity is not None else x.device.type == "cpu"
        if trim and not torch.compiler.is_compiling():
            # Same outputs with fewer padded rows; see the class docstring.
            slots = min(capacity, int(counts.max()))

        # --- slot table: slot (e, p) holds the p-th assignment of expert e's queue if p is
        # within both the queue length and the capacity. Built by gathers only (no scatter, no
        # data-dependent shapes): empty slots read token 0 with gate 0, which contributes
        # exactly zero to the output and to every gradient, and saves a padded copy of x.
        pos = torch.arange(slots, device=x.device)  # (S,)
        valid = pos.unsqueeze(0) < counts.unsqueeze(1)  # (E, S)
        src = (starts.unsqueeze(1) + pos.unsqueeze(0)).clamp_(max=num_assign - 1)  # (E, S)
        assign = order[src]  # (E, S) assignment id in each slot
        slot_token = torch.where(valid, assign % num_tokens, 0).reshape(-1)  # (E*S,)
        slot_gate = torch.where(valid, flat_gate[assign], 0.0).reshape(-1, 1)  # (E*S, 1)

        # --- dispatch, experts, combine
        buf = x_flat.index_select(0, slot_token)  # (E*S, C), kept tokens grouped by expert
        buf = buf.view(num_experts, slots, self.dim)  # (E*S, C) -> (E, S, C)
        # fc weights are (E, out, in); transpose(1, 2) is a strided view that bmm reads as is.
        if self.fc1_bias is not None:
            h = torch.baddbmm(self.fc1_bias.unsqueeze(1), buf, self.fc1_weight.transpose(1, 2))
        else:
            h = torch.bmm(buf, self.fc1_weight.transpose(1, 2))  # (E, S, C) @ (E, C, H) -> (E, S, H)
        h = self.drop1(self.act(h))
        if self.fc2_bias is not None:
            out = torch.baddbmm(self.fc2_bias.unsqueeze(1), h, self.fc2_weight.transpose(1, 2))
        else:
            out = torch.bmm(h, self.fc2_weight.transpose(1, 2))  # (E, S, H) @ (E, H, C) -> (E, S, C)
        out = self.drop2(out)
        out = out.reshape(num_experts * slots, self.dim)  # (E, S, C) -> (E*S, C), slot-major
        out = out * slot_gate.to(out.dtype)  # gate in the compute dtype (bf16 under autocast)
        y = out.new_zeros(num_tokens, self.dim).index_add_(0, slot_token, out)  # (T, C)

        # --- auxiliary losses and statistics
        frac = counts.to(probs.dtype) / num_assign  # (E,) f_e, no gradient (counts)
        balance = num_experts * torch.sum(frac * probs.mean(dim=0))
        aux = self.balance_loss_weight * balance
        z_loss = torch.logsumexp(clean_logits, dim=-1).square().mean()
        if self.z_loss_weight > 0:
            aux = aux + self.z_loss_weight * z_loss
        if not _in_backward_pass():
            self.aux_loss = aux if self.aux_loss is None else self.aux_loss + aux
            self.aux_loss_calls += 1

        kept = counts.clamp(max=capacity)  # (E,) first `capacity` of each queue survive
        dropped = num_assign - kept.sum()
        # Which assignments survived, back in assignment order, to count tokens lost entirely.
        rank_in_queue = torch.arange(num_assign, device=x.device) - starts[flat_expert[order]]
        kept_assign = torch.zeros(num_assign, dtype=torch.bool, device=x.device)
        kept_assign.scatter_(0, order, rank_in_queue < capacity)  # (k*T,)
        unrouted = (~kept_assign.view(top_k, num_tokens).any(dim=0)).sum()  # (k*T,) -> (k, T)
        self.last_stats = {
            "tokens": num_tokens,
            "capacity": capacity,
            "slots": slots,
            "expert_counts": counts.detach(),
            "kept_counts": kept.detach(),
            "dropped_tokens": dropped.detach(),
            "dropped_fraction": (dropped.to(torch.float32) / num_assign).detach(),
            "unrouted_tokens": unrouted.detach(),
            "balance_loss": balance.detach(),
            "z_loss": z_loss.detach(),
        }
        return y.view(shape)  # (T, C) -> (..., C)

    def _forward_traceable(self, x_flat: torch.Tensor, gate_vals: torch.Tensor,
                           expert_idx: torch.Tensor) -> torch.Tensor:
        """The same outputs as the indexed path, in ops whose shapes follow the batch in
        ``torch.jit.trace``, ``torch.export`` and ONNX: every expert runs on every token and the
        gates (zero where not routed or past capacity) combine them. ``E / k`` times the expert
        FLOPs of the indexed path; for exported inference only. No aux loss or stats are recorded.
        The capacity is computed from a tensor count of the tokens (a Python int would be baked
        into the trace), in float64 as Python computes it in ``capacity``."""
        num_experts, top_k = self.num_experts, self.top_k
        flat_expert = expert_idx.t().reshape(-1)  # (T, k) -> (k, T) -> (k*T,), priority order
        flat_gate = gate_vals.t().reshape(-1)  # (T, k) -> (k, T) -> (k*T,)
        onehot = F.one_hot(flat_expert, num_experts)  # (k*T, E)
        rank = ((onehot.cumsum(0) - onehot) * onehot).sum(-1)  # (k*T,) place in its expert's queue
        factor = self._active_capacity_factor()
        if factor is not None:
            tokens = torch.ones_like(x_flat[:, 0], dtype=torch.float64).sum()  # T, as a tensor
            capacity = torch.minimum(tokens, torch.ceil(factor * tokens * top_k / num_experts))
            flat_gate = torch.where(rank < capacity, flat_gate, 0.0)
        weight = (onehot * flat_gate.unsqueeze(1)).view(top_k, -1, num_experts).sum(0)  # (k*T, E) -> (T, E)
        buf = x_flat.unsqueeze(0).expand(num_experts, -1, -1)  # (T, C) -> (E, T, C)
        h = torch.bmm(buf, self.fc1_weight.transpose(1, 2))  # (E, T, C) @ (E, C, H) -> (E, T, H)
        if self.fc1_bias is not None:
            h = h + self.fc1_bias.unsqueeze(1)
        h = self.drop1(self.act(h))
        out = torch.bmm(h, self.fc2_weight.transpose(1, 2))  # (E, T, H) @ (E, H, C) -> (E, T, C)
        if self.fc2_bias is not None:
            out = out + self.fc2_bias.unsqueeze(1)
        out = self.drop2(out)
        return (out * weight.t().unsqueeze(-1).to(out.dtype)).sum(0)  # (E, T, C) * (E, T, 1) -> (T, C)


def _in_backward_pass() -> bool:
    """True while the autograd engine runs a backward pass, i.e. when this forward is the
    recomputation of activation checkpointing (``torch.utils.checkpoint``, reentrant mode). Its
    aux loss was already counted by the original forward and must not stay pending for the
    next step. Uses the hook ``torch.utils.checkpoint`` itself relies on; skipped (False) under
    ``torch.compile``, where tracing happens outside any backward pass."""
    if torch.compiler.is_compiling():
        return False
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


def moe_modules(model: nn.Module) -> list[MoE]:
    """The distinct :class:`MoE` modules in ``model`` (including ``model`` itself).
    ``nn.Module.modules()`` yields a module shared by several blocks once."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def reset_aux_loss(model: nn.Module) -> None:
    """Forget pending auxiliary losses of every MoE in ``model``."""
    for m in moe_modules(model):
        m.aux_loss = None
        m.aux_loss_calls = 0


def collect_aux_loss(model: nn.Module, *, reset: bool = True) -> torch.Tensor:
    """Sum of the auxiliary losses of all MoE layers in ``model`` since the last collection.

    Protocol: every MoE call ADDS its loss to its module's ``aux_loss``, so a module shared by
    several blocks (WideNet shares one MoE across the whole stack) contributes once per call.
    Each distinct module is counted once (no double count for sharing). With ``reset=True``
    (default) the pending losses are cleared, so the training loop simply does

        logits = model(x)
        loss = task_loss(logits, y) + collect_aux_loss(model)

    once per forward. A forward whose loss is never collected stays pending (and with grad
    enabled keeps its graph alive) until the next collection or :func:`reset_aux_loss`; so a
    backbone should call ``reset_aux_loss(self)`` at the start of its ``forward`` (then a stray
    eval or benchmark forward can never leak into a training step), and code that runs
    forwards outside such a backbone should collect or reset. Activation checkpointing is safe:
    the forward recomputed inside backward adds nothing. Returns a 0-dim fp32 tensor (zero if
    nothing is pending, on the model's device).
    """
    mods = moe_modules(model)
    pending = [m.aux_loss for m in mods if m.aux_loss is not None]
    if reset:
        reset_aux_loss(model)
    if pending:
        return torch.stack(pending).sum()
    param = next(model.parameters(), None)
    return torch.zeros((), device=param.device if param is not None else None)
