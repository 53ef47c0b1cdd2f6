"""MetaFormer baselines (IdentityFormer, RandFormer, PoolFormerV2, ConvFormer, CAFormer): exactness
against the references, published sizes, the v2 block's parts, and swapping them by name.

References:

- timm 1.0.31's ports of PoolFormerV2, ConvFormer and CAFormer (``timm/models/metaformer.py``): their
  random weights are saved, loaded with ``zoo.create_model(name, pretrained=file)`` and the logits
  compared in eval mode, for every size (the larger ones at 64x64 to keep CPU time low).
- ``Official*`` below: a compact re-implementation of sail-sg/metaformer's
  ``metaformer_baselines.py`` (https://github.com/sail-sg/metaformer), the only definition of
  IdentityFormer and RandFormer (timm has neither). It works on (B, H, W, C) maps as the
  official code does, with the official module names, so its ``state_dict()`` is an official
  checkpoint's layout; it imports nothing from zoo. It is itself checked against timm's
  PoolFormerV2 below, through timm's own converter of official checkpoints.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.metaformer import checkpoint_filter_fn as timm_from_official
from torch import nn

import zoo
from zoo.bench.counts import count_params
from zoo.models.metaformer import TIMM_HEAD

# ---- the official re-implementation ------------------------------------------------------------


class _LayerNormGeneral(nn.Module):
    """Official: normalise over ``dims`` of a (B, H, W, C) map, scale per channel, no bias."""

    def __init__(self, dim, dims=(-1,), eps=1e-6):
        super().__init__()
        self.dims, self.eps = dims, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        c = x - x.mean(self.dims, keepdim=True)
        return c / torch.sqrt(c.pow(2).mean(self.dims, keepdim=True) + self.eps) * self.weight


class _StarReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale, self.bias = nn.Parameter(torch.ones(1)), nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.scale * F.relu(x) ** 2 + self.bias


class _Scale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.scale


class _RandomMixing(nn.Module):  # official: an nn.Parameter with requires_grad=False
    def __init__(self, dim, num_tokens):
        super().__init__()
        self.random_matrix = nn.Parameter(torch.softmax(torch.rand(num_tokens, num_tokens), -1), requires_grad=False)

    def forward(self, x):
        B, H, W, C = x.shape
        return torch.einsum("mn,bnc->bmc", self.random_matrix, x.reshape(B, H * W, C)).reshape(B, H, W, C)


class _Pooling(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    def forward(self, x):
        return self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) - x


class _SepConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.pwconv1, self.act1 = nn.Linear(dim, 2 * dim, bias=False), _StarReLU()
        self.dwconv = nn.Conv2d(2 * dim, 2 * dim, 7, padding=3, groups=2 * dim, bias=False)
        self.pwconv2 = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x):
        x = self.dwconv(self.act1(self.pwconv1(x)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.pwconv2(x)


class _Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.heads = dim // 32
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.heads, 32).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * 32**-0.5).softmax(-1)
        return self.proj((attn @ qkv[2]).transpose(1, 2).reshape(B, H, W, C))


class _Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = (
            nn.Linear(dim, 4 * dim, bias=False),
            _StarReLU(),
            nn.Linear(4 * dim, dim, bias=False),
        )

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _MlpHead(nn.Module):  # official: SquaredReLU and torch's nn.LayerNorm (eps 1e-5)
    def __init__(self, dim, num_classes):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(dim, 4 * dim), nn.LayerNorm(4 * dim), nn.Linear(4 * dim, num_classes)

    def forward(self, x):
        return self.fc2(self.norm(F.relu(self.fc1(x)) ** 2))


class _Block(nn.Module):
    def __init__(self, dim, mixer, norm_dims, res_scale):
        super().__init__()
        self.norm1, self.token_mixer = _LayerNormGeneral(dim, norm_dims), mixer
        self.norm2, self.mlp = _LayerNormGeneral(dim, norm_dims), _Mlp(dim)
        if res_scale:
            self.res_scale1, self.res_scale2 = _Scale(dim), _Scale(dim)
        self.rs = res_scale

    def forward(self, x):
        x = (self.res_scale1(x) if self.rs else x) + self.token_mixer(self.norm1(x))
        return (self.res_scale2(x) if self.rs else x) + self.mlp(self.norm2(x))


class _Downsampling(nn.Module):
    def __init__(self, cin, cout, first):
        super().__init__()
        self.first = first
        if first:  # stem: conv 7x7/4, then a channel norm
            self.conv, self.post_norm = nn.Conv2d(cin, cout, 7, 4, 2), _LayerNormGeneral(cout)
        else:  # a channel norm of the incoming map, then conv 3x3/2
            self.pre_norm, self.conv = _LayerNormGeneral(cin), nn.Conv2d(cin, cout, 3, 2, 1)

    def forward(self, x):  # in: (B, C, H, W) image or (B, H, W, C) map; out: (B, H, W, C)
        if self.first:
            return self.post_norm(self.conv(x).permute(0, 2, 3, 1))
        return self.conv(self.pre_norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class OfficialMetaFormer(nn.Module):
    """``MetaFormer`` of metaformer_baselines.py: mixers per stage, res scale in stages 2-3."""

    def __init__(self, depths, dims, mixers, *, group_norm, mlp_head, num_tokens=(196, 49)):
        super().__init__()
        norm_dims = (1, 2, 3) if group_norm else (-1,)
        self.downsample_layers = nn.ModuleList(
            _Downsampling(cin, cout, i == 0) for i, (cin, cout) in enumerate(zip((3, *dims[:-1]), dims))
        )

        def mixer(kind, dim, i):
            if kind == "random":
                return _RandomMixing(dim, num_tokens[i - 2])
            return {"identity": nn.Identity, "pool": _Pooling, "sepconv": _SepConv, "attention": _Attention}[kind](dim)

        self.stages = nn.ModuleList(
            nn.Sequential(*(_Block(dims[i], mixer(mixers[i], dims[i], i), norm_dims, i >= 2) for _ in range(depths[i])))
            for i in range(4)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = _MlpHead(dims[-1], 1000) if mlp_head else nn.Linear(dims[-1], 1000)

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean((1, 2))))


S_DIMS, M_DIMS = (64, 128, 320, 512), (96, 192, 384, 768)
POOLFORMER_SIZES = {
    "s12": ((2, 2, 6, 2), S_DIMS),
    "s24": ((4, 4, 12, 4), S_DIMS),
    "s36": ((6, 6, 18, 6), S_DIMS),
    "m36": ((6, 6, 18, 6), M_DIMS),
    "m48": ((8, 8, 24, 8), M_DIMS),
}
CONVFORMER_SIZES = {
    "s18": ((3, 3, 9, 3), S_DIMS),
    "s36": ((3, 12, 18, 3), S_DIMS),
    "m36": ((3, 12, 18, 3), (96, 192, 384, 576)),
    "b36": ((3, 12, 18, 3), (128, 256, 512, 768)),
}
FAMILIES = {  # name: (stage mixers, group norm in the blocks, MLP head)
    "identityformer": (("identity",) * 4, True, False),
    "randformer": (("identity", "identity", "random", "random"), True, False),
    "poolformerv2": (("pool",) * 4, True, False),
    "convformer": (("sepconv",) * 4, False, True),
    "caformer": (("sepconv", "sepconv", "attention", "attention"), False, True),
}


def official(family: str, size: str, img_size: int = 224) -> OfficialMetaFormer:
    mixers, group_norm, mlp_head = FAMILIES[family]
    depths, dims = (CONVFORMER_SIZES if mlp_head else POOLFORMER_SIZES)[size]  # (the two tables share "s36")
    tokens = ((img_size // 16) ** 2, (img_size // 32) ** 2)  # the official 196 and 49 at 224
    torch.manual_seed(0)
    return randomized(
        OfficialMetaFormer(depths, dims, mixers, group_norm=group_norm, mlp_head=mlp_head, num_tokens=tokens)
    )


def randomized(model: nn.Module) -> nn.Module:
    """Random weights everywhere a wrong mapping could hide: norm scales, res scales, StarReLU's
    scale and bias, biases all moved away from their init."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def logits(model, x):
    with torch.no_grad():
        return model(x)


# ---- exactness: timm's ports -------------------------------------------------------------------

TIMM_CASES = [
    *[("poolformerv2", s) for s in POOLFORMER_SIZES],
    *[(f, s) for f in ("convformer", "caformer") for s in CONVFORMER_SIZES],
]
SMALLEST = {"s12", "s18"}


@pytest.mark.parametrize("family,size", TIMM_CASES)
def test_timm_weights_give_timms_logits(family, size, tmp_path):
    """Every size: the smallest at 224x224, the others at 64x64 (same weights, less CPU)."""
    img = 224 if size in SMALLEST else 64
    ref = randomized(timm.create_model(f"{family}_{size}"))
    path = tmp_path / "timm.pth"
    torch.save(ref.state_dict(), path)
    head = TIMM_HEAD if family != "poolformerv2" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with TIMM_HEAD the load has nothing to warn about
        ours = zoo.create_model(f"zoo_{family}_{size}", pretrained=str(path), **head).eval()
    x = torch.randn(2, 3, img, img)
    assert (logits(ours, x) - logits(ref, x)).abs().max() <= 1e-4
    assert count_params(ours) == count_params(ref)


@pytest.mark.parametrize("name", ["caformer_s18", "convformer_s18"])
def test_features_are_timms_maps(name, tmp_path):
    """forward_features and forward_intermediates give what timm's MetaFormer gives: maps (B, C, H, W),
    CAFormer's attention stages (tokens here) included, equal to timm's on timm's weights."""
    ref = randomized(timm.create_model(name))
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    ours = zoo.create_model(f"zoo_{name}", pretrained=str(tmp_path / "timm.pth"), **TIMM_HEAD).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = ours.forward_features(x)
        assert features.shape == (2, 512, 2, 2)
        torch.testing.assert_close(features, ref.forward_features(x), rtol=0, atol=1e-5)
        (final, maps), (ref_final, ref_maps) = ours.forward_intermediates(x), ref.forward_intermediates(x)
        torch.testing.assert_close(final, ref_final, rtol=0, atol=1e-5)
        for a, b in zip(maps, ref_maps, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.forward_head(features), ref.forward_head(ref_final), rtol=0, atol=1e-4)
        ours.reset_classifier(0, "")  # timm's unpooled, headless output: the map again
        ref.reset_classifier(0, "")
        assert ours(x).shape == ref(x).shape == (2, 512, 2, 2)


def test_timm_mlp_head_without_timm_head_warns_and_differs(tmp_path):
    """timm's MLP head normalises with eps 1e-6, the official one with 1e-5: loading timm's weights
    into the official head says so, and the logits do differ by more than the tolerance."""
    ref = randomized(timm.create_model("convformer_s18"))
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    with pytest.warns(UserWarning, match="head_mlp_norm='layernorm'"):
        ours = zoo.create_model("zoo_convformer_s18", pretrained=str(tmp_path / "w.pth")).eval()
    assert ours.head.norm.eps == 1e-5
    x = torch.randn(2, 3, 64, 64)
    assert 1e-6 < (logits(ours, x) - logits(ref, x)).abs().max() < 1e-2


def test_timm_poolformer_v1_checkpoints_still_load(tmp_path):
    """The v2 layout claims only checkpoints with a stem norm; PoolFormer v1's go to its own layout."""
    ref = randomized(timm.create_model("poolformer_s12"))
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    ours = zoo.create_model(
        "zoo_poolformer_s12", pretrained=str(tmp_path / "w.pth"), head_norm_on="pooled", head_norm="layernorm"
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    assert (logits(ours, x) - logits(ref, x)).abs().max() <= 1e-4


# ---- exactness: the official layout and the re-implementation ----------------------------------


def test_reference_reimplementation_matches_timm_poolformerv2():
    """The re-implementation is the official function: its weights, converted by timm's own
    converter of official checkpoints, give timm's PoolFormerV2 logits."""
    ref = official("poolformerv2", "s12")
    theirs = timm.create_model("poolformerv2_s12").eval()
    theirs.load_state_dict(timm_from_official(ref.state_dict(), theirs))
    x = torch.randn(2, 3, 64, 64)
    assert (logits(ref, x) - logits(theirs, x)).abs().max() <= 1e-4


OFFICIAL_CASES = [
    *[("identityformer", s) for s in POOLFORMER_SIZES],
    *[("randformer", s) for s in POOLFORMER_SIZES],
    ("poolformerv2", "s12"),
    ("convformer", "s18"),  # the MLP head with the official eps
    ("caformer", "s18"),
]


@pytest.mark.parametrize("family,size", OFFICIAL_CASES)
def test_official_checkpoint_layout_matches_reference(family, size, tmp_path):
    """S12/S18 at 224x224 (RandFormer's official 196- and 49-token matrices), the larger sizes at
    64x64 (RandFormer built for it on both sides: 16- and 4-token matrices)."""
    img = 224 if size in SMALLEST else 64
    ref = official(family, size, img)
    path = tmp_path / "official.pth"
    torch.save(ref.state_dict(), path)  # the official releases are plain torch state dicts
    kw = {"img_size": img} if family == "randformer" else {}
    ours = zoo.create_model(f"zoo_{family}_{size}", pretrained=str(path), **kw).eval()
    if family == "randformer":  # each block's own frozen matrix, from the file
        for i in (2, 3):
            for ours_block, ref_block in zip(ours.stages[i].blocks, ref.stages[i], strict=True):
                assert torch.equal(ours_block.token_mixer.random_matrix, ref_block.token_mixer.random_matrix)
    x = torch.randn(2, 3, img, img)
    assert (logits(ours, x) - logits(ref, x)).abs().max() <= 1e-4
    # parameters as the official model, less RandFormer's frozen matrices (buffers here)
    frozen = sum(p.numel() for p in ref.parameters() if not p.requires_grad)
    assert count_params(ours) == count_params(ref) - frozen


# ---- published sizes ------------------------------------------------------------------------------

# MetaFormer Baselines for Vision, Tables 2 and 3 (params, millions, one decimal); RandFormer's
# frozen random matrices are counted apart there ("11.9 + 0.2M"), here they are buffers.
PUBLISHED = {
    **{f"zoo_{f}_s12": 11.9 for f in ("identityformer", "randformer", "poolformerv2")},
    **{f"zoo_{f}_s24": 21.3 for f in ("identityformer", "randformer", "poolformerv2")},
    **{f"zoo_{f}_s36": 30.8 for f in ("identityformer", "randformer", "poolformerv2")},
    **{f"zoo_{f}_m36": 56.1 for f in ("identityformer", "randformer", "poolformerv2")},
    **{f"zoo_{f}_m48": 73.3 for f in ("identityformer", "randformer", "poolformerv2")},
    "zoo_convformer_s18": 26.8,
    "zoo_convformer_s36": 40.0,
    "zoo_convformer_m36": 57.1,
    "zoo_convformer_b36": 99.9,
    "zoo_caformer_s18": 26.3,
    "zoo_caformer_s36": 39.3,
    "zoo_caformer_m36": 56.2,
    "zoo_caformer_b36": 98.8,
}
RANDFORMER_FROZEN = {"s12": 0.2, "s24": 0.5, "s36": 0.7, "m36": 0.7, "m48": 0.9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_match_published(name):
    with torch.device("meta"):  # shapes only: no memory, no init
        model = zoo.create_model(name)
    assert round(count_params(model) / 1e6, 1) == PUBLISHED[name]
    frozen = sum(b.numel() for b in model.buffers())
    if "randformer" in name:
        assert round(frozen / 1e6, 1) == RANDFORMER_FROZEN[name.rsplit("_", 1)[1]]
    else:
        assert frozen == 0


MINIS = [f"zoo_{f}_mini_32" for f in FAMILIES]


@pytest.mark.parametrize("name", MINIS)
def test_minis_are_small_enough_to_ship(name):
    """0.7-0.9 M at MNIST's 10 classes: the five new minis' float16 files fit weights/' budget."""
    assert 0.6e6 <= count_params(zoo.create_model(name, num_classes=10)) <= 0.9e6


# ---- the MetaFormer-v2 block's parts ---------------------------------------------------------------


def test_v2_structure():
    with torch.device("meta"):
        model = zoo.create_model("zoo_caformer_s18")
    keys = model.state_dict().keys()
    # bias-free norms and linears in the blocks and downsamplings; no layer scale anywhere
    assert not [k for k in keys if k.startswith("stages.") and (".norm" in k or "_norm." in k) and k.endswith(".bias")]
    assert not [k for k in keys if ".channel_mixer." in k and k.endswith(".bias") and "act" not in k]
    assert not [k for k in keys if ".ls1." in k or ".ls2." in k]
    assert [s.blocks[0].res_scale1.__class__.__name__ for s in model.stages] == [
        "Identity",
        "Identity",
        "LayerScale",
        "LayerScale",
    ]
    assert "stages.0.embed.norm.weight" in keys and "stages.0.embed_pre_norm.weight" not in keys
    assert all(f"stages.{i}.embed_pre_norm.weight" in keys for i in (1, 2, 3))
    assert [s.layout for s in model.stages] == ["nchw", "nchw", "nlc", "nlc"]
    assert type(model.stages[2].blocks[0].token_mixer).__name__ == "Attention"
    assert model.pretrained_cfg["classifier"] == "head.fc2" and model.pretrained_cfg["crop_pct"] == 1.0


def test_random_matrices_stay_frozen_in_training():
    torch.manual_seed(0)
    model = zoo.create_model("zoo_randformer_mini_32", num_classes=10).train()
    matrices = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("random_matrix")}
    assert len(matrices) == 4 and not [n for n, _ in model.named_parameters() if "random_matrix" in n]
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
    opt.step()
    for k, v in matrices.items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 64, 64))


def test_mlp_head_reset_and_pre_logits():
    torch.manual_seed(0)
    model = zoo.create_model("zoo_convformer_mini_32", num_classes=10, drop_rate=0.3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pre.shape == (2, model.num_features)  # the pooled, normed vector: before the MLP head
        torch.testing.assert_close(model.head(pre), model(x))
    assert type(model.head).__name__ == "MlpHead" and model.head.head_drop.p == 0.3 and model.head_drop.p == 0.0
    model.reset_classifier(5)
    assert type(model.head).__name__ == "MlpHead" and model.head.fc2.out_features == 5
    assert not model.head.training
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = zoo.create_model("zoo_caformer_mini_32", num_classes=10, head_mlp_norm="layernorm").eval()
    zoo.save_pretrained(model, tmp_path / "m")
    again = zoo.from_pretrained(tmp_path / "m").eval()
    assert again.spec == model.spec
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(again, x), logits(model, x), rtol=0, atol=0)


# ---- the parts by name, in specs and YAML --------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"token_mixer": "sepconv"},
        {"token_mixer": "sepconv", "mixer_options": {"expansion_ratio": 1, "kernel_size": 3, "act": "gelu"}},
        {"token_mixer": "random_mixing"},
        {"channel_options": {"act": "star_relu"}, "mlp_bias": False},
        {"norm": "layernorm_nobias"},
        {"norm": "groupnorm1_nobias", "res_scale": 1.0, "layer_scale": None},
        {"head_mlp_ratio": 2.0},
    ],
)
def test_parts_swap_into_poolformer_by_name(kw):
    torch.manual_seed(0)
    model = zoo.create_model("zoo_poolformer_mini_32", num_classes=5, **kw).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_yaml_stage_takes_the_v2_fields():
    from zoo.models.specs import stage_from_dict

    data = {
        "depth": 1,
        "dim": 32,
        "embed": {"kernel": 3, "stride": 2, "padding": 1, "pre_norm": "layernorm_nobias"},
        "token_mixer": "sepconv",
        "mixer_options": {"kernel_size": 5},
        "channel_options": {"act": "star_relu"},
        "mlp_bias": False,
        "norm": "layernorm_nobias",
        "res_scale": 1.0,
    }
    stage = stage_from_dict(data)
    model = zoo.create_model("zoo_convformer_mini_32", stages=[stage, stage, stage], num_classes=3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(TypeError, match="res_scal"):
        stage_from_dict({**data, "res_scal": 1.0})


@pytest.mark.parametrize("name", MINIS)
def test_fx_feature_extraction_traces_the_minis(name):
    """torchvision's FX feature extraction with timm's leaf modules (random_mixing is one: it checks
    its token count) computes the model's function."""
    fe = pytest.importorskip("torchvision.models.feature_extraction")
    from timm.models import get_notrace_functions, get_notrace_modules

    kw = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=5).eval()
    _, eval_nodes = fe.get_graph_node_names(model, tracer_kwargs=kw)
    fx = fe.create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=kw).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(next(iter(fx(x).values())), logits(model, x))
