"""CvT, gMLP and WideNet: exactness against references, published sizes, weight sharing, parts, YAML.

References:

- CvT: ``OfficialCvT`` below, a compact re-implementation (plain torch, no einops) of the official
  ``lib/models/cls_cvt.py`` of https://github.com/microsoft/CvT as ``get_cls_model`` builds it:
  ConvEmbed (conv, LayerNorm on tokens), ``conv_proj_q/k/v`` = depthwise conv without bias +
  BatchNorm (stride 1 for q, 2 for k and v), class token split off before the convolution and
  concatenated back, ``proj_q/k/v`` and ``proj`` linears, logits scaled by ``dim ** -0.5``,
  QuickGELU MLP of ratio 4, LayerNorm eps 1e-5, final norm of the stage-3 class token, head. Its
  module names are the official ones, so its ``state_dict()`` IS an official checkpoint layout.
  (HuggingFace's ``CvtForImageClassification`` is not used: it swaps the official QuickGELU for
  GELU, so official weights do not give the official logits there.)
- gMLP: timm's ``gmlp_*16_224`` (``timm/models/mlp_mixer.py``) and its key layout.

Each reference gets random weights (1-d parameters and BatchNorm statistics perturbed too), is
saved to a file, loaded with ``zoo.create_model(name, pretrained=file)`` and compared in eval mode.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from model_helpers import randomize_batchnorm_stats
from torch import nn

import zoo
from zoo.bench.counts import count_params
from zoo.layers import collect_aux_loss
from zoo.layers.moe import MoE
from zoo.models.registry import get_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ---- the CvT reference ----------------------------------------------------------------------


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), _QuickGELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _ConvProj(nn.Module):  # official: Sequential(conv, bn, Rearrange('b c h w -> b (h w) c'))
    def __init__(self, dim, stride):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=stride, padding=1, bias=False, groups=dim)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x):
        return self.bn(self.conv(x)).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, dim, heads, with_cls):
        super().__init__()
        self.heads, self.with_cls, self.scale = heads, with_cls, dim**-0.5  # official: dim_out ** -0.5
        self.conv_proj_q, self.conv_proj_k, self.conv_proj_v = _ConvProj(dim, 1), _ConvProj(dim, 2), _ConvProj(dim, 2)
        self.proj_q, self.proj_k, self.proj_v = (nn.Linear(dim, dim, bias=True) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, h, w):
        if self.with_cls:
            cls, x = torch.split(x, [1, h * w], 1)
        B, _, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, h, w)
        q, k, v = self.conv_proj_q(x), self.conv_proj_k(x), self.conv_proj_v(x)
        if self.with_cls:
            q, k, v = torch.cat((cls, q), 1), torch.cat((cls, k), 1), torch.cat((cls, v), 1)

        def split(t):  # 'b t (h d) -> b h t d'
            return t.reshape(B, t.shape[1], self.heads, C // self.heads).transpose(1, 2)

        q, k, v = split(self.proj_q(q)), split(self.proj_k(k)), split(self.proj_v(v))
        attn = F.softmax(torch.einsum("bhlk,bhtk->bhlt", q, k) * self.scale, dim=-1)
        x = torch.einsum("bhlt,bhtv->bhlv", attn, v).transpose(1, 2).reshape(B, -1, C)
        return self.proj(x)


class _Block(nn.Module):
    def __init__(self, dim, heads, with_cls):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-5), nn.LayerNorm(dim, eps=1e-5)
        self.attn, self.mlp = _Attention(dim, heads, with_cls), _Mlp(dim, 4 * dim)

    def forward(self, x, h, w):
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x))


class _ConvEmbed(nn.Module):
    def __init__(self, in_chans, dim, k, s, p):
        super().__init__()
        self.proj, self.norm = nn.Conv2d(in_chans, dim, k, stride=s, padding=p), nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x):
        x = self.proj(x)
        B, C, H, W = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, C, H, W)


class _Stage(nn.Module):
    def __init__(self, in_chans, dim, depth, heads, k, s, p, with_cls):
        super().__init__()
        self.patch_embed = _ConvEmbed(in_chans, dim, k, s, p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if with_cls else None
        self.blocks = nn.ModuleList(_Block(dim, heads, with_cls) for _ in range(depth))

    def forward(self, x):
        x = self.patch_embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(B, -1, -1), x), 1)
        for blk in self.blocks:
            x = blk(x, H, W)
        cls = None
        if self.cls_token is not None:
            cls, x = torch.split(x, [1, H * W], 1)
        return x.transpose(1, 2).reshape(B, C, H, W), cls


class OfficialCvT(nn.Module):
    EMBEDS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))

    def __init__(self, depths, dims, heads, num_classes=1000):
        super().__init__()
        in_chans = 3
        for i, (d, c, h, (k, s, p)) in enumerate(zip(depths, dims, heads, self.EMBEDS)):
            setattr(self, f"stage{i}", _Stage(in_chans, c, d, h, k, s, p, with_cls=i == len(depths) - 1))
            in_chans = c
        self.num_stages = len(depths)
        self.norm, self.head = nn.LayerNorm(dims[-1], eps=1e-5), nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        for i in range(self.num_stages):
            x, cls = getattr(self, f"stage{i}")(x)
        return self.head(self.norm(cls).squeeze(1))


CVT_SIZES = {
    "zoo_cvt_13": ((1, 2, 10), (64, 192, 384), (1, 3, 6)),
    "zoo_cvt_21": ((1, 4, 16), (64, 192, 384), (1, 3, 6)),
    "zoo_cvt_w24": ((2, 2, 20), (192, 768, 1024), (3, 12, 16)),
}


def randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1 or p.shape[:2] == (1, 1):  # norm affines, biases, class token
                p.add_(torch.randn_like(p) * 0.2)
    randomize_batchnorm_stats(model, mean_std=0.2)
    return model.eval()


def max_diff(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(x) - ref(x)).abs().max().item()


def check_cvt(name: str, size: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = randomized(OfficialCvT(*CVT_SIZES[name]))
    path = tmp_path / "cvt.pth"
    torch.save(ref.state_dict(), path)  # the official release is a plain torch state dict
    ours = zoo.create_model(name, pretrained=str(path)).eval()
    assert count_params(ours) == count_params(ref)
    x = torch.randn(2, 3, size, size)
    assert max_diff(ours, ref, x) <= 1e-4


def test_cvt_13_official_checkpoint_matches_reference_at_224(tmp_path):
    check_cvt("zoo_cvt_13", 224, tmp_path)


def test_cvt_21_official_checkpoint_matches_reference(tmp_path):
    check_cvt("zoo_cvt_21", 96, tmp_path)


@pytest.mark.slow
def test_cvt_w24_official_checkpoint_matches_reference(tmp_path):
    check_cvt("zoo_cvt_w24", 64, tmp_path)


def test_cvt_checkpoint_without_batchnorm_counters_loads(tmp_path):
    """Some checkpoints (older torch, converters) lack BatchNorm's num_batches_tracked; eval ignores it."""
    ref = randomized(OfficialCvT((1, 1, 1), (64, 192, 384), (1, 3, 6)))
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "w.pth")
    stages = tuple(dataclasses.replace(s, depth=1) for s in get_spec("zoo_cvt_13").stages)  # CvT with depths 1, 1, 1
    ours = zoo.create_model("zoo_cvt_13", stages=stages, pretrained=str(tmp_path / "w.pth")).eval()
    assert max_diff(ours, ref, torch.randn(1, 3, 64, 64)) <= 1e-4


def test_cvt_structure():
    spec = get_spec("zoo_cvt_13")
    assert [s.class_token for s in spec.stages] == [False, False, True]
    assert not any(s.pos_embed for s in spec.stages)
    assert [(s.embed.kernel, s.embed.stride, s.embed.padding) for s in spec.stages] == [(7, 4, 2), (3, 2, 1), (3, 2, 1)]
    model = zoo.create_model("zoo_cvt_mini_32")
    attn = model.stages[2].blocks[0].token_mixer
    assert attn.conv_proj_q.conv.stride == (1, 1) and attn.conv_proj_k.conv.stride == (2, 2)
    assert attn.conv_proj_k.conv.groups == 128 and attn.conv_proj_k.conv.bias is None
    assert isinstance(attn.conv_proj_v.bn, nn.BatchNorm2d)


def block_drop_path_rates(model: nn.Module) -> list[float]:
    return [getattr(b.drop_path, "drop_prob", 0.0) for stage in model.stages for b in stage.blocks]


def test_cvt_stochastic_depth_ramps_in_the_last_stage_only():
    # Official CvT-13: DROP_PATH_RATE [0.0, 0.0, 0.1], each stage linspace(0, rate, depth).
    rates = block_drop_path_rates(zoo.create_model("zoo_cvt_13", drop_path_rate=0.1))
    expected = [0.0] * 3 + [0.1 * j / 9 for j in range(10)]
    assert rates == pytest.approx(expected)
    # timm's and DeiT's rule elsewhere: one ramp over all blocks.
    rates = block_drop_path_rates(zoo.create_model("zoo_vit_tiny_patch16_224", drop_path_rate=0.1))
    assert rates == pytest.approx([0.1 * j / 11 for j in range(12)])


def test_drop_path_stages_from_a_config_and_its_errors():
    model = zoo.create_model("zoo_poolformer_mini_32", drop_path_rate=0.2, drop_path_stages=[1.0, 0.0, 0.0, 0.5])
    depths = [len(s.blocks) for s in model.stages]
    rates, start = block_drop_path_rates(model), 0
    for depth, factor in zip(depths, (1.0, 0.0, 0.0, 0.5)):
        assert rates[start : start + depth] == pytest.approx(
            [0.2 * factor * j / max(depth - 1, 1) for j in range(depth)]
        )
        start += depth
    with pytest.raises(ValueError, match=r"drop_path_stages=\(1\.0,\): expected a tuple of 4 factors"):
        zoo.create_model("zoo_poolformer_mini_32", drop_path_stages=(1.0,))
    with pytest.raises(ValueError, match=r"drop_path_stages\[1\]"):
        zoo.create_model("zoo_poolformer_mini_32", drop_path_stages=(1.0, -0.5, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"drop_path_stages\[0\] x drop_path_rate=1\.0: expected .* < 1\.0"):
        zoo.create_model("zoo_poolformer_mini_32", drop_path_rate=0.25, drop_path_stages=(4.0, 0.0, 0.0, 0.0))


# ---- gMLP -------------------------------------------------------------------------------------


def check_gmlp(zoo_name: str, timm_name: str, tmp_path: Path) -> None:
    ref = randomized(timm.create_model(timm_name))
    with torch.no_grad():  # timm zero-inits the head and the gate's token projection starts near 0:
        for n, p in ref.named_parameters():  # give both real weights, or the logits would not see them
            if n == "head.weight" or n.endswith("gate.proj.weight"):
                p.normal_(std=0.05)
    path = tmp_path / "timm.pth"
    torch.save(ref.state_dict(), path)
    ours = zoo.create_model(zoo_name, pretrained=str(path)).eval()
    assert count_params(ours) == count_params(ref)
    x = torch.randn(2, 3, 224, 224)
    assert max_diff(ours, ref, x) <= 1e-4


def test_gmlp_s16_timm_weights_match(tmp_path):
    check_gmlp("zoo_gmlp_s16_224", "gmlp_s16_224", tmp_path)


def test_gmlp_ti16_timm_weights_match(tmp_path):
    check_gmlp("zoo_gmlp_ti16_224", "gmlp_ti16_224", tmp_path)


@pytest.mark.slow
def test_gmlp_b16_timm_weights_match(tmp_path):
    check_gmlp("zoo_gmlp_b16_224", "gmlp_b16_224", tmp_path)


def test_gmlp_block_is_one_branch_and_keeps_its_gate_init():
    model = zoo.create_model("zoo_gmlp_mini_32")
    block = model.stages[0].blocks[0]
    assert block.norm2 is None and block.channel_mixer is None
    assert not any(".norm2." in k or ".channel_mixer." in k for k in model.state_dict())
    proj = block.token_mixer.proj  # the backbone's generic init must not overwrite it
    assert proj.weight.std() < 1e-5 and torch.equal(proj.bias, torch.ones_like(proj.bias))


# ---- published parameter counts ---------------------------------------------------------------

# (millions, relative tolerance). CvT: paper Table 2 / official model zoo; gMLP: paper Table 2
# (timm's counts, equal to ours, are checked exactly above); WideNet: paper Table 1 (29M, 40M, 63M).
# WideNet-H with ViT-H's width (1280) and experts of ratio 4 counts 61.7M, 2.1% under the paper's
# 63M (no standard ViT-H variant gives 63M exactly: see zoo/models/widenet.py).
PUBLISHED = {
    "zoo_cvt_13": (20.0, 0.005),
    "zoo_cvt_21": (31.6, 0.005),
    "zoo_cvt_w24": (277.3, 0.005),
    "zoo_gmlp_ti16_224": (6.0, 0.03),
    "zoo_gmlp_s16_224": (20.0, 0.03),
    "zoo_gmlp_b16_224": (73.0, 0.03),
    "zoo_widenet_b": (29.0, 0.02),
    "zoo_widenet_l": (40.0, 0.02),
    "zoo_widenet_h": (63.0, 0.025),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_match_published(name):
    millions, rel = PUBLISHED[name]
    with torch.device("meta"):  # shapes only: no memory, no init
        model = zoo.create_model(name)
    assert count_params(model) / 1e6 == pytest.approx(millions, rel=rel)


@pytest.mark.parametrize("name,gmacs", [("zoo_cvt_13", 4.5), pytest.param("zoo_cvt_21", 7.1, marks=pytest.mark.slow)])
def test_cvt_macs_match_published(name, gmacs):
    """CvT paper Table 2 (FLOPs counted as multiply-accumulates, as its official compute_macs)."""
    from zoo.bench.counts import count_macs

    assert count_macs(zoo.create_model(name), 224) / 1e9 == pytest.approx(gmacs, rel=0.04)


@pytest.mark.parametrize("name", ["zoo_cvt_mini_32", "zoo_gmlp_mini_32", "zoo_widenet_mini_32"])
def test_mini_models_are_cpu_sized(name):
    assert 2e5 <= count_params(zoo.create_model(name)) <= 2e6


# ---- WideNet: sharing and mixture of experts ----------------------------------------------------


@pytest.mark.parametrize("name", ["zoo_widenet_b", "zoo_widenet_mini_32"])
def test_widenet_shares_attention_and_moe_but_not_norms(name):
    with torch.device("meta"):
        model = zoo.create_model(name)
    blocks = model.stages[0].blocks
    first = blocks[0]
    assert isinstance(first.channel_mixer, MoE)
    moe = first.channel_mixer
    assert (moe.num_experts, moe.top_k, moe.capacity_factor, moe.balance_loss_weight) == (4, 2, 1.2, 0.01)
    for b in blocks[1:]:
        assert b.token_mixer is first.token_mixer and b.channel_mixer is first.channel_mixer
        assert b.norm1 is not first.norm1 and b.norm2 is not first.norm2
    norms = {id(m.weight) for b in blocks for m in (b.norm1, b.norm2)}
    assert len(norms) == 2 * len(blocks)


def test_widenet_aux_loss_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = zoo.create_model("zoo_widenet_mini_32", num_classes=10).train()
    x = torch.randn(4, 3, 32, 32)
    loss = F.cross_entropy(model(x), torch.arange(4))
    aux = collect_aux_loss(model)
    assert aux.item() > 0 and torch.isfinite(aux)
    (loss + aux).backward()
    assert model.stages[0].blocks[0].channel_mixer.router.weight.grad.abs().sum() > 0
    model(x)
    model(x)  # an uncollected forward does not pile up: each forward starts afresh
    assert model.stages[0].blocks[0].channel_mixer.aux_loss_calls == len(model.stages[0].blocks)
    # a shared module is saved under every block's name and loads back as one
    model.eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    again = zoo.create_model("zoo_widenet_mini_32", num_classes=10, pretrained=str(tmp_path / "w.pth")).eval()
    assert again.stages[0].blocks[3].channel_mixer is again.stages[0].blocks[0].channel_mixer
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


# ---- parts swappable by name, weight sharing for any isotropic family ---------------------------


@pytest.mark.parametrize(
    "name,kw",
    [
        ("zoo_poolformer_mini_32", {"token_mixer": "token_shift"}),
        (
            "zoo_poolformer_mini_32",
            {"token_mixer": "conv_attention", "mixer_options": {"num_heads": 2, "groups": "heads"}},
        ),
        ("zoo_vit_mini_32", {"token_mixer": "conv_attention", "mixer_options": {"num_heads": 4}}),
        ("zoo_vit_mini_32", {"token_mixer": "spatial_gating", "mixer_options": {"ffn_ratio": 2}}),
        ("zoo_cvt_mini_32", {"token_mixer": "attention", "mixer_options": {"num_heads": 1}}),
        ("zoo_cvt_mini_32", {"token_mixer": "pooling", "class_token": False, "global_pool": "avg"}),
        ("zoo_gmlp_mini_32", {"token_mixer": "identity", "channel_mixer": "mlp"}),
        ("zoo_vit_mini_32", {"channel_mixer": "mlp_squared_relu"}),
        ("zoo_vit_mini_32", {"channel_mixer": "geglu"}),
        ("zoo_vit_mini_32", {"channel_mixer": "reglu"}),
        ("zoo_cvt_mini_32", {"channel_mixer": "squared_relu_glu"}),
        ("zoo_poolformer_mini_32", {"channel_mixer": "moe", "channel_options": {"num_experts": 2, "top_k": 1}}),
        ("zoo_gmlp_mini_32", {"share_group": 3}),
        ("zoo_vit_mini_32", {"share_group": 6}),  # ALBERT-style sharing of a ViT
    ],
)
def test_parts_swap_by_name(name, kw):
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=5, **kw).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)
    (out.square().mean() + collect_aux_loss(model)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_sharing_reuses_mixers_and_keeps_norms():
    plain = zoo.create_model("zoo_vit_mini_32")
    shared = zoo.create_model("zoo_vit_mini_32", share_group=3)  # two groups of three blocks
    blocks = shared.stages[0].blocks
    assert blocks[2].token_mixer is blocks[0].token_mixer and blocks[3].token_mixer is not blocks[0].token_mixer
    assert blocks[1].channel_mixer is blocks[0].channel_mixer and blocks[1].norm1 is not blocks[0].norm1
    per_block = sum(p.numel() for p in plain.stages[0].blocks[0].token_mixer.parameters()) + sum(
        p.numel() for p in plain.stages[0].blocks[0].channel_mixer.parameters()
    )
    assert count_params(plain) - count_params(shared) == 4 * per_block


# ---- the mixed model defined only in YAML ---------------------------------------------------------


def test_mixed_yaml_model_builds_trains_and_meets_the_contract():
    from zoo.train.config import load_config

    cfg = load_config(CONFIGS / "mnist5k_mixed.yaml")
    torch.manual_seed(0)
    model = zoo.create_model(cfg.model.name, num_classes=10, drop_path_rate=cfg.model.drop_path_rate, **cfg.model.spec)
    mixers = [type(s.blocks[0].token_mixer).__name__ for s in model.stages]
    assert mixers == ["Pooling", "Pooling", "ConvAttention", "ConvAttention"]
    assert [s.spec.channel_mixer for s in model.stages] == ["mlp", "mlp", "squared_relu_glu", "squared_relu_glu"]
    assert count_params(model) < 2e6

    # one optimizer step on a random batch lowers the loss on that batch. Both losses are measured in
    # eval mode: a train-mode loss is taken with batch statistics and random drop-path, so comparing
    # it with an eval-mode loss says nothing about the step.
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.eval()
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
    model.train()
    torch.manual_seed(1)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]
    opt.step()
    model.eval()
    with torch.no_grad():
        after = F.cross_entropy(model(x), y).item()
        assert after < before, (before, after)

        # the contract: heads, classifier reset, intermediates vs feature_info
        feats = model.forward_features(x)
        assert model.forward_head(feats, pre_logits=True).shape == (8, model.num_features)
        final, maps = model.forward_intermediates(x)
        assert len(maps) == len(model.feature_info) == 4
        for fmap, fi in zip(maps, model.feature_info):
            assert fmap.shape[1] == fi["num_chs"] and fmap.shape[-1] == 32 // fi["reduction"]
        torch.testing.assert_close(model.forward_head(final), model(x))
        model.reset_classifier(3)
        assert model(x).shape == (8, 3)
