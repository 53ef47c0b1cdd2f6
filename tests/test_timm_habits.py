"""A zoo model is a timm model in every habit: pretrained tags, device/dtype, FX, layer decay,
dynamic sizes, pooling, the attention switch, torch.func and TorchScript (issue 18)."""

from __future__ import annotations

import pytest
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
        for key in (
            "file",
            "tag",
            "input_size",
            "mean",
            "std",
            "crop_pct",
            "crop_mode",
            "interpolation",
            "num_classes",
            "first_conv",
            "classifier",
            "license",
            "origin_url",
            "pool_size",
        ):
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


def test_moe_channel_mixers_run_on_the_meta_device():
    """timm's default-cfg tests build a model on the meta device and run forward_features there: the
    MoE switches autocast off only where the device has autocast, and reads no expert load to trim
    its buffers (a meta tensor has no values); both routers and Soft MoE, in eval and training."""
    from zoo.layers.moe import MoE
    from zoo.layers.soft_moe import SoftMoE

    model = timm.create_model("zoo_widenet_mini_32", device="meta")
    with torch.device("meta"):
        mixers = [MoE(16, hidden_dim=32), MoE(16, hidden_dim=32, router="expert_choice"), SoftMoE(16, hidden_dim=32)]
    for train in (False, True):
        out = model.train(train).forward_features(torch.randn(2, 3, 32, 32, device="meta"))
        assert out.device.type == "meta" and out.shape == (2, 65, 128)
        for mixer in mixers:
            out = mixer.train(train)(torch.randn(2, 9, 16, device="meta"))
            assert out.device.type == "meta" and out.shape == (2, 9, 16), mixer


def test_reset_classifier_keeps_device_and_dtype():
    model = zoo.create_model("zoo_vit_mini_32").to(torch.float64)
    model.reset_classifier(3)
    assert model.head.weight.dtype == torch.float64


MINIS = [
    "zoo_poolformer_mini_32",
    "zoo_vit_mini_32",
    "zoo_deit_mini_distilled_32",
    "zoo_cvt_mini_32",
    "zoo_gmlp_mini_32",
    "zoo_widenet_mini_32",
]


def test_torchvision_feature_extraction_traces_every_family():
    """FX (torchvision's create_feature_extractor, with timm's leaf modules and wrapped functions):
    the traced model computes the model's function, in eval and in training."""
    import pytest

    fe = pytest.importorskip("torchvision.models.feature_extraction")
    from timm.models import get_notrace_functions, get_notrace_modules

    kw = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}
    for name in MINIS:
        torch.manual_seed(0)
        model = zoo.create_model(name, num_classes=5).eval()
        train_nodes, eval_nodes = fe.get_graph_node_names(model, tracer_kwargs=kw)
        fx = fe.create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=kw).eval()
        with torch.no_grad():
            torch.testing.assert_close(next(iter(fx(X32).values())), model(X32), msg=name)
        assert train_nodes, name


def _family_minis() -> list[str]:
    """One small model per family, every family registered: ``zoo_<family>_mini*`` (a family is the
    name's second word: vit and deit, poolformer and poolformerv2 are families of their own)."""
    names = zoo.list_models()
    families = sorted({n.split("_")[1] for n in names})
    minis = {f: sorted(n for n in names if n.startswith(f"zoo_{f}_mini")) for f in families}
    assert all(minis.values()), f"families without a *_mini model: {[f for f, m in minis.items() if not m]}"
    return [m[0] for m in minis.values()]


FAMILY_MINIS = _family_minis()


@pytest.mark.parametrize("name", FAMILY_MINIS)
def test_torch_func_grad_equals_autograd_in_training(name):
    """torch.func.functional_call + grad over a model in training mode (the fused Functions fall back
    to plain ops under functorch; the MoE routes as in eager: grad, unlike vmap, runs its index ops
    and its host-side capacity trim) gives autograd's gradients, for every family.

    Autograd runs first: torch's functional_call leaves a module reachable at several paths (the
    weight sharing of WideNet) holding the values it was given (see the test below), so a model used
    after it has lost its shared parameters."""
    from torch.func import functional_call, grad

    y = torch.tensor([0, 1])
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=3).train()
    # torch.func's documented step for BatchNorm (CvT's projections): no running-stat updates,
    # which a grad transform cannot write in place; training still normalises by batch statistics
    torch.func.replace_all_batch_norm_modules_(model)

    def loss(out):
        return torch.nn.functional.cross_entropy(out[0] if isinstance(out, tuple) else out, y)

    torch.manual_seed(1)  # the same dropout/drop-path/router-noise draws on both sides
    loss(model(X32)).backward()
    expected = {k: p.grad for k, p in model.named_parameters()}
    assert all(g is not None for g in expected.values()), name
    params = {k: v.detach() for k, v in model.named_parameters()}
    torch.manual_seed(1)
    got = grad(lambda p, model=model: loss(functional_call(model, p, (X32,))))(params)
    assert got.keys() == expected.keys()
    for k, g in expected.items():
        torch.testing.assert_close(got[k], g, rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")


@pytest.mark.parametrize(
    "name",
    [
        "zoo_vit_mini_32",
        pytest.param(
            "zoo_widenet_mini_32",
            marks=pytest.mark.xfail(
                reason="torch's functional_call restores a submodule reachable at several paths once per "
                "path, the last restore putting back the value it was given (pytorch/pytorch#164759, fix "
                "proposed in pytorch/pytorch#195593): WideNet's shared attention and MoE keep plain tensors",
                strict=True,
            ),
        ),
    ],
)
def test_functional_call_leaves_the_model_as_it_was(name):
    """After torch.func.functional_call the model holds its own Parameters again. Strict xfail for
    WideNet, whose blocks share one attention and one MoE (one module at six paths, as ALBERT's
    sharing): a torch bug, not ours; when a torch release fixes it this test XPASSes and fails, and
    the xfail goes."""
    from torch.func import functional_call

    model = zoo.create_model(name, num_classes=3)
    before = dict(model.named_parameters())
    with torch.no_grad():
        functional_call(model, {k: v.detach().clone() for k, v in before.items()}, (X32,))
    after = dict(model.named_parameters())
    assert [k for k in before if after.get(k) is not before[k]] == []


def test_fused_attn_false_equals_sdpa():
    """fused_attn=False (or TIMM_FUSED_ATTN=0 through timm.layers.use_fused_attn): explicit softmax
    attention, equal to SDPA's output."""
    torch.manual_seed(0)
    model = zoo.create_model("zoo_vit_mini_32").eval()
    with torch.no_grad():
        fused = model(X32)
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        torch.testing.assert_close(model(X32), fused, rtol=1e-5, atol=1e-5)


# ---- dynamic sizes, intermediates, pooling (issue 18, item 4) ---------------------------------------

X48 = torch.randn(2, 3, 48, 40)  # another, non-square size: a 12x10 grid of 4x4 patches


def test_dynamic_img_size_equals_the_resized_model_and_timms_vit(tmp_path):
    """dynamic_img_size=True interpolates the position embedding per input: another size runs and
    gives what set_input_size() to that size gives (same weights), and what timm's ViT gives with
    dynamic_img_size=True on the same weights; at the built size nothing changes."""
    torch.manual_seed(0)
    dynamic = zoo.create_model("zoo_vit_mini_32", dynamic_img_size=True).eval()
    fixed = zoo.create_model("zoo_vit_mini_32").eval()
    fixed.load_state_dict(dynamic.state_dict())
    assert fixed.pretrained_cfg["fixed_input_size"] and not dynamic.pretrained_cfg["fixed_input_size"]
    with torch.no_grad():
        torch.testing.assert_close(dynamic(X32), fixed(X32), rtol=0, atol=0)
        with pytest.raises(ValueError, match="dynamic_img_size=True"):
            fixed(X48)
        out = dynamic(X48)
        fixed.set_input_size((48, 40))
        torch.testing.assert_close(out, fixed(X48), rtol=1e-5, atol=1e-5)

        twin = timm.create_model(
            "vit_tiny_patch16_224",
            img_size=32,
            patch_size=4,
            embed_dim=128,
            depth=6,
            num_heads=4,
            dynamic_img_size=True,
        ).eval()
        torch.save(twin.state_dict(), tmp_path / "vit.pth")
        ours = zoo.create_model("zoo_vit_mini_32", dynamic_img_size=True, pretrained=tmp_path / "vit.pth").eval()
        torch.testing.assert_close(ours(X48), twin(X48), rtol=1e-4, atol=1e-4)


def test_set_input_size_resamples_the_position_embedding_as_timm():
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    model = zoo.create_model("zoo_deit_mini_distilled_32").eval()
    before = model.stages[0].pos_embed.detach().clone()
    model.stages[0].pos_embed.requires_grad_(False)
    model.set_input_size((48, 40))
    pos = model.stages[0].pos_embed
    assert pos.shape == (1, 2 + 12 * 10, 128) and not pos.requires_grad
    torch.testing.assert_close(pos.detach(), resample_abs_pos_embed(before, [12, 10], num_prefix_tokens=2))
    assert model.stages[0].grid == (12, 10) and model.pretrained_cfg["input_size"] == (3, 48, 40)
    assert model.pretrained_cfg["pool_size"] == (12, 10)
    with torch.no_grad():
        assert model(X48).shape == (2, 1000)
    # gMLP's spatial gating has weights per token position: like timm's gMLP, it has no set_input_size
    # (timm's tests call the method wherever it exists, expecting it to work)
    assert not hasattr(zoo.create_model("zoo_gmlp_mini_32"), "set_input_size")
    with pytest.raises(ValueError, match="patch_size"):
        model.set_input_size(32, patch_size=8)


@pytest.mark.parametrize(
    "name, prefix, taps",
    [
        ("zoo_vit_mini_32", [1] * 6, [(8, 8)] * 6),
        ("zoo_deit_mini_distilled_32", [2] * 6, [(8, 8)] * 6),
        ("zoo_cvt_mini_32", [0, 0, 1], [(16, 16), (8, 8), (4, 4)]),
        ("zoo_poolformer_mini_32", [0] * 4, [(16, 16), (8, 8), (4, 4), (2, 2)]),
    ],
)
def test_forward_intermediates_nlc_with_prefix_tokens(name, prefix, taps):
    """output_fmt="NLC": (B, H*W, C) patch tokens per tap, return_prefix_tokens pairs each with its
    stage's class/distillation tokens (B, prefix, C) -- (B, 0, C) where the stage has none; the
    same taps as NCHW maps, and the last tap with its prefix, normed, is forward_features."""
    torch.manual_seed(0)
    model = zoo.create_model(name).eval()
    with torch.no_grad():
        final, nlc = model.forward_intermediates(X32, output_fmt="NLC", return_prefix_tokens=True)
        maps = model.forward_intermediates(X32, intermediates_only=True)
        feats = model.forward_features(X32)
    channels = [f["num_chs"] for f in model.feature_info]
    assert len(nlc) == len(maps) == len(taps) == len(prefix)
    for (tokens, pre), m, n_pre, (h, w), c in zip(nlc, maps, prefix, taps, channels, strict=True):
        assert tokens.shape == (2, h * w, c) and pre.shape == (2, n_pre, c) and m.shape == (2, c, h, w)
        torch.testing.assert_close(tokens, m.flatten(2).transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(final, feats, rtol=0, atol=0)
    tokens, pre = nlc[-1]
    last = torch.cat([pre, tokens], 1) if model.stages[-1].layout == "nlc" else maps[-1]
    torch.testing.assert_close(model.norm(last), feats, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(X32, output_fmt="NHWC")


@pytest.mark.parametrize("name", ["zoo_vit_mini_32", "zoo_poolformer_mini_32"])
def test_global_pools_equal_their_definitions(name):
    """reset_classifier(0, pool) and create_model(global_pool=pool) pool as timm defines it: over
    the patch tokens (prefix tokens excluded; timm's global_pool_nlc) or the map's positions
    (timm's SelectAdaptivePool2d); "token" is the class token; a map has no "token"."""
    from timm.layers import SelectAdaptivePool2d, global_pool_nlc

    torch.manual_seed(0)
    model = zoo.create_model(name).eval()
    with torch.no_grad():
        feats = model.forward_features(X32)
        tokens = model.stages[-1].layout == "nlc"
        patches = feats[:, model.num_prefix_tokens :] if tokens else feats.flatten(2).transpose(1, 2)
        definitions = {
            "avg": patches.mean(1),
            "max": patches.amax(1),
            "avgmax": 0.5 * (patches.mean(1) + patches.amax(1)),
        }
        if tokens:
            definitions["token"] = feats[:, 0]
        for pool, expected in definitions.items():
            timm_pool = (
                global_pool_nlc(feats, pool, num_prefix_tokens=model.num_prefix_tokens)
                if tokens
                else SelectAdaptivePool2d(pool_type=pool, flatten=True)(feats)
            )
            torch.testing.assert_close(timm_pool, expected, rtol=1e-6, atol=1e-6, msg=pool)
            model.reset_classifier(0, pool)
            torch.testing.assert_close(model(X32), expected, rtol=1e-6, atol=1e-6, msg=pool)
            torch.testing.assert_close(model.forward_head(feats, pre_logits=True), expected, rtol=1e-6, atol=1e-6)
            built = zoo.create_model(name, num_classes=0, global_pool=pool).eval()
            built.load_state_dict(model.state_dict())
            torch.testing.assert_close(built(X32), expected, rtol=1e-6, atol=1e-6, msg=pool)
    if not tokens:
        with pytest.raises(ValueError, match="class token"):
            model.reset_classifier(0, "token")


# ---- TorchScript (issue 18, item 5) ----------------------------------------------------------------


@pytest.mark.parametrize("features_only", [False, True], ids=["model", "features_only"])
@pytest.mark.parametrize("name", FAMILY_MINIS)
def test_torch_jit_script_is_refused_in_one_line_naming_the_alternatives(name, features_only):
    """torch.jit.script on a zoo model of every family (ZooModel refuses it, so every size of a family
    does the same) or on its features_only wrapper stops at once with one line saying why and what to
    use; the alternatives it names are tested for every family in tests/test_pretrained_io.py::
    test_export_round_trip (trace, torch.export, ONNX, against eager)."""
    import warnings

    model = timm.create_model(name, device="meta", features_only=features_only)
    with warnings.catch_warnings(), pytest.raises(RuntimeError) as e:
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates torch.jit.script itself
        torch.jit.script(model)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{name}: torch.jit.script is not supported"), msg
    for alternative in ("torch.jit.trace(", "torch.export.export(", f"python -m zoo.export {name}"):
        assert alternative in msg, (name, alternative)


@pytest.mark.parametrize(
    "name",
    [
        *(n for n in FAMILY_MINIS if not n.startswith("zoo_widenet")),
        pytest.param(
            "zoo_widenet_mini_32",
            marks=pytest.mark.skip(
                reason="excluded from timm's test_model_forward_fx_torchscript too (tests/timm_suite/"
                "patch_suite.py): FX keeps the MoE a leaf (it routes tokens by value) and TorchScript "
                "cannot compile its Python routing"
            ),
        ),
    ],
)
def test_fx_traced_model_scripts(name):
    """What timm's test_model_forward_fx_torchscript does, for every family: an FX trace (timm's
    leaf modules and wrapped functions) scripts and computes the model's function, in eval."""
    import warnings

    fe = pytest.importorskip("torchvision.models.feature_extraction")
    from timm.models import get_notrace_functions, get_notrace_modules

    kw = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=5).eval()
    node = fe.get_graph_node_names(model, tracer_kwargs=kw)[1][-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates torch.jit.script itself
        scripted = torch.jit.script(fe.create_feature_extractor(model, return_nodes=[node], tracer_kwargs=kw))
    with torch.no_grad():
        torch.testing.assert_close(scripted(X32)[node], model(X32))
