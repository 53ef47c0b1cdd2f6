"""Mixture-of-experts channel mixer (Switch / GShard / V-MoE / expert choice), index-based.

**Routing groups.** Tokens are routed within *groups* and every capacity is computed per group,
V-MoE style (Riquelme et al. 2021, https://arxiv.org/abs/2106.05974, section 2.2): by default a
group is one image (``group_size=1``), or a fixed number of consecutive images of the batch
(``group_size=G``; a batch that ``G`` does not divide ends with a smaller group, whose capacity
follows its own size). So an image's output depends on its group only -- by default on itself,
never on its batch-mates or on its position in the batch. The image axis is the first axis of a
``(B, N, dim)`` or ``(B, H, W, dim)`` input; a 2-D ``(T, dim)`` input is one image.
``group_size=None`` routes the whole call as one group, the batch-coupled Switch/GShard rule
that this project used before (an eval prediction then depends on the batch).

How a forward pass goes, for ``T`` tokens in groups of ``T_g`` tokens, ``E`` experts, ``k``
choices per token:

1. Router: ``logits = x @ W_r^T`` in fp32 (autocast off), training noise, softmax.
2. ``router="token_choice"`` (default; Switch ``k = 1``, GShard ``k = 2``): each token picks its
   top-k experts. Assignments queue per (expert, group) in priority order -- every first choice
   before any second choice, then token order (GShard's rule), or with ``batch_priority=True``
   the tokens with the largest top-1 probability first (V-MoE's Batch Priority Routing) -- by
   ONE stable argsort of the ``k * T`` keys ``expert * G + group``. A queue keeps its first
   ``capacity(T_g)`` assignments; a second stable argsort packs the kept ones of each expert.
   ``router="expert_choice"`` (Zhou et al. 2022, https://arxiv.org/abs/2202.09368): each expert
   takes the ``capacity(T_g)`` tokens of each group with the highest router probability for it
   (one ``topk`` over the group's tokens); a token may be taken by several experts or by none.
3. Dispatch: one ``index_select`` gathers the kept tokens into an ``(E, slots, dim)`` buffer.
4. Experts: stacked weights, one ``torch.baddbmm`` per linear layer for all experts at once.
5. Combine: expert outputs times their gate weights are ``index_add``-ed back into ``(T, dim)``.
   A token no expert kept gets zeros: the block's residual carries it through.

There is no dense ``(T, E, capacity)`` dispatch/combine tensor (GShard's einsum formulation is
``O(T * E * capacity)`` memory); everything is ``O(k * T)`` index vectors plus the buffers.

In eval, token choice drops nothing unless asked (``eval_capacity_factor=None``): each token
gets all of its top-k experts, so routing cannot couple tokens at all. Soft MoE, which never
drops, is :class:`zoo.layers.soft_moe.SoftMoE` (the channel mixer ``soft_moe``).

Auxiliary losses: each call adds its loss to ``module.aux_loss``; the training loop takes them
with :func:`collect_aux_loss` (which also resets them) -- see its docstring.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..names import suggest
from .activations import get_act
from .fused import GeluExpertsFunction, batched_linear, fused_backward_allowed
from .init import trunc_normal_init_

__all__ = ["ROUTERS", "MoE", "collect_aux_loss", "expert_mlp", "moe_modules", "reset_aux_loss"]

ROUTERS = ("token_choice", "expert_choice")


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off for ``device_type``, where autocast exists for it: a ``meta`` tensor
    (timm builds and checks models on the meta device) has no autocast state, and
    ``torch.autocast("meta", enabled=False)`` raises "unsupported scalarType"."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def expert_mlp(
    buf: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    act: nn.Module,
    drop1: nn.Module,
    drop2: nn.Module,
) -> torch.Tensor:
    """``E`` feed-forward experts on their buffers at once: ``(E, S, C) -> (E, S, C)``, one
    ``baddbmm`` per linear, weights stacked in ``nn.Linear``'s (out, in) layout per expert:
    ``fc1_weight (E, H, C)``, ``fc2_weight (E, C, H)``.

    Computed transposed, ``h^T = W1 @ buf^T`` and ``out^T = W2 @ act(h)^T``, so that the weight
    gradients (``grad_h^T @ buf``) come out of bmm in the parameters' own (out, in) layout:
    computed the other way round, ``buf @ W1^T``, they would come out transposed and autograd
    would copy every expert's weights into place after each backward (a quarter of the step at
    64 experts on the CPU). The result is a transposed view ``(E, S, C)`` of an ``(E, C, S)``
    tensor; callers reshape it (one copy of the small buffer, not of the weights)."""
    buf_t = buf.transpose(1, 2)  # (E, S, C) -> (E, C, S), a view bmm reads as is
    weights = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if (
        type(act) is nn.GELU
        and (drop1.p == 0 or not drop1.training)
        and fused_backward_allowed(buf, act, drop1, weights=weights)
    ):  # the same ops, with a backward that writes its gradients over the dead activation
        out_t = GeluExpertsFunction.apply(buf_t, *weights, act.approximate)  # (E, C, S)
    else:
        h_t = drop1(act(batched_linear(buf_t, fc1_weight, fc1_bias)))  # (E, H, C) @ (E, C, S) -> (E, H, S)
        out_t = batched_linear(h_t, fc2_weight, fc2_bias)  # (E, C, H) @ (E, H, S) -> (E, C, S)
    return drop2(out_t).transpose(1, 2)  # (E, C, S) -> (E, S, C), a view


class MoE(nn.Module):
    """Routed mixture of feed-forward experts: routing groups, a capacity per group, two routers.

    Switch Transformer: Fedus et al. 2021, https://arxiv.org/abs/2101.03961 (capacity factor,
    load-balancing loss ``E * sum_e f_e * P_e``, fp32 router). GShard: Lepikhin et al. 2020,
    https://arxiv.org/abs/2006.16668 (top-2, first choices served before second choices).
    V-MoE: Riquelme et al. 2021, https://arxiv.org/abs/2106.05974 (router noise, routing groups,
    Batch Priority Routing). Expert choice: Zhou et al. 2022, https://arxiv.org/abs/2202.09368.
    WideNet: Xue et al. 2021, https://arxiv.org/abs/2107.11817 (4 experts, top-2, capacity factor
    1.2, balance weight 0.01 -- the defaults here). Router z-loss: ST-MoE, Zoph et al. 2022,
    https://arxiv.org/abs/2202.08906.

    Args:
        dim: channels in and out; input is channels-last ``(..., dim)``.
        hidden_dim: hidden width of EACH expert (each expert is an ``Mlp(dim, hidden_dim)``).
        num_experts: ``E``.
        top_k: experts per token, ``1 <= top_k <= num_experts``. For expert choice it only
            sizes the capacity (experts per token on average, see ``capacity_factor``).
        router: ``"token_choice"`` (each token picks its top-k experts; Switch, GShard, V-MoE)
            or ``"expert_choice"`` (each expert picks its ``capacity`` tokens of each group).
            Kept as ``router_type``: ``router`` is the gating ``nn.Linear``, as before.
        group_size: images per routing group (see the module docstring): ``1`` (default)
            routes every image on its own; ``G`` routes ``G`` consecutive images together;
            ``None`` routes the whole call as one group (batch-coupled).
        batch_priority: token choice only: within a group, tokens claim capacity in order of
            their top-1 router probability, highest first (V-MoE's BPR), instead of token order;
            still every first choice before any second choice. Ties keep token order.
        capacity_factor: in training, each expert holds
            ``capacity(T_g) = min(T_g, ceil(capacity_factor * T_g * top_k / num_experts))``
            tokens of a group of ``T_g`` tokens. Token choice: ``None`` or ``<= 0`` means
            unlimited (an expert can never get more than ``T_g``: top-k picks distinct
            experts), so nothing is dropped. Expert choice: required ``> 0``; it sets the
            compute, ``capacity_factor * top_k`` experts per token on average (so at equal
            ``capacity_factor`` and ``top_k`` both routers fill the same buffers).
        eval_capacity_factor: the same in eval mode. ``None`` (default): token choice drops
            nothing in eval (unlimited); expert choice keeps ``capacity_factor`` (its capacity is
            its routing function, not a drop rule: unlimited would run every expert on every
            token). A number asks for that capacity in eval (``<= 0``: unlimited, token choice).
        act: expert activation, a name for :func:`zoo.layers.activations.get_act`.
        bias: biases in the expert linears (the router never has one).
        drop: dropout after the activation and after the second linear, as in ``Mlp``.
        router_noise: in training, Gaussian noise with std ``router_noise / num_experts`` is
            ADDED to the router logits before softmax and top-k -- V-MoE's ``N(0, 1/E^2)``
            (Riquelme et al. 2021, section 2.2) at the default 1.0. ``0`` disables it. (Switch's
            alternative, multiplicative jitter on the router input, is not implemented.)
        balance_loss_weight: weight of the Switch load-balancing loss (see :meth:`forward`);
            token choice only (expert choice is balanced by construction).
        z_loss_weight: weight of the ST-MoE router z-loss ``mean(logsumexp(logits)^2)``.
        normalize_top_k: rescale the ``k`` selected gate probabilities to sum to 1 (GShard's
            top-2 rule). Only applies to token choice with ``top_k > 1``: with ``top_k = 1`` it
            would make every gate 1.0 and cut the router off from the task gradient, so Switch's
            raw probability is kept. Expert choice gates with the raw probability (Zhou et al.).
        trim_capacity: token choice, eager mode: shrink the buffer to the largest actual expert
            load when that is below the capacity. Outputs are identical (the trimmed slots would
            be empty and weighted 0); it saves the matmuls on padding. It needs the load on the
            host (``int(counts.max())``): free on CPU, a device sync on GPU, where the host then
            waits for the router instead of queueing the experts' kernels behind it, which costs
            more than the padded matmuls it saves. ``None`` (default): trim on CPU, and on any
            device when the capacity is unlimited (eval by default), where the untrimmed buffer
            would hold every token for every expert (``E / k`` times the work). Always skipped
            under ``torch.compile`` so that shapes stay static, and on the ``meta`` device (no
            values to read; timm checks models' shapes there).

    Init: expert weights truncated-normal std .02 and zero biases, like a ViT ``Mlp``; router
    truncated-normal std .02. (A zero router would tie all logits, and ``topk`` breaks ties by
    index, so every token would pick experts 0..k-1 until noise or gradients separated them.)

    Parameters: ``router.weight (E, dim)``, ``fc1_weight (E, hidden, dim)``, ``fc1_bias
    (E, hidden)``, ``fc2_weight (E, dim, hidden)``, ``fc2_bias (E, dim)`` -- expert ``e`` is
    ``Linear`` weights ``fc1_weight[e]``, ``fc2_weight[e]`` in ``nn.Linear``'s (out, in) layout.
    The routing options add no parameter: a checkpoint loads under any router.

    Traced and exported programs (``torch.jit.trace``, ``torch.export``, ONNX) hold for every
    batch size: token choice takes a dense traceable form (:meth:`_forward_traceable`), expert
    choice its indexed path, which is shape-polymorphic with one image per group (the default).

    After each forward: ``aux_loss`` (0-dim fp32 tensor, summed over calls since the last
    :func:`collect_aux_loss` / :func:`reset_aux_loss`; ``None`` before any call; a recompute
    under activation checkpointing does not add to it), ``aux_loss_calls`` (how many) and
    ``last_stats`` of the LAST call: ``tokens`` (int T), ``groups`` (int), ``group_tokens``
    (int, tokens of a full group), ``capacity`` (int, slots per expert per full group),
    ``slots`` (int, buffer rows per expert actually computed, all groups: the sum of the
    groups' capacities, or less if trimmed), and detached tensors ``expert_counts`` (E,)
    assignments routed to each expert before the capacity cut, ``kept_counts`` (E,),
    ``dropped_tokens`` (assignments dropped), ``dropped_fraction`` (of the ``k * T``
    assignments), ``unrouted_tokens`` (tokens no expert kept, which the MoE passes as zeros),
    ``balance_loss``, ``z_loss``. For expert choice ``expert_counts == kept_counts`` (what each
    expert took) and nothing counts as dropped; ``unrouted_tokens`` are the tokens no expert chose.
    """

    def __init__(
        self,
        dim: int,
        *,
        hidden_dim: int,
        num_experts: int = 4,
        top_k: int = 2,
        router: str = "token_choice",
        group_size: int | None = 1,
        batch_priority: bool = False,
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
        if router not in ROUTERS:
            raise ValueError(
                f"router must be one of {', '.join(map(repr, ROUTERS))}, got {router!r}{suggest(str(router), ROUTERS)}"
            )
        if group_size is not None and (
            isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
        ):
            raise ValueError(
                f"group_size must be a number of images >= 1, or None for the whole call; got {group_size!r}"
            )
        if not isinstance(batch_priority, bool):
            raise ValueError(f"batch_priority must be True or False, got {batch_priority!r}")
        if batch_priority and router != "token_choice":
            raise ValueError(
                f"batch_priority applies to router='token_choice' only (an expert-choice expert "
                f"ranks tokens itself), got router={router!r}"
            )
        for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number or None, got {value!r}")
            unlimited = (value is not None and value <= 0) or (name == "capacity_factor" and value is None)
            if router == "expert_choice" and unlimited:
                raise ValueError(
                    f"{name} must be > 0 for router='expert_choice' (each expert takes "
                    f"capacity_factor * top_k * T_g / num_experts tokens of a group), got {value!r}"
                )
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.router_type = router
        self.group_size = group_size
        self.batch_priority = batch_priority
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
            f"top_k={self.top_k}, router={self.router_type!r}, group_size={self.group_size}, "
            f"batch_priority={self.batch_priority}, capacity_factor={self.capacity_factor}, "
            f"eval_capacity_factor={self.eval_capacity_factor}, router_noise={self.router_noise}"
        )

    def _active_capacity_factor(self) -> float | None:
        """The capacity factor of the current mode; ``None`` when unlimited (token choice only)."""
        if self.training:
            factor = self.capacity_factor
        elif self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        elif self.router_type == "expert_choice":
            factor = self.capacity_factor  # its routing function, not a drop rule
        else:
            return None  # token choice in eval: drop nothing unless asked
        return factor if factor is not None and factor > 0 else None

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for ONE routing group of ``num_tokens`` tokens in the current mode:
        ``min(T_g, ceil(factor * T_g * top_k / num_experts))``, or ``T_g`` when unlimited."""
        factor = self._active_capacity_factor()
        if factor is None:
            return num_tokens
        return min(num_tokens, math.ceil(factor * num_tokens * self.top_k / self.num_experts))

    def group_tokens(self, shape: Sequence[int]) -> int:
        """Tokens in a (full) routing group of an input of ``shape`` ``(..., dim)``; the last
        group of a call may hold fewer. A 2-D ``(T, dim)`` input is one image."""
        num_tokens = math.prod(shape[:-1])
        if self.group_size is None or len(shape) < 3:
            return num_tokens
        per_group = self.group_size * math.prod(shape[1:-1])
        return per_group if self.group_size == 1 else min(num_tokens, per_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim) -> (..., dim)``; also adds this call's auxiliary loss to ``aux_loss``:

        ``balance_loss_weight * E * sum_e f_e * P_e + z_loss_weight * mean_t(logsumexp_e(l)^2)``

        with ``f_e`` the fraction of the ``k * T`` routing assignments (before the capacity cut)
        that go to expert ``e`` and ``P_e`` the mean router probability of ``e`` over tokens
        (over the whole call: a training statistic, it couples nothing at eval). For ``k = 1``
        this is exactly Switch's loss (eq. 4); for ``k > 1`` counting every choice balances what
        actually fills the buffers. Its minimum is 1 at uniform routing. Expert choice adds the
        z-loss term only.
        """
        shape = x.shape
        x_flat = x.reshape(-1, self.dim)  # (..., C) -> (T, C): every leading position is a token
        num_tokens = x_flat.shape[0]
        if num_tokens == 0:  # static shape check, no tensor values involved
            return x.new_zeros(shape)

        # --- router, in fp32 even under autocast (Switch: bf16 routing is unstable)
        with autocast_off(x.device.type):
            logits = F.linear(x_flat.float(), self.router.weight.float())  # (T, E)
        clean_logits = logits
        if self.training and self.router_noise > 0:
            logits = logits + torch.randn_like(logits) * (self.router_noise / self.num_experts)
        probs = logits.softmax(dim=-1)  # (T, E) fp32

        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            # An exported program must hold for every batch size: the traceable forms.
            return self._forward_traceable(x_flat, probs, shape).view(shape)

        group_tokens = self.group_tokens(shape)
        if self.router_type == "expert_choice":
            slot_token, slot_gate, stats = self._route_expert_choice(probs, group_tokens)
        else:
            slot_token, slot_gate, stats = self._route_token_choice(probs, group_tokens)
        y = self._run_experts(x_flat, slot_token, slot_gate)

        # --- auxiliary losses and statistics
        num_assign = self.top_k * num_tokens
        frac = stats["expert_counts"].to(probs.dtype) / stats["expert_counts"].sum()  # (E,) f_e, no gradient
        balance = self.num_experts * torch.sum(frac * probs.mean(dim=0))
        z_loss = torch.logsumexp(clean_logits, dim=-1).square().mean()
        if self.router_type == "token_choice":
            aux = self.balance_loss_weight * balance
        else:
            aux = z_loss.new_zeros(())  # balanced by construction: no balance term
        if self.z_loss_weight > 0:
            aux = aux + self.z_loss_weight * z_loss
        if not _in_backward_pass():
            self.aux_loss = aux if self.aux_loss is None else self.aux_loss + aux
            self.aux_loss_calls += 1
        dropped = stats["dropped_tokens"]
        self.last_stats = {
            **stats,
            "tokens": num_tokens,
            "dropped_fraction": (dropped.to(torch.float32) / num_assign).detach(),
            "balance_loss": balance.detach(),
            "z_loss": z_loss.detach(),
        }
        return y.view(shape)  # (T, C) -> (..., C)

    def _run_experts(self, x_flat: torch.Tensor, slot_token: torch.Tensor, slot_gate: torch.Tensor) -> torch.Tensor:
        """Dispatch, experts, combine: ``slot_token`` / ``slot_gate`` ``(E*S,)`` / ``(E*S, 1)``
        name the token and gate of every buffer row, expert-major; an empty row reads token 0
        with gate 0, which adds exactly zero to the output and to every gradient."""
        buf = x_flat.index_select(0, slot_token)  # (E*S, C), kept tokens grouped by expert
        buf = buf.view(self.num_experts, -1, self.dim)  # (E*S, C) -> (E, S, C)
        out = expert_mlp(
            buf, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias, self.act, self.drop1, self.drop2
        )  # (E, S, C)
        # gate in the compute dtype (bf16 under autocast), then (E, S, C) -> (E*S, C), slot-major
        out = (out * slot_gate.to(out.dtype).view(self.num_experts, -1, 1)).reshape(-1, self.dim)
        return torch.zeros_like(x_flat, dtype=out.dtype).index_add_(0, slot_token, out)  # (T, C)

    def _should_trim(self, device: torch.device, unlimited: bool) -> bool:
        if torch.compiler.is_compiling() or device.type == "meta":
            return False  # static shapes; a meta tensor has no load to read (same outputs untrimmed)
        if self.trim_capacity is not None:
            return self.trim_capacity
        return unlimited or device.type == "cpu"

    def _route_token_choice(
        self, probs: torch.Tensor, group_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, object]]:
        """Top-k token choice with a capacity per (expert, group): the slot table and stats."""
        num_tokens, num_experts = probs.shape
        top_k = self.top_k
        num_assign = top_k * num_tokens
        device = probs.device
        gate_vals, expert_idx = probs.topk(top_k, dim=-1)  # (T, k) each, best choice first
        if self.normalize_top_k and top_k > 1:
            gate_vals = gate_vals / gate_vals.sum(dim=-1, keepdim=True)
        if self.batch_priority:
            # BPR: tokens claim capacity by their top-1 probability, highest first (ties: token
            # order). One global stable sort orders every group's tokens, as queues are per group.
            token_order = torch.argsort(probs.amax(dim=-1), descending=True, stable=True)  # (T,)
            gate_vals, expert_idx = gate_vals[token_order], expert_idx[token_order]  # rows by priority
        else:
            token_order = torch.arange(num_tokens, device=device)  # (T,) token order

        # Assignment a = r * T + j is the r-th choice of token token_order[j]: flattening
        # choice-major puts every first choice ahead of every second choice, and a STABLE sort by
        # (expert, group) keeps that priority order inside each queue.
        flat_token = token_order.repeat(top_k)  # (k*T,)
        flat_expert = expert_idx.t().reshape(-1)  # (T, k) -> (k, T) -> (k*T,)
        flat_gate = gate_vals.t().reshape(-1)
        num_groups = -(-num_tokens // group_tokens)
        key = flat_expert
        if num_groups > 1:
            key = flat_expert * num_groups + torch.div(flat_token, group_tokens, rounding_mode="floor")
        order = torch.argsort(key, stable=True)  # (k*T,) assignment ids by expert, then group
        queue_len = torch.zeros(num_experts * num_groups, dtype=torch.long, device=device)
        queue_len.scatter_add_(0, key, torch.ones_like(key))  # (E*G,) routed per (expert, group)
        counts = queue_len.view(num_experts, num_groups).sum(dim=1)  # (E,) routed per expert

        last_tokens = num_tokens - (num_groups - 1) * group_tokens
        capacity, capacity_last = self.capacity(group_tokens), self.capacity(last_tokens)
        unlimited = self._active_capacity_factor() is None
        if unlimited:
            kept_counts = counts
            kept_assign = None
        else:
            sorted_key = key[order]
            queue_start = queue_len.cumsum(0) - queue_len  # (E*G,) where each queue begins in `order`
            rank = torch.arange(num_assign, device=device) - queue_start[sorted_key]  # place in its queue
            group_cap = torch.full((num_groups,), capacity, dtype=torch.long, device=device)
            if capacity_last != capacity:
                group_cap[-1] = capacity_last
            kept_sorted = rank < group_cap[sorted_key % num_groups]  # (k*T,) in `order`
            kept_counts = torch.minimum(queue_len.view(num_experts, num_groups), group_cap).sum(dim=1)  # (E,)
            kept_assign = torch.zeros(num_assign, dtype=torch.bool, device=device).scatter_(0, order, kept_sorted)
            # Pack each expert's kept assignments together (dropped ones go after every expert).
            sorted_expert = torch.div(sorted_key, num_groups, rounding_mode="floor")
            order = order[torch.argsort(torch.where(kept_sorted, sorted_expert, num_experts), stable=True)]

        total_capacity = capacity * (num_groups - 1) + capacity_last  # per expert, all groups
        slots = total_capacity
        if self._should_trim(device, unlimited):
            # Same outputs with fewer padded rows; see the class docstring.
            slots = min(total_capacity, int(kept_counts.max()))
        kept_start = kept_counts.cumsum(0) - kept_counts  # (E,) where each expert's kept run begins

        # --- slot table: slot (e, p) holds the p-th kept assignment of expert e if p < its kept
        # count. Built by gathers only (no data-dependent shapes): empty slots read token 0 with
        # gate 0, which contributes exactly zero to the output and to every gradient.
        pos = torch.arange(slots, device=device)  # (S,)
        valid = pos.unsqueeze(0) < kept_counts.unsqueeze(1)  # (E, S)
        src = (kept_start.unsqueeze(1) + pos.unsqueeze(0)).clamp_(max=num_assign - 1)  # (E, S)
        assign = order[src]  # (E, S) assignment id in each slot
        slot_token = torch.where(valid, flat_token[assign], 0).reshape(-1)  # (E*S,)
        slot_gate = torch.where(valid, flat_gate[assign], 0.0).reshape(-1, 1)  # (E*S, 1)

        if kept_assign is None:
            dropped = torch.zeros((), dtype=torch.long, device=device)
            unrouted = dropped
        else:
            dropped = num_assign - kept_counts.sum()
            unrouted = (~kept_assign.view(top_k, num_tokens).any(dim=0)).sum()  # (k*T,) -> (k, T)
        stats = {
            "groups": num_groups,
            "group_tokens": group_tokens,
            "capacity": capacity,
            "slots": slots,
            "expert_counts": counts.detach(),
            "kept_counts": kept_counts.detach(),
            "dropped_tokens": dropped.detach(),
            "unrouted_tokens": unrouted.detach(),
        }
        return slot_token, slot_gate, stats

    def _route_expert_choice(
        self, probs: torch.Tensor, group_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, object]]:
        """Expert choice: each expert takes the ``capacity(T_g)`` tokens of each group with the
        highest probability for it, gated by that probability. Shape-polymorphic (traceable)
        when every group is full, e.g. one image per group."""
        num_tokens, num_experts = probs.shape
        device = probs.device
        capacity = self.capacity(group_tokens)
        num_groups = -(-num_tokens // group_tokens)
        pad = num_groups * group_tokens - num_tokens  # rows missing from the last group
        scores = probs
        if pad:  # below every probability: never taken before a real token of the group
            scores = torch.cat([probs, probs.new_full((pad, num_experts), -1.0)])
        scores = scores.view(-1, group_tokens, num_experts).transpose(1, 2)  # (T, E) -> (G, T_g, E) -> (G, E, T_g)
        gate, local = scores.topk(capacity, dim=-1)  # (G, E, C) each expert's tokens in each group
        first = (torch.ones_like(local[:, :1, :1]).cumsum(0) - 1) * group_tokens  # (G, 1, 1) group's first token
        token = local + first  # (G, E, C) token ids in the call
        valid = None
        if pad and self.capacity(group_tokens - pad) < capacity:  # the short last group takes fewer
            valid = torch.ones_like(token, dtype=torch.bool)
            valid[-1, :, self.capacity(group_tokens - pad) :] = False
            token = torch.where(valid, token, 0)
            gate = torch.where(valid, gate, 0.0)
        slot_token = token.permute(1, 0, 2).reshape(-1)  # (G, E, C) -> (E, G, C) -> (E*G*C,), expert-major
        slot_gate = gate.permute(1, 0, 2).reshape(-1, 1)
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            return slot_token, slot_gate, {}
        if valid is None:
            kept = torch.full((num_experts,), num_groups * capacity, dtype=torch.long, device=device)
        else:
            kept = valid.sum(dim=(0, 2))  # (E,)
        # a taken token has a positive probability; an empty slot (token 0, gate 0) counts nothing
        taken = (
            torch.zeros(num_tokens, dtype=torch.long, device=device).index_add_(
                0, slot_token, (slot_gate.view(-1) > 0).long()
            )
            > 0
        )  # (T,)
        stats = {
            "groups": num_groups,
            "group_tokens": group_tokens,
            "capacity": capacity,
            "slots": num_groups * capacity,
            "expert_counts": kept,
            "kept_counts": kept,
            "dropped_tokens": torch.zeros((), dtype=torch.long, device=device),
            "unrouted_tokens": (num_tokens - taken.sum()).detach(),
        }
        return slot_token, slot_gate, stats

    def _forward_traceable(self, x_flat: torch.Tensor, probs: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """The same outputs as the indexed path, in ops whose shapes follow the batch in
        ``torch.jit.trace``, ``torch.export`` and ONNX. No aux loss or stats are recorded.

        Expert choice runs its indexed path, which is shape-polymorphic with one image per group.
        Token choice runs every expert on every token and combines them with gates that are zero
        where not routed or past the capacity: ``E / k`` times the expert FLOPs of the indexed
        path, for exported inference only. Its groups and capacities are computed from tensor
        counts of the tokens (a Python int would be baked into the trace), in float64 as Python
        computes them in ``capacity``; an image's token count is static."""
        num_experts, top_k = self.num_experts, self.top_k
        per_image = len(shape) >= 3
        if self.router_type == "expert_choice":
            if self.group_size != 1 or not per_image:
                raise RuntimeError(
                    "MoE(router='expert_choice') traces with group_size=1 on (B, ..., dim) "
                    f"input only, got group_size={self.group_size} and shape {tuple(shape)}"
                )
            slot_token, slot_gate, _ = self._route_expert_choice(probs, self.group_tokens(shape))
            return self._run_experts(x_flat, slot_token, slot_gate)

        gate_vals, expert_idx = probs.topk(top_k, dim=-1)  # (T, k)
        ones = torch.ones_like(x_flat[:, 0], dtype=torch.long)  # (T,)
        token_order = ones.cumsum(0) - 1  # (T,) 0..T-1, a shape-following arange
        if self.batch_priority:
            token_order = torch.argsort(gate_vals[:, 0], descending=True, stable=True)
        if self.normalize_top_k and top_k > 1:
            gate_vals = gate_vals / gate_vals.sum(dim=-1, keepdim=True)
        flat_token = token_order.repeat(top_k)  # (k*T,) priority order, as in _route_token_choice
        flat_expert = expert_idx[token_order].t().reshape(-1)  # (T, k) -> (k, T) -> (k*T,)
        flat_gate = gate_vals[token_order].t().reshape(-1)
        factor = self._active_capacity_factor()
        if factor is not None:
            tokens = ones.sum().to(torch.float64)  # T, as a tensor
            if self.group_size is None or not per_image:
                group = torch.zeros_like(flat_token)
                group_count = tokens.expand(flat_token.shape)  # (k*T,) tokens in each one's group
                per_group = 0
            else:
                per_group = self.group_size * math.prod(shape[1:-1])  # static: an image's tokens
                group = torch.div(flat_token, per_group, rounding_mode="floor")  # (k*T,)
                group_count = torch.clamp(tokens - group * per_group, max=per_group)
            # Group-major (stable: priority order kept inside each group), then a running count
            # of each expert's assignments, restarted at every group's first assignment.
            order = torch.argsort(group, stable=True)  # (k*T,)
            flat_token, flat_expert, flat_gate = flat_token[order], flat_expert[order], flat_gate[order]
            group, group_count = group[order], group_count[order]
            onehot = F.one_hot(flat_expert, num_experts)  # (k*T, E)
            before = onehot.cumsum(0) - onehot  # (k*T, E) same-expert assignments earlier in the call
            start = group * (top_k * per_group)  # (k*T,) its group's first position (groups before are full)
            rank = ((before - before[start]) * onehot).sum(-1)  # (k*T,) place in its (expert, group) queue
            capacity = torch.minimum(group_count, torch.ceil(factor * group_count * top_k / num_experts))
            flat_gate = torch.where(rank < capacity, flat_gate, 0.0)
        weight = torch.zeros_like(probs).view(-1)  # (T*E,)
        weight = weight.index_add(0, flat_token * num_experts + flat_expert, flat_gate).view_as(probs)  # (T, E)
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
