"""Parameter and multiply-accumulate counts, as papers report them."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Distinct parameters (a weight shared by several blocks counts once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, img_size: int | tuple[int, int], in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass on one image.

    Counted by torch's FlopCounterMode over convolutions, matmuls and attention (FLOPs / 2), the
    operations papers' GMACs (fvcore, ptflops) count; norms, pooling and activations are not.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    # The math attention backend decomposes into matmuls the counter sees; the fused CPU kernel
    # has no FLOP formula registered and would count as zero.
    with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.zeros(1, in_chans, h, w))
    model.train(was_training)
    return counter.get_total_flops() // 2
