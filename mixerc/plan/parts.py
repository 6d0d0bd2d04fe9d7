"""A term as wrappers around a Hadamard product of factors, and the small IR
builders the matchers use."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import analysis, ir
from ..ir import STATIC, TOKEN, Type


@dataclass
class Parts:
    """One additive term: wrappers outside, factors inside."""

    node: ir.Node
    wrappers: list            # outermost first: ("shift", k) | ("rev",) | ("transpose",)
    band: tuple               # (lo, hi) of t - s for the inner product (wrappers removed)
    lowranks: list = field(default_factory=list)
    decays: list = field(default_factory=list)
    rows: list = field(default_factory=list)      # token u: M[t,s] *= u_t
    cols: list = field(default_factory=list)      # token u: M[t,s] *= u_s
    statics: list = field(default_factory=list)   # static scale factors
    masks: list = field(default_factory=list)     # boolean predicates
    softmaxes: list = field(default_factory=list)
    toeplitz: list = field(default_factory=list)
    rest: list = field(default_factory=list)      # anything else
    summed: tuple = ()                            # sum(..., N) wrappers (time-invariant kernels)

    @property
    def factors(self) -> list:
        return (self.lowranks + self.decays + self.rows + self.cols + self.statics + self.masks
                + self.softmaxes + self.toeplitz + self.rest)


def decompose(term: ir.Node) -> Parts:
    wrappers = []
    inner = term
    while True:
        if isinstance(inner, ir.Contract):
            inner = inner.x
        elif isinstance(inner, ir.Shift):
            wrappers.append(("shift", inner.k))
            inner = inner.x
        elif isinstance(inner, ir.Rev):
            wrappers.append(("rev",))
            inner = inner.x
        elif isinstance(inner, ir.Transpose):
            wrappers.append(("transpose",))
            inner = inner.m
        else:
            break
    summed = ()
    while isinstance(inner, ir.Sum) and not wrappers:
        summed += (inner.dim,)
        inner = inner.x
    p = Parts(term, wrappers, analysis.band(inner), summed=summed)
    for f in analysis.factors(inner):
        if f.type.kind == STATIC:
            p.statics.append(f)
        elif f.type.boolean:
            p.masks.append(f)
        elif isinstance(f, ir.LowRank):
            p.lowranks.append(f)
        elif isinstance(f, ir.Decay):
            p.decays.append(f)
        elif isinstance(f, ir.Row):
            p.rows.append(f.u)
        elif isinstance(f, ir.Col):
            p.cols.append(f.u)
        elif isinstance(f, ir.Softmax):
            p.softmaxes.append(f)
        elif isinstance(f, ir.Toeplitz):
            p.toeplitz.append(f)
        else:
            p.rest.append(f)
    return p


def masks_band(masks) -> tuple | None:
    """(lo, hi) if every mask is exactly a band of t - s, joined; else None."""
    lo, hi = -analysis.INF, analysis.INF
    for m in masks:
        b = analysis.exact_band(m)
        if b is None:
            return None
        lo, hi = max(lo, b[0]), min(hi, b[1])
    return lo, hi


# ------------------------------------------------------------- IR building


def union_dims(a: tuple, b: tuple, groups: dict) -> tuple:
    """Result dims of an elementwise op (checker rule, group dims mapped)."""
    def mapped(mine, other):
        return tuple(groups[d] if d in groups and groups[d] in other and d not in other
                     and groups[d] not in mine else d for d in mine)
    return tuple(dict.fromkeys(mapped(a, b) + mapped(b, a)))


def combine(op: str, a: ir.Node | None, b: ir.Node, groups: dict) -> ir.Node:
    """a op b as a new IR node (a may be None: then b)."""
    if a is None:
        return b
    kinds = {a.type.kind, b.type.kind}
    kind = TOKEN if TOKEN in kinds else (kinds - {STATIC}).pop() if kinds - {STATIC} else STATIC
    return ir.Map(Type(kind, union_dims(a.type.dims, b.type.dims, groups)), op=op,
                  args=(a, b), loc=b.loc or a.loc)


def mul(a: ir.Node | None, b: ir.Node, groups: dict) -> ir.Node:
    return combine("mul", a, b, groups)


def add(a: ir.Node | None, b: ir.Node, groups: dict) -> ir.Node:
    return combine("add", a, b, groups)


def div(a: ir.Node, b: ir.Node, groups: dict) -> ir.Node:
    return combine("div", a, b, groups)


ONE = ir.Const(Type(STATIC), value=1.0)
MINUS_ONE = ir.Const(Type(STATIC), value=-1.0)
