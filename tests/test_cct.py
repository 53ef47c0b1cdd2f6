"""Compact transformers (CCT, ViT-Lite, compact CVT): the paper's sizes, the official layout's
logits, and the backbone parts they brought (convolutional tokenizer, sequence pooling, sine
positions, the residual-stream norm), with their bad-input errors.

Reference: ``OfficialCompact`` below, a re-implementation of the official forward written here
from the paper (https://arxiv.org/abs/2104.05704) and SHI-Labs/Compact-Transformers'
``src/utils/tokenizer.py`` / ``src/utils/transformers.py`` (Tokenizer, TransformerClassifier,
TransformerEncoderLayer), with the official module names, so that its ``state_dict()`` is an
official checkpoint's layout. It imports nothing from zoo and computes attention with explicit
ops (softmax(q k^T / sqrt(d)) v).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

import zoo
from zoo.bench.counts import count_macs, count_params
from zoo.models import ZooModel
from zoo.models.pretrained import CheckpointError
from zoo.models.specs import EmbedSpec, ModelSpec, StageSpec

# ---- the official re-implementation -------------------------------------------------------------


def sine_table(n: int, dim: int) -> torch.Tensor:
    """The paper's fixed table (Vaswani et al.'s sinusoids over the token index), one value at a time."""
    rows = [
        [(math.sin if i % 2 == 0 else math.cos)(p / 10000 ** (2 * (i // 2) / dim)) for i in range(dim)]
        for p in range(n)
    ]
    return torch.tensor(rows, dtype=torch.float32).unsqueeze(0)


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # the official qkv has no bias
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(C // self.heads)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class _EncoderLayer(nn.Module):
    """pre-norm attention, then the residual stream normed (norm1), then the MLP without a norm."""

    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.pre_norm, self.self_attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.linear1, self.norm1, self.linear2 = nn.Linear(dim, hidden), nn.LayerNorm(dim), nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.self_attn(self.pre_norm(x))
        x = self.norm1(x)
        return x + self.linear2(F.gelu(self.linear1(x)))


class _Tokenizer(nn.Module):
    def __init__(self, dim, kernel, stride, padding, layers, *, conv_tokenizer):
        super().__init__()
        widths = [3] + [64] * (layers - 1) + [dim]
        self.conv_layers = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(widths[i], widths[i + 1], kernel, stride, padding, bias=not conv_tokenizer),
                    nn.ReLU() if conv_tokenizer else nn.Identity(),
                    nn.MaxPool2d(3, 2, 1) if conv_tokenizer else nn.Identity(),
                )
                for i in range(layers)
            )
        )

    def forward(self, x):
        return self.conv_layers(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)


class _Classifier(nn.Module):
    def __init__(self, dim, depth, heads, mlp_ratio, tokens, *, seq_pool, positions, num_classes):
        super().__init__()
        self.seq_pool = seq_pool
        if seq_pool:
            self.attention_pool = nn.Linear(dim, 1)
        else:
            self.class_emb = nn.Parameter(torch.randn(1, 1, dim))
            tokens += 1
        if positions == "learnable":
            self.positional_emb = nn.Parameter(torch.randn(1, tokens, dim) * 0.2)
        elif positions == "sine":
            self.positional_emb = nn.Parameter(sine_table(tokens, dim), requires_grad=False)
        else:
            self.positional_emb = None
        self.blocks = nn.ModuleList(_EncoderLayer(dim, heads, int(dim * mlp_ratio)) for _ in range(depth))
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        if not self.seq_pool:
            x = torch.cat([self.class_emb.expand(x.shape[0], -1, -1), x], dim=1)
        if self.positional_emb is not None:
            x = x + self.positional_emb
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.seq_pool:
            x = (F.softmax(self.attention_pool(x), dim=1).transpose(1, 2) @ x).squeeze(1)
        else:
            x = x[:, 0]
        return self.fc(x)


class OfficialCompact(nn.Module):
    """CCT (conv tokenizer + seq pool), CVT (patches + seq pool) or ViT-Lite (patches + class token)."""

    def __init__(self, kind, depth, dim, heads, mlp_ratio, *, kernel, layers=1, img_size=32, positions, classes=10):
        super().__init__()
        conv = kind == "cct"
        stride, padding = (max(1, kernel // 2 - 1), max(1, kernel // 2)) if conv else (kernel, 0)
        self.tokenizer = _Tokenizer(dim, kernel, stride, padding, layers, conv_tokenizer=conv)
        with torch.no_grad():
            tokens = self.tokenizer(torch.zeros(1, 3, img_size, img_size)).shape[1]
        self.classifier = _Classifier(
            dim, depth, heads, mlp_ratio, tokens, seq_pool=kind != "vitlite", positions=positions, num_classes=classes
        )

    def forward(self, x):
        return self.classifier(self.tokenizer(x))


def randomized(model: nn.Module) -> nn.Module:
    """Norm affines and biases moved away from their init, so that a wrong mapping shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1 and p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def logits(model, x):
    with torch.no_grad():
        return model(x)


# ---- the official layout loads and gives the official logits ------------------------------------

# (zoo name, reference kind, size (depth, dim, heads, mlp ratio), kernel, conv layers, img_size, positions)
OFFICIAL_CASES = [
    ("zoo_cct_7_3x1_32", "cct", (7, 256, 4, 2), 3, 1, 32, "learnable"),
    ("zoo_cct_2_3x2_32", "cct", (2, 128, 2, 1), 3, 2, 32, "sine"),
    ("zoo_cct_4_3x2_32", "cct", (4, 128, 2, 1), 3, 2, 32, "none"),
    ("zoo_cct_14_7x2_224", "cct", (14, 384, 6, 3), 7, 2, 64, "learnable"),  # 64x64: the same weights, less CPU
    ("zoo_vitlite_6_4_32", "vitlite", (6, 256, 4, 2), 4, 1, 32, "learnable"),
    ("zoo_vitlite_mini_32", "vitlite", (6, 128, 4, 2), 4, 1, 32, "sine"),
    ("zoo_compactcvt_6_4_32", "cvt", (6, 256, 4, 2), 4, 1, 32, "learnable"),
    ("zoo_cct_mini_32", "cct", (6, 128, 4, 2), 3, 2, 32, "learnable"),
]
ZOO_POSITIONS = {"learnable": "learned", "sine": "sine", "none": "none"}


@pytest.mark.parametrize("name,kind,size,kernel,layers,img,positions", OFFICIAL_CASES)
def test_official_layout_gives_official_logits(name, kind, size, kernel, layers, img, positions, tmp_path):
    classes = 1000 if name.endswith(("224", "mini_32")) else 10
    torch.manual_seed(0)
    ref = randomized(
        OfficialCompact(kind, *size, kernel=kernel, layers=layers, img_size=img, positions=positions, classes=classes)
    )
    path = tmp_path / "official.pth"
    torch.save({"state_dict": ref.state_dict()}, path)  # timm's train script (the official one) saves so
    ours = zoo.create_model(name, pretrained=str(path), img_size=img, pos_embed=ZOO_POSITIONS[positions]).eval()
    x = torch.randn(2, 3, img, img)
    assert (logits(ours, x) - logits(ref, x)).abs().max() <= 1e-4
    frozen = sum(p.numel() for p in ref.parameters() if not p.requires_grad)  # the sine table: a buffer here
    assert count_params(ours) == count_params(ref) - frozen


def test_wrong_depth_or_kernel_is_refused_in_one_line(tmp_path):
    torch.manual_seed(0)
    ref = OfficialCompact("cct", 7, 256, 4, 2, kernel=3, layers=1, positions="learnable")
    torch.save(ref.state_dict(), tmp_path / "cct7.pth")
    for name, ours in (("zoo_cct_6_3x1_32", "CCT-6/3x1"), ("zoo_cct_7_3x2_32", "CCT-7/3x2")):
        with pytest.raises(CheckpointError) as e:
            zoo.create_model(name, pretrained=str(tmp_path / "cct7.pth"))
        message = str(e.value)
        assert "\n" not in message
        assert f"official-cct checkpoint of CCT-7/3x1 (256 wide) does not fit {name}, a {ours} (256 wide)" in message


@pytest.mark.parametrize("img", [32, 48])  # 48: the checkpoint's 64 positions against the model's 144
def test_learned_positions_into_a_sine_model_are_refused(img, tmp_path):
    torch.manual_seed(0)
    ref = OfficialCompact("cct", 2, 128, 2, 1, kernel=3, layers=2, positions="learnable")
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"stages\.0\.pos_embed holds learned positions.*pos_embed='learned'"):
        zoo.create_model("zoo_cct_2_3x2_32", pretrained=str(tmp_path / "w.pth"), pos_embed="sine", img_size=img)


def test_a_float16_sine_checkpoint_loads(tmp_path):
    """zoo/weights.py ships float16: the sine table rounded to it is still the sine table."""
    torch.manual_seed(0)
    model = zoo.create_model("zoo_cct_2_3x2_32", pos_embed="sine").eval()
    torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp_path / "w.pth")
    loaded = zoo.create_model("zoo_cct_2_3x2_32", pretrained=str(tmp_path / "w.pth"), pos_embed="sine").eval()
    torch.testing.assert_close(loaded.stages[0].pos_embed, model.stages[0].pos_embed, rtol=0, atol=0)


# ---- the paper's sizes ----------------------------------------------------------------------------

# The paper's CIFAR table (and the official README's, which repeats it): parameters (M) and MACs (G)
# at 32x32, 10 classes; CCT-14/7x2 from the ImageNet table at 224x224, 1000 classes. The rows count
# under different position settings: every row with its learned positions, except CCT-6/3x1, whose
# 3.168 M counts no position parameters (the official model with the fixed sine table, a frozen
# tensor there and a buffer here, or with none; with learned positions it is 3.234 M).
PAPER = {
    "zoo_cct_2_3x2_32": ("learned", 0.284, 0.033),
    "zoo_cct_4_3x2_32": ("learned", 0.482, 0.046),
    "zoo_cct_6_3x1_32": ("sine", 3.168, 0.813),
    "zoo_cct_6_3x2_32": ("learned", 3.327, 0.241),
    "zoo_cct_7_3x1_32": ("learned", 3.760, 0.947),
    "zoo_cct_7_3x2_32": ("learned", 3.853, 0.275),
    "zoo_cct_14_7x2_224": ("learned", 22.36, 5.11),
    "zoo_vitlite_6_4_32": ("learned", 3.191, 0.205),
    "zoo_vitlite_7_4_32": ("learned", 3.717, 0.239),
    "zoo_compactcvt_6_4_32": ("learned", 3.190, 0.202),
    "zoo_compactcvt_7_4_32": ("learned", 3.717, 0.236),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_params_match_the_paper(name):
    pos, params_m, _ = PAPER[name]
    with torch.device("meta"):
        model = zoo.create_model(name, pos_embed=pos)
    # the table's last printed digit; CCT-14/7x2's 22.367 M is printed truncated (22.36)
    assert count_params(model) / 1e6 == pytest.approx(params_m, abs=0.01 if name.endswith("224") else 0.0005)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_macs_match_the_paper_without_attention_products(name):
    """The paper counts convolutions and linear layers, not the two products inside attention.
    Within one unit of the table's last digit: CCT-7/3x2's 0.275 G is 0.0006 G above this count,
    which its neighbours (6/3x2 at 0.241 G, one block less) put at 0.2744 G."""
    pos, _, macs_g = PAPER[name]
    with torch.device("meta"):  # shapes are all a count needs
        model = zoo.create_model(name, pos_embed=pos)
    size = model.spec.img_size
    unit = 0.01 if name.endswith("224") else 0.001  # the ImageNet row prints two decimals
    assert count_macs(model, size, attention_products=False) / 1e9 == pytest.approx(macs_g, abs=unit)


def test_attention_products_are_what_the_option_leaves_out():
    """q k^T and the weights times v: 2 N^2 d MACs per block (N tokens, d wide), by hand."""
    model = zoo.create_model("zoo_cct_2_3x2_32")
    tokens, dim, depth = 64, 128, 2
    full, without = count_macs(model, 32), count_macs(model, 32, attention_products=False)
    assert full - without == depth * 2 * tokens**2 * dim


# ---- the parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "embed",
    [
        EmbedSpec(
            3, 1, 1, bias=False, layers=2, hidden_dim=8, act="relu", pool_kernel=3, pool_stride=2, pool_padding=1
        ),
        EmbedSpec(7, 2, 3, layers=3, hidden_dim=5, act="gelu", pool_kernel=2, pool_stride=2),
        EmbedSpec(5, 3, 0, pool_kernel=3, pool_stride=1, pool_padding=1),
        EmbedSpec(4, 4, 0),
    ],
)
@pytest.mark.parametrize("img", [48, 61, 75])
def test_tokenizer_size_arithmetic_is_the_modules(embed, img):
    """EmbedSpec.out_size (checked before a model is built) against the module's real output."""
    stage = StageSpec(depth=1, dim=12, embed=embed, token_mixer="pooling", norm="groupnorm1")
    spec = ModelSpec(stages=(stage,), img_size=img, num_classes=3)
    model = ZooModel(spec)
    with torch.no_grad():
        out = model.stages[0].embed(torch.randn(1, 3, img, img))
    assert out.shape[-2:] == (embed.out_size(img),) * 2 == model.stages[0].grid
    assert model.feature_info[-1]["reduction"] == embed.reduction


def test_tokenizer_kaiming_init():
    """The official tokenizer's convolutions start Kaiming-normal (std sqrt(2 / fan_in)), not std .02."""
    torch.manual_seed(0)
    model = zoo.create_model("zoo_cct_6_3x2_32")
    w = model.stages[0].embed.layers["1"].weight  # 256 x 64 x 3 x 3
    assert w.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.02)
    assert model.stages[0].embed.proj.bias is None


@pytest.mark.parametrize("name", ["zoo_cct_7_3x1_32", "zoo_vitlite_6_4_32", "zoo_compactcvt_7_4_32"])
def test_official_dropout_defaults(name):
    """The official CCT / ViTLite / CVT constructors: dropout 0 (projections, MLP, after the
    positions, before fc), attention dropout 0.1, stochastic depth linspace(0, 0.1, layers)."""
    model = zoo.create_model(name)
    blocks = model.stages[0].blocks
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in blocks]  # Identity: 0
    assert rates == pytest.approx(torch.linspace(0, 0.1, len(blocks)).tolist())
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert all(p == 0 for p in dropouts) and model.spec.drop_rate == 0
    assert all(b.token_mixer.attn_drop == 0.1 for b in blocks)


def test_official_position_class_token_and_patch_bias_inits():
    """src/utils/transformers.py: learned positions trunc_normal std .2, the class token zeros;
    src/utils/tokenizer.py: a patch convolution's bias left at torch's Conv2d default,
    uniform(+-1/sqrt(fan_in)) (fan_in 3 * 4 * 4 = 48)."""
    torch.manual_seed(0)
    cct = zoo.create_model("zoo_cct_7_3x1_32")  # 1024 x 256 positions
    assert cct.stages[0].pos_embed.std().item() == pytest.approx(0.2, rel=0.03)
    vitlite = zoo.create_model("zoo_vitlite_7_4_32")  # 65 x 256 positions, 256 biases
    assert vitlite.stages[0].pos_embed.std().item() == pytest.approx(0.2, rel=0.05)
    assert not vitlite.stages[0].cls_token.any()
    bias, bound = vitlite.stages[0].embed.proj.bias, 1 / math.sqrt(48)
    assert bias.abs().max().item() <= bound and bias.abs().max().item() > 0.9 * bound
    assert bias.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)  # a uniform's std
    with pytest.raises(ValueError, match=r"StageSpec.pos_embed_std=-0.1: expected a number >= 0.0"):
        zoo.create_model("zoo_cct_2_3x2_32", pos_embed_std=-0.1, device="meta")


def test_residual_norm_block_against_the_formula():
    """channel_norm='residual': x = norm2(x + attn(norm1(x))); x + mlp(x), by hand from the parts."""
    torch.manual_seed(0)
    model = randomized(zoo.create_model("zoo_cct_2_3x2_32"))
    block = model.stages[0].blocks[0]
    x = torch.randn(2, 64, 128)
    with torch.no_grad():
        h = block.norm2(x + block.token_mixer(block.norm1(x), (8, 8)))
        expected = h + block.channel_mixer.fc2(F.gelu(block.channel_mixer.fc1(h)))
        torch.testing.assert_close(block(x, (8, 8)), expected)


def test_sine_positions_are_a_fixed_buffer_that_follows_the_input_size():
    model = zoo.create_model("zoo_cct_2_3x2_32", pos_embed="sine")
    stage = model.stages[0]
    assert "stages.0.pos_embed" in model.state_dict() and not [n for n, _ in model.named_parameters() if "pos" in n]
    # (float32 sines here, float64 in sine_table: the official table rounds its angles first)
    torch.testing.assert_close(stage.pos_embed, sine_table(64, 128), rtol=0, atol=1e-5)
    model.set_input_size(img_size=48)  # 12x12 tokens: the table for 144 tokens, not an interpolation
    torch.testing.assert_close(stage.pos_embed, sine_table(144, 128), rtol=0, atol=1e-5)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 10)
    dynamic = zoo.create_model("zoo_cct_2_3x2_32", pos_embed="sine", dynamic_img_size=True).eval()
    assert dynamic(torch.randn(1, 3, 40, 40)).shape == (1, 10)


def test_seqpool_on_a_map_against_the_formula():
    """global_pool='seqpool' after PoolFormer's maps: the map's positions flattened to tokens."""
    torch.manual_seed(0)
    model = zoo.create_model("zoo_poolformer_mini_32", num_classes=5, global_pool="seqpool").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fmap = model.forward_features(x)  # (B, C, 2, 2), normed
        tokens = fmap.flatten(2).transpose(1, 2)
        weights = torch.softmax(tokens @ model.seq_pool.attention.weight.T + model.seq_pool.attention.bias, dim=1)
        pooled = (weights * tokens).sum(1)
        torch.testing.assert_close(model.forward_head(fmap, pre_logits=True), pooled)
        torch.testing.assert_close(model(x), model.head(pooled))


def test_switching_to_seqpool_builds_its_weights():
    model = zoo.create_model("zoo_poolformer_mini_32", num_classes=5).eval()
    assert model.seq_pool is None
    model.reset_classifier(4, "seqpool")
    assert model.seq_pool is not None and model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_the_seqpool_config_puts_cct_parts_around_poolformer():
    from zoo.train.config import load_config

    cfg = load_config("configs/mnist5k_poolformer_seqpool.yaml")
    model = zoo.create_model(cfg.model.name, num_classes=10, **cfg.model.spec)
    plain = zoo.get_spec("zoo_poolformer_mini_32")
    assert model.spec.stages[1:] == plain.stages[1:] and model.spec.global_pool == "seqpool"
    assert dataclasses.replace(model.spec.stages[0], embed=plain.stages[0].embed) == plain.stages[0]  # stem only
    assert model.spec.stages[0].embed.act == "relu" and model.stages[0].grid == (16, 16)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cct_features_are_tokens_and_intermediates_maps():
    model = zoo.create_model("zoo_cct_mini_32", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 64, 128)
        final, maps = model.forward_intermediates(x, indices=2)
        assert final.shape == (2, 64, 128) and [m.shape for m in maps] == [(2, 128, 8, 8)] * 2
        feats = zoo.create_model("zoo_cct_mini_32", features_only=True, out_indices=(5,))
        assert feats(x)[0].shape == (2, 128, 8, 8)


# ---- bad input: one line, before anything is built ---------------------------------------------


def test_a_tokenizer_that_leaves_no_tokens_is_refused_by_the_spec():
    with pytest.raises(ValueError) as e:
        zoo.create_model("zoo_vitlite_mini_32", img_size=3)
    assert str(e.value) == (
        "zoo_vitlite_mini_32: ModelSpec.img_size=3: stages[0].embed (4x4/4 conv) leaves no tokens of its "
        "3x3 input; this model needs img_size >= 4"
    )
    tokenizer = EmbedSpec(7, 2, 0, layers=2, hidden_dim=8, act="relu", pool_kernel=3, pool_stride=2)
    stage = StageSpec(depth=1, dim=8, embed=tokenizer, token_mixer="attention", mixer_options={"num_heads": 2})
    # 51 -> conv 23 -> pool 11 -> conv 3 -> pool 1; 50 -> 22 -> 10 -> 2 -> no 7x7 window fits
    with pytest.raises(ValueError, match=r"7x7/2 conv \+ 3x3/2 max-pool, x2\) leaves no tokens.*img_size >= 51$"):
        ModelSpec(stages=(stage,), img_size=16)  # the spec itself refuses: no module is made


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"global_pool": "seqpool"}, r"global_pool='seqpool' .* class/distillation token"),
        ({"class_token": True, "model": "zoo_cct_mini_32"}, r"global_pool='seqpool' .* class/distillation token"),
        ({"pos_embed": "cosine"}, r"pos_embed='cosine': expected one of \['none', 'learned', 'sine'\]"),
        ({"channel_norm": "post"}, r"channel_norm='post'"),
    ],
)
def test_bad_specs_are_one_line_errors(kw, match):
    name = kw.pop("model", "zoo_vitlite_mini_32")
    with pytest.raises(ValueError, match=match) as e:
        zoo.create_model(name, device="meta", **kw)
    assert "\n" not in str(e.value)


def test_seqpool_with_a_class_token_is_refused_by_reset_classifier():
    model = zoo.create_model("zoo_vitlite_mini_32", num_classes=10)
    with pytest.raises(ValueError, match=r"global_pool='seqpool' .* class token"):
        model.reset_classifier(10, "seqpool")


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"layers": 2}, r"hidden_dim=None: expected an int >= 1"),
        ({"hidden_dim": 64}, r"hidden_dim=64: only a tokenizer of layers > 1"),
        ({"pool_stride": 2}, r"given without a pool_kernel"),
        ({"pool_kernel": 3, "pool_padding": 2}, r"pool_padding=2: expected at most half"),
        ({"init": "xavier"}, r"init='xavier'"),
    ],
)
def test_bad_tokenizer_fields(kw, match):
    with pytest.raises(ValueError, match=match):
        EmbedSpec(3, 1, 1, **kw)
