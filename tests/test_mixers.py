"""Token mixers against naive computations: explicit loops over positions, kernels and tokens.

Every mixer registered in ``zoo.layers.mixers`` is compared here with a slow, obviously-correct
re-computation from its parameters, on small random inputs in double precision.
"""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import randomize_batchnorm_stats

from zoo.layers.mixers import TOKEN_MIXERS, create_token_mixer


def build(name: str, dim: int, options: dict, **context) -> torch.nn.Module:
    torch.manual_seed(0)
    mixer = create_token_mixer(name, dim, options, context).double()
    with torch.no_grad():  # non-trivial affines and BatchNorm statistics
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    randomize_batchnorm_stats(mixer, mean_std=0.5)
    return mixer.eval()


def naive_softmax_attention(q, k, v, scale):
    """q (Nq, hd), k/v (Nk, hd): explicit softmax over keys, one query at a time."""
    out = torch.zeros(q.shape[0], v.shape[1], dtype=q.dtype)
    for i in range(q.shape[0]):
        logits = torch.stack([(q[i] * k[j]).sum() * scale for j in range(k.shape[0])])
        w = torch.exp(logits - logits.max())
        w = w / w.sum()
        out[i] = sum(w[j] * v[j] for j in range(k.shape[0]))
    return out


def naive_conv(x, weight, *, stride, pad, groups):
    """x (C, H, W), weight (Cout, C/groups, k, k), no bias: loops over outputs and kernel taps."""
    C, H, W = x.shape
    Cout, cg, k, _ = weight.shape
    xp = torch.zeros(C, H + 2 * pad, W + 2 * pad, dtype=x.dtype)
    xp[:, pad : pad + H, pad : pad + W] = x
    Ho, Wo = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    out = torch.zeros(Cout, Ho, Wo, dtype=x.dtype)
    per_group = Cout // groups
    for o in range(Cout):
        g = o // per_group
        for i in range(Ho):
            for j in range(Wo):
                acc = 0.0
                for c in range(cg):
                    for a in range(k):
                        for b in range(k):
                            acc = acc + xp[g * cg + c, i * stride + a, j * stride + b] * weight[o, c, a, b]
                out[o, i, j] = acc
    return out


def naive_batchnorm(x, bn):
    """x (C, H, W) in eval mode."""
    shape = (-1, 1, 1)
    return (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) * bn.weight.view(
        shape
    ) + bn.bias.view(shape)


def linear(x, layer):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


# ---- conv_attention -------------------------------------------------------------------------

CONV_ATTENTION_CASES = [
    # (groups, num_heads, stride_kv, prefix tokens, scale, grid)
    ("depthwise", 2, 2, 0, "dim", (5, 5)),  # CvT stages 1-2
    ("depthwise", 2, 2, 1, "dim", (4, 6)),  # CvT stage 3: class token skips the convolution
    ("heads", 2, 2, 0, "head_dim", (5, 4)),  # one group a head (Primer-style per-head convolution)
    (4, 2, 1, 2, "head_dim", (3, 3)),  # an int group count, stride 1, two prefix tokens
]


@pytest.mark.parametrize("groups,heads,stride_kv,prefix,scale,grid", CONV_ATTENTION_CASES)
def test_conv_attention_matches_naive(groups, heads, stride_kv, prefix, scale, grid):
    dim = 8
    mixer = build(
        "conv_attention",
        dim,
        {"num_heads": heads, "groups": groups, "stride_kv": stride_kv, "scale": scale},
        num_prefix_tokens=prefix,
    )
    H, W = grid
    torch.manual_seed(1)
    x = torch.randn(2, prefix + H * W, dim, dtype=torch.float64)
    with torch.no_grad():
        out = mixer(x, grid)
    n_groups = {"depthwise": dim, "heads": heads}.get(groups, groups)
    assert mixer.conv_proj_q.conv.weight.shape == (dim, dim // n_groups, 3, 3)
    hd = dim // heads
    sc = (dim if scale == "dim" else hd) ** -0.5
    expected = torch.zeros_like(x)
    for b in range(2):
        fmap = x[b, prefix:].T.reshape(dim, H, W)  # tokens row by row -> (C, H, W)
        seqs = []
        for proj, stride in ((mixer.conv_proj_q, 1), (mixer.conv_proj_k, stride_kv), (mixer.conv_proj_v, stride_kv)):
            y = naive_batchnorm(naive_conv(fmap, proj.conv.weight, stride=stride, pad=1, groups=n_groups), proj.bn)
            seqs.append(torch.cat([x[b, :prefix], y.reshape(dim, -1).T]))  # prefix tokens go in unconvolved
        q, k, v = linear(seqs[0], mixer.proj_q), linear(seqs[1], mixer.proj_k), linear(seqs[2], mixer.proj_v)
        heads_out = [
            naive_softmax_attention(
                q[:, h * hd : (h + 1) * hd], k[:, h * hd : (h + 1) * hd], v[:, h * hd : (h + 1) * hd], sc
            )
            for h in range(heads)
        ]
        expected[b] = linear(torch.cat(heads_out, dim=1), mixer.proj)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


def test_conv_attention_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="stride_q must be 1"):
        create_token_mixer("conv_attention", 8, {"num_heads": 2, "stride_q": 2}, {"num_prefix_tokens": 0})
    with pytest.raises(ValueError, match="groups must be"):
        create_token_mixer("conv_attention", 8, {"num_heads": 2, "groups": 3}, {"num_prefix_tokens": 0})
    with pytest.raises(ValueError, match="not divisible"):
        create_token_mixer("conv_attention", 8, {"num_heads": 3}, {"num_prefix_tokens": 0})
    # what the stage supplies is not an option a spec may set
    with pytest.raises(TypeError, match="no option 'num_prefix_tokens'"):
        create_token_mixer("conv_attention", 8, {"num_heads": 2, "num_prefix_tokens": 1}, {"num_prefix_tokens": 0})
    with pytest.raises(TypeError, match="did you mean 'stride_kv'"):
        create_token_mixer("conv_attention", 8, {"num_heads": 2, "stride_k": 2}, {"num_prefix_tokens": 0})


# ---- token_shift -----------------------------------------------------------------------------


@pytest.mark.parametrize("dim,n_div,grid", [(24, 12, (5, 6)), (10, 4, (3, 3))])
def test_token_shift_matches_naive(dim, n_div, grid):
    mixer = build("token_shift", dim, {"n_div": n_div})
    H, W = grid
    torch.manual_seed(1)
    x = torch.randn(2, dim, H, W, dtype=torch.float64)
    out = mixer(x, grid)
    g = dim // n_div
    shifted = torch.zeros_like(x)
    for c in range(dim):
        for i in range(H):
            for j in range(W):
                if c < g:  # left: each pixel takes its right neighbour
                    src = (i, j + 1)
                elif c < 2 * g:  # right
                    src = (i, j - 1)
                elif c < 3 * g:  # up: each pixel takes the one below
                    src = (i + 1, j)
                elif c < 4 * g:  # down
                    src = (i - 1, j)
                else:
                    src = (i, j)
                if 0 <= src[0] < H and 0 <= src[1] < W:
                    shifted[:, c, i, j] = x[:, c, src[0], src[1]]
    torch.testing.assert_close(out, shifted - x, atol=0, rtol=0)
    # channels_last input (how a stage feeds it) gives the same
    torch.testing.assert_close(mixer(x.contiguous(memory_format=torch.channels_last), grid), out)


# ---- spatial_gating --------------------------------------------------------------------------


def test_spatial_gating_matches_naive():
    dim, tokens = 6, 5
    mixer = build("spatial_gating", dim, {"ffn_ratio": 2.0}, num_tokens=tokens)
    torch.manual_seed(1)
    x = torch.randn(2, tokens, dim, dtype=torch.float64)
    with torch.no_grad():
        out = mixer(x, (1, tokens))
    half = dim  # ffn_ratio 2: hidden 12, two halves of 6
    expected = torch.zeros_like(x)
    for b in range(2):
        h = linear(x[b], mixer.fc1)
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        u, v = h[:, :half], h[:, half:]
        mu, var = v.mean(-1, keepdim=True), v.var(-1, unbiased=False, keepdim=True)
        v = (v - mu) / torch.sqrt(var + mixer.norm.eps) * mixer.norm.weight + mixer.norm.bias
        gate = torch.zeros_like(v)
        for n in range(tokens):  # the projection mixes TOKENS, channel by channel
            gate[n] = sum(mixer.proj.weight[n, m] * v[m] for m in range(tokens)) + mixer.proj.bias[n]
        expected[b] = linear(u * gate, mixer.fc2)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


def test_spatial_gating_starts_as_identity_gate_and_checks_token_count():
    torch.manual_seed(0)
    mixer = create_token_mixer("spatial_gating", 8, {}, {"num_tokens": 4})
    assert mixer.proj.weight.abs().max() < 1e-5 and torch.equal(mixer.proj.bias, torch.ones(4))
    assert mixer.norm.eps == 1e-5  # timm's SpatialGatingUnit norm is a plain nn.LayerNorm
    with pytest.raises(ValueError, match=r"built for 4 tokens.*img_size"):
        mixer(torch.randn(1, 9, 8), (3, 3))


# ---- the first families' mixers: pooling, attention, identity ---------------------------------


def test_pooling_matches_naive():
    mixer = build("pooling", 3, {"pool_size": 3})
    torch.manual_seed(1)
    x = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    out = mixer(x, (4, 5))
    expected = torch.zeros_like(x)
    for i in range(4):
        for j in range(5):  # average of the real pixels in the 3x3 window (count_include_pad=False)
            window = x[:, :, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
            expected[:, :, i, j] = window.mean((2, 3))
    torch.testing.assert_close(out, expected - x, atol=1e-12, rtol=1e-12)


def test_attention_matches_naive():
    dim, heads, n = 8, 2, 5
    mixer = build("attention", dim, {"num_heads": heads})
    torch.manual_seed(1)
    x = torch.randn(1, n, dim, dtype=torch.float64)
    with torch.no_grad():
        out = mixer(x, (1, n))
    qkv = linear(x[0], mixer.qkv)
    q, k, v = qkv[:, :dim], qkv[:, dim : 2 * dim], qkv[:, 2 * dim :]
    hd = dim // heads
    per_head = [
        naive_softmax_attention(
            q[:, h * hd : (h + 1) * hd], k[:, h * hd : (h + 1) * hd], v[:, h * hd : (h + 1) * hd], hd**-0.5
        )
        for h in range(heads)
    ]
    torch.testing.assert_close(out[0], linear(torch.cat(per_head, 1), mixer.proj), atol=1e-10, rtol=1e-10)


def test_identity_returns_input():
    x = torch.randn(2, 4, 3, 3)
    assert create_token_mixer("identity", 4, {}, {})(x, (3, 3)) is x


# ---- MetaFormer-v2's mixers: sepconv (ConvFormer), random_mixing (RandFormer) ------------------


def test_sepconv_matches_naive():
    dim, grid = 3, (4, 5)
    mixer = build("sepconv", dim, {"kernel_size": 3})  # 3x3 to keep the naive loops short
    assert mixer.pwconv1.bias is None and mixer.dwconv.bias is None and mixer.pwconv2.bias is None
    torch.manual_seed(1)
    x = torch.randn(1, dim, *grid, dtype=torch.float64)
    with torch.no_grad():
        out = mixer(x, grid)
    s, b = mixer.act1.scale, mixer.act1.bias
    hidden = torch.einsum("oc,chw->ohw", mixer.pwconv1.weight, x[0])  # pointwise: dim -> 2 dim
    hidden = s * torch.relu(hidden) ** 2 + b  # StarReLU
    hidden = naive_conv(hidden, mixer.dwconv.weight, stride=1, pad=1, groups=2 * dim)  # depthwise
    expected = torch.einsum("oc,chw->ohw", mixer.pwconv2.weight, hidden)  # pointwise: 2 dim -> dim
    torch.testing.assert_close(out[0], expected, atol=1e-10, rtol=1e-10)


def test_sepconv_calls_its_pointwise_layers_where_hooks_must_see_them():
    """The 1x1-convolution path reads the linear weights; any hook on those layers, their own or a
    global module hook, must see them called, with the same output."""
    torch.manual_seed(0)
    mixer = build("sepconv", 4, {})
    x = torch.randn(2, 4, 5, 5, dtype=mixer.pwconv1.weight.dtype)
    with torch.no_grad():
        direct = mixer(x, (5, 5))
        seen = []
        handle = mixer.pwconv1.register_forward_hook(lambda m, i, o: seen.append("own"))
        torch.testing.assert_close(mixer(x, (5, 5)), direct)
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: seen.append("global") if m is mixer.pwconv2 else None
        )
        try:
            torch.testing.assert_close(mixer(x, (5, 5)), direct)
        finally:
            handle.remove()
    assert seen == ["own", "global"]


def test_random_mixing_matches_naive_and_is_a_frozen_buffer():
    dim, grid = 3, (2, 3)
    mixer = build("random_mixing", dim, {}, num_tokens=6)
    matrix = mixer.random_matrix
    assert not list(mixer.parameters()) and "random_matrix" in mixer.state_dict()
    assert (matrix > 0).all()  # a softmax of uniform numbers: each row a convex combination
    torch.testing.assert_close(matrix.sum(-1), torch.ones(6, dtype=matrix.dtype))
    torch.manual_seed(1)
    x = torch.randn(2, dim, *grid, dtype=torch.float64)
    out = mixer(x, grid)
    tokens = [(i, j) for i in range(grid[0]) for j in range(grid[1])]  # row-major, as the official reshape
    for m, (i, j) in enumerate(tokens):
        expected = sum(matrix[m, n] * x[:, :, a, c] for n, (a, c) in enumerate(tokens))
        torch.testing.assert_close(out[:, :, i, j], expected, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="built for 6 tokens"):
        mixer(torch.randn(1, dim, 3, 3, dtype=torch.float64), (3, 3))


def test_every_registered_mixer_is_covered_here():
    assert set(TOKEN_MIXERS) == {
        "pooling",
        "attention",
        "conv_attention",
        "token_shift",
        "spatial_gating",
        "sepconv",
        "random_mixing",
        "identity",
        "conformer_conv",  # tests/test_parts_conformer.py
        "attention_conformer_conv",
    }
