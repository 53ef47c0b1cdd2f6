"""What a study compares: arms (model, optimizer, one change or the optimizer's defaults) and the
search space every tuned arm shares.

An arm is written ``MODEL:OPTIMIZER[:FIELD=VALUE]`` (one ``model.spec`` change) or
``MODEL:OPTIMIZER@default`` (the optimizer's cited default hyper-parameters,
``zoo.train.optim.OPTIMIZER_DEFAULTS``: trained with the finals' seeds, never tuned, so a table
shows what tuning bought).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import yaml

ALIASES = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "wd": "optim.weight_decay"}
DEFAULT = "@default"


class InputError(ValueError):
    """Bad input: one line, exit 2, before any trial runs."""


@dataclass(frozen=True)
class Arm:
    model: str
    optim: str
    change: tuple[str, Any] | None = None  # one model.spec field
    default: bool = False  # the optimizer's cited defaults, untuned

    @property
    def label(self) -> str:
        change = f":{self.change[0]}={self.change[1]}" if self.change else ""
        return f"{self.model}:{self.optim}{change}" + (DEFAULT if self.default else "")

    @property
    def slug(self) -> str:  # its folder under the study's runs
        return "".join(c if c.isalnum() or c in "-_.=" else "-" for c in self.label.replace(":", "-"))

    def overrides(self) -> list[str]:
        spec = {self.change[0]: self.change[1]} if self.change else {}
        return [
            f"model.name={self.model}",
            f"optim.name={self.optim}",
            "model.spec=" + yaml.safe_dump(spec, default_flow_style=True, width=10**6).strip(),
        ]


def cited_defaults(arm: Arm) -> list[str]:
    """The ``optim.KEY=VALUE`` overrides of the arm's optimizer's cited defaults
    (``zoo.train.optim.OPTIMIZER_DEFAULTS``), or an InputError naming the optimizers that have them."""
    from zoo.train import ConfigError
    from zoo.train.optim import default_overrides

    try:
        return default_overrides(arm.optim)
    except ConfigError as e:
        raise InputError(f"--arms {arm.label}: {str(e).removeprefix('@default: ')}") from None


def parse_arms(text: str) -> list[Arm]:
    arms = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        default = item.endswith(DEFAULT)
        parts = item.removesuffix(DEFAULT).split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise InputError(f"--arms {item!r}: expected MODEL:OPTIMIZER[:FIELD=VALUE] or MODEL:OPTIMIZER@default")
        change = None
        if len(parts) == 3:
            key, sep, value = parts[2].partition("=")
            if not (sep and key and value):
                raise InputError(f"--arms {item!r}: the spec change must be FIELD=VALUE")
            change = (key, yaml.safe_load(value))
        arm = Arm(parts[0], parts[1], change, default)
        if default:
            cited_defaults(arm)  # refused here, before anything is built
        arms.append(arm)
    if not arms:
        raise InputError("--arms: no arm given")
    if len({a.label for a in arms}) < len(arms):
        raise InputError(f"--arms: an arm is given twice in {text!r}")
    return arms


@dataclass(frozen=True)
class Dim:
    """One dimension of the search space: a float config key between low and high."""

    name: str
    key: str
    low: float
    high: float
    log: bool

    def __str__(self) -> str:
        return f"{self.name}={self.low:g}:{self.high:g}:{'log' if self.log else 'linear'}"

    def value(self, u: float) -> float:
        """The point u in [0, 1) of the normalised space, to 4 significant digits."""
        v = (
            math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
            if self.log
            else self.low + u * (self.high - self.low)
        )
        return float(f"{min(max(v, self.low), self.high):.4g}")

    def unit(self, v: float) -> float:
        """The normalised coordinate of value v (the inverse of ``value``, before rounding)."""
        if self.log:
            return (math.log(v) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (v - self.low) / (self.high - self.low)


def parse_space(text: str) -> list[Dim]:
    """``NAME=LOW:HIGH[:log|linear],...``; ``none``: no search (every arm trains the recipe)."""
    if text.strip() == "none":
        return []
    dims = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, rng = item.partition("=")
        parts = rng.split(":")
        if not sep or len(parts) not in (2, 3):
            raise InputError(f"--space {item!r}: expected NAME=LOW:HIGH[:log|linear]")
        scale = parts[2] if len(parts) == 3 else "log"
        try:
            low, high = float(parts[0]), float(parts[1])
        except ValueError:
            raise InputError(f"--space {item!r}: LOW and HIGH must be numbers") from None
        if scale not in ("log", "linear"):
            raise InputError(f"--space {item!r}: scale must be log or linear, got {scale!r}")
        if not low < high:
            raise InputError(f"--space {item!r}: empty or inverted range ({low:g} to {high:g})")
        if scale == "log" and low <= 0:
            raise InputError(f"--space {item!r}: a log range must be above 0")
        key = ALIASES.get(name, name)
        if "." not in key:
            raise InputError(f"--space {name!r}: not a config key (use section.key, or one of {sorted(ALIASES)})")
        dims.append(Dim(name, key, low, high, scale == "log"))
    if not dims:
        raise InputError("--space: empty search space (write 'none' to train the recipe without a search)")
    if len({d.key for d in dims}) < len(dims):
        raise InputError(f"--space {text!r}: a key is given twice")
    return dims
