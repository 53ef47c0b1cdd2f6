"""A zoo model is a timm model in every habit: pretrained tags, device/dtype, FX, layer decay,
dynamic sizes, pooling, the attention switch, torch.func and TorchScript (issue 18)."""
from __future__ import annotations

import timm
import torch
from timm.data import resolve_model_data_config

import zoo
from zoo.models.pretrained import read_manifest

X32 = torch.randn(2, 3, 32, 32)


def test_every_shipped_checkpoint_is_a_pretrained_tag():
    shipped = sorted(n for n in read_manifest() if n.startswith("zoo_"))
    assert timm.list_pretrained("zoo_*") == [f"{n}.mnist5k" for n in shipped]
    for name in shipped:
        cfg = timm.get_pretrained_cfg(f"{name}.mnist5k").to_dict()
        for key in ("file", "tag", "input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation",
                    "num_classes", "first_conv", "classifier", "license", "origin_url", "pool_size"):
            assert cfg.get(key) is not None, f"{name}: pretrained_cfg lacks {key}"


def test_tagged_create_model_loads_the_shipped_weights_offline():
    entry = read_manifest()["zoo_cvt_mini_32"]
    model = timm.create_model("zoo_cvt_mini_32.mnist5k", pretrained=True).eval()
    same = zoo.create_model("zoo_cvt_mini_32", pretrained=True).eval()
    assert model.num_classes == entry["num_classes"] == 10
    with torch.no_grad():
        assert torch.equal(model(X32), same(X32))
    data = resolve_model_data_config(model)
    assert data["mean"] == tuple(entry["mean"]) and data["std"] == tuple(entry["std"])
    assert data["input_size"] == tuple(entry["input_size"]) and data["interpolation"] == entry["interpolation"]
    assert data["crop_pct"] == entry["crop_pct"] and model.pretrained_cfg["tag"] == "mnist5k"


def test_unknown_tag_is_one_line():
    import pytest

    with pytest.raises(Exception, match="zoo_cvt_mini_32"):
        timm.create_model("zoo_cvt_mini_32.imagenet", pretrained=True)


def test_device_and_dtype_are_accepted_by_every_constructor():
    for name in zoo.list_models():
        model = timm.create_model(name, device="meta", dtype=torch.bfloat16)
        tensors = [*model.parameters(), *model.buffers()]
        assert all(t.device.type == "meta" for t in tensors), name
        assert all(t.dtype == torch.bfloat16 for t in model.parameters()), name
    feats = timm.create_model("zoo_poolformer_mini_32", features_only=True)
    assert feats.default_cfg["architecture"] == "zoo_poolformer_mini_32"


def test_reset_classifier_keeps_device_and_dtype():
    model = zoo.create_model("zoo_vit_mini_32").to(torch.float64)
    model.reset_classifier(3)
    assert model.head.weight.dtype == torch.float64
