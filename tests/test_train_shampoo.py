"""``optim.name=shampoo``: the scalable Shampoo of Anil et al. 2020 (arXiv 2002.09018) as its authors
run it, checked against a direct implementation of the paper's update; its schedule (statistics
every step, inverse roots every N steps, preconditioning from a start step, the graft's update
before it); its state saved as tensors that a ``weights_only`` load accepts, resuming exactly; its
config errors; the line the run prints.
"""

from __future__ import annotations

import io
import itertools
import pickle

import pytest
import torch
import torch.nn.functional as F
from test_train_optim import TINY_MODEL
from torch import nn

import zoo
from zoo.train import ConfigError, load_config
from zoo.train.optim import authors_merged_shape, create_optimizer, graft_types, optimizer_summary


class Weights(nn.Module):
    """Bare parameter tensors."""

    def __init__(self, *shapes: tuple[int, ...]):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ws = nn.ParameterList([nn.Parameter(torch.randn(*s, generator=g)) for s in shapes])


def _shampoo(model: nn.Module, *overrides: str) -> torch.optim.Optimizer:
    cfg = load_config(None, ["optim.name=shampoo", "optim.lr=0.1", "optim.weight_decay=0", *overrides])
    return create_optimizer(model, cfg)


# ---------------------------------------------------------------------------------------------
# The update against the paper


def _inverse_root(stat: torch.Tensor, exponent: int, eps: float) -> torch.Tensor:
    """(H + eps * lambda_max(H) I)^(-1/exponent) by eigendecomposition, in float64."""
    evals, evecs = torch.linalg.eigh(stat)
    evals = evals + eps * evals.max()
    return evecs @ torch.diag(evals ** (-1.0 / exponent)) @ evecs.T


def _blocks(t: torch.Tensor, block: int) -> list[torch.Tensor]:
    """``t`` cut into blocks of at most ``block`` along every dimension (row-major order)."""
    parts = [t]
    for axis in range(t.ndim):
        parts = [piece for p in parts for piece in torch.split(p, block, dim=axis)]
    return parts


def _merge_blocks(pieces: list[torch.Tensor], shape: tuple[int, ...], block: int) -> torch.Tensor:
    out = torch.empty(shape, dtype=pieces[0].dtype)
    index = 0
    ranges = [[(s, min(s + block, n)) for s in range(0, n, block)] for n in shape]
    for corner in itertools.product(*ranges):
        out[tuple(slice(a, b) for a, b in corner)] = pieces[index]
        index += 1
    return out


class PaperShampoo:
    """Anil et al. 2020, Algorithm 1 with the paper's blocking and grafting, written from the paper:
    the gradient reshaped to its merged shape and cut into blocks; per block and per dimension k,
    H_k <- beta2 H_k + (1 - beta2) G_(k) G_(k)^T (H_k starting at eps I); the direction contracts
    each dimension of the block with H_k^(-1/(2 r)), r the number of dimensions; the whole tensor's
    direction is rescaled to the norm of the graft's (SGD: the gradient's); no momentum here."""

    def __init__(self, shape: tuple[int, ...], merged: list[int], block: int, beta2: float, eps: float):
        self.shape, self.merged, self.block, self.beta2, self.eps = shape, merged, block, beta2, eps
        cut = _blocks(torch.zeros(merged, dtype=torch.float64), block)
        self.stats = [[eps * torch.eye(n, dtype=torch.float64) for n in piece.shape] for piece in cut]

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        g = grad.double().reshape(self.merged)  # shape: the merged dimensions
        rank = len(self.merged)
        out = []
        for piece, stats in zip(_blocks(g, self.block), self.stats, strict=True):
            for k in range(rank):
                unfolded = piece.movedim(k, 0).reshape(piece.shape[k], -1)  # shape: (n_k, rest)
                stats[k].mul_(self.beta2).add_(unfolded @ unfolded.T, alpha=1 - self.beta2)
            d = piece
            for k in range(rank):
                root = _inverse_root(stats[k], 2 * rank, self.eps)
                d = torch.tensordot(d, root, dims=([0], [0]))  # dimension k contracted, moved last
            out.append(d)
        d = _merge_blocks(out, tuple(self.merged), self.block).reshape(self.shape)
        return d * (g.norm() / d.norm())


@pytest.mark.parametrize(
    "shape, block",
    [
        ((6, 4), 4),  # rows in two blocks (4 + 2): block-diagonal statistics of sizes 4 and 2
        ((4, 3, 2, 2), 8),  # a conv weight, merged to (4, 6, 2): three preconditioners
        ((20,), 8),  # a vector: full-matrix statistics in blocks of 8, 8, 4, inverse square roots
        ((8, 6), 128),  # a small matrix merged into one dimension of 48: a vector
    ],
)
def test_update_is_the_papers(shape, block):
    model = Weights(shape)
    opt = _shampoo(
        model,
        f"optim.block_size={block}",
        "optim.precondition_frequency=1",
        "optim.start_preconditioning_step=1",
    )
    for g in opt.param_groups:  # no momentum: the paper's update itself, step by step
        g["betas"], g["nesterov"] = (0.0, 0.95), False
    w = model.ws[0]
    merged = authors_merged_shape(shape, block)
    paper = PaperShampoo(shape, merged, block, beta2=0.95, eps=1e-6)
    # One dimension more (what pytorch-optimizer's own shapes make of a matrix whose first dimension
    # exceeds the block, (6, 4) -> [1, 6, 4]): other exponents, which the test must tell apart.
    wrong = PaperShampoo(shape, [1, *merged], block, beta2=0.95, eps=1e-6)
    gen = torch.Generator().manual_seed(1)
    told_apart = []
    for _ in range(4):
        w.grad = torch.randn(shape, generator=gen)
        before = w.detach().clone()
        expected = paper.direction(w.grad)
        other = wrong.direction(w.grad)
        opt.step()
        got = (before - w.detach()) / 0.1
        # the inverse roots come from a Newton iteration stopped at a 1e-3 residual
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=3e-3 * expected.abs().max().item())
        told_apart.append(bool((other - expected).abs().max() > 1e-2 * expected.abs().max()))
    assert any(told_apart), "the tolerance cannot tell the exponents apart"


def test_merged_shapes_are_the_authors_examples():
    # google-research scalable_shampoo, merge_small_dims' docstring
    assert authors_merged_shape([1, 2, 512, 1, 2048, 1, 3, 4], 1024) == [1024, 2048, 12]
    assert authors_merged_shape([1, 2, 768, 1, 2048], 1024) == [2, 768, 2048]
    assert authors_merged_shape([256, 64], 128) == [256, 64]  # pytorch-optimizer 4.1: [1, 256, 64]
    assert authors_merged_shape([1, 1], 128) == [1]
    assert authors_merged_shape([64, 32, 3, 3], 128) == [64, 96, 3]  # 64 | 32 * 3 | 3: 96 * 3 > 128


def test_matrices_get_inverse_fourth_roots_and_vectors_square_roots():
    model = Weights((256, 64), (64, 256), (32, 16, 3, 3), (256,), (64,))
    opt = _shampoo(model)
    exponents = [opt.state[p]["pre_conditioner"].exponent_for_pre_conditioner for p in model.ws]
    assert exponents == [4, 4, 6, 2, 2]  # 2 x dimensions: (256, 64), (64, 256), (32, 48, 3), vectors


# ---------------------------------------------------------------------------------------------
# The schedule


def test_roots_every_n_steps_and_the_graft_before_the_start(monkeypatch):
    """Statistics every step; inverse roots at steps N, 2N, ...; up to the start step the update is
    the graft's (SGD graft: torch's Nesterov SGD, momentum beta1 = 0.9), from it on Shampoo's."""
    from pytorch_optimizer.optimizer.utils.preconditioner import PreConditioner

    calls: dict[str, list[int]] = {"stats": [], "roots": []}
    step_now = [0]
    for method, key in (("add_statistics", "stats"), ("compute_pre_conditioners", "roots")):
        original = getattr(PreConditioner, method)

        def counted(self, *args, _original=original, _key=key):
            calls[_key].append(step_now[0])
            return _original(self, *args)

        monkeypatch.setattr(PreConditioner, method, counted)

    model = Weights((8, 6))
    reference = Weights((8, 6))
    opt = _shampoo(model, "optim.precondition_frequency=3", "optim.start_preconditioning_step=4", "optim.block_size=4")
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(2)
    for step in range(1, 8):
        step_now[0] = step
        grad = torch.randn(8, 6, generator=gen)
        model.ws[0].grad, reference.ws[0].grad = grad.clone(), grad.clone()
        opt.step()
        sgd.step()
        same = torch.allclose(model.ws[0], reference.ws[0], rtol=1e-6, atol=1e-7)
        assert same == (step < 4), f"step {step}: shampoo {'equals' if same else 'differs from'} the graft"
    assert calls["stats"] == [1, 2, 3, 4, 5, 6, 7]
    assert calls["roots"] == [3, 6]


def test_defaults_and_the_printed_line():
    cfg = load_config(None, ["optim.name=shampoo"])
    line = optimizer_summary(cfg.optim)
    assert line.startswith("shampoo (pytorch_optimizer.ScalableShampoo ")
    assert "graft sgd, blocks of 128, statistics every 1 step(s), inverse roots every 50 steps" in line
    assert "preconditioned from step 51" in line
    opt = create_optimizer(zoo.create_model("zoo_poolformer_mini_32", num_classes=10), cfg)
    assert (opt.preconditioning_compute_steps, opt.start_preconditioning_step, opt.block_size) == (50, 51, 128)
    assert opt.graft_type.name == "SGD" and opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert all(g["decoupled_weight_decay"] for g in opt.param_groups)


def test_the_run_prints_its_grafting_and_schedule(tmp_path, capsys):
    from test_train_loop import _cfg

    from zoo.train import run

    cfg = _cfg(tmp_path, "optim.name=shampoo", "optim.precondition_frequency=2", TINY_MODEL, "train.max_steps=1")
    run(cfg)
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("optimizer: ")]
    assert printed == [f"optimizer: {optimizer_summary(cfg.optim)}"]
    assert "inverse roots every 2 steps, preconditioned from step 3" in printed[0]  # N + 1 unless set


# ---------------------------------------------------------------------------------------------
# State: tensors only, exact resume, same on every process


def _train(model, opt, steps, seed):
    x = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(8) % 10
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _tiny(*overrides: str):
    cfg = load_config(None, ["optim.name=shampoo", "optim.lr=1e-2", TINY_MODEL, *overrides])
    torch.manual_seed(0)
    model = zoo.create_model(cfg.model.name, num_classes=10, in_chans=1, **cfg.model.spec)
    return cfg, model


@pytest.mark.parametrize("graft", ["sgd", "adagrad", "rmsprop"])
def test_state_is_tensors_and_resumes_exactly(graft):
    import copy

    cfg, model = _tiny(
        "optim.precondition_frequency=2", "optim.start_preconditioning_step=2", f"optim.graft_type={graft}"
    )
    opt = create_optimizer(model, cfg)
    _train(model, opt, 3, seed=0)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = copy.deepcopy(model)
    resumed = create_optimizer(resumed_model, cfg)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    _train(model, opt, 3, seed=1)  # roots at steps 4 and 6 from restored statistics
    _train(resumed_model, resumed, 3, seed=1)
    for (name, a), b in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_the_librarys_own_state_is_refused_by_a_weights_only_load():
    """Why the adapter exists: pytorch-optimizer's ScalableShampoo pickles its objects."""
    from pytorch_optimizer import ScalableShampoo

    _, model = _tiny()
    opt = ScalableShampoo(model.parameters(), lr=1e-2)
    _train(model, opt, 1, seed=0)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buffer, weights_only=True)


def test_a_state_from_another_block_size_is_refused_in_one_line():
    cfg, model = _tiny("optim.block_size=8")
    opt = create_optimizer(model, cfg)
    _train(model, opt, 1, seed=0)
    other = create_optimizer(model, load_config(None, ["optim.name=shampoo", TINY_MODEL, "optim.block_size=16"]))
    with pytest.raises(ValueError) as e:
        other.load_state_dict(opt.state_dict())
    assert "\n" not in str(e.value) and "does not match this optimizer's" in str(e.value)


def test_a_parameter_without_saved_state_gets_the_authors_shapes_on_load():
    """A state dict that lacks a parameter's state (e.g. one with no gradient yet) must not leave
    it to the library's ``init_group``, whose shapes turn a matrix's 4th roots into 6th roots."""
    model = Weights((256, 64), (64,))
    opt = _shampoo(model)
    saved = opt.state_dict()
    del saved["state"][0]
    fresh = _shampoo(model)
    fresh.load_state_dict(saved)
    w = model.ws[0]
    w.grad = torch.ones_like(w)
    fresh.step()
    assert fresh.state[w]["pre_conditioner"].exponent_for_pre_conditioner == 4


def test_steps_leave_the_global_rng_alone_and_agree_across_seeds():
    """The power iteration draws from a fixed seed (the authors' 1729): processes seeded apart
    compute the same preconditioners, and the run's own random stream is not advanced."""
    results = []
    for seed in (0, 1):
        cfg, model = _tiny("optim.precondition_frequency=1", "optim.start_preconditioning_step=1")
        opt = create_optimizer(model, cfg)
        torch.manual_seed(100 + seed)  # as set_seed(seed, device_specific=True) does per process
        before = torch.get_rng_state()
        _train(model, opt, 2, seed=0)
        assert torch.equal(torch.get_rng_state(), before)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


# ---------------------------------------------------------------------------------------------
# Config errors


def test_a_graft_the_library_lacks_is_one_line_naming_the_choices():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.name=shampoo", "optim.graft_type=adam"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("optim.graft_type: 'adam' is not a graft")
    assert f"expected one of {', '.join(graft_types())}" in msg and "rmsprop" in msg


def test_a_start_before_the_first_roots_is_one_line():
    with pytest.raises(ConfigError) as e:
        load_config(
            None, ["optim.name=shampoo", "optim.precondition_frequency=10", "optim.start_preconditioning_step=5"]
        )
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("optim.start_preconditioning_step: 5 comes before the first")
    assert "use >= 10" in msg
