"""Conformer's convolution module (Gulati et al. 2020, https://arxiv.org/abs/2005.08100, figure 2)
as a token mixer, alone and after attention in one block, against loops written from the paper."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_mixers import build, linear, naive_batchnorm, naive_conv, naive_softmax_attention

import zoo
from zoo.layers.mixers import TOKEN_MIXERS, create_token_mixer
from zoo.train.config import load_config
from zoo.train.loop import _create_model


def sigmoid(v):
    return 1 / (1 + torch.exp(-v))


def naive_pointwise(x, conv):
    """x (Cin, H, W), a 1x1 convolution: the same linear map at every pixel."""
    out = torch.zeros(conv.out_channels, *x.shape[1:], dtype=x.dtype)
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            out[:, i, j] = conv.weight[:, :, 0, 0] @ x[:, i, j] + conv.bias
    return out


def naive_conv_module(x, m):
    """x (C, H, W) in eval: pointwise conv to 2C, GLU (first half times sigmoid of the second),
    depthwise conv, BatchNorm, Swish (v * sigmoid(v)), pointwise conv."""
    C = x.shape[0]
    h = naive_pointwise(x, m.pointwise_conv1)  # (2C, H, W)
    h = h[:C] * sigmoid(h[C:])
    k = m.depthwise_conv.kernel_size[0]
    h = naive_conv(h, m.depthwise_conv.weight, stride=1, pad=k // 2, groups=C) + m.depthwise_conv.bias.view(-1, 1, 1)
    h = naive_batchnorm(h, m.batch_norm)
    h = h * sigmoid(h)
    return naive_pointwise(h, m.pointwise_conv2)


@pytest.mark.parametrize("dim, kernel, grid", [(4, 3, (4, 5)), (6, 5, (3, 3)), (3, 1, (2, 4))])
def test_conformer_conv_matches_naive(dim, kernel, grid):
    mixer = build("conformer_conv", dim, {"kernel_size": kernel})
    x = torch.randn(2, dim, *grid, dtype=torch.float64)
    out = mixer(x, grid)
    assert out.shape == x.shape
    for b in range(2):
        torch.testing.assert_close(out[b], naive_conv_module(x[b], mixer), rtol=1e-10, atol=1e-10)


def naive_layernorm_channels(fmap, norm):
    """fmap (C, H, W): each pixel's channels to mean 0, variance 1 (biased), then the affine."""
    out = torch.empty_like(fmap)
    for i in range(fmap.shape[1]):
        for j in range(fmap.shape[2]):
            v = fmap[:, i, j]
            out[:, i, j] = (v - v.mean()) / torch.sqrt(
                ((v - v.mean()) ** 2).mean() + norm.eps
            ) * norm.weight + norm.bias
    return out


def naive_attention_tokens(z, attn):
    """z (N, C): per head, softmax attention over the projected tokens, then the output projection."""
    _, C = z.shape
    heads = attn.num_heads
    hd = C // heads
    qkv = linear(z, attn.qkv)  # (N, 3C): q, k, v, each heads x hd
    out = torch.cat(
        [
            naive_softmax_attention(
                qkv[:, h * hd : (h + 1) * hd],
                qkv[:, C + h * hd : C + (h + 1) * hd],
                qkv[:, 2 * C + h * hd : 2 * C + (h + 1) * hd],
                hd**-0.5,
            )
            for h in range(heads)
        ],
        dim=1,
    )
    return linear(out, attn.proj)


@pytest.mark.parametrize("prefix, grid", [(0, (3, 4)), (1, (3, 3))])
def test_attention_then_conformer_conv_matches_naive(prefix, grid):
    """a = attention(z); c = conv module of LayerNorm(z + a) on the patch tokens; a + c
    (prefix tokens: a only)."""
    dim = 8
    mixer = build("attention_conformer_conv", dim, {"num_heads": 2, "kernel_size": 3}, num_prefix_tokens=prefix)
    N = prefix + grid[0] * grid[1]
    z = torch.randn(2, N, dim, dtype=torch.float64)
    out = mixer(z, grid)
    for b in range(2):
        a = naive_attention_tokens(z[b], mixer.attention)
        h = z[b] + a
        fmap = torch.stack([h[prefix + i * grid[1] + j] for i in range(grid[0]) for j in range(grid[1])], dim=1)
        fmap = fmap.view(dim, *grid)  # (C, H*W) in row-major pixel order -> (C, H, W)
        c = naive_conv_module(naive_layernorm_channels(fmap, mixer.conv_norm), mixer.conv)
        expected = a.clone()
        for i in range(grid[0]):
            for j in range(grid[1]):
                expected[prefix + i * grid[1] + j] += c[:, i, j]
        torch.testing.assert_close(out[b], expected, rtol=1e-10, atol=1e-10)


def test_layouts_are_declared():
    assert TOKEN_MIXERS["conformer_conv"].layout == "nchw"
    assert TOKEN_MIXERS["attention_conformer_conv"].layout == "nlc"


@pytest.mark.parametrize("kernel", [4, 0, True])
def test_bad_kernel_is_one_line(kernel):
    with pytest.raises(ValueError, match="conformer_conv: kernel_size must be an odd positive int") as e:
        create_token_mixer("conformer_conv", 4, {"kernel_size": kernel}, {})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "model, overrides",
    [
        ("zoo_poolformer_mini_32", {"token_mixer": "conformer_conv", "mixer_options": {"kernel_size": 3}}),
        ("zoo_poolformer_mini_32", {"token_mixer": "attention_conformer_conv"}),  # maps -> tokens per stage
        ("zoo_vit_mini_32", {"token_mixer": "attention_conformer_conv", "mixer_options": {"num_heads": 4}}),
    ],
)
def test_swapped_into_a_model_trains(model, overrides):
    torch.manual_seed(0)
    net = zoo.create_model(model, num_classes=3, **overrides)
    x = torch.randn(2, 3, 32, 32)
    net(x).logsumexp(dim=1).sum().backward()
    mixers = [m for m in net.modules() if type(m).__name__ == "ConformerConv"]
    grads = [float(m.depthwise_conv.weight.grad.abs().sum()) for m in mixers]
    if net.global_pool == "token":  # the head reads the class token, which the last convolution skips
        assert grads[-1] == 0
        grads = grads[:-1]
    assert grads and all(g > 0 for g in grads)


def test_yaml_config_selects_it(tmp_path):
    """A YAML file names the part as it names any other: model.spec.token_mixer and its options."""
    base = tmp_path / "conformer.yaml"
    base.write_text(
        f"base: {Path(zoo.__file__).parents[1] / 'configs' / 'mnist5k_poolformer.yaml'}\n"
        "model:\n"
        "  spec:\n"
        "    token_mixer: attention_conformer_conv\n"
        "    mixer_options: {num_heads: 2, kernel_size: 5}\n"
    )
    cfg = load_config(base)
    net = _create_model(cfg, num_classes=10, in_chans=1)
    mixers = [m for m in net.modules() if type(m).__name__ == "AttentionConformerConv"]
    assert len(mixers) == 6 and all(m.conv.depthwise_conv.kernel_size == (5, 5) for m in mixers)
    assert net(torch.randn(1, 1, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("mixer", ["conformer_conv", "attention_conformer_conv"])
def test_conformer_parts_are_one_change_study_arms(mixer):
    """``MODEL:OPTIMIZER:token_mixer=...``: the arm's config overrides build the model the trials train."""
    from zoo.study.arms import parse_arms

    (arm,) = parse_arms(f"zoo_poolformer_mini_32:adamw:token_mixer={mixer}")
    net = _create_model(load_config(None, arm.overrides()), num_classes=10, in_chans=1)
    assert sum(type(m).__name__ == "ConformerConv" for m in net.modules()) == 6
    net(torch.randn(2, 1, 32, 32)).sum().backward()
