"""Exactness against the references: timm's models, the official PoolFormer and DeiT layouts.

Each check builds the reference with random weights (norm affines and layer scales perturbed so
that they are exercised too), saves its state dict to a file, loads that file with
``zoo.create_model(name, pretrained=file)`` and compares logits in eval mode.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import zoo
from zoo.bench.counts import count_macs, count_params
from zoo.models.poolformer import TIMM_HEAD as TIMM_POOLFORMER_HEAD
from zoo.models.pretrained import CheckpointError

POOLFORMERS = ["s12", "s24", "s36", "m36", "m48"]
VITS = [
    ("zoo_vit_tiny_patch16_224", "vit_tiny_patch16_224"),
    ("zoo_vit_small_patch16_224", "vit_small_patch16_224"),
    ("zoo_vit_base_patch16_224", "vit_base_patch16_224"),
    ("zoo_deit_tiny_distilled_patch16_224", "deit_tiny_distilled_patch16_224"),
    ("zoo_deit_small_distilled_patch16_224", "deit_small_distilled_patch16_224"),
    ("zoo_deit_base_distilled_patch16_224", "deit_base_distilled_patch16_224"),
]


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norm affines, biases, layer scales: make them non-trivial
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def logits(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("size", POOLFORMERS)
def test_poolformer_matches_timm(size, tmp_path):
    ref = randomized(timm.create_model(f"poolformer_{size}"))
    path = tmp_path / "timm.pth"
    torch.save(ref.state_dict(), path)
    ours = zoo.create_model(f"zoo_poolformer_{size}", pretrained=str(path), **TIMM_POOLFORMER_HEAD).eval()
    x = torch.randn(2, 3, 96, 96)
    assert (logits(ours, x) - logits(ref, x)).abs().max() <= 1e-4
    assert count_params(ours) == count_params(ref)


def official_poolformer_state(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's random weights rewritten into the official sail-sg key layout, plus a map norm."""
    out = {}
    for k, v in ref.state_dict().items():
        if k.startswith("head."):
            continue
        k = k.replace("stem.conv.", "patch_embed.proj.")
        for i, net in ((1, 1), (2, 3), (3, 5)):
            k = k.replace(f"stages.{i}.downsample.conv.", f"network.{net}.proj.")
        for i, net in ((0, 0), (1, 2), (2, 4), (3, 6)):
            k = k.replace(f"stages.{i}.blocks.", f"network.{net}.")
        k = k.replace("layer_scale1.scale", "layer_scale_1").replace("layer_scale2.scale", "layer_scale_2")
        out[k] = v
    dim = ref.num_features
    out["norm.weight"], out["norm.bias"] = 1 + 0.1 * torch.randn(dim), 0.1 * torch.randn(dim)
    out["head.weight"], out["head.bias"] = 0.02 * torch.randn(1000, dim), torch.zeros(1000)
    return out


@pytest.mark.parametrize("size", ["s12", "m36"])
def test_poolformer_official_layout(size, tmp_path):
    ref = randomized(timm.create_model(f"poolformer_{size}"))
    state = official_poolformer_state(ref)
    path = tmp_path / "official.pth"
    torch.save(state, path)  # the official release is a plain torch state dict
    ours = zoo.create_model(f"zoo_poolformer_{size}", pretrained=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # the official head: GroupNorm(1) on the map, global average, linear
        fmap = ref.forward_features(x)
        expected = F.linear(
            F.group_norm(fmap, 1, state["norm.weight"], state["norm.bias"]).mean((2, 3)),
            state["head.weight"],
            state["head.bias"],
        )
    assert (logits(ours, x) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("zoo_name,timm_name", VITS)
def test_vit_deit_matches_timm(zoo_name, timm_name, tmp_path):
    # Full-size architecture; the token grid is 4x4 (img_size 64) on both sides to keep CI fast,
    # and the 224 default is checked for the tiny sizes below.
    ref = randomized(timm.create_model(timm_name, img_size=64))
    path = tmp_path / "timm.safetensors"
    save_file(ref.state_dict(), str(path))
    ours = zoo.create_model(zoo_name, img_size=64, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    assert (logits(ours, x) - logits(ref, x)).abs().max() <= 1e-4
    assert count_params(ours) == count_params(ref)


@pytest.mark.parametrize("zoo_name,timm_name", [VITS[0], VITS[3]])
def test_official_deit_checkpoint_at_224(zoo_name, timm_name, tmp_path):
    ref = randomized(timm.create_model(timm_name))
    path = tmp_path / "deit.pth"
    torch.save({"model": ref.state_dict(), "epoch": 299}, path)  # how facebookresearch/deit saves
    ours = zoo.create_model(zoo_name, pretrained=str(path)).eval()
    x = torch.randn(1, 3, 224, 224)
    assert (logits(ours, x) - logits(ref, x)).abs().max() <= 1e-4


def test_timm_layout_without_timm_head_warns():
    """Loading timm's PoolFormer into the official head works, and says why logits differ."""
    import tempfile

    ref = randomized(timm.create_model("poolformer_s12"))
    with tempfile.TemporaryDirectory() as d:
        torch.save(ref.state_dict(), f"{d}/w.pth")
        with pytest.warns(UserWarning, match="head_norm_on='pooled'"):
            zoo.create_model("zoo_poolformer_s12", pretrained=f"{d}/w.pth")


# Published figures: PoolFormer paper Table 2 (params M, MACs G), DeiT paper Table 1 / timm.
PUBLISHED = {
    "zoo_poolformer_s12": (11.9, 1.8),
    "zoo_poolformer_s24": (21.4, 3.4),
    "zoo_poolformer_s36": (30.9, 5.0),
    "zoo_poolformer_m36": (56.2, 8.8),
    "zoo_poolformer_m48": (73.5, 11.6),
    "zoo_vit_tiny_patch16_224": (5.7, 1.3),
    "zoo_vit_small_patch16_224": (22.1, 4.6),
    "zoo_vit_base_patch16_224": (86.6, 17.6),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_and_macs_match_published(name):
    params_m, macs_g = PUBLISHED[name]
    model = zoo.create_model(name)
    assert round(count_params(model) / 1e6, 1) == pytest.approx(params_m, abs=0.1)
    assert count_macs(model, 224) / 1e9 == pytest.approx(macs_g, rel=0.04)


def test_wrong_architecture_names_keys(tmp_path):
    path = tmp_path / "vit.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224").state_dict(), str(path))
    with pytest.raises(CheckpointError, match=r"do not fit zoo_vit_small_patch16_224.*wrongly shaped"):
        zoo.create_model("zoo_vit_small_patch16_224", pretrained=str(path))
