"""The backbone contract: every registered zoo model speaks timm's interface on a small input."""

from __future__ import annotations

import functools

import pytest
import timm
import torch

import zoo
from zoo.layers.mixers import TOKEN_MIXERS
from zoo.models.registry import fixed_input_size, get_spec

# The larger sizes of families whose smallest ImageNet size already runs every contract check here
# (CvT-13, gMLP-Ti/S, WideNet-B): the same code at more parameters, most of a minute each on 2
# cores. Their contract runs with `pytest -m slow`; their parameter counts stay in the default run.
HEAVY = {
    "zoo_cvt_21",
    "zoo_cvt_w24",
    "zoo_gmlp_b16_224",
    "zoo_widenet_l",
    "zoo_widenet_h",
    # MetaFormer baselines: S12 / S18 and the minis run here; every size's exactness is in test_metaformer.py
    *(f"zoo_{f}_{s}" for f in ("identityformer", "randformer", "poolformerv2") for s in ("s24", "s36", "m36", "m48")),
    *(f"zoo_{f}_{s}" for f in ("convformer", "caformer") for s in ("s36", "m36", "b36")),
}
ALL = [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in zoo.list_models()]
MINI = zoo.list_models("*_mini_32")


@functools.cache
def fixed_token_count(name: str) -> bool:
    """The model says it is built for one input size (timm's ``pretrained_cfg["fixed_input_size"]``:
    a position embedding, or a token mixer with per-token weights such as gMLP's)."""
    return fixed_input_size(name)


@pytest.mark.parametrize("name", zoo.list_models())
def test_fixed_input_size_flag(name):
    """``fixed_input_size`` is set exactly for the models with a position embedding or per-token weights."""
    expected = any(
        s.pos_embed or "num_tokens" in getattr(TOKEN_MIXERS[s.token_mixer], "stage_context", ())
        for s in get_spec(name).stages
    )
    assert fixed_token_count(name) is expected


def small_size(name: str) -> int:
    """A small input side that every stage of ``name`` can still downsample."""
    return 32 if name.endswith("_32") else 64


def build(name: str, **kw) -> torch.nn.Module:
    size = small_size(name)
    if fixed_token_count(name):
        kw.setdefault("img_size", size)
    torch.manual_seed(0)
    return zoo.create_model(name, num_classes=7, **kw)


def batch(name: str, n: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    size = small_size(name)
    return torch.randn(n, 3, size, size)


@pytest.mark.parametrize("name", ALL)
def test_forward_backward(name):
    model = build(name).train()
    out = model(batch(name))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"


@pytest.mark.parametrize("name", ALL)
def test_heads_and_features(name):
    model = build(name).eval()
    x = batch(name)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.num_features)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        model.reset_classifier(13)
        assert model(x).shape == (2, 13)
        assert model.get_classifier() is not None


@pytest.mark.parametrize("name", ALL)
def test_intermediates_match_feature_info(name):
    model = build(name).eval()
    x = batch(name)
    size = x.shape[-1]
    info = model.feature_info
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert len(maps) == len(info)
        for fmap, fi in zip(maps, info):
            assert fmap.shape[:2] == (2, fi["num_chs"])
            assert fmap.shape[-1] == size // fi["reduction"], (fmap.shape, fi)
        torch.testing.assert_close(model.forward_head(final), model(x))
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        for a, b in zip(last_two, maps[-2:]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["zoo_poolformer_s12", "zoo_vit_tiny_patch16_224", *MINI])
def test_features_only(name):
    kw = {"img_size": small_size(name)} if "vit" in name or "deit" in name else {}
    n_taps = len(build(name).feature_info)
    out_indices = tuple(range(n_taps))[-3:]
    fx = zoo.create_model(name, features_only=True, out_indices=out_indices, **kw).eval()
    with torch.no_grad():
        maps = fx(batch(name))
    assert len(maps) == len(out_indices) == len(fx.feature_info.channels())
    for fmap, ch, red in zip(maps, fx.feature_info.channels(), fx.feature_info.reduction()):
        assert fmap.shape[1] == ch and fmap.shape[-1] == small_size(name) // red


@pytest.mark.parametrize("name", [n for n in ALL if "poolformer" in n])
def test_poolformer_any_resolution(name):
    model = build(name).eval()
    with torch.no_grad():
        for h, w in ((64, 64), (96, 80), (33, 47)):
            assert model(torch.randn(1, 3, h, w)).shape == (1, 7)


@pytest.mark.parametrize("name", ["zoo_vit_tiny_patch16_224", "zoo_deit_tiny_distilled_patch16_224"])
def test_vit_other_img_size_interpolates_pos_embed(name, tmp_path):
    ref = zoo.create_model(name, num_classes=7).eval()
    path = tmp_path / "w.pth"
    torch.save(ref.state_dict(), path)
    model = zoo.create_model(name, num_classes=7, img_size=96, pretrained=str(path)).eval()
    stage = model.stages[0]
    assert stage.pos_embed.shape[1] == stage.num_prefix_tokens + 6 * 6
    # the prefix tokens' embeddings are kept, the grid is resampled from the 14x14 one
    torch.testing.assert_close(
        stage.pos_embed[:, : stage.num_prefix_tokens], ref.stages[0].pos_embed[:, : stage.num_prefix_tokens]
    )
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 7)
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name", ["zoo_poolformer_s12", "zoo_vit_tiny_patch16_224", *MINI])
def test_channels_last_matches(name):
    model = build(name).eval()
    x = batch(name)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MINI)
def test_torch_compile_matches_eager(name):
    model = build(name).eval()
    x = batch(name)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model)(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_distilled_training_returns_both_heads():
    model = build("zoo_deit_mini_distilled_32").train()
    model.set_distilled_training(True)
    cls_logits, dist_logits = model(batch("zoo_deit_mini_distilled_32"))
    assert cls_logits.shape == dist_logits.shape == (2, 7)
    model.eval()
    with torch.no_grad():
        assert model(batch("zoo_deit_mini_distilled_32")).shape == (2, 7)


def test_timm_create_model_after_import():
    model = timm.create_model("zoo_poolformer_mini_32", num_classes=3)
    assert isinstance(model, zoo.models.ZooModel) and model.num_classes == 3


def test_resnet_baselines_are_timm_unchanged():
    ours = zoo.create_model("resnet18", num_classes=10)
    assert type(ours) is type(timm.create_model("resnet18"))
    assert ours(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert "resnet50" in zoo.list_models(baselines=True)


def test_wrong_channel_count_says_what_was_expected():
    model = build("zoo_poolformer_mini_32")
    with pytest.raises(ValueError, match="expects 3 input channels, got 1"):
        model(torch.randn(2, 1, 32, 32))


def test_too_small_image_says_minimum():
    model = build("zoo_poolformer_s12")
    with pytest.raises(ValueError, match=r"at least \d+x\d+"):
        model(torch.randn(1, 3, 2, 2))


def test_in_chans_override_builds_matching_stem():
    model = zoo.create_model("zoo_poolformer_mini_32", in_chans=1, num_classes=10)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_unknown_model_suggests_nearest():
    with pytest.raises(ValueError, match="did you mean zoo_poolformer_s12"):
        zoo.create_model("zoo_poolformer_s121")


def test_unknown_override_names_nearest():
    with pytest.raises(TypeError, match="did you mean 'drop_path_rate'"):
        zoo.create_model("zoo_poolformer_mini_32", drop_path_rat=0.1)


def test_spec_override_swaps_a_component():
    model = zoo.create_model("zoo_poolformer_mini_32", token_mixer="identity", num_classes=10)
    assert all(type(b.token_mixer).__name__ == "IdentityMixer" for s in model.stages for b in s.blocks)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_list_models_pattern():
    names = zoo.list_models("zoo_poolformer_*")
    assert {
        "zoo_poolformer_s12",
        "zoo_poolformer_s24",
        "zoo_poolformer_s36",
        "zoo_poolformer_m36",
        "zoo_poolformer_m48",
    } <= set(names)
    assert all(n.startswith("zoo_poolformer_") for n in names)


@pytest.mark.parametrize("name", ["zoo_vit_mini_32", "zoo_poolformer_mini_32"])
def test_features_only_defaults_follow_timm(name):
    """No out_indices: every stage of a hierarchical model, the last 3 blocks of an isotropic one
    (timm's ViT default)."""
    import timm

    fx = zoo.create_model(name, features_only=True)
    model = build(name)
    n = len(model.feature_info)
    expected = list(range(n))[-3:] if len(model.stages) == 1 else list(range(n))
    assert list(fx.feature_info.out_indices) == expected
    with torch.no_grad():
        assert len(fx(torch.randn(1, 3, 32, 32))) == len(expected)
    if "vit" in name:
        ref = timm.create_model("vit_tiny_patch16_224", features_only=True, pretrained=False)
        assert list(ref.feature_info.out_indices) == list(range(12))[-3:]
