"""Dense fallback for terms no strategy claims: the dense interpreter
evaluates just that term of `M @ u`, on the whole input history (its decode
state). Needs mixerc itself, so standalone modules cannot use it."""

import functools

import torch

from mixerc import analysis, ir
from mixerc.checker import check_source
from mixerc.dense import Evaluator


@functools.lru_cache(maxsize=64)
def _applies(source: str) -> tuple:
    program = check_source(source)
    return program, [n for n in program.nodes() if isinstance(n, ir.Apply)]


def dense_apply(source, index, term, inputs, others, sizes, history):
    """Term `term` of the matrix that Apply number `index` applies, times that
    Apply's vector, for the new tokens; and the input history so far."""
    program, applies = _applies(source)
    full = applies[index]
    m = analysis.terms(full.m)[term]
    if m.type.contracted:  # a term of a sum still inside its contraction: sum it here
        m = ir.Contract(ir.Type(ir.MATRIX, m.type.dims), x=m)
    apply = ir.Apply(full.type, m=m, u=full.u)
    first = next(iter(inputs.values()))
    dtype = first.dtype
    env = {}
    for name, x in inputs.items():
        x = x.to(torch.float64)
        if history is not None:
            x = torch.cat([history[name].to(torch.float64), x], 1)
        env[name] = x
    for name, x in others.items():
        env[name] = x.to(torch.float64)
    T = env[next(iter(inputs))].shape[1]
    start = 0 if history is None else history[next(iter(inputs))].shape[1]
    ev = Evaluator(program, env, sizes, first.shape[0], T)
    shape = (first.shape[0], T - start) + tuple(ev.sizes[d] for d in apply.type.dims)
    new_history = {n: x.to(dtype) for n, x in env.items() if n in inputs}
    if first.device.type == "meta":  # shapes only
        return first.new_zeros(shape), new_history
    v = ev.value(apply, torch.arange(start, T, device=first.device))
    v = ev.layout(v, ("b", "t") + apply.type.dims)
    return v.data.expand(shape).to(dtype), new_history
