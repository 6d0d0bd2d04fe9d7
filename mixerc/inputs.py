"""Random arguments for a program: used by the demo, `mixerc plot`, the
autotuner and benchmarks (tests write their own, per formula)."""

from __future__ import annotations

import torch

from . import ir


def default_sizes(program: ir.Program, overrides: dict | None = None) -> dict:
    """Small sizes for every dim: fixed ones as declared, group dims 2 with
    their head dim 4, everything else 4."""
    sizes = {d.name: d.size for d in program.dims.values() if d.size is not None}
    for d in program.dims.values():
        if d.divides:
            sizes.setdefault(d.divides, 4)
            sizes.setdefault(d.name, 2)
    for d in program.dims.values():
        sizes.setdefault(d.name, 4)
    sizes.update(overrides or {})
    return sizes


def decay_leaves(program: ir.Program) -> set:
    """Names of inputs/params used directly as a decay's log-rate (must be <= 0)."""
    names = set()
    for n in program.nodes():
        if isinstance(n, ir.Decay) and isinstance(n.a, (ir.Input, ir.Param)):
            names.add(n.a.name)
    return names


def random_inputs(program: ir.Program, sizes: dict, batch: int, time: int, *, seed: int = 0,
                  dtype=torch.float32, device="cpu", kernel_len: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    negative = decay_leaves(program)

    def sample(name, shape):
        x = torch.randn(tuple(shape), generator=g, dtype=torch.float64)  # () for a scalar param
        if name in negative:  # a log-decay per step: in (-1, 0)
            x = -torch.sigmoid(x) * 0.5 - 0.01
        return x.to(dtype=dtype, device=device)

    out = {}
    for name, dims in program.inputs.items():
        out[name] = sample(name, (batch, time) + tuple(sizes[d] for d in dims))
    for name, dims in program.params.items():
        out[name] = sample(name, tuple(sizes[d] for d in dims)) * 0.5
    for name, dims in program.kernels.items():
        out[name] = sample(name, (kernel_len,) + tuple(sizes[d] for d in dims)) * 0.5
    return out


def parse_dims(text: str | None) -> dict:
    """'H=4,G=2' -> {'H': 4, 'G': 2}."""
    out = {}
    for part in filter(None, (text or "").replace(" ", "").split(",")):
        if "=" not in part:
            raise ValueError(f"expected NAME=INT, got {part!r}")
        k, v = part.split("=", 1)
        out[k] = int(v)
    return out
