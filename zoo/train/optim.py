"""Optimizers by name (``optim.name``), DeiT's weight-decay rule for all of them, and the learning
rate as a pure function of the step.

``OPTIMIZERS`` below is the whole catalogue: for each name, the factory (which library builds it),
the hyper-parameters fixed here and where their values come from, and which ``optim.*`` config
fields the optimizer reads (setting any other per-optimizer field is a config error, so that a
value never silently does nothing). Every optimizer applies DeiT's rule -- no weight decay on 1-d
params (norms, biases, layer scales) nor on ``model.no_weight_decay()`` names (class/distillation
tokens, position embeddings) when ``optim.no_decay_on_1d`` -- through timm's own code: timm's
factory for its optimizers (``filter_bias_and_bn``), ``timm.optim.param_groups_weight_decay``
for the others, with the same arguments timm's factory passes.

Layer-wise lr decay (``optim.layer_decay``, BEiT's fine-tuning rule, also DeiT III's and
ConvNeXt's): timm's factory with ``layer_decay=`` for its optimizers,
``timm.optim.param_groups_layer_decay`` (the call that factory makes) for the others. The layers
are the model's ``group_matcher`` (stem, blocks, head); each group carries ``lr_scale`` =
``layer_decay ** (num_layers - 1 - layer)``, which the loop applies with every lr it sets
(``g["lr"] = lr_at(step) * g.get("lr_scale", 1.0)``), on top of DeiT's weight-decay rule.

Libraries, and why:

* adamw, sgd, lamb, lion, kron (PSGD-Kron): timm's factory (``timm.optim.create_optimizer_v2``),
  as the DeiT/RSB recipes use. Kron is built ``deterministic=True``: otherwise it draws its
  probe vectors from the global torch RNG, which every process of a multi-process run seeds
  differently (``set_seed(seed, device_specific=True)``), so the processes' preconditioners, and
  then their weights, would drift apart; with it the draws come from Kron's own generator, whose
  state is in ``state_dict()`` (``rng_state``).
* soap, shampoo, sm3: pytorch-optimizer (``pytorch_optimizer``). heavyball 3.2 implements SOAP
  too (it has no plain Shampoo, only KL-Shampoo, and no SM3), so SOAP was timed both ways: one
  optimizer step on zoo_poolformer_mini_32 (batch 64 at 32x32, gradients recomputed before each
  step and not timed), same hyper-parameters (lr 3e-3, betas (0.95, 0.95), shampoo_beta 0.95,
  precondition_frequency 10, no dimension merging, heavyball's precondition schedule off),
  ``torch.set_num_threads(1)``, both in one process, alternating, 30 steps each after 12 warm-up
  steps; CPU "AMD EPYC" (lscpu), ``torch.backends.cpu.get_cpu_capability()`` AVX512, torch 2.14.1,
  pytorch-optimizer 4.1.0, heavyball 3.2.1. heavyball eager (``heavyball.utils.compile_mode =
  None``): median 184 ms against pytorch-optimizer's 139 ms, 1.32x slower (paired per-step
  ratio 1.33x; means 242 / 171 ms). heavyball as shipped (torch.compile, mode
  "max-autotune-no-cudagraphs"), in a second run of the same script: median 271 ms against
  209 ms, 1.30x slower (paired 1.31x), after a 17-minute compile on this (shared, 2-core)
  machine. pytorch-optimizer is the choice: it is already a dependency, and heavyball loses
  either way on this CPU (so heavyball is not added to setup.cfg).
* muon: ``torch.optim.Muon`` on the 2-D weight matrices of the backbone's blocks, ``torch.optim.
  AdamW`` on everything else (stem/patch embeddings, head, norms, biases, layer scales, tokens,
  position embeddings), as Keller Jordan's post and torch's own Muon docs prescribe. Muon's
  learning rate is matched to AdamW's the Moonlight way (Liu et al. 2025, "Muon is Scalable for
  LLM Training", arXiv 2502.16982: scale each matrix's update by 0.2 * sqrt(max(A, B)), torch's
  ``adjust_lr_fn="match_rms_adamw"``), which lets Muon reuse the lr and weight decay tuned for
  AdamW: its groups carry ``lr_scale`` 1.0 relative to the configured lr (the loop sets
  ``g["lr"] = lr_at(step) * g.get("lr_scale", 1.0)``). The two are one optimizer for the loop
  through ``CombinedOptimizer`` (why our own: below).

What a step costs here (same CPU, one run, the optimizers interleaved, 1 thread, median of 10
steps after 3, zoo_poolformer_mini_32 at batch 64), as a multiple of that model's forward+backward:
sgd 0.02x, lion and adamw 0.06x, lamb 0.09x, sm3 0.10x, muon 0.21x, soap 0.9x, kron 2.6x (eager,
timm's update-every-step phase), shampoo 10x (every param's inverse roots by SVD at every step,
its default; ``optim.precondition_frequency`` spaces them out).

Why no ``timm.scheduler`` object: a scheduler is state that has to be stepped the right number
of times, saved and restored -- and Accelerate steps a *prepared* scheduler once per process.
A pure function ``lr_at(step)`` of the optimizer step and the config has no state at all, so a
resumed run (or a run on N processes) cannot drift from an uninterrupted one. The formula is
timm's ``CosineLRScheduler`` (``warmup_prefix=False``, one cycle, the form DeiT uses), so
``schedule.update: epoch`` reproduces DeiT's per-epoch values exactly.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from .config import OptimConfig, TrainConfig
from .strict import ConfigError

__all__ = [
    "MUON_LR_SCALE",
    "OPTIMIZERS",
    "CombinedOptimizer",
    "OptimizerSpec",
    "create_optimizer",
    "lr_at",
    "muon_param_sets",
    "peak_lr",
    "per_optimizer_fields",
]


def peak_lr(cfg: TrainConfig) -> float:
    """The configured learning rate, or DeiT's linear scaling rule ``base_lr * batch / lr_base_batch``."""
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    return cfg.optim.base_lr * cfg.train.batch_size / cfg.optim.lr_base_batch


# ---------------------------------------------------------------------------------------------
# Factories: (model, lr, cfg.optim, keyword arguments) -> optimizer

Factory = Callable[[nn.Module, float, OptimConfig, dict[str, Any]], torch.optim.Optimizer]


def _timm(opt: str) -> Factory:
    """timm's factory, which applies DeiT's rule itself (``filter_bias_and_bn``)."""

    def build(model: nn.Module, lr: float, o: OptimConfig, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
        return create_optimizer_v2(
            model,
            opt=opt,
            lr=lr,
            weight_decay=o.weight_decay,
            filter_bias_and_bn=o.no_decay_on_1d,
            layer_decay=o.layer_decay,
            **kwargs,
        )

    return build


def _kron(model: nn.Module, lr: float, o: OptimConfig, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """timm's Kron, eager on the CPU. timm wraps Kron's four tensor functions in ``torch.compile``
    (``Kron._init_fns``), and inductor compiles them anew for every parameter shape: measured here,
    the first 4 steps of zoo_poolformer_mini_32 took 202 s on the CPU, compiling. Compiled and
    eager are each deterministic, so a run and its resume (same device) compute the same."""
    opt = _timm("kron")(model, lr, o, kwargs)
    if all(p.device.type == "cpu" for g in opt.param_groups for p in g["params"]):
        from timm.optim import kron

        for fn in ("_calc_A_and_conjB", "_q_terms", "_precond_grad", "_balance_Q"):
            setattr(opt, fn, getattr(kron, fn))
    return opt


def _decay_groups(model: nn.Module, o: OptimConfig) -> list[dict[str, Any]]:
    """DeiT's rule, and with ``optim.layer_decay`` the layer-wise lr scales, as timm's
    ``create_optimizer_v2`` builds them from a model (same calls, same arguments)."""
    no_weight_decay = getattr(model, "no_weight_decay", lambda: set())()
    if o.layer_decay is not None:
        return param_groups_layer_decay(
            model,
            weight_decay=o.weight_decay,
            layer_decay=o.layer_decay,
            no_weight_decay_list=no_weight_decay,
            weight_decay_exclude_1d=o.no_decay_on_1d,
        )
    return param_groups_weight_decay(
        model,
        weight_decay=o.weight_decay,
        weight_decay_exclude_1d=o.no_decay_on_1d,
        no_weight_decay_list=no_weight_decay,
    )


def _load(path: str) -> type:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _checked_kwargs(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    # pytorch-optimizer's classes take **kwargs and ignore what they do not know: a misspelt
    # hyper-parameter in the table would silently do nothing.
    known = inspect.signature(cls).parameters
    unknown = sorted(k for k in kwargs if k not in known)
    if unknown:
        raise TypeError(f"{cls.__name__} has no parameter(s) {unknown}")
    return kwargs


def _grouped(path: str) -> Factory:
    """A class from another library, given timm's weight-decay param groups."""

    def build(model: nn.Module, lr: float, o: OptimConfig, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
        cls = _load(path)
        return cls(_decay_groups(model, o), lr=lr, **_checked_kwargs(cls, kwargs))

    return build


def _sm3(model: nn.Module, lr: float, o: OptimConfig, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """SM3 has no weight decay (Anil et al. 2019; pytorch-optimizer's ``SM3`` takes none and would
    ignore a group's ``weight_decay``). Without it ``optim.weight_decay`` and DeiT's rule would do
    nothing for sm3, so each step first applies AdamW's decoupled decay ``p *= 1 - lr * wd`` to the
    params of each group (pytorch-optimizer's own ``apply_weight_decay``, as its SOAP does)."""
    from pytorch_optimizer import SM3

    class SM3W(SM3):
        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:  # the loss at the params before this step, as for any optimizer
                with torch.enable_grad():
                    loss = closure()
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        self.apply_weight_decay(
                            p, p.grad, g["lr"], g["weight_decay"], weight_decouple=True, fixed_decay=False
                        )
            super().step()
            return loss

    return SM3W(_decay_groups(model, o), lr=lr, **_checked_kwargs(SM3, kwargs))


# Muon's learning rate relative to the configured (AdamW) one: 1.0 with the Moonlight matching above.
MUON_LR_SCALE = 1.0


def muon_param_sets(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's params, AdamW's params): the 2-D weights inside the backbone's ``Block`` modules,
    and everything else (embeddings/stem, head, norms, biases, layer scales, tokens)."""
    from zoo.models import Block

    in_blocks = {id(p) for m in model.modules() if isinstance(m, Block) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    muon = [p for p in params if p.ndim == 2 and id(p) in in_blocks]
    ids = {id(p) for p in muon}
    return muon, [p for p in params if id(p) not in ids]


def _muon(model: nn.Module, lr: float, o: OptimConfig, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    muon_ids = {id(p) for p in muon_param_sets(model)[0]}
    if not muon_ids:
        raise ConfigError(
            f"optim.name: muon needs 2-D weight matrices in the zoo backbone's blocks; "
            f"{type(model).__name__} has none (use another optimizer for it)"
        )
    muon_groups, adamw_groups = [], []
    for g in _decay_groups(model, o):  # DeiT's rule (and layer decay) first, then the split: both halves keep it
        mats = [p for p in g["params"] if id(p) in muon_ids]
        rest = [p for p in g["params"] if id(p) not in muon_ids]
        if mats:
            muon_groups.append({**g, "params": mats, "lr_scale": g.get("lr_scale", 1.0) * MUON_LR_SCALE})
        if rest:
            adamw_groups.append({**g, "params": rest})
    adamw_kwargs = {k: kwargs.pop(f"adamw_{k}") for k in ("betas", "eps")}
    parts = {"muon": torch.optim.Muon(muon_groups, lr=lr * MUON_LR_SCALE, **kwargs)}
    if adamw_groups:
        parts["adamw"] = torch.optim.AdamW(adamw_groups, lr=lr, **adamw_kwargs)
    return CombinedOptimizer(parts)


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers, each over its own params, stepped as one.

    Why our own: torch's Muon docs step a Muon and an AdamW side by side, and the loop (and
    Accelerate's ``prepare``/``save_state``) holds one optimizer. timm's ``Muon`` folds an AdamW
    fallback into its own class, but it is timm's Muon, not torch's; heavyball's ``SplitOpt`` keeps
    param groups of its own, so an lr set on them never reaches the parts. Here ``param_groups``
    are the parts' own group dicts (so ``g["lr"] = ...`` reaches them), and the state dict is the
    parts' state dicts by name (tensors and plain containers only, as ``torch.load(weights_only=
    True)`` wants). ``Optimizer.__init__`` is not called: the parts own the groups and the state
    (so there are no step hooks on the combination; register them on a part).
    """

    def __init__(self, parts: Mapping[str, torch.optim.Optimizer]):
        self.parts = dict(parts)
        self.defaults: dict[str, Any] = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.parts.values() for g in opt.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, Any]:  # a read-only view of the parts' states
        return {p: s for opt in self.parts.values() for p, s in opt.state.items()}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.parts.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": {name: opt.state_dict() for name, opt in self.parts.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["parts"]
        if saved.keys() != self.parts.keys():
            raise ValueError(f"optimizer state holds parts {sorted(saved)}, this optimizer has {sorted(self.parts)}")
        for name, opt in self.parts.items():
            opt.load_state_dict(saved[name])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError("add a param group to one of CombinedOptimizer.parts")

    def __getstate__(self) -> dict[str, Any]:  # Optimizer's would pickle the views, not the parts
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={type(v).__name__}' for k, v in self.parts.items())})"


# ---------------------------------------------------------------------------------------------
# The catalogue


def _kw(name: str, convert: Callable[[Any], Any] = lambda v: v) -> Callable[[Any], dict[str, Any]]:
    return lambda v: {name: convert(v)}


_BETAS_EPS = {"betas": _kw("betas", tuple), "eps": _kw("eps")}


def _every(n: int) -> float:
    """Kron's update probability for an update every ``n``-th step: Kron updates when its counter
    reaches ``1 / p``, and ``1 / (1 / n)`` rounds above ``n`` for some n (49, 98, ...), which would
    make it every (n+1)-th; the next float up from ``1 / n`` gives exactly ``n`` (checked to 1e5)."""
    return math.nextafter(1.0 / n, 2.0)


@dataclass(frozen=True)
class OptimizerSpec:
    factory: Factory
    # Hyper-parameters fixed here (beyond lr and weight decay), each from ``source``.
    defaults: Mapping[str, Any]
    source: str
    # optim.* fields this optimizer reads -> the keyword argument(s) they become. A field left
    # None (precondition_frequency) keeps the optimizer's default from ``defaults``/the library.
    reads: Mapping[str, Callable[[Any], dict[str, Any]]] = field(default_factory=dict)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(
        _timm("adamw"),
        {},
        reads=_BETAS_EPS,
        source="torch.optim.AdamW via timm; Loshchilov & Hutter 2019. optim.betas (0.9, 0.999) and optim.eps "
        "1e-8 default to torch's defaults, which DeiT uses",
    ),
    "sgd": OptimizerSpec(
        _timm("sgd"),
        {},
        reads={"momentum": _kw("momentum"), "nesterov": _kw("nesterov")},
        source="torch.optim.SGD via timm ('sgd' = Nesterov); optim.momentum 0.9 and optim.nesterov true "
        "default to timm's factory defaults (momentum 0.9, nesterov for 'sgd')",
    ),
    "lamb": OptimizerSpec(
        _timm("lamb"),
        {},
        reads=_BETAS_EPS,
        source="timm.optim.Lamb; You et al. 2020. betas (0.9, 0.999) as timm; optim.eps defaults to 1e-8 "
        "(timm's Lamb default is 1e-6, which configs/rsb_a3_resnet50_imagenet.yaml sets)",
    ),
    "lion": OptimizerSpec(
        _timm("lion"),
        {"betas": (0.9, 0.99)},
        source="timm.optim.Lion; Chen et al. 2023 ('Symbolic Discovery of Optimization Algorithms'): "
        "betas (0.9, 0.99), the paper's default and timm's. The paper advises an lr 3-10x lower and "
        "a weight decay 3-10x higher than AdamW's",
    ),
    "kron": OptimizerSpec(
        _kron,
        {"deterministic": True},
        reads={"momentum": _kw("momentum"), "precondition_frequency": _kw("preconditioner_update_probability", _every)},
        source="timm.optim.Kron (PSGD-Kron; Li 2015/2018, Evan Walters' kron_torch). momentum 0.9 (timm's), "
        "precond_lr 0.1, precond_init_scale 1.0, max_size_triangular 2048: timm's defaults; "
        "preconditioner update probability: timm's schedule (every step for 500 steps, annealed to 0.03 "
        "by ~4000) unless optim.precondition_frequency N (every N-th step). deterministic: see above",
    ),
    "soap": OptimizerSpec(
        _grouped("pytorch_optimizer.SOAP"),
        {
            "betas": (0.95, 0.95),
            "shampoo_beta": None,
            "eps": 1e-8,
            "precondition_frequency": 10,
            "max_precondition_dim": 10000,
            "merge_dims": False,
            "precondition_1d": False,
            "correct_bias": True,
        },
        reads={"precondition_frequency": _kw("precondition_frequency")},
        source="pytorch_optimizer.SOAP; Vyas et al. 2024 ('SOAP: Improving and Stabilizing Shampoo using Adam', "
        "official README: betas (0.95, 0.95), precondition_frequency 10), pytorch-optimizer's defaults "
        "likewise (shampoo_beta None = beta2, eps 1e-8, max_precondition_dim 10000, no dimension "
        "merging, 1-d params Adam in the original basis); decoupled weight decay",
    ),
    "shampoo": OptimizerSpec(
        _grouped("pytorch_optimizer.Shampoo"),
        {"momentum": 0.0, "preconditioning_compute_steps": 1, "matrix_eps": 1e-6, "weight_decouple": True},
        reads={"precondition_frequency": _kw("preconditioning_compute_steps")},
        source="pytorch_optimizer.Shampoo; Gupta, Koren & Singer 2018 ('Shampoo: Preconditioned Stochastic Tensor "
        "Optimization'): statistics initialised to 1e-6 * I, inverse roots recomputed every step, no "
        "momentum: pytorch-optimizer's defaults. weight_decouple True (the library's default is L2) so "
        "that optim.weight_decay is decoupled decay as for adamw, lion, soap and muon",
    ),
    "sm3": OptimizerSpec(
        _sm3,
        {"momentum": 0.0, "beta": 0.0, "eps": 1e-30},
        source="pytorch_optimizer.SM3; Anil, Gupta, Koren & Singer 2019 ('Memory-Efficient Adaptive "
        "Optimization'): momentum 0, beta 0 (accumulated squares, as AdaGrad), eps 1e-30: "
        "pytorch-optimizer's defaults; plus decoupled weight decay (_sm3). SM3, like "
        "AdaGrad, wants a larger lr than AdamW (the library's default is 0.1)",
    ),
    "muon": OptimizerSpec(
        _muon,
        {
            "momentum": 0.95,
            "nesterov": True,
            "ns_steps": 5,
            "ns_coefficients": (3.4445, -4.7750, 2.0315),
            "eps": 1e-7,
            "adjust_lr_fn": "match_rms_adamw",
        },
        reads={"betas": _kw("adamw_betas", tuple), "eps": _kw("adamw_eps")},
        source="torch.optim.Muon + torch.optim.AdamW. Muon: Keller Jordan 2024 (kellerjordan.github.io/posts/muon): "
        "momentum 0.95, Nesterov, 5 Newton-Schulz steps with coefficients (3.4445, -4.7750, 2.0315), "
        "= torch's defaults; Moonlight's lr matching (adjust_lr_fn 'match_rms_adamw', lr_scale 1.0). "
        "The AdamW part reads optim.betas and optim.eps, as adamw does",
    ),
}


def create_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optim.name`` over ``model``'s params, with DeiT's weight-decay rule when
    ``optim.no_decay_on_1d`` (see the module docstring and ``OPTIMIZERS``)."""
    o = cfg.optim
    spec = OPTIMIZERS[o.name]
    kwargs = dict(spec.defaults)
    for name, to_kwargs in spec.reads.items():
        value = getattr(o, name)
        if value is not None:
            kwargs.update(to_kwargs(value))
    return spec.factory(model, peak_lr(cfg), o, kwargs)


def per_optimizer_fields() -> Iterable[str]:
    """The optim.* fields that only some optimizers read (OptimConfig.validate checks them)."""
    return sorted({f for spec in OPTIMIZERS.values() for f in spec.reads})


def lr_at(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Learning rate for the update that follows ``step`` completed optimizer steps."""
    s, peak, epochs = cfg.schedule, peak_lr(cfg), cfg.train.epochs
    t = step / steps_per_epoch  # progress in epochs
    if s.update == "epoch":
        t = float(math.floor(t))  # DeiT steps timm's scheduler once per epoch
    if t < s.warmup_epochs:
        return s.warmup_lr + t * (peak - s.warmup_lr) / s.warmup_epochs
    if s.name == "constant":
        return peak
    if t >= epochs:
        return s.min_lr
    return s.min_lr + 0.5 * (peak - s.min_lr) * (1.0 + math.cos(math.pi * t / epochs))
