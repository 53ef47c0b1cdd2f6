"""A study's design: arms, search space, the successive-halving bracket, seeds, data, recipe.

The design is what the storage must agree with (``Plan.design``, stored with the study and
compared by every later command): a changed recipe, bracket, precision or optimizer
implementation is another study.

The bracket (synchronous successive halving, Jamieson & Talwalkar 2016; one bracket of
Hyperband, Li et al. 2018): rung k trains ``configs // eta**k`` configurations for
``min_epochs * eta**k`` epochs (the last rung: ``epochs``), each a fresh run whose schedule is
made for its own length; the best ``1/eta`` of a rung go on to the next once every run of that
rung has finished. Every tuned arm runs the same rungs at the same points, so every arm spends
the same optimizer steps whatever order its trials finish in.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo.study.arms import Arm, Dim, InputError, cited_defaults
from zoo.train import config_to_yaml, load_config

FIXED = ("log.progress=false", "log.plot=false")  # many workers share a terminal
METRICS = {"err": "top-1 error", "balanced_err": "balanced error"}


@dataclass(frozen=True)
class Bracket:
    configs: int  # configurations at the first rung
    eta: int  # each rung keeps the best 1/eta
    min_epochs: int  # the first rung's epochs
    epochs: int  # the last rung's (and the finals') epochs

    def check(self) -> None:
        """Bad input, named: one line each."""
        if self.eta < 2:
            raise InputError(f"--eta {self.eta}: must be at least 2 (each rung keeps the best 1/eta)")
        if self.epochs < 1:
            raise InputError(f"--epochs {self.epochs}: must be at least 1")
        if not 1 <= self.min_epochs <= self.epochs:
            raise InputError(
                f"--min-epochs {self.min_epochs}: the first rung's epochs must be between 1 and --epochs {self.epochs}"
            )
        last = len(self.rungs()) - 1
        if last == 0 and self.min_epochs != self.epochs:  # rungs() would train every configuration the full budget
            raise InputError(
                f"--min-epochs {self.min_epochs}: a second rung needs {self.min_epochs * self.eta} epochs, more than "
                f"--epochs {self.epochs}; give --min-epochs {self.epochs} (one rung) or at most "
                f"{self.epochs // self.eta}"
            )
        if self.configs < self.eta**last:
            raise InputError(
                f"--configs {self.configs}: too few for the bracket's first rung: {last + 1} rungs at eta "
                f"{self.eta} ({', '.join(str(e) for _, e in self.rungs())} epochs) need at least "
                f"{self.eta**last} configurations so that one reaches the last rung"
            )

    def rungs(self) -> list[tuple[int, int]]:
        """(configurations, epochs) of every rung, first to last."""
        top = math.floor(math.log(self.epochs / self.min_epochs, self.eta) + 1e-9) if self.eta >= 2 else 0
        return [
            (self.configs // self.eta**k, self.min_epochs * self.eta**k if k < top else self.epochs)
            for k in range(top + 1)
        ]

    def __str__(self) -> str:
        return " -> ".join(f"{n} x {e} ep" for n, e in self.rungs())


@dataclass
class Plan:
    """The design of one study and where it runs."""

    arms: list[Arm]
    dims: list[Dim]
    bracket: Bracket
    seeds: int
    data: str
    recipe: str | None  # the base config file (None: the default)
    sets: list[str]
    holdout: float
    tune_seed: int
    qmc_seed: int
    metric: str  # the tuning metric: "err" or "balanced_err"
    study: str
    runs: Path
    baseline: str
    precision: str | None = None  # pinned when the study is created (Studies), then passed to every run

    def tuned(self, arm: Arm) -> bool:
        """Whether the arm runs the bracket (default arms and an empty space train fixed values)."""
        return bool(self.dims) and not arm.default

    def points(self) -> list[dict[str, float]]:
        """Slot n -> the params of the n-th point of the scrambled Sobol sequence (every arm's)."""
        if not self.dims:
            return [{}]
        from scipy.stats import qmc

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # balance properties want a power of 2: noted, not needed
            u = qmc.Sobol(len(self.dims), scramble=True, rng=self.qmc_seed).random(self.bracket.configs)
        return [{d.name: d.value(float(x)) for d, x in zip(self.dims, row)} for row in u]

    def values(self, arm: Arm, params: dict[str, float]) -> list[str]:
        """The overrides that set an arm's point: the tuned one, or the optimizer's cited defaults."""
        if arm.default:
            return cited_defaults(arm)
        return [f"{d.key}={params[d.name]:.6e}" for d in self.dims]

    def final_seeds(self) -> list[int]:
        """Fresh seeds: every tuning trial trains with ``tune_seed``."""
        return [self.tune_seed + 1 + i for i in range(self.seeds)]

    def config(self, arm: Arm, values: list[str], *, seed: int, holdout: float, epochs: int, name: str):
        over = [
            f"data.dataset={self.data}",
            *FIXED,
            *self.sets,
            *arm.overrides(),
            f"train.epochs={epochs}",
            f"data.holdout={holdout}",
            f"seed={seed}",
            f"name={name}",
            f"output_dir={self.runs / self.study / arm.slug}",
        ]
        if self.precision is not None:
            over.append(f"train.precision={self.precision}")
        return load_config(self.recipe, [*over, *values])

    def resolve_precision(self) -> str:
        """``train.precision`` of the recipe, ``auto`` resolved on this machine (done once per study)."""
        import torch

        from zoo.machine import describe, resolve_precision

        cfg = self.config(
            self.arms[0], self.values(self.arms[0], self.points()[0]), seed=0, holdout=0, epochs=1, name="x"
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an emulated bf16 is warned about by the runs themselves
            return resolve_precision(cfg.train.precision, describe(), device)[0]

    def design(self) -> dict[str, Any]:
        from zoo.train.optim import describe_optimizer

        configs, optimizers = {}, {}
        for arm in self.arms:  # the resolved recipe, wherever the runs go
            cfg = self.config(
                arm,
                self.values(arm, self.points()[0]),
                seed=self.tune_seed,
                holdout=self.holdout,
                epochs=self.bracket.epochs,
                name="x",
            )
            text = config_to_yaml(cfg).replace(str(self.runs / self.study / arm.slug), "RUNS")
            configs[arm.label] = hashlib.sha256(text.encode()).hexdigest()[:16]
            optimizers[arm.label] = describe_optimizer(cfg.optim)
        design = {
            "arms": [a.label for a in self.arms],
            "space": [str(d) for d in self.dims],
            "bracket": {
                "configs": self.bracket.configs,
                "eta": self.bracket.eta,
                "min_epochs": self.bracket.min_epochs,
                "epochs": self.bracket.epochs,
            },
            "metric": self.metric,
            "seeds": self.seeds,
            "data": self.data,
            "holdout": self.holdout,
            "tune_seed": self.tune_seed,
            "qmc_seed": self.qmc_seed,
            "sets": self.sets,
            "precision": self.precision,
            "config": configs,
            "optimizer": optimizers,
        }
        return json.loads(json.dumps(design, default=str))


PER_ARM = ("arms", "config", "optimizer")  # design keys that hold one entry per arm


def diff(saved: dict, design: dict) -> str:
    """The first key on which two designs differ, said in one line: the study-wide keys (bracket,
    sets, ...) first, then an arm both hold (its resolved recipe's hash, its optimizer), so that a
    command adding arms is told which stored arm changed, then the list of arms."""
    keys = sorted(set(saved) | set(design))
    arms = [a for a in saved.get("arms") or [] if a in (design.get("arms") or [])]
    ordered = [
        *((k, saved.get(k), design.get(k)) for k in keys if k not in PER_ARM),
        *(
            (f"{k} of {a}", (saved.get(k) or {}).get(a), (design.get(k) or {}).get(a))
            for k in PER_ARM[1:]
            for a in arms
        ),
        *((k, saved.get(k), design.get(k)) for k in keys),
    ]
    return next(
        (f"{k}: {json.dumps(a)[:200]} in the storage, {json.dumps(b)[:200]} here" for k, a, b in ordered if a != b), "?"
    )


def added_arms(saved: dict, design: dict) -> list[str] | None:
    """The arms ``design`` adds to ``saved``, or None when it changes anything else.

    Adding arms keeps the design: every arm's budget is the same bracket at the same points of the
    same space, so an arm tuned later is tuned as it would have been with the others; the stored
    arms must keep their exact recipes and optimizers, or their trials would mix designs.
    """
    if set(saved) != set(design) or any(saved[k] != design[k] for k in design if k not in PER_ARM):
        return None
    if not set(saved["arms"]) <= set(design["arms"]):
        return None
    if any(saved[k][a] != design[k].get(a) for k in PER_ARM[1:] for a in saved["arms"]):
        return None
    return [a for a in design["arms"] if a not in saved["arms"]] or None  # a reordering is not an addition
