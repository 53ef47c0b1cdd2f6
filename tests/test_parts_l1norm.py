"""L1 norms (Hoffer et al. 2018, "Norm matters", https://arxiv.org/abs/1802.09769) against the
paper's formula written here as plain loops in numpy float64, their BatchNorm-like running
statistics, their layouts and their use by name in a model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import zoo
from zoo.layers.norm import NORMS, L1BatchNorm, create_norm

C_L1 = math.sqrt(math.pi / 2)  # the paper's constant


def paper_normalise(v: np.ndarray, eps: float) -> np.ndarray:
    """One group of values: (v - mean) / (sqrt(pi/2) * mean|v - mean| + eps)."""
    mu = v.mean()
    return (v - mu) / (C_L1 * np.abs(v - mu).mean() + eps)


def reference(name: str, x: np.ndarray, layout: str, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """The norm ``name`` on ``x`` by loops over its normalisation groups, then the per-channel affine."""
    xc = np.moveaxis(x, 1, -1) if layout == "nchw" else x  # channels last: (B, ..., C)
    out = np.empty_like(xc)
    if name == "l1_batchnorm":  # one group per channel: every sample and position
        for c in range(xc.shape[-1]):
            out[..., c] = paper_normalise(xc[..., c].ravel(), eps).reshape(xc[..., c].shape)
    elif name == "l1_layernorm":  # one group per token / pixel: its channels
        for idx in np.ndindex(*xc.shape[:-1]):
            out[idx] = paper_normalise(xc[idx], eps)
    elif name == "l1_groupnorm1":  # one group per sample: all its channels and positions
        for b in range(xc.shape[0]):
            out[b] = paper_normalise(xc[b].ravel(), eps).reshape(xc[b].shape)
    out = out * weight + bias
    return np.moveaxis(out, -1, 1) if layout == "nchw" else out


CASES = [
    (name, layout, shape)
    for name in ("l1_batchnorm", "l1_layernorm", "l1_groupnorm1")
    for layout, shape in (("nchw", (3, 5, 4, 3)), ("nlc", (3, 6, 5)), ("nlc", (4, 5)))
]


def _built(name: str, layout: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    norm = create_norm(name, 5, layout).to(dtype)
    with torch.no_grad():  # a non-trivial affine
        norm.weight.copy_(torch.rand(5) + 0.5)
        norm.bias.copy_(torch.randn(5))
    return norm.train()


@pytest.mark.parametrize("name, layout, shape", CASES)
def test_l1_norms_equal_the_papers_formula(name, layout, shape):
    """float64: to 1e-12; float32: to float32 rounding of the float64 reference."""
    torch.manual_seed(1)
    x64 = torch.randn(shape, dtype=torch.float64) * 3 + 2  # an offset and a scale for the norm to remove
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        norm = _built(name, layout, dtype)
        expected = reference(
            name,
            x64.numpy(),
            layout,
            norm.weight.detach().double().numpy(),
            norm.bias.detach().double().numpy(),
            norm.eps,
        )
        out = norm(x64.to(dtype)).double().detach().numpy()
        np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["l1_batchnorm", "l1_layernorm", "l1_groupnorm1"])
def test_l1_norm_gradients_are_the_formulas(name):
    """Autograd through the norm against finite differences of it (abs is smooth away from 0)."""
    torch.manual_seed(2)
    norm = _built(name, "nchw", torch.float64)
    x = torch.randn(2, 5, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: norm(t), (x,))


def test_l1_scale_is_the_standard_deviation_on_gaussian_data():
    """The paper's premise: sqrt(pi/2) * E|x - mu| = sigma for a Gaussian, so on a large Gaussian
    batch L1 batch norm and BatchNorm agree (to the sampling error of the two estimates)."""
    torch.manual_seed(3)
    x = torch.randn(64, 4, 32, 32) * torch.tensor([0.5, 1.0, 2.0, 4.0]).view(1, 4, 1, 1)
    l1 = create_norm("l1_batchnorm", 4, "nchw").train()
    l2 = create_norm("batchnorm", 4, "nchw").train()
    torch.testing.assert_close(l1(x), l2(x), atol=0.02, rtol=0.01)


def naive_running_stats(batches, layout, momentum):
    """torch's BatchNorm rule for the running mean and the L1 scale: new = (1 - m) old + m batch
    (m = 1 / batches seen when momentum is None); start 0 and 1."""
    mean, scale = np.zeros(5), np.ones(5)
    for i, xb in enumerate(batches, start=1):
        xc = np.moveaxis(xb, 1, -1).reshape(-1, 5) if layout == "nchw" else xb.reshape(-1, 5)
        mu = xc.mean(axis=0)
        s = C_L1 * np.abs(xc - mu).mean(axis=0)
        m = 1.0 / i if momentum is None else momentum
        mean, scale = (1 - m) * mean + m * mu, (1 - m) * scale + m * s
    return mean, scale


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("layout, shape", [("nchw", (4, 5, 3, 3)), ("nlc", (4, 7, 5))])
def test_l1_batchnorm_running_statistics_and_eval_like_batchnorm(momentum, layout, shape):
    torch.manual_seed(4)
    norm = L1BatchNorm(5, layout=layout, momentum=momentum).double().train()
    batches = [torch.randn(shape, dtype=torch.float64) * (i + 1) + i for i in range(3)]
    for xb in batches:
        norm(xb)
    mean, scale = naive_running_stats([b.numpy() for b in batches], layout, momentum)
    np.testing.assert_allclose(norm.running_mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(norm.running_scale.numpy(), scale, rtol=1e-12)
    assert int(norm.num_batches_tracked) == 3
    # eval: the running statistics, not the batch's; and nothing is updated
    norm.eval()
    x = torch.randn(shape, dtype=torch.float64)
    shape_c = (1, 5, 1, 1) if layout == "nchw" else (1, 1, 5)
    expected = (x - torch.from_numpy(mean).view(shape_c)) / (torch.from_numpy(scale).view(shape_c) + norm.eps)
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(norm.running_mean.numpy(), mean, rtol=1e-12)
    # the state dict carries them as BatchNorm's does
    assert set(norm.state_dict()) == {"weight", "bias", "running_mean", "running_scale", "num_batches_tracked"}


def test_l1_batchnorm_without_running_stats_uses_the_batch_in_eval():
    torch.manual_seed(5)
    norm = L1BatchNorm(5, layout="nchw", track_running_stats=False).double().eval()
    assert norm.running_mean is None and "running_mean" not in norm.state_dict()
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64) * 2 + 1
    expected = reference("l1_batchnorm", x.numpy(), "nchw", np.ones(5), np.zeros(5), norm.eps)
    np.testing.assert_allclose(norm(x).detach().numpy(), expected, rtol=1e-12, atol=1e-12)


def test_l1_norms_are_registered_with_their_l2_twins_eps():
    assert NORMS["l1_batchnorm"][1] == NORMS["batchnorm"][1]
    assert NORMS["l1_layernorm"][1] == NORMS["layernorm"][1]
    assert NORMS["l1_groupnorm1"][1] == NORMS["groupnorm1"][1]


def test_a_layout_the_norm_does_not_support_is_one_line_before_building():
    with pytest.raises(ValueError) as e:
        create_norm("l1_batchnorm", 8, "ncl")
    assert "\n" not in str(e.value) and "'l1_batchnorm'" in str(e.value) and "'ncl'" in str(e.value)
    with pytest.raises(ValueError, match="did you mean 'l1_batchnorm'"):
        zoo.create_model("zoo_poolformer_mini_32", norm="l1_batchnrom")


@pytest.mark.parametrize(
    "model, overrides",
    [
        ("zoo_poolformer_mini_32", {"norm": "l1_batchnorm", "head_norm": "l1_groupnorm1"}),  # maps
        ("zoo_poolformer_mini_32", {"norm": "l1_groupnorm1"}),
        ("zoo_vit_mini_32", {"norm": "l1_layernorm", "head_norm": "l1_layernorm"}),  # tokens, class token
    ],
)
def test_l1_norm_swapped_into_a_model_trains(model, overrides):
    torch.manual_seed(6)
    net = zoo.create_model(model, num_classes=3, **overrides)
    assert any(type(m).__name__.startswith("L1") for m in net.modules())
    x = torch.randn(2, 3, 32, 32)
    net(x).logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    net.eval()
    assert torch.isfinite(net(x)).all()


def test_norm_precision_bench_writes_its_results_at_toy_size(tmp_path, capsys):
    """The bench end to end through ``python -m zoo.bench``, into a tmp folder. At fp16, inputs of
    scale 300 square beyond fp16's range: the L2 formula in fp16 ops loses the output (relative
    error 1: the variance overflows, the output is 0), the L1 norm does not."""
    from zoo.bench.__main__ import main

    argv = ["norm-precision", "--shapes", "nchw:4x8x4x4,nlc:2x5x8", "--seeds", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "norm_precision.json").read_text())
    assert data["command"].startswith("python -m zoo.bench norm-precision")
    rows = {(r["norm"], r["layout"], r["input"], r["dtype"]): r for r in data["rows"]}
    assert len(rows) == 9 * 2 * 3 * 2  # (L2 torch, L2 same ops, L1) x 3 families, shapes, inputs, dtypes
    for family, l1 in (("batchnorm", "l1_batchnorm"), ("layernorm", "l1_layernorm"), ("groupnorm1", "l1_groupnorm1")):
        assert rows[(family + "_same_ops", "nchw", "wide", "fp16")]["out_rel_err"] > 0.9
        assert rows[(l1, "nchw", "wide", "fp16")]["out_rel_err"] < 1e-2
        assert rows[(family, "nchw", "normal", "bf16")]["out_rel_err"] < 1e-2
    table = (tmp_path / "norm_precision.md").read_text()
    assert table.startswith("| norms") and "l1_layernorm" in table
    assert (tmp_path / "norm_precision.csv").read_text().startswith("norm,layout,shape,input,dtype")


@pytest.mark.parametrize("norm", ["l1_batchnorm", "l1_layernorm", "l1_groupnorm1"])
def test_l1_norm_is_a_one_change_study_arm(norm):
    """``MODEL:OPTIMIZER:norm=...``: the arm's config overrides build the model the trials train."""
    from zoo.study.arms import parse_arms
    from zoo.train.config import load_config
    from zoo.train.loop import _create_model

    (arm,) = parse_arms(f"zoo_poolformer_mini_32:adamw:norm={norm}")
    net = _create_model(load_config(None, arm.overrides()), num_classes=10, in_chans=1)
    assert sum(type(m).__name__.startswith("L1") for m in net.modules()) == 12  # two a block, 6 blocks
    net(torch.randn(2, 1, 32, 32)).sum().backward()


def test_new_parts_trace_with_timms_fx_feature_extraction():
    """timm's FX feature extractor (features_only through FX) treats the L1 norms and the sparse
    FFN as leaves (they read their input's rank / token count) and gives the eager model's maps."""
    from timm.models import FeatureGraphNet

    torch.manual_seed(7)
    overrides = {"norm": "l1_batchnorm", "channel_mixer": "sparse_ffn", "token_mixer": "conformer_conv"}
    net = zoo.create_model("zoo_poolformer_mini_32", num_classes=3, **overrides).eval()
    x = torch.randn(2, 3, 32, 32)
    traced = FeatureGraphNet(net, out_indices=(1, 3))(x)
    eager = net.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    for t, e in zip(traced, eager, strict=True):
        torch.testing.assert_close(t, e)
