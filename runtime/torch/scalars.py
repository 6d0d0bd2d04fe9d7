"""Numbers and selections in generated modules, with the dense interpreter's
semantics. Pure torch; `mixerc compile` inlines this file.

A mixer's numbers (constants, dim sizes and math on them) follow IEEE
float64 as the dense interpreter computes them: `2^1024` is inf, `1/0` is inf,
`exp(1000)` is inf, never a Python OverflowError or ZeroDivisionError. Code
generation folds constant numbers with `number` too, so a folded literal and
a run-time value agree.
"""

import math

import torch
import torch.nn.functional as F

_UNARY = {
    "neg": torch.neg, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt,
    "softplus": lambda x: torch.logaddexp(x, torch.zeros_like(x)), "sigmoid": torch.sigmoid,
    "silu": lambda x: x * torch.sigmoid(x), "elu": F.elu, "relu": torch.relu,
    "tanh": torch.tanh, "abs": torch.abs, "logsigmoid": F.logsigmoid,
}
_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
    "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq,
    "ne": torch.ne,
}


def number(op, *args):
    """op applied to Python numbers in float64: a float, or a bool for
    comparisons and logic."""
    if op == "not":
        return not args[0]
    if op == "and":
        return bool(args[0]) and bool(args[1])
    if op == "or":
        return bool(args[0]) or bool(args[1])
    if op == "mul" and isinstance(args[0], bool) != isinstance(args[1], bool):
        mask, value = args if isinstance(args[0], bool) else args[::-1]
        return float(value) if mask else 0.0  # a select: 0 even when value is inf
    x = [torch.tensor(float(a), dtype=torch.float64) for a in args]
    y = (_UNARY[op] if len(x) == 1 else _BINARY[op])(*x)
    return bool(y) if y.dtype == torch.bool else float(y)


def select(mask, value, dtype):
    """value where mask holds, else 0; never 0 * inf = nan. mask and value may
    be tensors or Python numbers; a number value takes `dtype`."""
    if not isinstance(mask, torch.Tensor):
        if mask:
            return value
        return torch.zeros_like(value) if isinstance(value, torch.Tensor) else 0.0
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(float(value), dtype=dtype, device=mask.device)
    return torch.where(mask, value, torch.zeros((), dtype=value.dtype, device=value.device))



def drop_denormals(p, inplace):
    """p (>= 0) with its subnormal entries (below the dtype's smallest normal number)
    set to 0. Far keys under a strong bias or decay give weights like e^-100,
    subnormal in float32, and a CPU multiplies subnormals ~10x slower; they are
    below the dtype's precision relative to the row's weights, so dropping them
    changes no result."""
    tiny = p < torch.finfo(p.dtype).tiny  # p >= 0 (softmax weights); a nan stays nan
    return p.masked_fill_(tiny, 0.0) if inplace else p.masked_fill(tiny, 0.0)


def floored(x):
    """x with every entry below log(smallest normal) + 30 set to -inf: exp(x) is
    then exactly 0 there instead of a subnormal number (a CPU multiplies
    subnormals ~10x slower, also as products inside a matmul). What is dropped
    is below 1e-25 of 1: under float32's and float64's precision; a nan stays."""
    floor = math.log(torch.finfo(x.dtype).tiny) + 30.0
    small = x < floor
    return x.masked_fill(small, -math.inf) if torch.is_grad_enabled() and x.requires_grad \
        else x.masked_fill_(small, -math.inf)
