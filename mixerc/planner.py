"""Plan stage: pick an algorithm for every sequence matrix a program applies.

A matrix is split into additive terms; each term into wrappers (shift, rev)
around a Hadamard product of factors (`Parts`). Each strategy in
codegen/strategies/ looks at the parts and either claims the term, naming the
token-level operands it needs (as IR nodes) and its compile-time flags, or
passes. A matrix whose terms are not all claimed runs through the dense
fallback, and `explain` says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import analysis, ir
from .ir import STATIC, TOKEN, Type

INF = math.inf


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


@dataclass
class TermPlan:
    strategy: str             # codegen/strategies/<strategy>.py
    parts: Parts
    operands: dict            # name -> IR node (token or static) the strategy reads
    flags: dict               # compile-time switches for its template
    state: bool = True        # carries a decode state


@dataclass
class MatrixPlan:
    name: str
    matrix: ir.Node
    applies: list
    heads: tuple              # the matrix's free dims, flattened into one head axis
    terms: list               # TermPlans, or [] for the dense fallback
    info: analysis.MatrixInfo
    why_dense: str = ""

    @property
    def strategies(self) -> list:
        return [t.strategy for t in self.terms] or ["dense"]


@dataclass
class ModulePlan:
    program: ir.Program
    analysis: analysis.Analysis
    matrices: list

    def for_apply(self, apply: ir.Apply) -> MatrixPlan:
        for m in self.matrices:
            if any(a is apply for a in m.applies):
                return m
        raise KeyError(apply)


# ------------------------------------------------------------- IR building


def union_dims(a: tuple, b: tuple, groups: dict) -> tuple:
    """Result dims of an elementwise op (checker rule, group dims mapped)."""
    def mapped(mine, other):
        return tuple(groups[d] if d in groups and groups[d] in other and d not in other
                     and groups[d] not in mine else d for d in mine)
    return tuple(dict.fromkeys(mapped(a, b) + mapped(b, a)))


def _combine(op: str, a: ir.Node | None, b: ir.Node, groups: dict) -> ir.Node:
    if a is None:
        return b
    kind = TOKEN if TOKEN in (a.type.kind, b.type.kind) else STATIC
    return ir.Map(Type(kind, union_dims(a.type.dims, b.type.dims, groups)), op=op,
                  args=(a, b))


def mul(a: ir.Node | None, b: ir.Node, groups: dict) -> ir.Node:
    """a * b as a new IR node (a may be None: then b)."""
    return _combine("mul", a, b, groups)


def add(a: ir.Node | None, b: ir.Node, groups: dict) -> ir.Node:
    """a + b as a new IR node (a may be None: then b)."""
    return _combine("add", a, b, groups)


# ------------------------------------------------------------------ planning


def _heads(matrix: ir.Node, applies: list, program: ir.Program) -> tuple:
    """The matrix's dims as its applications see them: a group dim G of the
    matrix applied to values with the head dim H becomes H (the matrix is
    shared by the heads of a group), so operands and values line up."""
    g = program.groups
    out = []
    for d in matrix.type.dims:
        h = g.get(d)
        if h and h not in matrix.type.dims and all(
                h in a.u.type.dims and d not in a.u.type.dims for a in applies):
            out.append(h)
        else:
            out.append(d)
    return tuple(out)


def plan(program: ir.Program, result: analysis.Analysis | None = None) -> ModulePlan:
    from mixerc.codegen import strategies

    result = result or analysis.analyze(program)
    matrices = []
    for info in result.matrices:
        node = info.applies[0].m
        mp = MatrixPlan(info.name, node, info.applies, _heads(node, info.applies, program), [],
                        info)
        terms = []
        for term in analysis.terms(node):
            parts = decompose(term)
            claimed = None
            for strategy in strategies.ORDER:
                claimed = strategy.match(parts, mp, program)
                if claimed is not None:
                    break
            if claimed is None:
                mp.why_dense = f"no strategy claims the term at {term.loc or 'its definition'}"
                terms = []
                break
            terms.append(claimed)
        mp.terms = terms
        matrices.append(mp)
    return ModulePlan(program, result, matrices)


def describe(mp_plan: ModulePlan) -> str:
    """The torch backend's algorithm for each matrix, with its cost model."""
    from . import cost

    p = mp_plan.program
    taken = set(p.dims) | set(p.inputs) | set(p.params) | set(p.kernels) | set(p.lets) \
        | set(p.outs)
    lines = ["torch backend:"]
    for mp in mp_plan.matrices:
        how = ", ".join(t.strategy for t in mp.terms) if mp.terms else \
            f"dense fallback ({mp.why_dense})"
        lines.append(f"  {mp.name}: {how}")
        c = cost.matrix_cost(mp, mp_plan.program.groups)
        lines.append(f"    prefill FLOPs  {cost.readable(c.prefill_flops, taken)}")
        lines.append(f"    prefill bytes  {cost.readable(c.prefill_bytes, taken)}")
        if mp_plan.analysis.causal:
            lines.append(f"    decode FLOPs/token  {cost.readable(c.decode_flops, taken)}")
            lines.append(f"    decode state elements  {cost.readable(c.state, taken)}")
    return "\n".join(lines)
