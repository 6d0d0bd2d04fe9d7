"""Tile classification for the flash template: interval arithmetic over whole
(row block x column block) tiles. Pure torch; `mixerc compile` inlines what
a module uses.

A number is bounded per tile by an interval (lo, hi) of tensors (or Python
numbers); a predicate by (must, may): true everywhere in the tile, true
somewhere. From the mask's (must, may) a tile is empty (not may: never
visited), full (must: computed without evaluating the mask) or partial.
Bounds are conservative: a tile may be called partial when it is full or
empty, never the other way round.
"""

import math

import torch


def block_bounds(x, block, dim):
    """(min, max) of x over consecutive blocks of `block` entries along `dim`
    (the last block may be shorter), blocks as a new axis at `dim`."""
    n = x.shape[dim]
    pad = -n % block
    lo = x.movedim(dim, -1)
    hi = lo
    if pad:
        lo = torch.cat([lo, lo.new_full(lo.shape[:-1] + (pad,), math.inf)], -1)
        hi = torch.cat([hi, hi.new_full(hi.shape[:-1] + (pad,), -math.inf)], -1)
    lo = lo.reshape(*lo.shape[:-1], -1, block).amin(-1).movedim(-1, dim)
    hi = hi.reshape(*hi.shape[:-1], -1, block).amax(-1).movedim(-1, dim)
    return lo, hi


def _minmax(*xs):
    lo = xs[0]
    hi = xs[0]
    for x in xs[1:]:
        lo = torch.minimum(torch.as_tensor(lo), torch.as_tensor(x))
        hi = torch.maximum(torch.as_tensor(hi), torch.as_tensor(x))
    return lo, hi


def iv_add(a, b):
    return a[0] + b[0], a[1] + b[1]


def iv_sub(a, b):
    return a[0] - b[1], a[1] - b[0]


def iv_neg(a):
    return -a[1], -a[0]


def iv_mul(a, b):
    products = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    products = [torch.nan_to_num(torch.as_tensor(p, dtype=torch.float64), nan=0.0)
                for p in products]  # 0 * inf inside a bound: the bound is 0
    return _minmax(*products)


def iv_div(a, b):
    b_lo, b_hi = torch.as_tensor(b[0], dtype=torch.float64), torch.as_tensor(b[1],
                                                                               dtype=torch.float64)
    spans_zero = (b_lo <= 0) & (b_hi >= 0)
    lo, hi = iv_mul(a, (1.0 / b_hi, 1.0 / b_lo))
    inf = torch.full_like(torch.as_tensor(lo, dtype=torch.float64), math.inf)
    return torch.where(spans_zero, -inf, lo), torch.where(spans_zero, inf, hi)


def iv_abs(a):
    lo, hi = torch.as_tensor(a[0], dtype=torch.float64), torch.as_tensor(a[1],
                                                                          dtype=torch.float64)
    low = torch.where((lo <= 0) & (hi >= 0), torch.zeros_like(lo), torch.minimum(lo.abs(),
                                                                                 hi.abs()))
    return low, torch.maximum(lo.abs(), hi.abs())


_UP = {"exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "sigmoid": torch.sigmoid,
       "tanh": torch.tanh, "relu": torch.relu,
       "softplus": lambda x: torch.logaddexp(x, torch.zeros_like(x)),
       "elu": torch.nn.functional.elu, "logsigmoid": torch.nn.functional.logsigmoid}


def iv_monotone(op, a):
    """An increasing function maps bounds to bounds."""
    f = _UP[op]
    return (f(torch.as_tensor(a[0], dtype=torch.float64)),
            f(torch.as_tensor(a[1], dtype=torch.float64)))


def iv_pow(a, p):
    lo, hi = torch.as_tensor(a[0], dtype=torch.float64), torch.as_tensor(a[1],
                                                                          dtype=torch.float64)
    if p == int(p) and int(p) % 2 == 0 and p >= 0:
        m_lo, m_hi = iv_abs((lo, hi))
        return m_lo ** p, m_hi ** p
    if p == int(p) and p >= 0:  # odd: increasing
        return lo ** p, hi ** p
    inf = torch.full_like(lo, math.inf)
    ok = lo >= 0  # a fractional power is increasing on x >= 0, undefined below
    return torch.where(ok, lo ** p, -inf), torch.where(ok, hi ** p, inf)


def iv_lt(a, b):
    return _b(a[1] < b[0]), _b(a[0] < b[1])


def iv_le(a, b):
    return _b(a[1] <= b[0]), _b(a[0] <= b[1])


def iv_gt(a, b):
    return iv_lt(b, a)


def iv_ge(a, b):
    return iv_le(b, a)


def iv_eq(a, b):
    must = _b(a[0] == a[1]) & _b(b[0] == b[1]) & _b(a[0] == b[0])
    return must, _b(a[0] <= b[1]) & _b(b[0] <= a[1])


def iv_ne(a, b):
    must, may = iv_eq(a, b)
    return ~may, ~must


def iv_and(a, b):
    return a[0] & b[0], a[1] & b[1]


def iv_or(a, b):
    return a[0] | b[0], a[1] | b[1]


def iv_not(a):
    return ~a[1], ~a[0]


def iv_select(mask, value):
    """Bounds of where(mask, value, 0)."""
    lo = torch.where(_b(mask[0]), torch.as_tensor(value[0], dtype=torch.float64),
                     torch.minimum(torch.as_tensor(value[0], dtype=torch.float64),
                                   torch.zeros(())))
    hi = torch.where(_b(mask[0]), torch.as_tensor(value[1], dtype=torch.float64),
                     torch.maximum(torch.as_tensor(value[1], dtype=torch.float64),
                                   torch.zeros(())))
    lo = torch.where(~_b(mask[1]), torch.zeros_like(lo), lo)
    hi = torch.where(~_b(mask[1]), torch.zeros_like(hi), hi)
    return lo, hi


def _b(x):
    return torch.as_tensor(x, dtype=torch.bool)
