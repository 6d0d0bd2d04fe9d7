"""`CompiledMixer.module(**dims)`: a torch.nn.Module that owns the params.

Initial values come from the source (`param A_log : [H] = log(uniform(1, 16))`);
a param without one starts as normal(0, 0.1), or, if it is used directly as a
decay's log-rate, as log(uniform(0.9, 0.999)) so that the decay is stable.
Kernels (`kernel h : [E]`) stay call arguments: they are usually produced by
another network (an implicit filter).
"""

from __future__ import annotations

import torch

from . import ir
from .dense import Evaluator
from .errors import MixerValueError
from .inputs import decay_leaves


def initial_values(program: ir.Program, sizes: dict, generator=None) -> dict:
    """name -> float64 tensor for every param."""
    ev = Evaluator(program, {}, sizes, 1, 1)
    ev.generator = generator
    negative = decay_leaves(program)
    out = {}
    for name, dims in program.params.items():
        shape = tuple(sizes[d] for d in dims)
        node = program.param_inits.get(name)
        if node is not None:
            v = ev.value(node)
            v = ev.layout(v, dims).data.expand(shape).clone()
        elif name in negative:
            v = torch.log(torch.rand(shape, generator=generator, dtype=torch.float64)
                          * 0.099 + 0.9)
        else:
            v = torch.randn(shape, generator=generator, dtype=torch.float64) * 0.1
        if not torch.isfinite(v).all():
            raise MixerValueError(f"the initial value of param {name} has NaN/Inf")
        out[name] = v
    return out


class MixerModule(torch.nn.Module):
    """forward(**inputs, initial_state=None, return_state=False, cu_seqlens=None);
    step(state, **inputs_t). Params are nn.Parameters named as in the source."""

    def __init__(self, mixer, sizes: dict, dtype=torch.float32, device=None, seed=None):
        super().__init__()
        self.mixer = mixer
        self.sizes = dict(sizes)
        g = None if seed is None else torch.Generator().manual_seed(seed)
        for name, value in initial_values(mixer.program, self.sizes, g).items():
            self.register_parameter(name, torch.nn.Parameter(value.to(dtype=dtype,
                                                                       device=device)))

    def forward(self, initial_state=None, return_state=False, cu_seqlens=None, **inputs):
        params = {n: p for n, p in self.named_parameters(recurse=False)}
        return self.mixer(initial_state=initial_state, return_state=return_state,
                          cu_seqlens=cu_seqlens, **inputs, **params)

    def step(self, state, **inputs):
        params = {n: p for n, p in self.named_parameters(recurse=False)}
        return self.mixer.step(state, **inputs, **params)

    def extra_repr(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.sizes.items() if not k.isdigit())
        return f"{self.mixer.name}, {dims}, backend={self.mixer.backend_name}"
