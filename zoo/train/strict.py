"""One generic, strict loader from plain dicts (YAML) into (nested) dataclasses.

Why a loader of our own rather than OmegaConf/Hydra/dacite: we need exactly three behaviours and
nothing else -- an unknown key, a wrong type and an out-of-range value are each a one-line error
that names the dotted key and suggests the nearest valid key or value -- and the rules fit in
this file. The loader knows nothing about training: it walks ``dataclasses.fields`` and the
resolved type hints, so it serves the data side's frozen ``DataConfig``/``AugmentConfig`` as well
as the training configs.

Supported annotations: ``bool``, ``int``, ``float``, ``str``, ``None``, ``Any``, ``Literal[...]``,
``Optional``/``Union``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``, ``dict[str, X]`` and
nested dataclasses. Ranges are declared on the field (``field(metadata=bounds(ge=0))``) and checked
here; cross-field rules live in a dataclass's ``validate()`` which raises ``ValueError("field: msg")``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, Union

import yaml

from ..names import suggest

__all__ = ["ConfigError", "apply_overrides", "bounds", "flat_keys", "from_dict", "to_dict"]


class ConfigError(ValueError):
    """A config problem, reported as one line (the CLI prints it and exits 2)."""


def bounds(
    *, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> dict:
    """Field metadata declaring a numeric range: ``field(default=0.1, metadata=bounds(ge=0, le=1))``."""
    return {"bounds": {"ge": ge, "gt": gt, "le": le, "lt": lt}}


# PyYAML implements YAML 1.1, where ``5e-4`` (no dot) is a *string*; a float field accepts it.
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?(inf|nan)$", re.IGNORECASE)


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(_fmt(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        args = typing.get_args(tp)
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _suggest_key(word: str, prefix: str, fields: list[str], root: type) -> str:
    """The ``" (did you mean 'KEY'?)"`` of an unknown key ``prefix + word``: the nearest field beside it,
    else the dotted key anywhere in ``root`` whose last part is nearest (``lr`` -> ``optim.lr``)."""
    leaves: dict[str, str] = {}
    for k in flat_keys(root):
        leaves.setdefault(k.rsplit(".", 1)[-1], k)  # the shallowest key with that leaf name
    return suggest(word, fields, shown_as={f: prefix + f for f in fields}) or suggest(
        word.rsplit(".", 1)[-1], leaves, shown_as=leaves
    )


def flat_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted keys of a dataclass tree (``['name', 'optim.lr', ...]``), for suggestions."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        out.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(flat_keys(hints[f.name], key + "."))
    return out


def _convert(value: Any, tp: Any, key: str, root: type) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (lists->tuples, dicts->dataclasses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {_fmt(value)}")
        return from_dict(tp, value, prefix=key + ".", root=root)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {_fmt(value)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        raise ConfigError(
            f"{key}: {_fmt(value)} is not one of {', '.join(_fmt(a) for a in allowed)}"
            + suggest(str(value), [str(a) for a in allowed])
        )
    if origin in (Union, types.UnionType):
        members = typing.get_args(tp)
        # Try exact-type members first, so that `bool | str` keeps `True` a bool.
        errors = []
        for member in members:
            try:
                return _convert(value, member, key, root)
            except ConfigError as e:
                errors.append(e)
        # One member that is a structured type gives the more useful message (e.g. a bad Literal).
        structured = [
            e
            for e, m in zip(errors, members)
            if m is not type(None) and (typing.get_origin(m) is Literal or dataclasses.is_dataclass(m))
        ]
        if len(structured) == 1:
            raise structured[0]
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_fmt(value)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_fmt(value)}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items ({_type_name(tp)}), got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]", root) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]", root) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_fmt(value)}")
        k_tp, v_tp = typing.get_args(tp) or (Any, Any)
        return {_convert(k, k_tp, key, root): _convert(v, v_tp, f"{key}.{k}", root) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{key}: the strict loader does not support annotation {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {_fmt(value)}")


def _check_bounds(value: Any, spec: dict, key: str) -> None:
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    ge, gt, le, lt = spec["ge"], spec["gt"], spec["le"], spec["lt"]
    ok = (
        (ge is None or value >= ge)
        and (gt is None or value > gt)
        and (le is None or value <= le)
        and (lt is None or value < lt)
    )
    if ok:
        return
    parts = [
        f">= {ge}" if ge is not None else None,
        f"> {gt}" if gt is not None else None,
        f"<= {le}" if le is not None else None,
        f"< {lt}" if lt is not None else None,
    ]
    rule = " and ".join(p for p in parts if p)
    nearest = None  # only closed bounds have a nearest valid value
    if ge is not None and value < ge:
        nearest = ge
    elif le is not None and value > le:
        nearest = le
    msg = f"{key}: {_fmt(value)} is out of range (must be {rule})"
    raise ConfigError(msg + (f"; nearest valid value: {nearest}" if nearest is not None else ""))


def from_dict(cls: type, data: dict | None, *, prefix: str = "", root: type | None = None) -> Any:
    """Build dataclass ``cls`` from ``data``, strictly. Missing keys take the field defaults."""
    root = root or cls
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_fmt(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            raise ConfigError(f"unknown key '{prefix}{k}'" + _suggest_key(str(k), prefix, list(fields), root))
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if (
                dataclasses.is_dataclass(hints[name])
                and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            ):
                kwargs[name] = from_dict(hints[name], {}, prefix=f"{prefix}{name}.", root=root)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing key '{prefix}{name}'")
            continue
        value = _convert(data[name], hints[name], prefix + name, root)
        if "bounds" in f.metadata:
            _check_bounds(value, f.metadata["bounds"], prefix + name)
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
        if hasattr(obj, "validate"):
            obj.validate()
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        # The data side's (and our) convention: ValueError("field: message").
        raise ConfigError(f"{prefix}{e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain YAML-safe structures (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (value parsed as YAML) onto a raw config dict, in place.

    Unknown keys are not judged here: the strict loader sees the merged dict and names them.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise ConfigError(f"{key}: cannot parse value {raw!r} as YAML ({first})") from None
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return data
