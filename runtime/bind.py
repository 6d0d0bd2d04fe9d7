"""Bind call arguments to a mixer's declared shapes, with errors that name the
offending tensor. Imported by every backend and by generated modules, so it
depends on torch and the standard library only.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

try:
    from mixerc.errors import MixerShapeError, MixerValueError
except ImportError:  # inside a standalone module written by `mixerc compile`
    class MixerShapeError(ValueError):
        pass

    class MixerValueError(ValueError):
        pass


@dataclass(frozen=True)
class Signature:
    """What a mixer takes, as plain data (embeddable in generated code)."""

    name: str
    dims: tuple            # ((name, fixed size or None, divides or None), ...)
    inputs: tuple          # ((name, (dims...)), ...) token tensors [batch, time, *dims]
    params: tuple          # ((name, (dims...)), ...)
    kernels: tuple         # ((name, (dims...)), ...) passed as [L, *dims]
    outs: tuple            # ((name, (dims...)), ...)

    @property
    def groups(self) -> dict:
        return {n: d for n, _, d in self.dims if d}


@dataclass
class Bound:
    """Arguments after checking: tensors by name plus every dim's size."""

    inputs: dict
    params: dict
    kernels: dict
    sizes: dict
    batch: int
    time: int | None       # None for a decode step
    dtype: torch.dtype
    device: torch.device
    origin: dict = field(default_factory=dict)  # dim -> which argument fixed it


class _Lead(str):
    """The label of a leading axis (batch, time, a kernel's taps): a str that
    never equals a dim of the same name."""

    def __eq__(self, other):
        return isinstance(other, _Lead) and str.__eq__(self, other)

    def __hash__(self):
        return hash(("lead", str(self)))

    @property
    def name(self) -> str:
        return str(self)


BATCH, TIME, TAPS = _Lead("batch"), _Lead("time"), _Lead("L")


def _fmt(dims, sizes) -> str:
    return "[" + ", ".join(str(sizes.get(d, d)) for d in dims) + "]"


_FINITE: dict = {}  # id(tensor) -> (weakref, version) of params already checked


def _known_finite(t) -> bool:
    """A param checked before and not modified since (its version counter moves
    on every in-place update, e.g. an optimizer step): decode steps then pay
    for the check once, not per token."""
    seen = _FINITE.get(id(t))
    return seen is not None and seen[0]() is t and seen[1] == t._version


def _remember_finite(t) -> None:
    if len(_FINITE) > 4096:  # forget tensors that are gone
        for key in [k for k, (ref, _) in _FINITE.items() if ref() is None]:
            del _FINITE[key]
    try:
        _FINITE[id(t)] = (weakref.ref(t), t._version)
    except TypeError:  # not weak-referenceable: just check it every time
        pass


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler and compiler.is_compiling())


def bind(sig: Signature, kwargs: dict, *, step: bool = False, check_finite=False,
         varlen: bool = False) -> Bound:
    """Check and bind call arguments. check_finite: True checks every tensor for
    NaN/Inf, "params" only params and kernels (small: the torch backend's default)."""
    known = {n for n, _ in sig.inputs + sig.params + sig.kernels}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise MixerValueError(
            f"{sig.name}: unknown argument{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
            f"it takes inputs {_names(sig.inputs)}, params {_names(sig.params)}"
            + (f", kernels {_names(sig.kernels)}" if sig.kernels else ""))
    missing = [n for n, _ in sig.inputs + sig.params + sig.kernels if n not in kwargs]
    if missing:
        raise MixerValueError(f"{sig.name}: missing argument{'s' * (len(missing) > 1)} "
                              f"{', '.join(missing)}")
    sizes: dict = {n: s for n, s, _ in sig.dims if s is not None}
    origin: dict = {n: "the mixer source" for n in sizes}
    # the leading axes are tracked apart from dims, so a dim may be called batch
    lead = [BATCH] if step else [BATCH, TIME]
    batch_time: dict = {}
    lead_origin: dict = {}

    def fit(kind, name, t, dims, leading):
        if not isinstance(t, torch.Tensor):
            raise MixerValueError(f"{kind} {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise MixerValueError(f"{kind} {name} must be a floating-point tensor, got {t.dtype}")
        want = list(leading) + list(dims)
        labels = [str(x) for x in want]
        if t.dim() != len(want):
            raise MixerShapeError(f"{kind} {name} has shape {list(t.shape)}, expected "
                                  f"[{', '.join(labels)}] ({len(want)} dims, got {t.dim()})")
        for axis, (label, n) in enumerate(zip(want, t.shape)):
            is_lead = isinstance(label, _Lead)
            table, where = (batch_time, lead_origin) if is_lead else (sizes, origin)
            if is_lead and label.name == "L":
                continue
            if label in table and table[label] != n:
                expected = [batch_time.get(x) if isinstance(x, _Lead) else sizes.get(x, x)
                            for x in want]
                expected = [str(x) if e is None else e for x, e in zip(want, expected)]
                raise MixerShapeError(
                    f"{kind} {name} has shape {list(t.shape)}, expected [{', '.join(labels)}] = "
                    f"{expected}: {label} is {table[label]} (from {where[label]}) "
                    f"but {name} gives {n}")
            if label not in table:
                table[label] = int(n)
                where[label] = f"{kind} {name}"
        wanted = check_finite is True or (check_finite == "params" and kind != "input")
        # meta tensors hold no values to check: a call on them propagates shapes
        if wanted and (_compiling() or t.device.type == "meta" or
                       (kind != "input" and _known_finite(t))):
            wanted = False
        if wanted and bool(torch.isfinite(t).all()):
            if kind != "input":
                _remember_finite(t)
        elif wanted:
            bad = int((~torch.isfinite(t)).sum())
            raise MixerValueError(f"{kind} {name} holds {bad} NaN/Inf value{'s' * (bad > 1)}")

    for name, dims in sig.inputs:
        fit("input", name, kwargs[name], dims, lead)
    for name, dims in sig.params:
        fit("param", name, kwargs[name], dims, [])
    for name, dims in sig.kernels:
        fit("kernel", name, kwargs[name], dims, [TAPS])
    for n, _, h in sig.dims:
        if h and n in sizes and h in sizes and sizes[h] % sizes[n]:
            raise MixerShapeError(f"dim {n} = {sizes[n]} (from {origin[n]}) does not divide "
                                  f"{h} = {sizes[h]} (from {origin[h]}); {n} divides {h} "
                                  f"maps head h to group h // ({h}/{n})")
    for name, _ in sig.kernels:
        if kwargs[name].shape[0] < 1:
            raise MixerShapeError(f"kernel {name} has no taps (L = 0)")
    if varlen and batch_time.get(BATCH, 1) != 1:
        raise MixerShapeError(f"with cu_seqlens the batch must be 1 (sequences packed along "
                              f"time), got batch {batch_time[BATCH]}")
    if not sig.inputs:
        raise MixerValueError(f"{sig.name} has no token inputs")
    first = kwargs[sig.inputs[0][0]]
    dtype = first.dtype
    for name, _ in sig.inputs:
        dtype = torch.promote_types(dtype, kwargs[name].dtype)
        if kwargs[name].device != first.device:
            raise MixerValueError(f"input {name} is on {kwargs[name].device} but input "
                                  f"{sig.inputs[0][0]} is on {first.device}")
    pick = lambda table: {n: kwargs[n] for n, _ in table}  # noqa: E731
    return Bound(pick(sig.inputs), pick(sig.params), pick(sig.kernels), sizes,
                 batch_time[BATCH], None if step else batch_time[TIME], dtype,
                 first.device, origin)


def _names(table) -> str:
    return ", ".join(n for n, _ in table) or "(none)"


def check_cu_seqlens(cu_seqlens, total: int) -> list:
    """Validate FlashAttention-style offsets [0, l0, l0+l1, ..., total]."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 \
            or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise MixerValueError("cu_seqlens must be a 1-D int32/int64 tensor of offsets")
    offs = [int(x) for x in cu_seqlens.tolist()]
    if len(offs) < 2 or offs[0] != 0 or offs[-1] != total or \
            any(b < a for a, b in zip(offs, offs[1:])):
        raise MixerValueError(f"cu_seqlens must rise from 0 to the packed length {total}, "
                              f"got {offs}")
    return offs


def signature_of(program) -> Signature:
    """The Signature of a checked program (mixerc.ir.Program)."""
    dims = program.dims.values()
    return Signature(
        program.name,
        tuple((d.name, d.size, d.divides) for d in dims if not d.name.isdigit())
        + tuple((d.name, d.size, None) for d in dims if d.name.isdigit()),
        tuple(program.inputs.items()), tuple(program.params.items()),
        tuple(program.kernels.items()),
        tuple((n, node.type.dims) for n, node in program.outs.items()))
