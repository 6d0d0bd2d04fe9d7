"""Backends: one registered object each.

A backend turns a compiled mixer (its checked program, analysis and kernel
plan) into something that runs: `compile(mixer)` returns a runner with
`forward(bound, initial_state, return_state)`, `step(bound, state)`,
`source()`, `signature` and, where it generates code, `plan`,
`tuning_problem(...)` (its config space and cache keys) and `init_params`.
The API looks backends up by name and never compares names itself, so
adding one touches no stage before it. "auto" is triton where a CUDA device
and triton are present (CPU tensors then run on the torch backend), else torch.
"""

from __future__ import annotations

import importlib

from .errors import MixerUnsupportedError, MixerValueError

# name -> "module:attribute" of the backend object, imported on first use
BUILTIN = {"dense": "mixerc.dense:BACKEND", "torch": "mixerc.codegen.torch.backend:BACKEND",
           "triton": "mixerc.codegen.triton.backend:BACKEND"}
PLANNED: dict = {}  # name -> why it cannot be used yet
_registry: dict = {}


def register(backend) -> None:
    _registry[backend.name] = backend


def names() -> tuple:
    return ("auto",) + tuple(dict.fromkeys(list(BUILTIN) + list(_registry) + list(PLANNED)))


def resolve(name: str) -> str:
    """The backend `name` stands for ("auto": the fastest one that runs here)."""
    if name == "auto":
        return "triton" if _gpu_kernels() else "torch"
    return name


def _gpu_kernels() -> bool:
    """A CUDA device and triton: generated GPU kernels can run here."""
    import importlib.util

    import torch
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def get(name: str):
    name = resolve(name)
    if name not in _registry:
        if name in BUILTIN:
            module, attr = BUILTIN[name].split(":")
            register(getattr(importlib.import_module(module), attr))
        elif name in PLANNED:
            raise MixerUnsupportedError(f"backend {name!r}: {PLANNED[name]}")
        else:
            raise MixerValueError(f"unknown backend {name!r}; choose one of "
                                  f"{', '.join(names())}")
    return _registry[name]
