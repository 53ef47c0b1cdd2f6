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
* soap, shampoo, shampoo_plain, sm3: pytorch-optimizer (``pytorch_optimizer``), the one library
  that has all of them (heavyball 3.2 has SOAP, but of Shampoo only KL-Shampoo, and no SM3), so that
  they share one implementation of the common parts; heavyball is not a dependency.
* shampoo: pytorch-optimizer's ``ScalableShampoo``, the Shampoo of Anil et al. 2020 ("Scalable
  Second Order Optimization for Deep Learning", arXiv 2002.09018) as its authors run it: layer-wise
  grafting (the update takes the direction of Shampoo and the per-layer magnitude of a simpler
  optimizer), block-diagonal preconditioners, statistics every step, inverse roots every
  ``optim.precondition_frequency`` steps from ``optim.start_preconditioning_step`` on. Its defaults
  and their sources are ``OPTIMIZERS["shampoo"]``. Three things differ from the library as shipped,
  each where it departs from the authors' code (google-research ``scalable_shampoo``): the shape
  interpretation (``authors_merged_shape``), the power iteration's start vector (a fixed seed,
  ``_scalable_shampoo_class``), and the state dict: the library keeps a preconditioner and a
  graft object per parameter, which a ``weights_only`` load refuses, so they are saved as their
  tensors and rebuilt on load, and a resume is exact.
  ``shampoo_plain`` is pytorch-optimizer's plain ``Shampoo`` (Gupta et al. 2018: no grafting, one
  full preconditioner per dimension, inverse roots by SVD at every step by default).
* muon: ``torch.optim.Muon`` on the 2-D weight matrices of the backbone's blocks, ``torch.optim.
  AdamW`` on everything else (stem/patch embeddings, head, norms, biases, layer scales, tokens,
  position embeddings), as Keller Jordan's post and torch's own Muon docs prescribe. Muon's
  learning rate is matched to AdamW's the Moonlight way (Liu et al. 2025, "Muon is Scalable for
  LLM Training", arXiv 2502.16982: scale each matrix's update by 0.2 * sqrt(max(A, B)), torch's
  ``adjust_lr_fn="match_rms_adamw"``), which lets Muon reuse the lr and weight decay tuned for
  AdamW: its groups carry ``lr_scale`` 1.0 relative to the configured lr (the loop sets
  ``g["lr"] = lr_at(step) * g.get("lr_scale", 1.0)``). The two are one optimizer for the loop
  through ``CombinedOptimizer`` (why our own: below).

What a step of each costs, as a multiple of the default model's forward+backward:
``python -m zoo.bench optim`` writes it to ``zoo/bench/results/optim_steps*.md`` (one file per CPU kind).

Why no ``timm.scheduler`` object: a scheduler is state that has to be stepped the right number
of times, saved and restored -- and Accelerate steps a *prepared* scheduler once per process.
A pure function ``lr_at(step)`` of the optimizer step and the config has no state at all, so a
resumed run (or a run on N processes) cannot drift from an uninterrupted one. The formula is
timm's ``CosineLRScheduler`` (``warmup_prefix=False``, one cycle, the form DeiT uses), so
``schedule.update: epoch`` reproduces DeiT's per-epoch values exactly.
"""

from __future__ import annotations

import enum
import functools
import importlib
import importlib.metadata
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
    "OPTIMIZER_DEFAULTS",
    "CombinedOptimizer",
    "Defaults",
    "OptimizerSpec",
    "authors_merged_shape",
    "check_shampoo_fields",
    "create_optimizer",
    "default_overrides",
    "describe_optimizer",
    "graft_types",
    "lr_at",
    "muon_param_sets",
    "optimizer_summary",
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
    (``Kron._init_fns``), and inductor compiles them anew for every parameter shape, so on the CPU
    the first steps of a small model are spent compiling for minutes. Compiled and eager are each
    deterministic, so a run and its resume (same device) compute the same."""
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


def graft_types() -> list[str]:
    """The graft names ``optim.graft_type`` accepts: pytorch-optimizer's ``LayerWiseGrafting``, lower-case."""
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    return [g.name.lower() for g in LayerWiseGrafting]


def _scalable_shampoo(model: nn.Module, lr: float, o: OptimConfig, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """pytorch-optimizer's ``ScalableShampoo`` over timm's weight-decay groups, each parameter's
    state built here (``_new_shampoo_state``) and saved as tensors."""
    from pytorch_optimizer import ScalableShampoo
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    kwargs = {**kwargs, "graft_type": LayerWiseGrafting[kwargs["graft_type"].upper()]}
    opt = _scalable_shampoo_class()(_decay_groups(model, o), lr=lr, **_checked_kwargs(ScalableShampoo, kwargs))
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p].update(_new_shampoo_state(opt, p, group["betas"][1]))  # init_group then skips p
    return opt


def authors_merged_shape(shape: Iterable[int], max_dim: int) -> list[int]:
    """Shampoo's shape interpretation as its authors wrote it (google-research scalable_shampoo,
    ``merge_small_dims``): neighbouring dimensions are merged while their product stays within
    ``max_dim`` (the block size), e.g. a conv weight (64, 32, 3, 3) -> [64, 96, 3] at 128
    (64; 32 * 3 = 96; 96 * 3 > 128, so the last 3 stands alone).

    Why our own: pytorch-optimizer 4.1's ``merge_small_dims`` prepends a dimension of size 1 to
    any shape whose first dimension exceeds ``max_dim`` ((256, 64) -> [1, 256, 64]), which turns
    the inverse 4th roots of a matrix into 6th roots (the exponent is 2 x the number of
    dimensions), and returns [1] for any vector of at most ``max_dim`` elements."""
    shape = list(shape)
    if shape and all(d == 1 for d in shape):
        return [1]
    merged, product = [], 1
    for d in shape:
        if product * d <= max_dim:
            product *= d
        else:
            if product > 1:
                merged.append(product)
            product = d
    if product > 1:
        merged.append(product)
    return merged


def _new_shampoo_state(opt: torch.optim.Optimizer, p: torch.Tensor, beta2: float) -> dict[str, Any]:
    """One parameter's ScalableShampoo state, as ``ScalableShampoo.init_group`` builds it but for the
    authors' shape interpretation (``authors_merged_shape``) and their preconditioning of vectors.

    The library preconditions tensors of two or more (merged) dimensions only; the authors' code
    gives a vector (a bias, a norm's scale, or a small tensor merged into one dimension) its full
    n x n statistics (in blocks) and their inverse square roots (exponent 2 x one dimension). Here a
    vector is viewed as (n, 1) and preconditioned on its first dimension only (the library's
    ``PreConditionerType.INPUT``), which is that."""
    from pytorch_optimizer.optimizer.shampoo import PreConditioner, build_graft
    from pytorch_optimizer.optimizer.utils.partition import PreConditionerType

    merged = authors_merged_shape(p.shape, opt.block_size) if opt.shape_interpretation else list(p.shape)
    vector = len(merged) == 1 and merged != [1] and opt.pre_conditioner_type == PreConditionerType.ALL
    pre_conditioner = PreConditioner(
        # shape: merged dimensions, e.g. (64, 32, 3, 3) -> (64, 96, 3) at 128; a vector (n,) -> (n, 1)
        var=p.detach().reshape([*merged, 1] if vector else merged),
        beta2=beta2,
        inverse_exponent_override=opt.inverse_exponent_override,
        block_size=opt.block_size,
        skip_preconditioning_rank_lt=opt.skip_preconditioning_rank_lt,
        no_preconditioning_for_layers_with_dim_gt=opt.no_preconditioning_for_layers_with_dim_gt,
        shape_interpretation=False,  # done above
        pre_conditioner_type=PreConditionerType.INPUT if vector else opt.pre_conditioner_type,
        matrix_eps=opt.matrix_eps,
        use_svd=opt.use_svd,
    )
    pre_conditioner.original_shape = p.shape  # it returns the preconditioned gradient in p's shape
    return {
        "momentum": torch.zeros_like(p, memory_format=torch.preserve_format),
        "pre_conditioner": pre_conditioner,
        "graft": build_graft(p, opt.graft_type, opt.diagonal_eps),
    }


# ScalableShampoo keeps, per parameter, a ``PreConditioner`` and a ``Graft`` object in its state;
# torch.load(weights_only=True) (Accelerate's load_state) refuses such objects. In a saved state
# each object becomes the tensors it holds (the rest of it follows from the parameter and the
# hyper-parameters); a load builds fresh objects (``_new_shampoo_state``) and puts the tensors
# back, unconverted (torch's own load would cast them to the parameter's dtype).
_SHAMPOO_TENSORS = {
    "pre_conditioner": ("statistics", "pre_conditioners"),
    "graft": ("momentum", "statistics"),  # SGD/SQRTN/NONE grafts hold momentum only
}


_POWER_ITERATION_SEED = 1729  # the authors' (google-research scalable_shampoo, power_iteration)


@functools.cache
def _scalable_shampoo_class() -> type:
    """``ScalableShampoo`` with its power iteration seeded as the authors' and a state dict of
    tensors only (a subclass rather than torch's state-dict hooks: pytorch-optimizer's
    ``load_state_dict`` rebuilds each state from the saved keys after torch's load and its hooks)."""
    from pytorch_optimizer import ScalableShampoo

    class ScalableShampooTensorState(ScalableShampoo):
        @torch.no_grad()
        def step(self, closure: Callable[[], Any] | None = None) -> Any:
            """The library's step, its random draws from a fixed seed: the power iteration that
            scales the inverse roots' ridge starts from ``torch.randn``, i.e. the global RNG, which
            each process of a multi-process run seeds differently (their preconditioners, then
            weights, would drift apart) and which the step would advance. The authors' code starts
            it from a fixed vector (``np.random.RandomState(1729)``); here each step's draws
            come from that seed, and the global RNG is left as it was."""
            loss = None
            if closure is not None:  # outside the fork: the closure's randomness is the run's
                with torch.enable_grad():
                    loss = closure()
            cuda = sorted({p.device.index or 0 for g in self.param_groups for p in g["params"] if p.is_cuda})
            with torch.random.fork_rng(devices=cuda, device_type="cuda"):
                torch.random.default_generator.manual_seed(_POWER_ITERATION_SEED)
                for index in cuda:
                    torch.cuda.default_generators[index].manual_seed(_POWER_ITERATION_SEED)
                super().step()
            return loss

        def state_dict(self) -> dict[str, Any]:
            state_dict = super().state_dict()
            packed = {}
            for index, st in state_dict["state"].items():
                flat = {k: v for k, v in st.items() if k not in _SHAMPOO_TENSORS}
                for key, attrs in _SHAMPOO_TENSORS.items():
                    for attr in attrs:
                        if hasattr(st[key], attr):
                            flat[f"{key}.{attr}"] = getattr(st[key], attr)  # a tensor or a list of tensors
                packed[index] = flat
            return {**state_dict, "state": packed}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            saved = state_dict["state"]
            super().load_state_dict(
                {**state_dict, "state": {i: {k: v for k, v in st.items() if "." not in k} for i, st in saved.items()}}
            )
            saved_params = [i for g in state_dict["param_groups"] for i in g["params"]]
            params = [(p, g["betas"][1]) for g in self.param_groups for p in g["params"]]
            for index, (p, beta2) in zip(saved_params, params, strict=True):  # torch's own index mapping
                if index in saved:
                    self._restore_objects(p, beta2, saved[index])
                else:  # no saved state: a fresh one as the factory builds it, not init_group's shapes
                    self.state[p].update(_new_shampoo_state(self, p, beta2))

        def _restore_objects(self, p: torch.Tensor, beta2: float, saved: dict[str, Any]) -> None:
            fresh = _new_shampoo_state(self, p, beta2)
            for key, attrs in _SHAMPOO_TENSORS.items():
                for attr in attrs:
                    if hasattr(fresh[key], attr):
                        tensors = _same_layout(getattr(fresh[key], attr), saved[f"{key}.{attr}"], p, f"{key}.{attr}")
                        setattr(fresh[key], attr, tensors)
                self.state[p][key] = fresh[key]

    return ScalableShampooTensorState


def _same_layout(fresh: Any, saved: Any, p: torch.Tensor, what: str) -> Any:
    """``saved`` on ``p``'s device, after checking it has the layout of the freshly built ``fresh``."""
    if isinstance(fresh, torch.Tensor) and isinstance(saved, torch.Tensor) and fresh.shape == saved.shape:
        return saved.to(p.device)
    if isinstance(fresh, list) and isinstance(saved, list) and len(fresh) == len(saved):
        return [_same_layout(f, s, p, what) for f, s in zip(fresh, saved, strict=True)]
    raise ValueError(
        f"optimizer state: shampoo's {what} for a parameter of shape {list(p.shape)} does not match this "
        f"optimizer's (was it saved with another optim.block_size or graft_type?)"
    )


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
    by_part = _split_kwargs(OPTIMIZERS["muon"].parts, kwargs)
    parts = {"muon": torch.optim.Muon(muon_groups, lr=lr * MUON_LR_SCALE, **by_part["muon"])}
    if adamw_groups:
        parts["adamw"] = torch.optim.AdamW(adamw_groups, lr=lr, **by_part["adamw"])
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
    # The class(es) the factory builds, by part name (one part but for muon). With several parts,
    # a keyword argument "<part>_<name>" goes to that part as <name>, the others to the first part.
    parts: Mapping[str, str]
    # optim.* fields this optimizer reads -> the keyword argument(s) they become. A field left
    # None (precondition_frequency) keeps the optimizer's default from ``defaults``/the library.
    reads: Mapping[str, Callable[[Any], dict[str, Any]]] = field(default_factory=dict)
    via_timm: bool = False  # built by timm's factory (which adds its own defaults)
    changed_here: str = ""  # what the factory changes in the library's class (said in its description)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(
        _timm("adamw"),
        {},
        parts={"adamw": "torch.optim.AdamW"},
        via_timm=True,
        reads=_BETAS_EPS,
        source="torch.optim.AdamW via timm; Loshchilov & Hutter 2019. optim.betas (0.9, 0.999) and optim.eps "
        "1e-8 default to torch's defaults, which DeiT uses",
    ),
    "sgd": OptimizerSpec(
        _timm("sgd"),
        {},
        parts={"sgd": "torch.optim.SGD"},
        via_timm=True,
        reads={"momentum": _kw("momentum"), "nesterov": _kw("nesterov")},
        source="torch.optim.SGD via timm ('sgd' = Nesterov); optim.momentum 0.9 and optim.nesterov true "
        "default to timm's factory defaults (momentum 0.9, nesterov for 'sgd')",
    ),
    "lamb": OptimizerSpec(
        _timm("lamb"),
        {},
        parts={"lamb": "timm.optim.Lamb"},
        via_timm=True,
        reads=_BETAS_EPS,
        source="timm.optim.Lamb; You et al. 2020. betas (0.9, 0.999) as timm; optim.eps defaults to 1e-8 "
        "(timm's Lamb default is 1e-6, which configs/rsb_a3_resnet50_imagenet.yaml sets)",
    ),
    "lion": OptimizerSpec(
        _timm("lion"),
        {"betas": (0.9, 0.99)},
        parts={"lion": "timm.optim.Lion"},
        via_timm=True,
        source="timm.optim.Lion; Chen et al. 2023 ('Symbolic Discovery of Optimization Algorithms'): "
        "betas (0.9, 0.99), the paper's default and timm's. The paper advises an lr 3-10x lower and "
        "a weight decay 3-10x higher than AdamW's",
    ),
    "kron": OptimizerSpec(
        _kron,
        {"deterministic": True},
        parts={"kron": "timm.optim.kron.Kron"},
        via_timm=True,
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
        parts={"soap": "pytorch_optimizer.SOAP"},
        reads={"precondition_frequency": _kw("precondition_frequency")},
        source="pytorch_optimizer.SOAP; Vyas et al. 2024 ('SOAP: Improving and Stabilizing Shampoo using Adam', "
        "official README: betas (0.95, 0.95), precondition_frequency 10), pytorch-optimizer's defaults "
        "likewise (shampoo_beta None = beta2, eps 1e-8, max_precondition_dim 10000, no dimension "
        "merging, 1-d params Adam in the original basis); decoupled weight decay",
    ),
    "shampoo": OptimizerSpec(
        _scalable_shampoo,
        {
            "graft_type": "sgd",
            "block_size": 128,
            "betas": (0.9, 0.95),
            "nesterov": True,
            "preconditioning_compute_steps": 50,
            "start_preconditioning_step": 51,
            "statistics_compute_steps": 1,
            "no_preconditioning_for_layers_with_dim_gt": 4096,
            "decoupled_weight_decay": True,
        },
        parts={"shampoo": "pytorch_optimizer.ScalableShampoo"},
        changed_here="the authors' shape interpretation, vectors preconditioned, power iteration seeded 1729, "
        "state saved as tensors",
        reads={
            "graft_type": _kw("graft_type"),
            "block_size": _kw("block_size"),
            # N also moves the default start to N + 1 (the first step after the first roots, as
            # praxis pairs them); optim.start_preconditioning_step, read next, overrides it.
            "precondition_frequency": lambda n: {
                "preconditioning_compute_steps": n,
                "start_preconditioning_step": n + 1,
            },
            "start_preconditioning_step": _kw("start_preconditioning_step"),
        },
        source="pytorch_optimizer.ScalableShampoo; Anil, Gupta, Koren, Regan & Singer 2020 ('Scalable Second "
        "Order Optimization for Deep Learning', arXiv 2002.09018), as the authors' own configs set it "
        "(google/praxis praxis/optimizers.py, DistributedShampoo): graft sgd, block_size 128, betas "
        "(0.9, 0.95), Nesterov, statistics every step: its HParamsImageClassification; inverse roots "
        "every 50 steps, preconditioned from step 51: its HParamsLanguageModeling schedule (its "
        "default is every 100 from 101; the library's, every 1000 from 25, would leave a run of a few "
        "thousand steps mostly on the graft's direction; every step, the image config's, pays every "
        "inverse root at every step: what a step of each costs is zoo/bench/results/optim_steps*.md). "
        "Roots by coupled Newton iteration, diagonal_eps 1e-10 and matrix_eps 1e-6: the library's "
        "defaults, = the authors' distributed_shampoo's (praxis: diagonal_epsilon 1e-16); dimensions "
        "above 4096 not preconditioned: the authors' and praxis's skip_preconditioning_dim_size_gt "
        "(the library's is 8192). decoupled_weight_decay True so that optim.weight_decay "
        "is decoupled decay as for adamw, lion, soap and muon",
    ),
    "shampoo_plain": OptimizerSpec(
        _grouped("pytorch_optimizer.Shampoo"),
        {"momentum": 0.0, "preconditioning_compute_steps": 1, "matrix_eps": 1e-6, "weight_decouple": True},
        parts={"shampoo_plain": "pytorch_optimizer.Shampoo"},
        reads={"precondition_frequency": _kw("preconditioning_compute_steps")},
        source="pytorch_optimizer.Shampoo; Gupta, Koren & Singer 2018 ('Shampoo: Preconditioned Stochastic Tensor "
        "Optimization'): no grafting, one preconditioner per dimension, statistics initialised to "
        "1e-6 * I, inverse roots (SVD) recomputed every step, no momentum: pytorch-optimizer's "
        "defaults. weight_decouple True (the library's default is L2) so that optim.weight_decay is "
        "decoupled decay as for adamw, lion, soap and muon",
    ),
    "sm3": OptimizerSpec(
        _sm3,
        {"momentum": 0.0, "beta": 0.0, "eps": 1e-30},
        parts={"sm3": "pytorch_optimizer.SM3"},
        changed_here="decoupled weight decay",
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
        parts={"muon": "torch.optim.Muon", "adamw": "torch.optim.AdamW"},
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
    return OPTIMIZERS[cfg.optim.name].factory(model, peak_lr(cfg), cfg.optim, _resolved_kwargs(cfg.optim))


def _resolved_kwargs(o: OptimConfig) -> dict[str, Any]:
    """The keyword arguments the factory gets: the table's fixed values, then the optim.* fields read."""
    spec = OPTIMIZERS[o.name]
    kwargs = dict(spec.defaults)
    for name, to_kwargs in spec.reads.items():
        value = getattr(o, name)
        if value is not None:
            kwargs.update(to_kwargs(value))
    return kwargs


def _split_kwargs(parts: Mapping[str, str], kwargs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``OptimizerSpec.parts``' rule: "<part>_<name>" goes to that (non-first) part, the rest to the first."""
    first, *others = parts
    by_part: dict[str, dict[str, Any]] = {part: {} for part in parts}
    for key, value in kwargs.items():
        part = next((q for q in others if key.startswith(f"{q}_")), first)
        by_part[part][key.removeprefix(f"{part}_") if part != first else key] = value
    return by_part


# ---------------------------------------------------------------------------------------------
# What a run trains with, said out loud and fingerprinted


def _version(module_path: str) -> str:
    return importlib.metadata.version(module_path.split(".")[0])


def _plain(value: Any) -> Any:
    """A JSON value: enums by name, tuples as lists, dtypes and callables by name."""
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "__qualname__", None) or str(value)


def _library_arguments(path: str, via_timm: bool, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Every keyword argument of the class at ``path`` as the factory resolves it: the class's
    defaults, timm's factory defaults where timm builds it, the table's and the config's values.
    lr and weight_decay are the config's (``describe_optimizer``'s top level)."""
    cls = _load(path)
    skip = {"self", "params", "lr", "weight_decay"}
    resolved = {
        name: p.default
        for name, p in inspect.signature(cls).parameters.items()
        if name not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    if via_timm:  # as timm's OptimizerRegistry.create_optimizer adds them (setdefault: ours win)
        info = _timm_info(cls)
        resolved.update(info.defaults or {})
        if info.has_momentum:
            resolved["momentum"] = inspect.signature(create_optimizer_v2).parameters["momentum"].default
    resolved.update(kwargs)
    return _plain(resolved)


def _timm_info(cls: type) -> Any:
    """timm's registry entry (``OptimInfo``) that builds ``cls``."""
    from timm.optim import get_optimizer_info

    name = next(n for n, spec in OPTIMIZERS.items() if spec.via_timm and _load(spec.parts[n]) is cls)
    return get_optimizer_info(name)


def describe_optimizer(o: OptimConfig) -> dict[str, Any]:
    """What ``optim.name`` trains with, JSON-serialisable: the implementation (class, library and
    version) and every hyper-parameter the factory resolves, so that a study's design fingerprint
    changes when either does."""
    spec = OPTIMIZERS[o.name]
    implementation = " + ".join(f"{path} {_version(path)}" for path in spec.parts.values())
    if spec.via_timm:
        from_timm = all(path.startswith("timm.") for path in spec.parts.values())
        implementation += " via timm's factory" if from_timm else f" via timm {_version('timm')}"
    if spec.changed_here:
        implementation += f" with {spec.changed_here}"
    common: dict[str, Any] = {"lr": o.lr}
    if o.lr is None:  # DeiT's scaling rule
        common.update(base_lr=o.base_lr, lr_base_batch=o.lr_base_batch)
    common.update(
        weight_decay=o.weight_decay, no_decay_on_1d=o.no_decay_on_1d, layer_decay=o.layer_decay, clip_grad=o.clip_grad
    )
    by_part = _split_kwargs(spec.parts, _resolved_kwargs(o))
    return {
        "name": o.name,
        "implementation": implementation,
        "hyper_parameters": common,
        "library_arguments": {
            part: _library_arguments(path, spec.via_timm, by_part[part]) for part, path in spec.parts.items()
        },
    }


def optimizer_summary(o: OptimConfig) -> str:
    """One line for the run's log: the implementation, and for shampoo its grafting and schedule."""
    d = describe_optimizer(o)
    line = f"{o.name} ({d['implementation']})"
    if o.name == "shampoo":
        a = d["library_arguments"]["shampoo"]
        line += (
            f": graft {a['graft_type']}, blocks of {a['block_size']}, statistics every "
            f"{a['statistics_compute_steps']} step(s), inverse roots every {a['preconditioning_compute_steps']} "
            f"steps, preconditioned from step {a['start_preconditioning_step']} (before: the graft's update)"
        )
    return line


def check_shampoo_fields(o: OptimConfig) -> None:
    """One-line errors (ValueError "key: ...", OptimConfig.validate) for shampoo's own fields."""
    if o.graft_type is not None and o.graft_type not in graft_types():
        raise ValueError(
            f"graft_type: {o.graft_type!r} is not a graft pytorch-optimizer's ScalableShampoo has; "
            f"expected one of {', '.join(graft_types())}"
        )
    if o.name == "shampoo":
        kwargs = _resolved_kwargs(o)
        every, start = kwargs["preconditioning_compute_steps"], kwargs["start_preconditioning_step"]
        if start < every:
            raise ValueError(
                f"start_preconditioning_step: {start} comes before the first inverse roots (step {every}, "
                f"precondition_frequency), so those steps would be preconditioned by the identity; use >= {every}"
            )


# ---------------------------------------------------------------------------------------------
# Default hyper-parameters (a study's MODEL:OPTIMIZER@default arm)


@dataclass(frozen=True)
class Defaults:
    """An optimizer's default hyper-parameters as ``optim.*`` config values, and where they come from.

    ``library``: the class whose own defaults these are (a test compares them), None where the
    source is a paper."""

    values: Mapping[str, Any]
    source: str
    library: str | None = None


OPTIMIZER_DEFAULTS: dict[str, Defaults] = {
    "adamw": Defaults(
        {"optim.lr": 1e-3, "optim.weight_decay": 1e-2, "optim.betas": (0.9, 0.999), "optim.eps": 1e-8},
        "torch.optim.AdamW's defaults (Loshchilov & Hutter 2019, 'Decoupled Weight Decay Regularization', "
        "with Adam's betas and eps from Kingma & Ba 2015)",
        library="torch.optim.AdamW",
    ),
    "sgd": Defaults(
        {"optim.lr": 0.1, "optim.weight_decay": 1e-4, "optim.momentum": 0.9, "optim.nesterov": False},
        "He et al. 2016 ('Deep Residual Learning for Image Recognition', arXiv 1512.03385, section 3.4): "
        "SGD, momentum 0.9, weight decay 1e-4, lr 0.1 at batch 256 (torch's SGD has no meaningful lr default)",
    ),
    "lamb": Defaults(
        {"optim.lr": 1e-3, "optim.weight_decay": 1e-2, "optim.betas": (0.9, 0.999), "optim.eps": 1e-6},
        "timm.optim.Lamb's defaults (You et al. 2020, 'Large Batch Optimization for Deep Learning')",
        library="timm.optim.Lamb",
    ),
    "lion": Defaults(
        {"optim.lr": 1e-4, "optim.weight_decay": 0.0},
        "timm.optim.Lion's defaults (Chen et al. 2023, 'Symbolic Discovery of Optimization Algorithms': "
        "betas (0.9, 0.99); an lr 3-10x below AdamW's)",
        library="timm.optim.Lion",
    ),
    "kron": Defaults(
        {"optim.lr": 1e-3, "optim.weight_decay": 0.0, "optim.momentum": 0.9},
        "timm.optim.Kron's defaults (PSGD-Kron: Li 2018; Evan Walters' kron_torch)",
        library="timm.optim.kron.Kron",
    ),
    "soap": Defaults(
        {"optim.lr": 3e-3, "optim.weight_decay": 1e-2},
        "pytorch_optimizer.SOAP's defaults, = the official SOAP README's (Vyas et al. 2024, arXiv 2409.11321)",
        library="pytorch_optimizer.SOAP",
    ),
    "shampoo": Defaults(
        {"optim.lr": 1e-3, "optim.weight_decay": 0.0},
        "pytorch_optimizer.ScalableShampoo's defaults (weight decay 0 as the authors' distributed_shampoo); "
        "grafting and schedule: OPTIMIZERS['shampoo']",
        library="pytorch_optimizer.ScalableShampoo",
    ),
    "shampoo_plain": Defaults(
        {"optim.lr": 1e-3, "optim.weight_decay": 0.0},
        "pytorch_optimizer.Shampoo's defaults (Gupta, Koren & Singer 2018)",
        library="pytorch_optimizer.Shampoo",
    ),
    "sm3": Defaults(
        {"optim.lr": 0.1, "optim.weight_decay": 0.0},
        "pytorch_optimizer.SM3's default lr; SM3 has no weight decay (Anil et al. 2019, 'Memory-Efficient "
        "Adaptive Optimization'), so none",
        library="pytorch_optimizer.SM3",
    ),
    "muon": Defaults(
        {"optim.lr": 1e-3, "optim.weight_decay": 0.1},
        "torch.optim.Muon's defaults (lr 1e-3, weight decay 0.1, as Moonlight's (Liu et al. 2025, arXiv "
        "2502.16982) for both its Muon and AdamW parts); the AdamW part keeps torch's betas and eps",
        library="torch.optim.Muon",
    ),
}


def _yaml_value(value: Any) -> str:
    """``value`` as an override's right-hand side (read back as YAML)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(_yaml_value(v) for v in value)}]"
    return repr(value)


def default_overrides(name: str) -> list[str]:
    """``optim.*=value`` overrides (beside ``optim.name=name``) that train ``name`` with its cited defaults."""
    if name not in OPTIMIZER_DEFAULTS:
        from zoo.names import suggest

        raise ConfigError(
            f"@default: optimizer {name!r} has no cited defaults{suggest(name, OPTIMIZER_DEFAULTS)}; "
            f"those that do: {', '.join(sorted(OPTIMIZER_DEFAULTS))}"
        )
    return [f"{k}={_yaml_value(v)}" for k, v in OPTIMIZER_DEFAULTS[name].values.items()]


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
