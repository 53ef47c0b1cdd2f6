"""The sparse feed-forward layer of "Sparse is Enough in Scaling Transformers".

Jaszczur et al. 2021, https://arxiv.org/abs/2111.12763 (its sparse feedforward layer);
the authors' code is trax's ``SparseFF`` (``trax/layers/research/sparsity.py``), whose defaults
this layer takes. Registered as the channel mixer ``sparse_ffn`` (``zoo.layers.mlp.CHANNEL_MIXERS``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import register_notrace_module
from torch import nn

from .activations import get_act
from .init import trunc_normal_init_

__all__ = ["SparseFFN"]


def _check_positive_int(option: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"sparse_ffn: {option} must be a positive int, got {value!r}")


def _is_real(value: object) -> bool:
    """A real number, not a bool nor a string (YAML reads ``1e-1`` as the string "1e-1")."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# A leaf of timm's FX trace (feature extraction): eval picks its path from the token count.
@register_notrace_module
class SparseFFN(nn.Module):
    """A feed-forward layer whose hidden units come in blocks of ``block_size``, one unit a block
    active per token, picked by a low-rank controller.

    Jaszczur et al. 2021, "Sparse is Enough in Scaling Transformers", https://arxiv.org/abs/2111.12763::

        y = fc2(act(fc1(x)) * controller(x))
        logits = controller_up(controller_down(x))      # dim -> rank -> hidden_dim, viewed (blocks, N)

    where ``controller(x)`` keeps one unit of each block of ``N = block_size`` consecutive hidden
    units (unit ``b * N + j`` is unit ``j`` of block ``b``):

    - eval: the block's argmax, a one-hot mask. A token's units depend on that token alone, so an
      eval prediction never depends on its batch-mates. Where a call has fewer tokens than
      ``block_size`` (decoding: one token at a time) only the chosen rows of ``fc1`` and columns of
      ``fc2`` are read (``hidden_dim / N`` of each), the saving the paper's decoding-speed claim is
      about; with more tokens the dense product masked to the chosen units is cheaper (one matmul
      against one gather of weights per token). Both compute the same function (tested).
    - training: Gumbel-softmax with the straight-through estimator, as the authors' code: the unit
      ``argmax(log softmax(logits) + temperature * g)`` (g Gumbel noise; temperature 0.1) is kept
      in the forward, and the gradient flows through ``softmax(logits)``; in a ``1 - quant_prob``
      share of the forward calls (one draw a call: 0.7 by the authors' default) the soft mask
      ``softmax(logits)`` is used instead, for training stability (their code cites
      Kaiser & Bengio 2018, https://arxiv.org/abs/1801.09797, section 2.1).

    The mask multiplies the activated units (the paper's ``max(0, x W1 + b1) * Controller(x)``);
    trax's code multiplies before its ReLU and has no ``b1``, which gives the same forward with a
    ReLU but not the same controller gradient: there an unchosen unit's product is 0, where the
    ReLU passes no gradient, so only the chosen unit's mask entry is trained, while here every
    unit's entry gets its activation times the output's gradient (the straight-through gradient
    of the paper's formula). Options and their defaults: ``block_size`` 32 (trax's ``n_elements_in_block``),
    ``controller_rank`` 64 (trax's ``d_lowrank``), ``temperature`` 0.1 and ``quant_prob`` 0.3
    (trax's), ``act`` ReLU (the paper's).
    ``block_size`` must divide ``hidden_dim`` (``dim * mlp_ratio`` in a stage).

    Parameters: those of a dense MLP of the same hidden width plus the controller's
    ``dim * rank + rank * hidden_dim + hidden_dim``. Shapes: ``(..., dim) -> (..., dim)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        hidden_dim: int,
        bias: bool = True,
        drop: float = 0.0,
        block_size: int = 32,
        controller_rank: int = 64,
        temperature: float = 0.1,
        quant_prob: float = 0.3,
        act: str = "relu",
    ) -> None:
        super().__init__()
        _check_positive_int("block_size", block_size)
        _check_positive_int("controller_rank", controller_rank)
        if hidden_dim % block_size:
            raise ValueError(
                f"sparse_ffn: block_size {block_size} does not divide the hidden width {hidden_dim} "
                f"(dim {dim} x mlp_ratio); pass a block_size that divides {hidden_dim}"
            )
        if not _is_real(quant_prob) or not 0.0 <= quant_prob <= 1.0:
            raise ValueError(f"sparse_ffn: quant_prob must be a number in [0, 1], got {quant_prob!r}")
        if not _is_real(temperature) or temperature < 0:
            raise ValueError(f"sparse_ffn: temperature must be a number >= 0, got {temperature!r}")
        self.block_size, self.num_blocks = block_size, hidden_dim // block_size
        self.temperature, self.quant_prob = float(temperature), float(quant_prob)
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = get_act(act)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)
        self.controller_down = nn.Linear(dim, controller_rank, bias=False)
        self.controller_up = nn.Linear(controller_rank, hidden_dim)
        for layer in (self.fc1, self.fc2, self.controller_down, self.controller_up):
            trunc_normal_init_(layer.weight, layer.bias)

    def controller_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.controller_up(self.controller_down(x))  # (..., dim) -> (..., rank) -> (..., hidden)
        return logits.unflatten(-1, (self.num_blocks, self.block_size))  # (..., blocks, N)

    def train_mask(
        self, logits: torch.Tensor, gumbel: torch.Tensor | None = None, hard: bool | torch.Tensor | None = None
    ) -> torch.Tensor:
        """The training mask (..., blocks, N): the straight-through one-hot of the noisy argmax, or
        (where ``hard`` is False) the soft mask. ``gumbel`` (noise of ``logits``' shape) and ``hard``
        default to fresh draws; a test passes them to fix the noise."""
        probs = logits.softmax(dim=-1)
        if gumbel is None:  # the authors' clamp of the uniform draw, so that no log is infinite
            # drawn in float32 at least, as the authors' code: under bf16 autocast the logits are
            # bf16, whose coarse grid below 1 cuts the Gumbel tail short and biases its mean
            noise_dtype = torch.promote_types(logits.dtype, torch.float32)
            uniform = torch.empty(logits.shape, dtype=noise_dtype, device=logits.device).uniform_(1e-6, 1.0 - 1e-6)
            gumbel = -torch.log(-torch.log(uniform))
        choice = (logits.log_softmax(dim=-1) + self.temperature * gumbel).argmax(dim=-1)  # (..., blocks)
        one_hot = F.one_hot(choice, self.block_size).to(probs.dtype)
        # forward: exactly the one-hot (probs - probs is 0 in any dtype; one_hot + probs - probs
        # rounds 1 + p in bf16); backward: the softmax's gradient
        straight_through = one_hot + (probs - probs.detach())
        if hard is None:  # one draw a call, on the device (no host sync)
            hard = torch.rand((), device=logits.device) < self.quant_prob
        return torch.where(torch.as_tensor(hard, device=logits.device), straight_through, probs)

    def forward(
        self, x: torch.Tensor, *, gumbel: torch.Tensor | None = None, hard: bool | torch.Tensor | None = None
    ) -> torch.Tensor:
        logits = self.controller_logits(x)
        if not self.training:
            choice = logits.argmax(dim=-1)  # (..., blocks): per token, nothing shared with batch-mates
            tokens = x.numel() // x.shape[-1]
            return self._eval_gathered(x, choice) if tokens < self.block_size else self._eval_masked(x, choice)
        mask = self.train_mask(logits, gumbel, hard)
        h = self.act(self.fc1(x)).unflatten(-1, (self.num_blocks, self.block_size))  # (..., blocks, N)
        h = self.drop1((h * mask).flatten(-2))  # (..., blocks, N) -> (..., hidden)
        return self.drop2(self.fc2(h))

    def _eval_masked(self, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Every unit computed, all but the chosen ones zeroed: one matmul each way."""
        h = self.act(self.fc1(x)).unflatten(-1, (self.num_blocks, self.block_size))  # (..., blocks, N)
        h = h * F.one_hot(choice, self.block_size).to(h.dtype)
        return self.fc2(h.flatten(-2))  # (..., hidden) -> (..., dim)

    def _eval_gathered(self, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Only the chosen units: their rows of fc1's weight and columns of fc2's, gathered per token."""
        dim = x.shape[-1]
        flat = x.reshape(-1, dim)  # (..., dim) -> (T, dim)
        offsets = torch.arange(self.num_blocks, device=x.device) * self.block_size
        units = choice.reshape(-1, self.num_blocks) + offsets  # (T, blocks): hidden-unit indices
        w1 = self.fc1.weight[units]  # (hidden, dim)[T, blocks] -> (T, blocks, dim)
        h = torch.einsum("td,tbd->tb", flat, w1)
        if self.fc1.bias is not None:
            h = h + self.fc1.bias[units]
        h = self.act(h)  # (T, blocks)
        w2 = self.fc2.weight.t()[units]  # (hidden, dim)[T, blocks] -> (T, blocks, dim)
        y = torch.einsum("tb,tbd->td", h, w2)
        if self.fc2.bias is not None:
            y = y + self.fc2.bias
        return y.reshape(x.shape)  # (T, dim) -> (..., dim)
