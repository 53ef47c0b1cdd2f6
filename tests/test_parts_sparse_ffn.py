"""The sparse feed-forward layer of "Sparse is Enough in Scaling Transformers" (Jaszczur et al.
2021, https://arxiv.org/abs/2111.12763) against a naive loop over tokens, blocks and units."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.layers.mlp import create_channel_mixer
from zoo.layers.sparse_ffn import SparseFFN

DIM, HIDDEN, N, RANK = 6, 24, 4, 3  # 6 blocks of 4 units


def build(**options) -> SparseFFN:
    torch.manual_seed(0)
    opts = {"block_size": N, "controller_rank": RANK, **options}
    layer = create_channel_mixer("sparse_ffn", DIM, hidden_dim=HIDDEN, options=opts).double()
    with torch.no_grad():  # biases away from zero, so that a missing one shows
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


def naive(layer: SparseFFN, x: torch.Tensor, noise: torch.Tensor | None = None, soft: bool = False) -> torch.Tensor:
    """Token by token, block by block: the controller's logits of the block (low-rank: dim -> rank ->
    N), its unit (argmax, or argmax of log-softmax + temperature * noise), that unit's ReLU'd
    activation times its fc2 column; or, ``soft``, every unit weighted by the block's softmax."""
    flat = x.reshape(-1, DIM)
    out = torch.zeros_like(flat)
    for t, xt in enumerate(flat):
        low = torch.stack([(layer.controller_down.weight[r] * xt).sum() for r in range(RANK)])
        y = layer.fc2.bias.clone()
        for b in range(HIDDEN // N):
            units = range(b * N, (b + 1) * N)
            logits = torch.stack(
                [(layer.controller_up.weight[u] * low).sum() + layer.controller_up.bias[u] for u in units]
            )
            act = [torch.relu((layer.fc1.weight[u] * xt).sum() + layer.fc1.bias[u]) for u in units]
            if soft:
                probs = torch.exp(logits - logits.max())
                probs = probs / probs.sum()
                for j, u in enumerate(units):
                    y = y + probs[j] * act[j] * layer.fc2.weight[:, u]
                continue
            score = (
                logits
                if noise is None
                else torch.log_softmax(logits, 0) + layer.temperature * noise.reshape(-1, HIDDEN // N, N)[t, b]
            )
            j = int(score.argmax())
            y = y + act[j] * layer.fc2.weight[:, b * N + j]
        out[t] = y
    return out.reshape(x.shape)


@pytest.mark.parametrize("shape", [(1, 1, DIM), (1, 3, DIM), (2, 5, DIM), (2, 2, 3, DIM)])
def test_eval_matches_naive_loop_on_both_paths(shape):
    """Fewer tokens than block_size (gathered weights) and more (masked dense product)."""
    layer = build().eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(layer(x), naive(layer, x), rtol=1e-12, atol=1e-12)


def test_train_with_fixed_gumbel_noise_matches_naive_loop():
    layer = build(temperature=0.7).train()
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    noise = -torch.log(-torch.log(torch.rand(2, 5, HIDDEN // N, N, dtype=torch.float64)))
    hard = layer(x, gumbel=noise, hard=True)
    torch.testing.assert_close(hard, naive(layer, x, noise=noise), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(hard, naive(layer, x)), "the noise must change some choice here"
    torch.testing.assert_close(layer(x, gumbel=noise, hard=False), naive(layer, x, soft=True), rtol=1e-12, atol=1e-12)


def test_straight_through_gradient_is_the_softmaxs():
    """The controller's gradient: d loss / d mask (the unit's activation times fc2's column dotted
    with the output's gradient) through the softmax Jacobian, summed over tokens into the
    controller's bias; written out here per token and block."""
    layer = build().train()
    x = torch.randn(3, DIM, dtype=torch.float64)
    noise = torch.zeros(3, HIDDEN // N, N, dtype=torch.float64)
    gy = torch.randn(3, DIM, dtype=torch.float64)
    (layer(x, gumbel=noise, hard=True) * gy).sum().backward()
    with torch.no_grad():
        act = torch.relu(x @ layer.fc1.weight.T + layer.fc1.bias)  # (T, hidden)
        dmask = act * (gy @ layer.fc2.weight)  # (T, hidden): d loss / d mask
        logits = (x @ layer.controller_down.weight.T) @ layer.controller_up.weight.T + layer.controller_up.bias
        expected = torch.zeros(HIDDEN, dtype=torch.float64)
        for t in range(3):
            for b in range(HIDDEN // N):
                s = slice(b * N, (b + 1) * N)
                p = torch.softmax(logits[t, s], 0)
                expected[s] += p * (dmask[t, s] - (p * dmask[t, s]).sum())
    torch.testing.assert_close(layer.controller_up.bias.grad, expected, rtol=1e-10, atol=1e-12)
    assert layer.controller_down.weight.grad.abs().sum() > 0


def test_low_precision_mask_is_exactly_one_hot_with_float32_noise():
    """bf16 logits (as under autocast): the straight-through forward is exactly 0/1 (not 1 + p - p
    rounded), and the Gumbel noise is the float32 draw the authors' code makes, not a bf16 one."""
    layer = build(temperature=5.0).train()
    logits = torch.randn(64, HIDDEN // N, N).to(torch.bfloat16)
    torch.manual_seed(11)
    mask = layer.train_mask(logits, hard=True)
    assert mask.dtype == torch.bfloat16 and set(mask.unique().tolist()) == {0.0, 1.0}
    torch.manual_seed(11)
    uniform = torch.empty(logits.shape, dtype=torch.float32).uniform_(1e-6, 1.0 - 1e-6)
    choice = (logits.log_softmax(dim=-1) - 5.0 * torch.log(-torch.log(uniform))).argmax(dim=-1)
    assert torch.equal(mask.argmax(dim=-1), choice)


def test_hard_mask_trains_only_the_chosen_units():
    layer = build().train()
    x = torch.randn(1, DIM, dtype=torch.float64)
    layer(x, gumbel=torch.zeros(1, HIDDEN // N, N, dtype=torch.float64), hard=True).sum().backward()
    chosen = layer.controller_logits(x).argmax(dim=-1)[0]  # (blocks,): noise 0 keeps the argmax
    trained = layer.fc1.weight.grad.abs().sum(dim=1).reshape(HIDDEN // N, N) > 0  # (blocks, N)
    assert trained.any()
    # a chosen unit whose ReLU is 0 gets no gradient either; no other unit ever does
    assert not (trained & ~F.one_hot(chosen, N).bool()).any(), "only a block's chosen unit trains on a token"


def test_eval_prediction_does_not_depend_on_batch_mates():
    layer = build().eval()
    x = torch.randn(4, 5, DIM, dtype=torch.float64)
    together = layer(x)
    for i in range(4):
        torch.testing.assert_close(layer(x[i : i + 1]), together[i : i + 1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer(x[i, :1]), together[i, :1], rtol=1e-12, atol=1e-12)  # gathered path
    shuffled = layer(x[torch.tensor([2, 0, 3, 1])])
    torch.testing.assert_close(shuffled, together[torch.tensor([2, 0, 3, 1])], rtol=1e-12, atol=1e-12)


def test_training_draws_noise_and_mask_kind():
    """Without fixed noise: fresh Gumbel noise every call; quant_prob 1 always the hard mask, 0 the soft."""
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    layer = build(quant_prob=0.0).train()
    torch.testing.assert_close(layer(x), naive(layer, x, soft=True), rtol=1e-12, atol=1e-12)
    layer = build(quant_prob=1.0, temperature=5.0).train()
    outs = {tuple(layer(x).flatten().tolist()) for _ in range(5)}
    assert len(outs) > 1, "the noise is drawn afresh"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"block_size": 5}, "block_size 5 does not divide the hidden width 24"),
        ({"block_size": 0}, "block_size must be a positive int"),
        ({"controller_rank": 1.5}, "controller_rank must be a positive int"),
        ({"block_size": 4, "quant_prob": 2.0}, "quant_prob must be a number in"),
        ({"block_size": 4, "temperature": "1e-1"}, "temperature must be a number >= 0, got '1e-1'"),
    ],
)
def test_bad_options_are_one_line(options, message):
    with pytest.raises(ValueError, match=message) as e:
        create_channel_mixer("sparse_ffn", DIM, hidden_dim=HIDDEN, options=options)
    assert "\n" not in str(e.value)


def test_a_model_refuses_a_block_size_that_does_not_divide_its_hidden_width():
    with pytest.raises(ValueError, match=r"stages\[0\].*block_size 48 does not divide the hidden width 128") as e:
        zoo.create_model("zoo_poolformer_mini_32", channel_mixer="sparse_ffn", channel_options={"block_size": 48})
    assert "\n" not in str(e.value)


def test_sparse_ffn_swapped_into_a_model_trains_and_evaluates():
    torch.manual_seed(1)
    net = zoo.create_model(
        "zoo_poolformer_mini_32",
        num_classes=3,
        channel_mixer="sparse_ffn",
        channel_options={"block_size": 16, "controller_rank": 8, "quant_prob": 1.0},
    )
    layers = [m for m in net.modules() if isinstance(m, SparseFFN)]
    assert len(layers) == 6 and all(m.block_size == 16 for m in layers)
    x = torch.randn(2, 3, 32, 32)
    F.cross_entropy(net(x), torch.tensor([0, 2])).backward()
    for m in layers:
        assert m.controller_up.weight.grad.abs().sum() > 0, "the straight-through gradient reaches the controller"
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x[:1]), net(x)[:1], rtol=1e-4, atol=1e-5)


def test_sparse_ffn_bench_writes_its_results_at_toy_size(tmp_path):
    """Toy size into a tmp folder (timings here are noise; only the file and the twin are checked)."""
    from zoo.bench.__main__ import main
    from zoo.bench.sparse_ffn import dense_twin

    argv = ["sparse-ffn", "--dim", "16", "--hidden", "64", "--block-sizes", "8,16", "--rank", "4"]
    argv += ["--tokens", "5", "--batch", "2", "--warmup", "1", "--repeats", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    (result,) = tmp_path.glob("sparse_ffn_*.json")  # one file per machine kind: this one's
    data = json.loads(result.read_text())
    assert data["settings"]["device"] == "cpu"
    assert [r["regime"] for r in data["rows"]] == ["token"] * 3 + ["image"] * 3 + ["batch"] * 3
    assert [r["tokens_per_call"] for r in data["rows"][::3]] == [1, 5, 10]
    dense, sparse = data["rows"][0], data["rows"][1]
    assert dense["ratio"] == 1.0 and abs(dense["params"] - sparse["params"]) <= 2 * 16 + 1
    assert result.with_suffix(".md").read_text().startswith("| regime")
    spread = (tmp_path / "sparse_ffn_machines.md").read_text()  # the spread across machine kinds met
    assert "token N=8" in spread and "batch N=16" in spread
    # the twin's width is the one that matches the count, not a neighbour's
    layer = SparseFFN(384, hidden_dim=1536, block_size=32, controller_rank=64)
    twin = dense_twin(layer, 384)
    count = sum(p.numel() for p in layer.parameters())
    assert abs(sum(p.numel() for p in twin.parameters()) - count) <= (2 * 384 + 1) // 2


def test_sparse_ffn_bench_refuses_a_block_size_that_does_not_divide(capsys):
    from zoo.bench.sparse_ffn import main

    with pytest.raises(SystemExit) as e:
        main(["--hidden", "64", "--block-sizes", "24"])
    assert e.value.code == 2 and "24 does not divide --hidden 64" in capsys.readouterr().err


def test_sparse_ffn_is_a_one_change_study_arm():
    """``MODEL:OPTIMIZER:channel_mixer=sparse_ffn``: the arm's config overrides build the model the
    trials train (default block size 32 divides PoolFormer-mini's hidden widths, 128 to 768)."""
    from zoo.study.arms import parse_arms
    from zoo.train.config import load_config
    from zoo.train.loop import _create_model

    (arm,) = parse_arms("zoo_poolformer_mini_32:adamw:channel_mixer=sparse_ffn")
    net = _create_model(load_config(None, arm.overrides()), num_classes=10, in_chans=1)
    assert sum(isinstance(m, SparseFFN) for m in net.modules()) == 6
    net(torch.randn(2, 1, 32, 32)).sum().backward()
