"""Soft MoE channel mixer: experts on soft mixtures of an image's tokens, nothing dropped.

Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts", https://arxiv.org/abs/2308.00951
(the reference implementation is google-research/vmoe, ``vmoe/projects/soft_moe/router.py``).

For one image's ``N`` tokens ``X (N, dim)``, ``E`` experts with ``p`` slots each (``S = E * p``
slots) and learned slot embeddings ``Phi (S, dim)``:

1. ``logits = X Phi^T`` ``(N, S)`` (fp32, autocast off). With ``normalize`` (default, the paper's
   section 2.3 and vmoe's default) both ``X`` and ``Phi`` are L2-normalised along ``dim`` and
   ``Phi`` is multiplied by a learned scalar ``scale`` (initialised to 1).
2. Dispatch weights ``D = softmax(logits)`` over the TOKENS (each slot is a convex combination
   of the image's tokens); slot inputs ``D^T X`` ``(S, dim)``.
3. Expert ``i`` runs on its ``p`` slots (all experts at once, one ``baddbmm`` per linear).
4. Combine weights ``C = softmax(logits)`` over the SLOTS (each token a convex combination of
   the slot outputs); output ``C Y`` ``(N, dim)``.

Every token reaches every slot with a non-zero weight: nothing is dropped, there is no capacity,
no sort and no auxiliary loss, and the softmaxes run within one image, so an image's output
never depends on its batch-mates. Compute: ``S`` slot rows through one expert each, plus the two
``N x S x dim`` mixing products; with ``S = k * N`` it matches a top-k MoE's active FLOPs (plus
``N / hidden_dim`` of that for the mixing).

Input: channels-last ``(B, N, dim)`` or ``(B, H, W, dim)`` (one image per leading index; all
middle axes are its tokens) or ``(N, dim)`` (one image). Works under ``torch.jit.trace``,
``torch.export`` and ONNX at any batch size: every shape follows the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activations import get_act
from .init import trunc_normal_init_
from .moe import autocast_off, expert_mlp

__all__ = ["SoftMoE"]


class SoftMoE(nn.Module):
    """Soft mixture of feed-forward experts (Puigcerver et al. 2023), per image.

    Args:
        dim: channels in and out; input is channels-last ``(..., dim)``.
        hidden_dim: hidden width of EACH expert (each expert is an ``Mlp(dim, hidden_dim)``).
        num_experts: ``E``.
        slots_per_expert: ``p``; an image is mixed into ``E * p`` slots. The paper's models use
            about as many slots as tokens or fewer; the default ``4 x 16 = 64`` slots is the
            token count of this zoo's 32x32 models (an 8x8 grid). Slots are parameters, so the
            count is fixed at construction, independent of the input size.
        act: expert activation, a name for :func:`zoo.layers.activations.get_act`.
        bias: biases in the expert linears.
        drop: dropout after the activation and after the second linear, as in ``Mlp``.
        normalize: L2-normalise tokens and slot embeddings and scale the logits by the learned
            ``scale`` (the paper's normalisation, needed at large ``dim``); ``False`` uses the
            raw dot products.

    Parameters: ``slot_embed (E * p, dim)`` (slot ``s`` belongs to expert ``s // p``),
    ``scale ()`` (with ``normalize``), and the experts as in :class:`zoo.layers.moe.MoE`:
    ``fc1_weight (E, hidden, dim)``, ``fc1_bias (E, hidden)``, ``fc2_weight (E, dim, hidden)``,
    ``fc2_bias (E, dim)``. Init: slot embeddings normal with std ``dim ** -0.5`` (vmoe's LeCun
    normal), experts truncated-normal std .02 with zero biases.
    """

    def __init__(
        self,
        dim: int,
        *,
        hidden_dim: int,
        num_experts: int = 4,
        slots_per_expert: int = 16,
        act: str = "gelu",
        bias: bool = True,
        drop: float = 0.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("num_experts", num_experts), ("slots_per_expert", slots_per_expert)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.num_experts = num_experts
        self.slots_per_expert = slots_per_expert
        self.normalize = normalize
        self.slot_embed = nn.Parameter(torch.empty(num_experts * slots_per_expert, dim))
        self.scale = nn.Parameter(torch.ones(())) if normalize else None
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
        self.reset_parameters()

    @property
    def num_slots(self) -> int:
        return self.num_experts * self.slots_per_expert

    def reset_parameters(self) -> None:
        nn.init.normal_(self.slot_embed, std=self.dim**-0.5)
        if self.scale is not None:
            nn.init.ones_(self.scale)
        trunc_normal_init_(self.fc1_weight, self.fc1_bias)
        trunc_normal_init_(self.fc2_weight, self.fc2_bias)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
            f"slots_per_expert={self.slots_per_expert}, normalize={self.normalize}"
        )

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token-slot logits ``(B, N, dim) -> (B, N, S)``, fp32 even under autocast."""
        with autocast_off(tokens.device.type):
            x, phi = tokens.float(), self.slot_embed.float()
            if not self.normalize:
                return torch.matmul(x, phi.t())  # (B, N, C) @ (C, S) -> (B, N, S)
            phi = F.normalize(phi, dim=-1, eps=1e-6) * self.scale.float()
            # normalize(x) @ phi^T divides each token's row of logits by max(|x|, eps): done on the
            # (B, N, S) logits rather than on the (B, N, C) tokens, it spares a full pass over the
            # tokens, forward and backward (the same function; vmoe normalises the tokens first)
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-6)  # (B, N, 1)
            return torch.matmul(x, phi.t()) / norm  # (B, N, C) @ (C, S) -> (B, N, S)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.unsqueeze(0) if x.dim() == 2 else x.flatten(1, -2)  # (B, N, C): one row an image
        num_experts, slots_per_expert, num_slots = self.num_experts, self.slots_per_expert, self.num_slots
        logits = self.logits(tokens)  # (B, N, S) fp32
        dispatch = logits.softmax(dim=1)  # over the image's tokens: each slot a mix of tokens
        combine = logits.softmax(dim=2)  # over the slots: each token a mix of slot outputs
        # (B, S, N) @ (B, N, C) -> (B, S, C); in the input's dtype (autocast casts both operands)
        slots = torch.matmul(dispatch.transpose(1, 2).to(tokens.dtype), tokens)
        # (B, S, C) -> (B, E, p, C) -> (E, B, p, C) -> (E, B*p, C): every expert's slots of every image
        buf = slots.view(-1, num_experts, slots_per_expert, self.dim).transpose(0, 1).reshape(num_experts, -1, self.dim)
        out = expert_mlp(
            buf, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias, self.act, self.drop1, self.drop2
        )  # (E, B*p, C)
        # (E, B*p, C) -> (E, B, p, C) -> (B, E, p, C) -> (B, S, C)
        out = out.view(num_experts, -1, slots_per_expert, self.dim).transpose(0, 1).reshape(-1, num_slots, self.dim)
        y = torch.matmul(combine.to(out.dtype), out)  # (B, N, S) @ (B, S, C) -> (B, N, C)
        return y.view(shape)
