"""Channel mixers: registry, shapes, gradients, timm checkpoint compatibility, GLU formulas."""

from __future__ import annotations

import pytest
import timm.layers
import torch
import torch.nn.functional as F
from torch import nn

from zoo.layers.activations import SquaredReLU, get_act
from zoo.layers.mlp import (
    CHANNEL_MIXER_ALIASES,
    CHANNEL_MIXERS,
    GluMlp,
    Mlp,
    create_channel_mixer,
)
from zoo.names import UnknownComponentError

DIM, HIDDEN = 16, 24
# Options a mixer needs at this toy width (sparse_ffn's default block of 32 units exceeds HIDDEN).
TOY_OPTIONS = {"sparse_ffn": {"block_size": 8, "controller_rank": 4}}


@pytest.mark.parametrize("name", sorted([*CHANNEL_MIXERS, *CHANNEL_MIXER_ALIASES]))
@pytest.mark.parametrize("shape", [(2, 5, DIM), (2, 3, 4, DIM)], ids=["tokens", "map_bhwc"])
def test_every_registered_mixer_builds_keeps_shape_and_trains(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    mixer = create_channel_mixer(name, DIM, hidden_dim=HIDDEN, options=TOY_OPTIONS.get(name))
    x = torch.randn(shape, requires_grad=True)
    y = mixer(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if name == "identity":
        assert list(mixer.parameters()) == []
        assert torch.equal(y, x)
    for pname, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient reached {pname}"


def test_registry_names_build_the_promised_variant() -> None:
    assert isinstance(CHANNEL_MIXERS["mlp"](DIM, hidden_dim=HIDDEN).act, nn.GELU)
    assert isinstance(create_channel_mixer("mlp_gelu", DIM, hidden_dim=HIDDEN).act, nn.GELU)
    assert isinstance(create_channel_mixer("mlp_squared_relu", DIM, hidden_dim=HIDDEN).act, SquaredReLU)
    assert isinstance(create_channel_mixer("geglu", DIM, hidden_dim=HIDDEN).act, nn.GELU)
    assert isinstance(create_channel_mixer("reglu", DIM, hidden_dim=HIDDEN).act, nn.ReLU)
    assert isinstance(create_channel_mixer("squared_relu_glu", DIM, hidden_dim=HIDDEN).act, SquaredReLU)
    moe = create_channel_mixer("moe", DIM, hidden_dim=HIDDEN, options={"num_experts": 2, "top_k": 1})
    assert (moe.num_experts, moe.top_k) == (2, 1)
    mlp = create_channel_mixer("mlp", DIM, hidden_dim=HIDDEN, bias=False, options={"act": "relu"})
    assert isinstance(mlp.act, nn.ReLU) and mlp.fc1.bias is None and mlp.fc2.bias is None


def test_gelu_is_exact_erf_gelu() -> None:
    act = get_act("gelu")
    assert isinstance(act, nn.GELU) and act.approximate == "none"


def test_mlp_loads_timm_state_dict_and_matches() -> None:
    torch.manual_seed(0)
    ref = timm.layers.Mlp(DIM, hidden_features=HIDDEN).eval()
    ours = Mlp(DIM, hidden_dim=HIDDEN).eval()
    keys = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert set(ours.state_dict()) == set(ref.state_dict()) == keys
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 7, DIM)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    # and the other way round: our weights in timm's module
    ref2 = timm.layers.Mlp(DIM, hidden_features=HIDDEN).eval()
    ref2.load_state_dict(Mlp(DIM, hidden_dim=HIDDEN).state_dict(), strict=True)


def test_mlp_squared_relu_formula() -> None:
    torch.manual_seed(0)
    m = Mlp(DIM, hidden_dim=HIDDEN, act="squared_relu")
    x = torch.randn(4, DIM)
    expected = F.linear(F.relu(F.linear(x, m.fc1.weight, m.fc1.bias)) ** 2, m.fc2.weight, m.fc2.bias)
    torch.testing.assert_close(m(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "act"),
    [("geglu", F.gelu), ("reglu", F.relu), ("squared_relu_glu", lambda t: F.relu(t) ** 2)],
)
def test_glu_variants_match_naive_formula(name: str, act) -> None:
    torch.manual_seed(0)
    m = create_channel_mixer(name, DIM, hidden_dim=HIDDEN)
    assert isinstance(m, GluMlp)
    assert m.fc1.weight.shape == (2 * HIDDEN, DIM) and m.fc2.weight.shape == (DIM, HIDDEN)
    # non-zero biases so the formula check covers them
    with torch.no_grad():
        m.fc1.bias.normal_()
        m.fc2.bias.normal_()
    x = torch.randn(2, 5, DIM)
    w1, b1 = m.fc1.weight, m.fc1.bias
    gate = x @ w1[:HIDDEN].T + b1[:HIDDEN]  # first half: the activated gate
    value = x @ w1[HIDDEN:].T + b1[HIDDEN:]
    expected = (act(gate) * value) @ m.fc2.weight.T + m.fc2.bias
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


def test_unknown_name_suggests_near_names() -> None:
    with pytest.raises(KeyError) as info:
        create_channel_mixer("gelgu", DIM, hidden_dim=HIDDEN)
    assert isinstance(info.value, ValueError)
    assert "'geglu'" in str(info.value) and "gelgu" in str(info.value)
    with pytest.raises(ValueError, match="mlp_squared_relu"):
        create_channel_mixer("mlp_squaredrelu", DIM, hidden_dim=HIDDEN)
    with pytest.raises(UnknownComponentError, match="squared_relu"):
        get_act("sqared_relu")


def test_unknown_option_names_it_and_the_valid_ones() -> None:
    with pytest.raises(TypeError) as info:
        create_channel_mixer("moe", DIM, hidden_dim=HIDDEN, options={"num_expert": 8})
    msg = str(info.value)
    assert "'num_expert'" in msg and "num_experts" in msg and "top_k" in msg
    # options fixed by the registry name cannot be overridden
    with pytest.raises(TypeError, match="'act'"):
        create_channel_mixer("geglu", DIM, hidden_dim=HIDDEN, options={"act": "relu"})
    # common arguments are not options
    with pytest.raises(TypeError, match="'drop'"):
        create_channel_mixer("mlp", DIM, hidden_dim=HIDDEN, options={"drop": 0.1})
    with pytest.raises(TypeError, match=r"\(none\)"):
        create_channel_mixer("identity", DIM, hidden_dim=HIDDEN, options={"act": "relu"})


def test_init_is_vit_style() -> None:
    torch.manual_seed(0)
    m = Mlp(384, hidden_dim=1536)
    assert abs(m.fc1.weight.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(m.fc1.bias) == 0 and torch.count_nonzero(m.fc2.bias) == 0


def test_dropout_only_in_training() -> None:
    m = Mlp(DIM, hidden_dim=HIDDEN, drop=0.5)
    x = torch.randn(8, DIM)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x))


@pytest.mark.parametrize("name", ["mlp", "mlp_squared_relu", "geglu", "reglu", "squared_relu_glu"])
def test_forward_nchw_equals_forward_on_channels_last_tokens(name):
    """Blocks on maps call forward_nchw (1x1 convolutions); it must be the same function."""
    torch.manual_seed(0)
    mixer = create_channel_mixer(name, 16, hidden_dim=24).eval()
    x = torch.randn(2, 16, 5, 7).contiguous(memory_format=torch.channels_last)
    expected = mixer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, H, W) via (B, H, W, C)
    torch.testing.assert_close(mixer.forward_nchw(x), expected, atol=1e-5, rtol=1e-5)
