"""Softmax terms -> the flash strategy.

Claims `c * row(g) * col(h) * softmax(S, mask = P)` where the scores S are any
elementwise function of one dot product q_t . k_s, the indices t and s,
per-token values (row(u), col(u)) and per-head params (ALiBi's
`- slope * (t - s)`, soft-capping's `cap * tanh(S / cap)`, a lag bias), and the
mask P any predicate over t, s and per-token values (bands, prefix-LM, a
document id `row(doc) == col(doc)`). The backend renders S and P inside its
tiles (FlexAttention's score_mod and mask_mod); P's band lets whole tiles
be skipped without evaluating it, and the tile classifier handles the rest.
"""

from __future__ import annotations

from .. import analysis, ir
from ..ir import STATIC, Type
from . import rewrite
from .model import INF, MaskPlan, Operand, ScorePlan, StatePlan, StateTensor, TermPlan
from .parts import MINUS_ONE, ONE, div, mul, union_dims

SCORE_NODES = (ir.Map, ir.Contract, ir.LowRank, ir.Index, ir.Row, ir.Col)
MASK_NODES = (ir.Map, ir.Index, ir.Row, ir.Col)


def match(parts, mp, program, index) -> TermPlan | None:
    if len(parts.softmaxes) != 1 or parts.summed or parts.lowranks or parts.decays \
            or parts.toeplitz or parts.rest or parts.masks:
        return None
    if any(w[0] == "transpose" for w in parts.wrappers):
        return None
    sm = parts.softmaxes[0]
    g = program.groups
    heads = set(mp.heads) | {d for d, h in g.items() if h in mp.heads}
    score = score_plan(sm.scores, heads, g)
    if score is None:
        return None
    mask = mask_plan(sm.mask, heads)
    if mask is None:
        return None
    operands = {}
    if score.dot is not None:
        q, k = score.dot.x.u, score.dot.x.w
        operands["q"] = Operand("q", q, _heads(q, score.dot.x.dim), (score.dot.x.dim,))
        operands["k"] = Operand("k", k, _heads(k, score.dot.x.dim), (score.dot.x.dim,))
    leaves = {}  # id(Row or Col node) -> operand name, for rendering S and P in tiles
    for kind, role in ((ir.Row, "row"), (ir.Col, "col")):
        by_value: dict = {}
        for leaf in score.leaves(kind) + _leaves(sm.mask, kind):
            if id(leaf.u) not in by_value:
                by_value[id(leaf.u)] = f"{role}{len(by_value)}"
                operands[by_value[id(leaf.u)]] = Operand(role, leaf.u, leaf.u.type.dims)
            leaves[id(leaf)] = by_value[id(leaf.u)]
    scale = None
    for s in parts.statics:
        scale = mul(scale, s, g)
    if scale is not None and not set(scale.type.dims) <= heads:
        return None  # a scale over other dims: not a per-head number
    gates(operands, parts, g, scale)
    lo, hi = mask.band
    flags = {"lo": lo, "hi": hi, "causal": lo == 0 and hi == INF, "cache": lo >= 0,
             "leaves": leaves,
             "window": mask.window,
             "sdpa": score.pure and mask.exact and (lo, hi) in ((0, INF), (-INF, INF))}
    return TermPlan(index, parts.node, "flash", list(parts.wrappers), operands, mask, flags,
                    _state(mask, operands), "recompute: autograd through each query block, "
                    "checkpointed (memory O(block x T))", score=score)


def score_plan(scores: ir.Node, heads: set, groups: dict) -> ScorePlan | None:
    """The scores as an elementwise expression around one dot product."""
    if not rewrite.uses_only(scores, SCORE_NODES, stop=(ir.Row, ir.Col, ir.LowRank)):
        return None
    part = rewrite.matrix_part(scores)
    contracts = [n for n in part if isinstance(n, ir.Contract)]
    lowranks = {id(n) for n in part if isinstance(n, ir.LowRank)}
    if len(contracts) > 1 or len(lowranks) != len(contracts):
        return None  # two dot products, or a low rank summed some other way
    if not _per_head(scores, heads):
        return None
    if not contracts:
        return ScorePlan(scores, None)
    dot, outside = _dot(contracts[0], groups)
    if dot is None or dot.x.dim in heads:
        return None  # no dot product, or one summed over a head dim (one score for all heads)
    expr = rewrite.substitute(scores, {id(contracts[0]): outside})
    scale = _pure_scale(expr, dot, groups)
    if scale is False:  # a modified score: a static scale of the dot folds into q
        expr, dot = _fold_scale(expr, dot, groups)
    return ScorePlan(expr, dot, scale if scale is not False else None, pure=scale is not False)


def _fold_scale(expr: ir.Node, dot: ir.Node, groups: dict):
    """(expr, dot) with `c * (q . k)` (or `(q . k) / c`) for a static c turned
    into (c q) . k: one multiply per query instead of one per score."""
    parents = [n for n in ir.walk(expr) if isinstance(n, ir.Map) and
               any(a is dot for a in n.args)]
    if len(parents) != 1 or parents[0].op not in ("mul", "div"):
        return expr, dot
    p = parents[0]
    other = p.args[1] if p.args[0] is dot else p.args[0]
    if other.type.kind != STATIC or other.type.boolean or (p.op == "div" and p.args[0] is not dot):
        return expr, dot
    lr = dot.x
    q = mul(lr.u, other, groups) if p.op == "mul" else div(lr.u, other, groups)
    lowrank = ir.LowRank(lr.type, u=q, w=lr.w, dim=lr.dim, loc=lr.loc)
    folded = ir.Contract(dot.type, x=lowrank, loc=dot.loc)
    return rewrite.substitute(expr, {id(p): folded}), folded


def _dot(contract: ir.Contract, groups: dict):
    """(Contract(LowRank(q', k')), dot * factors) with the factors that carry the
    contracted dim folded into q' (row and static factors) or k' (col
    factors); None when the sum is not one scaled dot product."""
    x = contract.x
    parts = analysis.factors(x)
    lowranks = [f for f in parts if isinstance(f, ir.LowRank)]
    if len(lowranks) != 1:
        return None, None
    lr = lowranks[0]
    d = lr.dim
    q, k, outside = lr.u, lr.w, None
    for f in parts:
        if f is lr:
            continue
        carries = d in f.type.dims or d in f.type.contracted
        if carries and isinstance(f, ir.Row):
            q = mul(q, f.u, groups)
        elif carries and isinstance(f, ir.Col):
            k = mul(k, f.u, groups)
        elif carries and f.type.kind == STATIC:
            q = mul(q, f, groups)
        elif carries:
            return None, None  # e.g. exp(q_d k_d) inside the sum: not a dot product
        else:
            outside = mul(outside, f, groups)
    if q.type.kind != ir.TOKEN or k.type.kind != ir.TOKEN:
        return None, None
    dims = union_dims(tuple(x for x in q.type.dims if x != d),
                      tuple(x for x in k.type.dims if x != d), groups)
    lowrank = ir.LowRank(Type(ir.MATRIX, dims, (d,)), u=q, w=k, dim=d, loc=lr.loc)
    dot = ir.Contract(Type(ir.MATRIX, dims), x=lowrank, loc=contract.loc)
    return dot, dot if outside is None else mul(dot, outside, groups)


def _pure_scale(expr: ir.Node, dot: ir.Node, groups: dict):
    """The static c with expr == c * dot (None for c == 1); False otherwise."""
    if expr is dot:
        return None
    if not isinstance(expr, ir.Map) or expr.op not in ("mul", "div", "neg"):
        return False
    a = expr.args
    if expr.op == "neg":
        inner = _pure_scale(a[0], dot, groups)
        return False if inner is False else mul(inner, MINUS_ONE, groups)
    static = [x for x in a if x.type.kind == STATIC]
    other = [x for x in a if x.type.kind != STATIC]
    if len(static) != 1 or len(other) != 1 or (expr.op == "div" and static[0] is not a[1]):
        return False
    inner = _pure_scale(other[0], dot, groups)
    if inner is False:
        return False
    c = static[0] if expr.op == "mul" else div(ONE, static[0], groups)
    return mul(inner, c, groups)


def mask_plan(mask: ir.Node | None, heads: set) -> MaskPlan | None:
    if mask is None:
        return MaskPlan()
    if not rewrite.uses_only(mask, MASK_NODES, stop=(ir.Row, ir.Col)) \
            or not _per_head(mask, heads):
        return None
    exact = analysis.exact_band(mask)
    if exact is not None:
        if exact[0] > exact[1]:
            return None  # nothing mixes: not worth a kernel
        return MaskPlan(mask, tuple(_int(x) for x in exact), True)
    return MaskPlan(mask, tuple(_int(x) for x in analysis.band(mask)), False)


def gates(operands: dict, parts, groups: dict, scale) -> None:
    """Factors outside the term's matrix: row(g) scales the output rows, col(h)
    the values, a static c the output. A backend applies them outside the
    term's wrappers (out_scale to the output after them, in_scale to the
    values before them), so the gates are moved through the wrappers here:
    shift(row(g) * M, k) @ u == shift(g, k) * (shift(M, k) @ u) and
    rev(col(h) * M) @ u == rev(M) @ (rev(h) * u)."""
    out = scale
    for u in parts.rows:
        out = mul(out, u, groups)
    if out is not None:
        out = _rows_outside(out, parts.wrappers)
        operands["out_scale"] = Operand("out_scale", out, out.type.dims)
    vin = None
    for u in parts.cols:
        vin = mul(vin, u, groups)
    if vin is not None:
        for w in parts.wrappers:  # a shift moves rows only; a rev also reverses columns
            vin = rewrite.reversed_token(vin) if w[0] == "rev" else vin
        operands["in_scale"] = Operand("in_scale", vin, vin.type.dims)


def _rows_outside(g: ir.Node, wrappers: list) -> ir.Node:
    """A row gate g of the wrapped matrix as a gate of the term's output."""
    if g.type.kind == STATIC:
        return g  # the same on every row (the rows a shift empties are 0 either way)
    for w in reversed(wrappers):  # innermost first
        if w[0] == "shift":
            g = ir.Shift(g.type, x=g, k=w[1], loc=g.loc)
        elif w[0] == "rev":
            g = rewrite.reversed_token(g)
    return g


def _state(mask: MaskPlan, operands: dict) -> StatePlan:
    if not mask.causal:
        return StatePlan("none", [], "not causal: no decode step")
    keep = "time" if mask.window is None else mask.window
    tensors = [StateTensor("keys", (keep,) + operands["k"].heads + operands["k"].feature)] \
        if "k" in operands else []
    tensors.append(StateTensor("values", (keep, "...")))
    tensors += [StateTensor(f"{o.role} {name}", (keep,) + o.heads)
                for name, o in operands.items() if o.role == "col"]
    if mask.window is None:
        return StatePlan("kv_cache", tensors, "append each token's key and value")
    return StatePlan("window", tensors, f"ring buffer of the last {mask.window} keys and values")


def _heads(node: ir.Node, dim: str) -> tuple:
    return tuple(d for d in node.type.dims if d != dim)


def _per_head(root: ir.Node, heads: set) -> bool:
    """Every per-token and static value under root varies over head dims only
    (the contracted dim aside): one score per (head, t, s)."""
    nodes = list(ir.walk(root))
    ok = heads | {n.dim for n in nodes if isinstance(n, ir.LowRank)}
    for n in nodes:
        if isinstance(n, (ir.Row, ir.Col)) and not set(n.u.type.dims) <= ok:
            return False
        if n.type.kind == STATIC and not set(n.type.dims) <= ok:
            return False
    return True


def _leaves(root, kind) -> list:
    return [] if root is None else [n for n in rewrite.matrix_part(root) if isinstance(n, kind)]


def _int(x):
    return x if abs(x) == INF else int(x)
