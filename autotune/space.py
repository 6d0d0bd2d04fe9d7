"""Config spaces that templates declare: named knobs with a finite set of values.

A space is data (names, value lists, defaults) plus constraints, which are
plain callables `(config, shape) -> bool` living in the template. Only the data
part is serialized and fingerprinted: a cached config is always re-checked
against the current constraints before use, so constraints need not be part of
the cache key.

    space = ConfigSpace({"M.chunk": Choice([16, 32, 64, 128, 256], default=64)},
                        constraints=[lambda cfg, shape: cfg["M.chunk"] <= max(16, shape["T"])])
    space.configs({"T": 100})   # [{'M.chunk': 16}, {'M.chunk': 32}, {'M.chunk': 64}]
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from typing import Callable, Iterable

from ..errors import MixerValueError

Config = dict
Constraint = Callable[[dict, dict], bool]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_SCALARS = (bool, int, float, str)
MAX_CONFIGS = 100_000  # enumerating more than this means the template needs a smaller space


def canonical_json(obj) -> str:
    """The one JSON spelling used for hashing (sorted keys, no spaces, ASCII)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def same_value(a, b) -> bool:
    """Equality that keeps True apart from 1 and 64 apart from 64.0."""
    return type(a) is type(b) and a == b


class Choice:
    """One knob: an ordered list of JSON scalars and the default among them.

    Order matters: the budgeted search treats neighbours in the list as
    neighbouring values (so list chunk sizes in increasing order)."""

    def __init__(self, values: Iterable, default=None):
        values = list(values)
        if not values:
            raise MixerValueError("Choice needs at least one value")
        kinds = {type(v) for v in values}
        if len(kinds) != 1 or kinds.pop() not in _SCALARS:
            raise MixerValueError(f"Choice values must be JSON scalars of one type, got {values!r}")
        if any(isinstance(v, float) and v != v for v in values):
            raise MixerValueError("Choice values cannot be NaN")
        if len({canonical_json(v) for v in values}) != len(values):
            raise MixerValueError(f"Choice values repeat: {values!r}")
        if default is None:
            default = values[0]
        if not any(same_value(default, v) for v in values):
            raise MixerValueError(f"default {default!r} is not one of {values!r}")
        self.values = tuple(values)
        self.default = default

    def index(self, value) -> int | None:
        for i, v in enumerate(self.values):
            if same_value(v, value):
                return i
        return None

    def to_json(self) -> dict:
        return {"values": list(self.values), "default": self.default}

    def __repr__(self) -> str:
        return f"Choice({list(self.values)!r}, default={self.default!r})"


class ConfigSpace:
    def __init__(self, params: dict, constraints: Iterable[Constraint] = ()):
        for name, choice in params.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise MixerValueError(f"bad config knob name {name!r} (use e.g. 'M.chunk')")
            if not isinstance(choice, Choice):
                raise MixerValueError(f"knob {name!r} must be a Choice, got {choice!r}")
        self.params = dict(sorted(params.items()))
        self.constraints = list(constraints)

    # ------------------------------------------------------------ enumeration
    def size(self) -> int:
        n = 1
        for c in self.params.values():
            n *= len(c.values)
        return n

    def allowed(self, config: dict, shape: dict) -> bool:
        try:
            return all(bool(c(config, shape)) for c in self.constraints)
        except Exception:  # a constraint that cannot evaluate a config rules it out
            return False

    def configs(self, shape: dict) -> list:
        """Every config the constraints allow for `shape`, in a stable order."""
        if self.size() > MAX_CONFIGS:
            raise MixerValueError(f"config space has {self.size()} points (> {MAX_CONFIGS}); "
                                  "declare fewer values per knob")
        names = list(self.params)
        out = []
        for values in itertools.product(*(c.values for c in self.params.values())):
            cfg = dict(zip(names, values))
            if self.allowed(cfg, shape):
                out.append(cfg)
        return out

    def default(self, shape: dict) -> dict:
        """The declared defaults; if the constraints rule them out for this shape,
        the allowed config nearest to them (fewest list steps away)."""
        cfg = {n: c.default for n, c in self.params.items()}
        if self.allowed(cfg, shape):
            return cfg
        candidates = self.configs(shape)
        if not candidates:
            raise MixerValueError(f"no config of this template fits shape {shape}")

        def distance(c):
            return sum(abs(p.index(c[n]) - p.index(p.default)) for n, p in self.params.items())
        return min(candidates, key=distance)

    # ------------------------------------------------------------ checking
    def validate(self, obj, shape: dict | None = None) -> dict:
        """`obj` as a config of this space, or MixerValueError: it must be a dict
        with exactly the declared knobs, each one of its declared values (same
        JSON type), and, when `shape` is given, allowed by the constraints."""
        if not isinstance(obj, dict):
            raise MixerValueError(f"a config must be a dict, got {type(obj).__name__}")
        unknown = sorted(str(k)[:40] for k in obj if k not in self.params)
        if unknown:
            raise MixerValueError(f"unknown config knob(s) {', '.join(unknown)}")
        missing = [n for n in self.params if n not in obj]
        if missing:
            raise MixerValueError(f"config lacks knob(s) {', '.join(missing)}")
        for name, choice in self.params.items():
            if choice.index(obj[name]) is None:
                raise MixerValueError(f"{name}={_short(obj[name])} is not one of "
                                      f"{list(choice.values)}")
        cfg = {n: obj[n] for n in self.params}
        if shape is not None and not self.allowed(cfg, shape):
            raise MixerValueError(f"config {cfg} is not allowed for shape {shape}")
        return cfg

    def neighbours(self, config: dict) -> list:
        """Configs one list step away in one knob (for local refinement)."""
        out = []
        for name, choice in self.params.items():
            i = choice.index(config[name])
            for j in (i - 1, i + 1):
                if 0 <= j < len(choice.values):
                    out.append({**config, name: choice.values[j]})
        return out

    # ------------------------------------------------------------ composition, identity
    def merge(self, other: "ConfigSpace") -> "ConfigSpace":
        """The product space (a mixer with several matrices tunes each one's knobs)."""
        clash = sorted(set(self.params) & set(other.params))
        if clash:
            raise MixerValueError(f"config spaces share knob(s) {', '.join(clash)}")
        return ConfigSpace({**self.params, **other.params},
                           self.constraints + other.constraints)

    def to_json(self) -> dict:
        return {"params": {n: c.to_json() for n, c in self.params.items()}}

    @classmethod
    def from_json(cls, obj) -> "ConfigSpace":
        """The data part of a space (no constraints), from `to_json` output."""
        if not isinstance(obj, dict) or set(obj) != {"params"} or not isinstance(obj["params"], dict):
            raise MixerValueError("a config space is {'params': {name: {'values', 'default'}}}")
        params = {}
        for name, c in obj["params"].items():
            if not isinstance(c, dict) or set(c) != {"values", "default"} \
                    or not isinstance(c["values"], list) or len(c["values"]) > 1024:
                raise MixerValueError(f"bad knob {_short(name)} in config space")
            params[name] = Choice(c["values"], default=c["default"])
        return cls(params)

    def fingerprint(self) -> str:
        """sha256 of the knob names and value lists. Defaults and constraints are
        left out on purpose: they change which configs are tried first or
        allowed, not what a measured config means."""
        data = {n: list(c.values) for n, c in self.params.items()}
        return hashlib.sha256(canonical_json(data).encode()).hexdigest()

    def __repr__(self) -> str:
        return f"ConfigSpace({self.params!r}, constraints={len(self.constraints)})"


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def config_label(config: dict) -> str:
    """'M.chunk=64 M.warps=4' for tables and notes."""
    return " ".join(f"{k}={v}" for k, v in config.items()) or "(no knobs)"
