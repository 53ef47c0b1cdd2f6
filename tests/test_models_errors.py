"""Review fixes of the model side: spec validation, checkpoint edge cases, classifier reset,
feature pruning, optional attention heads and registration errors. Small models only (fast)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import zoo
from zoo.layers import mixers
from zoo.layers.activations import ACTIVATIONS, QuickGELU
from zoo.layers.mlp import create_channel_mixer
from zoo.models.pretrained import CheckpointError, load_state_into, to_zoo_layout
from zoo.models.registry import get_spec
from zoo.models.specs import EmbedSpec, ModelSpec, StageSpec, stage_from_dict

X32 = torch.randn(2, 3, 32, 32)


def _save(model: nn.Module, path) -> str:
    torch.save(model.state_dict(), path)
    return str(path)


# ---- 1. num_classes=0 with a checkpoint that has a classifier ----------------------------------


@pytest.mark.parametrize("name", ["zoo_poolformer_mini_32", "zoo_deit_mini_distilled_32", "zoo_convformer_mini_32"])
def test_pretrained_into_headless_model_drops_head_keys(name, tmp_path):
    torch.manual_seed(0)
    src = zoo.create_model(name)
    path = _save(src, tmp_path / "w.pt")
    with pytest.warns(UserWarning, match="no classifier") as rec:
        model = zoo.create_model(name, pretrained=path, num_classes=0)
    assert sum("no classifier" in str(w.message) for w in rec) == 1
    msg = next(str(w.message) for w in rec if "no classifier" in str(w.message))
    if "convformer" in name:  # the MLP head goes whole, as timm's reset_classifier(0) replaces it
        assert all(k in msg for k in ("head.fc1.weight", "head.norm.weight", "head.fc2.weight"))
    else:
        assert "head.weight" in msg and ("head_dist.weight" in msg) == ("distilled" in name)
    src.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(X32), src.eval()(X32))


# ---- 2. a non-shared checkpoint into a weight-shared model -------------------------------------


def test_unshared_checkpoint_into_shared_model_is_an_error(tmp_path):
    torch.manual_seed(0)
    plain = zoo.create_model("zoo_vit_mini_32")
    shared = zoo.create_model("zoo_vit_mini_32", share_group=6)
    with pytest.raises(CheckpointError, match=r"not weight-shared.*") as err:
        load_state_into(shared, plain.state_dict(), "plain.pt")
    assert "stages.0.blocks.0.token_mixer" in str(err.value) and "stages.0.blocks." in str(err.value)


def test_shared_checkpoint_with_equal_aliases_loads():
    torch.manual_seed(0)
    a = zoo.create_model("zoo_vit_mini_32", share_group=6)
    b = zoo.create_model("zoo_vit_mini_32", share_group=6)
    load_state_into(b, a.state_dict(), "a.pt")  # every alias stored, all equal
    with torch.no_grad():
        torch.testing.assert_close(b.eval()(X32), a.eval()(X32))


# ---- 3. spec validation ---------------------------------------------------------------------

EMBED = EmbedSpec(4, 4)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: EmbedSpec(0, 4), ["kernel", "0", ">= 1"]),
        (lambda: EmbedSpec(3, 0), ["stride", ">= 1"]),
        (lambda: EmbedSpec(3, 2, -1), ["padding", "-1", ">= 0"]),
        (lambda: StageSpec(depth=0, dim=8, embed=EMBED), ["depth", "0", ">= 1"]),
        (lambda: StageSpec(depth=True, dim=8, embed=EMBED), ["depth", "True", "int"]),
        (lambda: StageSpec(depth=2, dim="8", embed=EMBED), ["dim", "'8'", "int"]),
        (lambda: StageSpec(depth=2, dim=8, embed=EMBED, share_group=0), ["share_group", ">= 1"]),
        (lambda: StageSpec(depth=2, dim=8, embed=EMBED, mlp_ratio=0), ["mlp_ratio", "> 0"]),
        (lambda: ModelSpec(stages=(StageSpec(2, 8, EMBED),), global_pool="map"), ["global_pool", "'map'", "avg"]),
        (lambda: ModelSpec(stages=(StageSpec(2, 8, EMBED),), head_norm_on="tokens"), ["head_norm_on", "pooled"]),
        (lambda: ModelSpec(stages=(StageSpec(2, 8, EMBED),), num_classes=2.5), ["num_classes", "2.5", "int"]),
        (lambda: ModelSpec(stages=(StageSpec(2, 8, EMBED),), in_chans=True), ["in_chans", "int"]),
        (lambda: ModelSpec(stages=(StageSpec(2, 8, EMBED),), img_size="32"), ["img_size", "int"]),
        (lambda: ModelSpec(stages=(StageSpec(2, 8, EMBED),), drop_rate=1.0), ["drop_rate", "< 1"]),
        (lambda: ModelSpec(stages=(StageSpec(2, 8, EMBED),), drop_path_rate=-0.1), ["drop_path_rate", ">= 0"]),
    ],
)
def test_spec_validation_names_field_value_and_expectation(make, words):
    with pytest.raises(ValueError) as err:
        make()
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_override_errors_name_model_and_stage():
    with pytest.raises(ValueError, match=r"zoo_poolformer_mini_32: stages\[0\]: StageSpec\.mlp_ratio=-1"):
        zoo.create_model("zoo_poolformer_mini_32", mlp_ratio=-1)
    with pytest.raises(ValueError, match=r"zoo_poolformer_mini_32: ModelSpec\.drop_path_rate=1\.5"):
        zoo.create_model("zoo_poolformer_mini_32", drop_path_rate=1.5)
    with pytest.raises(ValueError, match=r"stages\[1\]: .*EmbedSpec\.stride=0"):
        stage_from_dict({"depth": 1, "dim": 8, "embed": {"kernel": 3, "stride": 0}}, where="stages[1]")


def test_stage_build_errors_name_model_and_stage():
    spec = get_spec("zoo_poolformer_mini_32")
    stages = list(spec.stages)
    stages[2] = dataclasses.replace(stages[2], token_mixer="attention", mixer_options={"num_heads": 7})
    with pytest.raises(ValueError, match=r"^mini: stages\[2\]: attention: dim \d+ is not divisible by num_heads 7"):
        zoo.models.backbone.ZooModel(dataclasses.replace(spec, stages=tuple(stages)), name="mini")
    stages[2] = dataclasses.replace(stages[2], token_mixer="attention", mixer_options={"num_head": 2})
    with pytest.raises(TypeError, match=r"^mini: stages\[2\]: token mixer 'attention' has no option 'num_head'"):
        zoo.models.backbone.ZooModel(dataclasses.replace(spec, stages=tuple(stages)), name="mini")


# ---- 4. reset_classifier(0) keeps the pool, (0, "") turns it off, as timm ---------------------


@pytest.mark.parametrize(
    "name, unpooled", [("zoo_poolformer_mini_32", (2, 192, 2, 2)), ("zoo_vit_mini_32", (2, 65, 128))]
)
def test_reset_classifier_empty_pool_is_no_pooling(name, unpooled):
    model = zoo.create_model(name).eval()
    pool = model.global_pool
    model.reset_classifier(0)
    assert model.global_pool == pool and isinstance(model.head, nn.Identity)
    with torch.no_grad():
        assert model(X32).shape == (2, model.num_features)
        model.reset_classifier(0, "")
        assert model.global_pool == "" and model(X32).shape == unpooled


# ---- 5. forward_intermediates / prune -----------------------------------------------------------


def test_prune_without_norm_then_intermediates_with_norm():
    torch.manual_seed(0)
    model = zoo.create_model("zoo_poolformer_mini_32").eval()
    model.prune_intermediate_layers(indices=[1], prune_norm=False)
    with torch.no_grad():
        maps = model.forward_intermediates(X32, indices=[1], norm=True, intermediates_only=True)
        assert maps[0].shape[1] == model.feature_info[1]["num_chs"]
        final, _ = model.forward_intermediates(X32, indices=[1], norm=True)
        feats = model.forward_features(X32)
    torch.testing.assert_close(final, feats)


def test_stop_early_stops_isotropic_models_after_the_last_wanted_block():
    torch.manual_seed(0)
    model = zoo.create_model("zoo_vit_mini_32").eval()
    ran = []
    for j, block in enumerate(model.stages[0].blocks):
        block.register_forward_hook(lambda *_, j=j: ran.append(j))
    with torch.no_grad():
        _, maps = model.forward_intermediates(X32, indices=[1, 2], stop_early=True)
    assert ran == [0, 1, 2] and len(maps) == 2
    ran.clear()
    with torch.no_grad():
        model.forward_intermediates(X32, indices=[1, 2])
    assert ran == list(range(len(model.stages[0].blocks)))


# ---- 6. only 1x1 conv <-> linear reshapes --------------------------------------------------------


def test_foreign_tensor_of_matching_size_is_not_reshaped():
    model = zoo.create_model("zoo_poolformer_mini_32")
    own = model.state_dict()
    key = "stages.0.blocks.0.channel_mixer.fc1.weight"
    out_f, in_f = own[key].shape
    official = {"patch_embed.proj.weight": torch.zeros(1)}  # let a layout detect itself, if any does
    ok = {"network.0.0.mlp.fc1.weight": torch.zeros(out_f, in_f, 1, 1)}
    bad = {"network.0.0.mlp.fc1.weight": torch.zeros(in_f, out_f)}  # same numel, another tensor
    for state, reshaped in ((ok, True), (bad, False)):
        converted, layout = to_zoo_layout({**official, **state}, model)
        assert key in converted, f"the {layout} layout no longer maps network.0.0.mlp.fc1 to {key}"
        assert (converted[key].shape == own[key].shape) is reshaped


# ---- 7. attention without options ------------------------------------------------------------


def test_attention_swaps_into_poolformer_without_options():
    model = zoo.create_model("zoo_poolformer_mini_32", token_mixer="attention").eval()
    for stage in model.stages:
        mixer = stage.blocks[0].token_mixer
        assert mixer.num_heads == max(1, stage.spec.dim // 32)
    with torch.no_grad():
        assert model(X32).shape == (2, 1000)
    model = zoo.create_model("zoo_poolformer_mini_32", token_mixer="conv_attention")
    assert model.stages[-1].blocks[0].token_mixer.num_heads == max(1, model.stages[-1].spec.dim // 32)


def test_optional_heads_errors_and_explicit_heads_kept():
    with pytest.raises(ValueError, match="head_dim"):
        mixers.Attention(100, head_dim=32)  # 3 heads of 32 do not make 100
    assert mixers.Attention(96, num_heads=3).num_heads == 3
    assert (
        zoo.create_model("zoo_vit_mini_32").stages[0].blocks[0].token_mixer.num_heads
        == get_spec("zoo_vit_mini_32").stages[0].mixer_options["num_heads"]
    )


# ---- 8. registration errors and quick_gelu ------------------------------------------------------


def test_token_mixer_registration_without_layout_raises():
    class NoLayout(nn.Module):
        pass

    with pytest.raises(TypeError, match="layout"):
        mixers.register_token_mixer("no_layout_test")(NoLayout)
    assert "no_layout_test" not in mixers.TOKEN_MIXERS


def test_quick_gelu_is_an_mlp_activation():
    assert ACTIVATIONS["quick_gelu"] is QuickGELU
    x = torch.randn(5)
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    mlp = create_channel_mixer("mlp", 8, hidden_dim=16, options={"act": "quick_gelu"})
    assert isinstance(mlp.act, QuickGELU)


# ---- 9. fixed_input_size ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fixed",
    [
        ("zoo_vit_mini_32", True),
        ("zoo_gmlp_mini_32", True),
        ("zoo_poolformer_mini_32", False),
        ("zoo_cvt_mini_32", False),
    ],
)
def test_fixed_input_size_in_pretrained_cfg(name, fixed):
    with warnings.catch_warnings(), torch.device("meta"):
        model = zoo.create_model(name)
    assert model.pretrained_cfg.get("fixed_input_size", False) is fixed
