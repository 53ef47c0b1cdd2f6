"""Parameter and multiply-accumulate counts, as papers report them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Distinct parameters (a weight shared by several blocks counts once)."""
    return sum(p.numel() for p in model.parameters())


class _AttentionFlops(TorchFunctionMode):
    """Adds up the FLOPs ``counter`` records inside each ``F.scaled_dot_product_attention`` call:
    the attention products (q k^T and the weights times v) of every zoo attention mixer."""

    def __init__(self, counter: FlopCounterMode):
        super().__init__()
        self.counter, self.flops = counter, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        before = self.counter.get_total_flops()
        out = func(*args, **(kwargs or {}))
        self.flops += self.counter.get_total_flops() - before
        return out


def count_macs(
    model: nn.Module, img_size: int | tuple[int, int], in_chans: int = 3, *, attention_products: bool = True
) -> int:
    """Multiply-accumulates of one forward pass on one image.

    Counted by torch's FlopCounterMode over convolutions, matmuls and attention (FLOPs / 2), the
    operations papers' GMACs (fvcore, ptflops) count; norms, pooling and activations are not.
    ``attention_products=False`` leaves out the two products inside attention (q k^T and the
    weights times v; the projections stay), as papers that count only convolutions and linear
    layers do (CCT, https://arxiv.org/abs/2104.05704: its MACs column). Those products are the ones
    computed by ``F.scaled_dot_product_attention``, which every zoo attention mixer calls unless
    it is built with ``fused_attn=False``.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    attention = _AttentionFlops(counter)
    # The math attention backend decomposes into matmuls the counter sees; the fused CPU kernel
    # has no FLOP formula registered and would count as zero.
    with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH), attention:
        # on the model's device: a model built on "meta" is counted from shapes alone, no memory
        model(torch.zeros(1, in_chans, h, w, device=next(model.parameters()).device))
    model.train(was_training)
    total = counter.get_total_flops() - (0 if attention_products else attention.flops)
    return total // 2
